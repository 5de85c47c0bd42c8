"""The osquery pack and the documented fleet queries, run by osquery core's SQL layer.

tests/sqlcore.py plays core: the extension's tables are SQLite virtual tables over the real
extension process, joined with core's own tables, and every query's cost is counted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from osquery_core import default_extension_command, pack_queries
from sqlcore import SqlCore

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "config" / "osquery" / "egress-agent.conf"
DOCUMENTS = [ROOT / "README.md"]
EXTENSION = default_extension_command()
POLICY = "SELECT 1 FROM egress_agent_audit WHERE since = '24h' AND verdict = 'clean';"
"""The Fleet policy the README and the pack show (tests/test_audit_table.py runs it)."""
TABLES = (
    "external_connections",
    "external_connection_history",
    "external_connection_events",
    "egress_agent_info",
    "egress_agent_audit",
)


def documented_sql() -> List[Tuple[str, str]]:
    """Every ```sql block of the README, named by file and position."""
    found = []
    for document in DOCUMENTS:
        blocks = re.findall(r"```sql\n(.*?)```", document.read_text(), flags=re.S)
        found += [(f"{document.name}#{i}", sql) for i, sql in enumerate(blocks)]
    return found


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlCore]:
    """osquery core with the extension loaded, as osqueryd would run it."""
    tmp = tmp_path_factory.mktemp("pack")
    config = tmp / "config.yaml"
    config.write_text(f"sampling:\n  interval: 1\nhistory:\n  path: {tmp / 'history.db'}\n")
    with SqlCore(extensions_interval=1) as stand_in:
        process = stand_in.launch(EXTENSION, interval=1, env={"EGRESS_AGENT_CONFIG": str(config)})
        stand_in.wait_for_registration(process=process)
        yield stand_in


def assert_one_generate_per_table(generate: Dict[str, int]) -> None:
    """Each of the extension's tables a documented query reads costs one generate call."""
    assert set(generate) <= set(TABLES)
    assert all(calls == 1 for calls in generate.values()), generate


def test_the_pack_is_complete() -> None:
    pack = json.loads(PACK.read_text())
    assert pack["platform"] == "linux"
    queries: Dict[str, dict] = pack["queries"]
    assert set(queries) == {
        "egress_outbound_external_connections",
        "egress_connection_events",
        "egress_history_by_process",
        "egress_agent_health",
        "egress_audit_verdict",
        "egress_history_head",
    }
    for name, query in queries.items():
        assert len(query["description"]) > 40, name
        assert query["interval"] > 0, name
    outbound = queries["egress_outbound_external_connections"]
    assert not outbound.get("snapshot", False)  # differential: new destinations are logged
    assert "local_port" not in outbound["query"]  # or every new connection would be a new row
    assert "external_connection_history" in queries["egress_history_by_process"]["query"]
    assert "last_seen >=" in queries["egress_history_by_process"]["query"]  # one hour's rows
    events = queries["egress_connection_events"]
    assert not events.get("snapshot", False) and "time >=" in events["query"]
    assert "egress_agent_info" in queries["egress_agent_health"]["query"]
    verdict = queries["egress_audit_verdict"]
    assert "FROM egress_agent_audit WHERE since = '24h'" in verdict["query"]
    assert POLICY in verdict["description"] and verdict.get("snapshot", False)
    head = queries["egress_history_head"]  # the chain's head leaves the host (issue 25)
    assert "history_head" in head["query"] and head.get("snapshot", False)


@pytest.mark.parametrize(("name", "sql"), pack_queries(str(PACK)))
def test_pack_sql_runs_through_core(core: SqlCore, name: str, sql: str) -> None:
    result = core.query(sql)
    assert_one_generate_per_table(result.stats.generate)
    if name.startswith("discovery"):
        assert result.rows, "the discovery query must find the extension"
    if name == "egress_agent_health":
        (row,) = result.rows
        assert row["version"] and row["samples_total"] >= 0
        assert result.stats.generate == {"egress_agent_info": 1}


@pytest.mark.parametrize(("name", "sql"), documented_sql())
def test_documented_sql_runs_through_core(core: SqlCore, name: str, sql: str) -> None:
    result = core.query(sql)
    assert result.stats.generate, "every documented query reads a table of the extension"
    assert_one_generate_per_table(result.stats.generate)
