"""Closed connections told apart, limits by namespace, container, unit and pid, and the table an
SRE reads: ``egress-agent check`` and ``history`` on real sockets in test hosts.

Each test builds its own hosts and looks only at them through the limits it tests, so it holds
beside the foreign connections of tests/foreign.py (and of any real machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from commands import egress_agent
from nethost import Namespace, NetHost, Proc

from agent.cgroups import placement

SERVER, CLIENT = "2001:4860:4863::1", "2001:4860:4863::2"

SERVER_CLOSES_FIRST = """
import socket, sys
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], 0))
listener.listen(1)
print("READY", listener.getsockname()[1], flush=True)
peer, _ = listener.accept()
peer.close()       # first: this side goes FIN_WAIT2, then TIME_WAIT once the client closes
listener.close()   # and no listener is left on the port
sys.stdin.read()
"""

CLIENT_CLOSES_AFTER = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
while sock.recv(4096):
    pass
sock.close()
print("READY", flush=True)
sys.stdin.read()
"""


def two_hosts(net: NetHost) -> Tuple[Namespace, Namespace]:
    srv, cli = net.namespace("srv"), net.namespace("cli")
    net.veth(srv, "s0", cli, "c0")
    srv.add_address(net.name("s0"), SERVER + "/64")
    cli.add_address(net.name("c0"), CLIENT + "/64")
    return srv, cli


def python(net: NetHost, namespace: Namespace, code: str, *args: str) -> Proc:
    return net.spawn(namespace, [sys.executable, "-c", code, *args], ready=True)


def check_json(*args: str, config: Optional[Path] = None) -> Tuple[int, List[Dict[str, Any]], str]:
    result = egress_agent("check", "--format", "json", "--summary", *args, config=config)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout or "[]"), result.stderr


@pytest.fixture
def closed(nethost: NetHost) -> Tuple[Namespace, Namespace, int]:
    """A connection accepted, then closed by the server first, whose listener has gone: the
    server's side is left in TIME_WAIT on the port it had listened on (the case of issue 15)."""
    srv, cli = two_hosts(nethost)
    server = python(nethost, srv, SERVER_CLOSES_FIRST, SERVER)
    port = int(server.ready[0])
    python(nethost, cli, CLIENT_CLOSES_AFTER, SERVER, str(port))
    deadline = time.monotonic() + 10
    while not srv.run(["ss", "-tanH", "state", "time-wait"]).strip():
        assert time.monotonic() < deadline, "no TIME_WAIT in the server's namespace"
        time.sleep(0.05)
    return srv, cli, port


def test_a_closed_inbound_connection_is_not_called_outbound(
    closed: Tuple[Namespace, Namespace, int],
) -> None:
    srv, _, port = closed
    status, rows, stderr = check_json("--netns", srv.name)
    (row,) = rows
    assert (row["state"], row["pid"], row["local_port"]) == ("TIME_WAIT", -1, port)
    assert row["direction"] == "unknown" and row["remote_address"] == CLIENT
    assert row["net_namespace"] == srv.inode
    assert status == 1
    assert "1 unexpected external connection(s) (1 recently closed, owner gone)" in stderr
    # the inbound view leaves out what is not known to be inbound; "any" shows it too
    assert check_json("--netns", srv.name, "--direction", "inbound")[1] == []
    assert len(check_json("--netns", srv.name, "--direction", "any")[1]) == 1


def test_closed_connections_count_unless_ignored(closed: Tuple[Namespace, Namespace, int]) -> None:
    srv = closed[0]
    assert check_json("--netns", srv.name)[0] == 1
    status, rows, stderr = check_json("--netns", srv.name, "--ignore-closed")
    assert status == 0 and len(rows) == 1
    assert "(1 recently closed, owner gone, not counted)" in stderr


def test_the_table_shows_state_protocol_and_namespace(
    closed: Tuple[Namespace, Namespace, int],
) -> None:
    srv = closed[0]
    result = egress_agent("check", "--format", "table", "--netns", str(srv.inode))
    header, line = result.stdout.splitlines()
    columns = header.split()
    who = ["pid", "name", "username", "login_user"]
    assert columns[:7] == [*who, "direction", "protocol", "state"]
    assert "namespace" in columns
    cells = line.split()
    assert cells[0] == "-1" and "unknown" in cells and "tcp" in cells and "TIME_WAIT" in cells
    assert srv.name in cells  # the namespace by its ip netns name
    assert "6" not in cells[:7]


