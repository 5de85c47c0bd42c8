"""Histories for the report and audit tests, in one place: real files written by the real store
(rows as sampled connections, runs started, beaten and stopped through the store itself).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from commands import egress_agent  # noqa: F401 (for the report and audit tests)

from agent.evidence import RUN_KEYS
from agent.history import HistoryStore, RunFigures, RunStart
from agent.records import Connection

HOSTNAME, MACHINE_ID = "web-1", "0f5e1c2a9b7d4e3f8a6b5c4d3e2f1a0b"


def connection(**fields: Any) -> Connection:
    """An outbound external TCP connection of pid 100 (``curl``); ``fields`` override."""
    values: Dict[str, Any] = dict(
        pid=100,
        name="curl",
        path="/usr/bin/curl",
        exe_status="unpackaged",  # the host's file at that path (agent.exe_check)
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
        boot_id=None,
        started_boottime=None,
        last_heartbeat_boottime=None,
    )
    values.update(fields)
    assert set(values) == set(RUN_KEYS)
    return values


def add_runs(path: str, runs: Iterable[Dict[str, Any]]) -> None:
    """Record ``runs`` in the history file at ``path`` through the store: each started, given
    its figures at its last heartbeat, and stopped when it has a ``stopped_at``."""
    store = HistoryStore(path, retention_days=0, max_rows=0)
    try:
        for values in runs:
            start = RunStart(
                kind=values["kind"],
                pid=values["pid"],
                hostname=values["hostname"],
                machine_id=values["machine_id"],
                version=values["version"],
                heartbeat_interval=values["heartbeat_interval"],
                events_source=values["events_source"],
            )
            run_id = store.start_run(start, at=values["started_at"])
            assert run_id is not None, store.problem
            figures = RunFigures(
                events_source=values["events_source"],
                events_lost=values["events_lost"],
                tcp_active_opens=values["tcp_active_opens"],
                outbound_tcp_seen=values["outbound_tcp_seen"],
            )
            stopped = values["stopped_at"] is not None
            at = values["stopped_at"] if stopped else values["last_heartbeat"]
            assert store.heartbeat(run_id, figures, at=at, stopped=stopped), store.problem
    finally:
        store.close()


def write_history(
    path: str,
    samples: Sequence[Tuple[float, List[Connection]]],
    runs: Iterable[Dict[str, Any]] = (),
) -> str:
    """A history file: each (time, connections) recorded as one sample, then ``runs``."""
    store = HistoryStore(path, retention_days=0, max_rows=0)
    for at, connections in samples:
        assert store.snapshot("sampling", connections, at=at), store.problem
    store.close()
    add_runs(path, runs)
    return path
