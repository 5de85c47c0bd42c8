"""osquery core's SQL layer, for tests: extension tables as real SQLite virtual tables.

:class:`SqlCore` is :class:`osquery_core.CoreStandIn` (the Thrift plumbing, the launch as
osqueryd does it, core's registration rules) plus what osqueryd does between a query and the
extension, read from osquery 5.x's sources (``osquery/sql/virtual_table.cpp``,
``osquery/sql/sqlite_util.cpp``, ``osquery/sql/dynamic_table_row.cpp``,
``osquery/core/tables.cpp``, ``osquery/extensions/extensions.cpp``,
``osquery/extensions/interface.cpp``; see ``shared/reference/osquery-extension-notes.md``):

- **Virtual tables on real SQLite** (``apsw``, a test-only dependency).  ``xCreate`` asks the
  table for its columns and declares them as ``columnDefinition`` does (INDEX columns become
  the PRIMARY KEY, collations from the option bits); with ``--extensions_default_index`` (on)
  an extension column sent with op ``0`` is treated as INDEX.
- **xBestIndex**: a usable constraint on an INDEX/ADDITIONAL/REQUIRED column costs 1, anything
  else leaves the cost at 1,000,000; TEXT columns never take ``<``, ``<=``, ``>``, ``>=``
  (cost + 10); ``omit`` is never set (SQLite re-checks everything); an IN constraint is handed
  over all at once only on an OPTIMIZED column (osquery >= 5.14, ``sqlite3_vtab_in``), else
  SQLite calls xFilter once per value; a JOIN on an indexed column calls xFilter once per
  outer row.  A REQUIRED column without a constraint fails the query.
- **xFilter** sends ``{"action": "generate", "context": ...}``: constraints for every column,
  sorted by name, with the values as ``sqlite3_value_text`` gives them (empty and NULL values
  are left out, raw bytes of a BLOB pass as they are: rapidjson does not validate UTF-8);
  ``colsUsed`` and ``colsUsedBitset`` from SQLite's ``colUsed``.  osquery's op rewrite for IN
  is copied too: a second xFilter of the same plan sends no value for that constraint.
- **Values** as ``DynamicTableRow::get_column`` converts them: INTEGER ``std::stol`` base 0
  truncated to 32 bits, BIGINT and UNSIGNED BIGINT ``std::stoll`` base 0, DOUBLE ``strtod``
  over the whole string, unparsable -> NULL, ``""`` -> NULL except in TEXT; a key the row
  leaves out is NULL.
- **xUpdate** (INSERT, UPDATE, DELETE) sends ``insert``/``update``/``delete`` and expects
  exactly one row with a ``status`` key; ``readonly`` fails the statement with "table X may
  not be modified" (``apsw.ReadOnlyError``).
- **Calls**: every call opens a fresh connection to ``<socket>.<uuid>`` and pings it (10 s
  timeout), then opens another for the call (``--thrift_timeout``, 300 s).  A query runs on
  the primary database when it is free, else on a new database instance, which attaches every
  table again (two ``columns`` calls per extension table, as ``attachVirtualTables`` and
  ``xCreate`` make them).  A statement holds its instance's attach lock while it runs, and a
  registration attaches its tables under the primary's lock: it waits for the running query.
- **Core's watcher**: every ``extensions_interval`` each extension is pinged on a fresh
  connection (the first check waits up to ``extensions_timeout`` for a missing socket); one
  failed ping and its registration is dropped.  At exit, ``shutdown()`` to each extension.
- **Native tables** the README's and the pack's queries join with, with osquery's column
  options: ``processes`` (pid INDEX|OPTIMIZED, from psutil), ``process_open_sockets`` and
  ``listening_ports`` (psutil, this network namespace only), ``hash`` (path and directory
  REQUIRED) and ``osquery_extensions``.

Every query's cost is counted (:class:`QueryStats`): generate calls per table, the bytes of
the answers, and the memory core would hold for the biggest answer (:func:`core_bytes`).

What it cannot reproduce: osqueryd's scheduler, watchdog and worker process (the memory is
estimated, not measured); TEXT values that are not UTF-8 (apsw cannot carry them: the stand-in
passes such values as BLOBs, whose raw bytes reach a context the same way); osquery's own SQL
functions; the other native tables; cores older than 5.14 (IN on an OPTIMIZED column is one
call per value there, as on any column now).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import apsw
from osquery_core import (
    CoreStandIn,
    ExtensionConnection,
    Registration,
    Routes,
    Rows,
    _digests,
)

# osquery/core/sql/column.h
INDEX, REQUIRED, ADDITIONAL, OPTIMIZED, HIDDEN = 1, 2, 4, 8, 16
COLLATIONS = ((32, "BINARY"), (64, "NOCASE"), (128, "RTRIM"), (256, "VERSION"))
# osquery/core/tables.h: the ops core sends are SQLite's SQLITE_INDEX_CONSTRAINT_* values
EQUALS, GREATER_THAN, LESS_THAN_OR_EQUALS, LESS_THAN, GREATER_THAN_OR_EQUALS = 2, 4, 8, 16, 32
IN_OP = 3
ORDERING_OPS = frozenset({GREATER_THAN, LESS_THAN_OR_EQUALS, LESS_THAN, GREATER_THAN_OR_EQUALS})
MAX_INDEX_COST = 1_000_000.0

WATCHDOG_BYTES = 200 * 1000 * 1000
"""osqueryd's worker watchdog: ``--watchdog_memory_limit`` 200 (MB) at the default level."""

