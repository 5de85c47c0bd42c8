"""The live sampler as the extension calls it: settings in, :data:`SampleFunction` s out.

The sampler (agent/sampler.py) reads every network namespace; on a system without /proc the
psutil backend stands in.  Allow rules are applied here, so the live table and the history
carry ``allowlisted`` and ``allow_rule``.
"""

from __future__ import annotations

import functools
import logging
from typing import FrozenSet, Optional, Tuple

from agent import allow
from agent.classify import Classifier
from agent.config import Settings
from agent.osquery.monitor import SampleFunction, Snapshot
from agent.sampler import UNPRIVILEGED_NOTICE, open_sampler


def make_sample_functions(
    settings: Settings, logger: logging.Logger
) -> Tuple[SampleFunction, SampleFunction]:
    """(for queries, for the background) over one sampler for the extension's life (it keeps
    caches between samples).  Only the background sample counts every outbound TCP connection
    (:attr:`Snapshot.outbound_tcp`, for the coverage figures): that needs every socket of
    every namespace, which a query for the external ones can leave in the kernel.

    Not thread-safe, like the sampler: :class:`agent.osquery.monitor.Monitor` serialises calls.
    """
    sampler = open_sampler(Classifier(settings.internal_networks))
    if sampler.limited:
        logger.warning("%s", UNPRIVILEGED_NOTICE.partition(": ")[2])

    def sample(pids: Optional[FrozenSet[int]], count_outbound_tcp: bool) -> Snapshot:
        sampler.count_outbound_tcp = count_outbound_tcp
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

    return (
        functools.partial(sample, count_outbound_tcp=False),
        functools.partial(sample, count_outbound_tcp=True),
    )
