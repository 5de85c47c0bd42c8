"""What an osquery table plugin is: a :class:`Table` value (its spec and its generate), column
routes with option bits, string rows.

What osquery core expects of an extension's table plugin (osquery 5.x):

- ``{"action": "columns"}`` answers one route per column, ``{"id": "column", "name", "type",
  "op"}``, where ``op`` is the ColumnOptions bitmask of ``osquery/core/sql/column.h``.  Core
  forwards WHERE constraints only on INDEX/REQUIRED/ADDITIONAL columns, so the bits decide
  which queries can be narrowed before rows are made.  (osquery-python always sends ``"0"``;
  osquery-go's ``plugin/table`` computes the mask, and so do we.)
- ``{"action": "generate", "context": "<JSON>"}`` carries the query context
  (:mod:`agent.osquery.context`).
- Every value of a row is a string (``ExtensionPluginResponse`` is a list of string maps);
  core converts by column type and re-applies every constraint to what it gets back, so
  pushing a constraint down narrows work, it never decides correctness.

A table is one value, as in osquery-go's ``plugin/table``: a module per table
(``agent/osquery/external_connections.py`` and its siblings) holds its :class:`TableSpec` and a
``make(inputs)`` that returns the :class:`Table`; :mod:`agent.osquery.dispatch` lists them and
answers core's calls.  This module knows nothing of sampling.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from agent.osquery.context import QueryContext
from agent.textsafe import utf8_safe

if TYPE_CHECKING:
    from agent.history import HistoryStore
    from agent.pipeline import EventLog, Monitor

Cell = Union[str, int, float, bool, None]
"""A value before it becomes a string: what records, the history store and stats hold."""
Row = Dict[str, str]
"""A row as core wants it: every value a string."""


class ColumnOptions(enum.IntFlag):
    """``osquery::ColumnOptions`` (osquery/core/sql/column.h)."""

    DEFAULT = 0
    INDEX = 1
    REQUIRED = 2
    ADDITIONAL = 4
    OPTIMIZED = 8
    HIDDEN = 16


COLUMN_TYPES = frozenset({"TEXT", "INTEGER", "BIGINT", "UNSIGNED BIGINT", "DOUBLE", "BLOB"})
"""The type names core accepts in a route (``osquery/core/sql/column.cpp``)."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    options: ColumnOptions = ColumnOptions.DEFAULT

    def route(self) -> Dict[str, str]:
        """This column as a ``columns`` route: all four values are strings."""
        return {"id": "column", "name": self.name, "type": self.type, "op": str(int(self.options))}


@dataclass(frozen=True)
class TableSpec:
    """A table's name and columns, in the order ``SELECT *`` shows them."""

    name: str
    columns: Tuple[Column, ...]

    def routes(self) -> List[Dict[str, str]]:
        return [column.route() for column in self.columns]

    @property
    def column_names(self) -> List[str]:
        return [column.name for column in self.columns]


def make_spec(
    name: str,
    columns: Sequence[Tuple[str, str]],
    options: Optional[Mapping[str, ColumnOptions]] = None,
) -> TableSpec:
    """A :class:`TableSpec` from ``(name, type)`` pairs, with option bits for some columns."""
    options = options or {}
    unknown = set(options) - {name for name, _ in columns}
    if unknown:
        raise ValueError(f"table {name}: options for unknown columns {sorted(unknown)}")
    for column_name, column_type in columns:
        if column_type not in COLUMN_TYPES:
            raise ValueError(f"table {name}: column {column_name} has unknown type {column_type}")
    return TableSpec(
        name=name,
        columns=tuple(
            Column(column_name, column_type, options.get(column_name, ColumnOptions.DEFAULT))
            for column_name, column_type in columns
        ),
    )


INDEXED = ColumnOptions.INDEX | ColumnOptions.OPTIMIZED
"""What osquery's own ``processes.pid`` is: an index whose ``IN (...)`` comes in one call
(``sqlite3_vtab_in``, osquery 5.14 and later) instead of one call per value."""


def registry(specs: Sequence[TableSpec]) -> Dict[str, Dict[str, List[Dict[str, str]]]]:
    """What ``registerExtension`` broadcasts: ``{"table": {table name: routes}}``."""
    return {"table": {spec.name: spec.routes() for spec in specs}}


# -- tables as values --------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    """What the extension says of itself in ``egress_agent_info`` (the part that never moves)."""

    version: str
    config_path: str
    sampling_interval: float
    history_path: str
    pid: int = field(default_factory=os.getpid)


@dataclass(frozen=True)
class TableInputs:
    """What the extension's tables are made from: the running agent's monitor (live samples and
    figures), its history store, its events buffer, and what it says of itself."""

    monitor: Monitor
    store: Optional[HistoryStore]
    info: AgentInfo
    events: Optional[EventLog] = None


@dataclass(frozen=True)
class Table:
    """One table plugin: its spec (name, columns) and the function that makes its rows.

    ``generate`` may raise :class:`QueryError` (or :class:`agent.history.HistoryUnavailable`):
    the query fails with that message; anything else fails it naming the exception."""

    spec: TableSpec
    generate: Callable[[QueryContext], Sequence[Row]]

    @property
    def name(self) -> str:
        return self.spec.name


class TablePlugin(NamedTuple):
    """A table as the extension registers it: its spec, and how to make it for a running agent
    (each table module's ``PLUGIN``; :data:`agent.osquery.dispatch.TABLES` lists them)."""

    spec: TableSpec
    make: Callable[[TableInputs], Table]


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


# -- rows --------------------------------------------------------------------------------------


def cell(value: Cell) -> str:
    """One value as osquery wants it: a string; missing is ``""`` (never ``"None"``), booleans 1/0.

    Text that cannot be encoded as UTF-8 (a process name with undecodable bytes, which Python
    holds as lone surrogates) is backslash-escaped, since Thrift would refuse the whole response.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return utf8_safe(value)


def string_row(record: Mapping[str, Any], columns: Sequence[str]) -> Dict[str, str]:
    """A row for ``columns``: every column present, every value a string."""
    return {name: cell(record.get(name)) for name in columns}
