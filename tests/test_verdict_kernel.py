"""Issue 25, the kernel event source's losses: sockets the tracker drops at its bound and a
reset of our tracing instance by another tool are losses with their span, which the history
keeps and the audit names (``incomplete``), never a silent gap.

A real instance of our own (``egress-agent-$NETHOST_PREFIX-*``, removed after) and real
connections between two test hosts (network namespaces of our own).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import needs_root
from history_fixture import egress_agent
from nethost import NetHost

from agent.collect.kernel.source import KernelEventSource, KernelLoss, open_event_source
from agent.history import HistoryStore, RunFigures, RunStart

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
INSTANCE_PREFIX = f"egress-agent-{PREFIX}"
SERVER, CLIENT = "9.9.7.9", "9.9.7.2"

HOLDER = """
import socket, sys
held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
print("READY", len(held), flush=True)
sys.stdin.read()
"""

pytestmark = needs_root


@pytest.fixture
def source() -> Iterator[KernelEventSource]:
    opened = open_event_source(prefix=INSTANCE_PREFIX)
    try:
        yield opened
    finally:
        opened.close()
        assert not os.path.exists(opened.instance.path)


def poll_losses(source: KernelEventSource, kind: str, seconds: float = 20) -> List[KernelLoss]:
    found: List[KernelLoss] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not [loss for loss in found if loss.kind == kind]:
        source.poll(0.2)
        found += source.take_losses()
    return [loss for loss in found if loss.kind == kind]


def into_history(tmp_path: Path, losses: List[KernelLoss]) -> Path:
    """The losses as the event feed records them, in a history with a whole run around them."""
    path = tmp_path / "history.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0)
    start = min(loss.start for loss in losses) - 60
    run_id = store.start_run(RunStart("watch", 1, "h", "m", "0.test", 1.0, "tracefs"), at=start)
    assert run_id is not None
    for loss in losses:
        assert store.record_loss(loss.kind, loss.start, loss.end, loss.count, loss.detail)
    figures = RunFigures("tracefs", tcp_active_opens=1, outbound_tcp_seen=1)
    assert store.heartbeat(run_id, figures, at=time.time() + 60, stopped=True)
    store.close()
    return path


def test_sockets_the_tracker_drops_are_a_loss(
    source: KernelEventSource, nethost: NetHost, tmp_path: Path
) -> None:
    srv, cli = nethost.namespace("ksrv"), nethost.namespace("kcli")
    nethost.veth(srv, "ks0", cli, "kc0")
    srv.add_address(f"{PREFIX}-ks0", f"{SERVER}/24")
    cli.add_address(f"{PREFIX}-kc0", f"{CLIENT}/24")
    server = nethost.listen(srv, SERVER)
    source.tracker.max_sockets = 8  # the bound (262,144 in the agent), small enough to reach
    source.poll(0.1)
    nethost.spawn(cli, [sys.executable, "-c", HOLDER, SERVER, str(server.port), "40"], ready=True)
    (loss,) = poll_losses(source, "tracker_overflow")
    assert loss.count >= 1 and loss.start <= loss.end <= time.time()
    assert "at the tracker's bound of 8" in loss.detail
    path = into_history(tmp_path, [loss])
    result = egress_agent(
        "audit",
        "--since",
        str(loss.start - 1),
        "--until",
        str(loss.end + 1),
        "--history",
        str(path),
    )
    assert result.returncode == 3, result.stdout
    assert (
        "incomplete (tracker_overflow): the kernel event tracker dropped sockets" in result.stdout
    )


def test_a_reset_of_our_instance_by_another_tool_is_a_loss(
    source: KernelEventSource, tmp_path: Path
) -> None:
    source.verify_every_s = 0.0  # check the instance at every poll
    source.poll(0.1)
    before = time.time()
    source.instance.write("tracing_on", "0")  # what `trace-cmd reset -a` does, to ours only
    (loss,) = poll_losses(source, "instance_reset")
    assert loss.count == 1 and loss.start <= before <= loss.end
    assert "tracing_on" in loss.detail
    assert source.instance.read("tracing_on").strip() == "1"  # and undone
    path = into_history(tmp_path, [loss])
    result = egress_agent(
        "audit",
        "--since",
        str(loss.start - 1),
        "--until",
        str(loss.end + 1),
        "--history",
        str(path),
    )
    assert result.returncode == 3, result.stdout
    assert "incomplete (instance_reset): the tracing instance was reset" in result.stdout
