"""agent/osquery/wire.py: the reply to ``call`` and its rows, byte for byte the generated code's.

The reference is osquery-python's generated ``Extension.call_result.write`` over thrift's own
``TBinaryProtocol`` into a ``TMemoryBuffer``, and its generated reader for the round trip;
rows are compared with ``table.string_row``, the path they replace.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from osquery.extensions import Extension
from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus
from osquery_core import generated_call_reply
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport import TSocket, TTransport

from agent.osquery import external_connections, table, wire
from agent.osquery.server import CallProcessor, ExtensionHandler, Stopper, ThreadedUnixServer
from agent.records import Connection
from agent.textsafe import utf8_safe

Rows = List[Dict[str, str]]
LIVE = external_connections.SPEC.column_names


def read_reply(data: bytes) -> Tuple[str, int, int, Optional[ExtensionResponse]]:
    """The generated reader's view of a reply: (name, message type, seqid, response)."""
    protocol = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(data))
    name, kind, seqid = protocol.readMessageBegin()
    result = Extension.call_result()
    result.read(protocol)
    protocol.readMessageEnd()
    return name, kind, seqid, result.success


def response(rows: Any, code: int = 0, message: str = "OK") -> ExtensionResponse:
    return ExtensionResponse(status=ExtensionStatus(code=code, message=message), response=rows)


HOSTILE = [
    "",
    "caf\u00e9 \u65e5\u672c \u2603 \U0001f600",
    "two\nlines\r\n\x1b[31mred\x1b]0;title\x07",
    "nul\x00inside\x00",
    "\u202eevil\u2028\x7f\x08",
    "x" * 300_000,
    "%s %d %r %%",
]
"""Strings the generated writer can write (any valid Unicode, NUL included)."""


def shapes() -> Iterator[Tuple[str, Any]]:
    yield "no rows", []
    yield "one empty row", [{}]
    yield "one row", [{"pid": "1", "name": "sshd"}]
    yield "hostile values", [{"v": text} for text in HOSTILE]
    yield "hostile keys", [{text: str(i) for i, text in enumerate(HOSTILE)}]
    yield "missing columns", [{"a": "1"}, {"b": "2", "c": ""}, {}]
    yield "thousands", [{f"k{j}": f"value {i} {j}" for j in range(30)} for i in range(3000)]


@pytest.mark.parametrize(("shape", "rows"), list(shapes()), ids=[name for name, _ in shapes()])
def test_reply_is_the_generated_bytes_for_dict_rows(shape: str, rows: Rows) -> None:
    expected = generated_call_reply(7, response(rows))
    assert wire.call_reply(7, response(rows)).data() == expected
    assert wire.call_reply(7, response(wire.encode_rows(rows))).data() == expected
    name, kind, seqid, decoded = read_reply(expected)
    assert (name, kind, seqid) == ("call", TMessageType.REPLY, 7)
    assert decoded is not None and decoded.response == rows


@pytest.mark.parametrize(
    "reply",
    [
        None,
        ExtensionResponse(),
        ExtensionResponse(status=ExtensionStatus()),
        ExtensionResponse(status=ExtensionStatus(code=2), response=[]),
        ExtensionResponse(status=ExtensionStatus(message="only a message")),
        ExtensionResponse(status=ExtensionStatus(code=0, message="OK", uuid=2**63 - 1)),
        ExtensionResponse(status=ExtensionStatus(code=-(2**31), message="\u00e9", uuid=-1)),
        ExtensionResponse(response=[{"a": "b"}]),
    ],
    ids=repr,
)
@pytest.mark.parametrize("seqid", [0, 1, -1, 2**31 - 1, -(2**31)])
def test_reply_leaves_out_what_is_none_as_the_generated_code_does(
    reply: Optional[ExtensionResponse], seqid: int
) -> None:
    assert wire.call_reply(seqid, reply).data() == generated_call_reply(seqid, reply)


def test_undecodable_text_is_escaped_where_the_generated_code_refuses() -> None:
    rows = [{"name": "bad \udcff byte", "k\udcfe": "v"}]
    with pytest.raises(UnicodeEncodeError):
        generated_call_reply(1, response(rows, message="m \udcc0"))
    escaped = [{utf8_safe(k): utf8_safe(v) for k, v in row.items()} for row in rows]
    assert wire.call_reply(1, response(rows, message="m \udcc0")).data() == generated_call_reply(
        1, response(escaped, message=utf8_safe("m \udcc0"))
    )
    assert read_reply(wire.call_reply(1, response(rows)).data())[3].response == [  # type: ignore[union-attr]
        {"name": "bad \\xff byte", "k\\xfe": "v"}
    ]


