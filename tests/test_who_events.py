"""Who, from kernel events (issue 22): ancestors kept in the event source's process table after
the parents exited, and identity read again at exec.

Real processes in test hosts, the real event source (instance
``egress-agent-$NETHOST_PREFIX-<pid>``); each test asserts only about its own pids.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator, List, Set

import pytest
from nethost import NetHost
from test_events import SERVER, Collector, Host, address

from agent.collect.kernel.source import KernelEventSource, open_event_source
from agent.records import SocketColumns, connection_of

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
BASH = "/usr/bin/bash"


@pytest.fixture
def source() -> Iterator[KernelEventSource]:
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs and network namespaces")
    opened = open_event_source(prefix=f"egress-agent-{PREFIX}")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def collector(source: KernelEventSource) -> Iterator[Collector]:
    running = Collector(source)
    yield running
    running.stop()


@pytest.fixture
def host(nethost: NetHost) -> Host:
    return Host(nethost)


def test_ancestors_outlive_the_parents(host: Host, collector: Collector) -> None:
    server = host.net.listen(host.srv, SERVER)
    # the outer bash forks a subshell and exits; the subshell waits, then execs the
    # bash that connects: by then its parent is gone and /proc shows it adopted
    inner = f"exec 3<>/dev/tcp/{SERVER}/{server.port}; sleep 0.2"
    # (the outer one lives half a second: long enough for the source to read the namespace
    # that `ip netns exec` entered, which a process gone at once would leave unknown)
    script = f'( sleep 1.5; exec {BASH} -c "{inner}" ) & sleep 0.5; exit 0'
    outer = host.net.spawn(host.cli, [BASH, "-c", script], ready=False)
    outer.popen.wait(10)

    def mine() -> list:
        return [
            e
            for e in collector.events
            if e.kind == "connect"
            and e.net_namespace == host.cli.inode
            and (e.remote_address, e.remote_port) == (address(SERVER), server.port)
        ]

    found = collector.wait_for(lambda _: bool(mine()))
    assert found
    (event,) = mine()
    row = connection_of(
        event.identity, None, SocketColumns(None, None, None, 2, 6, "", "", 0, 0, "outbound")
    )
    chain = json.loads(row.ancestors)
    assert chain[0] == {"pid": outer.pid, "name": "bash"}
    assert chain[1]["pid"] == os.getpid()
    assert event.identity.parent == outer.pid
    assert not os.path.exists(f"/proc/{outer.pid}")


STORM = r"""
import subprocess, sys, time
address, port, count, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tag, prefix = sys.argv[5], sys.argv[6:]
script = f"exec 3<>/dev/tcp/{address}/{port}"
running = []
def reap(proc):
    proc.wait()
    print("PID", proc.pid, flush=True)
for index in range(count):
    argv = [*prefix, "/usr/bin/bash", "-c", script, f"{tag}-{index}", f"arg-{index}"]
    running.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
    if len(running) >= parallel:
        reap(running.pop(0))
for proc in running:
    reap(proc)
