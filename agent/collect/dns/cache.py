"""The names DNS answered for each address, per network namespace: a bounded, thread-safe cache.

Filled by :mod:`agent.collect.dns.watch` from the answers it sees; read by the pipeline for
every connection (``remote_domain`` is :meth:`NameCache.lookup`) and by the allow rules
(``domains:`` match any of :meth:`NameCache.names`).  Keys are (network namespace inode, IP
version, address as an integer); an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, RFC 4291
section 2.5.5.2, an AF_INET6 socket talking IPv4) is the IPv4 address it carries, so a
dual-stack socket finds the name its A record gave.

An address keeps every name answered for it, newest first (one CDN address serves many
names), each with the chain from the asked name to the address's owner, when it was seen and
its TTL.  An answer lives for its TTL, at least :data:`MIN_RETENTION` seconds (a TTL of 0 is
common and the sampler comes by only every few seconds), and for :data:`HOLD` seconds after
the last :meth:`NameCache.touch`: the pipeline touches the address of every live connection,
so a long connection keeps its name long after the answer's TTL.  A TTL counts for at most
:data:`MAX_TTL` seconds.

Bounds (issue 23: a namespace is anyone's to flood, ``unshare -rn`` makes one): each namespace
has its own least-recently-used order and its own budget, so one namespace's answers never
evict another's.  The agent's own (the host's) namespace may hold :data:`MAX_ENTRIES` entries
and an estimate of :data:`MAX_BYTES` bytes; every other namespace :data:`NAMESPACE_ENTRIES` and
:data:`NAMESPACE_BYTES`; at most :data:`MAX_NAMESPACES` namespaces have names (answers for
another are not taken, and counted in :attr:`NameCache.refused`).  So the whole cache stays
under ``MAX_BYTES + (MAX_NAMESPACES - 1) * NAMESPACE_BYTES`` (36 MiB) whatever is sent.  One
address keeps at most :data:`MAX_NAMES_PER_ADDRESS` names.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Collection, Dict, Iterable, List, NamedTuple, Optional, Tuple

from agent.inet import is_ipv4_mapped

MAX_ENTRIES = 10000
MAX_BYTES = 4 << 20
"""The agent's own network namespace: entries and estimated bytes."""
NAMESPACE_ENTRIES = 512
NAMESPACE_BYTES = 128 << 10
"""Every other namespace (a container, a test host, a user's ``unshare -rn``)."""
MAX_NAMESPACES = 256
"""Namespaces whose answers are kept (the DNS watch watches as many at most)."""
MAX_NAMES_PER_ADDRESS = 32
MIN_RETENTION = 60.0
HOLD = 300.0
MAX_TTL = 3600
"""Seconds an answer counts for at most, whatever its TTL says (a hostile answer may say 68
years): a name a process still uses is asked again within the hour, or kept by :meth:`touch`
while its connection lives."""

_ADDRESS_COST = 400
_ENTRY_COST = 180
_NAME_COST = 64
"""Bytes counted per address, per entry and per name besides its characters: what CPython
3.11 spends on an address's key, dict slot and list, on an entry's tuples and float, and on a
str object (``tests/test_names.py`` checks the estimate against tracemalloc)."""


class NameEntry(NamedTuple):
    """One answer for an address: ``chain[0]`` is the name that was asked."""

    chain: Tuple[str, ...]
    seen: float
    """``time.time()`` when the answer was seen"""
    ttl: int

    @property
    def asked(self) -> str:
        return self.chain[0]


ExportRow = Tuple[int, str, str, float, int]
"""(namespace inode, address as text, chain as names joined by spaces, seen, TTL): plain values
for a SQLite row (an IPv6 address as an integer would not fit SQLite's 64-bit INTEGER).  A name
never holds a space (:mod:`agent.collect.dns.parse` escapes one as ``\\032``), so the chain
splits back exactly."""


