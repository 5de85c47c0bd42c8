"""The history store as several sources and versions meet it: a version 1 file opened and
extended by today's code, two producers (a sampler and an event stream) writing one store
without closing each other's rows, events in every order, read-only copies, newer files."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest
from test_history import conn as history_connection

from agent.history import (
    ALIVE,
    CLOSED,
    HISTORY_COLUMNS,
    OPENED,
    SCHEMA_VERSION,
    HistoryStore,
    HistoryUnavailable,
    Observation,
    RunFigures,
    RunStart,
)
from agent.records import Connection

VERSION_1 = Path(__file__).parent / "data" / "history-v1.db"


def conn(
    local_port: int = 40000, uuid: str = "p1", namespace: int = 4026531840, **fields: Any
) -> Connection:
    """A history test's connection (tests/test_history.py), in a network namespace."""
    return history_connection(local_port, uuid=uuid, net_namespace=namespace, **fields)


@pytest.fixture
def old_store(tmp_path: Path) -> str:
    path = tmp_path / "history.db"
    shutil.copy(VERSION_1, path)
    return str(path)


def by_name(store: HistoryStore) -> Dict[str, Dict[str, Any]]:
    return {str(row["name"]): row for row in store.rows()}


def test_a_version_1_store_opens_with_every_row_kept(
    old_store: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="egress_agent.history"):
        store = HistoryStore(old_store, retention_days=100000)
        rows = by_name(store)
    assert set(rows) == {"curl", "evil\u202e\nname", "nginx"}
    curl, hostile, nginx = rows["curl"], rows["evil\u202e\nname"], rows["nginx"]
    assert (curl["samples"], curl["connections"], curl["open"]) == (2, 2, 0)
    assert (curl["first_seen"], curl["last_seen"]) == (1764600000, 1764600005)
    assert (hostile["protocol"], hostile["allowlisted"], hostile["allow_rule"]) == (17, True, "dns")
    assert hostile["cmdline"] == "x\x1b[31m"
    assert (nginx["direction"], nginx["open"], nginx["samples"]) == ("inbound", 1, 3)
    assert all(row["seen_by"] == "sampling" for row in rows.values())
    assert [key for key in curl] == [name for name, _ in HISTORY_COLUMNS]
    assert not [n for n in os.listdir(os.path.dirname(old_store)) if ".corrupt-" in n]
    assert any("upgraded from schema version 1" in r.getMessage() for r in caplog.records)
    db = sqlite3.connect(old_store)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # the open inbound row is now its listening port's row (443); its end keeps the client port
    assert db.execute("SELECT source, local_port FROM open_ends").fetchall() == [
        ("sampling", 50000)
    ]
    assert db.execute(
        "SELECT listen_port, remote_port FROM history WHERE name = 'nginx'"
    ).fetchall() == [(443, 0)]


def test_a_version_1_store_is_extended_and_its_open_row_continues(old_store: str) -> None:
    store = HistoryStore(old_store, retention_days=100000)
    nginx = by_name(store)["nginx"]
    again = conn(
        443,
        uuid=str(nginx["process_uuid"]),
        namespace=4026531840,
        name="nginx",
        direction="inbound",
        remote_address="::ffff:8.8.8.8",
        remote_port=50000,
        local_address="2001:db8::2",
    )
    curl = conn(
        41000,
        uuid="5b1d7c1e-0000-5000-8000-000000000001",
        family=10,
        remote_address="2606:4700:4700::1111",
    )
    assert store.snapshot("sampling", [again, curl], at=1764600020)
    rows = by_name(store)
    # the open row goes on: one more sample, the same end, so no new connection
    assert (rows["nginx"]["samples"], rows["nginx"]["connections"], rows["nginx"]["open"]) == (
        4,
        1,
        1,
    )
    assert rows["curl"]["open"] == 1 and rows["curl"]["connections"] == 3  # seen again
    assert len(store.rows()) == 3


def test_a_column_the_file_lacks_is_added_without_losing_rows(old_store: str) -> None:
    db = sqlite3.connect(old_store)
    before = db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
    columns = [row[1] for row in db.execute("PRAGMA table_info(history)")]
    assert "seen_by" not in columns
    db.close()
    store = HistoryStore(old_store, retention_days=100000)
    assert store.count() == before
    db = sqlite3.connect(old_store)
    assert "seen_by" in [row[1] for row in db.execute("PRAGMA table_info(history)")]


def test_a_newer_store_is_used_not_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "history.db")
    store = HistoryStore(path)
    assert store.snapshot("sampling", [conn()], at=100)
    store.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    db.execute("ALTER TABLE history ADD COLUMN from_the_future TEXT")
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="egress_agent.history"):
        store = HistoryStore(path)
        assert store.snapshot("sampling", [conn(), conn(40001)], at=105)
        (row,) = store.rows()
    assert row["connections"] == 2 and row["samples"] == 2
    assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]
    assert any("written by a newer egress-agent" in r.getMessage() for r in caplog.records)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 7