PING_TIMEOUT_S = 10.0
INITIALIZE_LATENCY_S = 0.02
"""kExtensionInitializeLatency: the poll step of extensionPathActive (its minimum is 10 steps)."""

_plan_ids = itertools.count()  # kConstraintIndexID: one counter for every table


# -- values ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.strtoll.restype = ctypes.c_longlong
_libc.strtoll.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
_libc.strtol.restype = ctypes.c_long
_libc.strtol.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
_libc.strtod.restype = ctypes.c_double
_libc.strtod.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]


def _c_parse(function: Callable[..., Any], text: str, *base: int) -> Tuple[Any, int, bytes]:
    """Call ``function`` (strtol, strtoll, strtod) on ``text``: (value, end offset, raw)."""
    raw = text.encode("utf-8", "surrogateescape")
    buffer = ctypes.create_string_buffer(raw)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = function(buffer, ctypes.byref(end), *base)
    offset = (ctypes.cast(end, ctypes.c_void_p).value or 0) - ctypes.addressof(buffer)
    return value, offset, raw


def std_stol(text: str) -> Optional[int]:
    """``tryTo<long>(text, 0)`` (``std::stol``): a prefix is enough; None when it throws."""
    value, offset, _ = _c_parse(_libc.strtol, text, 0)
    if offset == 0 or ctypes.get_errno() == errno.ERANGE:
        return None
    return int(value)


def std_stoll(text: str) -> Optional[int]:
    """``tryTo<long long>(text, 0)`` (``std::stoll``)."""
    value, offset, _ = _c_parse(_libc.strtoll, text, 0)
    if offset == 0 or ctypes.get_errno() == errno.ERANGE:
        return None
    return int(value)


def whole_strtod(text: str) -> Optional[float]:
    """``strtod`` that must consume the whole (C) string, as get_column checks it."""
    value, offset, raw = _c_parse(_libc.strtod, text)
    terminated = raw + b"\0"
    if offset == 0 or terminated[offset : offset + 1] != b"\0":
        return None
    return float(value)


def _as_int32(number: int) -> int:
    return ctypes.c_int32(number).value  # sqlite3_result_int(long) truncates


def sqlite_value(text: Optional[str], column_type: str) -> Any:
    """What ``DynamicTableRow::get_column`` hands SQLite for one cell of an extension's row.

    ``None`` is a key the row left out.  TEXT that UTF-8 cannot carry (undecodable bytes held
    as surrogates) goes to SQLite as a BLOB of the same bytes: apsw cannot make it TEXT.
    """
    if text is None:
        return None
    if column_type in ("TEXT", "BLOB"):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogateescape")
        return text
    if text == "":
        return None
    if column_type == "INTEGER":
        number = std_stol(text)
        return None if number is None else _as_int32(number)
    if column_type in ("BIGINT", "UNSIGNED BIGINT"):
        return std_stoll(text)
    if column_type == "DOUBLE":
        return whole_strtod(text)
    return None  # UNKNOWN_TYPE: core logs an error and sets no result


_text_of = apsw.Connection(":memory:")
_text_lock = threading.Lock()


def value_text(value: Any) -> Optional[str]:
    """``sqlite3_value_text`` of a constraint value, as a str (raw bytes as surrogates)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        with _text_lock:  # SQLite's own rendering of a REAL ("1.0", "1.0e+20")
            return str(_text_of.execute("SELECT CAST(? AS TEXT)", (value,)).fetchall()[0][0])
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _sqlite_order(value: Any) -> Tuple[int, Any]:
    """The order SQLite's IN-list index hands values out: NULL, numbers, text, blobs."""
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    return (3, value)


# -- what core holds for an answer ---------------------------------------------------------------

ROW_BYTES = 110
"""One row of a ``std::vector<std::map<std::string, std::string>>``: the map (48 bytes) and
the vector's growth slack.  With CELL_BYTES, 100,000 rows of 30 short strings make 347 MB,
what the reference notes measured with g++ and libstdc++."""
CELL_BYTES = 112
"""One map node (rb-tree header and a pair of SSO strings, 96 bytes) as malloc rounds it."""


