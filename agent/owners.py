"""Which process holds a socket: socket inode -> (pid, fd), from ``/proc/PID/fd``.

The kernel gives no index from a socket to its owner; the only way is to read every fd link
(``socket:[INODE]``, ``Documentation/filesystems/proc.rst``), which is the cost that dominates
``psutil.net_connections()`` and ``ss -p``.  :class:`OwnerFinder` bounds it: it looks only for the
inodes it is asked about, stops as soon as it has found them all, first checks the very fd
that held each socket last time, and then looks first in the processes that owned the wanted
sockets last time (long-lived connections keep their owners).

Each fd directory is opened once (``os.open``) and its links are read relative to it
(``readlink(name, dir_fd=...)``), which spares the kernel a path walk per fd.

A socket shared by several processes (inherited over ``fork``) gets the first owner met: the
lowest pid on a first scan, then the same one again while it lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Mapping, Optional, Set, Tuple

from agent.collect.netns import PROC_ROOT, list_pids

Owner = Tuple[int, int]
"""(pid, fd)"""

_SOCKET_PREFIX = "socket:["


@dataclass
class OwnerScan:
    """What one :meth:`OwnerFinder.find` found and what it cost."""

    owners: Dict[int, Owner] = field(default_factory=dict)
    """socket inode -> (pid, fd) for the wanted inodes that were found."""
    pids_scanned: int = 0
    """fd directories listed (the fds remembered from last time are read without listing)."""
    fds_scanned: int = 0
    unreadable_pids: int = 0
    """fd directories that could not be opened (another user's process, or gone)."""
    complete: bool = False
    """Every candidate pid was scanned (no early stop)."""
    skipped: bool = False
    """Nothing was wanted, so /proc was not read at all."""


class OwnerFinder:
    """Maps socket inodes to owning (pid, fd), remembering between calls what speeds it up.

    Kept between calls: the pids that owned wanted sockets last time (scanned first), and a
    negative cache of inodes that a complete scan found without an owner (their owner is
    another user's process, or the socket is an orphan).  Those would otherwise defeat the
    early stop on every sample; they do not hold up the scan for ``negative_ttl`` calls, then
    are looked for again.  Inode 0 (TIME_WAIT and request sockets) never has an owner.
    """

    def __init__(self, proc_root: str = PROC_ROOT, negative_ttl: int = 8) -> None:
        self.proc_root = proc_root
        self.negative_ttl = negative_ttl
        self._recent_pids: List[int] = []
        self._last_owners: Dict[int, Owner] = {}
        self._unowned: Dict[int, int] = {}
        self._calls = 0

    def find(
        self,
        wanted: Collection[int],
        pids: Optional[Collection[int]] = None,
        threads: Optional[Mapping[int, int]] = None,
    ) -> OwnerScan:
        """Find the owners of the ``wanted`` socket inodes.

        With ``pids``, look only in those processes (osquery's ``WHERE pid = N``); such a
        restricted scan leaves the remembered state alone.  ``threads`` maps a process whose
        main thread has exited to a live thread, whose ``/proc/PID/task/TID/fd`` is read
        instead of the empty ``/proc/PID/fd`` (:func:`agent.procnet.live_thread`).
        """
        self._calls += 1
        scan = OwnerScan()
        targets: Set[int] = {inode for inode in wanted if inode}
        if not targets:
            scan.skipped = True
            scan.complete = True
            return scan
        restricted = pids is not None
        if restricted:
            waiting = set(targets)
        else:
            self._expire_unowned()
            waiting = targets - self._unowned.keys()

        links = {f"{_SOCKET_PREFIX}{inode}]": inode for inode in targets}
        stopped_early = False
        if not restricted:
            stopped_early = self._confirm(links, waiting, scan)
        order: List[int] = sorted(set(pids)) if pids is not None else list(self._recent_pids)
        tried: Set[int] = set(order)
        threads = threads or {}
        stopped_early = stopped_early or self._scan(order, links, waiting, scan, threads)
        if not stopped_early and not restricted:
            rest = [pid for pid in self._list_pids() if pid not in tried]
            stopped_early = self._scan(rest, links, waiting, scan, threads)
        scan.complete = not stopped_early

        if not restricted:
            self._remember(scan, targets)
        return scan

    def _confirm(self, links: Dict[str, int], waiting: Set[int], scan: OwnerScan) -> bool:
        """Read only the fd that held each wanted socket last time: a long-lived connection
        keeps its owner and fd, so a warm sample needs one readlink per socket, not one per
        fd of its owners.  True when that found everything."""
        by_pid: Dict[int, List[Tuple[int, int]]] = {}
        for inode in waiting:
            last = self._last_owners.get(inode)
            if last is not None:
                by_pid.setdefault(last[0], []).append((last[1], inode))
        owners = scan.owners
        readlink = os.readlink
        for pid, fds in by_pid.items():
            try:
                dir_fd = os.open(f"{self.proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # gone: the full scan looks for its sockets
            try:
                for fd, inode in fds:
                    try:
                        link = readlink(str(fd), dir_fd=dir_fd)
                    except OSError:
                        continue
                    scan.fds_scanned += 1
                    if links.get(link) == inode:
                        owners[inode] = (pid, fd)
                        waiting.discard(inode)
            finally:
                os.close(dir_fd)
        return not waiting

    def _scan(
        self,
        order: List[int],
        links: Dict[str, int],
        waiting: Set[int],
        scan: OwnerScan,
        threads: Mapping[int, int],
    ) -> bool:
        """Scan fd directories in ``order``; True when it stopped because nothing is waiting.

        ``links`` maps the link text of each wanted socket (``socket:[INODE]``) to its inode:
        one dict probe per fd, whatever the fd is."""
        if not waiting:
            return True
        owners = scan.owners
        proc_root = self.proc_root
        readlink = os.readlink
        for pid in order:
            tid = threads.get(pid)
            path = f"{proc_root}/{pid}/fd" if tid is None else f"{proc_root}/{pid}/task/{tid}/fd"
            try:
                dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                scan.unreadable_pids += 1
                continue
            scan.pids_scanned += 1
            read = 0
            try:
                try:
                    names = os.listdir(dir_fd)
                except OSError:
                    names = []
                for name in names:
                    try:
                        link = readlink(name, dir_fd=dir_fd)
                    except OSError:
                        continue  # closed since the listing
                    read += 1
                    inode = links.get(link)
                    if inode is not None and inode not in owners:
                        owners[inode] = (pid, int(name))
                        waiting.discard(inode)
                        if not waiting:
                            return True
            finally:
                os.close(dir_fd)
                scan.fds_scanned += read
        return False

    def _list_pids(self) -> List[int]:
        try:
            return list_pids(self.proc_root)
        except OSError:
            return []

    def _expire_unowned(self) -> None:
        oldest = self._calls - self.negative_ttl
        expired = [inode for inode, since in self._unowned.items() if since <= oldest]
        for inode in expired:
            del self._unowned[inode]

    def _remember(self, scan: OwnerScan, targets: Set[int]) -> None:
        self._recent_pids = sorted({pid for pid, _ in scan.owners.values()})
        self._last_owners = dict(scan.owners)
        found = scan.owners
        unowned = {
            inode: since
            for inode, since in self._unowned.items()
            if inode in targets and inode not in found
        }
        if scan.complete:
            # every process was looked at: whatever is still missing has no readable owner
            for inode in targets:
                if inode not in found:
                    unowned[inode] = self._calls
        self._unowned = unowned

    @property
    def unowned(self) -> Set[int]:
        """The inodes currently in the negative cache."""
        return set(self._unowned)