def test_two_producers_do_not_close_each_others_rows(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=100000)
    sampled = conn(40000, uuid="sampled")
    evented = conn(50000, uuid="evented", name="short")
    assert store.snapshot("sampling", [sampled], at=100)
    assert store.observe([Observation(OPENED, 101.5, "tracefs", evented)])
    # the next sample does not see the evented connection: it stays open
    assert store.snapshot("sampling", [sampled], at=105)
    rows = {row["process_uuid"]: row for row in store.rows()}
    assert rows["evented"]["open"] == 1 and rows["evented"]["seen_by"] == "tracefs"
    assert rows["sampled"]["open"] == 1 and rows["sampled"]["samples"] == 2
    # the events source sees the sampled connection too: both hold it, one connection
    assert store.observe([Observation(OPENED, 106, "tracefs", sampled)])
    # the sampler loses it: still open, the events source holds it
    assert store.snapshot("sampling", [], at=110)
    rows = {row["process_uuid"]: row for row in store.rows()}
    assert rows["sampled"]["open"] == 1 and rows["sampled"]["connections"] == 1
    assert rows["sampled"]["seen_by"] == "sampling,tracefs"
    # a closing event closes it for every source
    assert store.observe(
        [
            Observation(CLOSED, 111, "tracefs", sampled),
            Observation(CLOSED, 111.2, "tracefs", evented),
        ]
    )
    rows = {row["process_uuid"]: row for row in store.rows()}
    assert rows["sampled"]["open"] == 0 and rows["evented"]["open"] == 0
    assert rows["evented"]["first_seen"] == 101 and rows["evented"]["last_seen"] == 111


def test_a_snapshot_closes_only_its_scope(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=100000)
    here, there = conn(40000, uuid="here", namespace=1), conn(40001, uuid="there", namespace=2)
    assert store.snapshot("sampling", [here, there], at=100)
    assert store.snapshot("sampling", [], at=105, scope=[1])  # only namespace 1 was looked at
    rows = {row["process_uuid"]: row["open"] for row in store.rows()}
    assert rows == {"here": 0, "there": 1}
    assert store.snapshot("sampling", [], at=110, unread=[2])  # every namespace but 2
    assert {row["process_uuid"]: row["open"] for row in store.rows()} == rows
    assert store.snapshot("sampling", [], at=115)  # namespace 2 is gone: its rows close
    assert {row["process_uuid"]: row["open"] for row in store.rows()} == {"here": 0, "there": 0}


def test_a_connection_that_lived_between_samples_is_one_row_with_its_times(
    tmp_path: Path,
) -> None:
    """An 80 ms connection known only from events: opened and closed in one batch."""
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=100000)
    curl = conn(45000, uuid="curl")
    assert store.observe(
        [Observation(OPENED, 200.01, "tracefs", curl), Observation(CLOSED, 200.09, "tracefs", curl)]
    )
    (row,) = store.rows()
    assert (row["first_seen"], row["last_seen"], row["open"]) == (200, 200, 0)
    assert (row["samples"], row["connections"], row["seen_by"]) == (1, 1, "tracefs")
    # a closing seen without its opening (the agent started meanwhile) is still a connection
    late = conn(45001, uuid="late")
    assert store.observe([Observation(CLOSED, 300, "tracefs", late)])
    rows = {r["process_uuid"]: r for r in store.rows()}
    assert (rows["late"]["open"], rows["late"]["connections"]) == (0, 1)
    # the same end opened again after it closed is a second connection
    assert store.observe([Observation(OPENED, 301, "tracefs", curl)])
    rows = {r["process_uuid"]: r for r in store.rows()}
    assert (rows["curl"]["connections"], rows["curl"]["open"], rows["curl"]["samples"]) == (2, 1, 2)


def test_query_pushes_filters_down_and_returns_only_asked_columns(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=100000)
    rows: List[Connection] = [
        conn(40000 + i, uuid=f"p{i}", pid=i, direction="inbound" if i % 2 else "outbound")
        for i in range(6)
    ]
    assert store.snapshot("sampling", rows[:3], at=100)
    assert store.snapshot("sampling", rows[3:], at=200)
    found = store.query(columns=["pid", "open"], pids=[1, 2, 4], open_=True)
    assert found == [{"pid": 4, "open": 1}]
    assert [r["pid"] for r in store.query(columns=["pid"], directions=["inbound"])] == [1, 3, 5]
    assert [r["pid"] for r in store.query(columns=["pid"], since=150)] == [3, 4, 5]
    assert [r["pid"] for r in store.query(columns=["pid"], until=150)] == [0, 1, 2]
    assert len(store.query(limit=2)) == 2
    assert store.query(pids=[]) == []
    with pytest.raises(ValueError, match="no history column 'nope'"):
        store.query(columns=["nope"])


