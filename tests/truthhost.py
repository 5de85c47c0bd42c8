"""A test host for what real programs do: dnsmasq answering glibc, an "internet" web server,
and a client namespace whose ``/etc/resolv.conf`` (``ip netns exec`` bind-mounts
``/etc/netns/NAME/resolv.conf`` over it) names that dnsmasq.  Used by tests/test_truth_*.py.

Topology (``$NETHOST_PREFIX``-named namespaces; nothing leaves them)::

    cli  185.199.108.2/24,         <-> c0 ... s0 <->  srv 185.199.108.9/24,
         2a01:4f8:c0c::2/64                                   2a01:4f8:c0c::9/64
                                                          dnsmasq on 185.199.108.9:53
                                                          lo: 93.184.215.0/24, 93.184.216.0/26,
                                                          2606:2800:21f::14, ::15 (the web:
                                                          HTTP on port 80)

dnsmasq answers (its own configuration, no upstream, no /etc/hosts):

- ``www.shop.example``: A 93.184.215.14, AAAA 2606:2800:21f::14;
- ``api.shop.example``: a CNAME to ``edge.shop.example``: A 93.184.215.15, AAAA
  2606:2800:21f::15;
- ``files.other.example``: A 93.184.215.16 only;
- ``big.shop.example``: 40 A records (93.184.216.1 to .40, on srv's lo too): more than 512
  bytes, so a UDP answer is truncated and glibc asks again over TCP.

The client addresses are global ones (185.199.108.2 reaches dnsmasq at 185.199.108.9), so
dnsmasq's answers go to an external address: a reply, which must not read as outbound.  They
are not the 9.9.9.x of the other test hosts: a connection whose process is gone is placed by
its address, which must be one namespace's only (tests of other issues may run beside).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import pytest
from commands import egress_agent
from nethost import Namespace, NetHost, Proc

DNS = "185.199.108.9"
CLIENT = "185.199.108.2"
CLIENT6 = "2a01:4f8:c0c::2"
DNS6 = "2a01:4f8:c0c::9"
WEB = "93.184.215.14"
WEB6 = "2606:2800:21f::14"
EDGE, EDGE6 = "93.184.215.15", "2606:2800:21f::15"
FILES = "93.184.215.16"
NAME = "www.shop.example"
ALIAS = "api.shop.example"
CANONICAL = "edge.shop.example"
OTHER = "files.other.example"
BIG = "big.shop.example"
BIG_ANSWERS = [f"93.184.216.{n}" for n in range(1, 41)]
WEB_ADDRESSES = frozenset([WEB, WEB6, EDGE, EDGE6, FILES, *BIG_ANSWERS])
"""Every address of the web: the addresses glibc connects a UDP socket to, to sort them."""

WEB_SERVER = """
import http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = Server(("::", 80), Quiet)
print("READY 80", flush=True)
server.serve_forever()
"""


def program(name: str) -> str:
    """The path of a program the tests run (tools/install-test-programs installs them), or a
    skip naming it."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (make test-programs installs it)")
    return found


