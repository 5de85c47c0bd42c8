"""What is reported is what happened (issue 24), UDP: a flow is a datagram that left, and a
server's answer is a reply, through ``egress-agent watch`` with kernel events, its history and
``history``.

Real programs from Debian's packages resolve through glibc against dnsmasq in a test host
(tests/truthhost.py): glibc connects a UDP socket to each address of an answer to sort them
(RFC 6724) and sends nothing through it, ping connects one to port 1025 to pick its source
address; none of those is a flow.  The queries that did leave (to 9.9.9.9:53) are, and
dnsmasq's answers to the client's global address are inbound replies, never outbound rows.
Assertions look only at this test's processes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List, Optional

from commands import egress_agent
from truthhost import (
    ALIAS,
    CLIENT,
    DNS,
    NAME,
    WEB,
    WEB_ADDRESSES,
    TruthHost,
    Watch,
    described,
    program,
)


def test_glibcs_address_sorting_and_pings_probe_are_no_flows(
    truth: TruthHost, watch: Watch
) -> None:
    curl = program("curl")
    pids = {
        ran(truth, [curl, "-s", "-m", "10", f"http://{NAME}/"]),
        ran(truth, [curl, "-s", "-m", "10", f"http://{ALIAS}/"]),
        ran(truth, [program("wget"), "-q", "-O", "/dev/null", "-T", "10", f"http://{NAME}/"]),
        ran(
            truth,
            [
                sys.executable,
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://{NAME}/', timeout=10)",
            ],
        ),
    }
    ping = ran(truth, [program("ping"), "-c", "1", "-W", "5", WEB])
    rows = watch.wait_rows(pids, lambda rows: all(tcp_seen(pid)(rows) for pid in pids))
    assert all(tcp_seen(pid)(rows) for pid in pids), described(rows)
    time.sleep(1)  # anything else the events would say of them has been said
    rows = watch.rows(pids | {ping})
    probes = [
        r
        for r in rows
        if r["protocol"] == 17
        and (r["remote_address"] in WEB_ADDRESSES or r["remote_port"] == 1025)
    ]
    assert not probes, "connect() sent nothing: " + described(probes)
    for pid in pids:  # the queries that did leave are flows: A and AAAA to dnsmasq
        sent = [r for r in rows if r["pid"] == pid and r["protocol"] == 17]
        assert {(r["remote_address"], r["remote_port"], r["direction"]) for r in sent} == {
            (DNS, 53, "outbound")
        }, described(rows)


def ran(truth: TruthHost, argv: List[str]) -> int:
    """Run ``argv`` in the client namespace (``ip netns exec`` execs it: the pid is its own);
    its pid, once it exited successfully."""
    proc = truth.start(argv)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{argv}: {stderr}"
    return proc.pid


def tcp_seen(pid: int) -> Any:
    return lambda rows: any(r["pid"] == pid and r["protocol"] == 6 for r in rows)


def test_a_dns_servers_answers_are_replies_not_outbound(truth: TruthHost, watch: Watch) -> None:
    dig = program("dig")
    asked = [ran(truth, [dig, "+short", "+tries=1", f"@{DNS}", NAME]) for _ in range(3)]
    server = truth.dnsmasq.pid
    rows = watch.wait_rows(
        {server, *asked},
        lambda rows: (
            sum(1 for r in rows if r["pid"] in asked) >= 3 and any(r["pid"] == server for r in rows)
        ),
    )
    answers = [r for r in rows if r["pid"] == server]
    assert answers, "dnsmasq's answers were not seen: " + described(rows)
    for row in answers:
        assert (row["protocol"], row["remote_address"]) == (17, CLIENT)
        assert row["direction"] == "inbound", described(answers)
    queries = [r for r in rows if r["pid"] in asked]
    assert {(r["remote_address"], r["remote_port"], r["direction"]) for r in queries} == {
        (DNS, 53, "outbound")
    }
    checked = egress_agent("history", "--format", "json", "--pid", str(server), config=watch.config)
    assert all(r["direction"] != "outbound" for r in json.loads(checked.stdout))


def first(rows: List[Dict[str, Any]], **match: Any) -> Optional[Dict[str, Any]]:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None
