"""`egress-agent audit` on history files: each outcome's exit status and one-line reason, the
JSON form, and a history file that is read but never touched."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from history_fixture import connection, egress_agent, run, write_history

from agent.history import HistoryStore
from agent.records import Connection

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
WINDOW = ("--since", str(T0), "--until", str(T0 + 3600))
FULL_RUN = run(T0 - 60, T0 + 3700)


def audit(history: str, *args: str) -> Tuple[int, List[str], str]:
    result = egress_agent("audit", *WINDOW, "--history", history, *args)
    return result.returncode, result.stdout.splitlines(), result.stderr


def verdict(lines: List[str]) -> str:
    (line,) = [line for line in lines if line.startswith("verdict: ")]
    return line


def history(tmp_path: Path, connections: List[Connection], runs: List[Dict[str, Any]]) -> str:
    samples = [(T0 + 600, connections), (T0 + 660, connections), (T0 + 720, [])]
    return write_history(str(tmp_path / "history.db"), samples, runs)


def test_no_external_connection_and_fully_covered_is_clean(tmp_path: Path) -> None:
    code, lines, _ = audit(history(tmp_path, [], [FULL_RUN]))
    assert code == 0, lines
    assert verdict(lines).startswith("verdict: clean (exit 0): nothing unexpected went out (0 ")
    assert "agent running: 100.0% of the window (1 run(s), no gap)" in lines


def test_an_allowed_connection_is_clean(tmp_path: Path) -> None:
    allowed = connection(allowlisted=True, allow_rule="package mirrors")
    code, lines, _ = audit(history(tmp_path, [allowed], [FULL_RUN]))
    assert code == 0, lines
    assert "nothing unexpected went out (1 expected external connection(s))" in verdict(lines)
    assert "external connections: 1 to 1 destination(s) by 1 process(es); unexpected: 0" in (
        "\n".join(lines)
    )


def test_an_unexpected_connection_exits_1(tmp_path: Path) -> None:
    code, lines, _ = audit(
        history(tmp_path, [connection(), connection(local_port=40001)], [FULL_RUN])
    )
    assert code == 1, lines
    assert verdict(lines) == (
        "verdict: unexpected (exit 1): 2 unexpected external connection(s) to 1 destination(s) "
        "by 1 process(es) went out"
    )
    assert any(
        line.startswith("  curl (pid 100, user root, /usr/bin/curl) -> 9.9.9.9 port 443/tcp")
        for line in lines
    )


def test_a_gap_in_the_running_time_is_incomplete_evidence(tmp_path: Path) -> None:
    runs = [run(T0 - 60, T0 + 1200), run(T0 + 1500, None, last_heartbeat=T0 + 3590)]
    code, lines, _ = audit(history(tmp_path, [], runs))
    assert code == 3, lines
    assert verdict(lines) == (
        "verdict: incomplete (exit 3): nothing unexpected was seen, but the evidence is "
        "incomplete: the agent was not running for 5m10s of the window (2 gap(s), the first "
        "2026-01-01T00:20:00Z to 2026-01-01T00:25:00Z)"
    )
    # the killed run covers until its last heartbeat, 10 s before the window ends
    assert "  not running: 2026-01-01T00:59:50Z to 2026-01-01T01:00:00Z" in lines
    assert "  not running: 2026-01-01T00:20:00Z to 2026-01-01T00:25:00Z" in lines


def test_lost_events_are_incomplete_evidence(tmp_path: Path) -> None:
    code, lines, _ = audit(history(tmp_path, [], [run(T0 - 60, T0 + 3700, events_lost=12)]))
    assert code == 3, lines
    assert verdict(lines).endswith("the evidence is incomplete: 12 kernel event(s) were lost")


def test_sampling_is_incomplete_evidence(tmp_path: Path) -> None:
    sampled = run(T0 - 60, T0 + 3700, events_source="sampling", outbound_tcp_seen=4)
    code, lines, _ = audit(history(tmp_path, [], [sampled]))
    assert code == 3, lines
    assert (
        "used sampling, which can miss connections that open and close between two samples "
        "(4 of 10 kernel TCP connects seen)" in verdict(lines)
    )


def test_no_run_recorded_is_incomplete_evidence(tmp_path: Path) -> None:
    code, lines, _ = audit(history(tmp_path, [], []))
    assert code == 3
    assert verdict(lines).endswith("no agent run is recorded in the window")
    assert lines[0] == "host: unknown (no agent run recorded in the window)"


def test_unexpected_wins_over_incomplete_and_says_both(tmp_path: Path) -> None:
    code, lines, _ = audit(history(tmp_path, [connection()], [run(T0 + 100, T0 + 3700)]))
    assert code == 1
    assert "went out; the evidence is also incomplete: the agent was not running for 1m40s" in (
        verdict(lines)
    )


def test_json_for_machines(tmp_path: Path) -> None:
    runs = [run(T0 - 60, T0 + 1200), run(T0 + 1500, T0 + 3700, events_lost=2)]
    code, lines, _ = audit(history(tmp_path, [connection()], runs), "--format", "json")
    document = json.loads("\n".join(lines))
    assert code == 1 and document["exit_code"] == 1 and document["outcome"] == "unexpected"
    assert document["hosts"] == [
        {"hostname": "web-1", "machine_id": "0f5e1c2a9b7d4e3f8a6b5c4d3e2f1a0b"}
    ]
    assert document["window"]["since_iso"] == "2026-01-01T00:00:00Z"
    assert (document["external_connections"], document["unexpected_processes"]) == (1, 1)
    assert document["unexpected"][0]["remote_address"] == "9.9.9.9"
    coverage = document["coverage"]
    assert coverage["complete"] is False and coverage["events_lost"] == 2
    assert coverage["gaps"] == [{"start": T0 + 1200, "end": T0 + 1500}]
    assert coverage["running_share"] == pytest.approx(3300 / 3600, abs=1e-6)
    assert len(coverage["runs"]) == 2


def test_hostile_process_text_stays_on_its_line(tmp_path: Path) -> None:
    name = "evil\n\x1b[31mverdict: clean (exit 0)\u202e"
    code, lines, _ = audit(
        history(tmp_path, [connection(name=name, path=os.fsdecode(b"/tmp/\xff"))], [FULL_RUN])
    )
    assert code == 1
    (line,) = [line for line in lines if line.startswith("  evil")]
    assert line.startswith("  evil\\n\\x1b[31mverdict: clean (exit 0)\\u202e (pid 100")
    assert "/tmp/\\xff" in line
    assert len([line for line in lines if line.startswith("verdict:")]) == 1


def _fingerprint(directory: Path) -> Dict[str, Tuple[str, int]]:
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in directory.iterdir()
    }


def test_the_history_file_is_read_never_touched(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    evidence.mkdir()
    path = history(evidence, [connection()], [FULL_RUN])
    before = _fingerprint(evidence)
    assert sorted(before) == ["history.db"]  # no -wal or -shm: what an auditor copies
    page = str(tmp_path / "report.html")
    for args in (("audit", *WINDOW), ("report", *WINDOW), ("report", *WINDOW, "--html", page)):
        result = egress_agent(*args, "--history", path)
        assert result.returncode in (0, 1), result.stderr
    assert _fingerprint(evidence) == before


def test_a_live_store_is_read_with_its_wal_and_left_as_it_was(tmp_path: Path) -> None:
    """A writer holds the store open: the last sample is only in the -wal file."""
    path = history(tmp_path, [], [FULL_RUN])
    writer = HistoryStore(path, retention_days=0, max_rows=0)
    try:
        assert writer.snapshot("sampling", [connection()], at=T0 + 1800)
        assert os.path.getsize(path + "-wal") > 0
        before = _fingerprint(tmp_path)
        code, lines, _ = audit(path)
        assert code == 1, lines  # the connection in the -wal was read
        assert _fingerprint(tmp_path) == before
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (
            b"not a database at all, but a file an auditor was handed" * 100,
            "is not a history store",
        ),
        (None, "is not a history store: it has no history table"),
    ],
)
def test_a_file_that_is_not_a_history_is_refused_and_left_in_place(
    tmp_path: Path, content: Any, says: str
) -> None:
    path = tmp_path / "history.db"
    if content is None:
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE something (x)")
        other.commit()
        other.close()
    else:
        path.write_bytes(content)
    before = _fingerprint(tmp_path)
    for command in ("audit", "report"):
        result = egress_agent(command, *WINDOW, "--history", str(path))
        assert result.returncode == 2
        assert says in result.stderr and str(path) in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert _fingerprint(tmp_path) == before


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    path = history(tmp_path, [], [FULL_RUN])
    missing = egress_agent("audit", *WINDOW, "--history", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "none.db: No such file or directory" in missing.stderr
    assert egress_agent("audit", "--history", path).returncode == 2  # --since is required
    backwards = egress_agent("audit", "--since", "2h", "--until", "3h", "--history", path)
    assert backwards.returncode == 2 and "must be later than --since" in backwards.stderr
    bad = egress_agent("audit", "--since", "2026-01-01T00:00:00", "--history", path)
    assert bad.returncode == 2 and "no time zone: add Z or an offset" in bad.stderr
