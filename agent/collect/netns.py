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

import functools
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

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
    here = os.open(f"{PROC_ROOT}/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = os.open(f"{proc_root}/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(there).st_ino == os.fstat(here).st_ino:
                return make()
            setns = _load_setns()
            setns(there, CLONE_NEWNET)
            try:
                return make()
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