class _Address:
    __slots__ = ("cost", "entries", "held_until")

    def __init__(self) -> None:
        self.entries: List[NameEntry] = []
        self.held_until = 0.0
        self.cost = _ADDRESS_COST


def _cost(entry: NameEntry) -> int:
    return _ENTRY_COST + sum(_NAME_COST + len(name) for name in entry.chain)


def _plausible(name: str) -> bool:
    """A name as :mod:`agent.collect.dns.parse` writes them (for rows read back)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 4 * 253
        and name.isprintable()
        and "" not in name.split(".")
    )


def _key(namespace: int, version: int, address: int) -> Tuple[int, int, int]:
    if version == 6 and is_ipv4_mapped(address):
        return (namespace, 4, address & 0xFFFFFFFF)
    return (namespace, version, address)


def own_namespace(proc_root: str = "/proc") -> Optional[int]:
    """The inode of this process's network namespace (None when /proc cannot say)."""
    try:
        return os.stat(f"{proc_root}/self/ns/net").st_ino
    except OSError:
        return None


class _Space:
    """One namespace's answers: its addresses in least-recently-used order and its totals."""

    __slots__ = ("addresses", "bytes", "entries", "max_bytes", "max_entries")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.addresses: OrderedDict[Tuple[int, int, int], _Address] = OrderedDict()
        self.entries = 0
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes


