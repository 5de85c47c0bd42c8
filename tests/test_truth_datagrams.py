"""The datagram rules of the tracker, one event sequence at a time (issue 24): a route lookup
made by ``connect()`` is no flow until the process sends; a send's own lookup is; a socket that
received before it sent is answering (inbound); SCTP's connect sends its INIT; where the
kernel has no send or receive events (before 6.3) the rules said in docs/EVENTS.md hold.
The real programs behind these sequences are in tests/test_truth_udp.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pytest
from test_tracker import MS, SECOND, FakeProc, feed, make_tracker, route, tcp

from agent.collect.kernel.placement import NamespacePlacer
from agent.collect.kernel.records import ConnectCall, SocketTransfer
from agent.collect.kernel.tracker import SocketEvent, Tracker
from agent.collect.netns import Interfaces

SK, OTHER_SK = 0xFFFF0001, 0xFFFF0002


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


@pytest.fixture
def tracker(proc: FakeProc) -> Tracker:
    proc.process(100, "client", "/usr/bin/client")
    made = make_tracker(proc)
    made.datagrams.sends_known = made.datagrams.receives_known = True
    return made


def sent(time: int, sk: int = SK, protocol: int = 17, pid: int = 100) -> SocketTransfer:
    return SocketTransfer(time, pid, 0, sk, 2, protocol, 40, True)


def received(time: int, sk: int = SK, pid: int = 100) -> SocketTransfer:
    return SocketTransfer(time, pid, 0, sk, 2, 17, 40, False)


def connecting(time: int, *lookups: object, pid: int = 100) -> List[object]:
    """``connect()`` by ``pid`` around ``lookups``."""
    return [ConnectCall(time, pid, True), *lookups, ConnectCall(time + MS // 2, pid, False)]


def flows(out: List[SocketEvent]) -> List[Tuple[int, int, str]]:
    return [(event.protocol, event.remote_port, event.direction) for event in out]


def test_a_connect_that_sends_nothing_is_no_flow(tracker: Tracker) -> None:
    probes = [
        *connecting(SECOND, route(SECOND, 100, 80)),
        *connecting(SECOND + MS, route(SECOND + MS, 100, 1025)),
    ]
    assert feed(tracker, *probes) == []  # type: ignore[arg-type]
    assert tracker.datagrams.connect_lookups == 2


def test_a_connected_socket_that_sends_is_a_flow_once(tracker: Tracker) -> None:
    events = [
        *connecting(SECOND, route(SECOND, 100, 53)),
        sent(SECOND + 2 * MS),
        sent(SECOND + 3 * MS),  # the AAAA query of the same sendmmsg
        sent(SECOND + 5 * MS),  # a retry: its socket took its lookup already
        *connecting(SECOND + 10 * MS, route(SECOND + 10 * MS, 100, 80)),  # RFC 6724 probes
        *connecting(SECOND + 11 * MS, route(SECOND + 11 * MS, 100, 80, protocol=17)),
    ]
    assert flows(feed(tracker, *events)) == [(17, 53, "outbound")]  # type: ignore[arg-type]


def test_an_unconnected_send_is_a_flow_and_a_failed_one_is_not(tracker: Tracker) -> None:
    assert feed(tracker, route(SECOND, 100, 443)) == []  # the send failed: no length
    out = feed(tracker, route(2 * SECOND, 100, 123), sent(2 * SECOND + 1, OTHER_SK))
    assert flows(out) == [(17, 123, "outbound")]


def test_a_socket_that_received_first_answers(tracker: Tracker) -> None:
    out = feed(
        tracker,
        received(SECOND),
        route(SECOND + MS, 100, 41000, sport=53),
        sent(SECOND + MS + 1),
        received(2 * SECOND),
        route(2 * SECOND + MS, 100, 41001, sport=53),
        sent(2 * SECOND + MS + 1),
    )
    assert flows(out) == [(17, 41000, "inbound"), (17, 41001, "inbound")]


def test_a_client_polling_from_a_bound_port_stays_outbound(tracker: Tracker) -> None:
    out = feed(tracker, route(SECOND, 100, 123, sport=123), sent(SECOND + 1))
    later = 100 * SECOND  # past the flow's quiet time, after the server's answer came in
    out += feed(tracker, received(SECOND + MS), route(later, 100, 123, sport=123), sent(later + 1))
    assert flows(out) == [(17, 123, "outbound"), (17, 123, "outbound")]


def test_a_reused_socket_address_is_a_new_socket(tracker: Tracker) -> None:
    """The kernel address of a closed client socket comes back for another one: its answer
    received before is not this socket's peer writing first."""
    out = feed(
        tracker,
        route(SECOND, 100, 53, sport=40000),
        sent(SECOND + 1),
        received(SECOND + MS),
        route(2 * SECOND, 100, 53, sport=40001),
        sent(2 * SECOND + 1),
    )
    assert flows(out) == [(17, 53, "outbound"), (17, 53, "outbound")]


