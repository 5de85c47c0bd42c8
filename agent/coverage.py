"""How much a sampling interval lets through: the kernel's own count of outgoing TCP connects.

Every ``connect()`` of a TCP socket increments ``Tcp: ActiveOpens`` (RFC 1213's
``tcpActiveOpens``) of the socket's network namespace, shown in ``/proc/PID/net/snmp``
(Documentation/networking/snmp_counter.rst).  Summing the growth of that counter over all
namespaces since the agent started, beside the number of distinct outbound TCP connections
the sampler actually saw, shows an operator how many connections lived too briefly to be
sampled.
"""

from __future__ import annotations

import os
from typing import Collection, Dict, Mapping

from agent.collect.netns import PROC_ROOT, discover_namespaces, in_namespace_file
from agent.collect.sockets.procnet import parse_snmp, read_tcp_counters


def active_opens_by_namespace(proc_root: str = PROC_ROOT) -> Dict[int, int]:
    """``{namespace inode: ActiveOpens}`` for every namespace whose counters can be read.

    The sampler reads these with each sample; this is for when it did not (another backend).
    """
    counts: Dict[int, int] = {}
    for namespace in discover_namespaces(proc_root).namespaces:
        for pid in namespace.pids:  # the first whose counters can be read
            try:
                counters = read_tcp_counters(pid, proc_root)
            except OSError:
                continue
            if "ActiveOpens" in counters:
                counts[namespace.inode] = counters["ActiveOpens"]
            break
    return counts


def _own_active_opens() -> int:
    with open(f"{PROC_ROOT}/thread-self/net/snmp", encoding="ascii", errors="replace") as snmp:
        return parse_snmp(snmp.read())["ActiveOpens"]


def active_opens_of_files(files: Mapping[int, str], skip: Collection[int] = ()) -> Dict[int, int]:
    """``{namespace inode: ActiveOpens}`` of the namespaces ``files`` enter (inode -> a file:
    ``/run/netns/NAME``, ``/proc/TID/ns/net``), but those in ``skip`` (read already): the
    namespaces no process lets us read, kept alive by a file (``ip netns add``), and those the
    kernel events saw.  A file that no longer is its namespace (a pid reused) is skipped;
    never raises."""
    counts: Dict[int, int] = {}
    for inode, path in files.items():
        if inode in skip or inode in counts:
            continue
        try:
            if os.stat(path).st_ino != inode:
                continue
            counts[inode] = in_namespace_file(path, _own_active_opens)
        except (OSError, KeyError, ValueError):
            continue
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
