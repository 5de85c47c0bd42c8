"""Decoding /proc/net/{tcp,tcp6,udp,udp6}: real lines, hostile lines, this host's own tables."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect.netns import discover_namespaces, namespace_of, parse_namespace_link
from agent.collect.sockets.procnet import (
    SOCKET_TABLES,
    TCP4,
    TCP6,
    UDP4,
    UDP6,
    ListenerIndex,
    decode_address,
    decode_endpoint,
    encode_address,
    parse_line,
    parse_snmp,
    read_socket_table,
    read_sockets,
    read_tcp_counters,
    scan_socket_table,
    tcp_state_name,
)

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="the sample lines were printed by a little-endian kernel"
)

# Lines as a little-endian (x86-64) kernel prints them, header included.
TCP_TEXT = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode\n"
    "   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0"
    " 16182 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0A090909:D46E 09090909:01BB 01 00000000:00000000 02:000A7E6B 00000000  1000        0"
    " 771234 2 0000000000000000 20 4 30 10 -1\n"
    "   2: 0A090909:D470 09090909:01BB 06 00000000:00000000 03:00001770 00000000     0        0"
    " 0 3 0000000000000000\n"
)
TCP6_TEXT = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n"
    "   1: 60480120000060480000000002000000:9C40 60480120000060480000000088880000:0050 01"
    " 00000000:00000000 00:00000000 00000000   33        0 5151 1 0000000000000000 20 4 1 10 -1\n"
    "   2: 0000000000000000FFFF00000A090909:D4F2 0000000000000000FFFF000009090909:01BB 02"
    " 00000000:00000000 01:00000064 00000002     0        0 6161 1 0000000000000000 200 0 0 1 7\n"
)
UDP_TEXT = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode ref pointer drops\n"
    "  123: 0A09090A:A95B 09090909:0035 01 00000000:00000000 00:00000000 00000000   100        0"
    " 55555 2 0000000000000000 0\n"
    "  124: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0"
    " 55556 2 0000000000000000 0\n"
)


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


@little_endian_only
def test_ipv4_hex_is_one_host_order_word() -> None:
    assert decode_address("0100007F", 4) == v4("127.0.0.1")
    assert decode_address("0A090909", 4) == v4("9.9.9.10")
    assert decode_address("00000000", 4) == 0
    assert decode_address("FFFFFFFF", 4) == v4("255.255.255.255")


@little_endian_only
def test_ipv6_hex_is_four_host_order_words() -> None:
    assert decode_address("00000000000000000000000001000000", 6) == v6("::1")
    assert decode_address("60480120000060480000000088880000", 6) == v6("2001:4860:4860::8888")
    assert decode_address("0000000000000000FFFF00000100007F", 6) == v6("::ffff:127.0.0.1")
    assert decode_address("000080FE00000000FF6C1B7C1CCBFCFE", 6) == v6("fe80::7c1b:6cff:fefc:cb1c")


@given(st.integers(0, 2**128 - 1))
def test_encode_decode_round_trip_ipv6(value: int) -> None:
    assert decode_address(encode_address(value, 6), 6) == value


@given(st.integers(0, 2**32 - 1))
def test_encode_decode_round_trip_ipv4(value: int) -> None:
    assert decode_address(encode_address(value, 4), 4) == value


@pytest.mark.parametrize(
    "text, version",
    [
        ("", 4),
        ("0100007", 4),  # 7 digits
        ("0100007F0", 4),
        ("0100007G", 4),
        ("+100007F", 4),
        ("0x00007F", 4),
        ("0100007F", 6),  # IPv4 length in tcp6
        ("0" * 31, 6),
        ("Z" * 32, 6),
        ("é" * 32, 6),
    ],
)
def test_bad_address_hex_raises_value_error(text: str, version: int) -> None:
    with pytest.raises(ValueError):
        decode_address(text, version)


def test_endpoint_needs_address_colon_port() -> None:
    assert decode_endpoint("0100007F:0050", 4)[1] == 80
    for bad in ("0100007F", "0100007F:", "0100007F:50", "0100007F:00500", ":0050", "a:b:c"):
        with pytest.raises(ValueError):
            decode_endpoint(bad, 4)


@little_endian_only
def test_tcp_rows_decode_every_field() -> None:
    sockets, seen = scan_socket_table(TCP_TEXT, TCP4)
    assert seen == 3
    listener, established, time_wait = sockets
    assert (listener.local_address, listener.local_port) == (v4("127.0.0.1"), 3306)
    assert listener.state_name == "LISTEN" and listener.inode == 16182 and listener.uid == 0
    assert established.remote_address == v4("9.9.9.9") and established.remote_port == 443
    assert established.local_port == 0xD46E and established.uid == 1000
    assert (established.inode, established.state_name) == (771234, "ESTABLISHED")
    assert (time_wait.inode, time_wait.state_name) == (0, "TIME_WAIT")
    assert established.family == 2 and established.protocol == 6 and established.version == 4


@little_endian_only
def test_tcp6_rows_decode_mapped_and_global_addresses() -> None:
    sockets = scan_socket_table(TCP6_TEXT, TCP6)[0]
    wildcard, global6, mapped = sockets
    assert (wildcard.local_address, wildcard.local_port, wildcard.state_name) == (0, 8080, "LISTEN")
    assert global6.local_address == v6("2001:4860:4860::2")
    assert global6.remote_address == v6("2001:4860:4860::8888") and global6.remote_port == 80
    assert mapped.remote_address == v6("::ffff:9.9.9.9") and mapped.state_name == "SYN_SENT"
    assert global6.family == 10 and global6.uid == 33 and global6.inode == 5151


@little_endian_only
def test_udp_rows_have_no_state_name() -> None:
    connected, unconnected = scan_socket_table(UDP_TEXT, UDP4)[0]
    assert connected.protocol == 17 and connected.state_name == ""
    assert connected.remote_address == v4("9.9.9.9") and connected.remote_port == 53
    assert (unconnected.local_port, unconnected.inode) == (68, 55556)


def test_tcp_state_names_are_osquerys() -> None:
    """osquery/filesystem/linux/proc.h ``tcp_states``: CLOSED for TCP_CLOSE, else UNKNOWN."""
    assert [tcp_state_name(n) for n in range(1, 12)] == [
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSED",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ]
    assert tcp_state_name(0) == tcp_state_name(12) == tcp_state_name(255) == "UNKNOWN"


HOSTILE_LINES = [
    "",
    "\x00\x01\x02",
    "garbage",
    "   0: 0100007F:0CEA 00000000:00",  # truncated mid-field
    "   0: 0100007F:0CEA 00000000:0000 0A",  # truncated after the state
    "   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0",
    "   0: ZZ00007F:0CEA 09090909:01BB 01 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "   0: 0100007F:0CEA 0909090Z:01BB 01 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "   0: 0100007F:0CEA 09090909:01BB QQ 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "   0: 0100007F:0CEA 09090909:01BB 01 00000000:00000000 00:00000000 00000000 x 0 99 1",
    "   0: 0100007F:0CEA 09090909:01BB 01 00000000:00000000 00:00000000 00000000 0 0 inode 1",
    "   0: 0100007F 09090909:01BB 01 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "   0: 0100007F:0CEA 09090909-01BB 01 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "   0: 0100007F:0CEA 090909090909:01BB 01 00000000:00000000 00:00000000 00000000 0 0 99 1",
    "sl local_address rem_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode",
    "   0: 0100007F:0CEA 09090909:01BB 01 " + "9" * 5000,
]


@pytest.mark.parametrize("line", HOSTILE_LINES)
def test_garbage_line_is_skipped_not_raised(line: str) -> None:
    for table in SOCKET_TABLES:
        assert parse_line(line, table) is None


def test_garbage_lines_among_good_ones_are_skipped() -> None:
    good = TCP_TEXT.split("\n")
    text = "\n".join([good[0], *HOSTILE_LINES, good[1], *HOSTILE_LINES, good[2]])
    listeners = ListenerIndex()
    sockets, _seen = scan_socket_table(text, TCP4, listeners=listeners)
    assert [s.inode for s in sockets] == [16182, 771234]
    assert len(listeners) == 1


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_any_text_decodes_without_raising(text: str) -> None:
    for table in SOCKET_TABLES:
        scan_socket_table(text, table, lambda _hex, _v: True, ListenerIndex())
        parse_line(text, table)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(TCP6_TEXT.split("\n")[1:3] + HOSTILE_LINES), max_size=20))
def test_mixed_lines_keep_exactly_the_good_ones(lines: list) -> None:  # type: ignore[type-arg]
    good = set(TCP6_TEXT.split("\n")[1:3])
    sockets, _ = scan_socket_table("\n".join(lines), TCP6)
    assert len(sockets) == len(good.intersection(lines))  # a repeated row is kept once


def test_wanted_sees_only_the_remote_hex() -> None:
    asked = []

    def wanted(hex_text: str, version: int) -> bool:
        asked.append((hex_text, version))
        return hex_text == "09090909"

    sockets, seen = scan_socket_table(TCP_TEXT, TCP4, wanted)
    assert seen == 3
    assert [s.inode for s in sockets] == [771234, 0]
    assert asked == [("00000000", 4), ("09090909", 4), ("09090909", 4)]


@little_endian_only
def test_listeners_cover_wildcards_dual_stack_and_mapped() -> None:
    index = ListenerIndex()
    scan_socket_table(TCP6_TEXT, TCP6, listeners=index)  # [::]:8080
    scan_socket_table(TCP_TEXT, TCP4, listeners=index)  # 127.0.0.1:3306
    scan_socket_table(UDP_TEXT, UDP4, listeners=index)  # 0.0.0.0:68 (unconnected)
    assert index.is_inbound(6, 6, v6("2001:4860:4860::2"), 8080)
    assert index.is_inbound(6, 6, v6("::ffff:9.9.9.9"), 8080)  # IPv4 on the :: listener
    assert index.is_inbound(6, 4, v4("9.9.9.9"), 8080)
    assert index.is_inbound(6, 4, v4("127.0.0.1"), 3306)
    assert index.is_inbound(6, 6, v6("::ffff:127.0.0.1"), 3306)
    assert not index.is_inbound(6, 4, v4("127.0.0.2"), 3306)  # another address
    assert not index.is_inbound(6, 4, v4("127.0.0.1"), 3307)  # another port
    assert not index.is_inbound(17, 4, v4("127.0.0.1"), 3306)  # another protocol
    assert index.is_inbound(17, 4, v4("10.1.1.1"), 68)
    assert not index.is_inbound(17, 6, v6("2001:4860::1"), 68)  # 0.0.0.0 is IPv4 only
    assert not index.is_inbound(17, 4, v4("9.9.9.10"), 0xA95B)  # a connected UDP socket


def test_snmp_tcp_counters() -> None:
    text = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens\n"
        "Tcp: 1 200 120000 -1 68 2\n"
        "Udp: InDatagrams\nUdp: 5\n"
    )
    assert parse_snmp(text)["ActiveOpens"] == 68
    assert parse_snmp(text)["MaxConn"] == -1
    assert parse_snmp(text, "Udp") == {"InDatagrams": 5}
    assert parse_snmp("Tcp: ActiveOpens\n") == {}
    assert parse_snmp("Tcp: ActiveOpens\nTcp: lots\n") == {}
    assert parse_snmp("") == {}


def test_namespace_links() -> None:
    assert parse_namespace_link("net:[4026531840]") == 4026531840
    for bad in ("net:[]", "net:[0]", "mnt:[4026531840]", "net:4026531840", "net:[x]", ""):
        with pytest.raises(ValueError):
            parse_namespace_link(bad)


def test_discovery_groups_pids_and_keeps_errors_per_pid(tmp_path: Path) -> None:
    """A /proc laid out on disk: the ns/net links are symlinks whose text is what matters."""
    for pid, link in ((5, "net:[111]"), (7, "net:[111]"), (9, "net:[222]"), (11, "garbage")):
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        os.symlink(link, tmp_path / str(pid) / "ns" / "net")
    (tmp_path / "13").mkdir()  # no ns directory: as if gone or hidden
    (tmp_path / "self").mkdir()
    found = discover_namespaces(str(tmp_path))
    assert [(n.inode, n.pids) for n in found.namespaces] == [(111, [5, 7]), (222, [9])]
    assert set(found.errors) == {11, 13}
    assert found.pids_seen == 5
    only = discover_namespaces(str(tmp_path), pids=[9, 13])
    assert [(n.inode, n.pid) for n in only.namespaces] == [(222, 9)]


def test_this_process_namespace_and_tables() -> None:
    own = namespace_of(os.getpid())
    found = discover_namespaces(pids=[os.getpid()])
    assert [n.inode for n in found.namespaces] == [own]
    assert read_tcp_counters(os.getpid())["ActiveOpens"] >= 0

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
        server.bind(("::1", 0))
        server.listen()
        port = server.getsockname()[1]
        inode = os.fstat(server.fileno()).st_ino
        rows = [s for s in read_sockets(os.getpid(), TCP6) if s.inode == inode]
        assert [(r.local_address, r.local_port, r.state_name) for r in rows] == [
            (1, port, "LISTEN")
        ]
        assert rows[0].uid == os.getuid()
        listeners = ListenerIndex()
        scan_socket_table(read_socket_table(os.getpid(), TCP6), TCP6, None, listeners)
        assert listeners.is_inbound(6, 6, 1, port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.connect(("127.0.0.2", 9))
        inode = os.fstat(udp.fileno()).st_ino
        (row,) = [s for s in read_sockets(os.getpid(), UDP4) if s.inode == inode]
        assert row.remote_address == v4("127.0.0.2") and row.remote_port == 9
        assert row.local_port == udp.getsockname()[1]
    assert UDP6 in SOCKET_TABLES
