"""The namespace of a connection whose thread's namespace could not be read: by its address.

No event carries a network namespace; the tracker reads ``/proc/TID/ns/net`` of the thread
(see :mod:`agent.collect.kernel.tracker`).  A process that entered a namespace with
``setns(2)`` and exits a few milliseconds later (``ip netns exec NS curl``, ``nsenter``,
``docker exec``, ``kubectl exec``, a CNI plugin) is gone when its events are read: its thread
has no namespace to read.  Its connection still carries facts of its namespace: the local
address the kernel chose (TCP's ``connect`` has it at SYN_SENT; a UDP connect's second route
lookup has it) or, where that is still 0 (an unconnected socket's ``sendto()``), the output
device of its route.  :class:`NamespacePlacer` keeps which namespace holds which address and
which device name (rtnetlink dumps in each, :func:`agent.collect.netns.read_interfaces`) and
places the connection where exactly one namespace does.

Loopback and unspecified addresses are in every namespace: never used.  Two namespaces with
the same address (overlapping container networks) and the same device names (``eth0`` in
every container) leave it unplaced (None): an unknown namespace, never a guess.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from agent.collect.netns import (
    PROC_ROOT,
    Interfaces,
    discover_namespaces,
    interfaces_in,
    named_namespaces,
)
from agent.inet import ipv4_host

Reader = Callable[[str], Interfaces]
MAX_REFRESHES_PER_S = 10
WAYS_PER_NAMESPACE = 4
"""Processes of a namespace tried as a way into it, after the file that keeps it."""
QUIET_FACTOR = 9
"""After a look that took T seconds, none for ``QUIET_FACTOR * T``: a host with thousands of
namespaces (a flood of ``unshare -rn``) spends at most a tenth of the event thread's time
indexing them."""


def _usable(version: int, value: int) -> Optional[Tuple[int, int]]:
    """(version, address) as the index keeps it (an IPv4-mapped address as IPv4), or None
    for addresses every namespace has (loopback, unspecified)."""
    mapped = ipv4_host(value, version)
    if mapped is not None:
        version, value = 4, mapped
    if value == 0:
        return None
    if version == 4 and value >> 24 == 127:
        return None
    if version == 6 and value == 1:
        return None
    return version, value


class NamespacePlacer:
    """Address and device name -> the one namespace that has it.

    ``learn(inode, tid)`` adds a way into a namespace as the tracker reads one; the runtimes'
    directories (:func:`agent.collect.netns.named_namespaces`) and every process's namespace
    are looked at when an address is not known, at most once per ``min_refresh_s``.
    Not thread-safe: the event source's thread only.
    """

    def __init__(
        self,
        proc_root: str = PROC_ROOT,
        read: Reader = interfaces_in,
        named: Callable[[], Dict[int, str]] = named_namespaces,
        min_refresh_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self._read = read
        self._named = named
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self._last_refresh = -1e9
        self._quiet_until = -1e9
        self._missed: Set[object] = set()
        self._recent: Deque[float] = collections.deque()
        self.entries: Dict[int, str] = {}
        """namespace inode -> a file that enters it."""
        self.addresses: Dict[Tuple[int, int], Set[int]] = {}
        self.devices: Dict[str, Set[int]] = {}
        self.placed = 0
        self.unplaced = 0
        self.refreshes = 0

    def learn(self, inode: int, tid: int) -> None:
        self.entries.setdefault(inode, f"{self.proc_root}/{tid}/ns/net")

    def place(self, version: int, address: bytes, device: str = "") -> Optional[int]:
        """The namespace holding ``address`` (else, when it is 0, the one with a device
        named ``device``), if exactly one does; None otherwise."""
        key = _usable(version, int.from_bytes(address, "big")) if address else None
        if key is None and (not device or device in ("-", "lo")):
            self.unplaced += 1
            return None
        found = self._find(key, device)
        known = self.addresses.get(key, ()) if key is not None else self.devices.get(device, ())
        if found is None and not known and self._may_refresh(key if key is not None else device):
            self.refresh()
            found = self._find(key, device)
        if found is None:
            self.unplaced += 1
        else:
            self.placed += 1
        return found

    def _may_refresh(self, missed: object) -> bool:
        """A look again for an address or device no namespace had (one that several have
        stays ambiguous: no look): once per ``min_refresh_s``, and at once for one not
        missed since the last look (a namespace made a moment ago), up to
        :data:`MAX_REFRESHES_PER_S` a second."""
        now = self._clock()
        if now < self._quiet_until:
            return False  # the last look cost much (many namespaces): at most a tenth of the time
        if now - self._last_refresh >= self.min_refresh_s:
            return True
        if missed in self._missed:
            return False
        self._missed.add(missed)
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        return len(self._recent) < MAX_REFRESHES_PER_S

    def _enter(self, inode: int, paths: List[str]) -> Optional[Tuple[str, Interfaces]]:
        """The first of ``paths`` that still enters ``inode`` (a file that keeps it first: a
        process seen in it may be gone a moment later, as every command under ``ip netns
        exec`` soon is), with what it holds; None when none does."""
        for path in dict.fromkeys(paths):
            try:
                if os.stat(path).st_ino != inode:
                    continue  # a pid reused by a process elsewhere
                return path, self._read(path)
            except OSError:
                continue
        return None

    def _find(self, key: Optional[Tuple[int, int]], device: str) -> Optional[int]:
        holders: Iterable[int] = (
            self.addresses.get(key, ()) if key is not None else self.devices.get(device, ())
        )
        holding = set(holders)
        return next(iter(holding)) if len(holding) == 1 else None

    def refresh(self) -> None:
        """Index every namespace we can find again: the runtimes' directories, every
        process's namespace, and those learned."""
        self._last_refresh = self._clock()
        self._recent.append(self._last_refresh)
        self._missed.clear()
        self.refreshes += 1
        ways: Dict[int, List[str]] = {}
        for inode, path in [*self._named().items(), *self.entries.items()]:
            ways.setdefault(inode, []).append(path)
        try:
            for namespace in discover_namespaces(self.proc_root).namespaces:
                ways.setdefault(namespace.inode, []).extend(
                    f"{self.proc_root}/{pid}/ns/net" for pid in namespace.pids[:WAYS_PER_NAMESPACE]
                )
        except OSError:
            pass
        addresses: Dict[Tuple[int, int], Set[int]] = {}
        devices: Dict[str, Set[int]] = {}
        live: Dict[int, str] = {}
        for inode, paths in ways.items():
            found = self._enter(inode, paths)
            if found is None:
                continue
            path, interfaces = found
            live[inode] = path
            for version, value in interfaces.addresses:
                key = _usable(version, value)
                if key is not None:
                    addresses.setdefault(key, set()).add(inode)
            for name in interfaces.names:
                devices.setdefault(name, set()).add(inode)
        self.entries, self.addresses, self.devices = live, addresses, devices
        took = self._clock() - self._last_refresh
        self._quiet_until = self._last_refresh + took * (1 + QUIET_FACTOR)
