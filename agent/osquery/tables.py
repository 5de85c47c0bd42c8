"""The rows of the extension's three tables, and the dispatch of a table plugin ``call``.

- ``external_connections``: a live sample at query time, both directions.  ``pid`` and
  ``remote_address`` are INDEX columns, so core hands us ``WHERE pid = ...``, ``IN (...)`` and
  JOINs on pid as EQUALS constraints: the sample is narrowed to those pids, the rows to those
  addresses.  Other constraints are left to core, which re-applies them all.
- ``external_connection_history``: the history store (agent/history.py).
- ``egress_agent_info``: one row of health and coverage figures.

A request this module cannot serve gets a :class:`TableResult` with code 1 and a message;
nothing raises to the Thrift layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

from agent.history import HistoryStore, HistoryUnavailable
from agent.osquery import table, wire
from agent.osquery.table import ContextError, QueryContext, TableSpec
from agent.pipeline import Monitor

Row = Dict[str, str]


@dataclass
class TableResult:
    """What a table plugin answers: status code (0 success, 1 failed), a message, the rows
    (dicts, or :class:`wire.EncodedRows` already in Thrift's binary form)."""

    code: int
    message: str
    rows: Sequence[Row] = field(default_factory=list)

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


class ExtensionTables:
    """The three tables over one :class:`Monitor` and one (optional) history store."""

    def __init__(self, monitor: Monitor, store: Optional[HistoryStore], info: AgentInfo) -> None:
        self._monitor = monitor
        self._store = store
        self._info = info
        self._live_rows = wire.RowEncoder(table.EXTERNAL_CONNECTIONS.column_names)
        self._history_rows = wire.RowEncoder(table.EXTERNAL_CONNECTION_HISTORY.column_names)
        self._generators: Dict[str, Callable[[QueryContext], Sequence[Row]]] = {
            table.EXTERNAL_CONNECTIONS.name: self._live,
            table.EXTERNAL_CONNECTION_HISTORY.name: self._history,
            table.EGRESS_AGENT_INFO.name: self._agent_info,
        }
        self.specs: Dict[str, TableSpec] = {spec.name: spec for spec in table.TABLES}

    def call(self, name: str, request: Mapping[str, str]) -> TableResult:
        """Answer one ``call("table", name, request)``."""
        spec = self.specs.get(name)
        if spec is None:
            return TableResult.failed(f"unknown table {name!r}")
        action = request.get("action")
        if action == "columns":
            return TableResult(0, "OK", spec.routes())
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
        snapshot = self._monitor.live(pids)
        return self._live_rows.encode_records(
            (
                connection
                for connection in snapshot.connections
                if (pids is None or connection.pid in pids)
                and (addresses is None or connection.remote_address in addresses)
            ),
            remember=pids is None and addresses is None,  # a full answer: the next one's rows
        )

    def _history(self, context: QueryContext) -> Sequence[Row]:
        if self._store is None:
            raise HistoryUnavailable("history is not kept (no history store configured)")
        return self._history_rows.encode_mappings(self._store.rows())

    def _agent_info(self, context: QueryContext) -> Sequence[Row]:
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
        }
        return [table.string_row(record, table.EGRESS_AGENT_INFO.column_names)]
