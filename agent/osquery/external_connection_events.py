"""``external_connection_events``: every external connection attempt the event sources saw.

The rows come from the running agent's bounded buffer (:class:`agent.pipeline.EventLog`), like
osquery's evented tables; ``time`` bounds and ``pid`` values are pushed down.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from agent.osquery import table
from agent.osquery.context import QueryContext
from agent.pipeline import EventLog
from agent.records import COLUMNS

EVENT_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("time", "BIGINT"),
    ("outcome", "TEXT"),
    ("closed_at", "BIGINT"),
    *COLUMNS,
)
"""A connection attempt: when (unix seconds), how it went (``pending``, ``established``,
``refused``, ``timeout`` for a connect; ``accepted``; ``sent`` for a UDP flow), when it closed
when it did, and the connection's columns."""

SPEC = table.make_spec(
    "external_connection_events",
    EVENT_COLUMNS,
    {"time": table.ColumnOptions.INDEX, "pid": table.INDEXED},
)
"""Every external connection attempt the kernel events saw (:mod:`agent.pipeline.feed`), kept in a
bounded buffer like osquery's evented tables; ``time`` constraints are pushed down."""


def rows(events: Optional[EventLog], context: QueryContext) -> List[table.Row]:
    """The connection attempts in the buffer (none when no event source runs), with ``time``
    bounds and ``pid`` values pushed down."""
    if events is None:
        return []
    since, until = context.bounds("time")
    pids = context.equal_integers("pid")
    columns = context.used(SPEC.column_names)
    found = []
    for event in events.rows(since, until):
        record = event.record()
        if pids is not None and record["pid"] not in pids:
            continue
        found.append(table.string_row(record, columns))
    return found


def make(inputs: table.TableInputs) -> table.Table:
    """The events table over the running agent's buffer (empty without event sources)."""
    events = inputs.events
    return table.Table(SPEC, lambda context: rows(events, context))


PLUGIN = table.TablePlugin(SPEC, make)
