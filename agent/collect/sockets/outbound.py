"""Counting the host's outbound TCP connections, external or not, for the coverage figures.

Every TCP ``connect()`` raises its namespace's ``Tcp: ActiveOpens`` (RFC 1213
``tcpActiveOpens``); a sampler that also collects every outbound TCP connection it finds in the
tables lets the extension set the connections it saw beside the connects the kernel counted.
A connection is outbound when no listener of its namespace accepted it (what ActiveOpens counts).

Connections are kept as :func:`outbound_key` hashes: the extension holds two samples' worth of
every outbound connection of the host, and an int is a fraction of the memory of a tuple; two of
the host's connections share a 64-bit hash with odds around one in 10**9.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Optional, Set, Tuple

from agent.collect.sockets.procnet import Ends, ListenerIndex
from agent.inet import IPPROTO_TCP

OutboundKey = int


def outbound_key(namespace: int, ends: Ends) -> OutboundKey:
    """The name of one connection: the hash of its namespace and both ends."""
    return hash((namespace, ends))


def add_outbound(
    into: Set[OutboundKey], namespace: int, listeners: ListenerIndex, connections: Iterable[Ends]
) -> int:
    """Add the TCP connections of one namespace that no listener accepted; how many."""
    added = 0
    is_inbound = listeners.is_inbound
    for ends in connections:
        if not is_inbound(IPPROTO_TCP, ends[0], ends[1], ends[2]):
            into.add(outbound_key(namespace, ends))
            added += 1
    return added


class OutboundMemo:
    """Each namespace's outbound connections as last counted, with its ActiveOpens then.

    A namespace whose ActiveOpens has not moved since cannot have opened a connection: the next
    count of new ones is right with the connections of the last count, and the kernel is spared
    a dump of every socket of that namespace.
    """

    def __init__(self) -> None:
        self._by_namespace: Dict[int, Tuple[int, FrozenSet[OutboundKey]]] = {}

    def unchanged(self, namespace: int, active_opens: Optional[int]) -> Optional[FrozenSet[int]]:
        """The keys of the last count when ActiveOpens is what it was then, else None."""
        last = self._by_namespace.get(namespace)
        if last is None or active_opens is None or last[0] != active_opens:
            return None
        return last[1]

    def remember(
        self, namespace: int, active_opens: Optional[int], keys: FrozenSet[OutboundKey]
    ) -> None:
        if active_opens is not None:
            self._by_namespace[namespace] = (active_opens, keys)

    def keep_only(self, namespaces: Iterable[int]) -> None:
        """Forget the namespaces that are gone."""
        alive = set(namespaces)
        for inode in [inode for inode in self._by_namespace if inode not in alive]:
            del self._by_namespace[inode]
