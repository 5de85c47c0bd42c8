"""Network namespaces: finding them through /proc, and entering one to open a socket there.

A network namespace has no name of its own; the kernel shows it as the inode of
``/proc/PID/ns/net`` of each process in it (``namespaces(7)``).  :func:`discover_namespaces`
groups the pids under /proc by that inode, one representative pid per namespace (as osquery's
``process_open_sockets`` does, ``osquery/filesystem/linux/proc.cpp``), and works around a
process whose main thread exited alone (:func:`live_thread`).

A socket belongs to the namespace it was created in: :func:`open_in_namespace` enters a
namespace with ``setns(2)`` (CAP_SYS_ADMIN), creates the socket and comes back at once.  The
socket tables (:mod:`agent.collect.sockets`), the DNS watch (:mod:`agent.collect.dns`) and
the kernel events (:mod:`agent.collect.kernel`) all find and enter namespaces through here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
"""``setns(2)``/``clone(2)``/``unshare(2)`` flag of a network namespace (``<sched.h>``)."""

PROC_ROOT = "/proc"


def list_pids(proc_root: str = PROC_ROOT) -> List[int]:
    """The process ids under /proc, ascending (threads are not listed there)."""
    return sorted(int(name) for name in os.listdir(proc_root) if name.isdigit())


def parse_namespace_link(link: str, kind: str = "net") -> int:
    """The inode in a namespace link such as ``net:[4026531840]``.  Raises ValueError."""
    prefix = kind + ":["
    if not (link.startswith(prefix) and link.endswith("]")):
        raise ValueError(f"not a {kind} namespace link: {link!r}")
    inode = int(link[len(prefix) : -1])
    if inode <= 0:
        raise ValueError(f"not a {kind} namespace link: {link!r}")
    return inode


def namespace_of(pid: int, proc_root: str = PROC_ROOT) -> int:
    """The inode of PID's network namespace.  Raises OSError or ValueError."""
    return parse_namespace_link(os.readlink(f"{proc_root}/{pid}/ns/net"))


