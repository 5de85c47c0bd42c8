"""The report as one self-contained HTML page: inline SVG drawn here, inline CSS and JS from
the data files beside this module, and nothing the page could fetch.

Text-safety (the policy of :mod:`agent.textsafe`, applied to HTML): every string that comes
from a process or a host goes through :func:`html_text`, which shows unprintable characters
and undecodable bytes as visible escapes (:func:`agent.textsafe.cell_text`) and then escapes
``& < > " '`` for HTML (:func:`html.escape`), so it is text in an element or an attribute and
never markup.  The data the script filters on is JSON in a ``<script type="application/json">``
element, written by :func:`script_json`: ASCII only (so U+2028 and U+2029 are escapes), with
``<``, ``>`` and ``&`` as ``\\u`` escapes (so no ``</script>`` or ``<!--`` can end or bend the
element; HTML Standard 4.12.1.3, "Restrictions for contents of script elements").  The
Content-Security-Policy forbids every fetch (``default-src 'none'``) and lets run only the one
inline script and style whose SHA-256 it names (CSP Level 3, hash-source), so even markup that
slipped through could neither load nor run anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agent.audit import Statement
from agent.collect import SAMPLING, TRACEFS
from agent.evidence import Row, Span, Window, number, run_span, text
from agent.report.model import Picture, container_label, order
from agent.textsafe import cell_text, json_safe
from agent.timetext import duration_text, iso

HERE = Path(__file__).parent
WIDTH = 1180
NODE_ROW = 30
TIMELINE_ROW = 16
LABEL_LIMIT = 40
"""Display columns of a node or row label before it is cut (the title shows all of it)."""
TITLE_LIMIT = 2000

SOURCE_COLOURS = {TRACEFS: "#2e7d32", SAMPLING: "#ef8f00"}
UNKNOWN_SOURCE_COLOUR = "#757575"


def html_text(value: object, limit: Optional[int] = None) -> str:
    """``value`` as inert HTML text (see the module docstring)."""
    return html.escape(cell_text("" if value is None else value, limit), quote=True)


def script_json(document: Any) -> str:
    """``document`` as JSON that is safe inside a ``<script>`` element."""
    encoded = json.dumps(json_safe(document), ensure_ascii=True, separators=(",", ":"))
    return encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def _sha256(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def content_security_policy(script: str, style: str) -> str:
    """No fetch of any kind; only the page's own inline script and style."""
    return (
        f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
        "base-uri 'none'; form-action 'none'"
    )


def _f(value: float) -> str:
    return f"{value:.1f}"


# --- time axis -------------------------------------------------------------------------------

_TICK_STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)


class Axis:
    """Unix seconds in ``window`` -> x between ``left`` and ``right``."""

    def __init__(self, window: Window, left: float, right: float) -> None:
        self.window = window
        self.left = left
        self.right = right

    def x(self, seconds: float) -> float:
        length = self.window.seconds or 1.0
        share = (min(max(seconds, self.window.since), self.window.until) - self.window.since) / (
            length
        )
        return self.left + share * (self.right - self.left)

    def ticks(self, most: int = 6) -> List[float]:
        length = self.window.seconds
        step = next((s for s in _TICK_STEPS if length / s <= most), _TICK_STEPS[-1])
        while length / step > most:
            step *= 2
        first = math.ceil(self.window.since / step) * step
        return [float(t) for t in range(int(first), int(self.window.until) + 1, step)]

    def svg(self, top: float, bottom: float) -> str:
        """Grid lines and their labels: ``HH:MMZ`` (the date is in the page's header) for a
        window under two days, ``YYYY-MM-DD`` beyond."""
        parts = []
        form = "%H:%MZ" if self.window.seconds < 2 * 86400 else "%Y-%m-%d"
        for tick in self.ticks():
            x = _f(self.x(tick))
            label = time.strftime(form, time.gmtime(tick))
            parts.append(
                f'<line class="grid" x1="{x}" y1="{_f(top)}" x2="{x}" y2="{_f(bottom)}"/>'
                f'<text class="tick" x="{x}" y="{_f(top - 4)}">{label}</text>'
            )
        return "".join(parts)


# --- the graph -------------------------------------------------------------------------------


