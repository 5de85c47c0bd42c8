"""The stand-in's own rules, checked against what osquery's sources say (tests/sqlcore.py)."""

from __future__ import annotations

from typing import Any

import pytest
from osquery.extensions.ttypes import InternalExtensionInfo
from sqlcore import SqlCore, core_bytes, declaration, sqlite_value, value_text

ROUTES = [{"id": "column", "name": "a", "type": "TEXT", "op": "0"}]


@pytest.mark.parametrize(
    ("text", "column_type", "expected"),
    [
        ("12", "INTEGER", 12),
        (" 12abc", "INTEGER", 12),  # std::stol: leading blanks, a prefix is enough
        ("0x10", "INTEGER", 16),  # base 0
        ("010", "INTEGER", 8),
        ("2147483648", "INTEGER", -2147483648),  # sqlite3_result_int truncates to 32 bits
        ("abc", "INTEGER", None),
        ("99999999999999999999", "BIGINT", None),  # out of range: NULL
        ("1e3", "BIGINT", 1),
        ("", "BIGINT", None),
        ("1.5", "DOUBLE", 1.5),
        ("1.5x", "DOUBLE", None),  # strtod over the whole string
        ("", "TEXT", ""),  # stays "" in TEXT
        (None, "TEXT", None),  # a key the row left out
        ("x", "WHATEVER", None),
    ],
)
def test_values_convert_as_get_column_does(text: Any, column_type: str, expected: Any) -> None:
    assert sqlite_value(text, column_type) == expected


def test_constraint_values_are_sqlite3_value_text() -> None:
    assert value_text(7) == "7"
    assert value_text(1.0) == "1.0" and value_text(1e20) == "1.0e+20"
    assert value_text(b"\xffa") == "\udcffa"  # raw bytes, kept
    assert value_text(None) is None


def test_declarations_follow_column_definition() -> None:
    routes = [
        {"id": "column", "name": "pid", "type": "BIGINT", "op": "9"},
        {"id": "column", "name": "md5", "type": "TEXT", "op": "64"},
    ]
    assert declaration("t", routes, is_extension=False) == (
        "CREATE TABLE t(`pid` BIGINT, `md5` TEXT COLLATE NOCASE, PRIMARY KEY (`pid`)) WITHOUT ROWID"
    )
    assert declaration("t", routes, is_extension=True).endswith("PRIMARY KEY (`pid`))")


def test_core_bytes_match_the_measured_347_mb() -> None:
    """The reference notes: 100,000 rows of 30 short strings take about 347 MB per copy."""
    row = {f"c{i:02d}": "value" for i in range(30)}
    assert 340e6 < 100_000 * core_bytes([row]) < 355e6


@pytest.mark.parametrize(
    ("info", "registry", "message"),
    [
        (("old", "1.7.6"), {"table": {"t": ROUTES}}, "Incompatible extension SDK version"),
        (("x", "3.0.7"), {"table": {"processes": ROUTES}}, "conflicts with another item"),
        (("x", "3.0.7"), {"nosuch": {"t": ROUTES}}, "Unknown registry: nosuch"),
        (("x", "3.0.7"), {"table": {"t": []}}, "Invalid route info"),
    ],
)
def test_registration_rules(info: Any, registry: Any, message: str) -> None:
    core = SqlCore()  # not started: the manager's rules need no socket
    name, sdk = info
    status = core.manager.registerExtension(
        InternalExtensionInfo(name=name, version="1", sdk_version=sdk), registry
    )
    assert status.code == 1 and message in status.message
    ok = core.manager.registerExtension(
        InternalExtensionInfo(name="fine", version="1", sdk_version="3.0.7"),
        {"table": {"fine_table": ROUTES}},
    )
    assert ok.code == 0 and 0 < ok.uuid < 65536
    assert 0 not in core.manager.extensions()
    twice = core.manager.registerExtension(
        InternalExtensionInfo(name="fine", version="1", sdk_version="3.0.7"),
        {"table": {"other_table": ROUTES}},
    )
    assert (twice.code, twice.message) == (1, "Duplicate extension registered")
    result = core.query("SELECT name FROM osquery_extensions ORDER BY uuid")
    assert [row["name"] for row in result.rows] == ["core", "fine"]
    core.close()
