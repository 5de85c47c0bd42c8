"""Histories for the report and audit tests, in one place.

Rows are written by today's :class:`agent.history.HistoryStore` (real SQLite, real schema).
Runs are not recorded by today's store (issue 10 adds them): :func:`add_runs` writes them as a
``runs`` table with the keys of ``HistoryStore.runs()`` (``agent.evidence.RUN_KEYS``), which
is what :class:`agent.history_copy.CopiedHistory` reads until the store has ``runs()``.  This
is the one stand-in for the real thing, because the real thing does not exist yet: when the
store records runs itself, change :func:`add_runs` (and only it) to start, beat and stop runs
through the store.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from agent.evidence import RUN_KEYS
from agent.history import HistoryStore
from agent.records import Connection

HOSTNAME, MACHINE_ID = "web-1", "0f5e1c2a9b7d4e3f8a6b5c4d3e2f1a0b"


def connection(**fields: Any) -> Connection:
    """An outbound external TCP connection of pid 100 (``curl``); ``fields`` override."""
    values: Dict[str, Any] = dict(
        pid=100,
        name="curl",
        path="/usr/bin/curl",
        cmdline="curl https://example.org/",
        username="root",
        process_uuid="uuid-100",
        local_address="192.0.2.10",
        local_port=40000,
        remote_address="9.9.9.9",
        remote_port=443,
        direction="outbound",
        external=True,
        address_class="global",
    )
    values.update(fields)
    return Connection(**values)


def run(started_at: float, stopped_at: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
    """One agent run with every :data:`RUN_KEYS` key: a tracefs extension run that lost
    nothing and saw every connect, unless ``fields`` say otherwise."""
    values: Dict[str, Any] = dict(
        run_id=None,
        kind="extension",
        pid=4242,
        hostname=HOSTNAME,
        machine_id=MACHINE_ID,
        version="0.test",
        started_at=started_at,
        last_heartbeat=stopped_at if stopped_at is not None else started_at,
        stopped_at=stopped_at,
        heartbeat_interval=30,
        events_source="tracefs",
        events_lost=0,
        tcp_active_opens=10,
        outbound_tcp_seen=10,
    )
    values.update(fields)
    assert set(values) == set(RUN_KEYS)
    return values


def add_runs(path: str, runs: Iterable[Dict[str, Any]]) -> None:
    """Record ``runs`` in the history file at ``path`` (see the module docstring)."""
    db = sqlite3.connect(path)
    try:
        columns = ", ".join(RUN_KEYS)
        db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
        for number, values in enumerate(runs, 1):
            record = dict(values, run_id=values.get("run_id") or number)
            db.execute(
                f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' for _ in RUN_KEYS)})",  # noqa: S608
                [record[key] for key in RUN_KEYS],
            )
        db.commit()
    finally:
        db.close()


def write_history(
    path: str,
    samples: Sequence[Tuple[float, List[Connection]]],
    runs: Iterable[Dict[str, Any]] = (),
) -> str:
    """A history file: each (time, connections) recorded as one sample, then ``runs``."""
    store = HistoryStore(path, retention_days=0, max_rows=0)
    for at, connections in samples:
        assert store.record(connections, at=at), store.problem
    store.close()
    add_runs(path, runs)
    return path


def egress_agent(*args: str) -> subprocess.CompletedProcess[str]:
    """``egress-agent ARGS...`` run as a command, without the caller's configuration."""
    env = dict(os.environ)
    env.pop("EGRESS_AGENT_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
