"""The ``egress_agent_audit`` table through the osquery stand-in core (tests/sqlcore.py: real
SQLite virtual tables over the real extension process): the Fleet policy query, the window as a
constraint and without one, and a constraint value that is no duration, answered with a row
that says so (the query succeeds).

The extension reads a history file the test wrote through the store (tests/history_fixture.py)
and keeps writing its own samples and run into it.  Its allow rule expects every destination,
so that the machine's other connections (which the extension records too) never decide the
verdict: only the rows the test planted do.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from history_fixture import connection, run, write_history
from osquery_core import default_extension_command
from sqlcore import SqlCore

from agent.history import HistoryStore
from agent.osquery import egress_agent_audit as audit_table
from agent.osquery.context import QueryContext

POLICY = "SELECT 1 FROM egress_agent_audit WHERE since = '24h' AND verdict = 'clean';"
ALLOW_ALL = "allow:\n  - comment: every destination\n    destinations: [0.0.0.0/0, '::/0']\n"


def _core(tmp: Path, planted: List[Any], allowed: bool) -> Iterator[SqlCore]:
    now = time.time()
    history = tmp / "history.db"
    sample = [connection(allowlisted=allowed, allow_rule="planted" if allowed else "")]
    # one run that saw the whole day up to the extension's start (and a little past it)
    write_history(str(history), [(now - 3600, sample), (now - 3500, [])], planted)
    config = tmp / "config.yaml"
    config.write_text(
        f"sampling:\n  interval: 1\nhistory:\n  path: {history}\n  retention_days: 2\n{ALLOW_ALL}"
    )
    with SqlCore(extensions_interval=1) as core:
        process = core.launch(
            default_extension_command(), interval=1, env={"EGRESS_AGENT_CONFIG": str(config)}
        )
        core.wait_for_registration(process=process)
        yield core


@pytest.fixture(scope="module")
def unexpected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlCore]:
    now = time.time()
    yield from _core(tmp_path_factory.mktemp("unexpected"), [run(now - 90000, now + 60)], False)


def one(core: SqlCore, sql: str) -> Dict[str, Any]:
    result = core.query(sql)
    assert result.stats.generate == {"egress_agent_audit": 1}, result.stats.generate
    (row,) = result.rows
    return row


def test_without_a_constraint_the_window_is_24_hours(unexpected: SqlCore) -> None:
    row = one(unexpected, "SELECT * FROM egress_agent_audit")
    assert row["since"] == "24h"
    assert row["window_end"] - row["window_start"] == 86400
    assert row["verdict"] == "unexpected" and row["exit_code"] == 1
    assert row["unexpected_connections"] == 1 and row["unexpected_processes"] == 1
    assert row["reason"].startswith("1 unexpected external connection(s) to 1 destination(s)")
    assert row["external_connections"] >= 1 and row["processes"] >= 1
    assert 0 < row["coverage_share"] <= 1
    assert row["tcp_connects_seen"] >= 0 and row["tcp_connects_counted"] >= 0
    assert set(row) == {name for name, _ in audit_table.COLUMNS}


def test_the_window_as_a_constraint(unexpected: SqlCore) -> None:
    row = one(
        unexpected,
        "SELECT since, verdict, window_start, window_end FROM egress_agent_audit "
        "WHERE since = '30m'",
    )
    assert (row["since"], row["window_end"] - row["window_start"]) == ("30m", 1800)
    assert row["verdict"] != "unexpected"  # the planted connection was an hour ago
    both = unexpected.query(
        "SELECT since, verdict FROM egress_agent_audit WHERE since IN ('2h', '3h')"
    )
    assert sorted(r["since"] for r in both.rows) == ["2h", "3h"]
    assert {r["verdict"] for r in both.rows} == {"unexpected"}


def test_the_policy_fails_a_host_with_unexpected_egress(unexpected: SqlCore) -> None:
    assert unexpected.query(POLICY).rows == []


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("yesterday", "since 'yesterday' is no duration: use a number with s, m, h, d or w"),
        ("-1h", "since '-1h' is no duration"),
        ("0h", "since '0h': the window must be longer than 0 and at most 400d"),
        ("99999d", "the window must be longer than 0 and at most 400d"),
    ],
)
def test_a_bad_window_is_answered_with_a_clear_error(
    unexpected: SqlCore, value: str, says: str
) -> None:
    row = one(unexpected, f"SELECT * FROM egress_agent_audit WHERE since = '{value}'")
    assert row["since"] == value and row["verdict"] == "error"
    assert says in row["reason"]
    assert unexpected.query(POLICY.replace("'24h'", f"'{value}'")).rows == []


def test_the_policy_passes_a_clean_host(tmp_path: Path) -> None:
    now = time.time()
    for core in _core(tmp_path, [run(now - 90000, now + 60)], True):
        row = one(core, "SELECT verdict, reason FROM egress_agent_audit WHERE since = '24h'")
        assert row["verdict"] == "clean", row["reason"]
        assert core.query(POLICY).rows == [{"1": 1}]


@pytest.mark.parametrize("kept", [False, True])
def test_no_history_to_read_is_an_error_row_not_a_failed_query(tmp_path: Path, kept: bool) -> None:
    """No store configured, or a store path that is a directory (the real store fails to open)."""
    store = HistoryStore(str(tmp_path), read_only=True) if kept else None
    (row,) = audit_table.generate(store, QueryContext())
    assert (row["since"], row["verdict"]) == ("24h", "error")
    says = "the history cannot be read: " if kept else "history is not kept"
    assert row["reason"].startswith(says), row["reason"]


def test_a_history_edited_by_hand_makes_the_verdict_tampered(tmp_path: Path) -> None:
    """A clean day's store, then its unexpected row deleted with SQLite alone: the table's
    verdict is ``tampered`` and the policy fails (the chain is checked, at most every
    ``CHAIN_CHECK_EVERY_S``, here on the first query)."""
    now = time.time()
    path = tmp_path / "history.db"
    day = [run(now - 90000, now - 30)]
    write_history(str(path), [(now - 3600, [connection()]), (now - 3500, [])], day)
    context = QueryContext()
    intact = HistoryStore(str(path), read_only=True)
    try:
        (before,) = audit_table.generate(intact, context, chains=audit_table.ChainChecks(intact))
    finally:
        intact.close()
    assert before["verdict"] != "tampered", before["reason"]
    db = sqlite3.connect(path)
    db.execute("DELETE FROM history WHERE remote_address = '9.9.9.9'")
    db.commit()
    db.close()
    edited = HistoryStore(str(path), read_only=True)
    try:
        (after,) = audit_table.generate(edited, context, chains=audit_table.ChainChecks(edited))
    finally:
        edited.close()
    assert after["verdict"] == "tampered", after["reason"]
