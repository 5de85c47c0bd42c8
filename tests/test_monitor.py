"""The background loop's figures, history feed and runs, and the ActiveOpens coverage counter.

The loop is fed by a scripted sampler (tests/fakes.py): these tests need sequences and failures
on demand; the real sampler feeds it in test_extension and test_cli_check."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import FrozenSet, List, Optional

import pytest
from fakes import FunctionSampler, monitor_of

from agent import coverage
from agent.collect import NamespaceStats, SampleStats
from agent.history import HistoryStore
from agent.records import Connection


def test_this_hosts_namespaces_are_read() -> None:
    counts = coverage.active_opens_by_namespace()
    assert counts, "at least our own namespace"
    assert all(value >= 0 for value in counts.values())


def test_active_opens_growth() -> None:
    growth = coverage.ActiveOpensGrowth()
    assert growth.update({1: 100, 2: 50}) == 0  # present at start: counted from here
    assert growth.update({1: 105, 2: 50}) == 5
    assert growth.update({1: 105, 2: 52, 3: 7}) == 14  # a new namespace counts from zero
    assert growth.update({1: 106, 3: 7}) == 15  # 2 missed one read: it keeps its share
    assert growth.update({1: 106, 2: 53, 3: 7}) == 16
    assert growth.update({1: 106, 2: 53, 3: 2}) == 18  # inode 3 reused: 7 kept, 2 new
    for _ in range(coverage.ActiveOpensGrowth.RETIRE_AFTER):
        growth.update({1: 106})
    assert growth.total == 18  # retired namespaces keep what they contributed
    assert growth.update({1: 106, 2: 1}) == 19  # after retirement: a new namespace


def outbound(port: int, remote: str = "2001:db8::1", protocol: int = 6) -> Connection:
    return Connection(
        pid=5,
        process_uuid="u5",
        socket=port,
        local_port=port,
        remote_address=remote,
        remote_port=443,
        protocol=protocol,
        external=True,
    )


def scripted(*samples: List[Connection]) -> FunctionSampler:
    """Each sample in turn (then empty ones), seen in two namespaces with 10 sockets."""
    queue = list(samples)

    def stats(rows: List[Connection]) -> SampleStats:
        namespaces = [NamespaceStats(1, 1, active_opens=0), NamespaceStats(2, 2)]
        return SampleStats(sockets=10, namespaces=2, rows=len(rows), per_namespace=namespaces)

    return FunctionSampler(lambda pids: queue.pop(0) if queue else [], stats)


def test_figures_and_history(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "h.db"))
    sampler = scripted(
        [outbound(1), outbound(2)],
        [outbound(2), outbound(3), outbound(4, protocol=17)],
        [],
        [outbound(2)],
    )
    monitor = monitor_of(sampler, store)
    for _ in range(4):
        assert monitor.sample_once()
    stats = monitor.stats()
    assert stats.samples_total == 4
    assert (stats.sockets_seen, stats.namespaces_seen, stats.tcp_active_opens) == (10, 2, 0)
    assert stats.last_sample_ms is not None and stats.last_sample_ms >= 0
    # 1, 2, 3 and 2 again after a sample without it; UDP does not count
    assert stats.outbound_tcp_seen == 4
    rows = store.rows()
    assert {(r["protocol"], r["samples"], r["connections"], r["open"]) for r in rows} == {
        (6, 3, 4, 1),
        (17, 1, 1, 0),
    }
    assert {r["seen_by"] for r in rows} == {"sampling"}


def test_internal_rows_stay_out_of_history(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "h.db"))
    internal = Connection(pid=1, remote_address="10.0.0.1", external=False)
    monitor_of(scripted([internal]), store).sample_once()
    assert store.rows() == []


def test_a_failing_sampler_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    calls: List[int] = []

    def flaky(pids: Optional[FrozenSet[int]]) -> List[Connection]:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError("proc went away")
        return []

    monitor = monitor_of(FunctionSampler(flaky), logger=logging.getLogger("test.flaky"))
    with caplog.at_level(logging.INFO, logger="test.flaky"):
        results = [monitor.sample_once() for _ in range(4)]
    assert results == [False, False, False, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["sampling failed: OSError: proc went away", "sampling works again"]
    assert monitor.stats().samples_total == 1


def test_a_fatal_error_ends_the_loop() -> None:
    """``watch`` stops on a sampler that cannot work at all; the extension keeps trying."""

    def no_proc(pids: Optional[FrozenSet[int]]) -> List[Connection]:
        raise LookupError("no /proc")

    monitor = monitor_of(FunctionSampler(no_proc))
    with pytest.raises(LookupError):
        monitor.run(threading.Event(), fatal=(LookupError,))
    assert monitor.sample_once() is False


def three_samples(stop: threading.Event, rows: List[Connection]) -> FunctionSampler:
    """A sampler that asks the loop to stop at its third sample; how often it was asked."""
    seen: List[int] = []

    def sample(pids: Optional[FrozenSet[int]]) -> List[Connection]:
        seen.append(1)
        if len(seen) == 3:
            stop.set()
        return rows

    return FunctionSampler(sample)


def test_run_samples_until_stopped() -> None:
    stop = threading.Event()
    sampler = three_samples(stop, [])
    thread = threading.Thread(target=monitor_of(sampler, interval=0.01).run, args=(stop,))
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert len(sampler.asked) == 3


def test_queries_and_background_samples_differ() -> None:
    """The extension counts outbound TCP only in background samples: a query pays only for the
    rows it returns."""
    sampler = FunctionSampler(lambda pids: [outbound(1)])
    monitor = monitor_of(sampler)
    monitor.live(frozenset({1}))
    assert monitor.sample_once()
    assert sampler.asked == [(frozenset({1}), False), (None, True)]
    assert monitor.stats().outbound_tcp_seen == 1


def test_the_run_is_recorded_with_heartbeats_and_stop(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "h.db"))
    clock = iter(range(1000, 2000, 5))
    stop = threading.Event()
    monitor = monitor_of(
        three_samples(stop, [outbound(1)]),
        store,
        interval=0.01,
        run_kind="watch",
        clock=lambda: next(clock),
    )
    monitor.run(stop)
    (run,) = store.runs()
    assert run["kind"] == "watch" and run["heartbeat_interval"] == 0.01
    assert run["started_at"] == 1000
    assert run["stopped_at"] is not None and run["stopped_at"] >= run["last_heartbeat"]
    assert run["events_source"] == "sampling" and run["outbound_tcp_seen"] == 1
