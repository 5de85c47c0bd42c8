"""Connections from kernel events, as they happen: :class:`EventFeed`.

The event source (:mod:`agent.collect.kernel.source`: a tracefs instance of our own) reports every
TCP connect, its outcome, every accepted connection and close, and every new UDP flow, with the
process behind it, even one that lived a millisecond.  The feed turns each report into a
:class:`~agent.records.Connection` (the verdict on its remote address, its name, the allow
rules), and hands the external ones to three consumers:

- the history store, as :class:`~agent.history.Observation` events of the source ``tracefs``
  (the sampler's snapshots go on beside them; neither closes the other's rows);
- :class:`EventLog`, the bounded buffer behind the osquery table ``external_connection_events``
  (one row per connection attempt, like osquery's evented tables);
- a callback (``watch`` prints each connection within a second of its connect).

When the kernel lost events (its buffer was full), the source resynchronises its trackers and
the feed asks the background loop for a sample at once, so the history catches up from
sock_diag; both are logged.  Without tracefs, root or the tracepoints, :meth:`EventFeed.open`
says why in one line and the agent samples as before (``events_source = sampling``).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import operator
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

from agent.allow import annotate
from agent.classify import format_ipv4, format_ipv6
from agent.collect.events import OPENING_KINDS, EventKind
from agent.inet import AF_INET6, IPPROTO_TCP
from agent.pipeline.compose import Pipeline
from agent.records import COLUMN_NAMES, Connection, SocketColumns, Value, connection_of

if TYPE_CHECKING:
    from agent.collect.events import EventSource, SocketEvent
    from agent.collect.kernel.tracker import Tracker
    from agent.history import Observation

STATE_OF_KIND: Dict[EventKind, str] = {
    EventKind.CONNECT: "SYN_SENT",
    EventKind.ESTABLISHED: "ESTABLISHED",
    EventKind.REFUSED: "CLOSED",
    EventKind.TIMEOUT: "CLOSED",
    EventKind.ACCEPTED: "ESTABLISHED",
    EventKind.CLOSED: "CLOSED",
    EventKind.UDP: "",
}
"""The TCP state (osquery's names) a connection is in right after each kind of event."""

OUTCOME_OF_KIND: Dict[EventKind, str] = {
    EventKind.CONNECT: "pending",
    EventKind.ESTABLISHED: "established",
    EventKind.REFUSED: "refused",
    EventKind.TIMEOUT: "timeout",
    EventKind.ACCEPTED: "accepted",
    EventKind.UDP: "sent",
}
"""``external_connection_events.outcome``: a connect is ``pending`` until its outcome arrives."""

POLL_S = 0.5
STOP_WITHIN_S = 2.0


_VALUES = operator.attrgetter(*COLUMN_NAMES)
_LOCAL = (COLUMN_NAMES.index("local_address"), COLUMN_NAMES.index("local_port"))
_STATE = COLUMN_NAMES.index("state")


class EventRow:
    """One connection attempt of ``external_connection_events``: when, how it went, when it
    closed, and the connection's column values as a tuple (a quarter of the memory of the
    record: the buffer holds tens of thousands)."""

    __slots__ = ("closed_at", "outcome", "time", "values")

    def __init__(
        self, time: float, outcome: str, connection: Connection, closed_at: Optional[float] = None
    ) -> None:
        self.time = time
        """Unix seconds of the connect (or the accept, or the datagram)."""
        self.outcome = outcome
        self.closed_at = closed_at
        self.values: Tuple[Value, ...] = _VALUES(connection)

    @property
    def connection(self) -> Connection:
        fields: Dict[str, Any] = dict(zip(COLUMN_NAMES, self.values))
        return Connection(**fields)

    def record(self) -> Dict[str, Value]:
        """The row's columns, as the table has them."""
        row: Dict[str, Value] = dict(zip(COLUMN_NAMES, self.values))
        row["time"] = int(self.time)
        row["outcome"] = self.outcome
        row["closed_at"] = int(self.closed_at) if self.closed_at is not None else None
        return row

    def settle(self, outcome: Optional[str], at: float, connection: Connection) -> None:
        """The attempt's outcome (None: it closed, at ``at``); its state and, when it was not
        known yet, its local end become ``connection``'s."""
        values = list(self.values)
        if outcome is None:
            self.closed_at = at
        else:
            self.outcome = outcome
            if connection.local_port and not values[_LOCAL[1]]:
                values[_LOCAL[0]] = connection.local_address
                values[_LOCAL[1]] = connection.local_port
        values[_STATE] = connection.state
        self.values = tuple(values)


class EventLog:
    """The last connection attempts, bounded like osquery's evented tables: at most
    ``max_rows``, none older than ``expiry`` seconds.  Thread-safe."""

    def __init__(self, max_rows: int = 20_000, expiry: float = 3600.0) -> None:
        self.max_rows = max_rows
        self.expiry = expiry
        self._rows: Deque[Tuple[int, EventRow]] = collections.deque()
        self._by_key: Dict[int, EventRow] = {}
        self._lock = threading.Lock()
        self.dropped = 0
        """Rows that left the buffer for its bounds before they expired."""

    def add(self, key: int, row: EventRow) -> None:
        with self._lock:
            self._rows.append((key, row))
            self._by_key[key] = row
            while len(self._rows) > self.max_rows:
                old_key, old = self._rows.popleft()
                self.dropped += 1
                if self._by_key.get(old_key) is old:
                    del self._by_key[old_key]

    def settle(self, key: int, outcome: Optional[str], at: float, connection: Connection) -> bool:
        """The outcome (or the close, with ``outcome`` None) of the attempt ``key``; False when
        no attempt of that key is held."""
        with self._lock:
            row = self._by_key.get(key)
            if row is None:
                return False
            row.settle(outcome, at, connection)
            return True

    def rows(self, since: Optional[float] = None, until: Optional[float] = None) -> List[EventRow]:
        """The attempts at or after ``since`` and at or before ``until`` (unix seconds), oldest
        first; expired ones are dropped on the way."""
        with self._lock:
            cutoff = time.time() - self.expiry
            while self._rows and self._rows[0][1].time < cutoff:
                key, row = self._rows.popleft()
                if self._by_key.get(key) is row:
                    del self._by_key[key]
            return [
                row
                for _, row in self._rows
                if (since is None or row.time >= since) and (until is None or row.time < until + 1)
            ]

    def __len__(self) -> int:
        return len(self._rows)


def _address_text(value: int, version: int) -> str:
    return format_ipv4(value) if version == 4 else format_ipv6(value)


class EventFeed:
    """Kernel events into connections, from a thread of its own (:meth:`run`)."""

    def __init__(
        self,
        pipeline: Pipeline,
        source: EventSource,
        logger: logging.Logger,
        log: Optional[EventLog] = None,
        on_connection: Optional[Callable[[Connection], None]] = None,
        on_loss: Optional[Callable[[], None]] = None,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.log = log if log is not None else EventLog()
        self._logger = logger
        self.on_connection = on_connection
        """Called (from the feed's thread) with each external connection as it is seen."""
        self.on_loss = on_loss
        """Called (from the feed's thread) when the kernel lost events: resynchronise."""
        self._lost_seen = 0
        self._deferred: Dict[int, float] = {}
        """key -> time of the connects whose local port was not known yet: recorded in the
        history at their outcome, which knows the port."""
        self.connections_seen = 0
        """External connections the feed handed on."""
        self.running = True
        """False once the feed stopped (told to, or the instance went away)."""
        self.stopped_because = ""
        self._rounds = 0
        self._round_done = threading.Condition()
        tracker = getattr(source, "tracker", None)
        if tracker is not None:
            pipeline.seen_direction = _seen_direction(tracker)
            pipeline.events_catch_up = self.catch_up
            if pipeline.names is not None:
                tracker.on_new_namespace = pipeline.names.attach

    @property
    def lost(self) -> int:
        return self.source.lost

    def namespace_files(self) -> Dict[int, str]:
        """Namespace inode -> a file that entered it when the events last saw it (a thread's
        ``/proc/TID/ns/net``, or the file that keeps it), for every namespace they saw."""
        tracker = getattr(self.source, "tracker", None)
        return dict(tracker.placer.entries) if tracker is not None else {}

    @property
    def outbound_tcp_seen(self) -> int:
        """Outbound TCP connects the events saw since the feed began, in every namespace."""
        return self.source.outbound_tcp_seen

    def start(self) -> Callable[[], None]:
        """Run the feed in a thread of its own; the function that stops it (and waits, up to
        :data:`STOP_WITHIN_S`, for the instance to be removed)."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(stop,), name="egress-agent-events", daemon=True
        )
        thread.start()

        def stopping() -> None:
            stop.set()
            thread.join(STOP_WITHIN_S)

        return stopping

    def run(self, stop: threading.Event) -> None:
        """Read events until ``stop`` is set, then remove the instance (from this thread, as
        the source asks)."""
        try:
            while not stop.is_set():
                try:
                    events = self.source.poll(POLL_S)
                except OSError as error:
                    self.stopped_because = f"kernel events stopped: {error}"
                    self._logger.error("%s; sampling only from now on", self.stopped_because)
                    return
                if events:
                    self.handle(events)
                self._check_loss()
                self._record_losses()
                with self._round_done:
                    self._rounds += 1
                    self._round_done.notify_all()
        finally:
            self.running = False
            with self._round_done:
                self._round_done.notify_all()
            self.source.close()

    def catch_up(self, timeout: float) -> bool:
        """Wait, up to ``timeout`` seconds, until the feed has handled the events the kernel
        held when this was called (a whole round of reading that began after it); False when
        it did not in time or is not running.

        A sample and the events reach the pipeline on different threads: a connection that
        ended a moment ago may be sampled (an ownerless TIME_WAIT) before its accept is read,
        and then the sample alone would say its direction."""
        with self._round_done:
            wanted = self._rounds + 2
            return (
                self._round_done.wait_for(
                    lambda: self._rounds >= wanted or not self.running, timeout
                )
                and self.running
            )

    def _record_losses(self) -> None:
        """What the source lost beyond the kernel's own counter, into the history with its
        span, so that the audit of that span is incomplete."""
        take = getattr(self.source, "take_losses", None)
        losses = take() if take is not None else []
        store = self.pipeline.store
        for loss in losses:
            self._logger.warning("kernel events: %s", loss.detail)
            if store is not None:
                store.record_loss(loss.kind, loss.start, loss.end, loss.count, loss.detail)

    def handle(self, events: List[SocketEvent]) -> List[Connection]:
        """Turn events into connections and hand the external ones on; those connections."""
        from agent.history import ALIVE, CLOSED, OPENED, Observation

        handed: List[Connection] = []
        observations: List[Observation] = []
        kinds = {kind: OPENED for kind in OPENING_KINDS}
        kinds[EventKind.ESTABLISHED] = ALIVE
        source = self.source.name
        connections = [self._connection(event) for event in events]
        self._annotate([connection for connection in connections if connection.external])
        for event, connection in zip(events, connections):
            if not connection.external:
                self._deferred.pop(event.key, None)
                continue
            kind = event.kind
            known_owner = connection.pid > 0
            if kind in OPENING_KINDS:
                self.log.add(event.key, EventRow(event.time, OUTCOME_OF_KIND[kind], connection))
                handed.append(connection)
                if kind is EventKind.CONNECT and not connection.local_port:
                    self._deferred[event.key] = event.time
                    continue
            elif kind is EventKind.CLOSED:
                self.log.settle(event.key, None, event.time, connection)
            else:
                self.log.settle(event.key, OUTCOME_OF_KIND[kind], event.time, connection)
                connected_at = self._deferred.pop(event.key, None)
                if connected_at is not None and known_owner:
                    observations.append(Observation(OPENED, connected_at, source, connection))
            if not known_owner:
                continue  # a socket older than the source, closing: the sampler knew it
            history_kind = kinds.get(kind, CLOSED)
            observations.append(Observation(history_kind, event.time, source, connection))
            if kind is EventKind.UDP:  # a datagram: a connection that opened and is done
                observations.append(Observation(CLOSED, event.time, source, connection))
        if observations and self.pipeline.store is not None:
            self.pipeline.store.observe(observations)
        self.connections_seen += len(handed)
        if self.on_connection is not None:
            for connection in handed:
                self.on_connection(connection)
        return handed

    def _connection(self, event: SocketEvent) -> Connection:
        verdict = self.pipeline.classifier.classify_int(event.remote_address, event.version)
        return connection_of(
            event.identity,
            verdict,
            SocketColumns(
                net_namespace=event.net_namespace,
                fd=None,
                socket=None,
                family=event.family,
                protocol=event.protocol,
                state=STATE_OF_KIND.get(event.kind, ""),
                local_address=_address_text(event.local_address, event.version)
                if event.local_address or event.local_port
                else "",
                local_port=event.local_port,
                remote_port=event.remote_port,
                direction=event.direction,
            ),
        )

    def _annotate(self, external: List[Connection]) -> None:
        """Names and allow rules for a batch's external connections, at once: a batch with
        nameless ones waits for the DNS watch once, not once a connection."""
        if not external:
            return
        names = self.pipeline.names
        if names is not None:
            names.annotate(external)
        annotate(
            self.pipeline.settings.allow,
            external,
            names=names.lookup if names is not None else None,
        )

    def _check_loss(self) -> None:
        lost = self.source.lost
        if lost > self._lost_seen:
            self._logger.warning(
                "kernel events: %d lost (the buffer was full); resynchronising from sock_diag",
                lost - self._lost_seen,
            )
            self._lost_seen = lost
            if self.on_loss is not None:
                self.on_loss()


def _seen_direction(tracker: Tracker) -> Callable[[Connection], Optional[str]]:
    """The direction the tracker saw a sampled TCP connection opened in, or None."""

    def seen(connection: Connection) -> Optional[str]:
        if connection.protocol != IPPROTO_TCP or not connection.remote_address:
            return None
        try:
            local = int(ipaddress.ip_address(connection.local_address))
            remote = int(ipaddress.ip_address(connection.remote_address))
        except ValueError:
            return None
        return tracker.seen_direction(
            connection.net_namespace,
            6 if connection.family == AF_INET6 else 4,
            local,
            connection.local_port,
            remote,
            connection.remote_port,
        )

    return seen
