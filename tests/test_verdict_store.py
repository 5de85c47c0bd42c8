"""Issue 25, the store's side of the verdict: nothing unexpected is evicted while anything else
can go, and what must go is recorded; writes that cannot be made wait and are written, or are
counted as lost with their span; clock jumps are recorded and prune nothing early; a killed
run covers until its last heartbeat; a socket that closed before the agent looked is dated
before it.

Clock jumps go through clocks injected into the store (a mock: the machine's clock is not ours
to move).  The lock is real: a second process holds ``BEGIN EXCLUSIVE`` on the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from history_fixture import connection, egress_agent

from agent.history import HistoryStore, RunFigures, RunStart
from agent.records import Connection

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
DAY = 86400


def audit(path: Path, since: float, until: float) -> Tuple[int, List[str]]:
    result = egress_agent(
        "audit", "--since", str(since), "--until", str(until), "--history", str(path)
    )
    return result.returncode, result.stdout.splitlines()


def verdict(lines: List[str]) -> str:
    (line,) = [line for line in lines if line.startswith("verdict: ")]
    return line


def inbound(client: str, client_port: int = 50000, **fields: Any) -> Connection:
    values: Dict[str, Any] = dict(
        pid=200,
        name="nginx",
        process_uuid="uuid-200",
        direction="inbound",
        local_port=443,
        remote_address=client,
        remote_port=client_port,
    )
    values.update(fields)
    return connection(**values)


def full_run(store: HistoryStore, start: float, stop: float) -> int:
    run_id = store.start_run(
        RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"), at=start
    )
    assert run_id is not None, store.problem
    assert store.heartbeat(run_id, RunFigures("tracefs"), at=stop, stopped=True), store.problem
    return run_id


class Clocks:
    """A wall clock and a boot clock that the test moves (a mock of the machine's clocks)."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.boot = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds

    def store(self, path: Path, **options: Any) -> HistoryStore:
        return HistoryStore(
            str(path),
            clock=lambda: self.wall,
            boot_clock=lambda: self.boot,
            boot_id="boot-1",
            **options,
        )


# --- eviction ---------------------------------------------------------------------------------


def test_an_inbound_flood_evicts_inbound_rows_not_the_unexpected_one(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=50)
    assert store.snapshot("sampling", [connection()], at=T0 + 10)
    assert store.snapshot("sampling", [], at=T0 + 20)  # the unexpected connection closed
    for batch in range(8):  # 400 clients from 400 addresses, each seen once and gone
        clients = [inbound(f"203.0.{batch}.{n + 1}") for n in range(50)]
        assert store.snapshot("sampling", clients, at=T0 + 100 + batch)
        assert store.snapshot("sampling", [], at=T0 + 100 + batch)
    full_run(store, T0, T0 + 3600)
    rows = store.rows()
    store.close()
    assert len(rows) == 50
    assert [r["remote_address"] for r in rows if r["direction"] == "outbound"] == ["9.9.9.9"]
    code, lines = audit(path, T0, T0 + 3600)
    assert code == 1, lines


def test_inbound_clients_aggregate_per_listening_port(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "history.db"), retention_days=0, max_rows=50)
    clients = [inbound("203.0.113.9", 50000 + n) for n in range(400)]
    assert store.snapshot("sampling", clients, at=T0)
    other_port = inbound("203.0.113.9", 40000, local_port=80)
    assert store.snapshot("sampling", [*clients[:10], other_port], at=T0 + 1)
    rows = store.rows()
    store.close()
    by_port = {(r["listen_port"], r["remote_port"]): r for r in rows}
    assert set(by_port) == {(443, 0), (80, 0)}
    assert by_port[(443, 0)]["connections"] == 400 and by_port[(443, 0)]["open"] == 1
    assert by_port[(80, 0)]["connections"] == 1


def test_an_unexpected_row_that_must_go_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=2)
    for n in range(5):  # five unexpected destinations, closed, where only two rows fit
        assert store.snapshot(
            "sampling", [connection(remote_address=f"9.9.9.{n + 1}")], at=T0 + 60 * n
        )
        assert store.snapshot("sampling", [], at=T0 + 60 * n + 1)
    full_run(store, T0 - 60, T0 + 3600)
    losses = store.losses()
    store.close()
    assert {loss["kind"] for loss in losses} == {"evicted"}
    assert sum(int(loss["count"]) for loss in losses) == 3  # the three oldest, one at a time
    assert (losses[0]["start"], losses[-1]["end"]) == (T0, T0 + 120)
    code, lines = audit(path, T0, T0 + 150)  # the window of the evicted rows only
    assert code == 3, lines
    assert "unexpected egress rows were evicted to keep max_rows: 3 in 3 span(s)" in verdict(lines)


# --- failed writes ----------------------------------------------------------------------------

HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