def test_icmp_and_raw_and_sctp(tracker: Tracker) -> None:
    out = feed(
        tracker,
        *connecting(SECOND, route(SECOND, 100, 1025)),  # ping's probe socket
        route(SECOND + MS, 100, 0, sport=0, protocol=1),
        sent(SECOND + MS + 1, OTHER_SK, protocol=1),  # its echo request
        route(SECOND + 2 * MS, 100, 0, sport=0, protocol=47),
        sent(SECOND + 2 * MS + 1, 0xFFFF0003, protocol=255),  # GRE from a raw socket
        *connecting(SECOND + 3 * MS, route(SECOND + 3 * MS, 100, 0, sport=0, protocol=132)),
    )
    assert flows(out) == [(1, 0, "outbound"), (255, 0, "outbound"), (132, 0, "outbound")]


def test_without_send_events_a_connect_is_no_flow_and_ports_tell_a_reply(proc: FakeProc) -> None:
    proc.process(100, "client", "/usr/bin/client")
    old = make_tracker(proc)  # a kernel before 6.3: no sock_send_length, no sock_recv_length
    out = feed(
        old,
        *connecting(SECOND, route(SECOND, 100, 80)),  # type: ignore[arg-type]
        route(SECOND + MS, 100, 53, sport=41000),
        route(SECOND + 2 * MS, 100, 41000, sport=53),
        route(SECOND + 3 * MS, 100, 123, sport=123),
    )
    assert flows(out) == [(17, 53, "outbound"), (17, 41000, "inbound"), (17, 123, "outbound")]


def test_a_connect_whose_lookup_was_dropped_in_the_kernel_takes_its_own_send(
    tracker: Tracker,
) -> None:
    """A DNS query to an internal server: its connect's lookup is dropped by the kernel filter
    (agent/collect/kernel/kfilter.py), so only the connect itself is seen; its send must not
    take an older lookup (an RFC 6724 probe of an earlier resolution) for its own."""
    out = feed(
        tracker,
        *connecting(SECOND, route(SECOND, 100, 80)),  # type: ignore[arg-type]
        *connecting(2 * SECOND),  # to 10.0.0.53: no lookup reached us
        sent(2 * SECOND + MS),
    )
    assert out == []


def test_a_tcp_connect_between_a_udp_connect_and_its_send(tracker: Tracker) -> None:
    out = feed(
        tracker,
        *connecting(SECOND, route(SECOND, 100, 443)),  # type: ignore[arg-type]
        ConnectCall(SECOND + MS, 100, True),
        tcp(SECOND + MS, 100, 0xFFFF0009, 7, 2),  # CLOSE -> SYN_SENT: a TCP connect
        ConnectCall(SECOND + MS, 100, False),
        sent(SECOND + 2 * MS),
    )
    assert flows([event for event in out if event.protocol == 17]) == [(17, 443, "outbound")]


# ---------------------------------------------------------------------------------------------
# placing a connection whose process was gone after its setns (agent/collect/kernel/placement.py)


def test_a_connection_is_placed_where_exactly_one_namespace_has_its_address(
    tmp_path: Path,
) -> None:
    """Namespace files are stood in for by files of their own (an inode each); their
    interfaces by what ``read`` returns; time by a clock the reads advance."""
    files = {}
    for name in ("a", "b"):
        path = tmp_path / name
        path.write_text("")
        files[path.stat().st_ino] = str(path)
    (a, path_a), (b, path_b) = sorted(files.items())
    now = [0.0]
    interfaces = {
        path_a: Interfaces({(4, 0xC6120001), (4, 0xC6120002)}, {"lo", "eth0", "htr-a0"}),
        path_b: Interfaces({(4, 0xC6120002), (4, 0x7F000001)}, {"lo", "eth0"}),
    }

    def read(path: str) -> Interfaces:
        now[0] += 0.5  # each namespace read takes half a second
        return interfaces[path]

    placer = NamespacePlacer(
        str(tmp_path / "proc"), read=read, named=lambda: files, clock=lambda: now[0]
    )
    (tmp_path / "proc").mkdir()
    assert placer.place(4, bytes([198, 18, 0, 1])) == a
    assert placer.place(4, bytes([198, 18, 0, 2])) is None  # both have it: never a guess
    assert placer.place(4, bytes(4), "htr-a0") == a  # an unconnected send: its route's device
    assert placer.place(4, bytes(4), "eth0") is None
    assert placer.place(4, bytes([127, 0, 0, 1])) is None  # loopback is everywhere
    assert placer.place(6, (0xFFFF_C612_0001).to_bytes(16, "big")) == a  # IPv4-mapped
    refreshes = placer.refreshes
    interfaces[path_b] = Interfaces({(4, 0xC6120009)}, {"lo"})
    assert placer.place(4, bytes([198, 18, 0, 9])) is None  # the last look cost 1 s: quiet 9 s
    assert placer.refreshes == refreshes
    now[0] += 10
    assert placer.place(4, bytes([198, 18, 0, 9])) == b  # an address no namespace had: look