@dataclass
class NetNamespace:
    """A network namespace and the pids seen in it (ascending; the first represents it)."""

    inode: int
    pids: List[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The representative pid, through which the namespace's tables are read."""
        return self.pids[0]


def live_thread(pid: int, proc_root: str = PROC_ROOT) -> Optional[int]:
    """A live thread of a process whose main thread has exited alone, or None.

    When the thread-group leader ends with ``pthread_exit`` or ``SYS_exit`` while other
    threads run on, the process lives (``ps`` shows ``Zl``) but ``/proc/PID/ns/net``,
    ``/proc/PID/net/*`` and ``/proc/PID/fd`` go with the leader's files and namespaces
    (``proc_ns_get_link``, ``get_proc_task_net`` and ``proc_fd_link`` in ``fs/proc`` read the
    leader's task); ``/proc/PID/task/TID/`` of a live thread still shows them.  A process
    could otherwise hide its sockets, and a namespace whose processes all do so, this way.
    """
    try:
        names = os.listdir(f"{proc_root}/{pid}/task")
    except OSError:
        return None
    for name in names:
        if name.isdigit() and int(name) != pid:
            try:
                os.readlink(f"{proc_root}/{pid}/task/{name}/ns/net")
            except OSError:
                continue
            return int(name)
    return None


def proc_entry(pid: int, threads: Dict[int, int], proc_root: str = PROC_ROOT) -> Tuple[int, str]:
    """The ``(pid, proc_root)`` to hand the readers here for PID: itself, or its live thread
    under ``/proc/PID/task`` when its leader has exited (``threads``, as discovery found them;
    see :func:`live_thread`)."""
    tid = threads.get(pid)
    return (pid, proc_root) if tid is None else (tid, f"{proc_root}/{pid}/task")


@dataclass
class NamespaceDiscovery:
    """The outcome of :func:`discover_namespaces`."""

    namespaces: List[NetNamespace]
    errors: Dict[int, str]
    """pid -> why its namespace could not be read (gone, permission denied, ...)."""
    pids_seen: int
    threads: Dict[int, int] = field(default_factory=dict)
    """pid -> a live thread, for processes whose main thread has exited (see
    :func:`live_thread`): read their tables and fds through ``/proc/PID/task/TID``."""


def discover_namespaces(
    proc_root: str = PROC_ROOT, pids: Optional[Iterable[int]] = None
) -> NamespaceDiscovery:
    """The distinct network namespaces of the given pids (every pid when None).

    Errors are per pid: ``/proc/1/ns/net`` may be unreadable even for root in a sandbox, and an
    ordinary user cannot read other users' links; such pids are listed in ``errors``.
    """
    candidates = list_pids(proc_root) if pids is None else sorted(set(pids))
    by_inode: Dict[int, NetNamespace] = {}
    errors: Dict[int, str] = {}
    threads: Dict[int, int] = {}
    for pid in candidates:
        try:
            try:
                inode = namespace_of(pid, proc_root)
            except FileNotFoundError:
                tid = live_thread(pid, proc_root)
                if tid is None:
                    raise
                inode = namespace_of(tid, f"{proc_root}/{pid}/task")
                threads[pid] = tid
        except OSError as error:
            errors[pid] = error.strerror or type(error).__name__
            continue
        except ValueError as error:
            errors[pid] = str(error)
            continue
        namespace = by_inode.get(inode)
        if namespace is None:
            by_inode[inode] = NetNamespace(inode, [pid])
        else:
            namespace.pids.append(pid)
    return NamespaceDiscovery(list(by_inode.values()), errors, len(candidates), threads)


class NamespaceReturnError(OSError):
    """We entered another network namespace and could not come back to our own."""


@functools.lru_cache(maxsize=None)
def _load_setns() -> Callable[[int, int], None]:
    if hasattr(os, "setns"):  # Python 3.12+
        setns: Callable[[int, int], None] = os.setns
        return setns
    import ctypes  # only here: it costs a few milliseconds to import

    libc = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter is linked with

    def setns_libc(fd: int, nstype: int) -> None:
        if libc.setns(fd, nstype) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return setns_libc


def open_in_namespace(
    pid: int, make: Callable[[], socket.socket], proc_root: str = PROC_ROOT
) -> socket.socket:
    """The socket ``make`` creates, created in the network namespace of ``pid``.

    Enters that namespace (this thread only) just long enough to create the socket, which
    keeps answering for that namespace.  Raises OSError: the process is gone, or we may not
    enter its namespace (not root), or ``make`` failed; and :class:`NamespaceReturnError` if we
    could not come back, which leaves this thread unusable.
    """
    return open_in_namespace_file(f"{proc_root}/{pid}/ns/net", make)


def open_in_namespace_file(path: str, make: Callable[[], socket.socket]) -> socket.socket:
    """:func:`open_in_namespace` through a namespace file: ``/proc/PID/ns/net``, or a bind
    mount that keeps a namespace alive without a process (``/run/netns/NAME``, see
    :func:`named_namespaces`).  Raises as :func:`open_in_namespace` does."""
    return in_namespace_file(path, make)


def in_namespace_file(path: str, work: Callable[[], T]) -> T:
    """``work()``, run by this thread inside the network namespace the file ``path`` enters
    (what it opens there stays there; ``/proc/thread-self/net`` shows that namespace
    meanwhile), back in our own namespace after.  Raises as :func:`open_in_namespace`."""
    here = os.open(f"{PROC_ROOT}/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(there).st_ino == os.fstat(here).st_ino:
                return work()
            setns = _load_setns()
            setns(there, CLONE_NEWNET)
            try:
                return work()
            finally:
                try:
                    setns(here, CLONE_NEWNET)
                except OSError as error:
                    raise NamespaceReturnError(
                        error.errno, f"cannot return to our network namespace: {error.strerror}"
                    ) from error
        finally:
            os.close(there)
    finally:
        os.close(here)


NAMESPACE_DIRS: Tuple[str, ...] = (
    "/run/netns",
    "/var/run/netns",
    "/run/docker/netns",
    "/var/run/docker/netns",
)
"""Where namespaces are kept alive by a bind mount, without a process: ``ip netns add``
(``/run/netns``, ``/var/run/netns`` on systems where /var/run is not /run) and Docker; rootless
podman keeps its own under ``/run/user/UID/netns`` (:data:`USER_RUN_DIR`)."""
USER_RUN_DIR = "/run/user"


def named_namespaces(
    dirs: Sequence[str] = NAMESPACE_DIRS, user_run_dir: str = USER_RUN_DIR
) -> Dict[int, str]:
    """Namespace inode -> a file that enters it, for every namespace kept alive under the
    runtimes' directories (:data:`NAMESPACE_DIRS`, ``/run/user/*/netns``): those namespaces
    may hold no process at all.  A file there that is not a namespace (a mount point left
    behind) is skipped: only files on the namespace file system (the device of our own
    ``/proc/self/ns/net``) count.  Never raises."""
    try:
        nsfs = os.stat(f"{PROC_ROOT}/self/ns/net").st_dev
    except OSError:
        return {}
    where = list(dirs)
    with contextlib.suppress(OSError):
        where += [
            os.path.join(user_run_dir, uid, "netns")
            for uid in os.listdir(user_run_dir)
            if uid.isdigit()
        ]
    found: Dict[int, str] = {}
    for directory in where:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                status = os.stat(path)
            except OSError:
                continue
            if status.st_dev == nsfs:
                found.setdefault(status.st_ino, path)
    return found


# NETLINK_ROUTE (rtnetlink(7)): the addresses and links of a namespace
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_RTM_NEWLINK, _RTM_GETLINK, _RTM_NEWADDR, _RTM_GETADDR = 16, 18, 20, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL, _IFLA_IFNAME = 1, 2, 3
_HEADER = struct.Struct("=IHHII")
_ATTRIBUTE = struct.Struct("=HH")


def _route_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def _dump(sock: socket.socket, kind: int, body: bytes) -> Iterable[Tuple[int, bytes]]:
    """(message type, payload) of each message of an rtnetlink dump.  Raises OSError."""
    flags = _NLM_F_REQUEST | _NLM_F_DUMP
    sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, 1, 0) + body)
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, message, _, _, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                return
            if message == _NLMSG_DONE:
                return
            if message == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
            yield message, data[offset + _HEADER.size : offset + length]
            offset += (length + 3) & ~3