@dataclass
class TruthHost:
    net: NetHost
    srv: Namespace
    cli: Namespace
    dnsmasq: Proc
    web: Proc
    etc_netns: str

    def run(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``argv`` under ``ip netns exec`` in the client namespace (its resolv.conf names
        dnsmasq), to completion."""
        return subprocess.run(
            ["ip", "netns", "exec", self.cli.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        """``argv`` under ``ip netns exec`` in the client namespace, not waited for (its
        stdin a pipe: ``communicate(text)`` feeds it)."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.cli.name, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        shutil.rmtree(self.etc_netns, ignore_errors=True)


def dnsmasq_argv(listen: str) -> List[str]:
    argv = [
        program("dnsmasq"),
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        f"--listen-address={listen}",
        "--pid-file=",
        "--user=root",
        "--group=root",
        "--log-facility=-",
        f"--host-record={NAME},{WEB},{WEB6}",
        f"--host-record={CANONICAL},{EDGE},{EDGE6}",
        f"--host-record={OTHER},{FILES}",
        f"--cname={ALIAS},{CANONICAL}",
        "--local-ttl=300",
    ]
    argv += [f"--host-record={BIG},{address}" for address in BIG_ANSWERS]
    return argv


def build(net: NetHost) -> TruthHost:
    program("dnsmasq")
    srv, cli = net.namespace("srv"), net.namespace("cli")
    net.veth(srv, "s0", cli, "c0")
    srv.add_address(net.name("s0"), f"{DNS}/24")
    srv.add_address(net.name("s0"), f"{DNS6}/64")
    cli.add_address(net.name("c0"), f"{CLIENT}/24")
    cli.add_address(net.name("c0"), f"{CLIENT6}/64")
    srv.add_address("lo", "93.184.215.0/24")  # WEB, EDGE, FILES: all local on lo
    srv.add_address("lo", f"{WEB6}/128")
    srv.add_address("lo", f"{EDGE6}/128")
    srv.add_address("lo", "93.184.216.0/26")  # BIG's answers (a /26 on lo: all local)
    cli.ip("route", "add", "default", "via", DNS)
    cli.ip("-6", "route", "add", "default", "via", DNS6)
    etc = f"/etc/netns/{cli.name}"
    os.makedirs(etc, exist_ok=True)
    with open(f"{etc}/resolv.conf", "w", encoding="ascii") as handle:
        handle.write(f"nameserver {DNS}\noptions timeout:2 attempts:2\n")
    dnsmasq = net.spawn(srv, dnsmasq_argv(DNS), ready=False)
    web = net.spawn(srv, [sys.executable, "-c", WEB_SERVER], ready=True)
    host = TruthHost(net, srv, cli, dnsmasq, web, etc)
    deadline = time.monotonic() + 15
    while True:  # dnsmasq answers once it has bound its sockets
        answer = host.run([program("dig"), "+short", "+time=1", "+tries=1", f"@{DNS}", NAME])
        if WEB in answer.stdout:
            break
        if dnsmasq.popen.poll() is not None or time.monotonic() > deadline:
            host.close()
            raise AssertionError(f"dnsmasq did not answer: {answer.stdout} {answer.stderr}")
        time.sleep(0.2)
    return host


def watched_by(host: TruthHost, owner: int) -> bool:
    """Whether process ``owner`` (an agent) holds a packet socket in the client namespace:
    its DNS watch attached there (another agent on the machine may watch it too)."""
    table = host.run(["cat", "/proc/net/packet"]).stdout.splitlines()[1:]
    inodes = {line.split()[8] for line in table if len(line.split()) > 8}
    try:
        held = {os.readlink(f"/proc/{owner}/fd/{fd}") for fd in os.listdir(f"/proc/{owner}/fd")}
    except OSError:
        return False
    return any(f"socket:[{inode}]" in held for inode in inodes)


def truth_host(net: NetHost) -> TruthHost:
    return build(net)


def pid_of_child(parent: int) -> Optional[int]:
    try:
        with open(f"/proc/{parent}/task/{parent}/children", encoding="ascii") as handle:
            words = handle.read().split()
    except OSError:
        return None
    return int(words[0]) if words else None


# -- the agent under test, and fixtures every truth test shares ------------------------------

TRACING = "/sys/kernel/tracing/instances"


@pytest.fixture
def truth(nethost: NetHost) -> Iterator[TruthHost]:
    host = build(nethost)
    try:
        yield host
    finally:
        host.close()


class Watch:
    """``egress-agent watch`` with kernel events, sampling once a minute, into ``history``."""

    def __init__(self, tmp_path: Path, interval: float = 60) -> None:
        self.history = tmp_path / "history.db"
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            f"sampling:\n  interval: {interval}\nhistory:\n  path: {self.history}\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "watch", "--format", "jsonl"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, EGRESS_AGENT_CONFIG=str(self.config)),
        )
        deadline = time.monotonic() + 30
        while not os.path.isdir(f"{TRACING}/egress-agent-{self.process.pid}"):
            assert self.process.poll() is None, self.process.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "watch made no event instance"
            time.sleep(0.1)
        time.sleep(1.5)  # its first sample is taken: the next is far away

    def rows(self, pids: Optional[Set[int]], *limits: str) -> List[Dict[str, Any]]:
        """The history's rows of ``pids`` (all with None), as ``egress-agent history --format
        json`` shows them with ``limits`` (``--netns NAME``...)."""
        shown = egress_agent("history", "--format", "json", *limits, config=self.config)
        assert shown.returncode == 0, shown.stderr
        return [row for row in json.loads(shown.stdout) if pids is None or row["pid"] in pids]

    def wait_rows(
        self, pids: Optional[Set[int]], done: Any, *limits: str, timeout: float = 30
    ) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows = self.rows(pids, *limits)
        while not done(rows) and time.monotonic() < deadline:
            time.sleep(0.5)
            rows = self.rows(pids, *limits)
        return rows

    def losses(self) -> str:
        """What the history says this watch lost (its runs' lost events and its losses), to
        tell a missed connection from a lost one when a test fails."""
        with sqlite3.connect(f"file:{self.history}?mode=ro", uri=True) as db:
            runs = db.execute("SELECT events_lost FROM runs").fetchall()
            losses = db.execute("SELECT * FROM losses").fetchall()
        return f"runs' events lost: {runs}; losses: {losses}"

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return str(stderr)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Watch]:
    running = Watch(tmp_path)
    try:
        yield running
    finally:
        stderr = running.stop()
        assert "Traceback" not in stderr, stderr


def described(rows: List[Dict[str, Any]]) -> str:
    return "; ".join(
        f"{r['pid']} {r['name']} {r['protocol']} {r['direction']} ns={r.get('net_namespace')} "
        f"{r['remote_address']}:{r['remote_port']}"
        for r in rows
    )
