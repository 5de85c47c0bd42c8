"""The osquery extension as a measured method, and its cost over time.

Plug-in point: ``start_extension(interval)`` starts the extension (``agent``'s osquery
extension) registered with the Thrift stand-in of osqueryd (``tests/osquery_core.py``) and
returns an ``ExtensionHarness``.  Until that is wired it raises ``Unavailable`` and the
benchmark prints the method as n/a.

``ExtensionGenerate`` times ``harness.generate()``: one ``external_connections`` generate
request through the stand-in (the Thrift round trip included, as osqueryd pays it); peak RSS is
the extension's ``VmHWM``.  ``over_time`` runs the extension for a while with its own sampling
interval and reports its CPU share of one core and its RSS along the way
(``/proc/PID/stat`` utime+stime, ``/proc/PID/status`` VmRSS; proc(5)).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

from bench.measure import Method, Sample, Unavailable


class ExtensionHarness(Protocol):
    """A running extension behind the stand-in core."""

    @property
    def pids(self) -> Sequence[int]:
        """The extension's processes: their CPU time and RSS are what is measured."""

    def generate(self) -> int:
        """One ``external_connections`` generate through the stand-in; returns the row count."""

    def close(self) -> None:
        """Stop the extension and the stand-in (idempotent)."""


def start_extension(interval: float = 5.0) -> ExtensionHarness:
    """Plug-in point: start the extension with sampling ``interval`` behind the stand-in core.

    To wire: start ``tests/osquery_core.py`` (the Thrift stand-in) and the extension process
    registered with it, wait until ``external_connections`` is registered, and return an object
    with ``pids``, ``generate()`` and ``close()``.
    """
    raise Unavailable("the osquery extension is not wired into bench.extension.start_extension")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (proc(5): fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


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

    def describe(self) -> str:
        return "bench.extension.start_extension(interval).generate()"

    def open(self) -> None:
        self._harness = self._start(self.interval)
        self._harness.generate()  # untimed: the first request may register and warm up

    def measure(self) -> Sample:
        assert self._harness is not None
        started = time.perf_counter()
        rows = self._harness.generate()
        ms = (time.perf_counter() - started) * 1000
        rss = max(memory_kb(pid, "VmHWM") for pid in self._harness.pids)
        return Sample(ms=ms, rows=rows, rss_kb=rss)

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
    finally:
        harness.close()
    return result
