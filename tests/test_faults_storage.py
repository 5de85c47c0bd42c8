"""Storage faults (issue 7): the history store breaks, sampling and the live table go on.

The history lives on a small tmpfs that each test mounts (and unmounts) itself, so it can be
filled to the last byte or mounted read-only.  A test host (network namespaces) holds a few
long-lived external connections, so every sample has rows to write.  The extension runs as
osqueryd would start it, against the core stand-in.  For each fault:

- sampling goes on (``samples_total`` grows) and the live table answers;
- the error is logged once for the condition, not once per sample, and recovery once;
- nothing already written is lost: the rows from before the fault are there afterwards (for
  a corrupt file: in the file moved aside, which is never deleted).

Two writers, the extension and ``egress-agent watch``, share one file: neither logs an error
and every row both wrote is there.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Set, Tuple

import pytest
from nethost import NetHost, Proc
from osquery_core import CoreStandIn, ExtensionConnection, default_extension_command
from tmpfs import Tmpfs

SERVER6, CLIENT6 = "2a0e:4a00:d::1", "2a0e:4a00:d::2"
INTERVAL = 0.5
TMPFS_SIZE = "32m"
"""Room for SQLite's write-ahead log, which grows to 4 MB between checkpoints."""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: tmpfs mounts and network namespaces"
)


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    mount = Tmpfs(TMPFS_SIZE, "eah-store")
    try:
        yield mount
    finally:
        mount.close()


@pytest.fixture
def clients(nethost: NetHost) -> List[Proc]:
    """Three long-lived external connections in a test host."""
    srv, cli = nethost.namespace("ssrv"), nethost.namespace("scli")
    nethost.veth(srv, "ss0", cli, "sc0")
    srv.add_address(nethost.name("ss0"), SERVER6 + "/64")
    cli.add_address(nethost.name("sc0"), CLIENT6 + "/64")
    server = nethost.listen(srv, SERVER6)
    return [nethost.connect(cli, SERVER6, server.port) for _ in range(3)]


class Running:
    """The extension, launched by the core stand-in, with its history at ``history``."""

    def __init__(self, core: CoreStandIn, workdir: Path, history: Path) -> None:
        config = workdir / "config.yaml"
        config.write_text(f"sampling:\n  interval: {INTERVAL}\nhistory:\n  path: {history}\n")
        self.core = core
        self.history = history
        self.env = {"EGRESS_AGENT_CONFIG": str(config)}
        self.process = core.launch(
            default_extension_command(), timeout=10, interval=1, env=self.env
        )
        registration = core.wait_for_registration(process=self.process)
        self.socket = core.extension_socket(registration)

    def info(self) -> Dict[str, str]:
        with ExtensionConnection(self.socket) as extension:
            (row,) = extension.generate("egress_agent_info")
            return row

    def wait(self, ready: Callable[[Dict[str, str]], bool], timeout: float = 60) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.info()
            if ready(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"egress_agent_info never got there: {row}")
            time.sleep(0.1)

    def samples_after(self, count: int) -> Dict[str, str]:
        """Wait for ``count`` more background samples than now."""
        target = int(self.info()["samples_total"]) + count
        return self.wait(lambda row: int(row["samples_total"]) >= target)

    def live_rows(self) -> List[Dict[str, str]]:
        with ExtensionConnection(self.socket) as extension:
            return extension.generate("external_connections")

    def output(self) -> str:
        return self.core.output(self.process)

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(10) == 0, self.output()


@pytest.fixture
def core(tmpfs: Tmpfs) -> Iterator[CoreStandIn]:
    with CoreStandIn() as stand_in:
        yield stand_in


Key = Tuple[str, str, str]