@pytest.mark.parametrize(
    "bad",
    [
        response([{"pid": 1}]),
        response([{1: "pid"}]),
        response([["not", "a", "map"]]),
        response([], code=2**31),
        response([], message=b"bytes"),  # type: ignore[arg-type]
    ],
    ids=["int value", "int key", "list row", "code out of range", "bytes message"],
)
def test_what_cannot_be_encoded_raises_before_anything_is_written(bad: ExtensionResponse) -> None:
    with pytest.raises((TypeError, AttributeError, struct.error)):
        wire.call_reply(3, bad)


# -- rows from records --------------------------------------------------------------------------


class Family(enum.IntEnum):
    INET = 2


def records() -> List[Connection]:
    """Records with every kind of value a column can hold, hostile text included."""
    plain = Connection(
        pid=4242,
        name="curl",
        path="/usr/bin/curl",
        cmdline="curl https://example.org/",
        uid=1000,
        username="alice",
        parent=1,
        process_start_time=1764400000,
        process_uuid="0f" * 16,
        net_namespace=4026531840,
        fd=3,
        socket=123456,
        family=10,
        protocol=6,
        state="ESTABLISHED",
        local_address="2001:db8::2",
        local_port=40000,
        remote_address="2606:4700::1111",
        remote_port=443,
        external=True,
        expanded_address="2606:4700:0000:0000:0000:0000:0000:1111",
        address_int=str(0x26064700000000000000000000001111),
        address_class="global",
        via="nat64",
        embedded_ipv4="1.1.1.1",
        allowlisted=True,
        allow_rule="cdn",
    )
    out = [plain, Connection()]  # the second: defaults, None where a column may be empty
    for i, text in enumerate([*HOSTILE, "undecodable \udcff\udcfe", "\ud83d\ude00 pair"]):
        out.append(Connection(pid=i, name=text, cmdline=text * 2, path=text[:50], uid=i))
    out.append(Connection(pid=-1, family=Family.INET))  # an IntEnum: cell() prints it
    return out


def old_rows(connections: Sequence[Connection]) -> Rows:
    return [table.string_row(c.as_dict(), LIVE) for c in connections]


def test_record_rows_are_string_rows() -> None:
    connections = records()
    encoder = wire.RowEncoder(LIVE)
    new = encoder.encode_records(connections)
    assert list(new) == old_rows(connections)
    expected = generated_call_reply(9, response(old_rows(connections)))
    assert wire.call_reply(9, response(new)).data() == expected
    assert wire.call_reply(9, response(encoder.encode_records(connections, True))).data() == (
        expected
    )


def test_remembered_rows_are_reused_and_replaced() -> None:
    connections = records()[:-1]  # not the IntEnum one, which is never kept
    encoder = wire.RowEncoder(LIVE)
    first = encoder.encode_records(connections, remember=True)
    again = encoder.encode_records([Connection(**vars(c)) for c in connections], remember=True)
    assert all(a is b for a, b in zip(first.chunks, again.chunks))  # the kept bytes themselves
    assert encoder.kept_rows == len(connections)
    encoder.encode_records(connections[:3], remember=True)  # every row kept, but fewer rows
    assert encoder.kept_rows == 3
    changed = Connection(**vars(connections[0]))
    changed.state = "CLOSE_WAIT"
    third = encoder.encode_records([changed], remember=True)
    assert third[0]["state"] == "CLOSE_WAIT" and third.chunks[0] is not first.chunks[0]
    assert encoder.kept_rows == 1  # exactly the last remembered answer
    narrowed = encoder.encode_records(connections[:2])  # not remembered: reads, keeps as it was
    assert list(narrowed) == old_rows(connections[:2]) and encoder.kept_rows == 1


def test_equal_values_of_other_types_are_not_mistaken_for_kept_ones() -> None:
    encoder = wire.RowEncoder(["v", "w"])
    encoder.encode_values([(1, 0), (True, False)], remember=True)
    rows = encoder.encode_values([(1.0, 0.0), (True, 0), (1, False), (Family.INET, 2)])
    assert list(rows) == [
        {"v": "1.0", "w": "0.0"},
        {"v": "1", "w": "0"},
        {"v": "1", "w": "0"},
        {"v": table.cell(Family.INET), "w": "2"},
    ]


def test_rows_with_floats_or_other_types_are_never_taken_from_the_kept_ones() -> None:
    encoder = wire.RowEncoder(["v"])
    encoder.encode_values([(0.0,), (Family.INET,)], remember=True)
    assert encoder.kept_rows == 0
    assert list(encoder.encode_values([(-0.0,), (Family.INET,)], remember=True)) == [
        {"v": "-0.0"},
        {"v": table.cell(Family.INET)},
    ]


