"""The one composition point: settings -> sources -> allow rules -> history -> the consumer.

``egress-agent check`` takes one :meth:`Pipeline.sample`; ``egress-agent watch`` and the osquery
extension run a :class:`Monitor`, the same background loop for both, which samples every
interval, records each sample in the history and tells its consumer (``watch`` prints what is
new, the extension keeps the figures of ``egress_agent_info``).  Queries of the extension's live
table go through :meth:`Monitor.live`.  Nothing here knows a protocol or a format: the front
ends (``agent/cli.py``, ``agent/osquery/``) do.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, FrozenSet, List, Mapping, Optional, Tuple, Type

from agent import __version__, coverage
from agent.allow import annotate
from agent.classify import Classifier
from agent.collect import UNPRIVILEGED_NOTICE, Sampler, SampleStats, open_sampler
from agent.config import Settings
from agent.records import Connection

if TYPE_CHECKING:  # imported where used: a one-shot ``check`` keeps no history
    from agent.collect.dnswatch import DnsWatch
    from agent.collect.names import NameCache
    from agent.collect.procnet import NamespaceDiscovery
    from agent.history import HistoryStore, RunFigures

SAMPLING = "sampling"
"""The history source name of the socket sampler."""


def open_store(
    settings: Settings,
    path: Optional[str] = None,
    read_only: bool = False,
    logger: Optional[logging.Logger] = None,
) -> HistoryStore:
    """The history store the settings name (or the file at ``path``: a copy, read only)."""
    from agent.history import HistoryStore

    return HistoryStore(
        path or settings.history_path,
        retention_days=settings.history_retention_days,
        max_rows=settings.history_max_rows,
        logger=logger,
        read_only=read_only,
    )


class DomainNames:
    """Names for destinations: each connection's ``remote_domain``, and the names the
    ``domains`` allow rules match, from the DNS answers seen on this host (``docs/DNS.md``).

    :meth:`watching` (``watch``, the extension) observes the answers in every network
    namespace and keeps them in the history, so that a restart and a one-shot ``check`` know
    the names of the connections still open; :meth:`recorded` (``check``) reads what the
    running agent kept.  Without root or packet sockets, or with nothing recorded, names stay
    empty and :attr:`notice` says why, once.
    """

    PERSIST_EVERY_S = 10.0

    def __init__(self, cache: NameCache, watch: Optional[DnsWatch] = None, notice: str = ""):
        from agent.identity import read_boot_id

        self.cache = cache
        self.watch = watch
        self.notice = notice
        self.boot_id = read_boot_id()
        self._saved_changes = cache.changes
        self._saved_at = float("-inf")

    @classmethod
    def watching(cls, store: Optional[HistoryStore]) -> DomainNames:
        """Answers observed from now on, on top of those this boot's agent recorded."""
        from agent.collect.dnswatch import DnsWatch
        from agent.collect.names import NameCache

        cache = NameCache()
        watch = DnsWatch(cache)
        names = cls(cache, watch)
        names._load(store)
        names._saved_changes = cache.changes
        if not watch.start():
            names.notice = f"no names for destinations: {watch.unavailable}"
        return names

    @classmethod
    def recorded(cls, settings: Settings) -> DomainNames:
        """The answers the running agent recorded in the history store (none, and a notice
        saying so, when there is no store or it holds none of this boot)."""
        from agent.collect.names import NameCache

        names = cls(NameCache())
        path = settings.history_path
        if not (settings.history_enabled and os.path.exists(path)):
            names.notice = (
                f"no names for destinations: no history store at {path} "
                "(names come from a running extension or watch)"
            )
            return names
        if not os.access(path, os.R_OK):
            names.notice = f"no names for destinations: cannot read the history store {path}"
            return names
        store = open_store(settings)
        try:
            loaded = names._load(store)
        finally:
            store.close()
        if not loaded:
            names.notice = (
                f"no names for destinations: the history store {path} holds no DNS answers "
                "of this boot (names come from a running extension or watch)"
            )
        return names

    def _load(self, store: Optional[HistoryStore]) -> int:
        if store is None:
            return 0
        from agent.history import HistoryUnavailable

        try:
            return self.cache.load(store.names(self.boot_id))
        except HistoryUnavailable:
            return 0

    def lookup(self, namespace: int, version: int, address: int) -> Tuple[str, ...]:
        """Every name answered for the address in the namespace (the allow rules' lookup)."""
        return self.cache.names(namespace, version, address)

    def annotate(self, connections: List[Connection]) -> None:
        """Set ``remote_domain`` (the name asked, for the newest answer) on each connection, and
        keep the names of every live connection past their TTL."""
        cache = self.cache
        for connection in connections:
            namespace = connection.net_namespace
            if namespace is None or not connection.address_int:
                continue
            version = 6 if ":" in connection.remote_address else 4
            address = int(connection.address_int)
            if cache.touch(namespace, version, address):
                connection.remote_domain = cache.lookup(namespace, version, address) or ""

    def rescan(self, discovery: Optional[NamespaceDiscovery]) -> None:
        """Watch the namespaces a whole-host sample found (new ones at once, gone ones no more)."""
        if self.watch is not None and discovery is not None and not self.watch.unavailable:
            self.watch.rescan(discovery.namespaces, discovery.threads)

    def persist(self, store: Optional[HistoryStore], at: float) -> None:
        """Keep the recent answers in the store when they changed (at most every
        :data:`PERSIST_EVERY_S`)."""
        changes = self.cache.changes
        if store is None or changes == self._saved_changes:
            return
        if at - self._saved_at < self.PERSIST_EVERY_S:
            return
        if store.save_names(self.boot_id, self.cache.export()):
            self._saved_changes, self._saved_at = changes, at

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


