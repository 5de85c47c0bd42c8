"""The running agent, assembled once for ``watch`` and the extension: :class:`RunningAgent`.

Both front ends run the same thing: a :class:`~agent.pipeline.compose.Pipeline` (sampler,
allow rules, history, names), a feed for every event source the settings and the kernel allow
(:data:`EVENT_SOURCES`), one :class:`~agent.pipeline.feed.EventLog` behind the events table, and
the :class:`~agent.pipeline.monitor.Monitor` that samples and keeps the figures.  ``watch`` runs
the monitor on its main thread and prints; the extension runs it in a thread and serves tables.

An event source joins with one line: a function in :data:`EVENT_SOURCES` that opens it from the
settings, or says why not (``docs/DESIGN.md``, "Add an event source").
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence, Tuple

from agent.collect.events import EventSource
from agent.config import Settings
from agent.pipeline.compose import Pipeline, Snapshot
from agent.pipeline.feed import EventFeed, EventLog
from agent.pipeline.monitor import Monitor
from agent.records import Connection

SourceOpener = Callable[[Settings, logging.Logger], Tuple[Optional[EventSource], str]]
"""Opens one event source from the settings: the source, or (None, why not).  Logs what the
operator should know about a source the settings asked for and the host cannot give; never
raises for it."""


def kernel_events(settings: Settings, logger: logging.Logger) -> Tuple[Optional[EventSource], str]:
    """The kernel events (:mod:`agent.collect.kernel`), or why not: switched off, no tracefs,
    lockdown, not root, a kernel without the tracepoints."""
    if not settings.events_enabled:
        return None, "kernel events are off (events.enabled: false)"
    from agent.classify import Classifier
    from agent.collect.kernel.source import open_event_source
    from agent.collect.kernel.tracefs import EventsUnavailable
    from agent.identity import IdentityCache

    never_external = Classifier(settings.internal_networks).never_external()
    try:
        source = open_event_source(identities=IdentityCache(), drop_internal=never_external)
        logger.info("kernel events: kernel filter: %s", source.kernel_filter)
        return source, ""
    except EventsUnavailable as error:
        why = f"kernel events unavailable, sampling instead: {error}"
    except OSError as error:
        why = f"kernel events unavailable, sampling instead: {error.strerror or error}"
    logger.warning("%s", why)
    return None, why


EVENT_SOURCES: Tuple[SourceOpener, ...] = (kernel_events,)
"""Every event source the running agent opens, in order."""


class RunningAgent:
    """A pipeline, its event feeds and its monitor, started and stopped together.

    :meth:`open` assembles it; ``with agent:`` starts the feeds' threads and, on the way out,
    stops them and closes the pipeline (history, names).  The monitor is run by the caller
    (``agent.monitor.run(stop)``), on whichever thread it likes.
    """

    def __init__(
        self, pipeline: Pipeline, monitor: Monitor, feeds: Sequence[EventFeed], log: EventLog
    ) -> None:
        self.pipeline = pipeline
        self.monitor = monitor
        self.feeds = list(feeds)
        self.log = log
        """The events table's rows, from every feed."""
        self._stops: List[Callable[[], None]] = []

    @classmethod
    def open(
        cls,
        settings: Settings,
        run_kind: str,
        logger: logging.Logger,
        interval: Optional[float] = None,
        backend: str = "auto",
        history: bool = True,
        on_sample: Optional[Callable[[Snapshot], None]] = None,
        on_connection: Optional[Callable[[Connection], None]] = None,
        sources: Sequence[SourceOpener] = EVENT_SOURCES,
        on_head: Optional[Callable[[str], None]] = None,
    ) -> RunningAgent:
        """The agent the settings describe: ``run_kind`` (``watch``, ``extension``) names its
        runs in the history; ``logger`` takes the monitor's messages; ``on_sample`` and
        ``on_connection`` are the consumer's (``watch`` prints); ``on_head`` is told the history
        chain's head after each heartbeat (``watch --log-head``).  Raises
        :class:`agent.collect.SamplerError` when the host cannot be sampled at all."""
        pipeline = Pipeline.open(
            settings,
            backend,
            history,
            logging.getLogger("egress_agent.history"),
            names="watch",
        )
        events_log = logging.getLogger("egress_agent.events")
        log = EventLog(settings.events_max_rows, settings.events_expiry)
        feeds: List[EventFeed] = []
        missing: List[str] = []
        for opener in sources:
            source, why = opener(settings, events_log)
            if source is None:
                missing.append(why)
            else:
                feeds.append(EventFeed(pipeline, source, events_log, log, on_connection))
        monitor = Monitor(
            pipeline,
            settings.sampling_interval if interval is None else interval,
            logger,
            run_kind,
            on_sample,
            feeds=feeds,
            events_error="; ".join(missing),
            on_head=on_head,
        )
        for feed in feeds:
            feed.on_loss = monitor.request_sample
        return cls(pipeline, monitor, feeds, log)

    @property
    def events(self) -> Optional[EventLog]:
        """The events table's buffer, or None when no event source feeds the agent."""
        return self.log if self.feeds else None

    def start(self) -> None:
        """Start every feed's thread."""
        self._stops = [feed.start() for feed in self.feeds]

    def stop(self) -> None:
        """Stop the feeds (each removes what it holds in the kernel) and wait for them."""
        stops, self._stops = self._stops, []
        for stop in stops:
            stop()

    def close(self) -> None:
        """Stop the feeds, then close the pipeline: the history store and the names."""
        try:
            self.stop()
        finally:
            self.pipeline.close()

    def __enter__(self) -> RunningAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
