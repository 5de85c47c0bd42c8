"""The load: client processes holding files and sockets, servers in a namespace test host.

Each client process (forked from this Python, so a thousand start in seconds) opens F regular
files, K TCP connections cycling through IPv4, IPv6 and IPv4-mapped (an ``AF_INET6`` socket to
``::ffff:a.b.c.d``, which ``/proc/net/tcp6`` shows as mapped), and one connected UDP socket, then
blocks on a lifeline pipe.  Every ``second_ns_every``-th client lives in the second client
namespace, so its sockets are invisible to tools that read only their own namespace.

The server is one process in the server namespace with a listener per (address, port) and a
listen backlog of 65535; it never accepts, so the server side holds no descriptor per connection
and the per-process fd limit (20,000 here) binds only the clients, which are kept small.

Teardown is by construction: the lifeline's write end lives only in this process, so when it
closes (normally, on an exception, Ctrl-C or SIGKILL of this process) every child reads EOF and
exits; ``PR_SET_PDEATHSIG`` backs that up.  ``Load.stop`` also kills each child by pid (still
unreaped, so the pid cannot have been reused), reaps it, then deletes the namespaces by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bench.topology import SERVER_PORTS, Topology, build, build_extras, teardown

CLONE_NEWNET = 0x40000000  # <sched.h>
PR_SET_NAME = 15  # <linux/prctl.h>
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Scale:
    """How much load: ``clients`` processes, each ``files`` files, ``tcp`` TCP + 1 UDP socket.

    ``external`` says which connections go to global server addresses:
    ``"some"``: one client in ``external_every`` holds them (half its TCP connections and its
    UDP socket, about 5% of all connections), the holders spread evenly over the pids;
    ``"none"``: no connection is external;
    ``"one"``: every client has exactly one external TCP connection.

    ``namespaces`` > 0 adds that many namespaces (``PREFIX-nNNN``), each with every server
    address on its loopback and listeners there, and spreads the clients round robin over
    the host namespace, the second client namespace and those (``second_ns_every`` is then
    unused): a node with a namespace per pod.  A client in one of them reaches the server of
    its own namespace, so both ends of its connections are in that namespace.
    ``storm`` > 0 adds a connection storm: that many TCP connections a second in all, opened
    and closed (the client first: TIME_WAIT stays behind) to an internal address, spread over
    the first ``storm_namespaces`` of the added namespaces; their counters never stand still.
    """

    name: str
    clients: int
    files: int
    tcp: int
    external: str = "some"
    external_every: int = 10
    second_ns_every: int = 4
    namespaces: int = 0
    storm: int = 0
    storm_namespaces: int = 10

    @property
    def sockets(self) -> int:
        return self.clients * (self.tcp + 1)


SCALES: Dict[str, Scale] = {
    s.name: s
    for s in (
        Scale("tiny", clients=8, files=3, tcp=3, external_every=4),
        Scale("S", clients=100, files=20, tcp=9),
        Scale("M", clients=300, files=20, tcp=32),
        Scale("L", clients=1000, files=20, tcp=49),
        Scale("M-none", clients=300, files=20, tcp=32, external="none"),
        Scale("M-all", clients=300, files=20, tcp=32, external="one"),
        Scale("N100", clients=200, files=20, tcp=24, namespaces=97),
        Scale("N100-storm", clients=200, files=20, tcp=24, namespaces=97, storm=200),
        Scale(
            "tiny-ns",
            clients=8,
            files=3,
            tcp=3,
            external_every=4,
            namespaces=3,
            storm=20,
            storm_namespaces=2,
        ),
    )
}

Endpoint = Tuple[int, str, int]  # (socket family, address as connect() takes it, port)


@dataclass(frozen=True)
class ClientPlan:
    """What one client opens: its namespace, TCP peers and UDP peer, and which are external."""

    index: int
    in_second_ns: bool
    tcp: Tuple[Endpoint, ...]
    udp: Endpoint
    external_tcp: int
    external_udp: bool
    extra: int = -1
    """The index of the added namespace it lives in (``Scale.namespaces``), or -1."""


def _endpoint(topology: Topology, kind: str, external: bool, n: int) -> Endpoint:
    v4 = topology.external_v4 if external else topology.internal_v4
    v6 = topology.external_v6 if external else topology.internal_v6
    port = SERVER_PORTS[n % len(SERVER_PORTS)]
    if kind == "v4":
        return (socket.AF_INET, v4[n % len(v4)], port)
    if kind == "v6":
        return (socket.AF_INET6, v6[n % len(v6)], port)
    return (socket.AF_INET6, "::ffff:" + v4[n % len(v4)], port)


KINDS = ("v4", "v6", "mapped")


def plan_client(scale: Scale, index: int, topology: Topology) -> ClientPlan:
    """The deterministic plan of client ``index`` (families cycle, peers round-robin)."""
    holder = scale.external == "some" and index % scale.external_every == scale.external_every // 2
    tcp = []
    external_tcp = 0
    for j in range(scale.tcp):
        external = (holder and j % 2 == 0) or (scale.external == "one" and j == 0)
        external_tcp += external
        tcp.append(_endpoint(topology, KINDS[(index + j) % 3], external, index + j))
    in_second_ns = index % scale.second_ns_every == scale.second_ns_every - 1
    extra = -1
    if scale.namespaces:
        slot = index % (scale.namespaces + 2)  # the host, the second namespace, the added ones
        in_second_ns, extra = slot == 1, slot - 2
    return ClientPlan(
        index=index,
        in_second_ns=in_second_ns,
        extra=extra,
        tcp=tuple(tcp),
        udp=_endpoint(topology, KINDS[index % 3], holder, index),
        external_tcp=external_tcp,
        external_udp=holder,
    )


@dataclass
class Census:
    """What the load amounts to, counted after it is up (for the results header)."""

    load_processes: int = 0
    load_fds: int = 0
    sockets_by_namespace: Dict[str, int] = field(default_factory=dict)
    external_connections: int = 0
    host_processes: int = 0
    host_fds: int = 0


class LoadError(RuntimeError):
    """The load could not be built (the message says which process failed and why)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _prctl_child(name: str) -> None:
    libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@dataclass
