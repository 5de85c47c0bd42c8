"""``egress_agent_info``: one row of health and coverage figures for this extension process.

The columns are defined once, in :data:`INFO_COLUMNS`; each value is read by its name from what
the extension says of itself (:class:`agent.osquery.table.AgentInfo`), from the monitor's figures
(:class:`agent.pipeline.Stats`) or from the history store (:data:`STORE_FIGURES`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

from agent.history import HistoryStore
from agent.osquery import table
from agent.osquery.context import QueryContext
from agent.pipeline import Stats

INFO_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("version", "TEXT"),
    ("pid", "INTEGER"),
    ("config_path", "TEXT"),
    ("sampling_interval", "DOUBLE"),
    ("samples_total", "BIGINT"),
    ("last_sample_ms", "DOUBLE"),
    ("sockets_seen", "BIGINT"),
    ("namespaces_seen", "INTEGER"),
    ("history_rows", "BIGINT"),
    ("history_path", "TEXT"),
    ("history_error", "TEXT"),
    ("started_at", "BIGINT"),
    ("tcp_active_opens", "BIGINT"),
    ("outbound_tcp_seen", "BIGINT"),
    ("dns_names", "BIGINT"),
    ("dns_error", "TEXT"),
    ("dns_namespaces_left_out", "BIGINT"),
    ("events_source", "TEXT"),
    ("events_lost", "BIGINT"),
    ("events_error", "TEXT"),
    ("history_head", "TEXT"),
)

SPEC = table.make_spec("egress_agent_info", INFO_COLUMNS)

STORE_FIGURES: Dict[str, Callable[[HistoryStore], table.Cell]] = {
    "history_rows": lambda store: store.count(),
    "history_error": lambda store: store.problem,
    "history_head": lambda store: store.head,
}
"""The columns read from the history store (empty without one)."""

NOT_SHOWN = frozenset({"last_error"})
"""Figures of the monitor the table leaves out (the last sampling error is logged instead)."""


def record(inputs: table.TableInputs, stats: Stats) -> Dict[str, table.Cell]:
    """The row's values by column name."""
    values: Dict[str, table.Cell] = {**dataclasses.asdict(inputs.info), **dataclasses.asdict(stats)}
    store = inputs.store
    for name, figure in STORE_FIGURES.items():
        values[name] = figure(store) if store is not None else None
    row: Dict[str, table.Cell] = {}
    for name, kind in INFO_COLUMNS:
        value = values[name]
        row[name] = float(value) if kind == "DOUBLE" and isinstance(value, int) else value
    return row


def rows(inputs: table.TableInputs, context: QueryContext) -> List[table.Row]:
    return [
        table.string_row(record(inputs, inputs.monitor.stats()), context.used(SPEC.column_names))
    ]


def make(inputs: table.TableInputs) -> table.Table:
    """The info table of the running agent."""
    return table.Table(SPEC, lambda context: rows(inputs, context))


PLUGIN = table.TablePlugin(SPEC, make)
