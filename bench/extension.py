"""The osquery extension as a measured method, and its cost over time.

``start_extension(interval)`` starts the extension as osqueryd's autoloader does, through the
Thrift stand-in of osquery core (``tests/osquery_core.py``): ``python -m agent.cli extension
--socket S --timeout T --interval I`` with ``OSQUERY_EXTENSION`` set, and a configuration of its
own (sampling interval ``interval``, history in a temporary directory) through
``EGRESS_AGENT_CONFIG``.  It returns an ``ExtensionHarness`` once the extension has registered.

``ExtensionGenerate`` times ``harness.generate()``: one ``external_connections`` generate
request through the stand-in (the Thrift round trip included, as osqueryd pays it, and the
stand-in's pure-Python decoding, which osqueryd does in C++); beside it, the extension's own CPU
for the request (every thread's ``sum_exec_runtime`` from ``/proc/PID/task/*/schedstat``,
nanoseconds: the tick counts of ``/proc/PID/stat`` are 10 ms coarse).  Each request comes more
than a second after the previous one ended, so it takes a sample of its own (the live table
answers a call within a second of the last one from that one's sample).  Peak RSS is the
extension's ``VmHWM``.  ``over_time`` runs the extension for a while with its own sampling
interval and reports its CPU share of one core and its RSS along the way
(``/proc/PID/stat`` utime+stime, ``/proc/PID/status`` VmRSS; proc(5)).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from bench.measure import REPO_ROOT, Method, Sample


class ExtensionHarness(Protocol):
    """A running extension behind the stand-in core."""

    @property
    def pids(self) -> Sequence[int]:
        """The extension's processes: their CPU time and RSS are what is measured."""

    def generate(self) -> int:
        """One ``external_connections`` generate through the stand-in; returns the row count."""

    def info(self) -> Dict[str, str]:
        """The extension's ``egress_agent_info`` row."""

    def close(self) -> None:
        """Stop the extension and the stand-in (idempotent)."""


CORE_PING_INTERVAL = 3.0
"""osqueryd's default ``--extensions_interval``: how often the extension pings core."""


class StandInExtension:
    """The extension launched and registered by the stand-in core, with one client connection
    kept open across generates (as osqueryd keeps its client to an extension)."""

    TABLE = "external_connections"

    def __init__(self, interval: float, history_path: str = "") -> None:
        tests_dir = os.path.join(REPO_ROOT, "tests")
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        import osquery_core  # tests/osquery_core.py, the stand-in of osquery core

        self._directory = tempfile.mkdtemp(prefix="eab-ext-")
        config = os.path.join(self._directory, "config.yaml")
        with open(config, "w") as f:
            f.write(
                f"sampling:\n  interval: {interval:g}\n"
                f"history:\n  path: {history_path or os.path.join(self._directory, 'history.db')}\n"
            )
        self._core: Any = osquery_core.CoreStandIn().start()
        self._connection: Any = None
        try:
            self._process = self._core.launch(
                osquery_core.default_extension_command(),
                timeout=3,
                interval=CORE_PING_INTERVAL,
                env={"EGRESS_AGENT_CONFIG": config},
            )
            registration = self._core.wait_for_registration(
                "egress_agent", 60, process=self._process
            )
            self._connection = self._core.connect(registration, timeout=120)
            self._connection.columns(self.TABLE)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> Sequence[int]:
        return [self._process.pid]

    def generate(self) -> int:
        return len(self._connection.generate(self.TABLE))

    def info(self) -> Dict[str, str]:
        (row,) = self._connection.generate("egress_agent_info")
        return dict(row)

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.shutdown()  # as core does: the extension ends itself cleanly
                self._process.wait(timeout=5)
            except Exception:  # noqa: S110 - core.close() below kills it by pid
                pass
            connection.close()
        if self._core is not None:
            core, self._core = self._core, None
            core.close()  # ends the extension (by pid) and removes the core's directory
        shutil.rmtree(self._directory, ignore_errors=True)


