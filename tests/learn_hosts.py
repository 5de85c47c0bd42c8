"""Histories recorded by ``egress-agent watch`` from test hosts, for the learn and audit tests.

A test host (tests/dnshost.py's topology, ``$NETHOST_PREFIX`` + ``l``): a server namespace with
a DNS server answering :data:`ZONE` and an "internet" listener on :data:`A`, :data:`B`,
:data:`BARE` and :data:`NEW`; two client namespaces.  Each recording runs a real ``watch`` in a
UTS namespace of its own (``unshare --uts``, its own host name: the history's runs name the
host as a copy collected from that host would), while the clients resolve names through the
DNS server and connect, and stops it once the store holds the rows.  Nothing leaves the test
host; every assertion is about the client namespaces' rows only (the machine has other
connections, recorded too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from dnshost import DnsHost, resolve, wait_for
from nethost import Namespace, NetHost, Proc

from agent.history import HistoryStore, HistoryUnavailable

NETHOST = str(Path(__file__).with_name("nethost.py"))
PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "l"
A, B, BARE, NEW = "151.101.2.132", "151.101.66.132", "151.101.66.140", "45.33.32.1"
ZONE = {"a.mirror.test": {"a": [A], "ttl": 300}, "b.mirror.test": {"a": [B], "ttl": 300}}


@dataclass
class Recording:
    """One host's history, and the moments that matter in it."""

    hostname: str
    path: Path
    started: float
    ended: float
    marks: Dict[str, float] = field(default_factory=dict)


@dataclass
class LearnHost:
    dns: DnsHost
    workdir: Path

    @property
    def net(self) -> NetHost:
        return self.dns.net

    @property
    def clients(self) -> List[Namespace]:
        return self.dns.clients

    @property
    def namespaces(self) -> List[int]:
        return [client.inode for client in self.clients]

    def connect(self, client: int, address: str) -> Proc:
        """A client holding a connection; it resets it when it ends (no TIME_WAIT socket is
        left to show in a later recording without its process)."""
        argv = [sys.executable, NETHOST, "connect", "tcp", address, str(self.dns.web_port)]
        return self.net.spawn(self.clients[client], [*argv, "reset"], ready=True)

    def resolve(self, client: int, name: str) -> List[str]:
        server = f"10.53.{client + 1}.1"
        _, addresses = resolve(self.dns.stubs[client], server, name)
        return addresses


def build(net: NetHost) -> DnsHost:
    srv = net.namespace("srv")
    for address in (A, B, BARE, NEW):
        srv.ip("address", "add", f"{address}/32", "dev", "lo")
    host = DnsHost(net, srv, [], [], [], 0)
    for subnet in (1, 2):
        client, stub = host.add_client(f"cli{subnet}", subnet)
        host.clients.append(client)
        host.stubs.append(stub)
    host.serve(srv, "10.53.1.1", ZONE)
    host.serve(srv, "10.53.2.1", ZONE)
    host.web_port = net.listen(srv, "::", dualstack=True).port
    return host


@contextlib.contextmanager
def learn_host() -> Iterator[LearnHost]:
    """The test host, removed when done."""
    with NetHost(PREFIX) as net, tempfile.TemporaryDirectory(prefix="egress-learn-") as work:
        yield LearnHost(build(net), Path(work))


def _socket_inodes(pid: int) -> List[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.append(target[8:-1])
    return found


def watching(watch_pid: int, stub: Proc) -> bool:
    """Whether the watch holds a packet socket in the namespace of ``stub`` (its DNS watch
    sees that namespace's answers): another agent's sockets there do not count."""
    try:
        with open(f"/proc/{stub.popen.pid}/net/packet", encoding="ascii") as table:
            lines = table.readlines()[1:]
        ours = set(_socket_inodes(watch_pid))
    except OSError:
        return False
    return any(line.split()[-1] in ours for line in lines if line.split())


def rows(path: Path, namespaces: List[int]) -> List[Dict[str, Any]]:
    """The rows of the client namespaces in the history at ``path`` (read from a copy)."""
    if not path.exists():
        return []
    store = HistoryStore(str(path), read_only=True)
    try:
        return [row for row in store.rows() if row["net_namespace"] in namespaces]
    except HistoryUnavailable:
        return []
    finally:
        store.close()


def has_row(
    path: Path, namespaces: List[int], address: str, domain: str = ""
) -> Callable[[], bool]:
    def check() -> bool:
        return any(
            row["remote_address"] == address and row["remote_domain"] == domain
            for row in rows(path, namespaces)
        )

    return check


def record(
    host: LearnHost, hostname: str, script: Callable[[LearnHost, Recording, Path], None]
) -> Recording:
    """A history recorded by ``watch`` as host ``hostname`` while ``script`` runs."""
    history = host.workdir / f"{hostname}.db"
    config = host.workdir / f"{hostname}.yaml"
    # Kernel events record the connections; a sample taken at the moment of a connect can
    # record it without its owner (pid -1), which no rule can allow: samples come every 30 s,
    # so the one at the start is the only one a recording of a few seconds takes.
    config.write_text(f"sampling:\n  interval: 30\nhistory:\n  path: {history}\n")
    errors = (host.workdir / f"{hostname}.err").open("w+")
    argv = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    argv += [sys.executable, "-m", "agent.cli", "watch", "--format", "jsonl"]
    started = time.time()
    watch: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config)),
    )
    recording = Recording(hostname, history, started, started)
    try:
        assert watch is not None
        for stub in host.dns.stubs:
            wait_for(lambda s=stub: watching(watch.pid, s), f"{hostname}'s DNS watch", 60)
        time.sleep(1.1)  # whole seconds of the run before and after what it records: the
        script(host, recording, history)  # store keeps whole seconds, the window is inside
        time.sleep(1.1)
    finally:
        assert watch is not None
        watch.send_signal(signal.SIGTERM)
        try:
            watch.wait(20)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.wait()
        errors.seek(0)
        said = errors.read()
        errors.close()
    assert "Traceback" not in said, said
    store = HistoryStore(str(history), read_only=True)
    try:
        (run,) = store.runs()
    finally:
        store.close()
    recording.started, recording.ended = run["started_at"], run["stopped_at"]  # what it saw
    return recording
