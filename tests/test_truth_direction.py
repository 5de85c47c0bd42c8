"""What the kernel events saw outranks what a sample suggests (issues 24 and 23), through
``egress-agent watch`` sampling every second beside its events, and its history:

- a server that closes an accepted connection first and stops listening leaves a TIME_WAIT
  socket without an owner or a listener: the events saw the accept, so it is ``inbound``,
  not ``unknown``;
- a process listening on port P with ``SO_REUSEPORT`` that connects out from P: the events saw
  the ``connect()``, so it is ``outbound``, though its local port is a listener's;
- with no agent running, a one-shot ``check`` has only the socket tables and ``tcp_info``:
  the connect from P is ``outbound`` and a connection P accepted ``inbound`` because the
  kernel's counters say so (:mod:`agent.collect.sockets.opener`), and a TIME_WAIT on P, which
  has no counters left, ``unknown``.

Test hosts of tests/truthhost.py (global addresses on veths between test namespaces only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from commands import egress_agent
from truthhost import (
    CLIENT,
    DNS,
    TruthHost,
    Watch,
    described,
)

CLOSE_FIRST = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 0))
server.listen()
print("READY", server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.close()    # the server closes first: its side goes to TIME_WAIT
server.close()  # and listens no more
sys.stdin.read()
"""

FROM_LISTENING_PORT = """
import socket, sys
def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((sys.argv[1], 0 if len(sys.argv) < 5 else int(sys.argv[4])))
    return s
listener = bound()
listener.listen()
port = listener.getsockname()[1]
out = socket.socket()
out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
out.bind((sys.argv[1], port))
out.connect((sys.argv[2], int(sys.argv[3])))
print("READY", port, flush=True)
sys.stdin.read()
"""


def check_json(netns: str, config: Path) -> subprocess.CompletedProcess[str]:
    """A one-shot ``check`` of one namespace, both directions, as JSON."""
    return egress_agent(
        "check", "--format", "json", "--direction", "any", "--netns", netns, config=config
    )


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Watch]:
    running = Watch(tmp_path, interval=1)
    try:
        yield running
    finally:
        stderr = running.stop()
        assert "Traceback" not in stderr, stderr


def test_a_server_closed_inbound_connection_stays_inbound(truth: TruthHost, watch: Watch) -> None:
    server = truth.net.spawn(truth.srv, [sys.executable, "-c", CLOSE_FIRST, DNS], ready=True)
    client = truth.net.connect(truth.cli, DNS, server.port)
    netns = ("--netns", truth.srv.name)

    def mine(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        # an inbound row stands for its peer whatever the peer's port (the history keeps 0)
        return [r for r in rows if r["remote_address"] == CLIENT]

    def ownerless(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [r for r in mine(rows) if r["pid"] == -1]

    rows = watch.wait_rows(None, ownerless, *netns)  # a sample saw it after the server closed
    assert ownerless(rows), "no sample saw the closed socket: " + described(rows)
    assert client.local_port
    assert {r["direction"] for r in mine(rows)} == {"inbound"}, described(mine(rows))
    truth.net.kill(client)


def test_a_connect_from_a_listening_port_is_outbound(truth: TruthHost, watch: Watch) -> None:
    web = truth.net.listen(truth.srv, DNS)
    proc = truth.net.spawn(
        truth.cli,
        [sys.executable, "-c", FROM_LISTENING_PORT, CLIENT, DNS, str(web.port)],
        ready=True,
    )
    time.sleep(3)  # samples (one a second) see it, with its listener beside it
    rows = watch.wait_rows(
        {proc.pid}, lambda rows: {r.get("seen_by") for r in rows} >= {"sampling", "tracefs"}
    )
    mine = [r for r in rows if r["remote_address"] == DNS]
    assert mine, "watch did not record it: " + described(rows)
    assert {r["direction"] for r in mine} == {"outbound"}, described(mine)
    # a one-shot check samples the tables, which cannot tell; it takes what the events saw
    checked = check_json(truth.cli.name, watch.config)
    assert checked.stdout.strip(), checked.stderr
    sampled = [r for r in json.loads(checked.stdout) if r["pid"] == proc.pid]
    assert [r["direction"] for r in sampled] == ["outbound"], checked.stdout + checked.stderr


def test_with_no_agent_a_check_asks_the_kernel_which_end_opened(
    truth: TruthHost, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {tmp_path / 'none.db'}\n")  # no agent, no history
    web = truth.net.listen(truth.srv, DNS)
    proc = truth.net.spawn(
        truth.cli,
        [sys.executable, "-c", FROM_LISTENING_PORT, CLIENT, DNS, str(web.port)],
        ready=True,
    )
    port = int(proc.ready[0])
    client = truth.net.connect(truth.srv, CLIENT, port)  # in the listener's accept queue
    client_port = int(client.ready[1])

    def on_port(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [r for r in rows if r["local_port"] == port and r["remote_address"] == DNS]

    deadline = time.monotonic() + 10
    while True:
        checked = check_json(truth.cli.name, config)
        rows = on_port(json.loads(checked.stdout or "[]"))
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    directions = {r["remote_port"]: r["direction"] for r in rows}
    assert directions == {web.port: "outbound", client_port: "inbound"}, (
        described(rows) + checked.stderr
    )
