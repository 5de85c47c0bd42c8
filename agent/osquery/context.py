"""The query context of a generate request: what core tells a table about the query.

``{"action": "generate", "context": "<JSON>"}`` carries the query context that
``osquery/sql/virtual_table.cpp`` serialises: every column with its constraint list.  Core 5.x
sends ``op`` as a number and ``list`` as an array; cores before 3.0 sent ``op`` as a string and
an unconstrained ``list`` as ``""``.  Both are accepted, as osquery-go does.  A context that
cannot be read raises :class:`ContextError`, whose message names the problem.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple


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


class QueryError(ValueError):
    """A query a table cannot answer (a constraint value it cannot read, say); the message
    says why, and core shows it as the query's error."""


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
