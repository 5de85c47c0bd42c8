"""The extension's tables, listed once, and the answer to a table plugin ``call``.

:data:`TABLES` names every table the extension serves, one line each (a module per table: see
:mod:`agent.osquery.table`).  :class:`ExtensionTables` answers core's ``call("table", name,
request)``: ``columns`` with the routes, ``generate`` with the rows of the columns the query
reads (``colsUsed``).  Writes (insert, update, delete) are answered ``[{"status": "readonly"}]``,
as osquery's ``TablePlugin`` does.  A request it cannot serve gets a :class:`TableResult` with
code 1 and a message; nothing raises to the Thrift layer.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from agent.history import HistoryStore, HistoryUnavailable
from agent.osquery import (
    egress_agent_audit,
    egress_agent_info,
    external_connection_events,
    external_connection_history,
    external_connections,
)
from agent.osquery.context import ContextError, QueryError, parse_context
from agent.osquery.table import (
    AgentInfo,
    Row,
    Table,
    TableInputs,
    TablePlugin,
    TableResult,
    TableSpec,
)
from agent.osquery.table import registry as table_registry
from agent.pipeline import EventLog, Monitor

TABLES: Sequence[TablePlugin] = (
    external_connections.PLUGIN,
    external_connection_history.PLUGIN,
    external_connection_events.PLUGIN,
    egress_agent_audit.PLUGIN,
    egress_agent_info.PLUGIN,
)
"""Every table the extension serves, in the order core lists them."""


def registry(plugins: Sequence[TablePlugin] = TABLES) -> Dict[str, Dict[str, List[Row]]]:
    """What ``registerExtension`` broadcasts for ``plugins``: ``{"table": {name: routes}}``."""
    return table_registry([plugin.spec for plugin in plugins])


WRITE_ACTIONS = frozenset({"insert", "update", "delete"})
READONLY: List[Row] = [{"status": "readonly"}]
"""osquery's ``TablePlugin`` answer to a write: core fails the statement with "table X may
not be modified" (osquery/sql/virtual_table.cpp, xUpdate)."""


class ExtensionTables:
    """The extension's tables over one running agent: its monitor, store, events and info."""

    def __init__(
        self,
        monitor: Monitor,
        store: Optional[HistoryStore],
        info: AgentInfo,
        events: Optional[EventLog] = None,
        tables: Sequence[TablePlugin] = TABLES,
    ) -> None:
        inputs = TableInputs(monitor, store, info, events)
        self.tables: Dict[str, Table] = {}
        for plugin in tables:
            made = plugin.make(inputs)
            self.tables[made.name] = made
        self.specs: Dict[str, TableSpec] = {name: t.spec for name, t in self.tables.items()}

    def call(self, name: str, request: Mapping[str, str]) -> TableResult:
        """Answer one ``call("table", name, request)``."""
        found = self.tables.get(name)
        if found is None:
            return TableResult.failed(f"unknown table {name!r}")
        action = request.get("action")
        if action == "columns":
            return TableResult(0, "OK", found.spec.routes())
        if action in WRITE_ACTIONS:
            return TableResult(0, "OK", [dict(row) for row in READONLY])
        if action != "generate":
            return TableResult.failed(f"unknown action {action!r} for table {name}")
        try:
            context = parse_context(request.get("context"))
        except ContextError as error:
            return TableResult.failed(str(error))
        try:
            rows = found.generate(context)
        except (HistoryUnavailable, QueryError) as error:
            return TableResult.failed(str(error))
        except Exception as error:  # the sampler's races and bugs become a failed query
            return TableResult.failed(f"{name}: {type(error).__name__}: {error}")
        return TableResult(0, "OK", rows)
