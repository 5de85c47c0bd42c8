"""The background loop of ``watch`` and the extension: :class:`Monitor`, its figures, the runs."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
)

from agent import __version__, coverage
from agent.collect import SAMPLING
from agent.pipeline.compose import Pipeline, Snapshot

if TYPE_CHECKING:
    from agent.history import RunFigures
    from agent.pipeline.feed import EventFeed


@dataclass
class Stats:
    """Figures for ``egress_agent_info``: all from the background samples."""

    started_at: int
    samples_total: int = 0
    last_sample_ms: Optional[float] = None
    sockets_seen: Optional[int] = None
    namespaces_seen: Optional[int] = None
    tcp_active_opens: Optional[int] = None
    outbound_tcp_seen: int = 0
    """Outbound TCP connections seen: by kernel events when they run (every connect), else in
    the socket tables of the samples (those that lived through one)."""
    events_source: str = SAMPLING
    """The event sources feeding the agent (``tracefs``: kernel events), comma-separated, or
    ``sampling`` while none does."""
    events_lost: int = 0
    events_error: Optional[str] = None
    """Why kernel events do not feed the agent (empty while they do)."""
    dns_names: Optional[int] = None
    """Answers in the name cache (None: no names are kept)."""
    dns_error: Optional[str] = None
    """Why no names are observed (empty while they are)."""
    dns_namespaces_left_out: Optional[int] = None
    """Namespaces whose DNS answers are not watched: over the watch's bound (issue 23)."""
    last_error: Optional[str] = None


@dataclass
class _Coverage:
    growth: coverage.ActiveOpensGrowth = field(default_factory=coverage.ActiveOpensGrowth)
    previous_outbound: FrozenSet[int] = frozenset()


ActiveOpensFunction = Callable[[], Mapping[int, int]]
"""``{net namespace inode: Tcp ActiveOpens}`` of every namespace (agent.coverage)."""


