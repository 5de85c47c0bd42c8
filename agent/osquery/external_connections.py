"""``external_connections``: a live sample at query time, both directions.

``pid`` and ``remote_address`` are INDEX|OPTIMIZED columns, so core hands us ``WHERE pid = ...``,
``IN (...)`` (in one call) and JOINs on pid as EQUALS constraints: the sample is narrowed to
those pids, the rows to those addresses.  Core's default index makes every other column an
index too, so a JOIN on any column calls once per outer row: :class:`LiveSamples` serves such a
burst of calls from one sample.  Other constraints are left to core, which re-applies them all.
Rows are encoded straight from the records (:class:`agent.osquery.wire.RowEncoder`).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

from agent.osquery import table, wire
from agent.osquery.context import QueryContext
from agent.pipeline import Snapshot
from agent.records import COLUMNS

SPEC = table.make_spec(
    "external_connections",
    COLUMNS,
    {"pid": table.INDEXED, "remote_address": table.INDEXED},
)
"""One row per socket of a live sample (:class:`agent.records.Connection`).

Every other column is sent with op 0, which core's ``--extensions_default_index`` makes an
index too: a JOIN on any column may call generate once per outer row, which one live sample
serves (:class:`LiveSamples`)."""

REUSE_GAP_S = 1.0
"""A live sample serves the next call that arrives within this long after the previous call
ended: core calls once per outer row of a JOIN (and once per value of an IN list, before
osquery 5.14), back to back."""
REUSE_MAX_S = 10.0
"""... and never once it is this old, however long the burst of calls goes on."""


class LiveSamples:
    """Live samples for the calls of one query: a JOIN that calls per row costs one sample.

    A call takes a sample narrowed to its pids, or of everything, and remembers it.  A call
    that starts within :data:`REUSE_GAP_S` of the end of the previous one (a JOIN's next
    row, an IN list's next value) is answered from the remembered sample while that is
    younger than :data:`REUSE_MAX_S`; when the remembered sample is a narrowed one that
    lacks the pids asked for, the burst takes one sample of everything, which serves the
    rest of it.  Calls are serialised: a burst never takes two samples at once.
    """

    def __init__(self, sample: Callable[[Optional[FrozenSet[int]]], Snapshot]) -> None:
        self._sample = sample
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._snapshot: Optional[Snapshot] = None
        self._scope: Optional[FrozenSet[int]] = None  # pids of a narrowed sample; None: all
        self._taken_at = float("-inf")
        self._last_call_end = float("-inf")

    def get(self, pids: Optional[FrozenSet[int]]) -> Snapshot:
        """A sample holding at least ``pids`` (None: every pid)."""
        with self._lock:
            now = self._clock()
            in_burst = now - self._last_call_end <= REUSE_GAP_S
            fresh = now - self._taken_at <= REUSE_MAX_S
            try:
                if in_burst and fresh and self._snapshot is not None and self._covers(pids):
                    return self._snapshot
                scope = None if in_burst else pids
                snapshot = self._sample(scope)
                self._snapshot, self._scope, self._taken_at = snapshot, scope, self._clock()
                return snapshot
            finally:
                self._last_call_end = self._clock()

    def _covers(self, pids: Optional[FrozenSet[int]]) -> bool:
        if self._scope is None:
            return True
        return pids is not None and pids <= self._scope


class LiveTable:
    """The rows of one live sample, with the encoders of the column sets queries read."""

    ENCODERS = 8
    """Column sets whose encoders (and kept rows) are held: queries read a few sets each."""

    def __init__(self, sample: Callable[[Optional[FrozenSet[int]]], Snapshot]) -> None:
        self._live_samples = LiveSamples(sample)
        self._encoders: Dict[Tuple[str, ...], wire.RowEncoder] = {}

    def generate(self, context: QueryContext) -> Sequence[table.Row]:
        pids = context.equal_integers("pid")
        addresses = context.equal_values("remote_address")
        if pids is not None and not pids:
            return []  # only values that are no integer: no row can match
        snapshot = self._live_samples.get(pids)
        columns = tuple(context.used(SPEC.column_names))
        return self._encoder(columns).encode_records(
            (
                connection
                for connection in snapshot.connections
                if (pids is None or connection.pid in pids)
                and (addresses is None or connection.remote_address in addresses)
            ),
            remember=pids is None and addresses is None,  # a full answer: the next one's rows
        )

    def _encoder(self, columns: Tuple[str, ...]) -> wire.RowEncoder:
        encoder = self._encoders.get(columns)
        if encoder is None:
            if len(self._encoders) >= self.ENCODERS:
                self._encoders.pop(next(iter(self._encoders)))
            encoder = self._encoders[columns] = wire.RowEncoder(columns)
        return encoder


def make(inputs: table.TableInputs) -> table.Table:
    """The live table over the running agent's monitor."""
    return table.Table(SPEC, LiveTable(inputs.monitor.live).generate)


PLUGIN = table.TablePlugin(SPEC, make)
