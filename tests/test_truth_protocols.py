"""ICMP, ICMPv6 and raw sockets to external addresses (issue 24), with their process and
protocol (osquery's numbers 1, 58, 255), from the kernel events (``ping``, a raw GRE sender,
through ``egress-agent watch``, its history and the audit) and from samples (connected ping
and raw sockets, through ``egress-agent check``); the table format names them ``icmp``,
``icmp6``, ``raw``.  SCTP is not built into this machine's kernel (no ``CONFIG_IP_SCTP``): its
rules are pinned down in tests/test_truth_datagrams.py.

Test hosts of tests/truthhost.py: the "internet" addresses live on a veth between test
namespaces only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from commands import egress_agent
from truthhost import (
    FILES,
    WEB,
    WEB6,
    TruthHost,
    Watch,
    described,
    program,
)

HOLDER = """
import socket, sys
ping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
ping.connect((sys.argv[1], 0))
ping6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
ping6.connect((sys.argv[2], 0))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
raw.connect((sys.argv[3], 0))
print("READY", flush=True)
sys.stdin.read()
"""

GRE = """
import socket, sys
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
raw.sendto(bytes(4), (sys.argv[1], 0))
"""


def test_connected_ping_and_raw_sockets_are_sampled(truth: TruthHost, tmp_path: Path) -> None:
    truth.cli.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
    holder = truth.net.spawn(
        truth.cli, [sys.executable, "-c", HOLDER, WEB, WEB6, FILES], ready=True
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {tmp_path / 'history.db'}\n")
    netns = ("--netns", truth.cli.name)
    checked = egress_agent("check", "--format", "json", *netns, config=config)
    assert checked.returncode == 1, checked.stderr  # unexpected: nothing allows them
    rows = [r for r in json.loads(checked.stdout) if r["pid"] == holder.pid]
    assert {(r["protocol"], r["remote_address"], r["direction"]) for r in rows} == {
        (1, WEB, "outbound"),
        (58, WEB6, "outbound"),
        (255, FILES, "outbound"),
    }, described(rows)
    table = egress_agent("check", "--format", "table", *netns, config=config).stdout
    mine = [line.split() for line in table.splitlines() if str(holder.pid) in line.split()]
    assert {"icmp", "icmp6", "raw"} <= {word for words in mine for word in words}, table


def test_ping_and_raw_datagrams_are_seen_as_they_leave(truth: TruthHost, tmp_path: Path) -> None:
    watch = Watch(tmp_path)
    try:
        ping = program("ping")
        pings = {
            truth.start([ping, "-c", "1", "-W", "5", WEB]): (1, WEB),
            truth.start([ping, "-6", "-c", "1", "-W", "5", WEB6]): (58, WEB6),
            truth.start([sys.executable, "-c", GRE, FILES]): (255, FILES),
        }
        expected: Dict[int, Any] = {}
        for proc, what in pings.items():
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            expected[proc.pid] = what

        def complete(rows: List[Dict[str, Any]]) -> bool:
            return {r["pid"] for r in rows} >= set(expected)

        rows = watch.wait_rows(set(expected), complete)
        assert complete(rows), described(rows)
        for row in rows:
            assert (row["protocol"], row["remote_address"]) == expected[row["pid"]], described(
                [row]
            )
            assert row["direction"] == "outbound"
    finally:
        stderr = watch.stop()
    assert "Traceback" not in stderr
    audit = egress_agent("audit", "--since", "1h", config=watch.config)
    assert audit.returncode == 1, audit.stdout + audit.stderr  # unexpected egress
    counted = [line for line in audit.stdout.splitlines() if line.startswith("by protocol:")]
    assert counted and all(name in counted[0] for name in ("icmp ", "icmp6 ", "raw ")), audit.stdout
    assert "the kernel counts TCP connects only" in audit.stdout
    document = json.loads(
        egress_agent("audit", "--since", "1h", "--format", "json", config=watch.config).stdout
    )
    assert {"icmp", "icmp6", "raw"} <= set(document["unexpected_by_protocol"])
