"""Hostile requests to the running extension (issue 7), over its real Unix socket.

tests/test_osquery_table.py already fuzzes the context parser in-process (random text and
random JSON structures) and tests/test_extension.py sends a few malformed requests and
garbage bytes.  Here one extension process, launched as osqueryd would, takes:

- random query contexts, JSON and not, for every table: a status 0 with rows or a status 1
  with a one-line message, never a dropped connection;
- random requests: any registry, table name (control characters, undecodable text), action
  and extra keys;
- mutated Thrift messages: a valid ``call`` with bytes flipped, cut short or extended, so
  lengths, types and UTF-8 go wrong in every way: the extension answers or closes that
  connection, and keeps serving;

and after all of it, its log (``--verbose``: one line per call) has one line per record and
no raw control character, and the process is still there.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, List, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from osquery.extensions import Extension
from osquery_core import CoreStandIn, ExtensionConnection, default_extension_command, make_context
from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

from agent.osquery import dispatch, egress_agent_info, external_connections

TABLES = [plugin.spec.name for plugin in dispatch.TABLES]
CHEAP_TABLES = ["egress_agent_info", "external_connection_history"]


class Running:
    def __init__(self, core: CoreStandIn, base: Path) -> None:
        config = base / "config.yaml"
        config.write_text(f"sampling:\n  interval: 2\nhistory:\n  path: {base}/state/h.db\n")
        self.core = core
        self.process = core.launch(
            default_extension_command(),
            timeout=10,
            interval=1,
            verbose=True,
            env={"EGRESS_AGENT_CONFIG": str(config)},
        )
        self.socket = core.extension_socket(core.wait_for_registration(process=self.process))
        self.connection = ExtensionConnection(self.socket, timeout=60)

    def alive(self) -> bool:
        with ExtensionConnection(self.socket, timeout=30) as extension:
            return self.process.poll() is None and extension.ping().code == 0


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    base = Path(tempfile.mkdtemp(prefix="eah-ext-", dir="/tmp"))
    try:
        with CoreStandIn(str(base)) as core:
            extension = Running(core, base)
            yield extension
            extension.connection.close()
            output = core.output(extension.process)
            assert "Traceback" not in output
            for line in output.split("\n"):
                assert line == "" or line.startswith("egress-agent extension: "), line
                assert all(c.isprintable() for c in line), repr(line)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def assert_answered(response: object) -> None:
    status = response.status  # type: ignore[attr-defined]
    assert status is not None and status.code in (0, 1)
    if status.code == 1:
        assert status.message and "\n" not in status.message, status.message
    else:
        assert all(isinstance(v, str) for row in response.response for v in row.values())  # type: ignore[attr-defined]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["constraints", "name", "list", "op", "expr", "affinity", "colsUsed"])
            | st.text(max_size=6),
            children,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@st.composite
def contexts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["json", "text", "almost", "valid"]))
    if kind == "json":
        return json.dumps(draw(json_values))
    if kind == "text":
        return draw(st.text(max_size=200))
    routes = external_connections.SPEC.routes()
    op = draw(st.sampled_from([2, 3, 4, 65, 66, "2", "x", None, 2**70, -1]))
    expr = draw(st.text(max_size=20) | st.sampled_from(["1", "-1", "0x10", "1e3", "9" * 30]))
    valid = make_context(
        routes, {draw(st.sampled_from(["pid", "remote_address", "fd"])): [(2, expr)]}
    )
    if kind == "valid":
        return valid
    document = json.loads(valid)
    document["constraints"][0]["list"] = [{"op": op, "expr": expr}]
    text = json.dumps(document)
    cut = draw(st.integers(0, len(text)))
    return text[:cut] if draw(st.booleans()) else text


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(context=contexts(), name=st.sampled_from(CHEAP_TABLES))
def test_any_context_is_rows_or_a_clear_failure(running: Running, context: str, name: str) -> None:
    request = {"action": "generate", "context": context}
    assert_answered(running.connection.call("table", name, request))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(context=contexts())
def test_any_context_on_the_live_table(running: Running, context: str) -> None:
    """Fewer examples: each one that parses takes a live sample of the whole machine."""
    request = {"action": "generate", "context": context}
    assert_answered(running.connection.call("table", "external_connections", request))


hostile_text = st.text(max_size=40) | st.sampled_from(
    ["", "\n", "\x1b[2J\x1b]0;owned\x07", "egress_agent_info\nFAKE LOG LINE", "\u202e", "x" * 5000]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    registry=st.sampled_from(["table", "config", "logger", ""]) | hostile_text,
    item=st.sampled_from(TABLES) | hostile_text,
    request=st.dictionaries(
        st.sampled_from(["action", "context", "id"]) | hostile_text,
        st.sampled_from(["generate", "columns", "delete", "{}"]) | hostile_text,
        max_size=4,
    ),
)
def test_any_request_is_answered(
    running: Running, registry: str, item: str, request: Mapping[str, str]
) -> None:
    if (
        registry == "table"
        and item == "external_connections"
        and request.get("action") == "generate"
    ):
        request = dict(request, context="{}")  # a live sample: keep the run short
    assert_answered(running.connection.call(registry, item, dict(request)))


def _valid_call() -> bytes:
    buffer = TTransport.TMemoryBuffer()
    client = Extension.Client(TBinaryProtocol.TBinaryProtocol(buffer))
    routes = egress_agent_info.SPEC.routes()
    client.send_call(
        "table", "egress_agent_info", {"action": "generate", "context": make_context(routes)}
    )
    return buffer.getvalue()


VALID_CALL = _valid_call()


@st.composite
def mutated_calls(draw: st.DrawFn) -> bytes:
    message = bytearray(VALID_CALL)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(message) - 1))
        message[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        message = message[: draw(st.integers(0, len(message)))]
    if draw(st.booleans()):
        message += draw(st.binary(max_size=64))
    return bytes(message)


def _exchange(path: str, payload: bytes) -> bytes:
    """Send ``payload``, close our writing side, read whatever comes back until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(30)
        raw.connect(path)
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        received: List[bytes] = []
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                return b"".join(received)
            received.append(chunk)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=mutated_calls() | st.binary(max_size=200))
def test_mutated_thrift_messages_end_that_connection_only(running: Running, payload: bytes) -> None:
    _exchange(running.socket, payload)  # an answer, or the connection closed: never a hang


def test_still_serving_after_all_of_it(running: Running) -> None:
    assert running.alive()
    assert _exchange(running.socket, VALID_CALL)  # a well-formed call is still answered
    with ExtensionConnection(running.socket) as extension:
        assert len(extension.generate("egress_agent_info")) == 1
