"""osquery table plugins as data: column routes with option bits, query contexts, string rows.

What osquery core expects of an extension's table plugin (osquery 5.x):

- ``{"action": "columns"}`` answers one route per column, ``{"id": "column", "name", "type",
  "op"}``, where ``op`` is the ColumnOptions bitmask of ``osquery/core/sql/column.h``.  Core
  forwards WHERE constraints only on INDEX/REQUIRED/ADDITIONAL columns, so the bits decide
  which queries can be narrowed before rows are made.  (osquery-python always sends ``"0"``;
  osquery-go's ``plugin/table`` computes the mask, and so do we.)
- ``{"action": "generate", "context": "<JSON>"}`` carries the query context that
  ``osquery/sql/virtual_table.cpp`` serialises: every column with its constraint list.  Core
  5.x sends ``op`` as a number and ``list`` as an array; cores before 3.0 sent ``op`` as a
  string and an unconstrained ``list`` as ``""``.  Both are accepted, as osquery-go does.
- Every value of a row is a string (``ExtensionPluginResponse`` is a list of string maps);
  core converts by column type and re-applies every constraint to what it gets back, so
  pushing a constraint down narrows work, it never decides correctness.

This module knows nothing of sampling: :mod:`agent.osquery.tables` makes the rows.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from agent.history import HISTORY_COLUMNS
from agent.records import COLUMNS
from agent.textsafe import utf8_safe

Cell = Union[str, int, float, bool, None]
"""A value before it becomes a string: what records, the history store and stats hold."""


class ColumnOptions(enum.IntFlag):
    """``osquery::ColumnOptions`` (osquery/core/sql/column.h)."""

    DEFAULT = 0
    INDEX = 1
    REQUIRED = 2
    ADDITIONAL = 4
    OPTIMIZED = 8
    HIDDEN = 16


class Operator(enum.IntEnum):
    """``osquery::ConstraintOperator`` (osquery/core/tables.h), the ``op`` of a constraint."""

    UNIQUE = 1
    EQUALS = 2
    IN = 3
    GREATER_THAN = 4
    LESS_THAN_OR_EQUALS = 8
    LESS_THAN = 16
    GREATER_THAN_OR_EQUALS = 32
    MATCH = 64
    LIKE = 65
    GLOB = 66
    REGEXP = 67


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

EXTERNAL_CONNECTIONS = make_spec(
    "external_connections",
    COLUMNS,
    {"pid": INDEXED, "remote_address": INDEXED},
)
"""The live table: one row per socket of a live sample (agent.records.Connection).

Every other column is sent with op 0, which core's ``--extensions_default_index`` makes an
index too: a JOIN on any column may call generate once per outer row, which one live sample
serves (agent.osquery.tables.LiveSamples)."""

EXTERNAL_CONNECTION_HISTORY = make_spec(
    "external_connection_history",
    HISTORY_COLUMNS,
    {
        "pid": INDEXED,
        "direction": INDEXED,
        "last_seen": ColumnOptions.INDEX,
        "open": ColumnOptions.INDEX,
    },
)
"""What the background sampler has seen (agent.history); the indexed columns are the
constraints pushed down to the store."""

EVENT_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("time", "BIGINT"),
    ("outcome", "TEXT"),
    ("closed_at", "BIGINT"),
    *COLUMNS,
)
"""A connection attempt: when (unix seconds), how it went (``pending``, ``established``,
``refused``, ``timeout`` for a connect; ``accepted``; ``sent`` for a UDP flow), when it closed
when it did, and the connection's columns."""

EXTERNAL_CONNECTION_EVENTS = make_spec(
    "external_connection_events",
    EVENT_COLUMNS,
    {"time": ColumnOptions.INDEX, "pid": INDEXED},
)
"""Every external connection attempt the kernel events saw (agent.pipeline.feed), kept in a
bounded buffer like osquery's evented tables; ``time`` constraints are pushed down."""

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
    ("events_source", "TEXT"),
    ("events_lost", "BIGINT"),
    ("events_error", "TEXT"),
    ("history_head", "TEXT"),
)

EGRESS_AGENT_INFO = make_spec("egress_agent_info", INFO_COLUMNS)
"""One row of health and coverage figures for this extension process."""

TABLES: Tuple[TableSpec, ...] = (
    EXTERNAL_CONNECTIONS,
    EXTERNAL_CONNECTION_HISTORY,
    EXTERNAL_CONNECTION_EVENTS,
    EGRESS_AGENT_INFO,
)


def registry(tables: Sequence[TableSpec] = TABLES) -> Dict[str, Dict[str, List[Dict[str, str]]]]:
    """What ``registerExtension`` broadcasts: ``{"table": {table name: routes}}``."""
    return {"table": {spec.name: spec.routes() for spec in tables}}


# -- query contexts ---------------------------------------------------------------------------


class ContextError(ValueError):
    """The ``context`` of a generate request cannot be read; the message names the problem."""


@dataclass(frozen=True)
class Constraint:
    op: int
    expr: str


