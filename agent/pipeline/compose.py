"""A sampler, the allow rules, the history store and the names, used as one: :class:`Pipeline`."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, FrozenSet, List, Optional, Tuple

from agent.allow import annotate
from agent.classify import Classifier
from agent.collect import SAMPLING, UNPRIVILEGED_NOTICE, Sampler, SampleStats, open_sampler
from agent.config import Settings
from agent.inet import IPPROTO_TCP, UNKNOWN
from agent.records import Connection

if TYPE_CHECKING:  # imported where used: a one-shot ``check`` keeps no history
    from agent.history import HistoryStore
    from agent.pipeline.domains import DomainNames


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


_Ends = Tuple[Optional[int], str, int, str, int]


def _ends(connection: Connection) -> _Ends:
    """A connection of one namespace, by its two ends."""
    return (
        connection.net_namespace,
        connection.local_address,
        connection.local_port,
        connection.remote_address,
        connection.remote_port,
    )


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
        classifier: Optional[Classifier] = None,
    ) -> None:
        self.settings = settings
        self.classifier = classifier or Classifier(settings.internal_networks)
        """The verdicts of every source (the sampler's own, when it was made by :meth:`open`)."""
        self.sampler = sampler
        self.store = store
        self.names = names
        self.clock = clock
        """Unix seconds: when samples are taken, and the times the history records."""
        self._lock = threading.Lock()
        self.seen_direction: Optional[Callable[[Connection], Optional[str]]] = None
        """Which way the kernel events saw a sampled connection opened (None: they did not see
        it begin); set by the event feed.  What the events saw outranks what a sample
        suggests: a server-closed inbound connection's ownerless TIME_WAIT is ``inbound``, a
        connection made from a listening port (``SO_REUSEPORT``) is ``outbound``."""
        self.events_catch_up: Optional[Callable[[float], bool]] = None
        """Wait up to the given seconds for the event feed to read what the kernel holds now
        (set by the event feed)."""
        self._waited_for: FrozenSet[_Ends] = frozenset()
        """The untold connections of the last sample that were already waited for."""

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
        classifier = Classifier(settings.internal_networks)
        sampler = open_sampler(
            classifier, backend, full_read_every=settings.sampling_full_read_every
        )
        store = None
        if history and settings.history_enabled:
            from agent.history import open_store

            store = open_store(settings, logger=logger)
        from agent.pipeline.domains import DomainNames

        domain_names = None
        if names == "watch":
            domain_names = DomainNames.watching(store)
        elif names == "recorded":
            domain_names = DomainNames.recorded(settings)
        return cls(settings, sampler, store, names=domain_names, classifier=classifier)

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
        self._apply_seen_directions(connections)
        lookup = None
        if self.names is not None:
            self.names.annotate(connections)
            self.names.rescan(stats.discovery)
            lookup = self.names.lookup
        annotate(self.settings.allow, connections, names=lookup)
        return Snapshot(connections, stats, at)

    EVENTS_CATCH_UP_S = 1.0
    """How long a sample waits, at most once, for the events of a connection whose direction it
    could not tell: its accept or connect may still be in the kernel's buffer."""

    def _apply_seen_directions(self, connections: List[Connection]) -> None:
        """What the events saw outranks what the sample suggests (:attr:`seen_direction`); a
        TCP connection whose direction neither tells makes the sample wait for the events to
        catch up, once per sample and once per connection (one older than the events, such
        as a TIME_WAIT at start, stays untold: the samples after it do not wait for it)."""
        seen = self.seen_direction
        if seen is None:
            return
        untold: List[Connection] = []
        for connection in connections:
            direction = seen(connection)
            if direction is not None:
                connection.direction = direction
            elif connection.direction == UNKNOWN and connection.protocol == IPPROTO_TCP:
                untold.append(connection)
        waited, self._waited_for = self._waited_for, frozenset(map(_ends, untold))
        catch_up = self.events_catch_up
        if catch_up is None or self._waited_for <= waited:
            return
        if catch_up(self.EVENTS_CATCH_UP_S):
            for connection in untold:
                direction = seen(connection)
                if direction is not None:
                    connection.direction = direction

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
