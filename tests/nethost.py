"""Small test hosts built from network namespaces: namespaces, veth pairs, any addresses, and
listener/client processes running inside them.  Needs root and ``ip`` (iproute2).

Traffic never leaves the machine: a namespace made here has only its loopback and the veth
pairs made here, so even "internet" addresses (2001:4860::/32, 9.9.9.9) only reach the other
end of a veth.  Names carry a prefix (``eas-srv``, ``eas-v0``), so that parallel runs with
different prefixes do not collide; everything is removed by name, processes by pid.

Usage::

    from nethost import NetHost

    with NetHost("eas") as net:                         # removes leftovers named eas-* first
        srv = net.namespace("srv")                       # ip netns add eas-srv, lo up
        cli = net.namespace("cli")
        net.veth(srv, "s0", cli, "c0")                   # eas-s0 in srv <-> eas-c0 in cli, up
        srv.add_address("eas-s0", "2001:4860:4860::8888/64")
        cli.add_address("eas-c0", "2001:4860:4860::2/64")
        server = net.listen(srv, "2001:4860:4860::8888")         # TCP, kernel-chosen port
        client = net.connect(cli, "2001:4860:4860::8888", server.port)
        client.pid, client.local_address, client.local_port, srv.inode
        net.kill(client)
    # every process killed, every namespace and veth deleted

``listen(..., proto="udp")``, ``dualstack=True`` (a ``::`` listener that takes IPv4 too),
``connect(..., family=6)`` to dial ``::ffff:a.b.c.d`` from an AF_INET6 socket,
``connect(..., close=True)`` to connect and close at once (the client side is left orphaned,
without an owner), ``spawn(ns, argv)`` for any other program.  ``ns=None`` means the root
namespace (keep to loopback there).  The listener and client processes are this file run as a
script; they print one ``READY`` line and hold their sockets until their stdin closes, so they
also end when the test process dies.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from lines import Lines

IFNAMSIZ = 15
READY_TIMEOUT = 15.0


class NetHostError(RuntimeError):
    """A command that builds the test host failed; the message says which and why."""


def _run(argv: Sequence[str]) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetHostError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def namespace_inode(name: str) -> int:
    """The inode of a named network namespace (the same number /proc/PID/ns/net shows)."""
    return os.stat(f"/run/netns/{name}").st_ino


@dataclass
class Namespace:
    """A named network namespace (``ip netns``)."""

    name: str

    @property
    def inode(self) -> int:
        return namespace_inode(self.name)

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME ARGS...``; raises NetHostError with ip's message on failure."""
        return _run(["ip", "-n", self.name, *args])

    def add_address(self, device: str, cidr: str) -> None:
        """Assign an address; IPv6 ones skip duplicate address detection (usable at once)."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip("address", "add", cidr, "dev", device, *extra)

    def link_local(self, device: str) -> str:
        """The fe80:: address of ``device`` (dial it as ``ADDRESS%your-device``, RFC 4007)."""
        listing = self.ip("-6", "-o", "address", "show", "dev", device, "scope", "link")
        for line in listing.split("\n"):
            words = line.split()
            if "inet6" in words:
                return words[words.index("inet6") + 1].split("/")[0]
        raise NetHostError(f"{self.name}: {device} has no link-local address")

    def run(self, argv: Sequence[str]) -> str:
        """Run a command inside the namespace to completion; its stdout."""
        return _run(["ip", "netns", "exec", self.name, *argv])


@dataclass
class Proc:
    """A process started by :class:`NetHost` and what it reported when ready."""

    popen: subprocess.Popen[str]
    namespace: Optional[Namespace]
    argv: List[str]
    ready: List[str] = field(default_factory=list)
    """The words after ``READY`` (listener: port; client: local address and port)."""
    _output: Optional[Lines] = field(default=None, repr=False)

    def line(self, timeout: float) -> Optional[str]:
        """The next line it printed, or None after ``timeout`` seconds or at its end (read
        only this way: see tests/lines.py)."""
        if self._output is None:
            self._output = Lines(self.popen.stdout)
        return self._output.next(timeout)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        """A listener's port."""
        return int(self.ready[0])

    @property
    def local_address(self) -> str:
        """A client's local address, as the socket reports it."""
        return self.ready[0]

    @property
    def local_port(self) -> int:
        """A client's local port."""
        return int(self.ready[1])