@dataclass
class QueryContext:
    """The parts of osquery's ``QueryContext`` a table can use to narrow its work."""

    constraints: Dict[str, List[Constraint]] = field(default_factory=dict)
    columns_used: Optional[List[str]] = None

    def equal_values(self, column: str) -> Optional[FrozenSet[str]]:
        """The values an EQUALS or IN constraint allows for ``column``; None when unconstrained.

        Core expands ``col IN (a, b)`` into one EQUALS constraint per value, and a JOIN into one
        generate call per outer row, so several values form a union.  A union is never narrower
        than what the query asks for, and core re-applies the constraints to the rows.
        """
        values = [
            constraint.expr
            for constraint in self.constraints.get(column, ())
            if constraint.op in (Operator.EQUALS, Operator.IN)
        ]
        return frozenset(values) if values else None

    def bounds(self, column: str) -> Tuple[Optional[int], Optional[int]]:
        """(lowest, highest) integer ``column`` can hold under its ``=``, ``>``, ``>=``, ``<``,
        ``<=`` constraints; None where unbounded, or where a value is no number (SQLite
        orders every number before every text, so a text bound is left to core)."""
        low: Optional[int] = None
        high: Optional[int] = None
        for constraint in self.constraints.get(column, ()):
            number = _sqlite_number(constraint.expr)
            if number is None:
                continue
            floor, ceiling = math.floor(number), math.ceil(number)
            if constraint.op in (Operator.EQUALS, Operator.GREATER_THAN_OR_EQUALS):
                low = max(low, ceiling) if low is not None else ceiling
            if constraint.op == Operator.GREATER_THAN:
                above = floor + 1
                low = max(low, above) if low is not None else above
            if constraint.op in (Operator.EQUALS, Operator.LESS_THAN_OR_EQUALS):
                high = min(high, floor) if high is not None else floor
            if constraint.op == Operator.LESS_THAN:
                below = ceiling - 1
                high = min(high, below) if high is not None else below
        return low, high

    def used(self, columns: Sequence[str]) -> List[str]:
        """The ``columns`` the query reads (``colsUsed``), in table order; all when core did
        not say.  Core reads no other key of a row (a missing key is NULL to it)."""
        if self.columns_used is None:
            return list(columns)
        wanted = set(self.columns_used)
        return [name for name in columns if name in wanted]

    def equal_integers(self, column: str) -> Optional[FrozenSet[int]]:
        """:meth:`equal_values` for an INTEGER column: values that are no integer match no row."""
        values = self.equal_values(column)
        if values is None:
            return None
        return frozenset(number for number in map(_sqlite_integer, values) if number is not None)


def _sqlite_number(text: str) -> Optional[float]:
    """``text`` as a finite number the way SQLite's numeric affinity reads it, else None."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return number


def _sqlite_integer(text: str) -> Optional[int]:
    """``text`` as SQLite's INTEGER affinity reads it (`` 12``, ``+12``, ``12.0``), else None."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")) or not number.is_integer():
        return None
    return int(number)


def parse_context(text: Optional[str]) -> QueryContext:
    """Read the JSON query context of a generate request.

    ``None`` (a request without a context) means no constraints.  Anything else that is not
    the shape osquery sends raises :class:`ContextError` with a message naming the part that
    is wrong; nothing else escapes.
    """
    if text is None:
        return QueryContext()
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ContextError(f"query context is not valid JSON: {_brief(error)}") from None
    if not isinstance(document, dict):
        raise ContextError(
            f"query context must be a JSON object, not {_json_kind(document)}"
        ) from None
    constraints: Dict[str, List[Constraint]] = {}
    raw_lists = document.get("constraints", [])
    if not isinstance(raw_lists, list):
        raise ContextError(
            f"query context: constraints must be a list, not {_json_kind(raw_lists)}"
        )
    for index, raw in enumerate(raw_lists):
        where = f"query context: constraints[{index}]"
        if not isinstance(raw, dict):
            raise ContextError(f"{where} must be an object, not {_json_kind(raw)}")
        name = raw.get("name")
        if not isinstance(name, str):
            raise ContextError(f"{where}.name must be a string, not {_json_kind(name)}")
        constraints.setdefault(name, []).extend(_parse_list(raw.get("list", []), f"{where}.list"))
    columns_used = document.get("colsUsed")
    if columns_used is not None and not (
        isinstance(columns_used, list) and all(isinstance(c, str) for c in columns_used)
    ):
        raise ContextError("query context: colsUsed must be a list of column names")
    return QueryContext(constraints=constraints, columns_used=columns_used)


def _parse_list(raw: Any, where: str) -> List[Constraint]:
    if isinstance(raw, str):
        # osquery < 3.0 sent an unconstrained column's list as "".
        return []
    if not isinstance(raw, list):
        raise ContextError(f"{where} must be a list, not {_json_kind(raw)}")
    constraints = []
    for index, item in enumerate(raw):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ContextError(f"{here} must be an object, not {_json_kind(item)}")
        constraints.append(
            Constraint(op=_parse_op(item.get("op"), here), expr=_parse_expr(item, here))
        )
    return constraints


def _parse_op(raw: Any, where: str) -> int:
    if isinstance(raw, bool):
        raise ContextError(f"{where}.op must be an operator number, not a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):  # osquery < 3.0: "2"
        try:
            return int(raw)
        except ValueError:
            pass
        raise ContextError(f"{where}.op must be an operator number, not {raw[:40]!r}")
    raise ContextError(f"{where}.op must be an operator number, not {_json_kind(raw)}")


def _parse_expr(item: Mapping[str, Any], where: str) -> str:
    raw = item.get("expr")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise ContextError(f"{where}.expr must be a string, not {_json_kind(raw)}")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _brief(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


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
