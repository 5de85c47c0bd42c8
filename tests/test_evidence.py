"""Evidence for a window, as plain data: run spans, gaps, the coverage rules, the counts; and
the time arguments of report and audit."""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict

import pytest
from history_fixture import run

from agent.cli import _moment
from agent.evidence import Span, Window, coverage_of, evidence_of, gaps, run_span

WINDOW = Window(1000, 2000)


def row(**fields: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = dict(
        pid=1,
        name="curl",
        process_uuid="u1",
        remote_address="9.9.9.9",
        remote_port=443,
        protocol=6,
        direction="outbound",
        external=True,
        allowlisted=False,
        first_seen=1100,
        last_seen=1200,
        connections=2,
        open=0,
    )
    values.update(fields)
    return values


def test_a_run_covers_to_its_stop_or_its_last_heartbeat() -> None:
    # issue 25: a killed run is not granted one more interval it never witnessed
    assert run_span(run(100, 200)) == Span(100, 200)
    assert run_span(run(100, None, last_heartbeat=150, heartbeat_interval=30)) == Span(100, 150)
    assert run_span(run(100, None, last_heartbeat=None, heartbeat_interval=30)) == Span(100, 100)


def test_runs_that_cover_the_window_leave_no_gap() -> None:
    coverage = coverage_of([run(900, 1500), run(1400, 2100)], WINDOW)
    assert coverage.gaps == () and coverage.share == 1.0 and coverage.complete
    assert coverage.events_lost == 0 and coverage.sources == ("tracefs",)


def test_gaps_are_the_parts_no_run_covers() -> None:
    coverage = coverage_of([run(1100, 1300), run(1250, 1500), run(1800, 1900)], WINDOW)
    assert coverage.gaps == (Span(1000, 1100), Span(1500, 1800), Span(1900, 2000))
    assert coverage.share == pytest.approx(0.5)
    assert not coverage.complete
    assert coverage.shortfalls[0].startswith("the agent was not running for 8m20s of the window")
    assert gaps([], WINDOW) == [Span(1000, 2000)]


def test_runs_outside_the_window_do_not_count() -> None:
    coverage = coverage_of([run(0, 900, events_lost=5), run(2100, 2200)], WINDOW)
    assert coverage.runs == () and coverage.events_lost == 0
    assert coverage.shortfalls == ("no agent run is recorded in the window",)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"events_lost": 3}, "3 kernel event(s) were lost"),
        ({"events_source": "sampling", "outbound_tcp_seen": 7}, "7 of 10 kernel TCP connects"),
        ({"outbound_tcp_seen": 9}, "the kernel counted more TCP connects than the events showed"),
    ],
)
def test_each_rule_of_full_coverage(fields: Dict[str, Any], says: str) -> None:
    coverage = coverage_of([run(900, 2100, **fields)], WINDOW)
    assert coverage.share == 1.0 and not coverage.complete
    assert len(coverage.shortfalls) == 1 and says in coverage.shortfalls[0]


def test_evidence_keeps_outbound_external_rows_that_overlap_the_window() -> None:
    rows = [
        row(),
        row(process_uuid="u2", pid=2, allowlisted=True, connections=3),
        row(process_uuid="u3", remote_address="1.1.1.1"),
        row(direction="inbound"),
        row(external=False),
        row(first_seen=100, last_seen=900),
        row(first_seen=2100, last_seen=2200),
    ]
    evidence = evidence_of(rows, [run(900, 2100)], WINDOW)
    assert len(evidence.rows) == 3
    assert (evidence.connections, evidence.processes, evidence.destinations) == (7, 3, 2)
    assert (evidence.unexpected_connections, evidence.unexpected_processes) == (4, 2)
    assert [(h.hostname, h.machine_id) for h in evidence.hosts] == [
        ("web-1", "0f5e1c2a9b7d4e3f8a6b5c4d3e2f1a0b")
    ]


def test_times_unix_seconds_iso_8601_and_durations_ago() -> None:
    assert _moment("1767225600") == 1767225600.0
    assert _moment("2026-01-01T00:00:00Z") == 1767225600.0
    assert _moment("2026-01-01T01:30:00+01:30") == 1767225600.0
    before = time.time()
    moment = _moment("2h")
    assert before - 7200 <= moment <= time.time() - 7200
    assert _moment("7d") <= time.time() - 7 * 86400


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("2026-01-01T00:00:00", "no time zone"),
        ("yesterday", "not a time"),
        ("-2h", "not a time"),
        ("", "not a time"),
    ],
)
def test_bad_times_are_refused_by_name(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        _moment(text)
