"""A namespace's counters as the sampler reads them before deciding to dump it
(agent.collect.sockets.changes.read_signals), over /proc files written by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.collect.sockets.changes import read_signals

SNMP = (
    "Ip: Forwarding DefaultTTL\nIp: 2 64\n"
    "Tcp: RtoAlgorithm ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs\n"
    "Tcp: 1 11 12 13 14 15 999\n"
    "Udp: InDatagrams NoPorts InErrors OutDatagrams\n"
    "Udp: 21 0 0 22\n"
    "UdpLite: InDatagrams NoPorts InErrors OutDatagrams\nUdpLite: 0 0 0 0\n"
)
SOCKSTAT = (
    "sockets: used 290\n"
    "TCP: inuse 7 orphan 0 tw 3 alloc 9 mem 1\n"
    "UDP: inuse 2 mem 0\n"
    "UDPLITE: inuse 5\n"
    "RAW: inuse 1\n"
)
SOCKSTAT6 = "TCP6: inuse 4\nUDP6: inuse 1\nUDPLITE6: inuse 0\nRAW6: inuse 0\n"
SNMP6 = "".join(
    f"{name:<32}\t{value}\n"
    for name, value in (("Udp6InDatagrams", 31), ("Udp6NoPorts", 2), ("Udp6OutDatagrams", 32))
)


def proc(tmp_path: Path, **files: str) -> str:
    net = tmp_path / "42" / "net"
    net.mkdir(parents=True)
    for name, text in files.items():
        (net / name).write_text(text)
    return str(tmp_path)


def test_tcp_udp_and_socket_counts_of_both_families(tmp_path: Path) -> None:
    root = proc(tmp_path, snmp=SNMP, sockstat=SOCKSTAT, sockstat6=SOCKSTAT6, snmp6=SNMP6)
    signals = read_signals(42, root)
    assert signals.tcp == (11, 12, 13, 14, 15, 7, 3, 4)  # counters, TCP inuse, tw, TCP6 inuse
    assert signals.udp == (21, 22, 2, 1, 31, 32)  # datagrams, UDP inuse, UDP6 inuse, UDP6's
    assert signals.sockets == 7 + 3 + 2 + 4 + 1  # not UDPLITE, RAW or the host-wide figures
    assert signals.active_opens == 11


def test_without_ipv6_or_udp6_sockets_their_files_are_not_needed(tmp_path: Path) -> None:
    signals = read_signals(42, proc(tmp_path, snmp=SNMP, sockstat=SOCKSTAT))
    assert signals.udp == (21, 22, 2, 0) and signals.sockets == 12


def test_figures_that_are_no_numbers_count_as_missing(tmp_path: Path) -> None:
    root = proc(tmp_path, snmp=SNMP, sockstat="TCP: inuse x tw\ngarbage\n")
    signals = read_signals(42, root)
    assert signals.tcp[-3:] == (-1, -1, 0) and signals.sockets == 0


def test_a_namespace_without_tcp_counters_or_a_gone_process(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no Tcp: counters"):
        read_signals(42, proc(tmp_path, snmp="Ip: Forwarding\nIp: 2\n", sockstat=SOCKSTAT))
    with pytest.raises(OSError):
        read_signals(43, str(tmp_path))
