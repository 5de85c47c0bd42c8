"""The report page in a real headless Chromium (Debian's, through chromedriver: tests/browser.py).

One page is built from a real history: a test host of two network namespaces in which
programs named ``apt-get``, ``curl`` and ``backup-agent`` (the test's python under those names)
open real TCP connections to "internet" addresses that exist only inside the test host, while
the real sampler samples every namespace and the real store records what it saw in this test
host's client namespace (the samples are recorded one minute apart on the store's clock, so
the hour of the picture passes in seconds).  The agent's runs come from the fixture in
tests/history_fixture.py, because today's store does not record runs yet.  A second page is
built from a history of hostile process names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from browser import Browser, missing
from history_fixture import add_runs, connection, egress_agent, run, write_history
from nethost import NetHost, Proc

from agent.allow import annotate
from agent.classify import Classifier
from agent.collect import open_sampler
from agent.config import load_settings
from agent.history import HistoryStore
from agent.textsafe import cell_text

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "artifacts"
PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "r"
MIRROR, API, DROP = "151.101.2.10", "2606:4700:4701::10", "45.33.32.1"
STEPS = 60
# program, destination, port, first step, last step (None: still open at the end)
SCHEDULE: List[Tuple[str, str, int, int, Optional[int]]] = [
    ("apt-get", MIRROR, 443, 3, 12),
    ("apt-get", MIRROR, 443, 4, 12),
    ("curl", API, 443, 15, 35),
    ("backup-agent", DROP, 8443, 30, None),
    ("backup-agent", API, 443, 31, 40),
    ("apt-get", MIRROR, 443, 45, 50),
]
ALLOW = """\
allow:
  - comment: package mirrors
    name: [apt-get]
    destinations: [151.101.0.0/16]
    ports: [443]
  - comment: the api, for curl
    name: [curl]
    destinations: ["2606:4700:4701::/48"]
"""


def browser_available() -> None:
    """Skip for an ordinary user without the browser; as root, install it (CI runs as root
    and must run these tests)."""
    why = missing()
    if why is not None and os.geteuid() == 0:
        subprocess.run([str(ROOT / "tools" / "install-browser")], check=True)
        why = missing()
        assert why is None, why
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    browser_available()
    with Browser(width=1280, height=1250) as instance:
        yield instance


class RealHistory:
    def __init__(self, path: Path, page: Path, since: int, until: int) -> None:
        self.path, self.page, self.since, self.until = path, page, since, until
        store = HistoryStore(str(path))
        rows = [r for r in store.rows() if r["direction"] == "outbound"]
        store.close()
        self.rows = rows


def _record_test_host(workdir: Path, history: Path) -> Tuple[int, List[Dict[str, Any]]]:
    """Run the schedule in a test host; returns the first sample's time and the runs."""
    config = workdir / "config.yaml"
    config.write_text(ALLOW)
    settings = load_settings(str(config))
    names = workdir / "bin"
    names.mkdir()
    for program in {entry[0] for entry in SCHEDULE}:
        os.symlink(os.path.realpath(sys.executable), names / program)  # comm = the link's name
    start = (int(time.time()) - (STEPS + 1) * 60) // 60 * 60
    with NetHost(PREFIX) as net:
        inet, host = net.namespace("inet"), net.namespace("host")
        net.veth(inet, "i0", host, "h0")
        for address in ("10.77.0.1/24", "fd00:77::1/64", MIRROR + "/32", DROP + "/32"):
            inet.add_address(f"{PREFIX}-i0", address)
        inet.add_address(f"{PREFIX}-i0", API + "/128")
        host.add_address(f"{PREFIX}-h0", "10.77.0.2/24")
        host.add_address(f"{PREFIX}-h0", "fd00:77::2/64")
        host.ip("route", "add", "default", "via", "10.77.0.1")
        host.ip("-6", "route", "add", "default", "via", "fd00:77::1")
        for port in (443, 8443):
            net.listen(inet, "::", port=port, dualstack=True)
        sampler = open_sampler(Classifier(settings.internal_networks), "proc")
        store = HistoryStore(str(history), retention_days=0, max_rows=0)
        running: Dict[int, Proc] = {}
        nethost = str(Path(__file__).with_name("nethost.py"))
        for step in range(STEPS):
            for index, (program, address, port, first, last) in enumerate(SCHEDULE):
                if first == step:
                    argv = [str(names / program), nethost, "connect", "tcp", address, str(port)]
                    argv.append("reset")  # no TIME_WAIT remnant once it ends
                    running[index] = net.spawn(host, argv, ready=True)
                if last == step:
                    net.kill(running.pop(index))
            ours = [c for c in sampler.sample() if c.net_namespace == host.inode]
            annotate(settings.allow, ours)
            assert store.snapshot("sampling", ours, at=start + step * 60), store.problem
        store.close()
    connects = len(SCHEDULE)
    runs = [
        run(start - 120, start + 27 * 60, kind="watch", events_source="sampling",
            tcp_active_opens=3, outbound_tcp_seen=3),
        run(start + 29 * 60, None, last_heartbeat=start + STEPS * 60, heartbeat_interval=60,
            tcp_active_opens=connects - 3, outbound_tcp_seen=connects - 3),
    ]  # fmt: skip
    return start, runs