class NameCache:
    """address -> names, per namespace; every method may be called from any thread.

    ``clock`` (``time.time`` by default) gives the time for every method whose ``now`` is
    None; times are wall-clock seconds so that exported entries mean the same after a restart.
    """

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        max_names_per_address: int = MAX_NAMES_PER_ADDRESS,
        min_retention: float = MIN_RETENTION,
        hold: float = HOLD,
        clock: Callable[[], float] = time.time,
        namespace_entries: int = NAMESPACE_ENTRIES,
        namespace_bytes: int = NAMESPACE_BYTES,
        max_namespaces: int = MAX_NAMESPACES,
        max_ttl: int = MAX_TTL,
        home: Optional[int] = -1,
    ) -> None:
        """``max_entries``, ``max_bytes``: the bounds of the ``home`` namespace (default: our
        own); ``namespace_entries``, ``namespace_bytes``: those of every other namespace (never
        above the home's)."""
        bounds = (max_entries, max_bytes, max_names_per_address, namespace_entries)
        if min(*bounds, namespace_bytes, max_namespaces) < 1:
            raise ValueError("NameCache bounds must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.namespace_entries = min(namespace_entries, max_entries)
        self.namespace_bytes = min(namespace_bytes, max_bytes)
        self.max_namespaces = max_namespaces
        self.max_names_per_address = max_names_per_address
        self.max_ttl = max_ttl
        self.min_retention = min_retention
        self.hold = hold
        self.home = own_namespace() if home == -1 else home
        self._clock = clock
        self._lock = threading.Lock()
        self._spaces: Dict[int, _Space] = {}
        self._entries = 0
        self._bytes = 0
        self.evicted = 0
        """Entries dropped to stay within the bounds (not those that expired)."""
        self.refused = 0
        """Answers not taken: their namespace would have been one over :attr:`max_namespaces`."""
        self.changes = 0
        """Answers added so far: a persister compares it with what it saved last."""

    # --- what the pipeline asks -----------------------------------------------------------

    def lookup(
        self, namespace: int, version: int, address: int, now: Optional[float] = None
    ) -> Optional[str]:
        """The asked name of the newest live answer for the address, or None."""
        found = self.entries(namespace, version, address, now)
        return found[0].asked if found else None

    def names(
        self, namespace: int, version: int, address: int, now: Optional[float] = None
    ) -> Tuple[str, ...]:
        """Every name of every live answer for the address (asked names and the CNAMEs of
        their chains), newest answer first, each name once."""
        seen: List[str] = []
        for entry in self.entries(namespace, version, address, now):
            seen.extend(name for name in entry.chain if name not in seen)
        return tuple(seen)

    def entries(
        self, namespace: int, version: int, address: int, now: Optional[float] = None
    ) -> Tuple[NameEntry, ...]:
        """The live answers for the address, newest first."""
        key = _key(namespace, version, address)
        with self._lock:
            space = self._spaces.get(key[0])
            record = None if space is None else space.addresses.get(key)
            if space is None or record is None:
                return ()
            now = self._clock() if now is None else now
            self._expire(space, key, record, now)
            return tuple(record.entries)

    def touch(
        self, namespace: int, version: int, address: int, now: Optional[float] = None
    ) -> bool:
        """A connection to the address lives: keep its names for :attr:`hold` seconds more,
        past their TTL, and count it as recently used.  False when no name is known."""
        key = _key(namespace, version, address)
        with self._lock:
            space = self._spaces.get(key[0])
            record = None if space is None else space.addresses.get(key)
            if space is None or record is None:
                return False
            now = self._clock() if now is None else now
            self._expire(space, key, record, now)
            if not record.entries:
                return False
            record.held_until = now + self.hold
            space.addresses.move_to_end(key)
            return True

    # --- what the observer adds -----------------------------------------------------------

    def add(
        self,
        namespace: int,
        version: int,
        address: int,
        chain: Tuple[str, ...],
        ttl: int,
        seen: Optional[float] = None,
    ) -> None:
        """Record an answer: ``address`` was answered for ``chain[0]`` through ``chain``, for
        ``ttl`` seconds (at most :attr:`max_ttl`).

        An earlier answer to the same asked name for this address is replaced.  Room is made
        within the namespace's own budget only; an answer for one namespace more than
        :attr:`max_namespaces` is not taken (:attr:`refused`)."""
        if not chain:
            return
        key = _key(namespace, version, address)
        with self._lock:
            space = self._spaces.get(key[0])
            if space is None:
                if len(self._spaces) >= self.max_namespaces:
                    self.refused += 1
                    return
                home = key[0] == self.home
                space = self._spaces[key[0]] = _Space(
                    self.max_entries if home else self.namespace_entries,
                    self.max_bytes if home else self.namespace_bytes,
                )
            seen = self._clock() if seen is None else seen
            entry = NameEntry(chain, seen, min(ttl, self.max_ttl))
            record = space.addresses.get(key)
            if record is None:
                record = space.addresses[key] = _Address()
                self._account(space, record.cost, 0)
            else:
                space.addresses.move_to_end(key)
                for index, old in enumerate(record.entries):
                    if old.chain[0] == chain[0]:
                        self._drop(space, record, index)
                        break
            record.entries.insert(0, entry)
            self.changes += 1
            cost = _cost(entry)
            record.cost += cost
            self._account(space, cost, 1)
            while len(record.entries) > self.max_names_per_address:
                self._drop(space, record, len(record.entries) - 1)
                self.evicted += 1
            self._evict(space)

    def forget_namespace(self, namespace: int) -> None:
        """Drop every name of a namespace that is gone (its inode may be reused)."""
        with self._lock:
            self._remove_space(namespace)

    def retain_namespaces(self, live: Collection[int]) -> None:
        """Drop every name of the namespaces not in ``live`` (gone, or loaded from a store
        for namespaces that no longer exist)."""
        with self._lock:
            for namespace in [n for n in self._spaces if n not in live]:
                self._remove_space(namespace)

    def sweep(self, now: Optional[float] = None) -> int:
        """Drop every expired answer; how many went.  O(entries): call it now and then."""
        with self._lock:
            now = self._clock() if now is None else now
            before = self._entries
            for space in list(self._spaces.values()):
                for key, record in list(space.addresses.items()):
                    self._expire(space, key, record, now)
            return before - self._entries

    # --- persistence ------------------------------------------------------------------------

    def export(self, now: Optional[float] = None) -> List[ExportRow]:
        """The live answers as plain rows, oldest first (:meth:`load` takes them back)."""
        with self._lock:
            now = self._clock() if now is None else now
            rows: List[ExportRow] = []
            pairs = [
                (space, item) for space in self._spaces.values() for item in space.addresses.items()
            ]
            for space, (key, record) in pairs:
                self._expire(space, key, record, now)
                namespace, version, address = key
                text = str(
                    ipaddress.IPv4Address(address)
                    if version == 4
                    else ipaddress.IPv6Address(address)
                )
                rows.extend(
                    (namespace, text, " ".join(entry.chain), entry.seen, entry.ttl)
                    for entry in record.entries
                )
        rows.sort(key=lambda row: row[3])
        return rows

    def load(self, rows: Iterable[ExportRow], now: Optional[float] = None) -> int:
        """Add exported rows back (after a restart); rows that are malformed or expired are
        skipped.  How many were added.

        Namespace inodes mean something only within one boot (numbers are reused): load rows
        exported since the current boot only (``/proc/sys/kernel/random/boot_id``).  The
        watch's next rescan drops the rows of namespaces that are gone."""
        now = self._clock() if now is None else now
        added = 0
        for row in rows:
            try:
                namespace, address_text, chain_text, seen, ttl = row
                if not isinstance(address_text, str) or "%" in address_text:
                    continue
                parsed = ipaddress.ip_address(address_text)
                chain = tuple(chain_text.split(" "))
                valid = (
                    isinstance(namespace, int)
                    and all(_plausible(name) for name in chain)
                    and 0 <= ttl < 1 << 31
                    and seen + max(ttl, self.min_retention) > now
                    and len(chain) <= 64
                )
            except (TypeError, ValueError, AttributeError):
                continue
            if valid:
                self.add(namespace, parsed.version, int(parsed), chain, int(ttl), float(seen))
                added += 1
        return added

    # --- size -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries held (expired ones included until a lookup or :meth:`sweep` drops them)."""
        return self._entries

    @property
    def cost(self) -> int:
        """The estimated bytes held, the figure :attr:`max_bytes` bounds."""
        return self._bytes

    def namespaces(self) -> Collection[int]:
        with self._lock:
            return set(self._spaces)

    def held(self, namespace: int) -> Tuple[int, int]:
        """(entries, estimated bytes) one namespace holds."""
        with self._lock:
            space = self._spaces.get(namespace)
            return (0, 0) if space is None else (space.entries, space.bytes)

    # --- inside the lock --------------------------------------------------------------------

    def _account(self, space: _Space, cost: int, entries: int) -> None:
        space.bytes += cost
        space.entries += entries
        self._bytes += cost
        self._entries += entries

    def _expire(
        self, space: _Space, key: Tuple[int, int, int], record: _Address, now: float
    ) -> None:
        if record.held_until > now:
            return
        floor = self.min_retention
        for index in range(len(record.entries) - 1, -1, -1):
            entry = record.entries[index]
            if entry.seen + max(entry.ttl, floor) <= now:
                self._drop(space, record, index)
        if not record.entries:
            self._remove(space, key)

    def _drop(self, space: _Space, record: _Address, index: int) -> None:
        cost = _cost(record.entries.pop(index))
        record.cost -= cost
        self._account(space, -cost, -1)

    def _remove(self, space: _Space, key: Tuple[int, int, int]) -> None:
        record = space.addresses.pop(key)
        self._account(space, -record.cost, -len(record.entries))
        if not space.addresses:  # an empty namespace holds no place under max_namespaces
            self._spaces.pop(key[0], None)

    def _remove_space(self, namespace: int) -> None:
        space = self._spaces.pop(namespace, None)
        if space is not None:
            self._bytes -= space.bytes
            self._entries -= space.entries

    def _evict(self, space: _Space) -> None:
        """Make room within one namespace's budget, from its least recently used address."""
        while space.entries > space.max_entries or space.bytes > space.max_bytes:
            key, record = next(iter(space.addresses.items()))
            if len(record.entries) > 1:
                self._drop(space, record, len(record.entries) - 1)
            else:
                self._remove(space, key)
            self.evicted += 1
