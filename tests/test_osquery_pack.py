"""The osquery pack and the documented fleet queries run over rows the extension returns."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from osquery_core import (
    CoreStandIn,
    SqlHost,
    default_extension_command,
    load_extension_tables,
    pack_queries,
)

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "config" / "osquery" / "egress-agent.conf"
DOCUMENTS = [ROOT / "README.md"]
EXTENSION = default_extension_command()


def documented_sql() -> List[Tuple[str, str]]:
    """Every ```sql block of the README, named by file and position."""
    found = []
    for document in DOCUMENTS:
        blocks = re.findall(r"```sql\n(.*?)```", document.read_text(), flags=re.S)
        found += [(f"{document.name}#{i}", sql) for i, sql in enumerate(blocks)]
    return found


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlHost]:
    """The extension's tables as osquery would see them, beside the native ones queries join."""
    tmp = tmp_path_factory.mktemp("pack")
    config = tmp / "config.yaml"
    config.write_text(f"sampling:\n  interval: 1\nhistory:\n  path: {tmp / 'history.db'}\n")
    with CoreStandIn() as core:
        process = core.launch(EXTENSION, interval=1, env={"EGRESS_AGENT_CONFIG": str(config)})
        registration = core.wait_for_registration(process=process)
        sql_host = SqlHost()
        with core.connect(registration) as extension:
            loaded = load_extension_tables(sql_host, extension, registration)
            extension.shutdown()
        paths = {row.get("path", "") for rows in loaded.values() for row in rows}
        sql_host.load_natives(core, paths)
        yield sql_host


def test_the_pack_is_complete() -> None:
    pack = json.loads(PACK.read_text())
    assert pack["platform"] == "linux"
    queries: Dict[str, dict] = pack["queries"]
    assert set(queries) == {
        "egress_outbound_external_connections",
        "egress_history_by_process",
        "egress_agent_health",
    }
    for name, query in queries.items():
        assert len(query["description"]) > 40, name
        assert query["interval"] > 0, name
    outbound = queries["egress_outbound_external_connections"]
    assert not outbound.get("snapshot", False)  # differential: new destinations are logged
    assert "local_port" not in outbound["query"]  # or every new connection would be a new row
    assert "external_connection_history" in queries["egress_history_by_process"]["query"]
    assert "egress_agent_info" in queries["egress_agent_health"]["query"]


@pytest.mark.parametrize(("name", "sql"), pack_queries(str(PACK)))
def test_pack_sql_runs_over_the_extensions_rows(host: SqlHost, name: str, sql: str) -> None:
    rows = host.query(sql)
    if name.startswith("discovery"):
        assert rows, "the discovery query must find the extension"
    if name == "egress_agent_health":
        (row,) = rows
        assert row["version"] and row["samples_total"] >= 0


@pytest.mark.parametrize(("name", "sql"), documented_sql())
def test_documented_sql_runs_over_the_extensions_rows(host: SqlHost, name: str, sql: str) -> None:
    host.query(sql)
