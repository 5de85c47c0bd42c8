"""``egress-agent report``: the window's external connections as a page a person reads at a
glance (one self-contained HTML file), or as a text summary.

- :func:`html_report` -> the HTML document (``--html FILE``): a process -> destination graph,
  a timeline per process, the coverage panel and a table, with filters that work offline;
  :mod:`agent.report.page` says how hostile text stays text and why nothing can be fetched.
- :func:`text_report` -> the summary on stdout: a table of the connections (escaped as
  :mod:`agent.textsafe` escapes tables) and the audit statement.

Both take the :class:`agent.evidence.Evidence` of the window, so they work over any store
(:func:`agent.evidence.read_evidence`).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from agent.audit import render_text, statement_of
from agent.evidence import Evidence, number, text
from agent.records import Value
from agent.render import render
from agent.report.model import Picture, picture_of
from agent.report.page import build_page
from agent.timetext import iso

SUMMARY_COLUMNS = (
    "process",
    "pid",
    "username",
    "destination",
    "remote_address",
    "port",
    "connections",
    "first_seen",
    "last_seen",
    "verdict",
)


def html_report(evidence: Evidence, generated_at: Optional[float] = None) -> str:
    """The report page for ``evidence`` (``generated_at``: unix seconds, default now)."""
    stamp = time.time() if generated_at is None else generated_at
    return build_page(picture_of(evidence), statement_of(evidence), stamp)


def summary_records(picture: Picture) -> List[Dict[str, Value]]:
    """One record a history row: who, where to, when, and the verdict."""
    return [
        {
            "process": picture.programs[link.program].label,
            "pid": text(link.row, "pid"),
            "username": text(link.row, "username"),
            "destination": text(link.row, "remote_domain"),
            "remote_address": text(link.row, "remote_address"),
            "port": link.port,
            "connections": int(number(link.row, "connections")),
            "first_seen": iso(number(link.row, "first_seen")),
            "last_seen": iso(number(link.row, "last_seen")),
            "verdict": link.verdict,
        }
        for link in picture.links
    ]


def text_report(evidence: Evidence) -> str:
    """The summary: the connections as a table, then the audit statement."""
    picture = picture_of(evidence)
    table = render(summary_records(picture), SUMMARY_COLUMNS, "table")
    if not table:
        table = "no external connection went out in the window\n"
    return table + "\n" + render_text(statement_of(evidence))
