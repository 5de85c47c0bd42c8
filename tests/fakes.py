"""A sampler played by a function, for tests that need samples the real sampler cannot give on
demand: a scripted sequence, a failure, a deliberate stall.  Each test that uses one says why;
the real sampler is exercised with real sockets in test_sampler, test_extension and others."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Collection, FrozenSet, List, Optional, Tuple

from agent.collect import SampleStats
from agent.config import Settings
from agent.history import HistoryStore
from agent.pipeline import Monitor, Pipeline
from agent.records import Connection

SampleFunction = Callable[[Optional[FrozenSet[int]]], List[Connection]]


def outbound_keys(connections: List[Connection]) -> FrozenSet[int]:
    """What a real sampler's outbound count would hold for these rows (TCP, outbound)."""
    return frozenset(
        hash((c.net_namespace, c.socket, c.local_port, c.remote_address, c.remote_port))
        for c in connections
        if c.protocol == 6 and c.direction == "outbound"
    )


class FunctionSampler:
    """An :class:`agent.collect.Sampler` whose samples come from ``sample(pids)``; ``stats``
    makes each sample's :class:`SampleStats` from its rows (default: only the row count, plus
    the outbound count when asked)."""

    def __init__(
        self,
        sample: SampleFunction,
        stats: Optional[Callable[[List[Connection]], SampleStats]] = None,
    ) -> None:
        self._sample = sample
        self._stats = stats
        self.last = SampleStats()
        self.count_outbound_tcp = False
        self.asked: List[Tuple[Optional[FrozenSet[int]], bool]] = []

    @property
    def limited(self) -> bool:
        return False

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]:
        narrowed = None if pids is None else frozenset(pids)
        self.asked.append((narrowed, self.count_outbound_tcp))
        rows = self._sample(narrowed)
        stats = self._stats(rows) if self._stats is not None else SampleStats(rows=len(rows))
        if self.count_outbound_tcp and stats.outbound_tcp is None:
            stats.outbound_tcp = outbound_keys(rows)
        self.last = stats
        return rows


def monitor_of(
    sampler: FunctionSampler,
    store: Optional[HistoryStore] = None,
    interval: float = 1.0,
    logger: Optional[logging.Logger] = None,
    **options: Any,
) -> Monitor:
    """A :class:`Monitor` over a pipeline of the default settings and ``sampler``."""
    options.setdefault("active_opens", dict)
    pipeline = Pipeline(Settings(), sampler, store, clock=options.pop("clock", time.time))
    return Monitor(pipeline, interval, logger or logging.getLogger("test"), **options)