def graph_svg(picture: Picture) -> str:
    """Processes on the left, destinations on the right, an edge for each pair that talked,
    as thick as the logarithm of its connections; unexpected edges in red."""
    if not picture.edges:
        return '<p class="empty">No external connection went out in this window.</p>'
    program_order, destination_order = order(picture)
    rows = max(len(program_order), len(destination_order))
    height = rows * NODE_ROW + 20
    left_x, right_x = 330.0, WIDTH - 330.0

    def ys(indexes: Sequence[int]) -> Dict[int, float]:
        offset = (rows - len(indexes)) * NODE_ROW / 2 + 10 + NODE_ROW / 2
        return {index: offset + place * NODE_ROW for place, index in enumerate(indexes)}

    program_y, destination_y = ys(program_order), ys(destination_order)
    most = max(edge.connections for edge in picture.edges)
    parts = [
        f'<svg id="graph" class="graph" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img" aria-label="processes and their external destinations">'
    ]
    for edge in sorted(picture.edges, key=lambda e: e.unexpected):
        y1, y2 = program_y[edge.program], destination_y[edge.destination]
        width = 1.5 + 7.0 * math.log1p(edge.connections) / math.log1p(max(most, 1))
        middle = (left_x + right_x) / 2
        program = picture.programs[edge.program]
        destination = picture.destinations[edge.destination]
        title = (
            f"{program.label} -> {destination.label}: {edge.connections} connection(s), "
            f"{', '.join(edge.ports)}; {', '.join(edge.rules)}"
        )
        parts.append(
            f'<path class="edge{" unexpected" if edge.unexpected else ""}" data-link="edge" '
            f'data-p="{edge.program}" data-d="{edge.destination}" '
            f'data-u="{int(edge.unexpected)}" stroke-width="{_f(width)}" '
            f'd="M{_f(left_x)},{_f(y1)} C{_f(middle)},{_f(y1)} {_f(middle)},{_f(y2)} '
            f'{_f(right_x)},{_f(y2)}"><title>{html_text(title, TITLE_LIMIT)}</title></path>'
        )
    for index, y in program_y.items():
        program = picture.programs[index]
        title = (
            f"{program.label} ({program.detail}; pids {', '.join(map(str, program.pids[:50]))})"
            f"\npath: {program.path or '-'}\nuser: {program.username or '-'}"
            + "".join(f"\ncmdline: {line}" for line in program.cmdlines)
        )
        parts.append(
            f'<g class="node program{" unexpected" if program.unexpected else ""}" '
            f'data-node="p" data-p="{index}"><circle cx="{_f(left_x)}" cy="{_f(y)}" r="5"/>'
            f'<text class="label" x="{_f(left_x - 10)}" y="{_f(y - 2)}" text-anchor="end">'
            f"{html_text(program.label, LABEL_LIMIT)}</text>"
            f'<text class="sub" x="{_f(left_x - 10)}" y="{_f(y + 10)}" text-anchor="end">'
            f"{html_text(program.detail)} · {program.connections} conn.</text>"
            f"<title>{html_text(title, TITLE_LIMIT)}</title></g>"
        )
    for index, y in destination_y.items():
        destination = picture.destinations[index]
        sub = destination.address if destination.domains else ""
        sub = ", ".join(p for p in [sub, " ".join(destination.ports[:4])] if p)
        title = (
            f"{destination.address}\nnames: {', '.join(destination.domains) or '-'}"
            f"\nports: {', '.join(destination.ports)}\n{destination.connections} connection(s)"
        )
        parts.append(
            f'<g class="node destination{" unexpected" if destination.unexpected else ""}" '
            f'data-node="d" data-d="{index}"><circle cx="{_f(right_x)}" cy="{_f(y)}" r="5"/>'
            f'<text class="label" x="{_f(right_x + 10)}" y="{_f(y - 2)}">'
            f"{html_text(destination.label, LABEL_LIMIT)}</text>"
            f'<text class="sub" x="{_f(right_x + 10)}" y="{_f(y + 10)}">'
            f"{html_text(sub, LABEL_LIMIT + 10)}</text>"
            f"<title>{html_text(title, TITLE_LIMIT)}</title></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


# --- the timeline ----------------------------------------------------------------------------


def timeline_svg(picture: Picture) -> str:
    """One bar per history row, grouped by process: first_seen..last_seen, and a paler bar on
    to the window's end for a connection still open at the last sample."""
    if not picture.links:
        return '<p class="empty">Nothing to draw.</p>'
    axis = Axis(picture.evidence.window, 330.0, WIDTH - 20.0)
    program_order, _ = order(picture)
    rank = {index: place for place, index in enumerate(program_order)}
    links = sorted(
        picture.links,
        key=lambda link: (rank[link.program], link.destination, link.span.start),
    )
    top = 24.0
    y = top
    parts: List[str] = []
    previous = -1
    for link in links:
        if link.program != previous:
            if previous != -1:
                y += 6
            program = picture.programs[link.program]
            parts.append(
                f'<text class="lane" data-node="p" data-p="{link.program}" x="4" '
                f'y="{_f(y + 11)}">{html_text(program.label, LABEL_LIMIT)} '
                f"({html_text(program.detail)})</text>"
            )
            y += TIMELINE_ROW
            previous = link.program
        destination = picture.destinations[link.destination]
        x1, x2 = axis.x(link.span.start), axis.x(link.span.end)
        x3 = axis.x(link.open_until)
        row = link.row
        title = (
            f"{picture.programs[link.program].label} -> {destination.label} "
            f"({destination.address}) {link.port}: {iso(number(row, 'first_seen'))} to "
            f"{iso(number(row, 'last_seen'))}"
            + (" (open at the last sample)" if link.open_until > link.span.end else "")
            + f"; {int(number(row, 'connections'))} connection(s); {link.verdict}"
        )
        bar = (
            f'<rect class="bar" x="{_f(x1)}" y="{_f(y + 3)}" width="{_f(max(x2 - x1, 2.0))}" '
            f'height="{TIMELINE_ROW - 5}"/>'
        )
        if x3 > x2 + 0.5:
            bar += (
                f'<rect class="open" x="{_f(x2)}" y="{_f(y + 3)}" width="{_f(x3 - x2)}" '
                f'height="{TIMELINE_ROW - 5}"/>'
            )
        parts.append(
            f'<g class="span{" unexpected" if link.unexpected else ""}" data-link="span" '
            f'data-p="{link.program}" data-d="{link.destination}" data-u="{int(link.unexpected)}">'
            f'<text class="sub" x="{_f(axis.left - 6)}" y="{_f(y + 11)}" text-anchor="end">'
            f"{html_text(destination.label, LABEL_LIMIT)} {html_text(link.port)}</text>{bar}"
            f"<title>{html_text(title, TITLE_LIMIT)}</title></g>"
        )
        y += TIMELINE_ROW
    height = y + 8
    return (
        f'<svg id="timeline" class="timeline" viewBox="0 0 {WIDTH} {_f(height)}" width="{WIDTH}" '
        f'height="{_f(height)}" role="img" aria-label="when each connection was seen">'
        f"{axis.svg(top, height)}{''.join(parts)}</svg>"
    )


# --- coverage --------------------------------------------------------------------------------


def coverage_svg(statement: Statement) -> str:
    """The window as a bar: each run in the colour of its source, the gaps in red."""
    coverage = statement.evidence.coverage
    axis = Axis(coverage.window, 130.0, WIDTH - 20.0)
    parts = [
        f'<svg id="coverage-bar" viewBox="0 0 {WIDTH} 78" width="{WIDTH}" height="78" '
        'role="img" aria-label="when the agent ran">',
        axis.svg(22, 74),
        '<text class="sub" x="4" y="40">agent running</text>',
        '<text class="sub" x="4" y="64">not running</text>',
    ]
    for run in coverage.runs:
        span = run_span(run)
        clipped = Span(max(span.start, coverage.window.since), min(span.end, coverage.window.until))
        source = text(run, "events_source")
        colour = SOURCE_COLOURS.get(source, UNKNOWN_SOURCE_COLOUR)
        x1, x2 = axis.x(clipped.start), axis.x(clipped.end)
        parts.append(
            f'<rect class="run" x="{_f(x1)}" y="28" width="{_f(max(x2 - x1, 1.0))}" height="16" '
            f'fill="{colour}"><title>{html_text(text(run, "kind"))} pid '
            f"{html_text(text(run, 'pid'))}, {html_text(source or 'unknown source')}: "
            f"{iso(span.start)} to {iso(span.end)}</title></rect>"
        )
    for gap in coverage.gaps:
        x1, x2 = axis.x(gap.start), axis.x(gap.end)
        parts.append(
            f'<rect class="gap" x="{_f(x1)}" y="52" width="{_f(max(x2 - x1, 1.0))}" height="16">'
            f"<title>not running: {iso(gap.start)} to {iso(gap.end)} "
            f"({duration_text(gap.seconds)})</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _runs_table(statement: Statement) -> str:
    runs = statement.evidence.coverage.runs
    if not runs:
        return '<p class="empty">No agent run is recorded in this window.</p>'
    head = (
        "kind", "pid", "version", "started", "stopped / last heartbeat", "source",
        "events lost", "TCP connects (kernel)", "seen",
    )  # fmt: skip
    rows = []
    for run in runs:
        stopped = run.get("stopped_at")
        end = (
            iso(number(run, "stopped_at"))
            if stopped is not None
            else (
                f"{iso(number(run, 'last_heartbeat'))} (no stop)"
                if run.get("last_heartbeat") is not None
                else "-"
            )
        )
        cells = (
            html_text(text(run, "kind")),
            html_text(text(run, "pid")),
            html_text(text(run, "version")),
            iso(number(run, "started_at")),
            end,
            html_text(text(run, "events_source") or "unknown"),
            str(int(number(run, "events_lost"))),
            str(int(number(run, "tcp_active_opens"))),
            str(int(number(run, "outbound_tcp_seen"))),
        )
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return (
        '<table class="runs"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def coverage_section(statement: Statement) -> str:
    coverage = statement.evidence.coverage
    seen_share = coverage.tcp_seen_share
    facts: List[Tuple[str, str, str]] = [
        ("running", f"{coverage.share:.1%} of the window", "running-share"),
        ("gaps", str(len(coverage.gaps)), "gap-count"),
        ("source", html_text(", ".join(coverage.sources) or "none"), "sources"),
        ("events lost", str(coverage.events_lost), "events-lost"),
        (
            "outbound TCP connects",
            f"{coverage.outbound_tcp_seen} seen of {coverage.tcp_active_opens} counted by "
            "the kernel" + ("" if seen_share is None else f" ({seen_share:.1%})"),
            "tcp-coverage",
        ),
    ]
    shortfalls = "".join(f"<li>{html_text(s)}</li>" for s in coverage.shortfalls)
    return (
        coverage_svg(statement)
        + '<dl class="facts">'
        + "".join(f'<dt>{k}</dt><dd id="{i}">{v}</dd>' for k, v, i in facts)
        + "</dl>"
        + (f'<ul class="shortfalls">{shortfalls}</ul>' if shortfalls else "")
        + _runs_table(statement)
    )


# --- the table -------------------------------------------------------------------------------


def _container_title(row: Row) -> str:
    """The container's details for a hover: id, image, runtime, the parents."""
    parts = [
        f"{label}: {text(row, column)}"
        for label, column in (
            ("id", "container_id"),
            ("image", "container_image"),
            ("runtime", "container_runtime"),
            ("parents", "ancestors"),
        )
        if text(row, column)
    ]
    return "\n".join(parts) or "-"


def connections_table(picture: Picture) -> str:
    head = (
        "process", "pid", "user", "login user", "container", "destination", "address", "port",
        "connections",
        "first seen", "last seen", "open", "verdict", "seen by", "command line",
    )  # fmt: skip
    rows = []
    for link in picture.links:
        row = link.row
        destination = picture.destinations[link.destination]
        cells = (
            html_text(picture.programs[link.program].label, 60),
            html_text(text(row, "pid")),
            html_text(text(row, "username") or "-"),
            html_text(text(row, "login_user") or "-"),
            f'<span title="{html_text(_container_title(row), TITLE_LIMIT)}">'
            f"{html_text(container_label(row) or '-', 60)}</span>",
            html_text(text(row, "remote_domain") or "-"),
            html_text(destination.address),
            html_text(link.port),
            str(int(number(row, "connections"))),
            iso(number(row, "first_seen")),
            iso(number(row, "last_seen")),
            "yes" if link.open_until > link.span.end or number(row, "open") else "no",
            html_text(link.verdict, 60),
            html_text(text(row, "seen_by") or "-"),
            f'<span title="{html_text(text(row, "cmdline"), TITLE_LIMIT)}">'
            f"{html_text(text(row, 'cmdline'), 80)}</span>",
        )
        rows.append(
            f'<tr class="{"unexpected" if link.unexpected else "expected"}" data-link="row" '
            f'data-p="{link.program}" data-d="{link.destination}" data-u="{int(link.unexpected)}">'
            + "".join(f"<td>{cell}</td>" for cell in cells)
            + "</tr>"
        )
    return (
        '<table id="connections"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


# --- the page --------------------------------------------------------------------------------


def _search_text(*values: object) -> str:
    return " ".join(cell_text(v) for v in values if v not in (None, "")).lower()


def container_choices(picture: Picture) -> List[str]:
    """The containers of the window's processes (``pod ...``, ``container ...``, ``host``)."""
    return sorted({p.container or "host" for p in picture.programs})


def page_data(picture: Picture) -> Dict[str, Any]:
    """What the page's script filters on: for each process and destination, the text a search
    matches (as shown: escaped, lower case), and the index of its container in
    :func:`container_choices`."""
    containers = container_choices(picture)
    return {
        "programs": [
            {
                "search": _search_text(
                    p.name,
                    p.path,
                    p.username,
                    p.container_id,
                    p.systemd_unit,
                    p.container,
                    p.container_image,
                    *p.login_users,
                    *p.pids,
                    *p.cmdlines,
                ),
                "container": containers.index(p.container or "host"),
            }
            for p in picture.programs
        ],
        "destinations": [
            {"search": _search_text(d.address, *d.domains, *d.ports)} for d in picture.destinations
        ],
    }


def build_page(picture: Picture, statement: Statement, generated_at: float) -> str:
    """The whole HTML document."""
    evidence = picture.evidence
    window = evidence.window
    script, style = _asset("report.js"), _asset("report.css")
    hosts = ", ".join(h.hostname or "?" for h in evidence.hosts) or "unknown host"
    machine_ids = ", ".join(h.machine_id or "?" for h in evidence.hosts) or "-"
    cards = (
        ("processes", evidence.processes, "count-processes"),
        ("destinations", evidence.destinations, "count-destinations"),
        ("connections", evidence.connections, "count-connections"),
        ("unexpected", evidence.unexpected_connections, "count-unexpected"),
    )
    options = "".join(
        f'<option value="{p.index}">{html_text(p.label, LABEL_LIMIT)} ({html_text(p.detail)})'
        "</option>"
        for p in sorted(picture.programs, key=lambda p: (cell_text(p.label).lower(), p.index))
    )
    containers = "".join(
        f'<option value="{index}">{html_text(label, LABEL_LIMIT)}</option>'
        for index, label in enumerate(container_choices(picture))
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{content_security_policy(script, style)}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>egress-agent report: {html_text(hosts, 80)}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>Egress report: <span id="host">{html_text(hosts, 120)}</span></h1>
<p class="meta">machine id <span id="machine-id">{html_text(machine_ids, 120)}</span> ·
window <time id="since">{iso(window.since)}</time> to <time id="until">{iso(window.until)}</time>
({duration_text(window.seconds)}) · generated {iso(generated_at)}</p>
<p id="verdict" class="verdict {statement.outcome}">audit: {statement.outcome}
(exit {statement.exit_code}): {html_text(statement.reason)}</p>
</header>
<section class="cards">{
        "".join(
            f'<div class="card {name}"><span class="n" id="{ident}">{count}</span>'
            f"<span>{name}</span></div>"
            for name, count, ident in cards
        )
    }</section>
<section class="filters" aria-label="filters">
<label>process <select id="filter-process"><option value="">all</option>{options}</select></label>
<label>container <select id="filter-container"><option value="">all</option>{
        containers
    }</select></label>
<label><input type="checkbox" id="filter-unexpected"> unexpected only</label>
<label>search <input type="search" id="filter-text" placeholder="name, path, address, domain"
autocomplete="off"></label>
<span id="filter-status" aria-live="polite"></span>
</section>
<section><h2>Who talked to whom</h2>
<p class="legend"><span class="key unexpected"></span> unexpected
<span class="key expected"></span> expected by an allow rule · edge width: connections</p>
{graph_svg(picture)}</section>
<section><h2>When</h2>
<p class="legend">first seen to last seen; paler: still open at the last sample</p>
{timeline_svg(picture)}</section>
<section><h2>Coverage</h2>
{coverage_section(statement)}</section>
<section><h2>Connections</h2>
{connections_table(picture)}</section>
<script type="application/json" id="report-data">{script_json(page_data(picture))}</script>
<script>{script}</script>
</body>
</html>
"""
