"""The live sampler as the extension calls it: settings in, a :data:`SampleFunction` out.

The sampler (agent/sampler.py) reads every network namespace; on a system without /proc the
psutil backend stands in.  Allow rules are applied here, so the live table and the history
carry ``allowlisted`` and ``allow_rule``.
"""

from __future__ import annotations

import logging
from typing import FrozenSet, Optional

from agent import allow
from agent.classify import Classifier
from agent.config import Settings
from agent.osquery.monitor import SampleFunction, Snapshot
from agent.sampler import UNPRIVILEGED_NOTICE, open_sampler


def make_sample_function(settings: Settings, logger: logging.Logger) -> SampleFunction:
    """One sampler for the extension's life (it keeps caches between samples).

    Not thread-safe, like the sampler: :class:`agent.osquery.monitor.Monitor` serialises calls.
    """
    sampler = open_sampler(Classifier(settings.internal_networks), count_outbound_tcp=True)
    if sampler.limited:
        logger.warning("%s", UNPRIVILEGED_NOTICE.partition(": ")[2])

    def sample(pids: Optional[FrozenSet[int]]) -> Snapshot:
        connections = sampler.sample(pids=pids)
        allow.annotate(settings.allow, connections)
        stats = sampler.last
        return Snapshot(
            connections=connections,
            sockets_seen=stats.sockets,
            namespaces_seen=stats.namespaces,
            active_opens={
                namespace.inode: namespace.active_opens
                for namespace in stats.per_namespace
                if namespace.active_opens is not None
            }
            or None,
            outbound_tcp=stats.outbound_tcp,
        )

    return sample
