"""Times and durations as people read them, for the audit, the report and the history's chain.

Kept apart from :mod:`agent.evidence`, which uses them, so that the history package can say when
a link was written without importing what reads the history.
"""

from __future__ import annotations

import datetime


def iso(seconds: float) -> str:
    """``seconds`` (unix time) as UTC ISO-8601 to the second: ``2026-11-01T10:00:00Z``."""
    moment = datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(seconds: float) -> str:
    """``3725`` -> ``1h2m5s``; ``0`` -> ``0s``."""
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest or not parts:
        parts.append(f"{rest}s")
    return "".join(parts)