def test_mapping_rows_fill_missing_columns_with_empty_strings() -> None:
    encoder = wire.RowEncoder(["first_seen", "name", "gone", "ratio", "flag"])
    source: List[Mapping[str, table.Cell]] = [
        {"first_seen": 1700000000, "name": "nginx", "ratio": 0.25, "flag": True},
        {"name": None, "extra": "ignored"},
        {},
    ]
    assert list(encoder.encode_mappings(source)) == [
        table.string_row(row, encoder.columns) for row in source
    ]


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        wire.RowEncoder(["a", "b", "c"]).encode_values([("x", "y")])


def test_no_columns_and_one_column() -> None:
    assert list(wire.RowEncoder([]).encode_values([(), ()])) == [{}, {}]
    single = wire.RowEncoder(["pid"]).encode_records([Connection(pid=5)])
    assert list(single) == [{"pid": "5"}]


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(), max_size=40),  # surrogates and NUL included
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.lists(VALUES, min_size=4, max_size=4).map(tuple), max_size=6))
def test_any_values_encode_as_cell_does(rows: List[Tuple[table.Cell, ...]]) -> None:
    columns = ["a", "b\u00e9", "", "d\x00"]
    encoder = wire.RowEncoder(columns)
    expected = [table.string_row(dict(zip(columns, row)), columns) for row in rows]
    for remember in (True, True, False):
        new = encoder.encode_values(rows, remember=remember)
        assert list(new) == expected
        reference = generated_call_reply(5, response(expected))
        assert wire.call_reply(5, response(new)).data() == reference


# -- EncodedRows ---------------------------------------------------------------------------------


def test_encoded_rows_read_like_the_list_they_stand_for() -> None:
    rows = [{"a": "1"}, {"a": "2", "b": ""}, {}]
    encoded = wire.encode_rows(rows)
    assert len(encoded) == 3 and encoded[1] == rows[1] and encoded[-1] == {}
    assert encoded[1:] == rows[1:] and list(encoded) == rows
    assert encoded == rows and rows == encoded and encoded != rows[:2] and encoded != "abc"
    assert wire.encode_rows(encoded) is encoded
    assert "3 rows" in repr(encoded)
    assert wire.EncodedRows([]) == []


# -- writing to a transport ----------------------------------------------------------------------


class Recording:
    """A transport that records what it is given and when it is flushed."""

    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.flushes = 0
        self.data = b""

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def flush(self) -> None:
        self.flushes += 1
        self.data += b"".join(self.written)
        self.written = []


def test_a_big_reply_is_written_in_batches_with_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [{"n": str(i), "pad": "p" * 100} for i in range(500)]
    monkeypatch.setattr(wire, "WRITE_BATCH_BYTES", 4096)
    transport = Recording()
    wire.call_reply(11, response(rows)).write(transport)
    assert transport.data == generated_call_reply(11, response(rows)) and not transport.written
    assert transport.flushes == len(transport.data) // 4096 + 1


# -- the processor that writes it, over a real Unix socket ---------------------------------------


class _Tables:
    """The table dispatch the handler calls: rows chosen by the test (the real tables are
    tested through the stand-in core in test_extension.py)."""

    def __init__(self) -> None:
        self.answers: Dict[str, Any] = {}

    def call(self, name: str, request: Mapping[str, str]) -> Any:
        from agent.osquery.table import TableResult

        return TableResult(0, "OK", self.answers[name])


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Tuple[_Tables, Any]]:
    tables = _Tables()
    stopper = Stopper()
    processor = CallProcessor(ExtensionHandler(tables, stopper, verbose=False))  # type: ignore[arg-type]
    server = ThreadedUnixServer(str(tmp_path / "ext.sock"), processor)
    server.listen()
    thread = threading.Thread(target=server.serve, args=(stopper.event,), daemon=True)
    thread.start()
    client_socket = TSocket.TSocket(unix_socket=server.path)
    client_socket.setTimeout(30_000)
    transport = TTransport.TBufferedTransport(client_socket)
    transport.open()
    client = Extension.Client(TBinaryProtocol.TBinaryProtocol(transport))
    try:
        yield tables, client
    finally:
        transport.close()
        stopper.request("test over")
        thread.join(5)
        server.close()


def test_the_processor_answers_calls_with_the_fast_writer(served: Tuple[_Tables, Any]) -> None:
    tables, client = served
    encoder = wire.RowEncoder(LIVE)
    connections = records() * 200
    tables.answers["external_connections"] = encoder.encode_records(connections)
    tables.answers["plain"] = [{"a": "b"}]
    reply = client.call("table", "external_connections", {"action": "generate"})
    assert reply.status.code == 0 and reply.response == old_rows(connections)
    assert client.call("table", "plain", {}).response == [{"a": "b"}]
    assert client.ping().code == 0


