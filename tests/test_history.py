"""The history store: aggregation, bounds, restarts, corrupt and unwritable files, permissions."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any, List

import pytest

from agent.history import HISTORY_COLUMNS, HistoryStore, HistoryUnavailable
from agent.records import Connection


def conn(
    local_port: int = 40000,
    remote: str = "2001:db8::1",
    port: int = 443,
    uuid: str = "p1",
    **fields: Any,
) -> Connection:
    values: dict = dict(
        pid=100,
        name="curl",
        process_uuid=uuid,
        local_address="2001:db8:1::2",
        local_port=local_port,
        remote_address=remote,
        remote_port=port,
        external=True,
        address_class="global",
    )
    values.update(fields)
    return Connection(**values)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "history.db")


def only(store: HistoryStore) -> dict:
    (row,) = store.rows()
    return row


def test_aggregates_per_process_protocol_remote_and_direction(db_path: str) -> None:
    store = HistoryStore(db_path)
    assert store.snapshot("sampling", [conn(40000), conn(40001)], at=1000)
    row = only(store)
    assert (row["first_seen"], row["last_seen"], row["samples"]) == (1000, 1000, 1)
    assert (row["connections"], row["open"]) == (2, 1)
    assert row["external"] is True and row["allowlisted"] is False

    # One connection goes on, one closes, a new one opens: one more connection, one more sample.
    assert store.snapshot(
        "sampling", [conn(40000, name="curl2"), conn(40002, name="curl2")], at=1005
    )
    row = only(store)
    assert (row["first_seen"], row["last_seen"], row["samples"], row["connections"]) == (
        1000,
        1005,
        2,
        3,
    )
    assert row["name"] == "curl2"  # identity columns follow the latest sample

    assert store.snapshot("sampling", [], at=1010)
    assert only(store)["open"] == 0
    assert only(store)["last_seen"] == 1005

    # A different port, protocol, direction or process is a row of its own.
    assert store.snapshot(
        "sampling",
        [
            conn(40000),
            conn(40000, port=80),
            conn(40000, protocol=17),
            conn(40000, direction="inbound"),
            conn(40000, uuid="p2"),
        ],
        at=1020,
    )
    rows = store.rows()
    assert len(rows) == 5
    assert all(r["open"] == 1 for r in rows)
    assert rows[0]["connections"] == 4  # 40000 reappeared after a sample without it
    assert [r["last_seen"] for r in store.rows(since=1020)] == [1020] * 5
    assert store.count() == 5


def test_rows_have_the_history_columns(db_path: str) -> None:
    store = HistoryStore(db_path)
    store.snapshot("sampling", [conn(via=None)], at=5)
    row = only(store)
    assert list(row) == [name for name, _ in HISTORY_COLUMNS]
    assert row["via"] is None


def test_undecodable_process_text_is_stored_escaped(db_path: str) -> None:
    """A process name with bytes that are not UTF-8 (held as lone surrogates, PEP 383) is
    stored as its escape; the row is not lost and nothing raises."""
    name = os.fsdecode(b"evil\xff\xfe")
    store = HistoryStore(db_path)
    assert store.snapshot("sampling", [conn(name=name, cmdline=name + " --flag")], at=5)
    row = only(store)
    assert row["name"] == "evil\\xff\\xfe" and row["cmdline"] == "evil\\xff\\xfe --flag"
    assert store.problem is None


def test_retention_drops_old_rows(db_path: str) -> None:
    store = HistoryStore(db_path, retention_days=1, max_rows=0)
    store.snapshot("sampling", [conn(remote="2001:db8::1")], at=0)
    store.snapshot("sampling", [conn(remote="2001:db8::2")], at=50_000)
    store.snapshot("sampling", [conn(remote="2001:db8::3")], at=90_000)  # cutoff 3600: ::1 goes
    assert [r["remote_address"] for r in store.rows()] == ["2001:db8::2", "2001:db8::3"]


def test_max_rows_drops_the_oldest_first(db_path: str) -> None:
    store = HistoryStore(db_path, retention_days=0, max_rows=3)
    for i in range(6):
        store.snapshot("sampling", [conn(remote=f"2001:db8::{i}")], at=100 + i)
    assert [r["remote_address"] for r in store.rows()] == [f"2001:db8::{i}" for i in (3, 4, 5)]
    # More keys in one sample than max_rows: still bounded.
    store.snapshot("sampling", [conn(remote=f"2001:db8:1::{i}") for i in range(10)], at=200)
    assert store.count() == 3
    check = sqlite3.connect(db_path)
    assert check.execute("SELECT COUNT(*) FROM open_ends").fetchone()[0] == 3


def test_survives_a_restart(db_path: str) -> None:
    store = HistoryStore(db_path)
    store.snapshot("sampling", [conn(40000)], at=10)
    store.close()
    again = HistoryStore(db_path)
    assert only(again)["samples"] == 1
    again.snapshot("sampling", [conn(40000)], at=15)  # still the same connection: not counted twice
    row = only(again)
    assert (row["samples"], row["connections"], row["first_seen"], row["last_seen"]) == (
        2,
        1,
        10,
        15,
    )


def test_permissions(db_path: str) -> None:
    store = HistoryStore(db_path)
    store.snapshot("sampling", [conn()], at=1)
    directory = os.path.dirname(db_path)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for name in os.listdir(directory):  # the database, its -wal and -shm
        assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600, name


def test_an_existing_permissive_file_is_tightened(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)  # noqa: S103 - a directory that is not ours to tighten
    path = shared / "history.db"
    path.touch()
    os.chmod(path, 0o644)
    HistoryStore(str(path)).snapshot("sampling", [conn()], at=1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755  # an existing directory is left


def test_wal_mode(db_path: str) -> None:
    HistoryStore(db_path).snapshot("sampling", [conn()], at=1)
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _garbage(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as stream:
        stream.write(b"this is not a database\x00" * 4096)


def test_garbage_is_moved_aside_with_one_log_line(
    db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    _garbage(db_path)
    store = HistoryStore(db_path)
    with caplog.at_level(logging.WARNING, logger="egress_agent.history"):
        assert store.snapshot("sampling", [conn()], at=1)
        assert store.snapshot("sampling", [conn()], at=2)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert db_path in message and "moved it to" in message and "not a database" in message
    aside = [n for n in os.listdir(os.path.dirname(db_path)) if ".corrupt-" in n]
    assert len(aside) == 1
    with open(os.path.join(os.path.dirname(db_path), aside[0]), "rb") as stream:
        assert stream.read(22) == b"this is not a database"
    assert only(store)["samples"] == 2
    assert store.problem is None


def test_corruption_found_while_running_is_moved_aside(db_path: str) -> None:
    store = HistoryStore(db_path)
    store.snapshot("sampling", [conn()], at=1)
    store.close()
    _garbage(db_path)  # replaced behind the store's back between two runs
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.unlink(db_path + suffix)
    assert store.snapshot("sampling", [conn()], at=2)
    assert only(store)["first_seen"] == 2


def test_another_schema_is_moved_aside_not_overwritten(db_path: str) -> None:
    os.makedirs(os.path.dirname(db_path))
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE precious (x)")
    other.execute("INSERT INTO precious VALUES (42)")
    other.commit()
    other.close()
    store = HistoryStore(db_path)
    assert store.snapshot("sampling", [conn()], at=1)
    (aside,) = [n for n in os.listdir(os.path.dirname(db_path)) if ".corrupt-" in n]
    kept = sqlite3.connect(os.path.join(os.path.dirname(db_path), aside))
    assert kept.execute("SELECT x FROM precious").fetchone()[0] == 42


def test_unwritable_is_logged_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")  # even root cannot mkdir here
    store = HistoryStore(str(blocker / "history.db"))
    with caplog.at_level(logging.INFO, logger="egress_agent.history"):
        for at in range(5):
            assert store.snapshot("sampling", [conn()], at=at) is False
        assert store.count() is None
        with pytest.raises(HistoryUnavailable, match="state"):
            store.rows()
        assert store.problem is not None and str(blocker) in store.problem
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 2  # one for writing, one for reading: not one per sample
        blocker.unlink()
        assert store.snapshot("sampling", [conn()], at=10) is True
    assert store.problem is None
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert only(store)["samples"] == 6  # the five that waited in memory are written too


def test_two_writers(db_path: str) -> None:
    """The extension and `watch` may write at once: SQLite's lock and busy_timeout serialise."""
    first, second = HistoryStore(db_path), HistoryStore(db_path)
    first.snapshot("sampling", [], at=0)  # create the schema before the race
    failures: List[str] = []

    def write(store: HistoryStore, offset: int) -> None:
        for i in range(40):
            if not store.snapshot("sampling", [conn(40000 + i % 3)], at=offset + i):
                failures.append(store.problem or "?")

    threads = [
        threading.Thread(target=write, args=(first, 0)),
        threading.Thread(target=write, args=(second, 0)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    row = only(first)
    assert row["samples"] == 80
    assert row["last_seen"] == 39