print("DONE", flush=True)
"""


def test_short_lived_processes_carry_their_command_lines(
    host: Host, source: KernelEventSource, collector: Collector
) -> None:
    """Issue 22's target: of 500 processes that connect and exit at once (bash's /dev/tcp:
    the process ends right after its connect()), each with its own arguments, at least 99%
    carry their whole command line, which only the exec probe can give them."""
    if source.exec_probe is None:
        pytest.skip(f"no exec probe here: {source.unavailable.get('uprobe:exec_argv')}")
    server = host.net.listen(host.srv, SERVER)
    tag = f"{PREFIX}{os.getpid()}"
    count = 500
    argv = [sys.executable, "-c", STORM, SERVER, str(server.port), str(count), "8", tag]
    launcher = host.net.spawn(host.cli, argv, ready=False)
    pids: Set[int] = set()
    while True:
        line = launcher.line(60)
        assert line is not None, "the launcher stopped answering"
        if line.startswith("DONE"):
            break
        if line.startswith("PID"):
            pids.add(int(line.split()[1]))
    assert len(pids) == count
    complete = collector.wait_for(
        lambda events: pids <= {e.identity.pid for e in events if e.kind == "connect"}
    )
    assert complete or source.lost > 0
    connects = {e.identity.pid: e for e in collector.of(pids, "connect")}
    script = f"exec 3<>/dev/tcp/{SERVER}/{server.port}"
    whole: Set[str] = set()  # each process's own arguments: an index seen twice is wrong
    for event in connects.values():
        cmdline = event.identity.cmdline
        index = cmdline.rsplit("arg-", 1)[-1]
        if cmdline == f"/usr/bin/bash -c {script} {tag}-{index} arg-{index}":
            assert index not in whole, f"two processes with the arguments of {index}"
            whole.add(index)
    seen = len(connects)
    assert seen >= 0.99 * count or source.lost > 0, f"{seen} of {count} connects seen"
    assert len(whole) >= 0.99 * count, f"{len(whole)} of {count} with their whole command line"


def test_a_container_process_from_events_is_named_like_a_sampled_one(
    host: Host, collector: Collector, tmp_path: Any
) -> None:
    """runc moves the container's first process into the container's cgroup and then execs
    it: the identity read at that exec names the container, and the row from events carries
    the columns a sampled row does, with the same values."""
    from test_who_containers import _podman, make_rootfs, podman_container

    podman = _podman()
    root = make_rootfs(tmp_path)
    server = host.net.listen(host.srv, SERVER)
    name = f"{PREFIX}-evbox-{os.getpid()}"
    url = f"http://{SERVER}:{server.port}/"
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", "60", url]
    with podman_container(podman, root, host.cli, name, argv) as container_id:

        def mine() -> list:
            return [
                e
                for e in collector.events
                if e.kind == "connect"
                and e.remote_port == server.port
                and e.identity.container_id == container_id
            ]

        assert collector.wait_for(lambda _: bool(mine()), timeout=60)
        event = mine()[0]
        row = connection_of(
            event.identity, None, SocketColumns(None, None, None, 2, 6, "", "", 0, 0, "outbound")
        )
        assert (row.container_name, row.container_runtime) == (name, "podman")
        assert row.cmdline == " ".join(argv)
        assert event.net_namespace == host.cli.inode
        sampled = [
            r for r in _check_rows("--netns", host.cli.name) if r["pid"] == event.identity.pid
        ]
        assert sampled, "the sampler did not see the container's curl"
        for column in (
            "name",
            "cmdline",
            "username",
            "login_user",
            "container_id",
            "container_name",
            "container_image",
            "container_runtime",
        ):
            assert getattr(row, column) == sampled[0][column], column


def _check_rows(*args: str) -> list:
    from commands import egress_agent

    result = egress_agent("check", "--format", "json", "--allowlisted", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return list(json.loads(result.stdout or "[]"))


def _storm(host: Host, port: int, count: int, tag: str, prefix: List[str]) -> Set[int]:
    argv = [sys.executable, "-c", STORM, SERVER, str(port), str(count), "8", tag, *prefix]
    launcher = host.net.spawn(host.cli, argv, ready=False)
    pids: Set[int] = set()
    while True:
        line = launcher.line(60)
        assert line is not None, "the launcher stopped answering"
        if line.startswith("DONE"):
            return pids
        if line.startswith("PID"):
            pids.add(int(line.split()[1]))


def test_short_lived_processes_that_changed_user_carry_the_new_user(
    host: Host, source: KernelEventSource, collector: Collector
) -> None:
    """``setpriv`` (as ``su``, ``sudo -u``, a daemon dropping privileges) changes the real uid
    and execs the program, which connects and exits at once: the row names the user it ran
    as, not its parent's."""
    server = host.net.listen(host.srv, SERVER)
    count = 200
    drop = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    pids = _storm(host, server.port, count, f"{PREFIX}u{os.getpid()}", drop)
    assert len(pids) == count
    complete = collector.wait_for(
        lambda events: pids <= {e.identity.pid for e in events if e.kind == "connect"}
    )
    assert complete or source.lost > 0
    connects = [e for e in collector.of(pids, "connect")]
    as_nobody = [e for e in connects if (e.identity.uid, e.identity.username) == (65534, "nobody")]
    assert len(connects) >= 0.99 * count or source.lost > 0
    assert len(as_nobody) >= 0.99 * count, f"{len(as_nobody)} of {count} as nobody"