@dataclass
class Snapshot:
    """One sample as the pipeline hands it on: the connections, annotated with the allow rules,
    and what the sample looked at."""

    connections: List[Connection]
    stats: SampleStats
    at: float
    """Unix seconds, when the sample was taken."""

    @property
    def unread(self) -> FrozenSet[int]:
        """The network namespaces whose tables the sample could not read: their rows in the
        history stay as they were (the sample says nothing of them)."""
        return frozenset(n.inode for n in self.stats.per_namespace if n.error or n.pid < 0)


class Pipeline:
    """A sampler, the allow rules and (optionally) the history store, used as one.

    Thread-safe: one lock serialises samples (the sampler's caches are not for concurrent
    use, and a query waiting for a background sample gets the freshest data anyway).
    """

    def __init__(
        self,
        settings: Settings,
        sampler: Sampler,
        store: Optional[HistoryStore] = None,
        clock: Callable[[], float] = time.time,
        names: Optional[DomainNames] = None,
    ) -> None:
        self.settings = settings
        self.sampler = sampler
        self.store = store
        self.names = names
        self.clock = clock
        """Unix seconds: when samples are taken, and the times the history records."""
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        settings: Settings,
        backend: str = "auto",
        history: bool = False,
        logger: Optional[logging.Logger] = None,
        names: Optional[str] = None,
    ) -> Pipeline:
        """The pipeline the settings describe; with ``history``, writing the history store
        (when the settings keep one).  ``names``: ``"watch"`` observes DNS answers
        (:meth:`DomainNames.watching`), ``"recorded"`` uses those the running agent kept."""
        sampler = open_sampler(Classifier(settings.internal_networks), backend)
        store = (
            open_store(settings, logger=logger) if history and settings.history_enabled else None
        )
        domain_names = None
        if names == "watch":
            domain_names = DomainNames.watching(store)
        elif names == "recorded":
            domain_names = DomainNames.recorded(settings)
        return cls(settings, sampler, store, names=domain_names)

    @property
    def notices(self) -> List[str]:
        """What the user should know once about what this pipeline cannot see, one line each."""
        notices = [UNPRIVILEGED_NOTICE] if self.sampler.limited else []
        if self.names is not None and self.names.notice:
            notices.append(self.names.notice)
        return notices

    def sample(
        self,
        pids: Optional[FrozenSet[int]] = None,
        want_all: bool = False,
        count_outbound_tcp: bool = False,
    ) -> Snapshot:
        """One live sample (narrowed to ``pids`` when given), annotated with the allow rules.
        Raises :class:`agent.collect.SamplerError` when the host cannot be sampled at all."""
        with self._lock:
            self.sampler.count_outbound_tcp = count_outbound_tcp
            at = self.clock()
            connections = self.sampler.sample(want_all=want_all, pids=pids)
            stats = self.sampler.last
        lookup = None
        if self.names is not None:
            self.names.annotate(connections)
            self.names.rescan(stats.discovery)
            lookup = self.names.lookup
        annotate(self.settings.allow, connections, names=lookup)
        return Snapshot(connections, stats, at)

    def record(self, snapshot: Snapshot) -> bool:
        """The external connections of a whole-host sample into the history; True when stored
        (or when no history is kept)."""
        if self.store is None:
            return True
        external = [c for c in snapshot.connections if c.external]
        return self.store.snapshot(SAMPLING, external, snapshot.at, unread=snapshot.unread)

    def close(self) -> None:
        if self.names is not None:
            self.names.close()
        if self.store is not None:
            self.store.close()


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
    dns_names: Optional[int] = None
    """Answers in the name cache (None: no names are kept)."""
    dns_error: Optional[str] = None
    """Why no names are observed (empty while they are)."""
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
    ) -> None:
        """``run_kind`` (``extension``, ``watch``): record this run's start, heartbeats and
        stop in the history, so that an audit knows when the agent was watching."""
        self.pipeline = pipeline
        self.interval = interval
        self._log = logger
        self._run_kind = run_kind
        self._run_id: Optional[int] = None
        self._run_attempted = False
        self._on_sample = on_sample
        self._active_opens = active_opens
        self._stats_lock = threading.Lock()
        self._started_at = pipeline.clock()
        self._stats = Stats(started_at=int(self._started_at))
        self._coverage = _Coverage()

    def live(self, pids: Optional[FrozenSet[int]] = None) -> Snapshot:
        """One sample for a query (narrowed to ``pids``); the sampler's errors propagate."""
        return self.pipeline.sample(pids)

    def stats(self) -> Stats:
        """A copy of the figures; never waits for a sample in progress."""
        with self._stats_lock:
            return Stats(**vars(self._stats))

    def sample_once(self, fatal: Tuple[Type[BaseException], ...] = ()) -> bool:
        """One background sample: record it in history, update the figures, hand it to the
        consumer; True when done.  A failing sample is logged once per distinct message and
        the next one tries again, unless its error is one of ``fatal``, which propagates."""
        started = time.monotonic()
        try:
            snapshot = self.pipeline.sample(count_outbound_tcp=True)
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
            names = self.pipeline.names
            if names is not None:
                self._stats.dns_names = len(names.cache)
                self._stats.dns_error = names.notice
        self.pipeline.record(snapshot)
        if self.pipeline.names is not None:
            self.pipeline.names.persist(self.pipeline.store, snapshot.at)
        self._heartbeat(snapshot.at)
        if self._on_sample is not None:
            self._on_sample(snapshot)
        return True

    def run(self, stop: threading.Event, fatal: Tuple[Type[BaseException], ...] = ()) -> None:
        """Sample now and then every ``interval`` seconds (fixed rate) until ``stop`` is set;
        the run ends in the history as stopped."""
        try:
            next_at = time.monotonic()
            while not stop.is_set():
                self.sample_once(fatal)
                next_at += self.interval
                now = time.monotonic()
                if next_at < now:  # a sample overran: skip the missed slots instead of bursting
                    next_at = now + self.interval
                if stop.wait(next_at - now):
                    return
        finally:
            self._heartbeat(self.pipeline.clock(), stopped=True)

    def _sampling_failed(self, message: str) -> None:
        with self._stats_lock:
            if message != self._stats.last_error:
                self._log.error("%s", message)
            self._stats.last_error = message

    def _figures(self) -> RunFigures:
        from agent.history import RunFigures

        with self._stats_lock:
            return RunFigures(
                events_source=SAMPLING,
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
                    events_source=SAMPLING,
                ),
                at=self._started_at if first_attempt else at,
            )
        if self._run_id is not None:
            store.heartbeat(self._run_id, self._figures(), at=at, stopped=stopped)

    def _count_outbound(self, current: Optional[FrozenSet[int]]) -> None:
        if current is None:
            return
        # A connection seen in consecutive samples counts once; memory stays one sample deep.
        self._stats.outbound_tcp_seen += len(current - self._coverage.previous_outbound)
        self._coverage.previous_outbound = current
