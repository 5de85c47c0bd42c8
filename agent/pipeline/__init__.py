"""The one composition point: settings -> sources -> allow rules -> history -> the consumer.

``egress-agent check`` takes one :meth:`Pipeline.sample`; ``egress-agent watch`` and the osquery
extension run a :class:`Monitor`, the same background loop for both, which samples every
interval, records each sample in the history and tells its consumer (``watch`` prints what is
new, the extension keeps the figures of ``egress_agent_info``), and, where the kernel allows
it, an :class:`EventFeed`, which turns kernel events into connections as they happen.  Queries
of the extension's live table go through :meth:`Monitor.live`.  Nothing here knows a protocol or
a format: the front ends (``agent/cli.py``, ``agent/osquery/``) do.

- :mod:`agent.pipeline.compose`: :class:`Pipeline` (a sampler, the allow rules, the history
  store, the names) and :class:`Snapshot`;
- :mod:`agent.pipeline.domains`: :class:`DomainNames`, names for destinations from DNS answers;
- :mod:`agent.pipeline.monitor`: :class:`Monitor`, the background loop, its figures, the runs;
- :mod:`agent.pipeline.feed`: :class:`EventFeed`, connections from an event source;
- :mod:`agent.pipeline.agent`: :class:`RunningAgent`, all of the above assembled once for
  ``watch`` and the extension, with every event source of :data:`EVENT_SOURCES`.
"""

from agent.pipeline.agent import EVENT_SOURCES, RunningAgent, kernel_events
from agent.pipeline.compose import Pipeline, Snapshot
from agent.pipeline.domains import DomainNames
from agent.pipeline.feed import EventFeed, EventLog, EventRow
from agent.pipeline.monitor import Monitor, Stats, read_machine_id

__all__ = [
    "EVENT_SOURCES",
    "DomainNames",
    "EventFeed",
    "EventLog",
    "EventRow",
    "Monitor",
    "Pipeline",
    "RunningAgent",
    "Snapshot",
    "Stats",
    "kernel_events",
    "read_machine_id",
]
