"""Rendering: every format with ordinary and hostile records, escaping, cutting, ECS placement."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ecs import ecs_document
from agent.records import COLUMN_NAMES, Connection, Value
from agent.render import FORMATS, TABLE_CELL_LIMIT, TABLE_COLUMNS, csv_cell, render, table_view
from agent.textsafe import ELLIPSIS, cell_text, display_width, safe_text, utf8_safe

# Undecodable bytes in a process name or path arrive as surrogateescape text (PEP 383).
UNDECODABLE = os.fsdecode(b"bad\xff\xfebytes")
HOSTILE: Dict[str, str] = {
    "newline": "innocent\nroot      1  fake line",
    "carriage return": "over\rwrite",
    "ansi": "\x1b[2J\x1b[31mred\x1b]0;title\x07",
    "c1 csi": "c1\x9b31m",
    "nul and del": "a\x00b\x7f",
    "tab": "a\tb",
    "bidi override": "evil\u202egnp.exe",
    "line separator": "a\u2028b\u2029c",
    "undecodable": UNDECODABLE,
    "lone surrogate": "x\ud800y",
    "backslash forgery": "looks\\nescaped\\x1b",
    "huge": "A" * 100_000,
    "huge hostile": "\x1b[31m\n" * 20_000,
}

CURL = Connection(
    pid=4242,
    name="curl",
    path="/usr/bin/curl",
    cmdline="curl -s https://example.test/",
    uid=1000,
    username="alice",
    parent=4000,
    process_start_time=1_700_000_000,
    process_uuid="7c1e6f0a-boot-4242",
    net_namespace=4026531840,
    fd=5,
    socket=123456,
    family=10,
    protocol=6,
    state="ESTABLISHED",
    local_address="2001:db8::10",
    local_port=51000,
    remote_address="2001:db8:100::7",
    remote_port=443,
    direction="outbound",
    external=True,
    expanded_address="2001:0db8:0100:0000:0000:0000:0000:0007",
    address_int="42540766411283223938465490629124161543",
    address_class="global",
)


def record(**changes: Value) -> Dict[str, Value]:
    return {**CURL.as_dict(), **changes}


def hostile_records() -> List[Dict[str, Value]]:
    return [
        record(name=text, path=text, cmdline=text, username=text, systemd_unit=text)
        for text in HOSTILE.values()
    ]


def unescape(text: str) -> str:
    """The inverse of cell_text: proves that no two inputs share an output."""
    out, i = [], 0
    named = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
    while i < len(text):
        if text[i] != "\\":
            out.append(text[i])
            i += 1
            continue
        kind = text[i + 1]
        if kind in named:
            out.append(named[kind])
            i += 2
            continue
        digits = {"x": 2, "u": 4, "U": 8}[kind]
        code = int(text[i + 2 : i + 2 + digits], 16)
        out.append(chr(code + 0xDC00 if kind == "x" and code >= 0x80 else code))
        i += 2 + digits
    return "".join(out)


any_text = st.text(st.characters(blacklist_categories=()), max_size=300)


# --- safe_text and cell_text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("curl", "curl"),
        ("café 日本", "café 日本"),
        ("a\nb", "a\\nb"),
        ("\x1b[31m", "\\x1b[31m"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x9b", "\\u009b"),
        ("\u00a0", "\\u00a0"),
        ("\u202e", "\\u202e"),
        ("\u2028", "\\u2028"),
        ("\U000e0001", "\\U000e0001"),
        (UNDECODABLE, "bad\\xff\\xfebytes"),
        ("\ud800", "\\ud800"),
        (42, "42"),
    ],
)
def test_safe_text(text: Any, shown: str) -> None:
    assert safe_text(text) == shown
    assert cell_text(text) == shown


def test_safe_text_leaves_backslashes_and_cell_text_doubles_them() -> None:
    assert safe_text("got 'a\\nb'") == "got 'a\\nb'"
    assert cell_text("a\\nb") == "a\\\\nb"
    assert cell_text("a\nb") == "a\\nb"
    assert cell_text("C:\\x", 3) == "C:" + ELLIPSIS


@settings(max_examples=500, deadline=None)
@given(any_text)
def test_cell_text_is_printable_and_reversible(text: str) -> None:
    shown = cell_text(text)
    assert shown.isprintable()
    assert unescape(shown) == text
    assert safe_text(text).isprintable()


@settings(max_examples=500, deadline=None)
@given(any_text, st.integers(1, 80))
def test_a_limit_is_kept(text: str, limit: int) -> None:
    shown = cell_text(text, limit)
    assert shown.isprintable()
    assert display_width(shown) <= limit
    if shown.endswith(ELLIPSIS) and not text.endswith(ELLIPSIS):
        assert unescape(shown[:-1]) == text[: len(unescape(shown[:-1]))]
    else:
        assert shown == cell_text(text)
    assert display_width(safe_text(text, limit)) <= limit


def test_safe_text_cuts_a_huge_text_by_display_width() -> None:
    assert safe_text("x" * 100_000, 10) == "x" * 9 + ELLIPSIS
    assert safe_text("日本語" * 10, 10) == "日本語日" + ELLIPSIS
    assert safe_text("\n" * 10, 10) == "\\n" * 4 + ELLIPSIS
    assert safe_text("abc", 3) == "abc"
    assert safe_text("e\u0301" * 1000, 10).endswith(ELLIPSIS)
    with pytest.raises(ValueError, match="at least 1"):
        safe_text("abc", 0)


def test_json_safe() -> None:
    assert utf8_safe("plain \n\x1b") == "plain \n\x1b"
    assert utf8_safe(UNDECODABLE) == "bad\\xff\\xfebytes"
    assert utf8_safe("x\ud800") == "x\\ud800"


# --- table ----------------------------------------------------------------------------------


def test_table_layout() -> None:
    records: List[Dict[str, Value]] = [
        {"pid": 7, "name": "sshd", "allowlisted": True, "via": None},
        {"pid": 12345, "name": "日本", "allowlisted": False, "via": "nat64"},
    ]
    assert render(records, None, "table") == (
        "  pid  name  allowlisted  via\n"
        "    7  sshd  yes          -\n"
        "12345  日本  no           nat64\n"
    )


def test_table_columns_are_chosen_and_ordered() -> None:
    text = render([record()], ["remote_port", "name"], "table")
    assert text == "remote_port  name\n        443  curl\n"


def test_table_of_connections_uses_the_default_columns() -> None:
    assert set(TABLE_COLUMNS) - {"namespace"} <= set(COLUMN_NAMES)  # namespace: table_view's
    header = render([record()], TABLE_COLUMNS, "table").splitlines()[0]
    assert header.split() == list(TABLE_COLUMNS)


def test_the_table_view_names_protocols_and_places() -> None:
    rows = table_view(
        [
            record(protocol=6, net_namespace=1, container_id=""),
            record(protocol=17, net_namespace=2, container_id=""),
            record(protocol=6, net_namespace=3, container_id=""),
            record(protocol=6, net_namespace=3, container_id="3f4a9c2b1d0e" + "0" * 52),
        ],
        names={2: "eat-cli"},
        host=1,
    )
    assert [(r["protocol"], r["namespace"]) for r in rows] == [
        ("tcp", ""),
        ("udp", "eat-cli"),
        ("tcp", "net:[3]"),
        ("tcp", "container 3f4a9c2b1d0e"),
    ]


def test_table_of_nothing_is_empty() -> None:
    assert render([], TABLE_COLUMNS, "table") == ""


def test_table_with_hostile_values() -> None:
    records = hostile_records()
    text = render(records, ["pid", "name", "cmdline", "remote_port"], "table")
    lines = text.split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == len(records) + 1  # the header and one line a record
    for line in lines[:-1]:
        assert line.isprintable(), repr(line)
        assert display_width(line) <= 4 + 2 + 3 * (TABLE_CELL_LIMIT + 2)
    widths = {display_width(line) for line in lines[:-1]}
    assert len(widths) == 1  # aligned: every line ends with the same right-aligned port column
    assert "\\x1b[31m" in text and "\\xff\\xfe" in text and "\\u202e" in text
    assert "looks\\\\nescaped" in text
    assert ELLIPSIS in text


def test_table_cell_limit_can_be_set() -> None:
    text = render([{"c": "x" * 50}], None, "table", cell_limit=8)
    assert text == "c\n" + "x" * 7 + ELLIPSIS + "\n"


# --- json and jsonl -------------------------------------------------------------------------


def test_json_is_one_array_of_records() -> None:
    text = render([record(), record(pid=1)], None, "json")
    parsed = json.loads(text)
    assert parsed == [record(), record(pid=1)]
    assert list(parsed[0]) == COLUMN_NAMES
    assert render([], None, "json") == "[]\n"


def test_json_columns() -> None:
    assert json.loads(render([record()], ["pid", "missing"], "json")) == [
        {"pid": 4242, "missing": None}
    ]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_with_hostile_values_is_lossless(fmt: str) -> None:
    records = hostile_records()
    text = render(records, None, fmt)
    assert text.isascii()
    text.encode("utf-8")
    if fmt == "json":
        parsed = json.loads(text)
    else:
        lines = text.splitlines()
        assert len(lines) == len(records)
        parsed = [json.loads(line) for line in lines]
    for original, back in zip(records, parsed):
        expected = utf8_safe(str(original["name"]))
        assert back["name"] == expected
        assert back["cmdline"] == expected
    assert parsed[list(HOSTILE).index("huge")]["cmdline"] == "A" * 100_000
    assert parsed[list(HOSTILE).index("newline")]["name"] == HOSTILE["newline"]
    assert parsed[list(HOSTILE).index("undecodable")]["name"] == "bad\\xff\\xfebytes"


def read_csv(text: str) -> List[List[str]]:
    """Parse CSV allowing fields of any size (Python's csv stops at 128 KiB by default)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(len(text) + 1)
    try:
        return list(csv.reader(io.StringIO(text)))
    finally:
        csv.field_size_limit(limit)


# --- csv ------------------------------------------------------------------------------------


def test_csv_round_trips() -> None:
    text = render([record(), record(via=None, allowlisted=True)], None, "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == COLUMN_NAMES
    assert dict(zip(rows[0], rows[1]))["pid"] == "4242"
    assert dict(zip(rows[0], rows[1]))["external"] == "true"
    assert dict(zip(rows[0], rows[2]))["allowlisted"] == "true"
    assert dict(zip(rows[0], rows[2]))["via"] == ""


def test_csv_with_hostile_values_is_one_line_a_record() -> None:
    records = hostile_records()
    text = render(records, ["pid", "name", "cmdline"], "csv")
    lines = text.split("\n")
    assert len(lines) - 1 == len(records) + 1
    assert all(line.isprintable() for line in lines)
    rows = read_csv(text)
    assert rows[0] == ["pid", "name", "cmdline"]
    for original, row in zip(records, rows[1:]):
        assert row == ["4242", cell_text(original["name"]), cell_text(original["cmdline"])]
        assert unescape(row[1]) == original["name"]
    assert rows[1 + list(HOSTILE).index("huge")][2] == "A" * 100_000


def test_csv_of_nothing() -> None:
    assert render([], ["pid", "name"], "csv") == "pid,name\n"
    assert render([], None, "csv") == ""


def test_csv_quotes_commas_and_quotes() -> None:
    text = render([{"cmdline": 'sh -c "a, b"'}], None, "csv")
    assert text == 'cmdline\n"sh -c ""a, b"""\n'


# --- ecs ------------------------------------------------------------------------------------


def test_ecs_outbound() -> None:
    (line,) = render([record()], None, "ecs", now=1_700_000_100.25).splitlines()
    document = json.loads(line)
    assert document["@timestamp"] == "2023-11-14T22:15:00.250Z"
    assert document["ecs"] == {"version": "8.11.0"}
    assert document["event"] == {
        "kind": "event",
        "category": ["network"],
        "type": ["connection"],
        "module": "egress_agent",
        "dataset": "egress_agent.connection",
    }
    assert document["process"] == {
        "pid": 4242,
        "name": "curl",
        "executable": "/usr/bin/curl",
        "command_line": "curl -s https://example.test/",
        "args": ["curl", "-s", "https://example.test/"],
        "args_count": 3,
        "parent": {"pid": 4000},
        "start": "2023-11-14T22:13:20.000Z",
        "entity_id": "7c1e6f0a-boot-4242",
    }
    assert document["user"] == {"name": "alice", "id": "1000"}
    assert document["source"] == {"address": "2001:db8::10", "ip": "2001:db8::10", "port": 51000}
    assert document["destination"] == {
        "address": "2001:db8:100::7",
        "ip": "2001:db8:100::7",
        "port": 443,
    }
    assert document["network"] == {
        "transport": "tcp",
        "iana_number": "6",
        "type": "ipv6",
        "direction": "egress",
    }
    assert document["related"] == {"ip": ["2001:db8:100::7", "2001:db8::10"]}
    assert "container" not in document
    assert document["egress_agent"] == {
        "net_namespace": 4026531840,
        "fd": 5,
        "socket": 123456,
        "state": "ESTABLISHED",
        "direction": "outbound",
        "external": True,
        "expanded_address": "2001:0db8:0100:0000:0000:0000:0000:0007",
        "address_int": "42540766411283223938465490629124161543",
        "address_class": "global",
        "allowlisted": False,
    }


def test_ecs_inbound_puts_the_remote_end_in_source() -> None:
    document = ecs_document(
        record(
            direction="inbound",
            family=2,
            protocol=17,
            local_address="192.0.2.10",
            local_port=53,
            remote_address="198.51.100.7",
            remote_port=40000,
            container_id="3f4a9c2b1d0e",
        ),
        0,
    )
    assert document["source"] == {"address": "198.51.100.7", "ip": "198.51.100.7", "port": 40000}
    assert document["destination"] == {"address": "192.0.2.10", "ip": "192.0.2.10", "port": 53}
    assert document["network"] == {
        "transport": "udp",
        "iana_number": "17",
        "type": "ipv4",
        "direction": "ingress",
    }
    assert document["container"] == {"id": "3f4a9c2b1d0e"}


def test_ecs_ipv4_mapped_and_zones() -> None:
    document = ecs_document(
        record(family=10, remote_address="::ffff:192.0.2.7", local_address="fe80::1%eth0"), 0
    )
    assert document["network"]["type"] == "ipv4"
    assert document["destination"]["ip"] == "::ffff:192.0.2.7"
    assert document["source"] == {"address": "fe80::1%eth0", "ip": "fe80::1", "port": 51000}


def test_ecs_ownerless_row_has_no_process() -> None:
    document = ecs_document(Connection(remote_address="192.0.2.9", remote_port=443).as_dict(), 0)
    assert "process" not in document and "user" not in document
    assert document["destination"] == {"address": "192.0.2.9", "ip": "192.0.2.9", "port": 443}


def test_ecs_history_rows_are_stamped_with_last_seen() -> None:
    document = ecs_document(record(first_seen=100, last_seen=200, samples=3), 999)
    assert document["@timestamp"] == "1970-01-01T00:03:20.000Z"
    assert document["egress_agent"]["first_seen"] == 100
    assert document["egress_agent"]["samples"] == 3


def test_ecs_with_hostile_values() -> None:
    records = hostile_records()
    text = render(records, None, "ecs", now=0)
    assert text.isascii()
    lines = text.splitlines()
    assert len(lines) == len(records)
    for original, line in zip(records, lines):
        document = json.loads(line)
        assert document["process"]["name"] == utf8_safe(str(original["name"]))
        assert document["egress_agent"]["systemd_unit"] == utf8_safe(str(original["name"]))


# --- all formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_ends_in_a_newline_and_encodes(fmt: str) -> None:
    text = render(hostile_records(), None, fmt, now=0)
    assert text.endswith("\n")
    text.encode("utf-8")


def test_any_records_not_only_connections() -> None:
    verdicts = [{"address": "192.0.2.1", "external": False, "via": None}]
    assert json.loads(render(verdicts, None, "json")) == verdicts
    assert render(verdicts, None, "csv") == "address,external,via\n192.0.2.1,false,\n"


def test_an_unknown_format() -> None:
    with pytest.raises(ValueError, match=r"unknown output format 'xml' \(known: table, json"):
        render([], None, "xml")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"name": any_text, "pid": st.integers()}), max_size=5))
def test_any_text_in_every_format(records: List[Dict[str, Value]]) -> None:
    table = render(records, None, "table")
    assert all(line.isprintable() for line in table.split("\n"))
    assert table.count("\n") == (len(records) + 1 if records else 0)
    assert [row[0] for row in read_csv(render(records, ["name", "pid"], "csv"))][1:] == [
        csv_cell(cell_text(r["name"])) for r in records
    ]
    assert [r["name"] for r in json.loads(render(records, None, "json"))] == [
        utf8_safe(str(r["name"])) for r in records
    ]
    for line in render(records, None, "jsonl").splitlines():
        json.loads(line)