class _ChildFds:
    """The descriptors a child inherits: the lifeline, the ready pipe, the namespaces."""

    lifeline_r: int
    lifeline_w: int
    ready_r: int
    ready_w: int
    server_ns: int
    client_ns: int

    @classmethod
    def open(cls, topology: Topology) -> _ChildFds:
        lifeline_r, lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        return cls(
            lifeline_r,
            lifeline_w,
            ready_r,
            ready_w,
            os.open(topology.netns_path(topology.server_ns), os.O_RDONLY),
            os.open(topology.netns_path(topology.client_ns), os.O_RDONLY),
        )

    def close_child_ends(self) -> None:
        """Once every child is forked: keep only the lifeline's write end and ready's read end."""
        for name in ("lifeline_r", "ready_w", "server_ns", "client_ns"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class Load:
    """The load for one scale; use as a context manager (``with Load(SCALES["M"]) as load:``)."""

    def __init__(
        self,
        scale: Scale,
        topology: Optional[Topology] = None,
        log: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.scale = scale
        self.topology = topology or Topology()
        self.log = log
        self.server_pid: Optional[int] = None
        self.client_pids: List[int] = []
        self.storm_pids: List[int] = []
        self.extras: List[str] = []
        self.plans = [plan_client(scale, i, self.topology) for i in range(scale.clients)]
        self._lifeline_w = -1
        self._files_dir = ""
        self.setup_seconds = 0.0

    @property
    def pids(self) -> List[int]:
        return ([self.server_pid] if self.server_pid else []) + self.client_pids + self.storm_pids

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- building ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        try:
            build(self.topology)
            if self.scale.namespaces:
                self.extras = build_extras(self.topology, self.scale.namespaces)
            self._files_dir = tempfile.mkdtemp(prefix=f"{self.topology.prefix}-bench-files-")
            for i in range(self.scale.files):
                with open(os.path.join(self._files_dir, f"file{i:03d}"), "w") as f:
                    f.write("x")
            gc.collect()
            if hasattr(gc, "freeze"):
                gc.freeze()  # fewer copy-on-write faults in the children
            self._spawn_all()
        except BaseException:
            self.stop()
            raise
        self.setup_seconds = time.monotonic() - started
        self.log(
            f"load {self.scale.name}: {len(self.pids)} processes up in {self.setup_seconds:.1f} s"
        )

    def _spawn_all(self) -> None:
        fds = _ChildFds.open(self.topology)
        self._lifeline_w = fds.lifeline_w
        try:
            name = self.topology.prefix
            self.server_pid = self._fork(self._server_main, f"{name}-server", fds, fds.server_ns)
            # The server listens before any client connects.
            _wait_ready(fds.ready_r, 1)
            for plan in self.plans:
                netns_fd = fds.client_ns if plan.in_second_ns else -1
                body = functools.partial(self._client_main, plan)
                self.client_pids.append(self._fork(body, f"{name}-client", fds, netns_fd))
            rate = self.scale.storm / max(1, self.scale.storm_namespaces)
            for extra in self.extras[: self.scale.storm_namespaces] if self.scale.storm else []:
                storm = Storm(extra, (self.topology.internal_v4[0], STORM_PORT), rate)
                self.storm_pids.append(self._fork(storm.start, f"{name}-storm", fds, -1, storm.run))
            fds.close_child_ends()
            _wait_ready(fds.ready_r, len(self.client_pids) + len(self.storm_pids))
        finally:
            fds.close_child_ends()
            os.close(fds.ready_r)

    def _fork(
        self,
        body: Callable[[], List[object]],
        name: str,
        fds: _ChildFds,
        netns_fd: int,
        loop: Optional[Callable[[int], None]] = None,
    ) -> int:
        """Fork a child that runs ``body`` (in ``netns_fd`` if >= 0), reports, then waits (or
        runs ``loop`` with the lifeline's read end, which returns when the lifeline closes)."""
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        # The child: never returns into the caller's stack.
        status = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent tears down on Ctrl-C
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _prctl_child(name)
            if os.getppid() != parent:
                os._exit(0)
            _close_all_but((0, 1, 2, fds.lifeline_r, fds.ready_w, netns_fd))
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            if netns_fd >= 0:
                _setns(netns_fd)
                os.close(netns_fd)
            held = body()
            os.write(fds.ready_w, b"ok\n")
            os.close(fds.ready_w)
            if loop is not None:
                loop(fds.lifeline_r)
            while os.read(fds.lifeline_r, 1):
                pass
            del held
        except BaseException as exc:
            status = 1
            with contextlib.suppress(OSError):
                message = f"err {name} {os.getpid()}: {exc!r}"[:400]
                os.write(fds.ready_w, message.encode() + b"\n")
        finally:
            os._exit(status)

    def _server_main(self) -> List[object]:
        """Listeners in the server namespace, then in each added namespace (entered with
        setns and left again: a socket stays in the namespace it was made in)."""
        listeners = self._listeners()
        if self.extras:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            for extra in self.extras:
                _enter(extra)
                listeners += self._listeners(("0.0.0.0", "::"))  # noqa: S104 (its own netns)
            _setns(home)
            os.close(home)
        return listeners

    def _listeners(self, addresses: Sequence[str] = ()) -> List[object]:
        """A listener per port on each of ``addresses`` (default: every server address; the
        wildcards for an added namespace, whose loopback holds them all)."""
        listeners: List[object] = []
        for address in addresses or self.topology.server_addresses():
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            for port in SERVER_PORTS:
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((address, port))
                s.listen(65535)
                listeners.append(s)
        return listeners

    def _client_main(self, plan: ClientPlan) -> List[object]:
        if plan.extra >= 0:
            _enter(self.extras[plan.extra])
        held: List[object] = [
            open(os.path.join(self._files_dir, f"file{i:03d}"), "rb")  # noqa: SIM115 (held)
            for i in range(self.scale.files)
        ]
        for family, address, port in plan.tcp:
            s = socket.socket(family, socket.SOCK_STREAM)
            # Linger 0: when the client dies its connections are reset and gone at once,
            # instead of lingering ownerless in FIN_WAIT for a minute where later samples
            # (and tests that expect a quiet host) would still count them.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.settimeout(10)
            s.connect((address, port))
            held.append(s)
        family, address, port = plan.udp
        u = socket.socket(family, socket.SOCK_DGRAM)
        u.connect((address, 53))  # connect() on UDP only records the peer: nothing is sent
        held.append(u)
        return held

    # -- tearing down -----------------------------------------------------------------------

    def stop(self) -> None:
        """Kill and reap every child by pid, delete the namespaces and temp files; idempotent."""
        if self._lifeline_w >= 0:
            os.close(self._lifeline_w)
            self._lifeline_w = -1
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.server_pid = None
        self.client_pids = []
        self.storm_pids = []
        self.extras = []
        teardown(self.topology)
        if self._files_dir:
            shutil.rmtree(self._files_dir, ignore_errors=True)
            self._files_dir = ""
        if hasattr(gc, "unfreeze"):
            gc.unfreeze()

    # -- counting ---------------------------------------------------------------------------

    def expected_sockets(self) -> Dict[str, int]:
        """Client sockets per namespace ("host", the client namespace) as planned."""
        counts = {"host": 0, self.topology.client_ns: 0}
        for plan in self.plans:
            counts[self.topology.client_ns if plan.in_second_ns else "host"] += len(plan.tcp) + 1
        return counts

    def expected_external(self) -> int:
        return sum(p.external_tcp + p.external_udp for p in self.plans)

    def census(self) -> Census:
        census = Census(
            load_processes=len(self.pids), external_connections=self.expected_external()
        )
        for pid in self.pids:
            census.load_fds += len(os.listdir(f"/proc/{pid}/fd"))
        census.sockets_by_namespace["host"] = count_sockets("")
        for ns in self.topology.namespaces:
            census.sockets_by_namespace[ns] = count_sockets(ns)
        if self.extras:
            label = f"{len(self.extras)} more namespaces"
            census.sockets_by_namespace[label] = sum(count_sockets(ns) for ns in self.extras)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    census.host_fds += len(os.listdir(f"/proc/{entry}/fd"))
                    census.host_processes += 1
                except OSError:
                    pass
        return census


STORM_PORT = 9000


class Storm:
    """A connection storm in one namespace: a listener, and a loop that connects to it,
    accepts, closes the client's end then the server's, ``rate`` times a second."""

    def __init__(self, namespace: str, endpoint: Tuple[str, int], rate: float) -> None:
        self.namespace, self.endpoint, self.rate = namespace, endpoint, rate
        self._listener: Optional[socket.socket] = None

    def start(self) -> List[object]:
        _enter(self.namespace)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.endpoint)
        listener.listen(1024)
        self._listener = listener
        return [listener]

    def run(self, lifeline: int) -> None:
        """Storm until the lifeline closes."""
        assert self._listener is not None
        every = 1.0 / max(self.rate, 0.001)
        next_at = time.monotonic()
        while True:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                client.connect(self.endpoint)
                accepted, _ = self._listener.accept()
                client.close()
                accepted.close()
            except OSError:
                client.close()
            next_at += every
            wait = next_at - time.monotonic()
            if wait < -1.0:  # fell behind (a busy machine): do not burst to catch up
                next_at, wait = time.monotonic(), 0.0
            readable, _, _ = select.select([lifeline], [], [], max(0.0, wait))
            if readable and not os.read(lifeline, 1):
                return


def _enter(namespace: str) -> None:
    fd = os.open(Topology.netns_path(namespace), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def count_sockets(netns: str) -> int:
    """Rows of ``ss -tunaH`` in a namespace ("" for this one)."""
    argv = ["ss", "-tunaH"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def _close_all_but(keep: Tuple[int, ...]) -> None:
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _wait_ready(ready_r: int, expected: int) -> None:
    """Read one line per child: ``ok``, or ``err ...`` which fails the build."""
    deadline = time.monotonic() + 60 + 0.2 * expected
    buffered = b""
    ok = 0
    while ok < expected:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LoadError(f"load: only {ok} of {expected} processes ready after the deadline")
        readable, _, _ = select.select([ready_r], [], [], left)
        if not readable:
            continue
        chunk = os.read(ready_r, 65536)
        if not chunk:
            raise LoadError(f"load: processes exited before ready ({ok} of {expected} ready)")
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if line.startswith(b"err"):
                raise LoadError(f"load: {line.decode(errors='replace')}")
            ok += 1