def test_limits_by_namespace_name_inode_and_pid(nethost: NetHost) -> None:
    srv, cli = two_hosts(nethost)
    server = nethost.listen(srv, SERVER)
    first = nethost.connect(cli, SERVER, server.port)
    second = nethost.connect(cli, SERVER, server.port)
    by_name = check_json("--netns", cli.name)[1]
    assert sorted(r["pid"] for r in by_name) == sorted([first.pid, second.pid])
    by_inode = check_json("--netns", str(cli.inode), "--netns", srv.name, "--direction", "any")
    assert sorted(r["pid"] for r in by_inode[1]) == sorted(
        [first.pid, second.pid, *[server.pid] * 2]
    )
    assert [r["pid"] for r in check_json("--pid", str(first.pid))[1]] == [first.pid]
    both = check_json("--pid", str(first.pid), "--netns", srv.name)[1]
    assert both == []  # every kind of limit must match
    missing = egress_agent("check", "--netns", "no-such-namespace-here")
    assert missing.returncode == 2
    assert "no network namespace named 'no-such-namespace-here'" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = egress_agent("check", "--container", "not-hex!")
    assert bad.returncode == 2 and "'not-hex!' is not a container id" in bad.stderr
    assert egress_agent("check", "--pid", "0").returncode == 2


class Cgroup:
    """A cgroup of this test's own in the hierarchy that names systemd units (cgroup v1's
    ``name=systemd``, or the unified one), to put a test process "in" a unit or a container
    the way systemd and docker do; only the directories it made are removed, by name."""

    def __init__(self, relative: str) -> None:
        root = "/sys/fs/cgroup/systemd"
        if not os.path.isdir(root):
            root = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else ""
        if not root:
            root = "/sys/fs/cgroup"
        self.root = root
        self.path = os.path.join(root, relative)
        self.made: List[str] = []
        path = root
        for component in relative.split("/"):
            path = os.path.join(path, component)
            if not os.path.isdir(path):
                os.mkdir(path)
                self.made.append(path)

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as handle:
            handle.write(str(pid))

    def remove(self) -> None:
        for directory in reversed(self.made):
            try:
                with open(os.path.join(directory, "cgroup.procs")) as handle:
                    pids = handle.read().split()
                for pid in pids:
                    with open(os.path.join(self.root, "cgroup.procs"), "w") as handle:
                        handle.write(pid)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.rmdir(directory)


@pytest.fixture
def cgroups() -> Iterator[List[Cgroup]]:
    made: List[Cgroup] = []
    yield made
    for group in reversed(made):
        group.remove()


def test_limits_by_container_and_unit(nethost: NetHost, cgroups: List[Cgroup]) -> None:
    srv, cli = two_hosts(nethost)
    server = nethost.listen(srv, SERVER)
    boxed = nethost.connect(cli, SERVER, server.port)
    unit_bound = nethost.connect(cli, SERVER, server.port)
    loose = nethost.connect(cli, SERVER, server.port)
    container = uuid.uuid4().hex + uuid.uuid4().hex
    unit = f"eat-{os.getpid()}-test.service"
    box = Cgroup(f"docker/{container}")  # where docker's cgroupfs driver puts a container
    cgroups.append(box)
    box.add(boxed.pid)
    service = Cgroup(unit)
    cgroups.append(service)
    service.add(unit_bound.pid)
    with open(f"/proc/{boxed.pid}/cgroup") as handle:
        assert placement(handle.read()).container_id == container
    with open(f"/proc/{unit_bound.pid}/cgroup") as handle:
        assert placement(handle.read()).systemd_unit == unit

    in_box = check_json("--container", container[:12])[1]
    assert [(r["pid"], r["container_id"]) for r in in_box] == [(boxed.pid, container)]
    by_unit = check_json("--unit", unit.rsplit(".", 1)[0])[1]  # a plain name means NAME.service
    assert [r["pid"] for r in by_unit] == [unit_bound.pid]
    by_glob = check_json("--unit", f"eat-{os.getpid()}-*", "--netns", cli.name)[1]
    assert [r["pid"] for r in by_glob] == [unit_bound.pid]
    everything = check_json("--netns", cli.name)[1]
    assert sorted(r["pid"] for r in everything) == sorted([boxed.pid, unit_bound.pid, loose.pid])

    table = egress_agent("check", "--format", "table", "--netns", cli.name).stdout
    (boxed_line,) = [line for line in table.splitlines() if line.split()[0] == str(boxed.pid)]
    assert f"container {container[:12]}" in boxed_line
    (loose_line,) = [line for line in table.splitlines() if line.split()[0] == str(loose.pid)]
    assert cli.name in loose_line


def test_history_takes_the_same_limits(nethost: NetHost, tmp_path: Path) -> None:
    srv, cli = two_hosts(nethost)
    server = nethost.listen(srv, SERVER)
    client = nethost.connect(cli, SERVER, server.port)
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {tmp_path}/history.db\n")
    assert egress_agent("watch", "--count", "1", config=config).returncode == 0
    recorded = egress_agent("history", "--format", "json", "--netns", cli.name, config=config)
    assert [r["pid"] for r in json.loads(recorded.stdout)] == [client.pid]
    by_pid = egress_agent("history", "--format", "json", "--pid", str(server.pid), config=config)
    rows = json.loads(by_pid.stdout)
    assert {r["pid"] for r in rows} == {server.pid} and rows[0]["direction"] == "inbound"
    table = egress_agent("history", "--format", "table", "--netns", cli.name, config=config)
    assert "tcp" in table.stdout.split() and cli.name in table.stdout