def start_extension(interval: float = 5.0) -> ExtensionHarness:
    """The extension with sampling ``interval`` behind the stand-in core, registered."""
    return StandInExtension(interval)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5): fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (the first field of each
    ``/proc/PID/task/TID/schedstat``: ``se.sum_exec_runtime``, ``Documentation/scheduler/
    sched-stats.rst``).  A thread that ended took its time with it."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def memory_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` line in KB: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class ExtensionGenerate(Method):
    key = "extension"
    label = "extension generate"

    def __init__(
        self, interval: float = 5.0, start: Callable[[float], ExtensionHarness] = start_extension
    ) -> None:
        self.interval = interval
        self._start = start
        self._harness: Optional[ExtensionHarness] = None
        self._last_end = 0.0

    def describe(self) -> str:
        return "bench.extension.start_extension(interval).generate()"

    GAP_S = 1.1
    """Seconds between the end of one request and the next: more than the live table's
    ``REUSE_GAP_S`` (agent/osquery/external_connections.py), so that each takes a sample of its
    own."""

    def open(self) -> None:
        self._harness = self._start(self.interval)
        self._harness.generate()  # untimed: the first request may register and warm up
        self._last_end = time.monotonic()

    def measure(self) -> Sample:
        assert self._harness is not None
        time.sleep(max(0.0, self._last_end + self.GAP_S - time.monotonic()))
        pids = self._harness.pids
        cpu_before = sum(cpu_ns(pid) for pid in pids)
        started = time.perf_counter()
        rows = self._harness.generate()
        ms = (time.perf_counter() - started) * 1000
        cpu = (sum(cpu_ns(pid) for pid in pids) - cpu_before) / 1e6
        self._last_end = time.monotonic()
        rss = max(memory_kb(pid, "VmHWM") for pid in pids)
        return Sample(ms=ms, rows=rows, rss_kb=rss, cpu_ms=cpu)

    def close(self) -> None:
        if self._harness is not None:
            harness, self._harness = self._harness, None
            harness.close()


@dataclass
class OverTime:
    """The extension's cost over ``duration`` seconds: (seconds, CPU seconds, RSS KB) samples."""

    duration: float
    interval: float
    query_every: float
    idle_rss_kb: int = 0
    points: List[Tuple[float, float, int]] = field(default_factory=list)
    generates: int = 0
    info_before: Dict[str, str] = field(default_factory=dict)
    info_after: Dict[str, str] = field(default_factory=dict)
    """``egress_agent_info`` at the first and the last point: the event source and coverage."""

    @property
    def cpu_share(self) -> float:
        """Percent of one core over the run (after the idle point)."""
        (t0, c0, _), (t1, c1, _) = self.points[0], self.points[-1]
        return 100.0 * (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def rss_drift_kb(self) -> int:
        return self.points[-1][2] - self.points[0][2]


def over_time(
    duration: float,
    interval: float = 5.0,
    query_every: float = 0.0,
    sample_every: float = 10.0,
    start: Callable[[float], ExtensionHarness] = start_extension,
    log: Callable[[str], None] = lambda _msg: None,
) -> OverTime:
    """Run the extension for ``duration`` s; ``query_every`` > 0 also issues generates."""
    result = OverTime(duration=duration, interval=interval, query_every=query_every)
    harness = start(interval)
    try:
        time.sleep(interval)  # one sampling interval before the first point: "idle" after start
        result.idle_rss_kb = sum(memory_kb(pid, "VmRSS") for pid in harness.pids)

        def point() -> None:
            cpu = sum(cpu_seconds(pid) for pid in harness.pids)
            rss = sum(memory_kb(pid, "VmRSS") for pid in harness.pids)
            result.points.append((time.monotonic() - began, cpu, rss))

        result.info_before = harness.info()
        began = time.monotonic()
        point()
        next_point = began + sample_every
        next_query = began + query_every if query_every > 0 else float("inf")
        end = began + duration
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_query:
                harness.generate()
                result.generates += 1
                next_query += query_every
            if now >= next_point:
                point()
                log(f"over time: {result.points[-1][0]:.0f} s, RSS {result.points[-1][2]} KB")
                next_point += sample_every
            time.sleep(max(0.0, min(next_point, next_query, end) - time.monotonic()))
        point()
        result.info_after = harness.info()
    finally:
        harness.close()
    return result
