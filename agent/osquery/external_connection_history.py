"""``external_connection_history``: what the running agent has seen, from the history store.

``pid``, ``last_seen``, ``open`` and ``direction`` are pushed down to the store, and each answer
is bounded to what core can hold (:data:`HISTORY_ANSWER_BUDGET`).
"""

from __future__ import annotations

import logging
import time
from typing import List, Mapping, Optional

from agent.history import HISTORY_COLUMNS, HistoryStore, HistoryUnavailable
from agent.osquery import table
from agent.osquery.context import QueryContext

log = logging.getLogger("egress_agent.extension")

SPEC = table.make_spec(
    "external_connection_history",
    HISTORY_COLUMNS,
    {
        "pid": table.INDEXED,
        "direction": table.INDEXED,
        "last_seen": table.ColumnOptions.INDEX,
        "open": table.ColumnOptions.INDEX,
    },
)
"""What the background sampler has seen (:mod:`agent.history`); the indexed columns are the
constraints pushed down to the store."""

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


class HistoryTable:
    """Answers of the history table from one store, with the cut logged at most every
    :data:`HISTORY_CUT_LOG_S`."""

    def __init__(self, store: Optional[HistoryStore]) -> None:
        self._store = store
        self._last_cut_logged = float("-inf")

    def generate(self, context: QueryContext) -> List[table.Row]:
        if self._store is None:
            raise HistoryUnavailable("history is not kept (no history store configured)")
        columns = context.used(SPEC.column_names)
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
        rows: List[table.Row] = []
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


def make(inputs: table.TableInputs) -> table.Table:
    """The history table over the running agent's store (a failed query without one)."""
    return table.Table(SPEC, HistoryTable(inputs.store).generate)


PLUGIN = table.TablePlugin(SPEC, make)