class NetHost:
    """A set of namespaces, veth pairs and processes, removed together by :meth:`close`."""

    def __init__(self, prefix: str) -> None:
        if not prefix or len(prefix) > 6 or not prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix {prefix!r}: 1 to 6 letters or digits")
        self.prefix = prefix
        self.namespaces: List[Namespace] = []
        self.links: List[str] = []
        self.procs: List[Proc] = []
        remove_leftovers(prefix)

    def __enter__(self) -> NetHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, short: str) -> str:
        """The full name (``PREFIX-short``) of a namespace or interface; at most 15 chars."""
        full = f"{self.prefix}-{short}"
        if len(full) > IFNAMSIZ:
            raise ValueError(f"{full!r} is longer than {IFNAMSIZ} characters")
        return full

    def namespace(self, short: str) -> Namespace:
        """Create ``PREFIX-short`` with its loopback up and IPv6 DAD off."""
        namespace = Namespace(self.name(short))
        _run(["ip", "netns", "add", namespace.name])
        self.namespaces.append(namespace)
        for conf in ("all", "default"):
            namespace.run(["sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0"])
        namespace.ip("link", "set", "lo", "up")
        return namespace

    def veth(
        self, a: Optional[Namespace], a_name: str, b: Optional[Namespace], b_name: str
    ) -> None:
        """A veth pair ``PREFIX-a_name`` in ``a`` <-> ``PREFIX-b_name`` in ``b`` (None: the
        root namespace), both up."""
        a_full, b_full = self.name(a_name), self.name(b_name)
        argv = ["ip", "link", "add", a_full]
        if a is not None:
            argv += ["netns", a.name]
        argv += ["type", "veth", "peer", "name", b_full]
        if b is not None:
            argv += ["netns", b.name]
        _run(argv)
        self.links.append(a_full)
        for namespace, device in ((a, a_full), (b, b_full)):
            if namespace is None:
                _run(["ip", "link", "set", device, "up"])
            else:
                namespace.ip("link", "set", device, "up")
        for namespace, device in ((a, a_full), (b, b_full)):
            _wait_link_local(namespace, device)

    def spawn(self, namespace: Optional[Namespace], argv: Sequence[str], ready: bool) -> Proc:
        """Start ``argv`` inside ``namespace`` (None: here); with ``ready``, wait for its
        ``READY ...`` line.  Its stdin is a pipe that :meth:`kill` closes."""
        full = list(argv) if namespace is None else ["ip", "netns", "exec", namespace.name, *argv]
        popen = subprocess.Popen(
            full,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = Proc(popen, namespace, full)
        self.procs.append(proc)
        if ready:
            proc.ready = _await_ready(proc)
        return proc

    def listen(
        self,
        namespace: Optional[Namespace],
        address: str,
        port: int = 0,
        proto: str = "tcp",
        dualstack: bool = False,
    ) -> Proc:
        """A listener on ``address`` (``::`` with ``dualstack`` takes IPv4 too) that accepts
        and holds every connection."""
        argv = [sys.executable, os.path.abspath(__file__), "listen", proto, address, str(port)]
        if dualstack:
            argv.append("dualstack")
        return self.spawn(namespace, argv, ready=True)

    def connect(
        self,
        namespace: Optional[Namespace],
        address: str,
        port: int,
        proto: str = "tcp",
        close: bool = False,
    ) -> Proc:
        """A client connected to ``address``:``port`` that holds the connection.  The socket
        family follows the address (so ``::ffff:9.9.9.9`` dials IPv4 from AF_INET6); with
        ``close`` it closes at once and exits, leaving an orphaned socket in the kernel."""
        argv = [sys.executable, os.path.abspath(__file__), "connect", proto, address, str(port)]
        if close:
            argv.append("close")
        proc = self.spawn(namespace, argv, ready=True)
        if close:
            proc.popen.wait(READY_TIMEOUT)
        return proc

    def kill(self, proc: Proc) -> None:
        """End one process: close its stdin, then SIGKILL by pid if it lingers."""
        popen = proc.popen
        if popen.poll() is None:
            if popen.stdin is not None:
                with contextlib.suppress(OSError):
                    popen.stdin.close()
            try:
                popen.wait(2)
            except subprocess.TimeoutExpired:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(5)
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def close(self) -> None:
        """Kill every process started here, delete the links and namespaces by name."""
        for proc in reversed(self.procs):
            self.kill(proc)
        self.procs.clear()
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self.links.clear()
        for namespace in reversed(self.namespaces):
            end_every_process_in(namespace.name)
            subprocess.run(["ip", "netns", "del", namespace.name], capture_output=True, check=False)
        self.namespaces.clear()


def end_every_process_in(name: str, timeout: float = 5.0) -> None:
    """SIGKILL whatever still runs in the test namespace ``name`` (what a test ran there
    through ``ip netns exec`` or a runtime, not only what :class:`NetHost` started) and wait
    until none is left: a process left behind would keep the namespace, and its addresses,
    alive beside the next test's namespace of the same addresses."""
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        )
        pids = [int(word) for word in listed.stdout.split() if word.isdigit()]
        pids = [pid for pid in pids if _wholly_in(pid, inode)]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _wholly_in(pid: int, inode: int) -> bool:
    """Whether every thread of ``pid`` is in the namespace ``inode``: an agent whose one
    thread entered the namespace for a moment (to open a socket there) is not a test's
    process left behind."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return all(os.stat(f"/proc/{pid}/task/{tid}/ns/net").st_ino == inode for tid in tasks)
    except OSError:
        return False


def remove_leftovers(prefix: str) -> None:
    """Delete namespaces and root-namespace links named ``PREFIX-*`` (from a crashed run)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in listing.stdout.splitlines():
        name = line.split(" ")[0]
        if name.startswith(prefix + "-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False)
    for line in links.stdout.splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            name = parts[1].split("@")[0]
            if name.startswith(prefix + "-"):
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def _wait_link_local(namespace: Optional[Namespace], device: str) -> None:
    """Wait until the interface's link-local address exists and is not tentative."""
    argv = ["ip", "-6", "-o", "address", "show", "dev", device, "scope", "link"]
    if namespace is not None:
        argv[1:1] = ["-n", namespace.name]
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        if "inet6" in out and "tentative" not in out:
            return
        time.sleep(0.05)
    raise NetHostError(f"{device}: no usable link-local address after {READY_TIMEOUT}s")


def _await_ready(proc: Proc) -> List[str]:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.line(0.1)
        if line is not None and line.startswith("READY"):
            return line.split()[1:]
        if line is None and proc.popen.poll() is not None:
            error = proc.popen.stderr.read() if proc.popen.stderr else ""
            raise NetHostError(f"{' '.join(proc.argv)} exited: {error.strip()}")
    raise NetHostError(f"{' '.join(proc.argv)}: not ready after {READY_TIMEOUT}s")


# ---------------------------------------------------------------------------------------------
# the processes: `python nethost.py listen|connect PROTO ADDRESS PORT [dualstack|close|reset]`


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _endpoint(address: str, port: int) -> tuple:  # type: ignore[type-arg]
    """A sockaddr; ``fe80::1%dev`` carries its scope (RFC 4007) as the interface index."""
    if "%" in address:
        host, zone = address.split("%", 1)
        return (host, port, 0, socket.if_nametoindex(zone))
    return (address, port)


def _socket(proto: str, family: int) -> socket.socket:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    return socket.socket(family, kind)


def _serve(proto: str, address: str, port: int, dualstack: bool) -> None:
    sock = _socket(proto, _family(address))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
    sock.bind(_endpoint(address, port))
    if proto == "tcp":
        sock.listen(128)
    print("READY", sock.getsockname()[1], flush=True)
    held = []
    while True:
        readable, _, _ = select.select([sock, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
            return
        if sock in readable:
            if proto == "tcp":
                held.append(sock.accept()[0])
            else:
                data, peer = sock.recvfrom(4096)
                sock.sendto(data, peer)


def _dial(proto: str, address: str, port: int, close: bool, reset: bool = False) -> None:
    sock = _socket(proto, _family(address))
    if reset:  # close with RST when the process ends: no TIME_WAIT socket is left behind
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.connect(_endpoint(address, port))
    if proto == "udp":
        sock.send(b"hello")
    local = sock.getsockname()
    print("READY", local[0], local[1], flush=True)
    if close:
        sock.close()
        return
    while os.read(sys.stdin.fileno(), 4096):
        pass


def main(argv: Sequence[str]) -> int:
    role, proto, address, port = argv[:4]
    flag = argv[4] if len(argv) > 4 else ""
    if role == "listen":
        _serve(proto, address, int(port), flag == "dualstack")
    elif role == "connect":
        _dial(proto, address, int(port), flag == "close", reset=flag == "reset")
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