def keys_in(path: Path, ports: Set[int]) -> Dict[Key, int]:
    """(process_uuid, remote_address, remote_port) -> samples, for rows of our clients'
    server port, read straight from a history file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT process_uuid, remote_address, remote_port, samples FROM history"
        ).fetchall()
    finally:
        db.close()
    return {(u, a, str(p)): s for u, a, p, s in rows if p in ports}


def our_live_rows(running: Running, clients: List[Proc]) -> List[Dict[str, str]]:
    pids = {str(c.pid) for c in clients}
    return [row for row in running.live_rows() if row["pid"] in pids]


def assert_nothing_lost(before: Dict[Key, int], after: Dict[Key, int]) -> None:
    for key, samples in before.items():
        assert key in after, f"{key} was lost"
        assert after[key] >= samples, f"{key}: {samples} samples before, {after[key]} after"


# ---------------------------------------------------------------------------------------------


def test_a_full_disk(tmpfs: Tmpfs, core: CoreStandIn, clients: List[Proc]) -> None:
    history = tmpfs.path / "state" / "history.db"
    running = Running(core, tmpfs.base, history)
    port = {int(row["remote_port"]) for row in our_live_rows(running, clients)}
    running.wait(lambda row: row["history_rows"] not in ("", "0"))
    running.samples_after(2)
    before = keys_in(history, port)
    assert len(before) == len(clients)

    filler = tmpfs.fill()
    failing = running.samples_after(6)
    assert failing["history_error"], failing
    assert len(our_live_rows(running, clients)) == len(clients)  # the live table goes on
    errors = [line for line in running.output().splitlines() if "history store" in line]
    assert len(errors) == 1, errors
    assert "full" in errors[0] or "space" in errors[0]

    filler.unlink()
    recovered = running.samples_after(3)
    assert recovered["history_error"] == ""
    assert sum("works again" in line for line in running.output().splitlines()) == 1
    after = keys_in(history, port)
    assert_nothing_lost(before, after)
    assert all(after[key] > before[key] for key in before)  # samples recorded again
    running.stop()
    assert "Traceback" not in running.output()


def test_a_read_only_store_then_writable(
    tmpfs: Tmpfs, core: CoreStandIn, clients: List[Proc]
) -> None:
    """The filesystem of the history is read-only when the extension starts (a read-only
    /var), with an earlier history in it; later it becomes writable."""
    history = tmpfs.path / "state" / "history.db"
    first = Running(core, tmpfs.base, history)
    ports = {int(row["remote_port"]) for row in our_live_rows(first, clients)}
    first.wait(lambda row: row["history_rows"] not in ("", "0"))
    first.stop()
    before = keys_in(history, ports)
    assert len(before) == len(clients)

    tmpfs.remount("ro")
    running = Running(core, tmpfs.base, history)
    failing = running.samples_after(6)
    assert failing["history_error"], failing
    assert len(our_live_rows(running, clients)) == len(clients)
    errors = [line for line in running.output().splitlines() if "ERROR" in line]
    writing = [line for line in errors if "cannot write to history store" in line]
    reading = [line for line in errors if "cannot read history store" in line]
    assert len(writing) == 1 and len(reading) <= 1 and len(errors) == len(writing + reading)
    assert all("read-only" in line.lower() for line in errors), errors

    tmpfs.remount("rw")
    recovered = running.samples_after(3)
    assert recovered["history_error"] == ""
    after = keys_in(history, ports)
    assert_nothing_lost(before, after)
    running.stop()
    assert "Traceback" not in running.output()


def test_a_history_store_corrupted_while_running(
    tmpfs: Tmpfs, core: CoreStandIn, clients: List[Proc]
) -> None:
    """Garbage over the live files (database, write-ahead log, shared index): found at the
    next write, moved aside once (never deleted), a new store starts; sampling and the live
    table go on."""
    history = tmpfs.path / "state" / "history.db"
    running = Running(core, tmpfs.base, history)
    ports = {int(row["remote_port"]) for row in our_live_rows(running, clients)}
    running.wait(lambda row: row["history_rows"] not in ("", "0"))
    running.samples_after(2)
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(history) + suffix)
        if path.exists():
            with open(path, "r+b") as handle:
                handle.write(b"\xde\xad\xbe\xef" * (path.stat().st_size // 4))
    recovered = running.samples_after(4)
    assert recovered["history_error"] == ""
    assert len(our_live_rows(running, clients)) == len(clients)
    output = running.output()
    assert output.count("moved it to") == 1, output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    (aside,) = [
        p
        for p in history.parent.iterdir()
        if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]
    assert aside.read_bytes()[:4] == b"\xde\xad\xbe\xef"  # kept as it was found
    assert len(keys_in(history, ports)) == len(clients)  # the new store records
    running.stop()
    assert "Traceback" not in running.output()


def test_two_writers_extension_and_watch(
    tmpfs: Tmpfs, core: CoreStandIn, clients: List[Proc]
) -> None:
    history = tmpfs.path / "state" / "history.db"
    running = Running(core, tmpfs.base, history)
    ports = {int(row["remote_port"]) for row in our_live_rows(running, clients)}
    running.wait(lambda row: row["history_rows"] not in ("", "0"))
    watch = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "watch", "--interval", str(INTERVAL)],
        env=dict(os.environ, **running.env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = keys_in(history, ports)
        running.samples_after(10)
        during = keys_in(history, ports)
    finally:
        watch.terminate()
        _, watch_errors = watch.communicate(timeout=10)
    assert watch.returncode == 0, watch_errors
    assert watch_errors == ""
    assert_nothing_lost(before, during)
    # both wrote: more samples than the extension alone took in that time
    assert all(during[key] - before[key] > 10 for key in before), (before, during)
    output = running.output()
    assert "ERROR" not in output and "WARNING" not in output, output
    running.stop()
