"""Who, from kernel events (issue 22): ancestors kept in the event source's process table after
the parents exited, and identity read again at exec.

Real processes in test hosts, the real event source (instance
``egress-agent-$NETHOST_PREFIX-<pid>``); each test asserts only about its own pids.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest
from nethost import NetHost
from test_events import SERVER, Collector, Host, address

from agent.collect.kernel.source import EventSource, open_event_source
from agent.records import SocketColumns, connection_of

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
BASH = "/usr/bin/bash"


@pytest.fixture
def source() -> Iterator[EventSource]:
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs and network namespaces")
    opened = open_event_source(prefix=f"egress-agent-{PREFIX}")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def collector(source: EventSource) -> Iterator[Collector]:
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
