"""The ``egress_agent_audit`` table: the audit's verdict on a window, one row, for Fleet to poll.

``SELECT * FROM egress_agent_audit WHERE since = '24h'`` answers the statement
``egress-agent audit --since 24h`` would make on this host's history (:mod:`agent.audit`):
``verdict`` (``clean``, ``unexpected``, ``incomplete``; the value space is open, later
verdicts may be added), ``reason``, and the figures the audit prints.  Without a constraint the
window is the last 24 hours; ``since = 'a' OR since = 'b'`` (or ``IN``) answers a row for each.

A Fleet policy is one query (a host passes when it returns a row):
``SELECT 1 FROM egress_agent_audit WHERE since = '24h' AND verdict = 'clean';``

A ``since`` that is no duration is answered, not failed: a row with that ``since`` (core
re-applies the constraint to what it gets back), ``verdict`` ``error`` and a ``reason`` naming
the problem, so the query succeeds and the policy fails with the reason to read.  So is a
history that is not kept or cannot be read.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Dict, List, Optional

from agent.audit import statement_of
from agent.evidence import HistoryReader, live_window, read_evidence
from agent.history import HistoryStore, HistoryUnavailable
from agent.history.chain import ChainCheck
from agent.osquery.context import QueryContext
from agent.osquery.table import (
    Cell,
    ColumnOptions,
    Table,
    TableInputs,
    TablePlugin,
    make_spec,
    string_row,
)

DEFAULT_SINCE = "24h"
ERROR = "error"
MAX_SECONDS = 400 * 86400
"""The longest window asked for: more than a year is no daily review (and beyond retention)."""

COLUMNS = (
    ("since", "TEXT"),
    ("verdict", "TEXT"),
    ("reason", "TEXT"),
    ("exit_code", "INTEGER"),
    ("window_start", "BIGINT"),
    ("window_end", "BIGINT"),
    ("external_connections", "BIGINT"),
    ("destinations", "BIGINT"),
    ("processes", "BIGINT"),
    ("unexpected_connections", "BIGINT"),
    ("unexpected_processes", "BIGINT"),
    ("coverage_share", "DOUBLE"),
    ("gaps", "INTEGER"),
    ("events_lost", "BIGINT"),
    ("tcp_connects_seen", "BIGINT"),
    ("tcp_connects_counted", "BIGINT"),
)
"""``coverage_share``: the part of the window the agent ran (0 to 1); ``tcp_connects_seen``
and ``tcp_connects_counted``: the outbound TCP connects the agent saw beside those the kernel
counted (the audit's ``outbound_tcp_seen`` and ``tcp_active_opens``)."""

SPEC = make_spec("egress_agent_audit", COLUMNS, {"since": ColumnOptions.INDEX})

_DURATION = re.compile(r"(?P<number>\d{1,9}(?:\.\d{1,6})?)(?P<unit>[smhdw]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def window_seconds(since: str) -> float:
    """``90s``, ``15m``, ``24h``, ``7d``, ``1w`` (or plain seconds) -> seconds.  Raises
    ValueError with a message that names the value and what is accepted."""
    match = _DURATION.match(since.strip())
    if match is None:
        raise ValueError(
            f"since {since[:40]!r} is no duration: use a number with s, m, h, d or w, "
            "such as '24h' or '7d'"
        )
    seconds = float(match.group("number")) * _UNITS[match.group("unit")]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"since {since[:40]!r}: the window must be longer than 0 and at most 400d")
    return seconds


CHAIN_CHECK_EVERY_S = 300.0
"""How often the table checks the store's tamper-evident chain at most: the check reads every
row (seconds at 100,000 rows), an hourly policy needs it fresh to the hour, and a live query in
between takes the last check."""


class ChainChecks:
    """The store's tamper check (:meth:`agent.history.HistoryStore.verify_chain`), made again
    at most every :data:`CHAIN_CHECK_EVERY_S`; None for a reader that keeps no chain."""

    def __init__(
        self, store: Optional[HistoryReader], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._clock = clock
        self._check: Optional[ChainCheck] = None
        self._at = float("-inf")

    def current(self) -> Optional[ChainCheck]:
        """The latest check, made now when none is recent.  Raises
        :class:`agent.history.HistoryUnavailable` when the store cannot be read."""
        if not isinstance(self._store, HistoryStore):
            return None
        now = self._clock()
        if self._check is None or now - self._at >= CHAIN_CHECK_EVERY_S:
            self._check = self._store.verify_chain()
            self._at = now
        return self._check


def audit_record(
    store: Optional[HistoryReader],
    since: str,
    now: float,
    chains: Optional[ChainChecks] = None,
) -> Dict[str, Cell]:
    """The row for one ``since`` (``tampered`` when ``chains`` finds the history edited)."""
    try:
        seconds = window_seconds(since)
    except ValueError as error:
        return {"since": since, "verdict": ERROR, "reason": str(error)}
    if store is None:
        return {
            "since": since,
            "verdict": ERROR,
            "reason": "history is not kept (history.enabled is false): there is nothing to audit",
        }
    try:
        chain = chains.current() if chains is not None else None
        evidence = read_evidence(store, live_window(store, now - seconds, now), chain)
    except HistoryUnavailable as error:
        return {"since": since, "verdict": ERROR, "reason": f"the history cannot be read: {error}"}
    statement = statement_of(evidence)
    coverage = evidence.coverage
    return {
        "since": since,
        "verdict": statement.outcome,
        "reason": statement.reason,
        "exit_code": statement.exit_code,
        "window_start": int(evidence.window.since),
        "window_end": int(evidence.window.until),
        "external_connections": evidence.connections,
        "destinations": evidence.destinations,
        "processes": evidence.processes,
        "unexpected_connections": evidence.unexpected_connections,
        "unexpected_processes": evidence.unexpected_processes,
        "coverage_share": round(coverage.share, 6),
        "gaps": len(coverage.gaps),
        "events_lost": coverage.events_lost,
        "tcp_connects_seen": coverage.outbound_tcp_seen,
        "tcp_connects_counted": coverage.tcp_active_opens,
    }


def generate(
    store: Optional[HistoryReader],
    context: QueryContext,
    clock: Callable[[], float] = time.time,
    chains: Optional[ChainChecks] = None,
) -> List[Dict[str, str]]:
    """One row per ``since`` the query asks for (24h when none); a window that cannot be judged
    (a bad ``since``, no history, a store that cannot be read) is a row with verdict
    ``error`` and the reason."""
    asked = context.equal_values("since") or frozenset({DEFAULT_SINCE})
    columns = context.used(SPEC.column_names)
    now = clock()
    return [string_row(audit_record(store, since, now, chains), columns) for since in sorted(asked)]


def make(inputs: TableInputs) -> Table:
    """The audit table over the running agent's history store."""
    chains = ChainChecks(inputs.store)
    return Table(SPEC, lambda context: generate(inputs.store, context, chains=chains))


PLUGIN = TablePlugin(SPEC, make)
