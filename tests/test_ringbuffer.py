"""The ring buffer format: real pages captured from a kernel, and pages built byte by byte.

``tests/data/trace/`` holds pages, ``header_page``, ``header_event`` and event formats that
``tests/trace_capture.py`` read from Linux 6.18 (``meta.json`` says what its workload did), so
these tests decode real kernel output on any machine.  The synthetic pages cover every
``type_len`` case, the lost-event flags, and truncated or garbage pages, which must end a
parse, never raise.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect.kernel import reader, records
from agent.collect.kernel.reader import choose_events
from agent.collect.kernel.records import (
    ProcessExec,
    ProcessExit,
    ProcessFork,
    RouteLookup,
    TaskRename,
    TcpReset,
    TcpStateChange,
    decode_tcp_state,
)
from agent.collect.kernel.ringbuffer import (
    LOST_UNKNOWN,
    MISSED_EVENTS,
    MISSED_STORED,
    EventLayout,
    FormatError,
    PageLayout,
    PageParser,
    parse_event_format,
    parse_header_event,
    parse_header_page,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "trace")

with open(os.path.join(DATA, "meta.json")) as _handle:
    META = json.load(_handle)


def _read(name: str) -> str:
    with open(os.path.join(DATA, name)) as handle:
        return handle.read()


def captured_format(system: str, name: str) -> str:
    path = os.path.join(DATA, "formats", f"{system}:{name}")
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such event", path)
    return _read(os.path.join("formats", f"{system}:{name}"))


CHOSEN = choose_events(captured_format)
PARSER = PageParser(
    parse_header_page(_read("header_page")),
    parse_header_event(_read("header_event")),
    CHOSEN.type_field.offset,
    CHOSEN.type_field.size,
)


def captured_pages(name: str) -> List[bytes]:
    with open(os.path.join(DATA, name), "rb") as handle:
        data = handle.read()
    size = META["page_size"]
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


def decode_all(pages: Sequence[bytes]) -> Tuple[List[records.KernelEvent], List[object]]:
    events: List[records.KernelEvent] = []
    infos = []
    for page in pages:
        infos.append(PARSER.parse(page, CHOSEN.decoders, events))
    return events, infos


# ---------------------------------------------------------------------------------------------
# the kernel's descriptions


def test_header_page_and_header_event_as_this_kernel_prints_them() -> None:
    assert parse_header_page(_read("header_page")) == PageLayout(0, 8, 8, 8, 16)
    assert parse_header_event(_read("header_event")) == EventLayout()


def test_a_32_bit_kernel_header_page() -> None:
    text = (
        "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n"
        "\tfield: local_t commit;\toffset:8;\tsize:4;\tsigned:1;\n"
        "\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;\n"
        "\tfield: char data;\toffset:12;\tsize:4084;\tsigned:0;\n"
    )
    assert parse_header_page(text) == PageLayout(0, 8, 8, 4, 12)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n",
        "\tfield: u64 timestamp;\toffset:0;\tsize:4;\tsigned:0;\n"
        "\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;\n"
        "\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;\n",
    ],
)
def test_a_header_page_we_cannot_read_is_an_error(text: str) -> None:
    with pytest.raises(FormatError):
        parse_header_page(text)


def test_an_unknown_event_header_layout_is_refused() -> None:
    text = _read("header_event").replace("type == 29", "type == 27")
    with pytest.raises(FormatError):
        parse_header_event(text)


def test_event_formats_name_every_field() -> None:
    fmt = parse_event_format(captured_format("sock", "inet_sock_set_state"), "sock")
    assert (fmt.system, fmt.name) == ("sock", "inet_sock_set_state")
    protocol = fmt.require("protocol")
    assert (protocol.size, protocol.signed) == (2, False)  # u16 since Linux 5.6
    assert fmt.require("saddr_v6").is_array and fmt.require("saddr_v6").size == 16
    assert fmt.require("common_pid").signed
    exec_format = parse_event_format(captured_format("sched", "sched_process_exec"))
    assert exec_format.require("filename").location == "data_loc"
    with pytest.raises(FormatError):
        fmt.require("no_such_field")


@pytest.mark.parametrize("text", ["", "name: x\n", "name: x\nID: 3\nformat:\n"])
def test_a_format_without_name_id_or_fields_is_an_error(text: str) -> None:
    with pytest.raises(FormatError):
        parse_event_format(text)


OLD_TCP_FORMAT = """name: inet_sock_set_state
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 protocol;\toffset:30;\tsize:1;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:31;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:35;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:39;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:55;\tsize:16;\tsigned:0;
"""
"""The 4.18 layout (``protocol`` a u8, so every address one byte earlier than on 5.6+)."""


def test_the_older_u8_protocol_layout_decodes_from_its_own_offsets() -> None:
    fmt = parse_event_format(OLD_TCP_FORMAT, "sock")
    record = bytearray(72)
    struct.pack_into("<HBBiQii", record, 0, 1234, 0, 0, 4242, 0xFFFF8880DEAD0000, 7, 2)
    struct.pack_into("<HHHB", record, 24, 0, 443, 2, 6)
    record[31:35] = bytes([10, 0, 0, 2])
    record[35:39] = bytes([9, 9, 9, 9])
    event = decode_tcp_state(fmt)(bytes(record), 0, len(record), 5)
    assert isinstance(event, TcpStateChange)
    assert (event.pid, event.skaddr, event.oldstate, event.newstate) == (
        4242,
        0xFFFF8880DEAD0000,
        7,
        2,
    )
    assert (event.dport, event.family, event.protocol) == (443, 2, 6)
    assert (event.saddr, event.daddr) == (bytes([10, 0, 0, 2]), bytes([9, 9, 9, 9]))


def test_a_rel_loc_string_counts_from_the_end_of_its_field() -> None:
    text = (
        "name: sched_process_exec\nID: 9\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
        "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
        "\tfield:__rel_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n"
        "\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n"
        "\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;\n"
    )
    fmt = parse_event_format(text, "sched")
    name = b"/usr/bin/curl\0"
    record = struct.pack("<HBBiIii", 9, 0, 0, 77, (len(name) << 16) | (20 - 12), 77, 77) + name
    event = records.decode_exec(fmt)(record, 0, len(record), 1)
    assert event == ProcessExec(1, 77, 77, 77, "/usr/bin/curl")


# ---------------------------------------------------------------------------------------------
# real pages


def test_real_pages_decode_into_the_workload_the_capture_ran() -> None:
    events, infos = decode_all(captured_pages("pages.bin"))
    assert all(not info.malformed and info.lost == 0 for info in infos)
    pid = META["pid"]
    port = META["tcp_port"]
    mine = [e for e in events if isinstance(e, TcpStateChange) and e.pid == pid]
    transitions = [(e.oldstate, e.newstate, e.sport, e.dport) for e in mine]
    client = META["tcp_client_port"]
    assert (7, 10, port, 0) in transitions  # listen()
    assert (7, 2, 0, port) in transitions  # connect(): no local port yet
    assert (2, 1, client, port) in transitions  # established
    assert (10, 3, port, client) in transitions  # accepted, in softirq
    accepted = [e for e in mine if (e.oldstate, e.newstate) == (10, 3) and e.sport == port]
    assert accepted and accepted[0].flags & records.IN_INTERRUPT
    connect = next(e for e in mine if (e.oldstate, e.newstate, e.dport) == (7, 2, port))
    assert (connect.saddr, connect.daddr, connect.sport) == (b"\x7f\0\0\1", b"\x7f\0\0\1", 0)
    six = [e for e in mine if e.family == 10 and e.dport == META["tcp6_port"]]
    assert six and six[0].daddr == bytes(15) + b"\1"
    resets = [e for e in events if isinstance(e, TcpReset)]
    refused = [e for e in mine if (e.oldstate, e.newstate, e.dport) == (2, 7, META["refused_port"])]
    assert refused and refused[0].skaddr in {reset.skaddr for reset in resets}
    routes = [e for e in events if isinstance(e, RouteLookup) and e.pid == pid]
    assert {(e.version, e.protocol, e.iif, e.dport) for e in routes} == {
        (4, 17, 1, 9),
        (6, 17, 1, 9),
    }
    long_exec = [e for e in events if isinstance(e, ProcessExec) and e.tid == META["long_exec_pid"]]
    assert [e.filename for e in long_exec] == [META["long_exec"]]
    forks = {e.child: e for e in events if isinstance(e, ProcessFork)}
    assert forks[META["long_exec_pid"]].parent == pid
    assert forks[META["long_exec_pid"]].clone_flags is not None
    threads = [e for e in forks.values() if e.clone_flags and e.clone_flags & records.CLONE_THREAD]
    assert threads
    renames = [e for e in events if isinstance(e, TaskRename) and e.comm == "capture-thread"]
    assert renames and renames[0].tid == threads[0].child
    exits = {e.tid: e for e in events if isinstance(e, ProcessExit)}
    assert exits[META["long_exec_pid"]].group_dead is True
    assert exits[threads[0].child].group_dead is False
    assert any(isinstance(e, records.NamespaceSwitch) and e.syscall == "unshare" for e in events)


def _type_lens(page: bytes) -> List[int]:
    """The type_len of each record header on a (little-endian) page, walked independently."""
    (commit,) = struct.unpack_from("<Q", page, 8)
    end = 16 + (commit & ((1 << 27) - 1))
    position, found = 16, []
    while position + 4 <= end:
        (word,) = struct.unpack_from("<I", page, position)
        type_len, delta = word & 31, word >> 5
        found.append(type_len)
        if 1 <= type_len <= 28:
            position += 4 + type_len * 4
        elif type_len == 0:
            position += 4 + struct.unpack_from("<I", page, position + 4)[0]
        elif type_len in (30, 31):
            position += 8
        elif delta == 0:
            break
        else:
            position += 4 + struct.unpack_from("<I", page, position + 4)[0]
    return found


def test_the_real_pages_include_a_long_record() -> None:
    kinds = {kind for page in captured_pages("pages.bin") for kind in _type_lens(page)}
    assert 0 in kinds  # the exec of a 150-byte path
    assert kinds & set(range(1, 29))


def test_real_pages_of_one_cpu_are_in_time_order() -> None:
    for page in captured_pages("pages.bin"):
        events: List[records.KernelEvent] = []
        PARSER.parse(page, CHOSEN.decoders, events)
        times = [event.time for event in events]
        assert times == sorted(times)


def test_a_real_overrun_page_carries_the_kernels_lost_count() -> None:
    _, infos = decode_all(captured_pages("lost.bin"))
    overrun = sum(stats["overrun"] for stats in META["lost_stats"].values())
    assert overrun > 0
    assert sum(info.lost for info in infos if info.lost > 0) == overrun


def test_every_event_the_source_uses_is_in_the_captured_formats() -> None:
    assert CHOSEN.unavailable == {}
    assert len(CHOSEN.decoders) == len(CHOSEN.settings) == len(reader.EVENT_SPECS) - 1


# ---------------------------------------------------------------------------------------------
# synthetic pages

TYPE = 7


def record_decoder(page: bytes, offset: int, length: int, timestamp: int) -> Tuple[int, bytes]:
    return (timestamp, page[offset : offset + length])


DECODERS = {TYPE: record_decoder}


def header(type_len: int, delta: int, byteorder: str = "little") -> bytes:
    if byteorder == "little":
        return struct.pack("<I", (delta << 5) | type_len)
    return struct.pack(">I", (type_len << 27) | delta)


def data_record(payload: bytes, delta: int, byteorder: str = "little") -> bytes:
    """A data record: ``type_len`` words of payload when it fits 28 words, else type_len 0."""
    order = "<" if byteorder == "little" else ">"
    payload = payload + bytes(-len(payload) % 4)
    if len(payload) <= 28 * 4:
        return header(len(payload) // 4, delta, byteorder) + payload
    return header(0, delta, byteorder) + struct.pack(order + "I", len(payload) + 4) + payload


def payload(tag: int, size: int = 8) -> bytes:
    return struct.pack("<HH", TYPE, tag) + bytes(size - 4)


def page(
    body: bytes,
    timestamp: int = 1000,
    flags: int = 0,
    lost: Optional[int] = None,
    size: int = 4096,
    length: Optional[int] = None,
    byteorder: str = "little",
) -> bytes:
    order = "<" if byteorder == "little" else ">"
    commit = (len(body) if length is None else length) | flags
    data = struct.pack(order + "QQ", timestamp, commit) + body
    if lost is not None:
        data += struct.pack(order + "Q", lost)
    return data.ljust(size, b"\0")


def parse(raw: bytes, byteorder: str = "little") -> Tuple[List[Tuple[int, bytes]], object]:
    parser = PageParser(byteorder=byteorder)
    out: List[Tuple[int, bytes]] = []
    info = parser.parse(raw, DECODERS, out)
    return out, info


@pytest.mark.parametrize("words", list(range(1, 29)))
def test_every_small_type_len_is_a_record_of_that_many_words(words: int) -> None:
    body = data_record(payload(1, words * 4), 5) + data_record(payload(2), 7)
    out, info = parse(page(body))
    assert [(ts, len(data)) for ts, data in out] == [(1005, words * 4), (1012, 8)]
    assert info == (1012, len(body), 0, 2, False)


def test_type_len_0_carries_its_length_in_the_next_word() -> None:
    long = payload(1, 200)
    body = data_record(long, 3) + data_record(payload(2), 1)
    assert struct.unpack_from("<I", body)[0] & 31 == 0
    out, _ = parse(page(body))
    assert out == [(1003, long), (1004, payload(2))]


def test_padding_with_a_delta_is_a_discarded_record_skipped_without_its_delta() -> None:
    # a discarded record: array[0] is its length after the header word (rb_event_discard)
    discarded = header(29, 50) + struct.pack("<I", 16) + bytes(12)
    body = data_record(payload(1), 5) + discarded + data_record(payload(2), 7)
    out, info = parse(page(body))
    assert [ts for ts, _ in out] == [1005, 1012]
    assert info.records == 2


def test_padding_without_a_delta_ends_the_page() -> None:
    body = data_record(payload(1), 5) + header(29, 0) + bytes(8) + data_record(payload(2), 7)
    out, info = parse(page(body))
    assert [ts for ts, _ in out] == [1005]
    assert not info.malformed


def test_a_time_extend_adds_its_high_bits_to_the_next_delta() -> None:
    extend = header(30, 3) + struct.pack("<I", 2)  # delta = 2 << 27 | 3
    body = data_record(payload(1), 1) + extend + data_record(payload(2), 4)
    out, _ = parse(page(body))
    assert [ts for ts, _ in out] == [1001, 1001 + (2 << 27) + 3 + 4]


def test_an_absolute_time_stamp_replaces_the_running_one() -> None:
    stamp = header(31, 10) + struct.pack("<I", 5)  # 5 << 27 | 10
    body = data_record(payload(1), 1) + stamp + data_record(payload(2), 4)
    out, _ = parse(page(body, timestamp=10**9))
    assert [ts for ts, _ in out] == [10**9 + 1, (5 << 27) + 10 + 4]


def test_an_absolute_time_stamp_takes_the_top_bits_from_the_page() -> None:
    top = 0xF8 << 56
    base = top | 1000
    stamp = header(31, 2000) + struct.pack("<I", 0)
    out, _ = parse(page(stamp + data_record(payload(1), 0), timestamp=base))
    assert out[0][0] == top | 2000


def test_a_page_that_lost_events_says_how_many() -> None:
    body = data_record(payload(1), 1)
    _, info = parse(page(body, flags=MISSED_EVENTS | MISSED_STORED, lost=15317))
    assert info.lost == 15317
    _, info = parse(page(body, flags=MISSED_EVENTS))
    assert info.lost == LOST_UNKNOWN


def test_a_stored_count_that_does_not_fit_the_page_is_unknown() -> None:
    body = data_record(payload(1, 4096 - 16 - 8), 1)  # header and length words: 8 bytes
    assert len(body) == 4096 - 16
    _, info = parse(page(body, flags=MISSED_EVENTS | MISSED_STORED))
    assert info.lost == LOST_UNKNOWN


def test_records_of_other_events_are_walked_over() -> None:
    other = struct.pack("<HH", 99, 0) + bytes(4)
    body = data_record(other, 1) + data_record(payload(1), 1)
    out, info = parse(page(body))
    assert [data for _, data in out] == [payload(1)]
    assert info.records == 2


def test_a_big_endian_page_parses_the_same() -> None:
    big_payload = struct.pack(">HH", TYPE, 1) + bytes(4)
    body = data_record(big_payload, 5, "big") + data_record(big_payload, 7, "big")
    parser = PageParser(byteorder="big")
    out: List[Tuple[int, bytes]] = []
    info = parser.parse(page(body, byteorder="big"), DECODERS, out)
    assert [ts for ts, _ in out] == [1005, 1012]
    assert not info.malformed


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(15),
        page(data_record(payload(1), 1), length=5000),  # commit past the page
        page(data_record(payload(1), 1) + header(0, 1) + struct.pack("<I", 0)),  # zero length
        page(data_record(payload(1), 1) + header(0, 1) + struct.pack("<I", 9999)),
        page(data_record(payload(1), 1) + header(29, 3) + struct.pack("<I", 1)),
        page(data_record(payload(1), 1) + header(30, 1)),  # time extend cut off
        page(data_record(payload(1), 1) + header(12, 1)),  # record past the data
        page(data_record(payload(1), 1) + data_record(payload(2), 1))[:30],  # cut short
    ],
)
def test_truncated_and_inconsistent_pages_end_the_parse_without_raising(raw: bytes) -> None:
    out, info = parse(raw)
    assert info.malformed  # type: ignore[attr-defined]
    assert [data for _, data in out] in ([], [payload(1)])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=4200))
def test_garbage_pages_never_raise(raw: bytes) -> None:
    out, info = parse(raw)
    assert info.records >= len(out)  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(min_value=0, max_value=400))
def test_every_decoder_takes_any_record_without_raising(data: bytes, length: int) -> None:
    record = struct.pack("<H", 0) + data
    for decoder in CHOSEN.decoders.values():
        decoder(record + bytes(400), 0, min(length, len(record)), 1)


def test_hostile_names_stay_data() -> None:
    fmt = parse_event_format(captured_format("task", "task_rename"), "task")
    record = bytearray(64)
    field = fmt.require("newcomm")
    struct.pack_into("<H", record, 0, fmt.id)
    record[field.offset : field.offset + 16] = b"\xff\x1b[31mevil\n\0rest"
    event = records.decode_rename(fmt)(bytes(record), 0, len(record), 1)
    assert isinstance(event, TaskRename)
    assert event.comm == os.fsdecode(b"\xff\x1b[31mevil\n")


def test_the_type_field_comes_from_the_formats() -> None:
    parser = PageParser(type_offset=2, type_size=4)
    body = data_record(struct.pack("<HI", 0, TYPE) + bytes(2), 1)
    out: List[Tuple[int, bytes]] = []
    parser.parse(page(body), DECODERS, out)
    assert len(out) == 1


def test_decoded_records_per_event_kind() -> None:
    events, _ = decode_all(captured_pages("pages.bin") + captured_pages("lost.bin"))
    kinds: Dict[str, int] = {}
    for event in events:
        kinds[type(event).__name__] = kinds.get(type(event).__name__, 0) + 1
    assert {"TcpStateChange", "TcpReset", "RouteLookup", "ProcessExec", "ProcessFork"} <= set(kinds)
