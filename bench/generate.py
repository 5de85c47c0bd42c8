"""The extension's live table generated in-process, for ``bench.worker``: what one
``external_connections`` generate costs the extension itself.

``live_generate`` builds what ``egress-agent extension`` builds for the live table (a
``Pipeline`` on the Linux sampler, a ``Monitor``, ``ExtensionTables``) and returns a callable
that answers one generate of every column as core asks it, and writes the reply's bytes as the
server does (``wire.call_reply``) into memory: the sample, the rows, the Thrift encoding; no
socket, no stand-in decoding.  Run by the worker with the CPU clock (``cpu``), so the figure is
the extension's CPU, kernel time in its system calls included.

The modules are imported and the tables built here, when the worker imports this module
(untimed): the extension does both at start-up, before any query (the classifier's registries
are loaded then).  A cold run therefore times the first generate of a fresh sampler (no
namespace read before, no owner known, no row kept): the first query a new extension would
answer if no background sample came first.  Names from
DNS answers are left out (no packet sockets here): the extension's own figure is
``extension CPU per generate``.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Tuple

from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus

from agent import __version__
from agent.config import Settings
from agent.osquery import external_connections, wire
from agent.osquery.dispatch import ExtensionTables
from agent.osquery.table import AgentInfo
from agent.pipeline import Monitor, Pipeline

COLUMNS = external_connections.SPEC.column_names
CONTEXT = json.dumps(
    {
        "constraints": [{"name": name, "list": [], "affinity": "TEXT"} for name in COLUMNS],
        "colsUsed": list(COLUMNS),
        "colsUsedBitset": (1 << len(COLUMNS)) - 1,
    }
)


def _tables() -> ExtensionTables:
    pipeline = Pipeline.open(Settings(history_enabled=False))
    monitor = Monitor(pipeline, 3600.0, logging.getLogger("bench.generate"))
    return ExtensionTables(monitor, None, AgentInfo(__version__, "", 3600.0, ""))


TABLES = _tables()
"""Built at import, as the extension builds them at start-up."""


def live_generate() -> Callable[[], int]:
    """One ``external_connections`` generate, every column, reply encoded; returns rows."""
    tables = TABLES
    request = {"action": "generate", "context": CONTEXT}

    def generate() -> int:
        # Each measured generate is a query of its own: LiveSamples would answer a call that
        # comes within a second of the last one from that one's sample.
        tables._live_samples._last_call_end = float("-inf")
        result = tables.call(external_connections.SPEC.name, request)
        status = ExtensionStatus(code=result.code, message=result.message)
        reply = wire.call_reply(1, ExtensionResponse(status=status, response=result.rows))
        reply.data()
        if result.code != 0:
            raise RuntimeError(result.message)
        return len(result.rows)

    def quiet() -> Tuple[int, int]:
        last = tables._monitor.pipeline.sampler.last
        return last.namespaces_quiet, last.namespaces

    generate.quiet = quiet  # type: ignore[attr-defined]
    return generate
