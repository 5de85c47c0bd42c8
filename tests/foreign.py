"""Foreign external connections, held on the host for the whole test run.

A developer's laptop or a busy server has external connections of its own: established ones,
TIME_WAIT sockets of connections just closed, in the root namespace and in containers.  Every
test must pass beside them, so the suite makes them itself (``tests/conftest.py`` starts this
for a run as root): a test host ``PREFIXf-srv`` (``$NETHOST_PREFIX``, default ``eat``) with a
server on "global" addresses, reached from the root namespace over a veth pair and from a
second test host ``PREFIXf-cli``.  In each of the two client namespaces a churner holds two
connections (IPv6, and IPv4 from an AF_INET6 socket) and opens and closes one every few
seconds, closing first, so TIME_WAIT sockets are always present; the server's side shows
accepted (inbound) external connections in ``PREFIXf-srv``.

The addresses exist only on these veth pairs: in the root namespace they are the two ends of
one /126 and one /30, so no packet leaves the machine.

As a script: ``python foreign.py serve ADDRESS`` (the server: echoes nothing, closes when its
peer does) or ``python foreign.py churn ADDRESS... PORT`` (a client).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
import zlib
from typing import List, Optional, Sequence

from nethost import NetHost

RUN = os.environ.get("NETHOST_PREFIX", "eat")
PREFIX = f"{RUN[:5]}f"
"""Names of this run's own (``$NETHOST_PREFIX`` + ``f``): two test runs on one machine, each
with its foreign connections, stay apart, addresses included (below)."""
_NET = 16 + zlib.crc32(RUN.encode()) % 200
SERVER6, ROOT6 = f"2001:4860:4869:{_NET:x}::1", f"2001:4860:4869:{_NET:x}::2"
CLIENT6, CLIENT_GW6 = f"2001:4860:4869:{_NET:x}:1::2", f"2001:4860:4869:{_NET:x}:1::1"
SERVER4, ROOT4 = f"9.9.{_NET}.1", f"9.9.{_NET}.2"
CHURN_EVERY_S = 3.0


class ForeignConnections:
    """The test hosts and processes above; :meth:`close` removes them by name and pid."""

    def __init__(self) -> None:
        self.net = NetHost(PREFIX)
        try:
            self._build()
        except BaseException:
            self.net.close()
            raise

    def _build(self) -> None:
        net = self.net
        srv, cli = net.namespace("srv"), net.namespace("cli")
        net.veth(None, "r0", srv, "s0")
        net.veth(cli, "c0", srv, "s1")
        root_device = net.name("r0")
        for address in (f"{ROOT6}/126", f"{ROOT4}/30"):
            extra = ["nodad"] if ":" in address else []
            subprocess.run(
                ["ip", "address", "add", address, "dev", root_device, *extra],
                check=True,
                capture_output=True,
            )
        srv.add_address(net.name("s0"), f"{SERVER6}/126")
        srv.add_address(net.name("s0"), f"{SERVER4}/30")
        srv.add_address(net.name("s1"), f"{CLIENT_GW6}/80")
        cli.add_address(net.name("c0"), f"{CLIENT6}/80")
        cli.ip("-6", "route", "add", f"{SERVER6}/128", "via", CLIENT_GW6)
        script = os.path.abspath(__file__)
        server = net.spawn(srv, [sys.executable, script, "serve", "::"], ready=True)
        port = server.ready[0]
        self.server_pid = server.pid
        root = net.spawn(
            None, [sys.executable, script, "churn", SERVER6, "::ffff:" + SERVER4, port], ready=True
        )
        client = net.spawn(cli, [sys.executable, script, "churn", SERVER6, SERVER6, port], True)
        self.pids = {server.pid, root.pid, client.pid}

    def close(self) -> None:
        self.net.close()


def _serve(address: str) -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((address, 0))
    listener.listen(128)
    print("READY", listener.getsockname()[1], flush=True)
    peers: List[socket.socket] = []
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *peers], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
            return
        for sock in readable:
            if sock is listener:
                peers.append(listener.accept()[0])
            elif sock in peers and not sock.recv(4096):
                peers.remove(sock)
                sock.close()  # after the peer: the peer's side goes to TIME_WAIT


def _dial(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.connect((address, port))
    return sock


def _churn(addresses: Sequence[str], port: int) -> None:
    held = [_dial(address, port) for address in addresses]
    print("READY", *(s.getsockname()[1] for s in held), flush=True)
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], CHURN_EVERY_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return
        brief: Optional[socket.socket] = None
        try:
            brief = _dial(addresses[0], port)
            time.sleep(0.05)
        except OSError:
            pass
        finally:
            if brief is not None:
                brief.close()  # first: this side ends in TIME_WAIT


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve"]:
        _serve(argv[1])
        return 0
    if argv[:1] == ["churn"]:
        _churn(argv[1:-1], int(argv[-1]))
        return 0
    print("usage: foreign.py serve ADDRESS | churn ADDRESS... PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
