"""netlink sock_diag: the filter program, the decoded records against /proc, sockstat counts.

The program's layout is checked by an evaluator that follows ``inet_diag_bc_audit`` and
``inet_diag_bc_run`` (net/ipv4/inet_diag.c) step by step; the kernel itself then runs it on real
sockets in a test host (root), where every record must equal the row ``/proc`` shows.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import List, Optional, Tuple

import pytest
from conftest import needs_root
from nethost import NetHost

from agent.classify import NEVER_EXTERNAL, Classifier
from agent.collect.netns import namespace_of
from agent.collect.sockets.changes import read_signals
from agent.collect.sockets.procnet import SOCKET_TABLES, TCP4, TCP6, UDP4, read_sockets
from agent.collect.sockets.sockdiag import (
    ALL_STATES,
    LISTEN_ONLY,
    NOT_LISTENING,
    DiagSocket,
    SockDiagError,
    exclude_inbound_internal,
    exclude_remote,
)
from agent.inet import is_listening

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
_OP = struct.Struct("=BBH")
_COND = struct.Struct("=BBxxi")


def audit(program: bytes) -> None:
    """``inet_diag_bc_audit`` for the ops we emit: every *yes* and *no* in range and 4-aligned,
    every *no* landing on the chain of *yes* jumps."""
    chain = set()
    position = 0
    while position < len(program):
        chain.add(position)
        _, yes, _ = _OP.unpack_from(program, position)
        assert yes >= 4 and yes % 4 == 0 and position + yes <= len(program) + 4
        position += yes
    position = 0
    while position < len(program):
        code, yes, no = _OP.unpack_from(program, position)
        assert code in (1, 7, 8)
        assert no >= 4 and no % 4 == 0 and position + no <= len(program) + 4
        assert position + no >= len(program) or position + no in chain
        position += yes


def run(
    program: bytes, family: int, remote: bytes, local: bytes = b"", local_port: int = 0
) -> bool:
    """``inet_diag_bc_run`` on a socket whose peer is ``remote`` (4 or 16 bytes) and whose
    own end is ``local``:``local_port``."""
    position = 0
    while 0 <= position < len(program):
        code, yes, no = _OP.unpack_from(program, position)
        if code == 1:  # JMP
            position += no
            continue
        assert code in (7, 8)  # S_COND, D_COND
        cond_family, length, port = _COND.unpack_from(program, position + 4)
        size = {socket.AF_INET: 4, socket.AF_INET6: 16}[cond_family]
        network = int.from_bytes(program[position + 12 : position + 12 + size], "big")
        address = remote
        if code == 7:
            if port not in (-1, local_port):
                position += no
                continue
            address = local
        else:
            assert port == -1
        if cond_family == family:
            matched = _prefix_match(address, network, length, size * 8)
        else:  # only an IPv4 condition on an IPv4-mapped address of an IPv6 socket can match
            matched = (
                family == socket.AF_INET6
                and address[:12] == b"\0" * 10 + b"\xff\xff"
                and _prefix_match(address[12:], network, length, 32)
            )
        position += yes if matched else no
    return position == len(program)


def _prefix_match(address: bytes, network: int, length: int, bits: int) -> bool:
    shift = bits - length
    return int.from_bytes(address, "big") >> shift == network >> shift


def packed(text: str) -> Tuple[int, bytes]:
    address = ipaddress.ip_address(text)
    return (socket.AF_INET if address.version == 4 else socket.AF_INET6), address.packed


CLASSIFIER = Classifier([ipaddress.ip_network("198.51.100.0/24")])


@pytest.mark.parametrize(
    "peer",
    [
        "10.1.2.3", "172.31.255.255", "192.168.0.1", "127.0.0.1", "169.254.1.1", "0.0.0.0",
        "100.64.0.1", "198.51.100.7", "::", "::1", "fd00::1", "fe80::1", "::ffff:10.0.0.1",
        "::ffff:198.51.100.9",
        "8.8.8.8", "9.9.9.9", "192.0.0.9", "2001:4860:4860::8888", "::ffff:8.8.8.8",
        "64:ff9b::808:808", "172.32.0.1", "11.0.0.0",
    ],
)  # fmt: skip
def test_the_program_drops_exactly_the_never_external_peers(peer: str) -> None:
    family, remote = packed(peer)
    version = 4 if family == socket.AF_INET else 6
    program = exclude_remote(CLASSIFIER.never_external(), version)
    audit(program)
    kept = run(program, family, remote)
    verdict = CLASSIFIER.classify(peer)
    assert kept or not verdict.external  # never drops an external peer
    inside = [n for n in (*NEVER_EXTERNAL, "198.51.100.0/24") if _within(peer, n)]
    assert kept == (not inside)


def _within(peer: str, network: str) -> bool:
    address = ipaddress.ip_address(peer)
    block = ipaddress.ip_network(network)
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None and block.version == 4:
        return mapped in block
    return address in block


def test_no_address_in_a_never_external_block_is_external() -> None:
    for block in NEVER_EXTERNAL:
        network = ipaddress.ip_network(block)
        step = max(1, network.num_addresses // 64)
        for index in range(0, network.num_addresses, step):
            assert not Classifier().classify(str(network[index])).external, network[index]
        assert not Classifier().classify(str(network[-1])).external


LISTENERS = [(4, None, 80), (4, int(ipaddress.ip_address("192.0.2.1")), 443), (6, None, 22)]


@pytest.mark.parametrize(
    ("local", "port", "peer", "kept"),
    [
        ("10.0.0.1", 80, "10.0.0.2", False),  # accepted on the v4 wildcard, internal peer
        ("10.0.0.1", 80, "8.8.8.8", True),  # accepted, external peer: wanted
        ("10.0.0.1", 40000, "10.0.0.2", True),  # outbound: counted
        ("192.0.2.1", 443, "192.168.1.1", False),
        ("192.0.2.2", 443, "192.168.1.1", True),  # not the listener's address
        ("::ffff:10.0.0.1", 80, "::ffff:10.0.0.2", False),  # v4 wildcard takes mapped
        ("fd00::1", 22, "fd00::2", False),
        ("fd00::1", 80, "fd00::2", True),  # no v6 listener on 80
        ("fd00::1", 22, "2001:4860::1", True),
    ],
)
def test_the_inbound_internal_program(local: str, port: int, peer: str, kept: bool) -> None:
    family, remote = packed(peer)
    version = 4 if family == socket.AF_INET else 6
    program = exclude_inbound_internal(LISTENERS, CLASSIFIER.never_external(), version)
    audit(program)
    assert run(program, family, remote, packed(local)[1], port) == kept


def test_no_listener_means_no_inbound_program() -> None:
    assert exclude_inbound_internal([], CLASSIFIER.never_external(), 4) == b""
    assert exclude_inbound_internal([(6, None, 22)], CLASSIFIER.never_external(), 4) == b""


def test_an_empty_program_keeps_everything() -> None:
    assert exclude_remote([], 4) == b""
    assert exclude_remote([(6, 1, 128)], 4) == b""


def test_a_gone_process_cannot_be_entered() -> None:
    with pytest.raises(OSError):
        DiagSocket.in_namespace(2**22 + 1)


@needs_root
def test_records_equal_the_proc_rows_and_the_filter_runs_in_the_kernel(nethost: NetHost) -> None:
    srv, cli = nethost.namespace("dsrv"), nethost.namespace("dcli")
    nethost.veth(srv, "ds0", cli, "dc0")
    for address in ("9.9.9.9/24", "10.9.9.9/24", "2001:db8:9::9/64", "fd00:9::9/64"):
        srv.add_address(nethost.name("ds0"), address)
    for address in ("9.9.9.10/24", "10.9.9.10/24", "2001:db8:9::10/64", "fd00:9::10/64"):
        cli.add_address(nethost.name("dc0"), address)
    listeners = {
        peer: nethost.listen(srv, peer)
        for peer in ("9.9.9.9", "10.9.9.9", "2001:db8:9::9", "fd00:9::9")
    }
    for peer, listener in listeners.items():
        nethost.connect(cli, peer, listener.port)
    nethost.connect(cli, "::ffff:9.9.9.9", listeners["9.9.9.9"].port)
    nethost.connect(cli, "::ffff:10.9.9.9", listeners["10.9.9.9"].port)
    udp = nethost.listen(srv, "9.9.9.9", proto="udp")
    nethost.connect(cli, "9.9.9.9", udp.port, proto="udp")

    client = nethost.connect(cli, "9.9.9.9", listeners["9.9.9.9"].port)
    with DiagSocket.in_namespace(client.pid) as diag:
        for table in SOCKET_TABLES:
            assert sorted(diag.dump(table)) == sorted(read_sockets(client.pid, table))
        program = exclude_remote(Classifier().never_external(), 4)
        kept = diag.dump(TCP4, NOT_LISTENING, program)
        assert {s.remote_address for s in kept} == {int(ipaddress.ip_address("9.9.9.9"))}
        program6 = exclude_remote(Classifier().never_external(), 6)
        kept6 = diag.dump(TCP6, NOT_LISTENING, program6)
        assert {s.remote_address for s in kept6} == {
            int(ipaddress.ip_address("2001:db8:9::9")),  # documentation: not never-external
            int(ipaddress.ip_address("::ffff:9.9.9.9")),
        }
        udp_rows = diag.dump(UDP4)
        assert [s.remote_port for s in udp_rows] == [udp.port]
        assert not any(
            is_listening(s.protocol, s.state, s.remote_address, s.remote_port) for s in udp_rows
        )
        assert read_signals(client.pid).sockets >= len(diag.dump(TCP4)) + len(diag.dump(TCP6))
        with pytest.raises(SockDiagError):
            diag.dump(TCP4, ALL_STATES, b"\x01\x00\x04\x00")  # a jump the audit refuses
        assert len(diag.dump(TCP4)) == len(read_sockets(client.pid, TCP4))  # still usable

    with DiagSocket.in_namespace(listeners["9.9.9.9"].pid) as diag:
        listening = diag.dump(TCP4, LISTEN_ONLY) + diag.dump(TCP6, LISTEN_ONLY)
        assert len(listening) == 4 and all(
            is_listening(s.protocol, s.state, s.remote_address, s.remote_port) for s in listening
        )
        ends = [(s.version, s.local_address, s.local_port) for s in listening]
        never = Classifier().never_external()
        accepted = diag.dump(TCP4, NOT_LISTENING, exclude_inbound_internal(ends, never, 4))
        assert {str(ipaddress.ip_address(s.remote_address)) for s in accepted} == {"9.9.9.10"}
        accepted6 = diag.dump(TCP6, NOT_LISTENING, exclude_inbound_internal(ends, never, 6))
        # the IPv4-mapped dial reached the IPv4 listener: its accepted socket is IPv4
        assert len(accepted) == 3  # two dials to 9.9.9.9 and the mapped one
        assert {str(ipaddress.ip_address(s.remote_address)) for s in accepted6} == {
            "2001:db8:9::10"
        }
        assert namespace_of(listeners["9.9.9.9"].pid) == srv.inode


@needs_root
def test_this_namespace_without_setns() -> None:
    here: Optional[DiagSocket] = None
    try:
        here = DiagSocket.in_namespace(os.getpid())
        rows: List[object] = here.dump(TCP4) + here.dump(UDP4)
        assert isinstance(rows, list)
    finally:
        if here is not None:
            here.close()
