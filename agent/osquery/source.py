"""The live sampler as the extension calls it: settings in, a :data:`SampleFunction` out.

TEMPORARY: agent/sampler.py (issue 3) is being written; until it lands on main this reports
no connections, so that the protocol and lifecycle can be built and tested.  The adapter to
the real sampler replaces the body of :func:`make_sample_function`.
"""

from __future__ import annotations

from typing import FrozenSet, Optional

from agent import allow
from agent.config import Settings
from agent.osquery.monitor import SampleFunction, Snapshot


def make_sample_function(settings: Settings) -> SampleFunction:
    def sample(pids: Optional[FrozenSet[int]]) -> Snapshot:
        snapshot = Snapshot(connections=[])
        allow.annotate(settings.allow, snapshot.connections)
        return snapshot

    return sample