@pytest.fixture(scope="module")
def real_history() -> Iterator[RealHistory]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs and every /proc/PID/fd")
    workdir = Path(tempfile.mkdtemp(prefix="egress-agent-report-"))
    try:
        history = workdir / "history.db"
        start, runs = _record_test_host(workdir, history)
        add_runs(str(history), runs)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page = ARTIFACTS / "report.html"
        until = start + STEPS * 60
        result = egress_agent(
            "report", "--since", str(start - 300), "--until", str(until),
            "--history", str(history), "--html", str(page),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        yield RealHistory(history, page, start - 300, until)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def open_page(browser: Browser, page: Path) -> None:
    browser.requests()  # what the browser fetched before: not this page's
    browser.console()
    browser.get(page.as_uri())


def visible_rows(browser: Browser) -> List[Dict[str, str]]:
    return list(
        browser.execute(
            "return Array.from(document.querySelectorAll('#connections tbody tr'))"
            ".filter(function (tr) { return getComputedStyle(tr).display !== 'none'; })"
            ".map(function (tr) { return {u: tr.getAttribute('data-u'),"
            " process: tr.cells[0].textContent}; });"
        )
    )


def test_the_page_loads_offline_and_asks_for_nothing(
    browser: Browser, real_history: RealHistory
) -> None:
    open_page(browser, real_history.page)
    assert browser.execute("return document.readyState") == "complete"
    assert browser.requests() == [real_history.page.as_uri()]  # the file itself, nothing else
    assert browser.execute("return performance.getEntriesByType('resource').length") == 0
    assert browser.proxy_connections() == 0
    policy = browser.execute(
        "return document.querySelector('meta[http-equiv=\"Content-Security-Policy\"]')"
        ".getAttribute('content')"
    )
    assert policy.startswith("default-src 'none'; script-src 'sha256-")
    assert browser.console() == []  # no error, no warning, no CSP violation
    status = browser.execute("return document.getElementById('filter-status').textContent")
    assert status == f"showing {len(real_history.rows)} of {len(real_history.rows)} connection rows"


def test_the_counts_match_the_history(browser: Browser, real_history: RealHistory) -> None:
    open_page(browser, real_history.page)
    rows = real_history.rows
    assert {r["name"] for r in rows} == {"apt-get", "curl", "backup-agent"}
    assert len(rows) == len(SCHEDULE)  # one row per process and destination
    unexpected = [r for r in rows if not r["allowlisted"]]
    processes = {r["process_uuid"] or f"pid {r['pid']} {r['name']}" for r in rows}

    def count(ident: str) -> int:
        return int(browser.execute(f"return document.getElementById('{ident}').textContent"))

    assert count("count-processes") == len(processes)
    assert count("count-connections") == sum(r["connections"] for r in rows)
    assert count("count-destinations") == len({r["remote_address"] for r in rows}) == 3
    assert count("count-unexpected") == sum(r["connections"] for r in unexpected) >= 2
    assert len(visible_rows(browser)) == len(rows)
    edges = browser.execute("return document.querySelectorAll('#graph path.edge').length")
    assert edges == len({(r["name"], r["path"], r["remote_address"]) for r in rows})
    verdict = browser.execute("return document.getElementById('verdict').textContent")
    assert verdict.startswith(f"audit: unexpected\n(exit 1): {count('count-unexpected')} unexp")


def test_the_filters_work_offline(browser: Browser, real_history: RealHistory) -> None:
    open_page(browser, real_history.page)
    browser.click("#filter-unexpected")
    shown = visible_rows(browser)
    unexpected = [r for r in real_history.rows if not r["allowlisted"]]
    assert [row["u"] for row in shown] == ["1"] * len(unexpected)
    assert {row["process"] for row in shown} == {
        r["name"] or "(owner not found)" for r in unexpected
    }
    hidden = browser.find('#graph path.edge[data-u="0"]')
    assert not browser.displayed(hidden)
    apt = browser.find("#graph g.node.program:not(.unexpected)")
    assert not browser.displayed(apt)  # a process with nothing unexpected is gone too
    browser.click("#filter-unexpected")
    apt_get = browser.execute(
        "return Array.from(document.querySelectorAll('#filter-process option'))"
        ".filter(function (o) { return o.textContent.indexOf('apt-get') === 0; })[0].value"
    )
    browser.click(f'#filter-process option[value="{apt_get}"]')
    apt_rows = [r for r in real_history.rows if r["name"] == "apt-get"]
    assert [row["process"] for row in visible_rows(browser)] == ["apt-get"] * len(apt_rows)
    browser.click('#filter-process option[value=""]')
    browser.type("#filter-text", "CURL")
    assert [row["process"] for row in visible_rows(browser)] == ["curl"]  # the name, any case
    browser.execute("document.getElementById('filter-text').value = ''")
    browser.type("#filter-text", "151.101")
    to_mirror = {
        r["name"] or "(owner not found)" for r in real_history.rows if r["remote_address"] == MIRROR
    }
    assert {row["process"] for row in visible_rows(browser)} == to_mirror
    assert browser.console() == []


def test_a_screenshot_of_a_real_history(browser: Browser, real_history: RealHistory) -> None:
    open_page(browser, real_history.page)
    top = ARTIFACTS / "report-top.png"
    browser.screenshot(top, full_page=False)  # what docs/report.png shows (make report-screenshot)
    browser.screenshot(ARTIFACTS / "report.png")
    for path in (top, ARTIFACTS / "report.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "</script><script>window.__pwned=1</script>",
    "<!--<script>window.__pwned=2</script>",
    '"><svg onload="window.__pwned=3">',
    "rtl\u202egnp.exe\u2028x",
    os.fsdecode(b"bytes\xff"),
]


def test_hostile_names_render_as_text(browser: Browser, tmp_path: Path) -> None:
    t0 = 1_767_225_600
    connections = [
        connection(
            pid=100 + i, name=name, cmdline=f"{name} --x", path=f"/{name}", process_uuid=f"u{i}"
        )
        for i, name in enumerate(HOSTILE)
    ]
    history = write_history(str(tmp_path / "h.db"), [(t0 + 60, connections)], [run(t0, t0 + 600)])
    page = tmp_path / "hostile.html"
    result = egress_agent(
        "report", "--since", str(t0), "--until", str(t0 + 600), "--history", history,
        "--html", str(page),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    open_page(browser, page)
    injected = browser.execute(
        "return document.querySelectorAll('img, iframe, object, embed, body svg svg,"
        " [onerror], [onload]').length"
    )
    assert injected == 0
    assert browser.execute("return document.scripts.length") == 2
    assert browser.execute("return typeof window.__pwned") == "undefined"
    shown = browser.execute(
        "return Array.from(document.querySelectorAll('#connections tbody tr'))"
        ".map(function (tr) { return tr.cells[0].textContent; }).sort();"
    )
    stored = [utf8 for utf8 in (c.name for c in connections)]
    expected = sorted(cell_text(name.replace("\udcff", "\\xff"), 60) for name in stored)
    assert shown == expected
    assert browser.console() == []  # an injected inline script would be a CSP error here
