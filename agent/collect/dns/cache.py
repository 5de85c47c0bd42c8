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
so a long connection keeps its name long after the answer's TTL.  Memory is bounded twice:
a total number of entries and an estimate of their bytes, least recently used addresses going
first; one address keeps at most :data:`MAX_NAMES_PER_ADDRESS` names.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from typing import Callable, Collection, Iterable, List, NamedTuple, Optional, Tuple

from agent.inet import is_ipv4_mapped

MAX_ENTRIES = 10000
MAX_BYTES = 4 << 20
MAX_NAMES_PER_ADDRESS = 32
MIN_RETENTION = 60.0
HOLD = 300.0

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
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_names_per_address < 1:
            raise ValueError("NameCache bounds must be at least 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_names_per_address = max_names_per_address
        self.min_retention = min_retention
        self.hold = hold
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: OrderedDict[Tuple[int, int, int], _Address] = OrderedDict()
        self._entries = 0
        self._bytes = 0
        self.evicted = 0
        """Entries dropped to stay within the bounds (not those that expired)."""
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
            record = self._addresses.get(key)
            if record is None:
                return ()
            now = self._clock() if now is None else now
            self._expire(key, record, now)
            return tuple(record.entries)

    def touch(
        self, namespace: int, version: int, address: int, now: Optional[float] = None
    ) -> bool:
        """A connection to the address lives: keep its names for :attr:`hold` seconds more,
        past their TTL, and count it as recently used.  False when no name is known."""
        key = _key(namespace, version, address)
        with self._lock:
            record = self._addresses.get(key)
            if record is None:
                return False
            now = self._clock() if now is None else now
            self._expire(key, record, now)
            if not record.entries:
                return False
            record.held_until = now + self.hold
            self._addresses.move_to_end(key)
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
        """Record an answer: ``address`` was answered for ``chain[0]`` through ``chain``.

        An earlier answer to the same asked name for this address is replaced."""
        if not chain:
            return
        key = _key(namespace, version, address)
        with self._lock:
            seen = self._clock() if seen is None else seen
            entry = NameEntry(chain, seen, ttl)
            record = self._addresses.get(key)
            if record is None:
                record = self._addresses[key] = _Address()
                self._bytes += record.cost
            else:
                self._addresses.move_to_end(key)
                for index, old in enumerate(record.entries):
                    if old.chain[0] == chain[0]:
                        self._drop(record, index)
                        break
            record.entries.insert(0, entry)
            self.changes += 1
            cost = _cost(entry)
            record.cost += cost
            self._bytes += cost
            self._entries += 1
            while len(record.entries) > self.max_names_per_address:
                self._drop(record, len(record.entries) - 1)
                self.evicted += 1
            self._evict()

    def forget_namespace(self, namespace: int) -> None:
        """Drop every name of a namespace that is gone (its inode may be reused)."""
        with self._lock:
            for key in [key for key in self._addresses if key[0] == namespace]:
                self._remove(key)

    def retain_namespaces(self, live: Collection[int]) -> None:
        """Drop every name of the namespaces not in ``live`` (gone, or loaded from a store
        for namespaces that no longer exist)."""
        with self._lock:
            for key in [key for key in self._addresses if key[0] not in live]:
                self._remove(key)

    def sweep(self, now: Optional[float] = None) -> int:
        """Drop every expired answer; how many went.  O(entries): call it now and then."""
        with self._lock:
            now = self._clock() if now is None else now
            before = self._entries
            for key, record in list(self._addresses.items()):
                self._expire(key, record, now)
            return before - self._entries

    # --- persistence ------------------------------------------------------------------------

    def export(self, now: Optional[float] = None) -> List[ExportRow]:
        """The live answers as plain rows, oldest first (:meth:`load` takes them back)."""
        with self._lock:
            now = self._clock() if now is None else now
            rows: List[ExportRow] = []
            for key, record in list(self._addresses.items()):
                self._expire(key, record, now)
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
            return {key[0] for key in self._addresses}

    # --- inside the lock --------------------------------------------------------------------

    def _expire(self, key: Tuple[int, int, int], record: _Address, now: float) -> None:
        if record.held_until > now:
            return
        floor = self.min_retention
        for index in range(len(record.entries) - 1, -1, -1):
            entry = record.entries[index]
            if entry.seen + max(entry.ttl, floor) <= now:
                self._drop(record, index)
        if not record.entries:
            self._remove(key)

    def _drop(self, record: _Address, index: int) -> None:
        cost = _cost(record.entries.pop(index))
        record.cost -= cost
        self._bytes -= cost
        self._entries -= 1

    def _remove(self, key: Tuple[int, int, int]) -> None:
        record = self._addresses.pop(key)
        self._entries -= len(record.entries)
        self._bytes -= record.cost

    def _evict(self) -> None:
        while self._entries > self.max_entries or self._bytes > self.max_bytes:
            key, record = next(iter(self._addresses.items()))
            if len(record.entries) > 1:
                self._drop(record, len(record.entries) - 1)
                self.evicted += 1
            else:
                self._remove(key)
                self.evicted += 1
