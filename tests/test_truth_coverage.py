"""Coverage counts every namespace (issue 24): the kernel events count the connects of each
namespace they saw, one kept alive only by ``ip netns add`` (no process in it) and one that
came and went between two samples, each beside the kernel's own ``Tcp: ActiveOpens`` of that
namespace; and the background loop's coverage figure counts the ActiveOpens of a namespace no
process lets the sampler read.

Real curl under ``ip netns exec`` in the test host of tests/truthhost.py, a tracing instance of
the test's own (``egress-agent-$NETHOST_PREFIX-cov``), removed at the end.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
import time
from typing import Dict, List

from fakes import FunctionSampler, monitor_of
from truthhost import (
    WEB,
    TruthHost,
    program,
)

from agent import coverage
from agent.collect.kernel.source import open_event_source
from agent.collect.kernel.tracker import SocketEvent

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
GONE = "198.18.224.7"
"""An address on the loopback of the namespace that comes and goes (so that its connects can
be placed: loopback's own 127.0.0.1 is in every namespace)."""


def active_opens(path: str) -> int:
    inode = os.stat(path).st_ino
    return coverage.active_opens_of_files({inode: path})[inode]


def test_the_connects_of_every_namespace_are_counted(truth: TruthHost) -> None:
    curl = program("curl")
    kept = f"/run/netns/{truth.cli.name}"
    before = active_opens(kept)
    source = open_event_source(prefix=f"egress-agent-{PREFIX}-cov")
    records: List[SocketEvent] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            records.extend(source.poll(0.2))

    reader = threading.Thread(target=read)
    reader.start()
    gone = truth.net.name("gone")
    try:
        for _ in range(6):
            done = truth.run([curl, "-s", "-o", "/dev/null", "-m", "10", f"http://{WEB}/"])
            assert done.returncode == 0, done.stderr
        subprocess.run(["ip", "netns", "add", gone], check=True)
        gone_inode = os.stat(f"/run/netns/{gone}").st_ino
        for argv in (["link", "set", "lo", "up"], ["address", "add", GONE, "dev", "lo"]):
            subprocess.run(["ip", "-n", gone, *argv], check=True)
        gone_opens = active_opens(f"/run/netns/{gone}")
        for _ in range(3):  # nobody listens: refused, counted all the same
            subprocess.run(
                ["ip", "netns", "exec", gone, curl, "-s", "-m", "5", f"http://{GONE}:9/"],
                check=False,
            )
        gone_opens = active_opens(f"/run/netns/{gone}") - gone_opens
        target = int(ipaddress.ip_address(GONE))
        deadline = time.monotonic() + 20  # the events have read them: now it may go
        while sum(r.remote_address == target and r.kind == "connect" for r in records) < 3:
            assert time.monotonic() < deadline, "the events did not see the connects"
            time.sleep(0.1)
    finally:
        subprocess.run(["ip", "netns", "del", gone], check=False)
        stop.set()
        reader.join()
        source.close()
    counted: Dict[object, int] = source.connects_by_namespace()
    assert active_opens(kept) - before == 6
    assert counted.get(truth.cli.inode) == 6, counted
    assert gone_opens == 3
    assert counted.get(gone_inode) == 3, counted


def test_the_coverage_figure_counts_a_namespace_without_a_process(truth: TruthHost) -> None:
    kept = f"/run/netns/{truth.cli.name}"
    inode = os.stat(kept).st_ino
    monitor = monitor_of(FunctionSampler(lambda pids: []), named=lambda: {inode: kept})
    assert monitor.sample_once()
    for _ in range(6):
        done = truth.run([program("curl"), "-s", "-o", "/dev/null", "-m", "10", f"http://{WEB}/"])
        assert done.returncode == 0, done.stderr
    assert monitor.sample_once()
    assert monitor.stats().tcp_active_opens == 6