def read_machine_id() -> str:
    """The host's machine id (``machine-id(5)``), or "" when it has none."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text:
            return text
    return ""


class Monitor:
    """The background loop of ``watch`` and the extension: a sample every ``interval`` s into
    the history, the coverage figures, the agent's run, and ``on_sample`` for the consumer."""

    def __init__(
        self,
        pipeline: Pipeline,
        interval: float,
        logger: logging.Logger,
        run_kind: Optional[str] = None,
        on_sample: Optional[Callable[[Snapshot], None]] = None,
        active_opens: ActiveOpensFunction = coverage.active_opens_by_namespace,
        feeds: Sequence[EventFeed] = (),
        events_error: str = "",
        on_head: Optional[Callable[[str], None]] = None,
    ) -> None:
        """``run_kind`` (``extension``, ``watch``): record this run's start, heartbeats and
        stop in the history, so that an audit knows when the agent was watching.  ``feeds``:
        the event sources' feeds beside the samples (their figures are this loop's), and
        ``events_error``, why a source the settings ask for is missing.  ``on_head``: told the
        history chain's head after each heartbeat written, to publish it off the host
        (``watch``'s log line)."""
        self.pipeline = pipeline
        self.interval = interval
        self._log = logger
        self._run_kind = run_kind
        self._run_id: Optional[int] = None
        self._run_attempted = False
        self._on_sample = on_sample
        self._on_head = on_head
        self._active_opens = active_opens
        self._stats_lock = threading.Lock()
        self._started_at = pipeline.clock()
        self._stats = Stats(started_at=int(self._started_at), events_error=events_error or None)
        self._events_error = events_error
        self._coverage = _Coverage()
        self.feeds: List[EventFeed] = list(feeds)
        if self.feeds:
            self._stats.events_source = ",".join(feed.source.name for feed in self.feeds)
        self._wake = threading.Event()

    def request_sample(self) -> None:
        """Take the next background sample now (after kernel events were lost, say)."""
        self._wake.set()

    def live(self, pids: Optional[FrozenSet[int]] = None) -> Snapshot:
        """One sample for a query (narrowed to ``pids``); the sampler's errors propagate."""
        return self.pipeline.sample(pids)

    def stats(self) -> Stats:
        """A copy of the figures; never waits for a sample in progress.

        With kernel events the figures of coverage are brought up to date first (the kernel's
        ActiveOpens beside the connects the events saw), since events, unlike samples, count
        between two background samples."""
        if self._events_running() and self._stats.samples_total:
            self._refresh_coverage()
        with self._stats_lock:
            return Stats(**vars(self._stats))

    def _refresh_coverage(self) -> None:
        try:
            active_opens = self._active_opens()
        except OSError:
            return
        with self._stats_lock:
            self._stats.tcp_active_opens = self._coverage.growth.update(active_opens)
            self._event_figures()

    def sample_once(self, fatal: Tuple[Type[BaseException], ...] = ()) -> bool:
        """One background sample: record it in history, update the figures, hand it to the
        consumer; True when done.  A failing sample is logged once per distinct message and
        the next one tries again, unless its error is one of ``fatal``, which propagates."""
        started = time.monotonic()
        try:
            # with kernel events the connects are counted as they happen, not in the tables
            counting = not self._events_running()
            snapshot = self.pipeline.sample(count_outbound_tcp=counting)
        except fatal:
            raise
        except Exception as error:  # the sampler's bug must not end the background loop
            self._sampling_failed(f"sampling failed: {type(error).__name__}: {error}")
            return False
        elapsed_ms = (time.monotonic() - started) * 1000.0
        active_opens: Mapping[int, int] = snapshot.stats.active_opens
        if not active_opens:
            try:
                active_opens = self._active_opens()
            except OSError:
                active_opens = {}
        with self._stats_lock:
            if self._stats.last_error is not None:
                self._log.warning("sampling works again")
                self._stats.last_error = None
            self._stats.samples_total += 1
            self._stats.last_sample_ms = round(elapsed_ms, 3)
            self._stats.sockets_seen = snapshot.stats.sockets
            self._stats.namespaces_seen = snapshot.stats.namespaces
            self._count_outbound(snapshot.stats.outbound_tcp)
            self._stats.tcp_active_opens = self._coverage.growth.update(active_opens)
            self._event_figures()
            names = self.pipeline.names
            if names is not None:
                self._stats.dns_names = len(names.cache)
                self._stats.dns_error = names.notice
                if names.watch is not None:
                    self._note_left_out(names.watch.left_out)
        self.pipeline.record(snapshot)
        if self.pipeline.names is not None:
            self.pipeline.names.persist(self.pipeline.store, snapshot.at)
        self._heartbeat(snapshot.at)
        if self._on_sample is not None:
            self._on_sample(snapshot)
        return True

    def _note_left_out(self, left_out: int) -> None:
        """Keep the DNS watch's count of namespaces left out; say so when some first are, and
        when none are any more (one line each, not one per sample)."""
        before = self._stats.dns_namespaces_left_out or 0
        self._stats.dns_namespaces_left_out = left_out
        if left_out and not before:
            self._log.warning(
                "DNS names: %d network namespace(s) not watched, over the bound of the DNS watch "
                "(the agent's own and those with a root process first)",
                left_out,
            )
        elif before and not left_out:
            self._log.warning("DNS names: every network namespace is watched again")

    def run(self, stop: threading.Event, fatal: Tuple[Type[BaseException], ...] = ()) -> None:
        """Sample now and then every ``interval`` seconds (fixed rate), or at once when asked
        (:meth:`request_sample`), until ``stop`` is set; the run ends in the history as
        stopped."""
        try:
            next_at = time.monotonic()
            while not stop.is_set():
                self.sample_once(fatal)
                next_at += self.interval
                now = time.monotonic()
                if next_at < now:  # a sample overran: skip the missed slots instead of bursting
                    next_at = now + self.interval
                if self._sleep(stop, next_at - now):
                    return
                if time.monotonic() < next_at:  # woken early: the schedule starts again now
                    next_at = time.monotonic()
        finally:
            self._heartbeat(self.pipeline.clock(), stopped=True)

    def _sleep(self, stop: threading.Event, seconds: float) -> bool:
        """Wait ``seconds``, or until a sample is requested; True when ``stop`` was set."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wake.wait(min(left, 0.25)):
                self._wake.clear()
                return stop.is_set()
        return True

    def _events_running(self) -> bool:
        return any(feed.running for feed in self.feeds)

    def _event_figures(self) -> None:
        if not self.feeds:
            return
        running = [feed for feed in self.feeds if feed.running]
        stopped = [
            feed.stopped_because or f"{feed.source.name} events stopped"
            for feed in self.feeds
            if not feed.running
        ]
        self._stats.events_source = ",".join(f.source.name for f in running) or SAMPLING
        reasons = [reason for reason in (self._events_error, *stopped) if reason]
        self._stats.events_error = "; ".join(reasons) or None
        self._stats.events_lost = sum(feed.lost for feed in self.feeds)
        self._stats.outbound_tcp_seen = sum(feed.outbound_tcp_seen for feed in self.feeds)

    def _sampling_failed(self, message: str) -> None:
        with self._stats_lock:
            if message != self._stats.last_error:
                self._log.error("%s", message)
            self._stats.last_error = message

    def _figures(self) -> RunFigures:
        from agent.history import RunFigures

        with self._stats_lock:
            return RunFigures(
                events_source=self._stats.events_source,
                events_lost=self._stats.events_lost,
                tcp_active_opens=self._stats.tcp_active_opens,
                outbound_tcp_seen=self._stats.outbound_tcp_seen,
            )

    def _heartbeat(self, at: float, stopped: bool = False) -> None:
        """Say in the history that this run is alive (starting it when the store could not be
        written before)."""
        store = self.pipeline.store
        if store is None or self._run_kind is None:
            return
        from agent.history import RunStart

        if self._run_id is None:
            # A run starts when its history could first be written: before, nothing was kept.
            first_attempt, self._run_attempted = not self._run_attempted, True
            self._run_id = store.start_run(
                RunStart(
                    kind=self._run_kind,
                    pid=os.getpid(),
                    hostname=os.uname().nodename,
                    machine_id=read_machine_id(),
                    version=__version__,
                    heartbeat_interval=self.interval,
                    events_source=self._stats.events_source,
                ),
                at=self._started_at if first_attempt else at,
            )
        if self._run_id is not None:
            written = store.heartbeat(self._run_id, self._figures(), at=at, stopped=stopped)
            head = store.head if written and self._on_head is not None else None
            if head is not None and self._on_head is not None:
                self._on_head(head)

    def _count_outbound(self, current: Optional[FrozenSet[int]]) -> None:
        if current is None:
            return
        # A connection seen in consecutive samples counts once; memory stays one sample deep.
        self._stats.outbound_tcp_seen += len(current - self._coverage.previous_outbound)
        self._coverage.previous_outbound = current
