"""Which end opened a TCP connection, read from ``tcp_info``
(:mod:`agent.collect.sockets.opener`): real sockets on loopback, read with ``getsockopt``
(``TCP_INFO`` gives the same struct as ``sock_diag``'s ``INET_DIAG_INFO``), and through a
``sock_diag`` dump as the sampler asks it.

The branches no loopback connection reaches on demand (data in flight, data in the SYN, an
older kernel's shorter struct) are given real records with one field changed, said where.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Iterator, Tuple

import pytest

from agent.collect.sockets.opener import NEEDED, TCPI_OPT_SYN_DATA, connected_here
from agent.collect.sockets.procnet import SOCKET_TABLES
from agent.collect.sockets.sockdiag import DiagSocket, _netlink_socket, only_on_listening_ends

Pair = Tuple[socket.socket, socket.socket, socket.socket]


def _info(sock: socket.socket) -> Tuple[int, bytes]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    return raw[0], raw


def _connected_here(sock: socket.socket) -> object:
    deadline = time.monotonic() + 5
    while True:  # an ACK may still be on its way on a loaded machine
        state, info = _info(sock)
        answer = connected_here(state, info)
        if answer is not None or time.monotonic() > deadline:
            return answer
        time.sleep(0.01)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """(listener, the socket connected from the listener's own port, the one accepted):
    the connect comes from a port a listener holds (``SO_REUSEPORT``), as an attacker's would."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    out = socket.socket()
    out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    out.bind(("127.0.0.1", listener.getsockname()[1]))
    out.connect(server.getsockname())
    accepted, _ = server.accept()
    try:
        yield listener, out, accepted
    finally:
        for sock in (listener, server, out, accepted):
            sock.close()


def test_the_end_that_connected_and_the_end_that_accepted(pair: Pair) -> None:
    _, out, accepted = pair
    assert _connected_here(out) is True
    assert _connected_here(accepted) is False


def test_they_stay_told_apart_after_data_both_ways(pair: Pair) -> None:
    _, out, accepted = pair
    out.sendall(b"x" * 300_000)
    accepted.sendall(b"y" * 7_000)
    for sock, size in ((accepted, 300_000), (out, 7_000)):
        got = 0
        while got < size:
            got += len(sock.recv(65536))
    assert _connected_here(out) is True
    assert _connected_here(accepted) is False


def test_they_stay_told_apart_after_either_closes_its_side(pair: Pair) -> None:
    _, out, accepted = pair
    accepted.shutdown(socket.SHUT_WR)  # its FIN acknowledged: FIN_WAIT2; the other CLOSE_WAIT
    deadline = time.monotonic() + 5
    while _info(accepted)[0] != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _info(accepted)[0] == 5 and _info(out)[0] == 8
    assert _connected_here(accepted) is False
    assert _connected_here(out) is True


def test_what_the_counters_cannot_say_is_none(pair: Pair) -> None:
    _, out, accepted = pair
    state, info = _info(out)
    assert connected_here(state, info[: NEEDED - 1]) is None  # a kernel before 4.19
    assert connected_here(10, info) is None  # not a state the counters answer for
    # a record with one field changed, as the kernel would give it:
    in_flight = info[:24] + struct.pack("=I", 1) + info[28:]  # tcpi_unacked
    assert connected_here(state, in_flight) is None
    syn_data = info[:5] + bytes([info[5] | TCPI_OPT_SYN_DATA]) + info[6:]  # Fast Open
    assert connected_here(state, syn_data) is None
    assert connected_here(_info(accepted)[0], _info(accepted)[1]) is False


def test_the_sampler_dump_tells_only_the_sockets_on_a_listening_end(pair: Pair) -> None:
    """``sock_diag`` with ``INET_DIAG_INFO``, filtered in the kernel to the local ends of the
    listeners (loopback peers are kept: no never-external prefixes given)."""
    listener, _, accepted = pair
    table = next(t for t in SOCKET_TABLES if t.name == "tcp")
    port = listener.getsockname()[1]
    loopback = int.from_bytes(socket.inet_aton("127.0.0.1"), "big")
    program = only_on_listening_ends([(4, loopback, port)], [], 4)
    with DiagSocket(_netlink_socket()) as diag:
        found = diag.openers(table, program)
    outs = [ends for ends in found if ends[2] == port]
    assert outs and all(found[ends] is True for ends in outs)
    assert all(ends[2] == port for ends in found)  # the filter kept nothing else
    assert not [ends for ends in found if ends[2] == accepted.getsockname()[1]]
    with DiagSocket(_netlink_socket()) as diag:
        everything = diag.openers(table, b"")
    mine = {e: v for e, v in everything.items() if e[2] in (port, accepted.getsockname()[1])}
    assert True in mine.values() and False in mine.values()
