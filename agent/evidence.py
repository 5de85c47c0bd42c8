"""What the history says about a time window: which external connections went out, and
whether the agent was watching all the time.

Plain data in, plain data out.  Rows and runs are the dicts the history store returns
(``HistoryStore.query`` and ``HistoryStore.runs``, keys :data:`ROW_KEYS` and :data:`RUN_KEYS`),
so ``report`` and ``audit`` are tested on lists and work over any store that offers those two
calls; :func:`read_evidence` is the only code that calls them.

A run covers ``[started_at, stopped_at]``, or ``[started_at, last_heartbeat]`` when it has no
stop (still running, or killed: nothing says it watched after its last heartbeat).  The window
is *fully covered* when all of these hold (:attr:`Coverage.complete`; each one that fails is a
:class:`Shortfall`, named by its reason, with its spans where it has some):

1. runs cover every second of the window;
2. no run that overlaps the window lost events (``events_lost`` 0);
3. every such run took its connections from kernel events (``events_source`` ``tracefs``),
   which see each TCP connect as it happens.  Sampling reads the socket tables every interval
   and misses a connection that opens and closes between two samples, so sampling is
   incomplete evidence however often it ran;
4. the events account for every connect the kernel counted: ``outbound_tcp_seen`` is at least
   ``tcp_active_opens`` (RFC 1213 ``tcpActiveOpens``, summed over namespaces) for each run;
5. no loss the history recorded overlaps the window (:data:`LOSS_REASONS`: rows evicted by
   ``max_rows``, writes dropped while the store could not be written, a wall-clock jump,
   sockets the kernel tracker dropped, a reset of the tracing instance);
6. each run's wall-clock span agrees with its boot-clock span (``CLOCK_BOOTTIME``): a wall
   clock that jumped during a run would stretch its coverage over time it never saw;
7. the history is chained (:mod:`agent.history.chain`; a file from before chaining, or one
   whose chain was removed, cannot show that nothing was deleted).

The counters are totals over each run: a run that overlaps the window counts whole.  UDP has
no kernel counter of connects, so the coverage figures are about TCP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
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
from agent.timetext import duration_text, iso

if TYPE_CHECKING:
    from agent.history.chain import ChainCheck

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

LOSS_REASONS: Dict[str, str] = {
    "evicted": "unexpected egress rows were evicted to keep max_rows",
    "lost_writes": "writes were dropped while the history store could not be written",
    "clock_jump": "the wall clock jumped",
    "tracker_overflow": "the kernel event tracker dropped sockets it could not hold",
    "instance_reset": "the tracing instance was reset and its events lost",
}
"""The kinds of recorded loss (``losses.kind``) and what each means for the evidence."""

CLOCK_TOLERANCE_S = 5.0
"""A run whose wall-clock span exceeds its boot-clock span by more saw a clock jump."""

EGRESS_DIRECTIONS = ("outbound", "unknown")
"""What may have gone out: outbound rows, and those whose direction the agent could not tell
(a closed connection whose process and listener are gone)."""


class HistoryReader(Protocol):
    """The calls of the history store that report and audit need."""

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

    def losses(
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
    """The time one run covers: to its stop, or to its last heartbeat when it has none (still
    running, or killed: it is known to have watched until then, not later)."""
    start = number(run, "started_at")
    if run.get("stopped_at") is not None:
        return Span(start, max(start, number(run, "stopped_at")))
    beat = run.get("last_heartbeat")
    last = start if beat is None else number(run, "last_heartbeat")
    return Span(start, max(start, last))


def run_clock_skew(run: Row) -> Optional[float]:
    """How much longer the run's wall-clock span is than its boot-clock span (seconds), or
    None when the run did not record its boot clock (a store before schema version 3)."""
    if run.get("started_boottime") is None or run.get("last_heartbeat_boottime") is None:
        return None
    wall = number(run, "last_heartbeat") - number(run, "started_at")
    boot = number(run, "last_heartbeat_boottime") - number(run, "started_boottime")
    return wall - boot


def vouched_until(runs: Iterable[Row], now: float) -> float:
    """Where a window that ends "now" should end: at the latest heartbeat of a run still
    going (no stop, its last heartbeat within two intervals of ``now``), since a run covers
    until its last heartbeat and the seconds since are not yet vouched for; else ``now`` (an
    agent that stopped or died leaves its gap in the window)."""
    latest = None
    for run in runs:
        if run.get("stopped_at") is not None or run.get("last_heartbeat") is None:
            continue
        beat = number(run, "last_heartbeat")
        interval = max(1.0, number(run, "heartbeat_interval"))
        if now - 2 * interval <= beat <= now and (latest is None or beat > latest):
            latest = beat
    return now if latest is None else latest


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
class Shortfall:
    """One reason the evidence is incomplete: ``reason`` (``not_running``, ``events_lost``,
    ``sampling``, ``connects_unseen``, ``clock_skew``, ``unchained``, or a kind of
    :data:`LOSS_REASONS`), in words, with the spans it concerns (none when it is about whole
    runs)."""

    reason: str
    text: str
    spans: Tuple[Span, ...] = ()


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
    reasons: Tuple[Shortfall, ...]
    losses: Tuple[Row, ...] = ()

    @property
    def shortfalls(self) -> Tuple[str, ...]:
        """Each reason in words, one a line."""
        return tuple(reason.text for reason in self.reasons)

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


def coverage_of(
    runs: Iterable[Row],
    window: Window,
    losses: Iterable[Row] = (),
    chained: bool = True,
) -> Coverage:
    """The coverage of ``window`` by the runs that overlap it (others are ignored), less the
    ``losses`` recorded over it; ``chained``: whether the history has a chain at all."""
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

    shortfalls: List[Shortfall] = []
    if not overlapping:
        shortfalls.append(
            Shortfall("not_running", "no agent run is recorded in the window", (Span(*window),))
        )
    elif holes:
        missing = sum(span.seconds for span in holes)
        first = holes[0]
        shortfalls.append(
            Shortfall(
                "not_running",
                f"the agent was not running for {duration_text(missing)} of the window "
                f"({len(holes)} gap(s), the first {iso(first.start)} to {iso(first.end)})",
                tuple(holes),
            )
        )
    if lost:
        spans = tuple(run_span(run) for run in overlapping if number(run, "events_lost"))
        shortfalls.append(Shortfall("events_lost", f"{lost} kernel event(s) were lost", spans))
    sampled = [run for run in overlapping if not saw_every_connect(run)]
    if sampled:
        named = sorted({text(run, "events_source") or "unknown" for run in sampled})
        shortfalls.append(
            Shortfall(
                "sampling",
                f"{len(sampled)} run(s) used {'/'.join(named)}, which can miss connections "
                f"that open and close between two samples ({seen} of {opens} kernel TCP "
                "connects seen)",
                tuple(run_span(run) for run in sampled),
            )
        )
    short = [
        run
        for run in overlapping
        if saw_every_connect(run)
        and number(run, "outbound_tcp_seen") < number(run, "tcp_active_opens")
    ]
    if short:
        shortfalls.append(
            Shortfall(
                "connects_unseen",
                f"in {len(short)} event-fed run(s) the kernel counted more TCP connects than the "
                "events showed",
                tuple(run_span(run) for run in short),
            )
        )
    skewed = [run for run in overlapping if (run_clock_skew(run) or 0.0) > CLOCK_TOLERANCE_S]
    if skewed:
        worst = max(run_clock_skew(run) or 0.0 for run in skewed)
        shortfalls.append(
            Shortfall(
                "clock_skew",
                f"in {len(skewed)} run(s) the wall clock ran ahead of the boot clock (by up to "
                f"{duration_text(worst)}): their span covers time they did not watch",
                tuple(run_span(run) for run in skewed),
            )
        )
    kept_losses = tuple(
        sorted(
            (
                loss
                for loss in losses
                if window.overlaps(Span(number(loss, "start"), number(loss, "end")))
            ),
            key=lambda loss: (number(loss, "start"), number(loss, "end")),
        )
    )
    for kind in sorted({text(loss, "kind") for loss in kept_losses}):
        of_kind = [loss for loss in kept_losses if text(loss, "kind") == kind]
        spans = tuple(Span(number(loss, "start"), number(loss, "end")) for loss in of_kind)
        count = sum(int(number(loss, "count")) for loss in of_kind)
        meaning = LOSS_REASONS.get(kind, f"the history recorded a loss of kind {kind!r}")
        shortfalls.append(
            Shortfall(
                kind if kind in LOSS_REASONS else "loss",
                f"{meaning}: {count} in {len(spans)} span(s), the first {iso(spans[0].start)} "
                f"to {iso(spans[0].end)}",
                spans,
            )
        )
    if not chained:
        shortfalls.append(
            Shortfall(
                "unchained",
                "the history has no tamper-evident chain (written before schema version 3, or "
                "its chain was removed): nothing shows that no row was deleted",
            )
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
        reasons=tuple(shortfalls),
        losses=kept_losses,
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
    chain: Optional[ChainCheck] = None
    """The tamper check of the history (None: not checked)."""

    @property
    def tampered(self) -> bool:
        return self.chain is not None and self.chain.chained and not self.chain.intact

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


def evidence_of(
    rows: Iterable[Row],
    runs: Iterable[Row],
    window: Window,
    losses: Iterable[Row] = (),
    chain: Optional[ChainCheck] = None,
) -> Evidence:
    """The evidence for ``window`` from history ``rows``, agent ``runs`` and recorded
    ``losses`` (any superset: rows that are not egress (:data:`EGRESS_DIRECTIONS`) and
    external, or do not overlap the window, are left out), with the history's ``chain``
    check."""
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
    coverage = coverage_of(runs, window, losses, chain is None or chain.chained)
    hosts: Dict[Host, None] = {}
    for run in reversed(coverage.runs):
        hosts.setdefault(Host(text(run, "hostname"), text(run, "machine_id")), None)
    return Evidence(window, tuple(kept), coverage, tuple(hosts), chain)


def live_window(store: HistoryReader, since: float, now: float) -> Window:
    """The window from ``since`` to "now": it ends at a running agent's latest heartbeat
    (:func:`vouched_until`), never before ``since``.  Raises whatever the store raises."""
    return Window(since, max(since + 1, vouched_until(store.runs(since=now - 86400), now)))


def read_evidence(
    store: HistoryReader, window: Window, chain: Optional[ChainCheck] = None
) -> Evidence:
    """The adapter: the window's rows, runs and losses from ``store``, as :func:`evidence_of`
    takes them, with the ``chain`` check the caller made.

    Raises whatever the store raises when it cannot be read.
    """
    rows = store.query(
        columns=ROW_KEYS, since=window.since, until=window.until, directions=EGRESS_DIRECTIONS
    )
    runs = store.runs(since=window.since, until=window.until)
    losses = store.losses(since=window.since, until=window.until)
    return evidence_of(rows, runs, window, losses, chain)
