"""The extension's tables over real connections between network-namespace test hosts.

Two namespaces joined by a veth pair: ``srv`` holds "internet" servers on 2001:4860:4860::8888
and 9.9.9.9, ``cli`` the clients.  Those addresses exist only inside the namespaces made here,
so nothing leaves the machine.  The extension runs in the root namespace, as osqueryd would
start it, and reads every namespace.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import psutil
import pytest
from nethost import Namespace, NetHost, Proc
from osquery_core import (
    CoreError,
    ExtensionConnection,
    Registration,
    default_extension_command,
    pack_queries,
)
from sqlcore import SqlCore

from agent.classify import Classifier

ROOT = Path(__file__).resolve().parent.parent
SERVER6, CLIENT6 = "2001:4860:4860::8888", "2001:4860:4860::2"
SERVER4, CLIENT4 = "9.9.9.9", "9.9.9.2"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, veth pairs, every /proc/PID/fd"
)


@dataclass
class Internet:
    net: NetHost
    srv: Namespace
    cli: Namespace
    server6: Proc
    server4: Proc


@pytest.fixture
def internet(nethost: NetHost) -> Internet:
    srv, cli = nethost.namespace("srv"), nethost.namespace("cli")
    nethost.veth(srv, "s0", cli, "c0")
    for cidr in (f"{SERVER6}/64", f"{SERVER4}/24"):
        srv.add_address(nethost.name("s0"), cidr)
    for cidr in (f"{CLIENT6}/64", f"{CLIENT4}/24"):
        cli.add_address(nethost.name("c0"), cidr)
    return Internet(nethost, srv, cli, nethost.listen(srv, SERVER6), nethost.listen(srv, SERVER4))


@dataclass
class Running:
    """The extension, launched by the core stand-in, and a connection to it."""

    core: SqlCore
    registration: Registration
    connection: ExtensionConnection


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    config = tmp_path / "config.yaml"
    config.write_text(f"sampling:\n  interval: 1\nhistory:\n  path: {tmp_path / 'h.db'}\n")
    with SqlCore(extensions_interval=1) as core:
        process = core.launch(
            default_extension_command(), interval=1, env={"EGRESS_AGENT_CONFIG": str(config)}
        )
        registration = core.wait_for_registration(process=process)
        with core.connect(registration) as connection:
            yield Running(core, registration, connection)


@pytest.fixture
def extension(running: Running) -> ExtensionConnection:
    return running.connection


def rows_of(rows: List[Dict[str, str]], pid: int) -> List[Dict[str, str]]:
    return [row for row in rows if row["pid"] == str(pid)]


def test_rows_are_right(internet: Internet, extension: ExtensionConnection) -> None:
    client6 = internet.net.connect(internet.cli, SERVER6, internet.server6.port)
    client4 = internet.net.connect(internet.cli, SERVER4, internet.server4.port)
    rows = extension.generate("external_connections")

    (out6,) = rows_of(rows, client6.pid)
    verdict = Classifier().classify(SERVER6)
    process = psutil.Process(client6.pid)
    assert out6["direction"] == "outbound"
    assert (out6["remote_address"], out6["remote_port"]) == (SERVER6, str(internet.server6.port))
    assert (out6["local_address"], out6["local_port"]) == (CLIENT6, str(client6.local_port))
    assert out6["family"] == "10" and out6["protocol"] == "6" and out6["state"] == "ESTABLISHED"
    assert out6["net_namespace"] == str(internet.cli.inode)
    assert out6["external"] == "1" and out6["allowlisted"] == "0"
    assert out6["expanded_address"] == verdict.expanded
    assert out6["address_int"] == verdict.address_int
    assert out6["address_class"] == verdict.category
    assert out6["name"] == process.name() and out6["path"] == process.exe()
    assert "nethost.py" in out6["cmdline"]
    assert out6["process_uuid"] and out6["fd"] != "" and out6["socket"] != ""
    assert out6["via"] == "" and out6["embedded_ipv4"] == ""

    (out4,) = rows_of(rows, client4.pid)
    assert (out4["remote_address"], out4["family"]) == (SERVER4, "2")

    (in6,) = rows_of(rows, internet.server6.pid)
    assert in6["direction"] == "inbound"
    assert (in6["remote_address"], in6["remote_port"]) == (CLIENT6, str(client6.local_port))
    assert in6["net_namespace"] == str(internet.srv.inode)


def test_a_pid_constraint_returns_only_that_pids_rows(
    internet: Internet, extension: ExtensionConnection
) -> None:
    clients = [internet.net.connect(internet.cli, SERVER6, internet.server6.port) for _ in range(3)]
    first, second = clients[0].pid, clients[1].pid
    for old_format in (False, True):
        rows = extension.generate(
            "external_connections", {"pid": [(2, str(first))]}, old_format=old_format
        )
        assert [row["pid"] for row in rows] == [str(first)]
    rows = extension.generate("external_connections", {"pid": [(2, str(first)), (2, str(second))]})
    assert sorted(row["pid"] for row in rows) == sorted([str(first), str(second)])
    rows = extension.generate("external_connections", {"remote_address": [(2, CLIENT6)]})
    assert {row["pid"] for row in rows} == {str(internet.server6.pid)}


def test_a_short_connection_stays_in_history_after_it_closed(
    internet: Internet, extension: ExtensionConnection
) -> None:
    (info,) = extension.generate("egress_agent_info")
    samples_at_open = int(info["samples_total"])
    client = internet.net.connect(internet.cli, SERVER6, internet.server6.port)
    # it lives through three samples (two whole ones at least), however slow the machine
    _wait(extension, lambda row: int(row["samples_total"]) >= samples_at_open + 3)
    internet.net.kill(client)
    (info,) = extension.generate("egress_agent_info")
    samples_at_close = int(info["samples_total"])
    _wait(extension, lambda row: int(row["samples_total"]) >= samples_at_close + 2)

    (row,) = rows_of(extension.generate("external_connection_history"), client.pid)
    assert (row["remote_address"], row["remote_port"]) == (SERVER6, str(internet.server6.port))
    assert row["direction"] == "outbound" and row["protocol"] == "6"
    assert row["open"] == "0"
    assert int(row["samples"]) >= 2
    assert row["connections"] == "1"
    assert int(row["first_seen"]) <= int(row["last_seen"]) <= time.time()
    assert row["net_namespace"] == str(internet.cli.inode)
    assert rows_of(extension.generate("external_connections"), client.pid) == []


def test_pack_and_documented_sql_over_real_rows(internet: Internet, running: Running) -> None:
    client = internet.net.connect(internet.cli, SERVER6, internet.server6.port)
    _wait(running.connection, lambda row: int(row["samples_total"]) >= 2)
    results = {
        name: running.core.query(sql).rows
        for name, sql in pack_queries(str(ROOT / "config" / "osquery" / "egress-agent.conf"))
    }
    outbound = results["egress_outbound_external_connections"]
    assert [r["remote_port"] for r in outbound if r["pid"] == client.pid] == [internet.server6.port]
    history = [r for r in results["egress_history_by_process"] if r["pid"] == client.pid]
    assert history and history[0]["remote_addresses"] == SERVER6
    (health,) = results["egress_agent_health"]
    assert health["samples_total"] >= 2 and health["namespaces_seen"] >= 2

    joined = running.core.query(
        "SELECT c.pid, p.name, h.sha256 FROM external_connections AS c "
        "JOIN processes AS p USING (pid) LEFT JOIN hash AS h ON h.path = p.path "
        "WHERE c.direction = 'outbound' AND c.pid = ?;",
        [client.pid],
    ).rows
    assert len(joined) == 1 and len(joined[0]["sha256"]) == 64
    assert joined[0]["name"] == psutil.Process(client.pid).name()


def _wait(extension: ExtensionConnection, ready, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        (row,) = extension.generate("egress_agent_info")
        if ready(row):
            return
        if time.monotonic() > deadline:
            raise CoreError(f"egress_agent_info never got there: {row}")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
