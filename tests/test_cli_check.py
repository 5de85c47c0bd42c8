"""`egress-agent check` and `watch` end to end, on real sockets in a test host.

A server namespace holds listeners on a global IPv6, a global IPv4 and a unique-local address;
a client namespace on the other end of a veth pair dials them (once from an AF_INET6 socket to
the IPv4-mapped address).  Every address lives only inside the two namespaces.  The command
samples the whole machine, so the assertions look at the rows of these two namespaces, and the
exit-status tests limit the command to them (``--netns``): the machine has external
connections of its own (tests/foreign.py makes some for the whole run).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from commands import egress_agent
from nethost import NetHost

PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "k"
SRV6, CLI6 = "2001:4860:4861::8888", "2001:4860:4861::2"
SRV4, CLI4 = "9.9.8.9", "9.9.8.10"
SRV_ULA, CLI_ULA = "fd5e:a5a6::1", "fd5e:a5a6::2"


class Host:
    def __init__(self, net: NetHost) -> None:
        self.srv = srv = net.namespace("srv")
        self.cli = cli = net.namespace("cli")
        net.veth(srv, "s0", cli, "c0")
        for address in (SRV6 + "/64", SRV4 + "/24", SRV_ULA + "/64"):
            srv.add_address(f"{PREFIX}-s0", address)
        for address in (CLI6 + "/64", CLI4 + "/24", CLI_ULA + "/64"):
            cli.add_address(f"{PREFIX}-c0", address)
        self.server = net.listen(srv, "::", dualstack=True)
        port = self.server.port
        self.c6 = net.connect(cli, SRV6, port)
        self.c4 = net.connect(cli, SRV4, port)
        self.c_mapped = net.connect(cli, "::ffff:" + SRV4, port)
        self.c_ula = net.connect(cli, SRV_ULA, port)
        self.namespaces = {srv.inode, cli.inode}


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs and every /proc/PID/fd")
    with NetHost(PREFIX) as net:
        yield Host(net)


def ours(host: Host, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if int(r["net_namespace"]) in host.namespaces]


def test_outbound_rows_name_the_process_and_the_destination(host: Host) -> None:
    result = egress_agent("check", "--format", "json")
    assert result.returncode == 1, result.stderr
    rows = ours(host, json.loads(result.stdout))
    got = {(r["pid"], r["remote_address"], r["family"], r["via"], r["embedded_ipv4"]) for r in rows}
    assert got == {
        (host.c6.pid, SRV6, 10, None, None),
        (host.c4.pid, SRV4, 2, None, None),
        (host.c_mapped.pid, "::ffff:" + SRV4, 10, "ipv4_mapped", SRV4),
    }
    for row in rows:
        assert row["direction"] == "outbound" and row["external"] is True
        assert row["net_namespace"] == host.cli.inode
        assert row["name"].startswith("python") and "nethost.py" in row["cmdline"]
        assert row["remote_port"] == host.server.port and row["state"] == "ESTABLISHED"
        assert row["address_class"] == "global" and row["allowlisted"] is False


def test_inbound_from_a_global_address(host: Host) -> None:
    result = egress_agent("check", "--format", "json", "--direction", "inbound")
    rows = ours(host, json.loads(result.stdout))
    assert {(r["pid"], r["remote_address"]) for r in rows} == {
        (host.server.pid, CLI6),
        (host.server.pid, "::ffff:" + CLI4),
    }
    assert all(r["direction"] == "inbound" and r["local_port"] == host.server.port for r in rows)


def test_all_shows_every_socket_with_its_verdict_and_ula_is_never_external(host: Host) -> None:
    result = egress_agent("check", "--format", "json", "--all", "--direction", "any")
    rows = ours(host, json.loads(result.stdout))
    ula = [r for r in rows if r["remote_address"] in (SRV_ULA, CLI_ULA)]
    assert len(ula) == 2 and all(r["address_class"] == "unique_local" for r in ula)
    assert not any(r["external"] for r in ula)
    listener = [r for r in rows if r["state"] == "LISTEN"]
    assert [r["pid"] for r in listener] == [host.server.pid]


def test_allow_rules_make_connections_expected(host: Host, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "allow:\n"
        "  - comment: test clients to the test server\n"
        "    name: 'python*'\n"
        f"    destinations: [{SRV6}/128, {SRV4}/32]\n"
        f"    ports: [{host.server.port}]\n"
        "  - comment: the test server's peers\n"
        f"    destinations: [{CLI6}/128, {CLI4}/32]\n"
    )
    ours_only = ("--netns", host.srv.name, "--netns", host.cli.name)
    quiet = egress_agent(
        "check", "--format", "json", "--direction", "any", *ours_only, config=config
    )
    assert quiet.returncode == 0, quiet.stdout
    assert json.loads(quiet.stdout) == []
    loud = egress_agent("check", "--format", "json", "--direction", "any", *ours_only)
    assert loud.returncode == 1 and len(json.loads(loud.stdout)) == 6  # 3 out, 3 in
    marked = egress_agent("check", "--format", "json", "--allowlisted", *ours_only, config=config)
    assert marked.returncode == 0
    rows = ours(host, json.loads(marked.stdout))
    assert len(rows) == 3
    assert all(
        r["allowlisted"] and r["allow_rule"] == "test clients to the test server" for r in rows
    )


def test_internal_networks_make_connections_internal(host: Host, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"classification:\n  internal_networks: [{SRV4}/32]\n")
    result = egress_agent("check", "--format", "json", "--config", str(config))
    rows = ours(host, json.loads(result.stdout))
    assert {r["remote_address"] for r in rows} == {SRV6}


def test_csv_and_jsonl_carry_the_same_rows(host: Host) -> None:
    as_json = ours(host, json.loads(egress_agent("check", "--format", "json").stdout))
    as_csv = ours(
        host, list(csv.DictReader(io.StringIO(egress_agent("check", "--format", "csv").stdout)))
    )
    lines = egress_agent("check", "--format", "jsonl").stdout.splitlines()
    as_jsonl = ours(host, [json.loads(line) for line in lines])
    key = ("pid", "remote_address", "remote_port")
    assert sorted(tuple(str(r[k]) for k in key) for r in as_csv) == sorted(
        tuple(str(r[k]) for k in key) for r in as_json
    )
    assert sorted(as_jsonl, key=lambda r: r["socket"]) == sorted(as_json, key=lambda r: r["socket"])


def test_ecs_fields_are_where_ecs_puts_them(host: Host) -> None:
    result = egress_agent("check", "--format", "ecs")
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    mapped = [d for d in docs if d.get("process", {}).get("pid") == host.c_mapped.pid]
    assert len(mapped) == 1
    doc = mapped[0]
    assert doc["destination"]["ip"] == "::ffff:" + SRV4
    assert doc["destination"]["port"] == host.server.port
    assert doc["network"]["transport"] == "tcp" and doc["network"]["direction"] == "egress"
    assert doc["network"]["type"] == "ipv4"
    assert doc["process"]["command_line"].endswith(f"connect tcp ::ffff:{SRV4} {host.server.port}")
    assert doc["process"]["executable"] and doc["user"]["name"] == "root"
    assert doc["event"]["kind"] == "event"
    assert doc["source"]["port"] == host.c_mapped.local_port


def test_table_puts_process_and_destination_first(host: Host) -> None:
    result = egress_agent("check", "--format", "table", "--summary")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["pid", "name"]
    assert any(line.split()[0] == str(host.c6.pid) and SRV6 in line for line in lines[1:])
    assert "unexpected external connection" in result.stderr and "namespace" in result.stderr


def test_bad_config_exits_2_before_sampling(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("allow:\n  - ports: [70000]\n")
    result = egress_agent("check", "--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert "allow[0].ports[0]" in result.stderr and "70000" in result.stderr


def test_watch_prints_each_new_connection_once_and_keeps_history(
    host: Host, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {tmp_path}/state/history.db\n")
    result = egress_agent("watch", "--interval", "0.2", "--count", "3", config=config)
    assert result.returncode == 0, result.stderr
    rows = ours(host, [json.loads(line) for line in result.stdout.splitlines()])
    clients = sorted([host.c6.pid, host.c4.pid, host.c_mapped.pid])
    assert sorted(r["pid"] for r in rows) == clients
    history = egress_agent("history", "--format", "json", "--since", "1h", config=config)
    assert history.returncode == 0, history.stderr
    recorded = ours(host, json.loads(history.stdout))
    assert sorted(r["pid"] for r in recorded if r["direction"] == "outbound") == clients
    assert all(r["samples"] == 3 and r["open"] for r in recorded)


def test_history_without_a_store_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {tmp_path}/none/history.db\n")
    result = egress_agent("history", "--format", "json", config=config)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert "no history" in result.stderr
    bad = egress_agent("history", "--since", "yesterday", config=config)
    assert bad.returncode == 2 and "not a duration: 'yesterday'" in bad.stderr


def test_watch_stops_cleanly_on_sigterm(host: Host) -> None:
    watch = subprocess.Popen(
        [
            *(sys.executable, "-m", "agent.cli", "watch", "--no-history"),
            *("--interval", "0.2", "--format", "ecs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = watch.stdout.readline() if watch.stdout else ""
        assert json.loads(first)["event"]["kind"] == "event"
        watch.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert watch.wait(5) == 0
        assert time.monotonic() - started < 2
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