def _heap(length: int) -> int:
    """Heap bytes of a libstdc++ string of ``length`` bytes (none up to 15: SSO)."""
    return 0 if length <= 15 else max(32, (length + 1 + 8 + 15) // 16 * 16)


def core_bytes(rows: Sequence[Mapping[str, str]]) -> int:
    """Bytes one copy of ``rows`` takes in osquery core (a ``PluginResponse``).

    ``ExtensionClient::call`` holds two copies at once (the Thrift response and the
    PluginResponse it copies into), so an answer costs core twice this.
    """
    total = 0
    for row in rows:
        total += ROW_BYTES
        for key, value in row.items():
            total += CELL_BYTES + _heap(len(key)) + _heap(len(value.encode("utf-8", "replace")))
    return total


# -- columns -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    options: int


def parse_routes(routes: Routes, default_index: bool) -> List[Column]:
    """Columns of a ``columns`` answer as xCreate keeps them (op read with ``tryTo<long>``)."""
    columns = []
    for route in routes:
        if route.get("id") != "column" or "name" not in route or "type" not in route:
            continue
        options = std_stol(route.get("op", "")) if route.get("op", "").strip() else None
        options = 0 if options is None else options
        if default_index and options == 0:
            options = INDEX
        columns.append(Column(route["name"], route["type"], options))
    return columns


def declaration(name: str, routes: Routes, is_extension: bool) -> str:
    """``CREATE TABLE`` as ``columnDefinition(response, true, is_extension)`` writes it."""
    parts, keys, indexed = [], [], False
    for column in parse_routes(routes, default_index=False):
        text = f"`{column.name}` {column.type}"
        if column.options & INDEX:
            indexed = True
        if column.options & (INDEX | ADDITIONAL):
            keys.append(column.name)
        if column.options & HIDDEN:
            text += " HIDDEN"
        for bit, collation in COLLATIONS:
            if column.options & bit:
                text += f" COLLATE {collation}"
                break
        parts.append(text)
    without_rowid = bool(keys) and not is_extension
    if not indexed and keys:
        keys = [column.name for column in parse_routes(routes, default_index=False)]
    if keys:
        parts.append("PRIMARY KEY (" + ", ".join(f"`{key}`" for key in keys) + ")")
    return (
        f"CREATE TABLE {name}("
        + ", ".join(parts)
        + ")"
        + (" WITHOUT ROWID" if without_rowid else "")
    )


# -- counting ----------------------------------------------------------------------------------


@dataclass
class QueryStats:
    """What one query cost, as core would see it."""

    generate: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    """generate calls per extension table."""
    native: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    """scans of core's own tables."""
    columns: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    """``columns`` calls per extension table (a new database instance asks again)."""
    updates: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    pings: int = 0
    rows_returned: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    response_bytes: Counter = field(default_factory=Counter)  # type: ignore[type-arg]
    """Thrift bytes of the answers, per table."""
    keys_returned: Dict[str, set] = field(default_factory=dict)  # type: ignore[type-arg]
    """Every key the rows of a table's answers carried."""
    largest_answer_core_bytes: int = 0
    """:func:`core_bytes` of the biggest answer, one copy (core holds two)."""
    contexts: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    """(table, parsed context) of every generate, in order."""
    seconds: float = 0.0
    transient_instance: bool = False


@dataclass
class QueryResult:
    rows: List[Dict[str, Any]]
    stats: QueryStats


# -- tables ------------------------------------------------------------------------------------


class _Source:
    """A table as core's registry reaches it."""

    name: str
    is_extension: bool

    def columns(self) -> Routes:
        raise NotImplementedError

    def generate(self, request: Dict[str, str], context: Dict[str, Any]) -> Rows:
        raise NotImplementedError

    def update(self, request: Dict[str, str]) -> Rows:
        raise apsw.ReadOnlyError(f"table {self.name} may not be modified")


class _ExtensionSource(_Source):
    """A table an extension registered: route info while it is attached, Thrift after."""

    is_extension = True

    def __init__(self, core: SqlCore, uuid: int, name: str, routes: Routes) -> None:
        self.core, self.uuid, self.name, self.routes = core, uuid, name, routes
        self.remote = False  # RegistryInterface: routes_ until external_ is set

    def columns(self) -> Routes:
        if not self.remote:
            return self.routes
        self.core._count(lambda stats: stats.columns.update([self.name]))
        code, message, rows = self.core.call_extension(
            self.uuid, "table", self.name, {"action": "columns"}
        )
        if code != 0:
            raise apsw.SQLError(message)
        return rows

    def generate(self, request: Dict[str, str], context: Dict[str, Any]) -> Rows:
        code, message, rows = self.core.call_extension(self.uuid, "table", self.name, request)
        if code != 0:
            raise apsw.SQLError(message or "SQL logic error")
        return rows

    def update(self, request: Dict[str, str]) -> Rows:
        self.core._count(lambda stats: stats.updates.update([self.name]))
        _code, _message, rows = self.core.call_extension(self.uuid, "table", self.name, request)
        return rows  # xUpdate looks at the rows only


class _NativeSource(_Source):
    """One of core's own tables, generated in-process."""

    is_extension = False

    def __init__(
        self, name: str, routes: Routes, generate: Callable[[Dict[str, Any]], Rows]
    ) -> None:
        self.name, self.routes, self._generate = name, routes, generate

    def columns(self) -> Routes:
        return self.routes

    def generate(self, request: Dict[str, str], context: Dict[str, Any]) -> Rows:
        return self._generate(context)


@dataclass
class _Plan:
    constraints: List[List[Any]]  # [column name, op], mutable as osquery's ConstraintSet
    cols_used: List[str]
    bitset: int


class _Module:
    def __init__(self, instance: _Instance, source: _Source) -> None:
        self.instance, self.source = instance, source

    def Create(self, connection: Any, module: str, database: str, name: str, *args: Any) -> Any:
        routes = self.source.columns()
        if not routes:
            raise apsw.SQLError(f"no columns for {name}")
        table = _Table(self.instance, self.source, routes)
        return declaration(self.source.name, routes, self.source.is_extension), table

    Connect = Create


class _Table:
    def __init__(self, instance: _Instance, source: _Source, routes: Routes) -> None:
        self.instance, self.source = instance, source
        self.columns = parse_routes(routes, default_index=source.is_extension)
        self.plans: Dict[int, _Plan] = {}
        instance.tables[source.name] = self

    def BestIndexObject(self, info: Any) -> bool:
        """osquery's xBestIndex (virtual_table.cpp)."""
        constraints: List[List[Any]] = []
        cost = MAX_INDEX_COST
        required_columns = required_constraints = False
        argv = 0
        for i in range(info.nConstraint):
            if not info.get_aConstraint_usable(i):
                continue
            index = info.get_aConstraint_iColumn(i)
            if index < 0 or index >= len(self.columns):
                continue
            column = self.columns[index]
            op = info.get_aConstraint_op(i)
            if column.type == "TEXT" and op in ORDERING_OPS:
                cost += 10
                continue
            if column.options & REQUIRED:
                required_constraints = True
                cost = 1
            elif column.options & (INDEX | ADDITIONAL):
                cost = 1
            else:
                continue
            if column.options & OPTIMIZED and info.get_aConstraintUsage_in(i):
                info.set_aConstraintUsage_in(i, True)
                op = IN_OP
            constraints.append([column.name, op])
            argv += 1
            info.set_aConstraintUsage_argvIndex(i, argv)
        used = set(info.colUsed)
        cols_used, bitset = [], 0
        for i, column in enumerate(self.columns):
            bit = min(i, 63)
            if bit in used:
                cols_used.append(column.name)
                bitset |= 1 << bit
                if column.options & REQUIRED:
                    required_columns = True
        if required_columns and not required_constraints:
            cost = MAX_INDEX_COST
        plan_id = next(_plan_ids) & 0x7FFFFFFF
        # colsUsed is an unordered_set in core: never the table's order.
        self.plans[plan_id] = _Plan(constraints, sorted(cols_used, reverse=True), bitset)
        info.idxNum = plan_id
        info.estimatedCost = cost
        return True

    def Open(self) -> _Cursor:
        return _Cursor(self)

    def Disconnect(self) -> None:
        self.instance.tables.pop(self.source.name, None)

    Destroy = Disconnect

    # xUpdate (only extension tables have it; SQLite's own message otherwise)

    def UpdateDeleteRow(self, rowid: int) -> None:
        self._update({"action": "delete", "id": str(rowid)})

    def UpdateInsertRow(self, rowid: Optional[int], fields: Sequence[Any]) -> Optional[int]:
        request = {"action": "insert", "json_value_array": self._values(fields)}
        if rowid is not None:
            request.update(auto_rowid="true", id=str(rowid))
        else:
            request["auto_rowid"] = "false"
        answer = self._update(request)
        if rowid is not None:
            return None
        new_id = std_stoll(answer.get("id", "")) if answer.get("id") else None
        if new_id is None:
            raise apsw.SQLError("SQL logic error")  # "The plugin did not return a row id"
        return new_id

    def UpdateChangeRow(self, row: int, newrowid: int, fields: Sequence[Any]) -> None:
        request = {"action": "update", "id": str(row), "json_value_array": self._values(fields)}
        if newrowid != row:
            request["new_id"] = str(newrowid)
        self._update(request)

    def _values(self, fields: Sequence[Any]) -> str:
        """serializeUpdateParameters: a JSON array, refused on a type mismatch."""
        values: List[Any] = []
        for column, value in zip(self.columns, fields):
            if isinstance(value, int) and column.type not in (
                "INTEGER",
                "BIGINT",
                "UNSIGNED BIGINT",
            ):
                raise apsw.MismatchError("datatype mismatch")
            if isinstance(value, float) and column.type != "DOUBLE":
                raise apsw.MismatchError("datatype mismatch")
            if isinstance(value, (str, bytes)) and column.type != (
                "TEXT" if isinstance(value, str) else "BLOB"
            ):
                raise apsw.MismatchError("datatype mismatch")
            if value is None and column.options in (INDEX, REQUIRED):
                raise apsw.MismatchError("datatype mismatch")
            values.append(value_text(value) if isinstance(value, bytes) else value)
        return json.dumps(values, ensure_ascii=False, separators=(",", ":"))

    def _update(self, request: Dict[str, str]) -> Dict[str, str]:
        if not self.source.is_extension:
            raise apsw.ReadOnlyError(f"table {self.source.name} may not be modified")
        request["context"] = json.dumps({"constraints": []}, separators=(",", ":"))
        rows = self.source.update(request)
        if len(rows) != 1 or "status" not in rows[0]:
            raise apsw.SQLError("SQL logic error")  # "Invalid response from the extension table"
        answer = rows[0]
        status = answer["status"]
        if status == "readonly":
            raise apsw.ReadOnlyError(f"table {self.source.name} may not be modified")
        if status == "failure":
            raise apsw.SQLError(answer.get("message", "SQL logic error"))
        if status == "constraint":
            raise apsw.ConstraintError("constraint failed")
        if status != "success":
            raise apsw.SQLError("SQL logic error")
        return answer


class _Cursor:
    def __init__(self, table: _Table) -> None:
        self.table = table
        self.rows: Rows = []
        self.row = 0

    def Filter(self, plan_id: int, _name: Any, arguments: Sequence[Any]) -> None:
        """osquery's xFilter: the context, then the rows."""
        table = self.table
        plan = table.plans[plan_id]
        constraints: Dict[str, Dict[str, Any]] = {
            column.name: {"list": [], "affinity": column.type} for column in table.columns
        }

        def add(name: str, op: int, value: Any, safe: bool) -> None:
            text = value_text(value)
            if text is None or (not safe and text == ""):
                return  # the column is unsafe to handle unexposed expression values
            constraints[name]["list"].append({"op": op, "expr": text})

        for index, argument in enumerate(arguments):
            constraint = plan.constraints[index]
            if constraint[1] == IN_OP:
                constraint[1] = EQUALS  # as osquery does, for good: a second xFilter differs
                for value in sorted(argument, key=_sqlite_order):
                    add(constraint[0], EQUALS, value, safe=True)
            elif isinstance(argument, (set, frozenset)):
                continue  # the IN list's handle: sqlite3_value_text gives NULL
            else:
                add(constraint[0], constraint[1], argument, safe=False)
        required = {c.name for c in table.columns if c.options & REQUIRED}
        if required and not any(name in required for name, _ in plan.constraints):
            raise apsw.ConstraintError(
                f"Table {table.source.name} was queried without a required column in the "
                "WHERE clause"
            )
        document = {
            "constraints": [{"name": name, **constraints[name]} for name in sorted(constraints)],
            "colsUsed": plan.cols_used,
            "colsUsedBitset": plan.bitset,
        }
        request = {
            "action": "generate",
            "context": json.dumps(document, ensure_ascii=False, separators=(",", ":")),
        }
        core = table.instance.core
        if table.source.is_extension:
            core._count(lambda stats: stats.generate.update([table.source.name]))
        else:
            core._count(lambda stats: stats.native.update([table.source.name]))
        core._count(lambda stats: stats.contexts.append((table.source.name, document)))
        self.rows = table.source.generate(request, document)
        self.row = 0

    def Eof(self) -> bool:
        return self.row >= len(self.rows)

    def Rowid(self) -> int:
        text = self.rows[self.row].get("rowid")
        if text is None:
            return self.row
        try:
            return int(text, 10)
        except ValueError:
            raise apsw.SQLError("SQL logic error") from None

    def Column(self, number: int) -> Any:
        if number == -1:
            return self.Rowid()
        column = self.table.columns[number]
        return sqlite_value(self.rows[self.row].get(column.name), column.type)

    def Next(self) -> None:
        self.row += 1

    def Close(self) -> None:
        self.rows = []


class _Instance:
    """One SQLite database with every table attached (SQLiteDBInstance)."""

    def __init__(self, core: SqlCore) -> None:
        self.core = core
        # No statement cache: osquery prepares every query anew (its plans are cleared after).
        self.db = apsw.Connection(":memory:", statementcachesize=0)
        self.attach_lock = threading.RLock()
        self.tables: Dict[str, _Table] = {}
        # Not osquery's: lets a test hold a query (and so the attach lock) for a while.
        self.db.create_scalar_function("stand_in_sleep", _sleep, 1)

    def attach(self, source: _Source) -> None:
        """attachTableInternal: create the module and the virtual table under the lock."""
        with self.attach_lock:
            self.db.create_module(
                source.name,
                _Module(self, source),
                use_bestindex_object=True,
                read_only=not source.is_extension,  # getVirtualTableModule: xUpdate if extension
            )
            self.db.execute(f"CREATE VIRTUAL TABLE temp.{source.name} USING {source.name}")

    def detach(self, name: str) -> None:
        with self.attach_lock:
            self.db.execute(f"DROP TABLE IF EXISTS temp.{name}")

    def run(self, sql: str, bindings: Sequence[Any]) -> List[Dict[str, Any]]:
        """queryInternal: the statement holds the attach lock while it runs."""
        with self.attach_lock:
            try:
                cursor = self.db.cursor()
                rows: List[Dict[str, Any]] = []
                names: Optional[List[str]] = None
                for values in cursor.execute(sql, tuple(bindings)):
                    if names is None:
                        names = [d[0] for d in cursor.getdescription()]
                    rows.append(dict(zip(names, values)))
                return rows
            finally:
                for table in self.tables.values():  # clearAffectedTables
                    table.plans.clear()

    def close(self) -> None:
        with contextlib.suppress(apsw.Error):
            self.db.close(True)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- core ----------------------------------------------------------------------------------------


class SqlCore(CoreStandIn):
    """osquery core with its SQL layer: launch the extension, then run SQL over its tables.

    ``extensions_interval`` and ``extensions_timeout`` are core's flags (seconds, what core
    would pass the extensions it launches too); ``thrift_timeout`` bounds each call.
    """

    def __init__(
        self,
        directory: Optional[str] = None,
        extensions_interval: float = 3.0,
        extensions_timeout: float = 3.0,
        thrift_timeout: float = 300.0,
    ) -> None:
        super().__init__(directory)
        self.extensions_interval = max(extensions_interval, 0.2)
        self.extensions_timeout = max(extensions_timeout, 0.2)
        self.thrift_timeout = thrift_timeout
        self._natives = native_tables(self)
        self.manager.builtin_tables = frozenset(self._natives)
        self.manager.attach = self._attach_extension_table
        self.manager.detach = self._detach_extension_table
        self._sources: Dict[str, _Source] = dict(self._natives)
        self._sources_lock = threading.Lock()
        self._primary = _Instance(self)
        self._primary_free = threading.Lock()  # SQLiteDBManager's mutex_ (try_to_lock)
        for source in self._natives.values():
            self._primary.attach(source)
        self._local = threading.local()
        self._stop_watching = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self.watch_pings = 0
        self.dropped: List[int] = []

    # lifecycle

    def start(self) -> SqlCore:
        super().start()
        self._watcher = threading.Thread(target=self._watch, name="core-watcher", daemon=True)
        self._watcher.start()
        return self

    def close(self) -> None:
        """Stop the watcher, ``shutdown()`` every extension (as core does at exit), then the
        base class's close (stop answering, kill what still runs)."""
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join(timeout=self.thrift_timeout)
        with self.manager.lock:
            registrations = list(self.manager.registrations.values())
        for reg in registrations:
            path = self.extension_socket(reg)
            with contextlib.suppress(Exception), ExtensionConnection(path, 5, 0) as extension:
                extension.shutdown()
        for process in self._processes:
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        super().close()
        self._primary.close()

    def __enter__(self) -> SqlCore:
        return self.start()

    # SQL

    def query(self, sql: str, bindings: Sequence[Any] = ()) -> QueryResult:
        """Run ``sql`` as core does and say what it cost; SQLite's errors (apsw) propagate."""
        stats = QueryStats()
        self._local.stats = stats
        started = time.perf_counter()
        try:
            if self._primary_free.acquire(blocking=False):
                try:
                    rows = self._primary.run(sql, bindings)
                finally:
                    self._primary_free.release()
            else:
                stats.transient_instance = True
                instance = self._new_instance()
                try:
                    rows = instance.run(sql, bindings)
                finally:
                    instance.close()
        finally:
            stats.seconds = time.perf_counter() - started
            self._local.stats = None
        return QueryResult(rows, stats)

    def _new_instance(self) -> _Instance:
        """A transient database (the primary is busy): every table attached again, each
        extension table asked for its columns twice (attachVirtualTables, then xCreate)."""
        instance = _Instance(self)
        with self._sources_lock:
            sources = list(self._sources.values())
        for source in sources:
            try:
                source.columns()
                instance.attach(source)
            except apsw.Error:
                continue  # attachVirtualTables skips a table whose columns failed
        return instance

    def _count(self, update: Callable[[QueryStats], None]) -> None:
        stats = getattr(self._local, "stats", None)
        if stats is not None:
            update(stats)

    # registration hooks (called by the manager under its registration)

    def _attach_extension_table(self, uuid: int, name: str, routes: Routes) -> None:
        source = _ExtensionSource(self, uuid, name, routes)
        self._primary.attach(source)  # waits for the statement that holds the lock
        source.remote = True
        with self._sources_lock:
            self._sources[name] = source

    def _detach_extension_table(self, name: str) -> None:
        with self._sources_lock:
            self._sources.pop(name, None)
        self._primary.detach(name)

    # calling an extension

    def call_extension(
        self, uuid: int, registry: str, item: str, request: Mapping[str, str]
    ) -> Tuple[int, str, Rows]:
        """callExtension: a fresh connection and a ping, then another for the call."""
        path = f"{self.socket_path}.{uuid}"
        if not self._ping(path, PING_TIMEOUT_S):
            return 1, f"Extension socket not available: {path}", []
        try:
            with ExtensionConnection(path, self.thrift_timeout, appear_within=0) as extension:
                response = extension.call(registry, item, request)
                received = extension.bytes_read
        except Exception as error:
            return 1, f"Extension call failed: {error}", []
        rows = list(response.response or [])
        if request.get("action") == "generate":
            copy = core_bytes(rows)

            def record(stats: QueryStats) -> None:
                stats.rows_returned.update({item: len(rows)})
                stats.response_bytes.update({item: received})
                stats.largest_answer_core_bytes = max(stats.largest_answer_core_bytes, copy)
                keys = stats.keys_returned.setdefault(item, set())
                for row in rows:
                    keys.update(row)

            self._count(record)
        status = response.status
        return (status.code if status else 1), (status.message if status else ""), rows

    def _ping(self, path: str, timeout: float) -> bool:
        if not os.path.exists(path):
            return False
        try:
            with ExtensionConnection(path, timeout, appear_within=0) as extension:
                extension.ping()
        except Exception:
            return False

        def record(stats: QueryStats) -> None:
            stats.pings += 1

        self._count(record)
        return True

    # core's ExtensionManagerWatcher

    def _watch(self) -> None:
        failures: Dict[int, int] = {}
        while True:
            with self.manager.lock:
                registrations = list(self.manager.registrations.values())
            for reg in registrations:
                path = self.extension_socket(reg)
                exists = os.path.exists(path)
                if not exists and failures.get(reg.uuid, 0) == 0:
                    exists = self._path_active(path)  # the first check may wait --timeout
                failures[reg.uuid] = 1
                status = None
                if exists:
                    try:
                        with ExtensionConnection(path, self.thrift_timeout, 0) as extension:
                            status = extension.ping()
                            self.watch_pings += 1
                    except Exception:
                        status = None
                if status is None or status.code != 0:
                    failures[reg.uuid] += 1
            for uuid, count in list(failures.items()):
                if count > 1:
                    with self.manager.lock:
                        reg_or_none = self.manager.registrations.get(uuid)
                    if reg_or_none is not None:
                        self.manager.remove(reg_or_none)
                        self.dropped.append(uuid)
                    failures[uuid] = 1
            if self._stop_watching.wait(self.extensions_interval):
                return

    def _path_active(self, path: str) -> bool:
        deadline = time.monotonic() + self.extensions_timeout
        while not self._stop_watching.is_set():
            if os.path.exists(path) and self._ping(path, PING_TIMEOUT_S):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(INITIALIZE_LATENCY_S)
        return False

    def registration_of(self, name: str = "egress_agent") -> Optional[Registration]:
        with self.manager.lock:
            for reg in self.manager.registrations.values():
                if reg.name == name:
                    return reg
        return None


# -- core's own tables ---------------------------------------------------------------------------


def _routes(*columns: Tuple[str, str, int]) -> Routes:
    return [{"id": "column", "name": n, "type": t, "op": str(op)} for n, t, op in columns]


def _equals(context: Dict[str, Any], column: str) -> Optional[List[str]]:
    for constraint in context["constraints"]:
        if constraint["name"] == column:
            values = [c["expr"] for c in constraint["list"] if c["op"] == EQUALS]
            return values or None
    return None


def native_tables(core: SqlCore) -> Dict[str, _Source]:
    """processes, process_open_sockets, listening_ports, hash, osquery_extensions."""
    tables: List[_Source] = [
        _NativeSource("processes", PROCESSES_ROUTES, _processes),
        _NativeSource("process_open_sockets", OPEN_SOCKETS_ROUTES, _open_sockets),
        _NativeSource("listening_ports", LISTENING_PORTS_ROUTES, _listening_ports),
        _NativeSource("hash", HASH_ROUTES, _hash),
        _NativeSource("osquery_extensions", EXTENSIONS_ROUTES, lambda context: _extensions(core)),
    ]
    return {table.name: table for table in tables}


PROCESSES_ROUTES = _routes(
    ("pid", "BIGINT", INDEX | OPTIMIZED), ("name", "TEXT", 0), ("path", "TEXT", 0),
    ("cmdline", "TEXT", 0), ("state", "TEXT", 0), ("cwd", "TEXT", 0), ("root", "TEXT", 0),
    ("uid", "BIGINT", 0), ("gid", "BIGINT", 0), ("euid", "BIGINT", 0), ("egid", "BIGINT", 0),
    ("on_disk", "INTEGER", 0), ("start_time", "BIGINT", 0), ("parent", "BIGINT", 0),
    ("pgroup", "BIGINT", 0), ("cgroup_path", "TEXT", 0),
)  # fmt: skip
OPEN_SOCKETS_ROUTES = _routes(
    ("pid", "INTEGER", ADDITIONAL), ("fd", "BIGINT", 0), ("socket", "BIGINT", 0),
    ("family", "INTEGER", 0), ("protocol", "INTEGER", 0), ("local_address", "TEXT", 0),
    ("remote_address", "TEXT", 0), ("local_port", "INTEGER", 0), ("remote_port", "INTEGER", 0),
    ("path", "TEXT", 0), ("state", "TEXT", 0), ("net_namespace", "TEXT", 0),
)  # fmt: skip
LISTENING_PORTS_ROUTES = _routes(
    ("pid", "INTEGER", 0), ("port", "INTEGER", 0), ("protocol", "INTEGER", 0),
    ("family", "INTEGER", 0), ("address", "TEXT", 0), ("fd", "BIGINT", 0),
    ("socket", "BIGINT", 0), ("path", "TEXT", 0), ("net_namespace", "TEXT", 0),
)  # fmt: skip
HASH_ROUTES = _routes(
    ("path", "TEXT", INDEX | REQUIRED | OPTIMIZED), ("directory", "TEXT", REQUIRED | OPTIMIZED),
    ("md5", "TEXT", 64), ("sha1", "TEXT", 64), ("sha256", "TEXT", 64),
)  # fmt: skip
EXTENSIONS_ROUTES = _routes(
    ("uuid", "BIGINT", 0), ("name", "TEXT", 0), ("version", "TEXT", 0),
    ("sdk_version", "TEXT", 0), ("path", "TEXT", 0), ("type", "TEXT", 0),
)  # fmt: skip


def _processes(context: Dict[str, Any]) -> Rows:
    import psutil

    wanted = _equals(context, "pid")
    if wanted is None:
        pids: List[int] = psutil.pids()
    else:
        pids = sorted({n for n in (std_stoll(v) for v in wanted) if n is not None})
    rows = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                uids, gids = process.uids(), process.gids()
                rows.append(
                    {
                        "pid": str(pid),
                        "name": process.name(),
                        "path": _or_empty(process.exe),
                        "cmdline": " ".join(process.cmdline()),
                        "state": process.status(),
                        "cwd": _or_empty(process.cwd),
                        "root": "",
                        "uid": str(uids.real),
                        "gid": str(gids.real),
                        "euid": str(uids.effective),
                        "egid": str(gids.effective),
                        "on_disk": "-1",
                        "start_time": str(int(process.create_time())),
                        "parent": str(process.ppid()),
                        "pgroup": str(os.getpgid(pid)),
                        "cgroup_path": "",
                    }
                )
        except (psutil.Error, OSError, ValueError):  # ValueError: a pid below 0
            continue
    return rows


def _or_empty(read: Callable[[], str]) -> str:
    import psutil

    try:
        return read()
    except (psutil.Error, OSError):
        return ""


def _inet_sockets() -> Iterator[Tuple[Any, str, str]]:
    """psutil's inet sockets of this namespace, with (inode, net namespace) when readable."""
    import psutil

    for conn in psutil.net_connections(kind="inet"):
        inode = namespace = ""
        if conn.pid:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{conn.pid}/fd/{conn.fd}")
                inode = link[len("socket:[") : -1] if link.startswith("socket:[") else ""
            with contextlib.suppress(OSError):
                namespace = os.readlink(f"/proc/{conn.pid}/ns/net")[len("net:[") : -1]
        yield conn, inode, namespace


def _open_sockets(context: Dict[str, Any]) -> Rows:
    import socket

    wanted = _equals(context, "pid")
    rows = []
    for conn, inode, namespace in _inet_sockets():
        pid = conn.pid if conn.pid else -1
        if wanted is not None and str(pid) not in wanted:
            continue
        rows.append(
            {
                "pid": str(pid),
                "fd": str(conn.fd),
                "socket": inode,
                "family": str(int(conn.family)),
                "protocol": "6" if conn.type == socket.SOCK_STREAM else "17",
                "local_address": conn.laddr.ip if conn.laddr else "",
                "remote_address": conn.raddr.ip if conn.raddr else "",
                "local_port": str(conn.laddr.port) if conn.laddr else "0",
                "remote_port": str(conn.raddr.port) if conn.raddr else "0",
                "path": "",
                "state": conn.status if conn.status != "NONE" else "",
                "net_namespace": namespace,
            }
        )
    return rows


def _listening_ports(context: Dict[str, Any]) -> Rows:
    import socket

    rows = []
    for conn, inode, namespace in _inet_sockets():
        tcp = conn.type == socket.SOCK_STREAM
        if (tcp and conn.status != "LISTEN") or (not tcp and conn.raddr):
            continue
        rows.append(
            {
                "pid": str(conn.pid or -1),
                "port": str(conn.laddr.port),
                "protocol": "6" if tcp else "17",
                "family": str(int(conn.family)),
                "address": conn.laddr.ip,
                "fd": str(conn.fd),
                "socket": inode,
                "path": "",
                "net_namespace": namespace,
            }
        )
    return rows


def _hash(context: Dict[str, Any]) -> Rows:
    paths = list(_equals(context, "path") or [])
    for directory in _equals(context, "directory") or []:
        with contextlib.suppress(OSError):
            paths += [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
    rows = []
    for path in paths:
        digests = _digests(path)
        if digests is not None:
            rows.append({"path": path, "directory": os.path.dirname(path), **digests})
    return rows


def _extensions(core: SqlCore) -> Rows:
    rows = [
        {
            "uuid": "0",
            "name": "core",
            "version": "5.12.1",
            "sdk_version": "0.0.0",
            "path": core.socket_path,
            "type": "core",
        }
    ]
    for uuid, info in sorted(core.manager.extensions().items()):
        rows.append(
            {
                "uuid": str(uuid),
                "name": info.name,
                "version": info.version,
                "sdk_version": info.sdk_version,
                "path": f"{core.socket_path}.{uuid}",
                "type": "extension",
            }
        )
    return rows
