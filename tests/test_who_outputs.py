"""Issue 22's columns in every output: ECS fields, the table's namespace cell and login user,
CSV, the osquery tables' columns, the history store (a version 1 file extended with them), and
the report's table and container filter.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, Dict

from test_history import conn as history_connection

from agent.ecs import ecs_document
from agent.history import HistoryStore
from agent.osquery import (
    external_connection_events,
    external_connection_history,
    external_connections,
)
from agent.records import COLUMN_NAMES, Connection
from agent.render import TABLE_COLUMNS, render, table_view

VERSION_1 = Path(__file__).parent / "data" / "history-v1.db"
WHO_COLUMNS = (
    "login_user",
    "login_session",
    "ancestors",
    "container_name",
    "container_image",
    "container_runtime",
    "pod_namespace",
    "pod_name",
)
CONTAINER = "3f4a9c2b1d0e" + "0" * 52


def record(**changes: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = dict(
        pid=4242,
        name="curl",
        path="/usr/bin/curl",
        cmdline="curl -s http://198.51.100.7/x.sh",
        uid=65534,
        username="nobody",
        parent=4000,
        login_user="alice",
        login_session=3,
        ancestors='[{"pid":4000,"name":"bash"},{"pid":1,"name":"init"}]',
        container_id=CONTAINER,
        container_name="rw-pod",
        container_image="docker.io/library/redis:7",
        container_runtime="podman",
        remote_address="198.51.100.7",
        remote_port=80,
        family=2,
    )
    values.update(changes)
    return Connection(**values).as_dict()


def test_the_columns_exist_everywhere() -> None:
    for column in WHO_COLUMNS:
        assert column in COLUMN_NAMES
        for spec in (
            external_connections.SPEC,
            external_connection_events.SPEC,
            external_connection_history.SPEC,
        ):
            assert column in spec.column_names, (spec.name, column)
    assert "login_user" in TABLE_COLUMNS


def test_ecs_fields() -> None:
    document = ecs_document(record(pod_namespace="shop", pod_name="web-0"), 0)
    process = document["process"]
    assert process["args"] == ["curl", "-s", "http://198.51.100.7/x.sh"]
    assert process["args_count"] == 3
    assert process["parent"] == {"pid": 4000, "name": "bash"}
    assert document["user"] == {"name": "alice", "effective": {"name": "nobody", "id": "65534"}}
    assert document["container"] == {
        "id": CONTAINER,
        "name": "rw-pod",
        "image": {"name": "docker.io/library/redis:7"},
        "runtime": "podman",
    }
    assert document["orchestrator"] == {
        "type": "kubernetes",
        "namespace": "shop",
        "resource": {"type": "pod", "name": "web-0"},
    }
    assert document["egress_agent"]["login_session"] == 3
    assert json.loads(document["egress_agent"]["ancestors"])[0] == {"pid": 4000, "name": "bash"}


def test_ecs_without_a_login_keeps_the_process_user_in_user_name() -> None:
    document = ecs_document(record(login_user="", ancestors="", container_id=""), 0)
    assert document["user"] == {"name": "nobody", "id": "65534"}
    assert document["process"]["parent"] == {"pid": 4000}
    assert "orchestrator" not in document


def test_ecs_parent_name_only_when_the_chain_starts_at_the_parent() -> None:
    document = ecs_document(record(ancestors='[{"pid":7,"name":"other"}]'), 0)
    assert document["process"]["parent"] == {"pid": 4000}
    broken = ecs_document(record(ancestors="{not json"), 0)
    assert broken["process"]["parent"] == {"pid": 4000}


def test_table_names_the_container_and_the_pod() -> None:
    rows = table_view(
        [
            record(),
            record(container_name=""),
            record(pod_namespace="shop", pod_name="web-0"),
            record(container_id="", container_name=""),
        ],
        {},
        None,
    )
    assert [row["namespace"] for row in rows] == [
        "container rw-pod",
        "container 3f4a9c2b1d0e",
        "pod shop/web-0",
        "",
    ]
    text = render(rows, TABLE_COLUMNS, "table")
    header, first = text.splitlines()[:2]
    assert "login_user" in header.split() and "alice" in first.split()


def test_csv_carries_the_columns() -> None:
    text = render([record()], None, "csv")
    (row,) = list(csv.DictReader(io.StringIO(text)))
    assert row["login_user"] == "alice"
    assert row["container_image"] == "docker.io/library/redis:7"
    assert json.loads(row["ancestors"].replace("\\\\", "\\"))[1]["pid"] == 1


def test_a_version_1_history_store_takes_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    shutil.copy(VERSION_1, path)
    store = HistoryStore(str(path), retention_days=100000)
    before = len(store.rows())
    fields = {k: v for k, v in record().items() if k in WHO_COLUMNS}
    assert store.snapshot("sampling", [history_connection(41000, uuid="who-1", **fields)], at=1)
    rows = {row["process_uuid"]: row for row in store.rows()}
    assert len(rows) == before + 1
    mine = rows["who-1"]
    for column in WHO_COLUMNS:
        assert mine[column] == fields[column], column
    old = [row for uuid, row in rows.items() if uuid != "who-1"]
    assert all(row["login_user"] in ("", None) for row in old)


def test_the_report_shows_and_filters_by_login_user_and_container() -> None:
    from history_fixture import connection, run

    from agent.evidence import Window, evidence_of
    from agent.report import html_report
    from agent.report.model import picture_of
    from agent.report.page import container_choices, page_data

    t0 = 1_767_225_600
    window = Window(t0, t0 + 3600)

    def row(**fields: Any) -> Dict[str, Any]:
        values: Dict[str, Any] = connection(**fields).as_dict()
        values.update(first_seen=t0 + 60, last_seen=t0 + 600, connections=1, open=0)
        return values

    rows = [
        row(pid=10, process_uuid="a", name="curl", login_user="alice"),
        row(
            pid=11,
            process_uuid="b",
            name="redis",
            container_id=CONTAINER,
            container_name="rw-pod",
            container_image="docker.io/library/redis:7",
        ),
        row(
            pid=12,
            process_uuid="c",
            name="api",
            container_id="ab" * 32,
            pod_namespace="shop",
            pod_name="web-0",
        ),
    ]
    evidence = evidence_of(rows, [run(t0, t0 + 3600)], window)
    picture = picture_of(evidence)
    assert container_choices(picture) == ["container rw-pod", "host", "pod shop/web-0"]
    data = page_data(picture)
    by_name = {p.name: data["programs"][p.index] for p in picture.programs}
    assert by_name["curl"]["container"] == 1 and "alice" in by_name["curl"]["search"]
    assert by_name["redis"]["container"] == 0 and "redis:7" in by_name["redis"]["search"]
    assert by_name["api"]["container"] == 2 and "shop/web-0" in by_name["api"]["search"]
    page = html_report(evidence, generated_at=t0 + 3600)
    assert '<select id="filter-container">' in page
    assert "<th>login user</th>" in page and "<td>alice</td>" in page
    assert ">pod shop/web-0</span>" in page and ">container rw-pod</span>" in page
