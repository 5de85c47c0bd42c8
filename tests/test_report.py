"""The report page as text (what the browser tests look at rendered): nothing fetchable, a
policy that lets only its own script and style run, hostile text inert, counts as in the
history; and the text summary."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Any, Dict, List

from history_fixture import connection, run

from agent.evidence import Window, evidence_of
from agent.history import HistoryStore
from agent.report import html_report, text_report
from agent.report.model import order, picture_of
from agent.report.page import script_json

T0 = 1_767_225_600
WINDOW = Window(T0, T0 + 3600)
HOSTILE_NAMES = [
    "<img src=x onerror=alert(1)>",
    "</script><script>window.__pwned=1</script>",
    "<!--<script>",
    "line\u2028sep\u2029para",
    '"><svg onload=alert(2)>',
    os.fsdecode(b"bytes\xff\xfe"),
]


def row(**fields: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = connection().as_dict()
    values.update(first_seen=T0 + 60, last_seen=T0 + 600, connections=1, open=0)
    values.update(fields)
    return values


def stored_rows(tmp_path: Any, connections: List[Any]) -> List[Dict[str, Any]]:
    """Rows as the store gives them back (undecodable bytes escaped on the way in)."""
    store = HistoryStore(str(tmp_path / "h.db"))
    store.snapshot("sampling", connections, at=T0 + 60)
    rows = store.rows()
    store.close()
    return rows


def hostile_page(tmp_path: Any) -> str:
    connections = [
        connection(pid=100 + i, name=name, cmdline=name, path="/x/" + name, process_uuid=f"u{i}")
        for i, name in enumerate(HOSTILE_NAMES)
    ]
    evidence = evidence_of(stored_rows(tmp_path, connections), [run(T0, T0 + 3600)], WINDOW)
    return html_report(evidence, generated_at=T0 + 3600)


def test_the_page_fetches_nothing_and_names_only_its_own_script_and_style(tmp_path: Any) -> None:
    page = html_report(evidence_of([row()], [run(T0, T0 + 3600)], WINDOW), T0)
    (policy,) = re.findall(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert policy.startswith("default-src 'none'; ")
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    for source, directive in ((script, "script-src"), (style, "style-src")):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    # nothing that could name something to fetch
    assert not re.search(r"\b(src|href|action|srcset|poster|data)=", page, re.I)
    assert not re.search(r"<(link|img|iframe|object|embed|base|form)\b", page, re.I)
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    assert "http://" not in page and "https://" not in page.replace("https://example.org/", "")


def test_hostile_names_are_text_in_the_markup(tmp_path: Any) -> None:
    page = hostile_page(tmp_path)
    for name in HOSTILE_NAMES:
        assert name not in page
    assert "<img" not in page and "<svg onload" not in page and "<!--" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "\u2028" not in page and "\u2029" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "line\\u2028sep\\u2029para" in page  # visible, as in a table (agent/textsafe.py)
    assert "bytes\\\\xff\\\\xfe" in page  # the store's escape of the bytes, shown reversibly


def test_the_json_the_script_reads_cannot_end_its_element() -> None:
    document = {"a": "</script><!--<script>", "b": "\u2028\u2029&", "c": os.fsdecode(b"\xff")}
    encoded = script_json(document)
    assert re.fullmatch(r"[\x20-\x7e]*", encoded)
    assert "<" not in encoded and ">" not in encoded and "&" not in encoded
    assert json.loads(encoded) == {
        "a": "</script><!--<script>",
        "b": "\u2028\u2029&",
        "c": "\\xff",
    }


def test_counts_and_names_come_from_the_rows() -> None:
    rows = [
        row(),
        row(local_port=1, remote_port=80, connections=3),
        row(process_uuid="u2", pid=101, remote_address="2606:4700::1", remote_domain="cdn.example"),
        row(process_uuid="u3", pid=102, name="apt", allowlisted=True, allow_rule="mirrors"),
    ]
    evidence = evidence_of(rows, [run(T0, T0 + 3600)], WINDOW)
    page = html_report(evidence, T0)

    def card(ident: str) -> str:
        return re.findall(rf'id="{ident}">([^<]*)<', page)[0]

    assert card("count-processes") == "3" and card("count-destinations") == "2"
    assert card("count-connections") == "6" and card("count-unexpected") == "5"
    assert page.count('data-link="row"') == 4 and page.count('data-link="span"') == 4
    assert page.count('data-link="edge"') == 3  # curl and apt -> 9.9.9.9, curl -> the cdn
    assert ">cdn.example</text>" in page  # a destination is named by its domain
    assert "2 processes" in page  # two curl processes are one node
    assert "audit: unexpected" in page


def test_open_connections_reach_the_end_of_the_window() -> None:
    evidence = evidence_of([row(open=1)], [run(T0, T0 + 3600)], WINDOW)
    (link,) = picture_of(evidence).links
    assert link.span.end == T0 + 600 and link.open_until == T0 + 3600
    assert 'class="open"' in html_report(evidence, T0)


def test_the_graph_order_keeps_joined_nodes_together() -> None:
    # a -> x, b -> y, c -> x: a and c, which share x, end up side by side.
    rows = [
        row(process_uuid="a", name="a", remote_address="1.0.0.1"),
        row(process_uuid="b", name="b", remote_address="1.0.0.2"),
        row(process_uuid="c", name="c", remote_address="1.0.0.1"),
    ]
    picture = picture_of(evidence_of(rows, [], WINDOW))
    programs, destinations = order(picture)
    assert [picture.programs[i].name for i in programs] == ["a", "c", "b"]
    assert [picture.destinations[i].address for i in destinations] == ["1.0.0.1", "1.0.0.2"]


def test_the_text_summary(tmp_path: Any) -> None:
    rows = stored_rows(tmp_path, [connection(name="evil\n\x1b[2J"), connection(process_uuid="u2")])
    text = text_report(evidence_of(rows, [run(T0, T0 + 3600)], WINDOW))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["process", "pid", "username", "destination"]
    assert any(line.startswith("evil\\n\\x1b[2J ") for line in lines)
    assert "\x1b" not in text
    assert lines[-1].startswith("verdict: unexpected (exit 1): 2 unexpected external")
    empty = text_report(evidence_of([], [], WINDOW))
    assert empty.startswith("no external connection went out in the window\n")


def test_html_text_of_the_window_is_iso_8601_utc() -> None:
    page = html_report(evidence_of([], [], WINDOW), T0)
    assert '<time id="since">2026-01-01T00:00:00Z</time>' in page
    assert '<time id="until">2026-01-01T01:00:00Z</time>' in page