def _attributes(payload: bytes, start: int) -> Iterable[Tuple[int, bytes]]:
    offset = start
    while offset + _ATTRIBUTE.size <= len(payload):
        length, kind = _ATTRIBUTE.unpack_from(payload, offset)
        if length < _ATTRIBUTE.size:
            return
        yield kind, payload[offset + _ATTRIBUTE.size : offset + length]
        offset += (length + 3) & ~3


@dataclass
class Interfaces:
    """The addresses (version, value) and link names one namespace has."""

    addresses: Set[Tuple[int, int]] = field(default_factory=set)
    names: Set[str] = field(default_factory=set)


def read_interfaces(sock: socket.socket) -> Interfaces:
    """The addresses and link names an rtnetlink socket's namespace has (``RTM_GETADDR`` and
    ``RTM_GETLINK`` dumps).  Raises OSError."""
    found = Interfaces()
    for message, payload in _dump(sock, _RTM_GETADDR, bytes(8)):  # struct ifaddrmsg
        if message != _RTM_NEWADDR or len(payload) < 8:
            continue
        family = payload[0]
        for kind, value in _attributes(payload, 8):
            if kind in (_IFA_ADDRESS, _IFA_LOCAL) and len(value) in (4, 16):
                version = 4 if family == socket.AF_INET else 6
                found.addresses.add((version, int.from_bytes(value, "big")))
    for message, payload in _dump(sock, _RTM_GETLINK, bytes(16)):  # struct ifinfomsg
        if message != _RTM_NEWLINK or len(payload) < 16:
            continue
        for kind, value in _attributes(payload, 16):
            if kind == _IFLA_IFNAME:
                found.names.add(value.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return found


def interfaces_in(path: str) -> Interfaces:
    """The addresses and link names of the namespace the file ``path`` enters.  Raises
    OSError."""
    sock = open_in_namespace_file(path, _route_socket)
    try:
        return read_interfaces(sock)
    finally:
        sock.close()
