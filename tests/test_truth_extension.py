"""What is reported is what happened (issue 24), through the osquery tables: the extension,
started by the osquery stand-in core, sampling once a minute beside its kernel events, while
real programs run under ``ip netns exec`` in a test host built after it started
(tests/truthhost.py): curl's glibc probes are no UDP rows, its query and connection are, in
their namespace and named; ping's echo is an ICMP row; ``external_connections`` shows a
connected ping socket as ``icmp``.  Assertions look only at this test's processes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest
from event_extension import Extension, running_extension, wait_until
from nethost import NetHost
from truthhost import (
    DNS,
    NAME,
    WEB,
    WEB6,
    WEB_ADDRESSES,
    TruthHost,
    build,
    program,
    watched_by,
)

HOLDER = """
import socket, sys
ping = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
ping.connect((sys.argv[1], 0))
print("READY", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def extension(tmp_path: Path) -> Iterator[Extension]:
    with running_extension(tmp_path) as running:
        yield running


@pytest.fixture
def truth(extension: Extension, nethost: NetHost) -> Iterator[TruthHost]:
    host = build(nethost)
    try:
        yield host
    finally:
        host.close()


def test_the_events_table_shows_what_left(truth: TruthHost, extension: Extension) -> None:
    # attached on the events' word (a sample is a minute away): the next query is seen
    assert wait_until(lambda: watched_by(truth, extension.process.pid), 20)
    curl = truth.start([program("curl"), "-s", "-m", "10", f"http://{NAME}/"])
    ping = truth.start([program("ping"), "-c", "1", "-W", "5", WEB])
    for proc in (curl, ping):
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    pids: Set[int] = {curl.pid, ping.pid}

    def rows() -> List[Dict[str, str]]:
        return extension.events(pids)

    def complete() -> bool:
        found = rows()
        return any(r["pid"] == str(curl.pid) and r["protocol"] == "6" for r in found) and any(
            r["pid"] == str(ping.pid) and r["protocol"] == "1" for r in found
        )

    assert wait_until(complete, 30), rows()
    found = rows()
    probes = [
        r
        for r in found
        if r["protocol"] == "17"
        and (r["remote_address"] in WEB_ADDRESSES or r["remote_port"] == "1025")
    ]
    assert not probes, probes
    for row in found:
        assert row["net_namespace"] == str(truth.cli.inode), row
        assert row["direction"] == "outbound"
    (connection,) = [r for r in found if r["pid"] == str(curl.pid) and r["protocol"] == "6"]
    assert connection["remote_address"] in (WEB, WEB6)
    assert connection["remote_domain"] == NAME
    queries = {
        (r["remote_address"], r["remote_port"])
        for r in found
        if r["pid"] == str(curl.pid) and r["protocol"] == "17"
    }
    assert queries == {(DNS, "53")}
    (echo,) = [r for r in found if r["pid"] == str(ping.pid)]
    assert (echo["protocol"], echo["remote_address"]) == ("1", WEB)


def test_the_live_table_shows_a_ping_socket(truth: TruthHost, extension: Extension) -> None:
    truth.cli.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
    holder = truth.net.spawn(truth.cli, [sys.executable, "-c", HOLDER, WEB], ready=True)
    with extension.connection() as connection:
        live = connection.generate("external_connections", {"pid": [(2, str(holder.pid))]})
    assert [(r["protocol"], r["remote_address"]) for r in live] == [("1", WEB)]
