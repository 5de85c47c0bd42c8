"""Floods a local user can cause, against the agent's bounds (issue 23).

- ``nobody`` starts 1,100 ``unshare -rn sleep 300`` (a user namespace and a network namespace
  each, Debian 12 allows it by default).  ``egress-agent watch`` under a limit of 1,024 open
  files (soft and hard, so raising the soft limit cannot save it) must keep sampling and exit
  normally after its samples, its descriptors under the DNS watch's bound plus a few, its
  memory under the stated bound, and say that namespaces were left out.  Before the bound,
  one packet socket per namespace ran it out of descriptors: "cannot list the processes in
  /proc: Too many open files", and exit.
- The DNS watch's choice under its bound, on real namespaces: the test host's (a root process
  in each) are watched before nobody's, and what was left out is counted.
- ``watch`` and the extension raise their soft limit on open files to the hard limit at start.

Every process is started here and killed by its pid; the namespaces go with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from dnshost import DnsHost, wait_for
from floods import Flood, net_inode

from agent.collect.dns.cache import NameCache
from agent.collect.dns.watch import MAX_WATCHED, DnsWatch
from agent.collect.netns import NetNamespace, discover_namespaces

FLOOD = 1100
FD_LIMIT = 1024
FD_ROOM = 64
"""Descriptors ``watch`` may hold besides the DNS watch's packet sockets (the interpreter, the
store, sock_diag and /proc reads, pipes)."""
RSS_BOUND_MB = 200
"""The memory ``watch`` may use under the flood (about 40 MB without it)."""
STORE_BOUND_MB = 16


def _needs() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: to become nobody and to run the watch as root")
    for tool in ("setpriv", "unshare", "prlimit"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux)")


@pytest.fixture(scope="module")
def flood() -> Iterator[Flood]:
    _needs()
    made = Flood(FLOOD)
    try:
        yield made
    finally:
        made.close()


def _status(pid: int) -> Tuple[int, int]:
    """(open descriptors, resident kB) of a running process; (0, 0) once it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return fds, int(fields["VmRSS"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def test_watch_keeps_going_under_a_flood_of_namespaces(flood: Flood, tmp_path: Path) -> None:
    history = tmp_path / "history.db"
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {history}\n")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    argv = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", sys.executable, "-m"]
    argv += ["agent.cli", "watch", "--format", "jsonl", "--interval", "1", "--count", "6"]
    with out.open("w") as stdout, err.open("w") as stderr:
        watch = subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config)),
        )
    most_fds = most_rss = 0
    try:
        while watch.poll() is None:
            fds, rss = _status(watch.pid)
            most_fds, most_rss = max(most_fds, fds), max(most_rss, rss)
            time.sleep(0.1)
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.wait()
    errors = err.read_text()
    assert watch.returncode == 0, errors
    assert "Too many open files" not in errors and "Traceback" not in errors, errors
    assert "network namespace(s) not watched, over the bound of the DNS watch" in errors, errors
    assert 0 < most_fds <= MAX_WATCHED + FD_ROOM, most_fds
    assert most_rss <= RSS_BOUND_MB * 1024, most_rss
    assert history.stat().st_size <= STORE_BOUND_MB << 20


def test_the_dns_watch_takes_roots_namespaces_before_nobodys(
    flood: Flood, dns_host: DnsHost
) -> None:
    """An explicit discovery (ours only, so other tests' namespaces cannot change the count):
    the agent's own, the test host's three, then 20 of nobody's; room for 9."""
    host = net_inode(os.getpid())
    found = {n.inode: n for n in discover_namespaces().namespaces}
    ours = [dns_host.srv.inode, *(client.inode for client in dns_host.clients)]
    nobodys = sorted(flood.inodes)[:20]
    chosen: List[NetNamespace] = [found[host]]
    chosen += [found[inode] for inode in nobodys]  # nobody's first in the order found ...
    chosen += [found[inode] for inode in ours]  # ... and still root's are taken before
    watch = DnsWatch(NameCache(), rescan_interval=0, max_watched=9)
    dns_host.watches.append(watch)
    assert watch.start(), watch.unavailable
    watch.rescan(chosen, {})
    wait_for(lambda: len(watch.watched()) == 9, "nine namespaces watched")
    watched = watch.watched()
    assert {host, *ours} <= watched
    assert len(watched & set(nobodys)) == 5
    assert watch.left_out == 15


def test_watch_raises_its_soft_limit_on_open_files(tmp_path: Path) -> None:
    _needs()
    config = tmp_path / "config.yaml"
    config.write_text("history:\n  enabled: false\n")
    argv = ["prlimit", "--nofile=1024:4096", "--", sys.executable, "-m", "agent.cli"]
    argv += ["watch", "--format", "jsonl", "--interval", "1", "--count", "2"]
    watch = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config)),
    )
    limits: Dict[str, str] = {}
    try:
        while watch.poll() is None and not limits.get("soft", "").startswith("4096"):
            try:
                with open(f"/proc/{watch.pid}/limits") as table:
                    for line in table:
                        if line.startswith("Max open files"):
                            limits["soft"] = line.split()[3]
            except OSError:
                break
            time.sleep(0.05)
    finally:
        _, stderr = watch.communicate(timeout=120)
    assert watch.returncode == 0, stderr
    assert limits.get("soft") == "4096"


def _soft_open_files(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as table:
        for line in table:
            if line.startswith("Max open files"):
                return line.split()[3]
    return ""


def test_the_extension_raises_its_soft_limit_on_open_files(tmp_path: Path) -> None:
    """As osqueryd starts it (the core stand-in), under a soft limit of 1,024."""
    from osquery_core import CoreStandIn, default_extension_command

    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    config = tmp_path / "config.yaml"
    config.write_text("history:\n  enabled: false\n")
    with CoreStandIn() as core:
        command = ["prlimit", "--nofile=1024:4096", "--", *default_extension_command()]
        process = core.launch(command, env={"EGRESS_AGENT_CONFIG": str(config)})
        core.wait_for_registration(process=process)
        soft = _soft_open_files(process.pid)  # prlimit execs the extension: the same pid
        process.terminate()
        assert process.wait(10) == 0, core.output(process)
    assert soft == "4096"