def test_a_response_that_cannot_be_encoded_fails_that_call_only(
    served: Tuple[_Tables, Any],
) -> None:
    tables, client = served
    tables.answers["bad"] = [{"pid": 1}]
    reply = client.call("table", "bad", {"action": "generate"})
    assert reply.status.code == 1 and "cannot encode the response" in reply.status.message
    assert reply.response == []
    tables.answers["good"] = [{"pid": "1"}]
    assert client.call("table", "good", {}).response == [{"pid": "1"}]  # same connection


def test_a_handler_that_raises_gets_the_generated_exception_reply(tmp_path: Any) -> None:
    class Broken:
        def call(self, *args: Any) -> Any:
            raise RuntimeError("bug")

    a, b = socket.socketpair()
    try:
        request = TTransport.TMemoryBuffer()
        protocol = TBinaryProtocol.TBinaryProtocol(request)
        protocol.writeMessageBegin("call", TMessageType.CALL, 4)
        Extension.call_args(registry="table", item="x", request={}).write(protocol)
        protocol.writeMessageEnd()
        a.sendall(request.getvalue())
        server_side = TSocket.TSocket()
        server_side.setHandle(b)
        transport = TTransport.TBufferedTransport(server_side)
        wire_protocol = TBinaryProtocol.TBinaryProtocol(transport)
        CallProcessor(Broken()).process(wire_protocol, wire_protocol)  # type: ignore[arg-type]
        a.settimeout(10)
        answer = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(a.recv(1 << 16)))
        assert answer.readMessageBegin() == ("call", TMessageType.EXCEPTION, 4)
        error = TApplicationException()
        error.read(answer)
        assert error.type == TApplicationException.INTERNAL_ERROR
    finally:
        a.close()
        b.close()


def test_every_byte_is_checked_on_real_sized_answers() -> None:
    """1,840 rows of 30 columns, as issue 16 measures them: the same bytes, cold and warm."""
    connections = list(itertools.islice(itertools.cycle(records()[:2]), 1840))
    for i, connection in enumerate(connections):
        connection.local_port = i
    expected = generated_call_reply(1, response(old_rows(connections)))
    encoder = wire.RowEncoder(LIVE)
    for _ in range(2):
        rows = encoder.encode_records(connections, remember=True)
        assert wire.call_reply(1, response(rows)).data() == expected


PROBE = """
import errno, os, select, socket, sys
path = sys.argv[1]
os.write(1, b"READY\\n")
while not select.select([sys.stdin], [], [], 0)[0]:  # until stdin closes
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        os.write(1, b"a")
    except OSError as error:
        if error.errno == errno.ECONNREFUSED:
            os.write(1, b"r")
    finally:
        probe.close()
"""


def test_the_socket_file_never_exists_without_a_listener(tmp_path: Any) -> None:
    """Core's watcher takes an existing socket file for a live extension and drops us after one
    refused ping: a prober connecting all the time while the server starts and stops (300
    times, and until the prober got through 20 times) is never refused (the file appears
    listening, and goes before the listener)."""
    path = str(tmp_path / "osquery.em.1234")
    prober = subprocess.Popen(
        [sys.executable, "-c", PROBE, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    outcomes = bytearray()
    try:
        assert prober.stdout is not None and prober.stdin is not None
        assert prober.stdout.readline() == b"READY\n"
        fd = prober.stdout.fileno()
        os.set_blocking(fd, False)
        processor = CallProcessor(ExtensionHandler(_Tables(), Stopper(), verbose=False))  # type: ignore[arg-type]
        cycles, deadline = 0, time.monotonic() + 120
        while (cycles < 300 or outcomes.count(b"a") < 20) and time.monotonic() < deadline:
            server = ThreadedUnixServer(path, processor)
            server.listen()
            server.close()
            cycles += 1
            with contextlib.suppress(BlockingIOError):
                outcomes += os.read(fd, 65536)
        prober.stdin.close()
        os.set_blocking(fd, True)
        outcomes += prober.stdout.read()
    finally:
        prober.kill()
        prober.wait(10)
    accepted, refused = outcomes.count(b"a"), outcomes.count(b"r")
    assert accepted >= 20, f"the prober got through {accepted} times: the test means nothing"
    assert refused == 0, f"{refused} connects refused by a socket file without a listener"
    assert not os.path.exists(path) and os.listdir(tmp_path) == []
