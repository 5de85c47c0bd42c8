"""The extension process against the osquery core stand-in: registration, calls, lifecycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import pytest
from fakes import FunctionSampler, monitor_of
from osquery_core import (
    CoreError,
    CoreStandIn,
    Registration,
    default_extension_command,
    make_context,
)

import agent
from agent.history import SCHEMA_VERSION
from agent.osquery import dispatch, external_connections
from agent.osquery.dispatch import ExtensionTables
from agent.osquery.server import Options, Stopper, serve
from agent.osquery.table import AgentInfo
from agent.records import Connection

EXTENSION = default_extension_command()
STOP_WITHIN_S = 2.0


@pytest.fixture
def config(tmp_path: Path) -> Dict[str, str]:
    """The environment of a launched extension: its own config, history under tmp_path."""
    path = tmp_path / "config.yaml"
    history = tmp_path / "state" / "history.db"
    path.write_text(f"sampling:\n  interval: 1\nhistory:\n  path: {history}\n")
    return {"EGRESS_AGENT_CONFIG": str(path)}


@pytest.fixture
def core() -> Iterator[CoreStandIn]:
    with CoreStandIn() as stand_in:
        yield stand_in


def launch(
    core: CoreStandIn, env: Dict[str, str], interval: float = 1, verbose: bool = False
) -> Tuple[subprocess.Popen, Registration]:
    process = core.launch(EXTENSION, timeout=5, interval=interval, verbose=verbose, env=env)
    return process, core.wait_for_registration(process=process)


def ends_within(process: subprocess.Popen, seconds: float, core: CoreStandIn) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds} s later:\n{core.output(process)}")


# -- registration and calls ----------------------------------------------------------------


def test_registers_as_egress_agent_with_our_routes(
    core: CoreStandIn, config: Dict[str, str]
) -> None:
    _, registration = launch(core, config)
    assert registration.name == "egress_agent"
    assert registration.version == agent.__version__
    assert registration.tables() == dispatch.registry()["table"]
    with core.connect(registration) as extension:
        assert extension.ping().code == 0
        for name, routes in registration.tables().items():
            assert extension.columns(name) == routes
        routes = extension.columns("external_connections")
        assert {r["name"]: r["op"] for r in routes if r["op"] != "0"} == {
            "pid": "9",  # INDEX | OPTIMIZED
            "remote_address": "9",
        }
    socket_path = core.extension_socket(registration)
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600


def test_generate_with_and_without_contexts(core: CoreStandIn, config: Dict[str, str]) -> None:
    process, registration = launch(core, config)
    with core.connect(registration) as extension:
        for old_format in (False, True):
            (info,) = extension.generate("egress_agent_info", {}, old_format=old_format)
            assert info["version"] == agent.__version__
            assert info["pid"] == str(process.pid)
            assert info["config_path"] == config["EGRESS_AGENT_CONFIG"]
            assert float(info["sampling_interval"]) == 1.0
            assert info["history_path"].endswith("history.db")
        pid_context = {"pid": [(2, str(process.pid))]}
        for name in registration.tables():
            for constraints in (None, pid_context):
                for old_format in (False, True):
                    rows = extension.generate(name, constraints, old_format=old_format)
                    for row in rows:
                        assert all(isinstance(value, str) for value in row.values())
                        assert "None" not in row.values()
                        assert set(row) == {r["name"] for r in registration.tables()[name]}
        rows = extension.generate("external_connections", pid_context)
        assert all(row["pid"] == str(process.pid) for row in rows)
        # A request without any context (not what core sends) means no constraints.
        response = extension.call("table", "egress_agent_info", {"action": "generate"})
        assert response.status.code == 0 and len(response.response) == 1


def test_bad_requests_fail_with_a_message_and_serving_goes_on(
    core: CoreStandIn, config: Dict[str, str]
) -> None:
    process, registration = launch(core, config)
    with core.connect(registration) as extension:
        cases = [
            ("table", "no_such_table", {"action": "generate", "context": "{}"}, "unknown table"),
            ("table", "egress_agent_info", {"action": "drop"}, "unknown action 'drop'"),
            ("table", "egress_agent_info", {"action": "generate", "context": "{"}, "valid JSON"),
            ("table", "external_connections", {"action": "generate", "context": "[]"}, "object"),
            ("config", "egress_agent_info", {"action": "genConfig"}, "no 'config' plugins"),
        ]  # fmt: skip
        for registry, item, request, message in cases:
            response = extension.call(registry, item, request)
            assert response.status.code == 1, (item, request)
            assert message in response.status.message
            assert response.response == []
        assert extension.ping().code == 0

    # Bytes that are no Thrift message end that connection only.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(core.extension_socket(registration))
    raw.sendall(b"\x80\x01\x00\x01\xff\xff\xff\xffGET / HTTP/1.0\r\n\r\n" * 10)
    raw.settimeout(10)
    assert raw.recv(100) == b""  # closed by the extension
    raw.close()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(core.extension_socket(registration))
    raw.sendall(b"\x80\x01\x00\x01\x00\x00\x00\x04call\x00\x00\x00\x01\x0b\x00\x01\x7f\xff\xff\xff")
    raw.settimeout(10)
    assert raw.recv(100) == b""  # a string longer than the limit is refused, not allocated
    raw.close()

    with core.connect(registration) as extension:
        assert extension.ping().code == 0
        assert len(extension.generate("egress_agent_info")) == 1
    assert process.poll() is None


def test_verbose_logs_registration_and_calls(core: CoreStandIn, config: Dict[str, str]) -> None:
    process, registration = launch(core, config, verbose=True)
    with core.connect(registration) as extension:
        extension.generate("egress_agent_info", {"pid": [(2, "1")]})
        extension.call("table", "nope\n forged line", {"action": "columns"})
        extension.shutdown()
    ends_within(process, STOP_WITHIN_S, core)
    output = core.output(process)
    assert f"registered egress_agent {agent.__version__}" in output
    assert f"uuid {registration.uuid}" in output
    assert "call 'table' 'egress_agent_info'" in output and "'pid': ['2:1']" in output
    assert "'nope\\n forged line'" in output  # escaped: one log line per call
    assert not any(line.startswith(" forged line") for line in output.splitlines())


def test_a_duplicate_extension_is_refused_and_exits(
    core: CoreStandIn, config: Dict[str, str]
) -> None:
    launch(core, config)
    second = core.launch(EXTENSION, timeout=5, interval=1, env=config)
    assert ends_within(second, 30, core) == 1
    assert "refused the registration" in core.output(second)
    assert "Duplicate extension" in core.output(second)


# -- lifecycle -----------------------------------------------------------------------------------


def test_shutdown_ends_the_process_and_removes_the_socket(
    core: CoreStandIn, config: Dict[str, str]
) -> None:
    process, registration = launch(core, config)
    socket_path = core.extension_socket(registration)
    assert os.path.exists(socket_path)
    with core.connect(registration) as extension:
        extension.shutdown()
    assert ends_within(process, STOP_WITHIN_S, core) == 0
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_the_process_and_deregister(
    core: CoreStandIn, config: Dict[str, str], signum: int
) -> None:
    process, registration = launch(core, config)
    socket_path = core.extension_socket(registration)
    process.send_signal(signum)
    assert ends_within(process, STOP_WITHIN_S, core) == 0
    assert not os.path.exists(socket_path)
    assert registration.uuid in core.manager.deregistered
    assert "Traceback" not in core.output(process)


def test_a_vanished_core_ends_the_process(core: CoreStandIn, config: Dict[str, str]) -> None:
    interval = 1.0
    process, registration = launch(core, config, interval=interval)
    socket_path = core.extension_socket(registration)
    core.stop()
    # The next ping (at most one interval away) fails; then 2 s to be gone.
    assert ends_within(process, interval + STOP_WITHIN_S, core) != 0
    assert not os.path.exists(socket_path)
    assert "stopped answering pings" in core.output(process)
    assert "Traceback" not in core.output(process)


def test_a_forgotten_extension_ends(core: CoreStandIn, config: Dict[str, str]) -> None:
    """Core dropped our registration (its ping of us failed): only a restart brings tables back."""
    process, registration = launch(core, config)
    core.manager.deregisterExtension(registration.uuid)
    assert ends_within(process, 1 + STOP_WITHIN_S, core) != 0
    assert "no longer lists this extension" in core.output(process)


def test_a_missing_core_socket_exits_non_zero_naming_it(
    tmp_path: Path, config: Dict[str, str]
) -> None:
    with CoreStandIn(str(tmp_path)) as core:  # launches only: its own socket is not used
        missing = str(tmp_path / "no-such-dir" / "osquery.em")
        process = core.launch(EXTENSION, timeout=1, interval=1, env=config, socket_path=missing)
        assert ends_within(process, 30, core) == 1
        output = core.output(process)
        assert missing in output and "does not exist" in output
        assert "Traceback" not in output


def test_waits_for_a_core_that_comes_up_late(tmp_path: Path, config: Dict[str, str]) -> None:
    core = CoreStandIn(str(tmp_path))
    try:
        process = core.launch(EXTENSION, timeout=30, interval=1, env=config)
        time.sleep(0.5)  # not a timing assertion: the extension must retry, however long
        core.start()
        registration = core.wait_for_registration(process=process)
        with core.connect(registration) as extension:
            assert extension.ping().code == 0
    finally:
        core.close()


def test_bad_config_exits_2_with_the_file_named(core: CoreStandIn, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed\n")
    process = core.launch(EXTENSION, timeout=5, interval=1, env={"EGRESS_AGENT_CONFIG": str(bad)})
    assert ends_within(process, 30, core) == 2
    assert str(bad) in core.output(process)
    assert "Traceback" not in core.output(process)
    assert core.manager.history == []


# -- threads: a ping is answered while a generate runs ---------------------------------------


def test_ping_is_answered_during_a_slow_generate(core: CoreStandIn) -> None:
    """In-process, with a sample function that blocks until released: a real sampler cannot be
    made slow on demand.  With a one-connection-at-a-time server the ping would hang."""
    entered, release = threading.Event(), threading.Event()

    def slow(pids: Optional[FrozenSet[int]]) -> List[Connection]:
        entered.set()
        release.wait(60)
        return []

    monitor = monitor_of(FunctionSampler(slow), interval=3600)
    tables = ExtensionTables(monitor, None, AgentInfo("1", "defaults", 1.0, ""))
    stopper = Stopper()
    options = Options(socket=core.socket_path, timeout=5, interval=1)
    server = threading.Thread(target=serve, args=(options, tables, None, stopper), daemon=True)
    server.start()
    try:
        registration = core.wait_for_registration()
        results: List[int] = []

        def generate() -> None:
            with core.connect(registration, timeout=60) as extension:
                results.append(len(extension.generate("external_connections")))

        generating = threading.Thread(target=generate, daemon=True)
        generating.start()
        assert entered.wait(30)
        with core.connect(registration, timeout=5) as extension:
            assert extension.ping().code == 0
            assert len(extension.generate("egress_agent_info")) == 1
        assert generating.is_alive() and not release.is_set()
        release.set()
        generating.join(30)
        assert results == [0]
    finally:
        release.set()
        stopper.request("test over")
        server.join(10)
    assert not server.is_alive()
    assert not os.path.exists(core.extension_socket(registration))


# -- history under the extension ---------------------------------------------------------------


def test_a_garbage_history_file_is_moved_aside_and_sampling_goes_on(
    core: CoreStandIn, config: Dict[str, str], tmp_path: Path
) -> None:
    history = tmp_path / "state" / "history.db"
    history.parent.mkdir(mode=0o700)
    history.write_bytes(b"\x00garbage\xff" * 10000)
    started = int(time.time())
    process, registration = launch(core, config)
    with core.connect(registration) as extension:
        info = _wait_for(extension, lambda row: int(row["samples_total"]) >= 2)
        assert info["history_error"] == "" and info["history_rows"].isdigit()
        # A fresh store: what it holds was sampled by this run (other external connections on
        # the machine may be in it), nothing came from the garbage.  A socket that had already
        # closed without an owner is dated one second before the store opened (issue 25).
        rows = extension.generate("external_connection_history")
        assert all(int(row["first_seen"]) >= started - 1 for row in rows)
    fresh = sqlite3.connect(str(history))
    assert fresh.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    fresh.close()
    aside = [p.name for p in history.parent.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1
    assert (history.parent / aside[0]).read_bytes().startswith(b"\x00garbage")
    output = core.output(process)
    assert output.count("moved it to") == 1 and str(history) in output


def _wait_for(extension, ready, timeout: float = 30) -> Dict[str, str]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        (row,) = extension.generate("egress_agent_info")
        if ready(row):
            return row
        if time.monotonic() > deadline:
            raise CoreError(f"egress_agent_info never got there: {json.dumps(row)}")
        time.sleep(0.2)


def test_context_maker_matches_what_core_sends() -> None:
    routes = external_connections.SPEC.routes()
    document = json.loads(make_context(routes, {"pid": [(2, "7")]}))
    assert document["constraints"][0] == {
        "name": "pid",
        "list": [{"op": 2, "expr": "7"}],
        "affinity": "INTEGER",
    }
    assert all(c["list"] == [] for c in document["constraints"][1:])
    old = json.loads(make_context(routes, {"pid": [(2, "7")]}, old_format=True))
    assert old["constraints"][0]["list"] == [{"op": "2", "expr": "7"}]
    assert old["constraints"][1]["list"] == ""


def test_the_extensions_protocol_writes_what_thrift_writes() -> None:
    """Its one-write strings (a speed-up for big tables) change no byte on the wire."""
    from osquery.extensions import Extension
    from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TTransport

    from agent.osquery.server import _protocol_factory

    rows = [{"name": "caf\u00e9 \u2603", "pid": "1", "empty": ""}, {"cmdline": "x" * 70000}]
    result = Extension.call_result(
        success=ExtensionResponse(status=ExtensionStatus(code=0, message="OK"), response=rows)
    )
    ours, theirs = TTransport.TMemoryBuffer(), TTransport.TMemoryBuffer()
    result.write(_protocol_factory().getProtocol(ours))
    result.write(TBinaryProtocol.TBinaryProtocol(theirs))
    assert ours.getvalue() == theirs.getvalue()
    decoded = Extension.call_result()
    decoded.read(_protocol_factory().getProtocol(TTransport.TMemoryBuffer(ours.getvalue())))
    assert decoded.success.response == rows