class Holder:
    """A second process holding ``BEGIN EXCLUSIVE`` on the store until released."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "LOCKED"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_writes_during_another_process_exclusive_lock_are_written_after(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0, busy_timeout=1.0)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"), at=T0)
    assert run_id is not None
    holder = Holder(path)
    try:
        store_busy = time.monotonic()
        assert not store.snapshot("sampling", [connection()], at=T0 + 10)  # waited, then queued
        assert time.monotonic() - store_busy >= 1  # SQLite's busy timeout, then gave up
        assert store.pending == 1
    finally:
        holder.release()
    assert store.heartbeat(run_id, RunFigures("tracefs"), at=T0 + 3600, stopped=True)
    assert store.pending == 0
    store.close()
    code, lines = audit(path, T0, T0 + 3600)
    assert code == 1, lines  # the connection made during the lock is in the history


def test_writes_dropped_from_a_full_queue_are_a_counted_loss(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0, max_pending=3, busy_timeout=0.1)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"), at=T0)
    assert run_id is not None
    holder = Holder(path)
    try:
        for n in range(5):
            store.snapshot(
                "sampling", [connection(remote_address=f"9.9.9.{n + 1}")], at=T0 + 100 + n
            )
            store.snapshot("sampling", [], at=T0 + 100 + n)
    finally:
        holder.release()
    assert store.heartbeat(run_id, RunFigures("tracefs"), at=T0 + 3600, stopped=True)
    (loss,) = store.losses()
    kept = {r["remote_address"] for r in store.rows()}
    store.close()
    assert loss["kind"] == "lost_writes" and loss["run_id"] == run_id
    assert (loss["start"], loss["end"], loss["count"]) == (T0 + 100, T0 + 103, 7)
    assert kept == {"9.9.9.5"}
    code, lines = audit(path, T0, T0 + 103)
    assert code == 3, lines
    assert "writes were dropped while the history store could not be written: 7" in verdict(lines)


def test_a_reader_never_takes_the_live_store_lock(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0)
    assert store.snapshot("sampling", [connection()], at=T0)
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {path}\n")
    holder = Holder(path)  # as if a writer were in the middle of a transaction
    try:
        for command in (
            ["history"],
            ["audit", "--since", str(T0)],
            ["report"],
            ["check", "--format", "json"],  # reads the names the agent recorded
        ):
            result = egress_agent(*command, config=config, timeout=60)
            assert result.returncode in (0, 1, 3), (command, result.stderr)
            assert "cannot read" not in result.stderr
            assert "locked" not in result.stderr
    finally:
        holder.release()
    store.close()


# --- clocks (injected: a mock of the machine's clocks) ----------------------------------------


def test_a_forward_jump_is_recorded_and_prunes_nothing(tmp_path: Path) -> None:
    clocks = Clocks(T0)
    path = tmp_path / "history.db"
    store = clocks.store(path, retention_days=1, max_rows=0)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"))
    assert run_id is not None
    assert store.snapshot("sampling", [connection()])
    clocks.advance(30)
    assert store.heartbeat(run_id, RunFigures("tracefs"))
    clocks.wall += 400 * DAY  # the wall clock jumps a year ahead; the boot clock does not
    clocks.advance(30)
    assert store.snapshot("sampling", [connection(remote_address="9.9.9.10")])
    assert store.heartbeat(run_id, RunFigures("tracefs"))
    rows = store.rows()
    (jump,) = store.losses()
    (recorded,) = store.runs()
    store.close()
    assert {r["remote_address"] for r in rows} == {"9.9.9.9", "9.9.9.10"}  # nothing pruned
    assert jump["kind"] == "clock_jump"
    assert (jump["start"], jump["end"]) == (T0 + 60, T0 + 60 + 400 * DAY)
    assert "jumped forward by 34560000 s" in str(jump["detail"])
    # the run's wall span (a year) against its boot span (a minute)
    assert recorded["last_heartbeat_boottime"] - recorded["started_boottime"] == 60
    code, lines = audit(path, T0 + 100 * DAY, T0 + 101 * DAY)  # inside the skipped year
    assert code == 3, lines
    assert "the wall clock jumped: 1 in 1 span(s)" in verdict(lines)
    assert any(line.startswith("incomplete (clock_skew): in 1 run(s)") for line in lines)


def test_a_heartbeat_after_the_clock_came_back_does_not_extend_coverage(tmp_path: Path) -> None:
    clocks = Clocks(T0)
    store = clocks.store(tmp_path / "history.db", retention_days=0, max_rows=0)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"))
    assert run_id is not None
    clocks.wall += DAY  # ahead for one heartbeat
    assert store.heartbeat(run_id, RunFigures("tracefs"))
    clocks.wall -= DAY  # and back
    clocks.advance(30)
    assert store.heartbeat(run_id, RunFigures("tracefs"))
    (recorded,) = store.runs()
    kinds = [loss["kind"] for loss in store.losses()]
    store.close()
    assert recorded["last_heartbeat"] == T0 + 30  # not a day ahead (MAX kept the future before)
    assert kinds == ["clock_jump", "clock_jump"]


def test_retention_follows_the_boot_clock_not_a_jumped_wall_clock(tmp_path: Path) -> None:
    clocks = Clocks(T0)
    store = clocks.store(tmp_path / "history.db", retention_days=1, max_rows=0)
    assert store.snapshot("sampling", [connection()])
    assert store.snapshot("sampling", [])
    clocks.advance(2 * DAY)  # time really passes: the row ages out as it should
    assert store.snapshot("sampling", [connection(remote_address="9.9.9.10")])
    rows = {r["remote_address"] for r in store.rows()}
    store.close()
    assert rows == {"9.9.9.10"}


# --- before the window ------------------------------------------------------------------------


def test_a_time_wait_socket_from_before_the_agent_is_dated_before_it(tmp_path: Path) -> None:
    clocks = Clocks(T0 + 1000)
    path = tmp_path / "history.db"
    store = clocks.store(path, retention_days=0, max_rows=0)
    ended = connection(pid=-1, name="", process_uuid="", state="TIME_WAIT")
    live = connection(remote_address="9.9.9.10", local_port=40001)
    clocks.advance(1)
    assert store.snapshot("sampling", [ended, live])
    clocks.advance(10)
    later = connection(
        pid=-1, name="", process_uuid="", state="TIME_WAIT", remote_address="9.9.9.11"
    )
    assert store.snapshot("sampling", [ended, later])  # one that ended while the agent ran
    full_run(store, T0 + 1000, T0 + 2000)
    rows = {r["remote_address"]: r for r in store.rows()}
    store.close()
    assert (rows["9.9.9.9"]["first_seen"], rows["9.9.9.9"]["last_seen"]) == (T0 + 999, T0 + 999)
    assert rows["9.9.9.9"]["open"] == 0
    assert rows["9.9.9.11"]["first_seen"] == T0 + 1011
    code, lines = audit(path, T0 + 1000, T0 + 2000)
    assert code == 1, lines
    assert "2 unexpected external connection(s) to 2 destination(s)" in verdict(lines)
    assert not [line for line in lines if "9.9.9.9 " in line]


def test_an_old_store_opens_and_is_chained(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "history.db"
    shutil.copy(Path(__file__).parent / "data" / "history-v1.db", path)
    store = HistoryStore(str(path), retention_days=0, max_rows=0)
    assert store.count() == 3
    check = store.verify_chain()
    store.close()
    assert check.chained and check.intact, check.broken


# --- a window that ends now ------------------------------------------------------------------


def test_a_live_audit_ends_at_the_running_agents_last_heartbeat(tmp_path: Path) -> None:
    now = time.time()
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0)
    run_id = store.start_run(
        RunStart("watch", 1, "h", "m", "0.test", 30.0, "tracefs"), at=now - 900
    )
    assert run_id is not None
    assert store.heartbeat(
        run_id, RunFigures("tracefs", tcp_active_opens=1, outbound_tcp_seen=1), at=now - 5
    )
    store.close()
    result = egress_agent(
        "audit", "--since", str(now - 600), "--history", str(path), "--format", "json"
    )
    document = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout  # not a gap for the seconds since the heartbeat
    assert int(document["window"]["until"]) == int(now - 5)


def test_a_dead_agents_audit_still_ends_now(tmp_path: Path) -> None:
    now = time.time()
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0)
    run_id = store.start_run(
        RunStart("watch", 1, "h", "m", "0.test", 30.0, "tracefs"), at=now - 900
    )
    assert run_id is not None
    assert store.heartbeat(run_id, RunFigures("tracefs"), at=now - 300)  # killed 5 minutes ago
    store.close()
    result = egress_agent(
        "audit", "--since", str(now - 600), "--history", str(path), "--format", "json"
    )
    document = json.loads(result.stdout)
    assert result.returncode == 3, result.stdout
    assert document["window"]["until"] >= now
    assert document["coverage"]["reasons"][0]["reason"] == "not_running"


def test_a_clock_set_from_1970_by_ntp_leaves_earlier_boots_alone(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    earlier = Clocks(T0 - 7 * DAY)  # a week ago, the host ran with a right clock
    store = earlier.store(path, retention_days=30, max_rows=0)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"))
    assert run_id is not None
    earlier.advance(DAY)
    assert store.heartbeat(run_id, RunFigures("tracefs"), stopped=True)
    store.close()
    clocks = Clocks(3600.0)  # then it boots without a real-time clock: 1970
    store = HistoryStore(
        str(path),
        retention_days=30,
        max_rows=0,
        clock=lambda: clocks.wall,
        boot_clock=lambda: clocks.boot,
        boot_id="boot-2",
    )
    assert store.snapshot("sampling", [connection()])  # written at 1970-01-01T01:00:00Z
    clocks.advance(120)
    clocks.wall = T0  # NTP sets the clock
    assert store.snapshot("sampling", [connection(remote_address="9.9.9.10")])
    (jump,) = store.losses(since=T0 - 8 * DAY)
    rows = {r["remote_address"] for r in store.rows()}
    store.close()
    assert rows == {"9.9.9.9", "9.9.9.10"}  # retention did not take the 1970 row at once
    # doubtful since the earlier boot last wrote, not from 1970
    assert jump["kind"] == "clock_jump" and jump["end"] == T0
    assert T0 - 6 * DAY <= jump["start"] < T0
    code, lines = audit(path, T0 - 7 * DAY + 60, T0 - 6 * DAY - 60)  # the earlier boot's day
    assert code == 0, lines
