"""What the history says about a time window: which external connections went out, and
whether the agent was watching all the time.

Plain data in, plain data out.  Rows and runs are the dicts the history store returns
(``HistoryStore.query`` and ``HistoryStore.runs``, keys :data:`ROW_KEYS` and :data:`RUN_KEYS`),
so ``report`` and ``audit`` are tested on lists and work over any store that offers those two
calls; :func:`read_evidence` is the only code that calls them.

A run covers ``[started_at, stopped_at]``, or ``[started_at, last_heartbeat +
heartbeat_interval]`` when it has no stop (still running, or killed: the next heartbeat was
due by then).  The window is *fully covered* when all of these hold (:attr:`Coverage.complete`;
each one that fails is a line of :attr:`Coverage.shortfalls`):

1. runs cover every second of the window;
2. no run that overlaps the window lost events (``events_lost`` 0);
3. every such run took its connections from kernel events (``events_source`` ``tracefs``),
   which see each TCP connect as it happens.  Sampling reads the socket tables every interval
   and misses a connection that opens and closes between two samples, so sampling is
   incomplete evidence however often it ran;
4. the events account for every connect the kernel counted: ``outbound_tcp_seen`` is at least
   ``tcp_active_opens`` (RFC 1213 ``tcpActiveOpens``, summed over namespaces) for each run.

The counters are totals over each run: a run that overlaps the window counts whole.  UDP has
no kernel counter of connects, so the coverage figures are about TCP.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

from agent.collect import SAMPLING
from agent.history.schema import RUN_COLUMNS

Row = Mapping[str, Any]
"""One row of ``external_connection_history`` or one run: column name -> value."""

ROW_KEYS: Tuple[str, ...] = (
    "pid",
    "name",
    "path",
    "cmdline",
    "username",
    "process_uuid",
    "container_id",
    "systemd_unit",
    "login_user",
    "ancestors",
    "container_name",
    "container_image",
    "container_runtime",
    "pod_namespace",
    "pod_name",
    "protocol",
    "remote_address",
    "remote_port",
    "remote_domain",
    "direction",
    "external",
    "address_class",
    "allowlisted",
    "allow_rule",
    "first_seen",
    "last_seen",
    "connections",
    "open",
    "seen_by",
)
"""The history columns report and audit read (a missing one reads as empty)."""

RUN_KEYS: Tuple[str, ...] = tuple(name for name, _ in RUN_COLUMNS)
"""The keys of one agent run, as ``HistoryStore.runs`` gives them (the store's run columns)."""

EGRESS_DIRECTIONS = ("outbound", "unknown")
"""What may have gone out: outbound rows, and those whose direction the agent could not tell
(a closed connection whose process and listener are gone)."""


class HistoryReader(Protocol):
    """The two calls of the history store that report and audit need."""

    def query(
        self,
        *,
        columns: Optional[Sequence[str]] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        directions: Optional[Sequence[str]] = None,
    ) -> List[Dict[str, Any]]: ...

    def runs(
        self, since: Optional[float] = None, until: Optional[float] = None
    ) -> List[Dict[str, Any]]: ...


class Span(NamedTuple):
    """``[start, end]`` in unix seconds."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


class Window(NamedTuple):
    """The time the statement is about, ``[since, until]`` in unix seconds."""

    since: float
    until: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.until - self.since)

    def overlaps(self, span: Span) -> bool:
        return span.start <= self.until and span.end >= self.since


def iso(seconds: float) -> str:
    """``seconds`` (unix time) as UTC ISO-8601 to the second: ``2026-11-01T10:00:00Z``."""
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(seconds: float) -> str:
    """``3725`` -> ``1h2m5s``; ``0`` -> ``0s``."""
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest or not parts:
        parts.append(f"{rest}s")
    return "".join(parts)


def number(row: Row, key: str) -> float:
    """A numeric column as a float; missing, empty or not a number: 0."""
    value = row.get(key)
    if isinstance(value, bool) or value is None:
        return float(bool(value))
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return 0.0


def text(row: Row, key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def saw_every_connect(run: Row) -> bool:
    """Whether an event source fed the run (``events_source`` names one), rather than samples
    alone (``sampling``) or nothing known (an empty value, a store older than the runs)."""
    source = text(run, "events_source")
    return bool(source) and source != SAMPLING


def truthy(row: Row, key: str) -> bool:
    value = row.get(key)
    return bool(value) and value not in ("0", "false")


# --- the agent's running time ----------------------------------------------------------------


def run_span(run: Row) -> Span:
    """The time one run covers: to its stop, or to one heartbeat interval past its last
    heartbeat when it has none (still running, or killed)."""
    start = number(run, "started_at")
    if run.get("stopped_at") is not None:
        return Span(start, number(run, "stopped_at"))
    beat = run.get("last_heartbeat")
    last = start if beat is None else number(run, "last_heartbeat")
    return Span(start, max(start, last) + number(run, "heartbeat_interval"))


def covered(spans: Iterable[Span], window: Window) -> List[Span]:
    """The union of ``spans`` inside ``window``, in order, without overlaps."""
    merged: List[Span] = []
    for span in sorted(spans):
        start, end = max(span.start, window.since), min(span.end, window.until)
        if end < start:
            continue
        if merged and start <= merged[-1].end:
            merged[-1] = Span(merged[-1].start, max(merged[-1].end, end))
        else:
            merged.append(Span(start, end))
    return merged


def gaps(running: Sequence[Span], window: Window) -> List[Span]:
    """The parts of ``window`` that ``running`` (the output of :func:`covered`) leaves out."""
    result: List[Span] = []
    cursor = window.since
    for span in running:
        if span.start > cursor:
            result.append(Span(cursor, span.start))
        cursor = max(cursor, span.end)
    if cursor < window.until:
        result.append(Span(cursor, window.until))
    return result


@dataclass(frozen=True)
class Coverage:
    """How much of the window the agent saw (see the module docstring for the rules)."""

    window: Window
    runs: Tuple[Row, ...]
    running: Tuple[Span, ...]
    gaps: Tuple[Span, ...]
    sources: Tuple[str, ...]
    events_lost: int
    tcp_active_opens: int
    outbound_tcp_seen: int
    shortfalls: Tuple[str, ...]

    @property
    def running_seconds(self) -> float:
        return sum(span.seconds for span in self.running)

    @property
    def share(self) -> float:
        """The part of the window some run covered, 0.0 to 1.0."""
        if self.window.seconds <= 0:
            return 1.0 if self.running else 0.0
        return min(1.0, self.running_seconds / self.window.seconds)

    @property
    def tcp_seen_share(self) -> Optional[float]:
        """``outbound_tcp_seen / tcp_active_opens`` (capped at 1); None when nothing was
        counted."""
        if self.tcp_active_opens <= 0:
            return None
        return min(1.0, self.outbound_tcp_seen / self.tcp_active_opens)

    @property
    def complete(self) -> bool:
        return not self.shortfalls


def coverage_of(runs: Iterable[Row], window: Window) -> Coverage:
    """The coverage of ``window`` by the runs that overlap it (others are ignored)."""
    overlapping = tuple(
        sorted(
            (run for run in runs if window.overlaps(run_span(run))),
            key=lambda run: number(run, "started_at"),
        )
    )
    running = covered((run_span(run) for run in overlapping), window)
    holes = gaps(running, window)
    sources = tuple(sorted({text(run, "events_source") or "unknown" for run in overlapping}))
    lost = sum(int(number(run, "events_lost")) for run in overlapping)
    opens = sum(int(number(run, "tcp_active_opens")) for run in overlapping)
    seen = sum(int(number(run, "outbound_tcp_seen")) for run in overlapping)

    shortfalls: List[str] = []
    if not overlapping:
        shortfalls.append("no agent run is recorded in the window")
    elif holes:
        missing = sum(span.seconds for span in holes)
        first = holes[0]
        shortfalls.append(
            f"the agent was not running for {duration_text(missing)} of the window "
            f"({len(holes)} gap(s), the first {iso(first.start)} to {iso(first.end)})"
        )
    if lost:
        shortfalls.append(f"{lost} kernel event(s) were lost")
    sampled = [run for run in overlapping if not saw_every_connect(run)]
    if sampled:
        named = sorted({text(run, "events_source") or "unknown" for run in sampled})
        shortfalls.append(
            f"{len(sampled)} run(s) used {'/'.join(named)}, which can miss connections that "
            f"open and close between two samples ({seen} of {opens} kernel TCP connects seen)"
        )
    short = [
        run
        for run in overlapping
        if saw_every_connect(run)
        and number(run, "outbound_tcp_seen") < number(run, "tcp_active_opens")
    ]
    if short:
        shortfalls.append(
            f"in {len(short)} event-fed run(s) the kernel counted more TCP connects than the "
            "events showed"
        )
    return Coverage(
        window=window,
        runs=overlapping,
        running=tuple(running),
        gaps=tuple(holes),
        sources=sources,
        events_lost=lost,
        tcp_active_opens=opens,
        outbound_tcp_seen=seen,
        shortfalls=tuple(shortfalls),
    )


# --- the connections -------------------------------------------------------------------------


def is_unexpected(row: Row) -> bool:
    """An external connection that no ``allow`` rule expects."""
    return truthy(row, "external") and not truthy(row, "allowlisted")


def process_key(row: Row) -> str:
    """One process: its UUID; a row whose owner was not found (pid -1) has none."""
    return text(row, "process_uuid") or f"pid {text(row, 'pid')} {text(row, 'name')}"


def row_span(row: Row) -> Span:
    return Span(number(row, "first_seen"), number(row, "last_seen"))


@dataclass(frozen=True)
class Host:
    hostname: str
    machine_id: str


@dataclass(frozen=True)
class Evidence:
    """The external connections that went out in the window, and the coverage of it."""

    window: Window
    rows: Tuple[Row, ...]
    """Outbound external connections that overlap the window, by first_seen."""
    coverage: Coverage
    hosts: Tuple[Host, ...]
    """Every (hostname, machine_id) the runs name, latest run first."""

    @property
    def unexpected(self) -> Tuple[Row, ...]:
        return tuple(row for row in self.rows if is_unexpected(row))

    @property
    def connections(self) -> int:
        return sum(int(number(row, "connections")) or 1 for row in self.rows)

    @property
    def unexpected_connections(self) -> int:
        return sum(int(number(row, "connections")) or 1 for row in self.unexpected)

    @property
    def processes(self) -> int:
        return len({process_key(row) for row in self.rows})

    @property
    def unexpected_processes(self) -> int:
        return len({process_key(row) for row in self.unexpected})

    @property
    def destinations(self) -> int:
        return len({text(row, "remote_address") for row in self.rows})


def evidence_of(rows: Iterable[Row], runs: Iterable[Row], window: Window) -> Evidence:
    """The evidence for ``window`` from history ``rows`` and agent ``runs`` (any superset:
    rows that are not egress (:data:`EGRESS_DIRECTIONS`) and external, or do not overlap the
    window, are left out)."""
    kept = sorted(
        (
            row
            for row in rows
            if text(row, "direction") in EGRESS_DIRECTIONS
            and truthy(row, "external")
            and window.overlaps(row_span(row))
        ),
        key=lambda row: (number(row, "first_seen"), process_key(row), text(row, "remote_address")),
    )
    coverage = coverage_of(runs, window)
    hosts: Dict[Host, None] = {}
    for run in reversed(coverage.runs):
        hosts.setdefault(Host(text(run, "hostname"), text(run, "machine_id")), None)
    return Evidence(window, tuple(kept), coverage, tuple(hosts))


def read_evidence(store: HistoryReader, window: Window) -> Evidence:
    """The adapter: the window's rows and runs from ``store``, as :func:`evidence_of` takes them.

    Raises whatever the store raises when it cannot be read.
    """
    rows = store.query(
        columns=ROW_KEYS, since=window.since, until=window.until, directions=EGRESS_DIRECTIONS
    )
    runs = store.runs(since=window.since, until=window.until)
    return evidence_of(rows, runs, window)
