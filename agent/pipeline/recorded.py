"""What a one-shot ``check`` learns from the running agent's history: the direction its kernel
events saw each open TCP connection opened in.

A sample's socket tables cannot tell a connection a listener accepted from one a process
``connect()``ed from its listening port (``SO_REUSEPORT``): both have the listener's address
and port as their local end.  The kernel events of a running ``watch`` or extension saw which
it was, and their history rows say so (``seen_by`` names ``tracefs``).  ``check`` takes that
direction for the connections it samples (:attr:`agent.pipeline.compose.Pipeline.seen_direction`);
a connection the history does not hold keeps the sample's reading.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Set, Tuple

from agent.config import Settings
from agent.inet import IPPROTO_TCP
from agent.records import Connection

Key = Tuple[str, str, int]
"""(process_uuid, remote address, remote port)"""


def recorded_directions(settings: Settings) -> Optional[Callable[[Connection], Optional[str]]]:
    """The direction the running agent's events recorded for a sampled TCP connection (one
    direction only: a key recorded both ways says nothing), or None when there is no history
    to read.  Never raises for a store it cannot read."""
    path = settings.history_path
    if not (settings.history_enabled and os.path.exists(path) and os.access(path, os.R_OK)):
        return None
    from agent.history import HistoryUnavailable, open_store

    try:
        store = open_store(settings, read_only=True)
    except (HistoryUnavailable, OSError):
        return None
    try:
        rows = store.query(
            columns=(
                "process_uuid",
                "protocol",
                "remote_address",
                "remote_port",
                "direction",
                "seen_by",
            ),
            open_=True,
        )
    except (HistoryUnavailable, OSError):
        return None
    finally:
        store.close()
    seen: Dict[Key, Set[str]] = {}
    for row in rows:
        if row.get("protocol") != IPPROTO_TCP or "tracefs" not in str(row.get("seen_by") or ""):
            continue
        key = (str(row["process_uuid"]), str(row["remote_address"]), int(row["remote_port"] or 0))
        seen.setdefault(key, set()).add(str(row["direction"]))

    def direction(connection: Connection) -> Optional[str]:
        if connection.protocol != IPPROTO_TCP or not connection.process_uuid:
            return None
        found = seen.get(
            (connection.process_uuid, connection.remote_address, connection.remote_port)
        )
        return next(iter(found)) if found is not None and len(found) == 1 else None

    return direction
