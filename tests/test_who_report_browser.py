"""The report's container filter and its login user and container cells, in a real headless
Chromium (tests/browser.py), on a history written through the real store: a host ``curl`` a
person logged in as, a podman container by name, a Kubernetes pod, and a container whose
name is hostile markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from browser import Browser
from history_fixture import connection, egress_agent, run, write_history
from test_report_browser import browser_available, open_page

T0 = 1_767_225_600


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    browser_available()
    with Browser(width=1280, height=1000) as instance:
        yield instance


def rows(browser: Browser) -> List[Dict[str, str]]:
    return list(
        browser.execute(
            "return Array.from(document.querySelectorAll('#connections tbody tr'))"
            ".filter(function (tr) { return getComputedStyle(tr).display !== 'none'; })"
            ".map(function (tr) { return {process: tr.cells[0].textContent,"
            " login: tr.cells[3].textContent, container: tr.cells[4].textContent}; });"
        )
    )


def test_filter_by_container_and_pod(browser: Browser, tmp_path: Path) -> None:
    connections = [
        connection(pid=10, process_uuid="a", name="curl", login_user="alice"),
        connection(
            pid=11,
            process_uuid="b",
            name="redis",
            container_id="3f4a" * 16,
            container_name="rw-pod",
            container_runtime="podman",
        ),
        connection(
            pid=12,
            process_uuid="c",
            name="api",
            container_id="ab" * 32,
            pod_namespace="shop",
            pod_name="web-0",
        ),
        connection(
            pid=13,
            process_uuid="d",
            name="evil",
            container_id="cd" * 32,
            container_name="<img src=x onerror=alert(1)>",
        ),
    ]
    history = write_history(str(tmp_path / "h.db"), [(T0 + 60, connections)], [run(T0, T0 + 600)])
    page = tmp_path / "who.html"
    result = egress_agent(
        "report", "--since", str(T0), "--until", str(T0 + 600), "--history", history,
        "--html", str(page),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    open_page(browser, page)
    shown = {row["process"]: row for row in rows(browser)}
    assert shown["curl"]["login"] == "alice" and shown["curl"]["container"] == "-"
    assert shown["redis"]["container"] == "container rw-pod"
    assert shown["api"]["container"] == "pod shop/web-0"
    assert shown["evil"]["container"] == "container <img src=x onerror=alert(1)>"
    assert browser.execute("return document.querySelectorAll('img, [onerror]').length") == 0
    options = browser.execute(
        "return Array.from(document.querySelectorAll('#filter-container option'))"
        ".map(function (o) { return [o.value, o.textContent]; });"
    )
    by_label = {label: value for value, label in options}
    browser.click(f'#filter-container option[value="{by_label["pod shop/web-0"]}"]')
    assert [row["process"] for row in rows(browser)] == ["api"]
    browser.click(f'#filter-container option[value="{by_label["host"]}"]')
    assert [row["process"] for row in rows(browser)] == ["curl"]
    browser.click('#filter-container option[value=""]')
    browser.type("#filter-text", "ALICE")
    assert [row["process"] for row in rows(browser)] == ["curl"]
    assert browser.console() == []
