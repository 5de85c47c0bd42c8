"""How much a sampling interval lets through: the kernel's own count of outgoing TCP connects.

Every ``connect()`` of a TCP socket increments ``Tcp: ActiveOpens`` (RFC 1213's
``tcpActiveOpens``) of the socket's network namespace, shown in ``/proc/PID/net/snmp``
(Documentation/networking/snmp_counter.rst).  Summing the growth of that counter over all
namespaces since the agent started, beside the number of distinct outbound TCP connections
the sampler actually saw, tells an operator what fraction of connections lived too briefly
to be sampled.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Tuple


def namespace_pids(proc: str = "/proc") -> Dict[int, int]:
    """One representative pid per network namespace: ``{namespace inode: pid}``.

    A pid whose ``ns/net`` cannot be read (gone, or hidden from us) is skipped.
    """
    representatives: Dict[int, int] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return representatives
    for name in names:
        if not name.isdigit():
            continue
        try:
            inode = os.stat(f"{proc}/{name}/ns/net").st_ino
        except OSError:
            continue
        representatives.setdefault(inode, int(name))
    return representatives


def read_active_opens(pid: int, proc: str = "/proc") -> Optional[int]:
    """``Tcp: ActiveOpens`` of the namespace ``pid`` lives in; None when it cannot be read."""
    try:
        with open(f"{proc}/{pid}/net/snmp", encoding="ascii", errors="replace") as stream:
            return parse_active_opens(stream)
    except OSError:
        return None


def parse_active_opens(lines: Iterable[str]) -> Optional[int]:
    """The ActiveOpens value from the text of ``/proc/net/snmp`` (a header and a value line)."""
    header: Optional[Tuple[str, ...]] = None
    for line in lines:
        if not line.startswith("Tcp:"):
            continue
        fields = tuple(line.split()[1:])
        if header is None:
            header = fields
            continue
        if "ActiveOpens" not in header or len(fields) != len(header):
            return None
        try:
            return int(fields[header.index("ActiveOpens")])
        except ValueError:
            return None
    return None


def active_opens_by_namespace(
    representatives: Optional[Mapping[int, int]] = None, proc: str = "/proc"
) -> Dict[int, int]:
    """``{namespace inode: ActiveOpens}`` for every namespace that can be read."""
    if representatives is None:
        representatives = namespace_pids(proc)
    counts: Dict[int, int] = {}
    for inode, pid in representatives.items():
        value = read_active_opens(pid, proc)
        if value is not None:
            counts[inode] = value
    return counts


class ActiveOpensGrowth:
    """The growth of ActiveOpens summed over namespaces, since the first :meth:`update`.

    A namespace present at the first update counts from its value then; one that appears
    later was created since (or became readable since) and counts from zero.  A namespace
    missing from an update (its representative exited mid-read) keeps its place; only after
    :data:`RETIRE_AFTER` updates without it is it taken as gone, keeping what it contributed.
    A counter that went down means a new namespace reused the inode: it counts from zero.
    """

    RETIRE_AFTER = 60

    def __init__(self) -> None:
        self._base: Dict[int, int] = {}
        self._last: Dict[int, int] = {}
        self._missing: Dict[int, int] = {}
        self._retired = 0
        self._started = False

    def update(self, counts: Mapping[int, int]) -> int:
        for inode, value in counts.items():
            if inode not in self._base:
                self._base[inode] = value if not self._started else 0
            elif value < self._last[inode]:
                self._retired += self._last[inode] - self._base[inode]
                self._base[inode] = 0
            self._last[inode] = value
            self._missing.pop(inode, None)
        for inode in [inode for inode in self._base if inode not in counts]:
            misses = self._missing.get(inode, 0) + 1
            if misses < self.RETIRE_AFTER:
                self._missing[inode] = misses
                continue
            self._retired += self._last.pop(inode) - self._base.pop(inode)
            del self._missing[inode]
        self._started = True
        return self.total

    @property
    def total(self) -> int:
        return self._retired + sum(value - self._base[inode] for inode, value in self._last.items())
