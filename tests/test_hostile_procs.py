"""Hostile processes holding real external connections in a test host (issue 7).

A process names itself: its ``comm`` (``prctl(PR_SET_NAME)``, or the file name it was
exec'd under), its command line and its executable's path are whatever bytes it likes.  Here,
in a client namespace, processes dial a "global" server on the other end of a veth pair:

- ``symlink``: exec'd through a symlink whose name holds a newline, ANSI escape sequences
  (CSI and an OSC title change) and an undecodable byte, with a command line of newlines,
  escapes, a line that looks like a log line, invalid UTF-8 and 100 KB of text (kept to the
  4096-byte bound);
- ``prctl``: renames itself to newline, clear-screen, ``\\xff`` and ``) R 1``, which breaks
  any ``/proc/PID/stat`` parser that looks for the first ``)``; dials IPv4;
- ``deleted``: a copy of the interpreter under a ~2 KB hostile path, deleted once running;
- ``forked``: hands its connection to a child and exits, a zombie nobody reaps yet;
- ``leader``: its main thread exits alone (a zombie thread-group leader) while another
  thread holds the connection, so ``/proc/PID/fd``, ``/proc/PID/ns/net`` and
  ``/proc/PID/net/*`` are gone; ``hidden`` does the same as the only process of a third
  namespace, whose sockets can then be read only through ``/proc/PID/task/TID``.

Then ``egress-agent check`` in every format and ``watch`` in both of its formats must give
one row per connection, parseable output, exact (lossless) JSON values, no raw control
character on the terminal or in a log line.  The last tests make processes exit at each
step of a sample (after namespace discovery, after the socket tables, after the owner scan).
Everything lives in these namespaces; the command samples the whole machine, so the
assertions look at the rows of the client namespaces only.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from nethost import Namespace, NetHost, Proc

from agent.classify import Classifier
from agent.collect.sockets import sampler as sampler_module
from agent.collect.sockets.sampler import LinuxSampler
from agent.identity import CMDLINE_CUT_MARK, bounded_cmdline
from agent.osquery import external_connections
from agent.owners import OwnerFinder, OwnerScan
from agent.render import FORMATS, render
from agent.textsafe import cell_text, utf8_safe

PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "h"
SRV6, CLI6 = "2a0e:4a00:7::1", "2a0e:4a00:7::2"
SRV4, CLI4 = "9.9.7.1", "9.9.7.2"
SRV_HID, HID = "2a0e:4a00:8::1", "2a0e:4a00:8::2"
HELPER = str(Path(__file__).with_name("hostile_procs.py"))
INTERPRETER = os.path.realpath(sys.executable)

FORGED_LOG_LINE = "\n2030-01-01T00:00:00Z egress-agent: 0 unexpected external connection(s)\n"
HOSTILE_ARGS = [
    "two\nlines\r\n",
    "\x1b[31mred\x1b[0m\x1b]0;title\x07\x1b[2J",
    "\x9b31m\u202eevil\u2028\x7f\x08",
    "not utf-8: \udcff\udcfe\udcc0",
    FORGED_LOG_LINE,
    "z" * 100_000,
]
"""Command-line arguments (``\\udcXX`` is the undecodable byte XX, PEP 383)."""
PRCTL_COMM = b"\n\x1b[2J\xff) R 1 2"
SYMLINK_NAME = "ev\nil\x1b[31m\x1b]0;x\x07" + "\udcff-tail-\u65e5\u672c"
"""15 ASCII bytes first (so psutil's name() takes the whole name from the command line),
then an undecodable byte and two CJK characters (printable, but not in ASCII or Latin-1)."""
DELETED_NAME = "py\x1b[1m\udcfe"


@dataclass
class Hostile:
    kind: str
    proc: Proc
    owner: int
    """The pid that holds the connection."""
    local_port: int
    argv: List[str]
    name: str
    path: str


def _wait_state(pid: int, state: str) -> None:
    """Wait until /proc/PID/status says ``state`` (Z: a zombie)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle.read().split(b"\n"):
                if line.startswith(b"State:") and line.split()[1].decode() == state:
                    return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never reached state {state}")


class Scene:
    def __init__(self, net: NetHost, scratch: Path) -> None:
        self.net = net
        self.srv = srv = net.namespace("srv")
        self.cli = cli = net.namespace("cli")
        self.hid = hid = net.namespace("hid")
        net.veth(srv, "s0", cli, "c0")
        net.veth(srv, "s1", hid, "h0")
        srv.add_address(f"{PREFIX}-s1", SRV_HID + "/64")
        hid.add_address(f"{PREFIX}-h0", HID + "/64")
        srv.add_address(f"{PREFIX}-s0", SRV6 + "/64")
        srv.add_address(f"{PREFIX}-s0", SRV4 + "/24")
        cli.add_address(f"{PREFIX}-c0", CLI6 + "/64")
        cli.add_address(f"{PREFIX}-c0", CLI4 + "/24")
        self.server = net.listen(srv, "::", dualstack=True)
        port = str(self.server.port)
        self.hostile: Dict[str, Hostile] = {}

        link = scratch / SYMLINK_NAME
        os.symlink(INTERPRETER, link)
        argv = [str(link), HELPER, "hold", SRV6, port, "--", *HOSTILE_ARGS]
        self._add("symlink", cli, argv, SYMLINK_NAME, INTERPRETER)

        argv = [INTERPRETER, HELPER, "hold", SRV4, port, "--comm", PRCTL_COMM.hex()]
        argv += ["--", *HOSTILE_ARGS[:5]]
        self._add("prctl", cli, argv, os.fsdecode(PRCTL_COMM), INTERPRETER)

        deep = scratch.joinpath(*[f"dir\n\x1b[7m{i}" + "d" * 190 for i in range(10)])
        deep.mkdir(parents=True)
        copy = deep / DELETED_NAME
        shutil.copy(INTERPRETER, copy)
        argv = [str(copy), HELPER, "hold", SRV6, port, "--", HOSTILE_ARGS[0]]
        self._add("deleted", cli, argv, DELETED_NAME, str(copy))
        copy.unlink()

        argv = [INTERPRETER, HELPER, "hold", SRV6, port, "--fork-holder"]
        self._add("forked", cli, argv, os.path.basename(INTERPRETER), INTERPRETER)
        _wait_state(self.hostile["forked"].proc.pid, "Z")

        argv = [INTERPRETER, HELPER, "hold", SRV6, port, "--zombie-leader"]
        self._add("leader", cli, argv, os.path.basename(INTERPRETER), "")
        _wait_state(self.hostile["leader"].proc.pid, "Z")

        argv = [INTERPRETER, HELPER, "hold", SRV_HID, port, "--zombie-leader"]
        self._add("hidden", hid, argv, os.path.basename(INTERPRETER), "")
        _wait_state(self.hostile["hidden"].proc.pid, "Z")
        self.namespaces = {cli.inode, hid.inode}

    def _add(self, kind: str, ns: Namespace, argv: List[str], name: str, path: str) -> None:
        proc = self.net.spawn(ns, argv, ready=True)
        _, local_port, owner = proc.ready
        self.hostile[kind] = Hostile(kind, proc, int(owner), int(local_port), argv, name, path)

    def owners(self) -> Dict[int, Hostile]:
        return {h.owner: h for h in self.hostile.values()}


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs and every /proc/PID/fd")
    scratch = Path(tempfile.mkdtemp(prefix="egress-agent-hostile-"))
    try:
        with NetHost(PREFIX) as net:
            yield Scene(net, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def egress_agent(*args: str, encoding: str = "utf-8") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EGRESS_AGENT_CONFIG="/dev/null", PYTHONIOENCODING=encoding)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        encoding=encoding.split(":")[0],
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode in (0, 1), result.stderr
    assert_terminal_safe(result.stderr)
    return result


def assert_terminal_safe(text: str) -> None:
    """Nothing but printable characters and line ends: no escape sequence can reach the
    terminal or the log, no line can be split."""
    bad = sorted({c for c in text if not c.isprintable() and c != "\n"})
    assert not bad, f"raw control characters in the output: {bad!r}"


# ---------------------------------------------------------------------------------------------
# every format of `check` and `watch`


def test_json_rows_are_one_per_connection_and_lossless(scene: Scene) -> None:
    result = egress_agent("check", "--format", "json")
    assert_terminal_safe(result.stdout)
    rows = [r for r in json.loads(result.stdout) if r["net_namespace"] in scene.namespaces]
    owners = scene.owners()
    assert sorted(r["pid"] for r in rows) == sorted(owners)
    for row in rows:
        hostile = owners[row["pid"]]
        assert row["local_port"] == hostile.local_port
        assert (row["remote_address"], row["remote_port"]) in {
            (SRV6, scene.server.port),
            (SRV4, scene.server.port),
            (SRV_HID, scene.server.port),
        }
        assert row["name"] == utf8_safe(hostile.name), hostile.kind
        if hostile.kind in ("leader", "hidden"):  # the main thread exited: no exe, cmdline
            assert row["path"] == row["cmdline"] == ""
        else:
            assert row["path"] == utf8_safe(hostile.path), hostile.kind
        if hostile.kind in ("symlink", "prctl", "deleted"):
            assert row["cmdline"] == utf8_safe(bounded_cmdline(" ".join(hostile.argv)))
    symlink = owners[scene.hostile["symlink"].owner]
    cut = next(r for r in rows if r["pid"] == symlink.owner)["cmdline"]
    assert cut.endswith(CMDLINE_CUT_MARK) and len(cut) < 5000  # 100 KB kept to the bound
    forked = next(r for r in rows if r["pid"] == scene.hostile["forked"].owner)
    assert forked["parent"] != scene.hostile["forked"].proc.pid  # the zombie is not the owner


def test_table_is_one_line_per_connection_and_drives_no_terminal(scene: Scene) -> None:
    result = egress_agent("check", "--format", "table", "--direction", "any")
    assert_terminal_safe(result.stdout)
    lines = result.stdout.split("\n")
    assert lines[-1] == ""
    for hostile in scene.hostile.values():
        mine = [line for line in lines if line.split()[:1] == [str(hostile.owner)]]
        assert len(mine) == 1, (hostile.kind, mine)
        shown = cell_text(hostile.name)[:20]
        assert shown in mine[0], (hostile.kind, shown, mine[0])


@pytest.mark.parametrize("encoding", ["ascii:strict", "latin-1:strict"])
def test_a_narrow_terminal_encoding_escapes_instead_of_failing(scene: Scene, encoding: str) -> None:
    """A process name outside the terminal's encoding (here CJK under ASCII or Latin-1) is
    written as an escape; the report is complete and the exit status is the usual one."""
    result = egress_agent("check", "--format", "table", encoding=encoding)
    assert "Traceback" not in result.stderr
    symlink = scene.hostile["symlink"]
    mine = [line for line in result.stdout.split("\n") if line.split()[:1] == [str(symlink.owner)]]
    assert len(mine) == 1 and "tail-\\u65e5\\u672c" in mine[0]


def test_csv_parses_to_one_record_per_connection(scene: Scene) -> None:
    result = egress_agent("check", "--format", "csv")
    assert_terminal_safe(result.stdout)
    records = list(csv.reader(io.StringIO(result.stdout)))
    header, body = records[0], records[1:]
    assert all(len(record) == len(header) for record in body)
    assert len(result.stdout.split("\n")) == len(records) + 1  # no record spans two lines
    by_pid: Dict[str, List[Dict[str, str]]] = {}
    for record in body:
        row = dict(zip(header, record))
        if int(row["net_namespace"] or 0) in scene.namespaces:
            by_pid.setdefault(row["pid"], []).append(row)
    assert sorted(by_pid) == sorted(str(pid) for pid in scene.owners())
    for pid, rows in by_pid.items():
        hostile = scene.owners()[int(pid)]
        assert len(rows) == 1
        assert rows[0]["name"] == cell_text(hostile.name)
        if hostile.kind in ("symlink", "prctl", "deleted"):
            assert rows[0]["cmdline"] == cell_text(bounded_cmdline(" ".join(hostile.argv)))


def ecs_rows(text: str, scene: Scene) -> List[Dict[str, Any]]:
    """The ECS documents (one JSON object a line) of the client namespace's connections."""
    documents = [json.loads(line) for line in text.split("\n") if line]
    return [
        d
        for d in documents
        # a connection whose namespace nobody knows (the host's own, gone) has no such key
        if d.get("egress_agent", {}).get("net_namespace") in scene.namespaces
        and d.get("destination", {}).get("port") == scene.server.port
    ]


def test_ecs_is_one_document_a_line_per_connection(scene: Scene) -> None:
    result = egress_agent("check", "--format", "ecs")
    assert_terminal_safe(result.stdout)
    documents = ecs_rows(result.stdout, scene)
    assert sorted(d.get("process", {}).get("pid", -1) for d in documents) == sorted(scene.owners())
    for document in documents:
        hostile = scene.owners()[document["process"]["pid"]]
        assert document["process"]["name"] == utf8_safe(hostile.name)
        if hostile.kind in ("symlink", "prctl", "deleted"):
            command_line = document["process"]["command_line"]
            assert command_line == utf8_safe(bounded_cmdline(" ".join(hostile.argv)))
        assert document["network"]["direction"] == "egress"


@pytest.mark.parametrize("fmt", ["jsonl", "ecs"])
def test_watch_log_lines_cannot_be_forged(scene: Scene, fmt: str) -> None:
    """``watch`` feeds a SIEM or the journal one line an event: a name or command line with
    newlines and a fake log line in it stays inside its own event."""
    result = egress_agent(
        "watch", "--format", fmt, "--count", "1", "--interval", "0.1", "--no-history"
    )
    assert_terminal_safe(result.stdout)
    lines = [line for line in result.stdout.split("\n") if line]
    events = [json.loads(line) for line in lines]  # every line is one whole JSON document
    if fmt == "ecs":
        pids = [d.get("process", {}).get("pid") for d in ecs_rows(result.stdout, scene)]
    else:
        pids = [e["pid"] for e in events if e["net_namespace"] in scene.namespaces]
    assert sorted(pids) == sorted(scene.owners())
    assert not any(line.startswith("2030-01-01") for line in lines)


def test_osquery_tables_carry_hostile_text_intact(scene: Scene, tmp_path: Path) -> None:
    """The extension's live and history tables: one row per connection, every value a valid
    UTF-8 string (an undecodable byte as the text ``\\xff``), the 100 KB command line kept to
    its bound, and a ``pid`` constraint that picks the hostile process alone."""
    from osquery_core import CoreStandIn, default_extension_command

    config = tmp_path / "config.yaml"
    config.write_text(f"sampling:\n  interval: 0.5\nhistory:\n  path: {tmp_path}/h.db\n")
    with CoreStandIn() as core:
        process = core.launch(
            default_extension_command(),
            timeout=10,
            interval=1,
            verbose=True,
            env={"EGRESS_AGENT_CONFIG": str(config)},
        )
        with core.connect(core.wait_for_registration(process=process), timeout=120) as extension:
            live = extension.generate("external_connections")
            symlink = scene.hostile["symlink"]
            narrowed = extension.generate(
                "external_connections", {"pid": [(2, str(symlink.owner))]}
            )
            deadline = time.monotonic() + 60
            while True:
                history = extension.generate("external_connection_history")
                if {str(pid) for pid in scene.owners()} <= {row["pid"] for row in history}:
                    break
                assert time.monotonic() < deadline, "the hostile rows never reached history"
                time.sleep(0.2)
        output = core.output(process)
    namespaces = {str(inode) for inode in scene.namespaces}
    rows = [r for r in live if r["net_namespace"] in namespaces]
    assert sorted(int(r["pid"]) for r in rows) == sorted(scene.owners())
    for row in rows:
        hostile = scene.owners()[int(row["pid"])]
        assert row["name"] == utf8_safe(hostile.name)
        if hostile.kind in ("symlink", "prctl", "deleted"):
            assert row["cmdline"] == utf8_safe(bounded_cmdline(" ".join(hostile.argv)))
    assert [r["local_port"] for r in narrowed] == [str(symlink.local_port)]
    names = {r["name"] for r in history if r["net_namespace"] in namespaces}
    assert {utf8_safe(h.name) for h in scene.hostile.values()} <= names
    assert "Traceback" not in output
    assert all(line.isprintable() for line in output.split("\n"))


def test_encoded_rows_of_hostile_records_are_the_old_string_rows(scene: Scene) -> None:
    """The extension's encoded rows (agent/osquery/wire.py) against the path they replaced,
    ``table.string_row`` and the generated Thrift writer, on these records: the same bytes."""
    from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus
    from osquery_core import generated_call_reply

    from agent.osquery import table, wire

    records = [
        r for r in LinuxSampler(Classifier()).sample() if r.net_namespace in scene.namespaces
    ]
    assert sorted(r.pid for r in records) == sorted(scene.owners())
    columns = external_connections.SPEC.column_names
    old = [table.string_row(r.as_dict(), columns) for r in records]
    status = ExtensionStatus(code=0, message="OK")
    expected = generated_call_reply(3, ExtensionResponse(status=status, response=old))
    encoder = wire.RowEncoder(columns)
    for _ in range(2):  # cold, then from the kept rows
        rows = encoder.encode_records(records, remember=True)
        assert list(rows) == old
        reply = wire.call_reply(3, ExtensionResponse(status=status, response=rows))
        assert reply.data() == expected


# ---------------------------------------------------------------------------------------------
# processes that exit in the middle of a sample

CLASSIFIER = Classifier()


def _kill(proc: Proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)


class ExitAfterOwnerScan(OwnerFinder):
    """Finds the owners, then kills the victim: it is gone before its identity is read."""

    def __init__(self, victim: Proc) -> None:
        super().__init__()
        self.victim = victim

    def find(self, *args: Any, **kwargs: Any) -> OwnerScan:
        scan = super().find(*args, **kwargs)
        _kill(self.victim)
        return scan


class ExitBeforeOwnerScan(OwnerFinder):
    """Kills the victim after the socket tables were read, before its fds are looked at."""

    def __init__(self, victim: Proc) -> None:
        super().__init__()
        self.victim = victim

    def find(self, *args: Any, **kwargs: Any) -> OwnerScan:
        _kill(self.victim)
        return super().find(*args, **kwargs)


@pytest.fixture
def victim_host(nethost: NetHost) -> Iterator[Callable[[], Proc]]:
    """A server and client namespace; calling the result starts one more client."""
    srv, cli = nethost.namespace("vsrv"), nethost.namespace("vcli")
    nethost.veth(srv, "vs0", cli, "vc0")
    srv.add_address(f"{nethost.prefix}-vs0", SRV6 + "/64")
    cli.add_address(f"{nethost.prefix}-vc0", CLI6 + "/64")
    server = nethost.listen(srv, SRV6)

    def client() -> Proc:
        proc = nethost.connect(cli, SRV6, server.port)
        proc.ready.append(str(cli.inode))
        return proc

    yield client


def _rows_of(rows: List[Any], victim: Proc) -> List[Any]:
    namespace = int(victim.ready[2])
    return [r for r in rows if r.net_namespace == namespace and r.local_port == victim.local_port]


def _every_format_renders(rows: List[Any]) -> None:
    records = [r.as_dict() for r in rows]
    for fmt in FORMATS:
        text = render(records, None, fmt)
        assert_terminal_safe(text)


def test_process_gone_between_owner_scan_and_identity(
    victim_host: Callable[[], Proc],
) -> None:
    victim = victim_host()
    sampler = LinuxSampler(CLASSIFIER, owners=ExitAfterOwnerScan(victim))
    rows = sampler.sample()
    mine = _rows_of(rows, victim)
    assert len(mine) == 1
    row = mine[0]
    assert row.pid == victim.pid  # who held it is known; who that was is not
    assert (row.name, row.path, row.cmdline, row.process_uuid) == ("", "", "", "")
    _every_format_renders(rows)


def test_process_gone_between_socket_tables_and_owner_scan(
    victim_host: Callable[[], Proc],
) -> None:
    victim = victim_host()
    sampler = LinuxSampler(CLASSIFIER, owners=ExitBeforeOwnerScan(victim))
    rows = sampler.sample()
    mine = _rows_of(rows, victim)
    assert len(mine) == 1 and mine[0].pid == -1  # the socket was read, then lost its owner
    _every_format_renders(rows)


def test_namespace_emptied_between_discovery_and_socket_tables(
    victim_host: Callable[[], Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process of the client namespace exits after discovery named them: its tables
    cannot be read through any of them; the sample goes on and says so."""
    victim = victim_host()
    namespace = int(victim.ready[2])
    real = sampler_module.discover_namespaces

    def discover_then_exit(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        _kill(victim)
        return found

    monkeypatch.setattr(sampler_module, "discover_namespaces", discover_then_exit)
    sampler = LinuxSampler(CLASSIFIER)
    rows = sampler.sample()
    assert not _rows_of(rows, victim)
    info = [n for n in sampler.last.per_namespace if n.inode == namespace]
    assert info and info[0].pid == -1 and "no process" in info[0].error


def test_a_process_turned_zombie_after_discovery_does_not_hide_its_namespace(
    victim_host: Callable[[], Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that discovery chose to read a namespace through (its lowest pid) dies
    before the tables are read and is not reaped yet: a zombie, whose ``/proc/PID/net`` is
    still a directory but holds no table.  That is no kernel without the table: the tables
    are read through the next process of the namespace.  (Under churn with ``pid_max`` at
    32768, short-lived children wrap around to low pids and do exactly this.)"""
    first, second = victim_host(), victim_host()
    victim, keeper = sorted((first, second), key=lambda proc: proc.pid)
    real = sampler_module.discover_namespaces

    def discover_then_die(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        os.kill(victim.pid, signal.SIGKILL)  # not reaped: a zombie until the fixture ends
        _wait_state(victim.pid, "Z")
        return found

    monkeypatch.setattr(sampler_module, "discover_namespaces", discover_then_die)
    rows = LinuxSampler(CLASSIFIER).sample()
    mine = _rows_of(rows, keeper)
    assert [(r.pid, r.local_port) for r in mine] == [(keeper.pid, keeper.local_port)]


def test_a_vanished_owner_in_the_cache_is_not_reused(victim_host: Callable[[], Proc]) -> None:
    """A warm sampler (identity cached) whose owner then exits: no stale identity."""
    victim = victim_host()
    sampler = LinuxSampler(CLASSIFIER)
    first = _rows_of(sampler.sample(), victim)
    assert first and first[0].name
    sampler.owners = ExitAfterOwnerScan(victim)
    second = _rows_of(sampler.sample(), victim)
    assert len(second) == 1 and second[0].pid == victim.pid and second[0].name == ""


# ---------------------------------------------------------------------------------------------
# the layout of a process whose main thread exited, on disk (no root needed)


def test_a_zombie_leader_is_read_through_its_live_thread(tmp_path: Path) -> None:
    """What ``/proc`` shows of a ``Zl`` process: ``/proc/PID`` without ``ns/net`` and with an
    empty ``fd``, ``/proc/PID/task/TID`` with both.  Its namespace, socket table and fd are
    found through the thread; a plain zombie (no other thread) stays an error."""
    pid, tid, zombie = 4194400, 4194401, 4194402
    inode, namespace = 7777, 9101
    remote = "09090909:01BB"  # 9.9.9.9:443
    row = (
        f"   0: 0200000A:9C40 {remote} 01 00000000:00000000 00:00000000 00000000"
        f"     0        0 {inode} 1 0000000000000000"
    )
    leader = tmp_path / str(pid)
    (leader / "fd").mkdir(parents=True)
    thread = leader / "task" / str(tid)
    (thread / "ns").mkdir(parents=True)
    (thread / "net").mkdir()
    (thread / "fd").mkdir()
    (leader / "task" / str(pid)).mkdir()
    os.symlink(f"net:[{namespace}]", thread / "ns" / "net")
    (thread / "net" / "tcp").write_text("  sl  local_address rem_address   st\n" + row + "\n")
    os.symlink(f"socket:[{inode}]", thread / "fd" / "5")
    (tmp_path / str(zombie) / "task" / str(zombie)).mkdir(parents=True)

    sampler = LinuxSampler(CLASSIFIER, proc_root=str(tmp_path))
    rows = sampler.sample()
    assert [(r.net_namespace, r.socket, r.pid, r.fd) for r in rows] == [(namespace, inode, pid, 5)]
    assert list(sampler.last.namespace_errors) == [zombie]
