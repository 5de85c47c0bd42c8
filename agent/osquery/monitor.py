"""The extension's sampling: live samples for queries, and a background sampler feeding history.

The sampler itself (agent/sampler.py) is reached through one function, :data:`SampleFunction`,
so this module knows nothing of /proc or psutil.  One lock serialises every sample: the
sampler's caches are not meant for concurrent use, and a query waiting for a background
sample gets the freshest data anyway.  The figures have a lock of their own, so neither
``egress_agent_info`` nor a ping ever waits for a sample.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, Hashable, List, Mapping, Optional, Set

from agent import coverage
from agent.history import HistoryStore
from agent.records import Connection


@dataclass
class Snapshot:
    """What one sample gives the extension."""

    connections: List[Connection]
    """The sockets of interest (external ones), each with its process."""
    sockets_seen: int = 0
    """Every inet socket the sample looked at, external or not."""
    namespaces_seen: int = 0
    active_opens: Optional[Mapping[int, int]] = None
    """``{net namespace inode: Tcp ActiveOpens}`` when the sampler read them (saves a scan)."""
    outbound_tcp: Optional[FrozenSet[Hashable]] = None
    """Identities of every outbound TCP socket in the sample, whatever its remote address, when
    the sampler provides them; else the outbound TCP rows of ``connections`` stand in."""


SampleFunction = Callable[[Optional[FrozenSet[int]]], Snapshot]
"""``sample(pids)``: one live sample, narrowed to ``pids`` when not None."""

ActiveOpensFunction = Callable[[], Mapping[int, int]]
"""``{net namespace inode: Tcp ActiveOpens}`` of every namespace (agent.coverage)."""


@dataclass
class Stats:
    """Figures for ``egress_agent_info``: all from the background sampler."""

    started_at: int
    samples_total: int = 0
    last_sample_ms: Optional[float] = None
    sockets_seen: Optional[int] = None
    namespaces_seen: Optional[int] = None
    tcp_active_opens: Optional[int] = None
    outbound_tcp_seen: int = 0
    last_error: Optional[str] = None


@dataclass
class _Coverage:
    growth: coverage.ActiveOpensGrowth = field(default_factory=coverage.ActiveOpensGrowth)
    previous_outbound: FrozenSet[Hashable] = frozenset()


class Monitor:
    """Takes samples: on demand for the live table, and every ``interval`` s into history."""

    def __init__(
        self,
        sample: SampleFunction,
        store: Optional[HistoryStore],
        interval: float,
        logger: logging.Logger,
        active_opens: ActiveOpensFunction = coverage.active_opens_by_namespace,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sample = sample
        self._store = store
        self.interval = interval
        self._log = logger
        self._active_opens = active_opens
        self._clock = clock
        self._sample_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = Stats(started_at=int(clock()))
        self._coverage = _Coverage()

    def live(self, pids: Optional[FrozenSet[int]] = None) -> Snapshot:
        """One sample for a query (narrowed to ``pids``); the sampler's errors propagate."""
        with self._sample_lock:
            return self._sample(pids)

    def stats(self) -> Stats:
        """A copy of the figures; never waits for a sample in progress."""
        with self._stats_lock:
            return Stats(**vars(self._stats))

    def sample_once(self) -> bool:
        """One background sample: record it in history and update the figures; True when done.

        A failing sample is logged once per distinct message; the next one tries again.
        """
        with self._sample_lock:
            started = time.monotonic()
            try:
                snapshot = self._sample(None)
            except Exception as error:  # the sampler's bug must not end the background loop
                self._sampling_failed(f"sampling failed: {type(error).__name__}: {error}")
                return False
            elapsed_ms = (time.monotonic() - started) * 1000.0
            at = self._clock()
            active_opens = snapshot.active_opens
            if active_opens is None:
                try:
                    active_opens = self._active_opens()
                except OSError:
                    active_opens = {}
        with self._stats_lock:
            if self._stats.last_error is not None:
                self._log.warning("sampling works again")
                self._stats.last_error = None
            self._stats.samples_total += 1
            self._stats.last_sample_ms = round(elapsed_ms, 3)
            self._stats.sockets_seen = snapshot.sockets_seen
            self._stats.namespaces_seen = snapshot.namespaces_seen
            self._count_outbound(snapshot)
            self._stats.tcp_active_opens = self._coverage.growth.update(active_opens)
        if self._store is not None:
            self._store.record([c for c in snapshot.connections if c.external], at=at)
        return True

    def _sampling_failed(self, message: str) -> None:
        with self._stats_lock:
            if message != self._stats.last_error:
                self._log.error("%s", message)
            self._stats.last_error = message

    def run(self, stop: threading.Event) -> None:
        """Sample now and then every ``interval`` seconds (fixed rate) until ``stop`` is set."""
        next_at = time.monotonic()
        while not stop.is_set():
            self.sample_once()
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # a sample overran: skip the missed slots instead of bursting
                next_at = now + self.interval
            if stop.wait(next_at - now):
                return

    def _count_outbound(self, snapshot: Snapshot) -> None:
        if snapshot.outbound_tcp is not None:
            current = snapshot.outbound_tcp
        else:
            keys: Set[Hashable] = set()
            for c in snapshot.connections:
                if c.protocol == 6 and c.direction == "outbound":
                    keys.add(
                        (
                            c.net_namespace,
                            c.socket,
                            c.local_address,
                            c.local_port,
                            c.remote_address,
                            c.remote_port,
                        )
                    )
            current = frozenset(keys)
        # A connection seen in consecutive samples counts once; memory stays one sample deep.
        self._stats.outbound_tcp_seen += len(current - self._coverage.previous_outbound)
        self._coverage.previous_outbound = current
