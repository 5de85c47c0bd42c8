"""Fuzzing what the existing tests leave out (issue 7): every input works or gets one clear
line naming the problem; no other exception escapes.

Already fuzzed elsewhere (see docs/RELIABILITY.md): random text and bytes objects against the
address parser and random valid addresses against ``ipaddress`` (tests/test_classify.py),
random text and garbage lines through the socket-table parser (tests/test_procnet.py), random
YAML text and structures through the configuration (tests/test_config.py), hostile values in
every output format (tests/test_output.py).  Here: bytes as they arrive from a file, a pipe or
/proc (decoded with surrogateescape or Latin-1), kernel integers out of range, socket-table
rows with extra, missing, repeated or differently spaced columns, the other /proc files the
sampler parses, and the command line fed undecodable bytes under a strict UTF-8 locale.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import cli
from agent.cgroups import placement
from agent.classify import MAX_ADDRESS_LENGTH, AddressError, Classifier
from agent.collect.netns import parse_namespace_link
from agent.collect.sockets.procnet import (
    SOCKET_TABLES,
    TCP4,
    TCP6,
    ListenerIndex,
    SocketTable,
    encode_address,
    parse_line,
    parse_snmp,
    scan_socket_table,
)

CLASSIFIER = Classifier()


def assert_one_clear_line(message: str) -> None:
    assert message and "\n" not in message and message.isprintable(), repr(message)
    assert len(message) <= 1200, len(message)  # bounded whatever the input's size


# --- the address parser: bytes as they arrive ----------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=80), st.sampled_from(["surrogateescape", "latin-1"]))
def test_any_bytes_decoded_are_a_verdict_or_one_clear_line(raw: bytes, decoding: str) -> None:
    text = os.fsdecode(raw) if decoding == "surrogateescape" else raw.decode("latin-1")
    try:
        verdict = CLASSIFIER.classify(text)
    except AddressError as error:
        assert_one_clear_line(str(error))
    else:
        assert verdict.normalized.isprintable() and verdict.normalized.isascii()


@given(st.text(min_size=MAX_ADDRESS_LENGTH + 1, max_size=MAX_ADDRESS_LENGTH + 50))
def test_a_text_longer_than_any_address_is_refused_in_bounds(text: str) -> None:
    with pytest.raises(AddressError, match="longer than any address") as caught:
        CLASSIFIER.classify(text)
    assert_one_clear_line(str(caught.value))


def test_a_100_kb_address_gets_a_short_message() -> None:
    for text in ("1" * 100_000, "fe80::1%" + "x" * 100_000, "\n" * 100_000):
        with pytest.raises(AddressError) as caught:
            CLASSIFIER.classify(text)
        assert_one_clear_line(str(caught.value))
        assert "100008 characters" in str(caught.value) or "100000 characters" in str(caught.value)


@settings(max_examples=500)
@given(st.integers(-(2**130), 2**130), st.integers(-2, 12))
def test_any_kernel_integer_is_a_verdict_or_one_clear_line(value: int, version: int) -> None:
    for call in (CLASSIFIER.classify_int, CLASSIFIER.judge):
        try:
            call(value, version)
        except AddressError as error:
            assert_one_clear_line(str(error))


# --- /proc/net rows: columns the parser did not expect -------------------------------------

addresses = {4: st.integers(0, 2**32 - 1), 6: st.integers(0, 2**128 - 1)}


@st.composite
def rows(draw: st.DrawFn, table: SocketTable) -> List[str]:
    """The columns of one well-formed row of ``table`` (as the kernel prints them)."""
    version = table.version
    local = f"{encode_address(draw(addresses[version]), version)}:{draw(st.integers(0, 65535)):04X}"
    remote = (
        f"{encode_address(draw(addresses[version]), version)}:{draw(st.integers(0, 65535)):04X}"
    )
    state = f"{draw(st.integers(0, 255)):02X}"
    uid = str(draw(st.integers(0, 2**32 - 1)))
    inode = str(draw(st.integers(0, 2**64)))
    return [
        f"{draw(st.integers(0, 99999))}:",
        local,
        remote,
        state,
        "00000000:00000000",
        "00:00000000",
        "00000000",
        uid,
        "0",
        inode,
        "1",
        "0000000000000000",
    ]


extra_columns = st.lists(
    st.text(st.characters(blacklist_categories=["Cs", "Zs", "Cc"]), min_size=1, max_size=12),
    max_size=6,
)


@settings(max_examples=300)
@given(st.data())
def test_extra_columns_and_other_spacing_change_nothing(data: st.DataObject) -> None:
    """A newer kernel may add columns at the end (udp has ``drops``, tcp has more); tabs,
    runs of spaces and a carriage return are still separators.  The row decodes the same."""
    table = data.draw(st.sampled_from(SOCKET_TABLES))
    columns = data.draw(rows(table))
    plain = parse_line("   " + " ".join(columns), table)
    assert plain is not None
    spacing = data.draw(st.sampled_from([" ", "  ", "\t", " \t "]))
    extra = data.draw(extra_columns)
    ending = data.draw(st.sampled_from(["", "\r", " ", "\t"]))
    line = spacing + spacing.join(columns + extra) + ending
    assert parse_line(line, table) == plain
    sockets, seen = scan_socket_table("header\n" + line + "\n", table, listeners=ListenerIndex())
    assert sockets == [plain] and seen == 1


@settings(max_examples=300)
@given(st.data())
def test_a_missing_or_mangled_column_never_raises(data: st.DataObject) -> None:
    table = data.draw(st.sampled_from(SOCKET_TABLES))
    columns = data.draw(rows(table))
    index = data.draw(st.integers(0, len(columns) - 1))
    action = data.draw(st.sampled_from(["drop", "empty", "garbage", "split", "cut"]))
    if action == "drop":
        del columns[index]
    elif action == "empty":
        columns[index] = ""
    elif action == "garbage":
        columns[index] = data.draw(st.text(max_size=20))
    elif action == "split":
        middle = len(columns[index]) // 2
        columns[index : index + 1] = [columns[index][:middle], columns[index][middle:]]
    else:
        columns = columns[:index]
    line = " ".join(columns)
    parse_line(line, table)
    sockets, _ = scan_socket_table(line, table, lambda _hex, _v: True, ListenerIndex())
    assert len(sockets) <= 1


def test_a_row_missing_everything_after_the_inode_still_decodes() -> None:
    line = (
        "   0: 0100007F:0CEA 09090909:01BB 01 00000000:00000000 00:00000000 00000000     0"
        "        0 4711"
    )
    sock = parse_line(line, TCP4)
    assert sock is not None and sock.inode == 4711 and sock.remote_port == 443


def test_a_row_the_kernel_printed_twice_is_kept_once() -> None:
    """seq_file pages resume at (bucket, offset): a socket opened meanwhile in that bucket
    repeats the row before it (tests/test_churn.py sees it live)."""
    row = (
        "   1: 60480120000060480000000002000000:9C40 60480120000060480000000088880000:0050 01"
        " 00000000:00000000 00:00000000 00000000   33        0 5151 1 0000000000000000 20 4 1 10 -1"
    )
    time_wait = (
        "   2: 60480120000060480000000002000000:9C41 60480120000060480000000088880000:0050 06"
        " 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000"
    )
    other_time_wait = time_wait.replace(":9C41", ":9C42", 1)
    text = "\n".join([row, time_wait, row, time_wait, other_time_wait])
    sockets, _ = scan_socket_table(text, TCP6)
    assert [(s.inode, s.local_port) for s in sockets] == [(5151, 0x9C40), (0, 0x9C41), (0, 0x9C42)]


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_bytes_in_a_socket_table_never_raise(raw: bytes) -> None:
    text = raw.decode("latin-1")  # how the tables are read
    for table in SOCKET_TABLES:
        scan_socket_table(text, table, lambda _hex, _v: True, ListenerIndex())
        scan_socket_table(text, table)


# --- the other files the sampler parses ----------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_snmp_cgroup_and_namespace_links_never_raise(raw: bytes) -> None:
    text = raw.decode("latin-1")
    assert all(isinstance(v, int) for v in parse_snmp(text).values())
    assert all(isinstance(v, int) for v in parse_snmp("Tcp: " + text + "\nTcp: 1 2").values())
    cgroup = os.fsdecode(raw)
    placement(cgroup)  # never raises, whatever the bytes
    for link in (text, f"net:[{text}]"):
        try:
            assert parse_namespace_link(link) > 0
        except ValueError as error:
            assert "not a net namespace link" in str(error) or "invalid literal" in str(error)


# --- the command line under a strict UTF-8 locale ------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_classify_reads_any_bytes_on_stdin(lines: List[bytes]) -> None:
    """``classify -`` with a strictly decoding stdin (as under ``en_US.UTF-8``): a verdict or
    one clear line per input line, exit 0 or 2, never a traceback."""
    raw = b"\n".join(line.replace(b"\n", b"") for line in lines) + b"\n"
    stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="strict")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    try:
        status = cli.main(["classify", "--format", "json", "-"])
        stdout.flush()
        stderr.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    assert status in (0, 2)
    messages = stderr.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
    for message in messages.split("\n")[:-1]:
        assert message.startswith("egress-agent classify: ")
        assert_one_clear_line(message)


@pytest.mark.parametrize("encoding", ["utf-8:strict", "ascii:strict", "latin-1:strict"])
def test_classify_in_a_narrow_locale_is_not_a_traceback(encoding: str) -> None:
    raw = b"1.2.3.4\n\xff\xfe\x1b[2J\n" + "2001:db8::1%\u00e9t\u00e9\n".encode() + b"::1\n"
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "classify", "-"],
        input=raw,
        capture_output=True,
        timeout=60,
        check=False,
        env=dict(os.environ, PYTHONIOENCODING=encoding),
    )
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert result.stdout.count(b"\n") == 3  # header, 1.2.3.4, ::1
    assert result.stderr.count(b"\n") == 2  # the two refusals
