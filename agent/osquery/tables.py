"""The rows of the extension's three tables, and the dispatch of a table plugin ``call``.

- ``external_connections``: a live sample at query time, both directions.  ``pid`` and
  ``remote_address`` are INDEX|OPTIMIZED columns, so core hands us ``WHERE pid = ...``,
  ``IN (...)`` (in one call) and JOINs on pid as EQUALS constraints: the sample is narrowed
  to those pids, the rows to those addresses.  Core's default index makes every other column
  an index too, so a JOIN on any column calls once per outer row: :class:`LiveSamples` serves
  such a burst of calls from one sample.  Other constraints are left to core, which
  re-applies them all.
- ``external_connection_history``: the history store (agent/history/), with ``pid``,
  ``last_seen``, ``open`` and ``direction`` pushed down, and each answer bounded to what
  core can hold (:data:`HISTORY_ANSWER_BUDGET`).
- ``egress_agent_info``: one row of health and coverage figures.

Every answer carries only the columns the query reads (``colsUsed``).  Writes (insert,
update, delete) are answered ``[{"status": "readonly"}]``, as osquery's ``TablePlugin``
does.  A request this module cannot serve gets a :class:`TableResult` with code 1 and a
message; nothing raises to the Thrift layer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from agent.history import HistoryStore, HistoryUnavailable
from agent.osquery import table, wire
from agent.osquery.table import ContextError, QueryContext, TableSpec
from agent.pipeline import EventLog, Monitor, Snapshot

Row = Dict[str, str]

log = logging.getLogger("egress_agent.extension")

WRITE_ACTIONS = frozenset({"insert", "update", "delete"})
READONLY: List[Row] = [{"status": "readonly"}]
"""osquery's ``TablePlugin`` answer to a write: core fails the statement with "table X may
not be modified" (osquery/sql/virtual_table.cpp, xUpdate)."""

REUSE_GAP_S = 1.0
"""A live sample serves the next call that arrives within this long after the previous call
ended: core calls once per outer row of a JOIN (and once per value of an IN list, before
osquery 5.14), back to back."""
REUSE_MAX_S = 10.0
"""... and never once it is this old, however long the burst of calls goes on."""

HISTORY_ANSWER_BUDGET = 40 * 1024 * 1024
"""Bytes one history answer may take in osquery core, as :func:`core_bytes` counts them.

Core holds an answer twice while it arrives (``ExtensionClient::call`` copies the Thrift
response into a second list of rows), and osqueryd's watchdog stops a worker above 200 MB
of memory by default and denylists the query that ran.  40 MiB, twice, leaves the worker
its own ~100 MB.  At the default ``history.max_rows`` (100,000) a query reading every row
of the table would need about 740 MB (measured through tests/sqlcore.py for the pack's hourly
query); the newest rows that fit are answered instead (about 11,000 for ``SELECT *``, 25,000
for the pack's hourly query), and the cut is logged.  A query that narrows by ``pid``,
``last_seen``, ``open`` or ``direction``, or reads fewer columns, reaches the rest.
"""
ROW_BYTES = 110
"""What one row costs core before its cells: a ``std::map`` in a vector with its slack."""
CELL_BYTES = 112
"""One cell: a map node holding two strings of up to 15 bytes (libstdc++, 64-bit)."""
HISTORY_CUT_LOG_S = 600.0


def core_bytes(row: Mapping[str, str]) -> int:
    """The bytes one row of an answer takes in osquery core (a ``std::map<std::string,
    std::string>``; strings longer than 15 bytes take a heap block of their own)."""
    total = ROW_BYTES
    for key, value in row.items():
        total += CELL_BYTES + _heap(len(key)) + _heap(len(value))
    return total


def _heap(length: int) -> int:
    return 0 if length <= 15 else (length + 24) // 16 * 16


@dataclass
class TableResult:
    """What a table plugin answers: status code (0 success, 1 failed), a message, the rows."""

    code: int
    message: str
    rows: Sequence[Row] = field(default_factory=list)
    """Rows as dicts, or already encoded for the wire (:class:`agent.osquery.wire.EncodedRows`:
    a sequence of dicts too, decoded on demand)."""

    @classmethod
    def failed(cls, message: str) -> TableResult:
        return cls(1, message)


@dataclass(frozen=True)
class AgentInfo:
    """The fixed part of ``egress_agent_info``."""

    version: str
    config_path: str
    sampling_interval: float
    history_path: str
    pid: int = field(default_factory=os.getpid)


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