def test_a_copy_is_read_as_it_is(old_store: str, tmp_path: Path) -> None:
    before = Path(old_store).read_bytes()
    store = HistoryStore(old_store, read_only=True)
    rows = {str(row["name"]): row for row in store.rows()}
    assert set(rows) == {"curl", "evil\u202e\nname", "nginx"}
    assert rows["curl"]["seen_by"] is None  # a column the old file lacks reads as NULL
    assert store.runs() == []
    assert store.snapshot("sampling", [conn()], at=1) is False
    store.close()
    assert Path(old_store).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["history.db"]  # no -wal, -shm or journal made
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(HistoryUnavailable, match=r"garbage\.db"):
        HistoryStore(str(garbage), read_only=True).rows()
    assert garbage.read_bytes() == b"not a database" * 100
    with pytest.raises(HistoryUnavailable, match=r"missing\.db"):
        HistoryStore(str(tmp_path / "missing.db"), read_only=True).rows()


def test_runs_are_kept_and_windowed(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=100000)
    start = RunStart("extension", 42, "host", "m1", "0.2.0", 5.0, "sampling")
    first = store.start_run(start, at=100)
    assert first is not None
    assert store.heartbeat(first, RunFigures("sampling", 0, 7, 6), at=150)
    assert store.heartbeat(first, RunFigures("sampling", 0, 9, 9), at=160, stopped=True)
    second = store.start_run(start, at=300)
    assert second is not None and store.heartbeat(second, RunFigures("tracefs", 3, 1, 1), at=310)
    runs = store.runs()
    assert [(r["started_at"], r["last_heartbeat"], r["stopped_at"]) for r in runs] == [
        (100, 160, 160),
        (300, 310, None),
    ]
    assert (runs[0]["tcp_active_opens"], runs[0]["outbound_tcp_seen"]) == (9, 9)
    assert (runs[1]["events_source"], runs[1]["events_lost"]) == ("tracefs", 3)
    assert [r["run_id"] for r in store.runs(since=200)] == [second]
    assert [r["run_id"] for r in store.runs(until=200)] == [first]


def _history(store: HistoryStore) -> List[Dict[str, Any]]:
    return sorted(
        ({k: v for k, v in row.items() if k != "id"} for row in store.rows()),
        key=lambda row: (row["process_uuid"], row["remote_address"], row["first_seen"]),
    )


def test_a_batch_is_written_as_its_observations_one_by_one(tmp_path: Path) -> None:
    """Connections that open and close within one write are written one statement a row
    (``_briefs``); the rows are those that writing each observation alone makes: on a new
    row, on a row closed before, and on a row another connection holds open, mixed with
    observations that cannot be joined (a closing of an end opened earlier, a second source)."""
    held = conn(40001, uuid="p1")
    earlier = [Observation(OPENED, 100, "tracefs", held)]
    earlier += [Observation(OPENED, 101, "tracefs", conn(40002, uuid="p2"))]
    earlier += [Observation(CLOSED, 102, "tracefs", conn(40002, uuid="p2"))]
    batch: List[Observation] = []
    for index in range(30):
        at = 200 + index
        for uuid in ("p1", "p2", "p3"):  # p1: open row; p2: closed row; p3: new row
            brief = conn(41000 + index, uuid=uuid, pid=1000 + index)
            batch += [Observation(OPENED, at, "tracefs", brief)]
            if index % 2:  # as a connect, its outcome, its close come
                sighted = replace(brief, cmdline="seen again")
                batch += [Observation(ALIVE, at + 0.2, "tracefs", sighted)]
            batch += [Observation(CLOSED, at + 0.5, "tracefs", brief)]
    batch += [Observation(OPENED, 250, "sampling", conn(42000, uuid="p4"))]
    batch += [Observation(CLOSED, 251, "tracefs", conn(42000, uuid="p4"))]
    batch += [Observation(CLOSED, 252, "tracefs", held)]
    one_by_one = HistoryStore(str(tmp_path / "one.db"), retention_days=100000)
    at_once = HistoryStore(str(tmp_path / "once.db"), retention_days=100000)
    for store in (one_by_one, at_once):
        assert store.observe(earlier)
    for observation in batch:
        assert one_by_one.observe([observation])
    assert at_once.observe(batch)
    expected = _history(one_by_one)
    assert _history(at_once) == expected
    p1 = [row for row in expected if row["process_uuid"] == "p1"]
    assert [(r["connections"], r["samples"], r["open"]) for r in p1] == [(31, 31 + 15, 0)]
    assert (p1[0]["pid"], p1[0]["cmdline"]) == (1029, "seen again")  # the last sighting's columns
    one_by_one.close()
    at_once.close()
