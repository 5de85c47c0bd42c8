"""The background sampler's figures and history feed, and the ActiveOpens coverage counter."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import FrozenSet, List, Optional

import pytest

from agent import coverage
from agent.history import HistoryStore
from agent.osquery.monitor import Monitor, Snapshot
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


class Samples:
    def __init__(self, *samples: List[Connection]) -> None:
        self.samples = list(samples)

    def __call__(self, pids: Optional[FrozenSet[int]]) -> Snapshot:
        connections = self.samples.pop(0) if self.samples else []
        return Snapshot(connections, sockets_seen=10, namespaces_seen=2, active_opens={1: 0})


def test_figures_and_history(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "h.db"))
    samples = Samples(
        [outbound(1), outbound(2)],
        [outbound(2), outbound(3), outbound(4, protocol=17)],
        [],
        [outbound(2)],
    )
    monitor = Monitor(samples, store, 1.0, logging.getLogger("test"))
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


def test_internal_rows_stay_out_of_history(tmp_path: Path) -> None:
    store = HistoryStore(str(tmp_path / "h.db"))
    internal = Connection(pid=1, remote_address="10.0.0.1", external=False)
    Monitor(Samples([internal]), store, 1.0, logging.getLogger("test")).sample_once()
    assert store.rows() == []


def test_a_failing_sampler_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    calls: List[int] = []

    def flaky(pids: Optional[FrozenSet[int]]) -> Snapshot:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError("proc went away")
        return Snapshot([])

    monitor = Monitor(flaky, None, 1.0, logging.getLogger("test.flaky"), active_opens=dict)
    with caplog.at_level(logging.INFO, logger="test.flaky"):
        results = [monitor.sample_once() for _ in range(4)]
    assert results == [False, False, False, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["sampling failed: OSError: proc went away", "sampling works again"]
    assert monitor.stats().samples_total == 1


def test_run_samples_until_stopped() -> None:
    stop = threading.Event()
    seen: List[int] = []

    def sample(pids: Optional[FrozenSet[int]]) -> Snapshot:
        seen.append(1)
        if len(seen) == 3:
            stop.set()
        return Snapshot([])

    monitor = Monitor(sample, None, 0.01, logging.getLogger("test"), active_opens=dict)
    thread = threading.Thread(target=monitor.run, args=(stop,))
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert len(seen) == 3