class ExtensionTables:
    """The three tables over one :class:`Monitor` and one (optional) history store."""

    def __init__(
        self,
        monitor: Monitor,
        store: Optional[HistoryStore],
        info: AgentInfo,
        events: Optional[EventLog] = None,
    ) -> None:
        self._monitor = monitor
        self._store = store
        self._info = info
        self._events = events
        self._live_samples = LiveSamples(monitor.live)
        self._encoders: Dict[Tuple[str, ...], wire.RowEncoder] = {}
        self._generators: Dict[str, Callable[[QueryContext], Sequence[Row]]] = {
            table.EXTERNAL_CONNECTIONS.name: self._live,
            table.EXTERNAL_CONNECTION_HISTORY.name: self._history,
            table.EXTERNAL_CONNECTION_EVENTS.name: self._event_rows,
            table.EGRESS_AGENT_INFO.name: self._agent_info,
        }
        self.specs: Dict[str, TableSpec] = {spec.name: spec for spec in table.TABLES}
        self._last_cut_logged = float("-inf")

    def call(self, name: str, request: Mapping[str, str]) -> TableResult:
        """Answer one ``call("table", name, request)``."""
        spec = self.specs.get(name)
        if spec is None:
            return TableResult.failed(f"unknown table {name!r}")
        action = request.get("action")
        if action == "columns":
            return TableResult(0, "OK", spec.routes())
        if action in WRITE_ACTIONS:
            return TableResult(0, "OK", [dict(row) for row in READONLY])
        if action != "generate":
            return TableResult.failed(f"unknown action {action!r} for table {name}")
        try:
            context = table.parse_context(request.get("context"))
        except ContextError as error:
            return TableResult.failed(str(error))
        try:
            rows = self._generators[name](context)
        except HistoryUnavailable as error:
            return TableResult.failed(str(error))
        except Exception as error:  # the sampler's races and bugs become a failed query
            return TableResult.failed(f"{name}: {type(error).__name__}: {error}")
        return TableResult(0, "OK", rows)

    def _live(self, context: QueryContext) -> Sequence[Row]:
        pids = context.equal_integers("pid")
        addresses = context.equal_values("remote_address")
        if pids is not None and not pids:
            return []  # only values that are no integer: no row can match
        snapshot = self._live_samples.get(pids)
        columns = tuple(context.used(table.EXTERNAL_CONNECTIONS.column_names))
        return self._encoder(columns).encode_records(
            (
                connection
                for connection in snapshot.connections
                if (pids is None or connection.pid in pids)
                and (addresses is None or connection.remote_address in addresses)
            ),
            remember=pids is None and addresses is None,  # a full answer: the next one's rows
        )

    ENCODERS = 8
    """Column sets whose encoders (and kept rows) are held: queries read a few sets each."""

    def _encoder(self, columns: Tuple[str, ...]) -> wire.RowEncoder:
        encoder = self._encoders.get(columns)
        if encoder is None:
            if len(self._encoders) >= self.ENCODERS:
                self._encoders.pop(next(iter(self._encoders)))
            encoder = self._encoders[columns] = wire.RowEncoder(columns)
        return encoder

    def _history(self, context: QueryContext) -> List[Row]:
        if self._store is None:
            raise HistoryUnavailable("history is not kept (no history store configured)")
        columns = context.used(table.EXTERNAL_CONNECTION_HISTORY.column_names)
        pids = context.equal_integers("pid")
        opens = context.equal_integers("open")
        directions = context.equal_values("direction")
        since, until = context.bounds("last_seen")
        if (pids is not None and not pids) or (opens is not None and not opens & {0, 1}):
            return []
        if since is not None and until is not None and since > until:
            return []
        open_: Optional[bool] = None
        if opens is not None and len(opens & {0, 1}) == 1:
            open_ = 1 in opens
        cheapest = ROW_BYTES + len(columns) * CELL_BYTES
        limit = HISTORY_ANSWER_BUDGET // cheapest + 1
        records = self._store.query(
            columns=columns,
            since=since,
            until=until,
            pids=sorted(pids) if pids is not None else None,
            open_=open_,
            directions=sorted(directions) if directions is not None else None,
            limit=limit,
            newest_first=True,
        )
        rows: List[Row] = []
        spent = 0
        for record in records:  # newest first: a cut keeps the newest rows
            row = table.string_row(record, columns)
            spent += core_bytes(row)
            if spent > HISTORY_ANSWER_BUDGET:
                self._log_cut(len(rows))
                break
            rows.append(row)
        return rows

    def _log_cut(self, kept: int) -> None:
        now = time.monotonic()
        if now - self._last_cut_logged >= HISTORY_CUT_LOG_S:
            self._last_cut_logged = now
            log.warning(
                "external_connection_history: answered the newest %d rows only, as much as "
                "osquery core can hold under its memory watchdog; narrow the query (WHERE "
                "last_seen > ..., pid = ..., direction = ...) or read fewer columns to get the "
                "rest (logged at most every %d s)",
                kept,
                int(HISTORY_CUT_LOG_S),
            )

    def _event_rows(self, context: QueryContext) -> List[Row]:
        """The connection attempts in the buffer (none when kernel events do not run), with
        ``time`` bounds and ``pid`` values pushed down."""
        if self._events is None:
            return []
        since, until = context.bounds("time")
        pids = context.equal_integers("pid")
        columns = context.used(table.EXTERNAL_CONNECTION_EVENTS.column_names)
        rows = []
        for event in self._events.rows(since, until):
            record = event.record()
            if pids is not None and record["pid"] not in pids:
                continue
            rows.append(table.string_row(record, columns))
        return rows

    def _agent_info(self, context: QueryContext) -> List[Row]:
        stats = self._monitor.stats()
        store = self._store
        record: Dict[str, table.Cell] = {
            "version": self._info.version,
            "pid": self._info.pid,
            "config_path": self._info.config_path,
            "sampling_interval": float(self._info.sampling_interval),
            "samples_total": stats.samples_total,
            "last_sample_ms": stats.last_sample_ms,
            "sockets_seen": stats.sockets_seen,
            "namespaces_seen": stats.namespaces_seen,
            "history_rows": store.count() if store is not None else None,
            "history_path": self._info.history_path,
            "history_error": store.problem if store is not None else None,
            "started_at": stats.started_at,
            "tcp_active_opens": stats.tcp_active_opens,
            "outbound_tcp_seen": stats.outbound_tcp_seen,
            "dns_names": stats.dns_names,
            "dns_error": stats.dns_error,
            "events_source": stats.events_source,
            "events_lost": stats.events_lost,
            "events_error": stats.events_error,
            "history_head": store.head if store is not None else None,
        }
        return [table.string_row(record, context.used(table.EGRESS_AGENT_INFO.column_names))]
