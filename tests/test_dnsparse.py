"""The DNS message parser: real answers, every hostile shape we know of, and fuzzing.

Messages are built with ``bench.dnsload``'s encoder (the one our test DNS server answers with)
or by hand, octet by octet, where the point is a malformation no encoder would produce.
Bounded work is checked by counting the parser's executed lines (``sys.settrace``), not by
timing: a loop or a quadratic walk shows as a count far past a small multiple of the length.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from types import FrameType
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collect.dns import parse as dnsparse
from agent.collect.dns.parse import (
    MAX_CHAIN,
    MAX_RECORDS,
    TYPE_A,
    TYPE_AAAA,
    Answer,
    Message,
    parse_message,
)
from bench.dnsload import query, response

FASTLY = ["debian.map.fastly.net", "dualstack.f3.shared.global.fastly.net"]


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> int:
    return int(ipaddress.IPv6Address(text))


def header(ident: int = 7, flags: int = 0x8180, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, 0, 0)


def labels(*names: str) -> bytes:
    return b"".join(bytes([len(n)]) + n.encode() for n in names) + b"\0"


def record(owner: bytes, rtype: int, rdata: bytes, ttl: int = 300, rclass: int = 1) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


QUESTION_A = labels("www", "example", "com") + struct.pack("!HH", TYPE_A, 1)
TO_QUESTION = b"\xc0\x0c"  # a pointer to the question name at offset 12


# --- real answers -----------------------------------------------------------------------------


def test_a_cname_chain_to_two_addresses() -> None:
    message = parse_message(
        response(0x1234, "deb.debian.org", TYPE_A, FASTLY, ["151.101.2.132", "151.101.66.132"])
    )
    assert message.problem == ""
    assert (message.id, message.response, message.rcode, message.truncated) == (
        0x1234,
        True,
        0,
        False,
    )
    assert message.question is not None and message.question.name == "deb.debian.org"
    chain = ("deb.debian.org", *FASTLY)
    assert message.answers == (
        Answer(4, v4("151.101.2.132"), 300, chain),
        Answer(4, v4("151.101.66.132"), 300, chain),
    )
    assert message.answers[0].asked == "deb.debian.org"


def test_aaaa_answers() -> None:
    answer = response(1, "deb.debian.org", TYPE_AAAA, FASTLY[:1], ["2a04:4e42::644"])
    message = parse_message(answer)
    assert message.answers == (Answer(6, v6("2a04:4e42::644"), 300, ("deb.debian.org", FASTLY[0])),)


def test_a_query_is_read_without_answers() -> None:
    message = parse_message(query(99, "API.GitHub.com."))
    assert message.response is False and message.answers == () and message.problem == ""
    assert message.question == ("api.github.com", TYPE_A, 1)
    head = parse_message(response(5, "x.test", TYPE_A, [], ["192.0.2.1"]), answers=False)
    assert head.response and head.answers == () and head.question is not None


def test_names_are_normalised() -> None:
    """0x20 case randomisation (draft-vixie-dnsext-dns0x20) comes back lowered; A-labels stay
    as they travel; octets outside letters, digits, '-' and '_' are escaped as \\DDD."""
    weird = labels("a b", "c.d", "e\\f", "\x00", "_srv-1", "XN--BCHER-KVA", "Example")
    data = header(an=1) + weird + struct.pack("!HH", TYPE_A, 1)
    data += record(TO_QUESTION, TYPE_A, bytes([192, 0, 2, 1]))
    message = parse_message(data)
    assert message.problem == ""
    expected = "a\\032b.c\\046d.e\\092f.\\000._srv-1.xn--bcher-kva.example"
    assert message.question is not None and message.question.name == expected
    assert message.answers[0].chain == (expected,)


def test_the_chain_ttl_is_the_smallest_and_a_negative_ttl_is_zero() -> None:
    cname = record(TO_QUESTION, 5, labels("edge", "cdn", "test"), ttl=30)
    a_record = record(labels("edge", "cdn", "test"), TYPE_A, bytes([192, 0, 2, 1]), ttl=600)
    message = parse_message(header(an=2) + QUESTION_A + cname + a_record)
    assert message.answers == (
        Answer(4, v4("192.0.2.1"), 30, ("www.example.com", "edge.cdn.test")),
    )
    negative = record(TO_QUESTION, TYPE_A, bytes([192, 0, 2, 2]), ttl=0x80000001)
    assert parse_message(header(an=1) + QUESTION_A + negative).answers[0].ttl == 0  # RFC 2181 s8


def test_records_off_the_chain_and_of_other_classes_are_left_out() -> None:
    stranger = record(labels("evil", "test"), TYPE_A, bytes([198, 51, 100, 1]))
    chaos = record(TO_QUESTION, TYPE_A, bytes([198, 51, 100, 2]), rclass=3)
    mx = record(TO_QUESTION, 15, b"\x00\x0a" + TO_QUESTION)
    ours = record(TO_QUESTION, TYPE_A, bytes([192, 0, 2, 1]))
    message = parse_message(header(an=5) + QUESTION_A + stranger + chaos + mx + ours + ours)
    assert message.problem == ""
    assert [answer.address for answer in message.answers] == [v4("192.0.2.1")]


def test_a_cname_loop_and_a_long_chain_stop() -> None:
    loop = record(TO_QUESTION, 5, labels("b", "test")) + record(labels("b", "test"), 5, TO_QUESTION)
    message = parse_message(header(an=2) + QUESTION_A + loop)
    assert message.answers == () and message.problem == ""
    chain = [f"c{i}.test" for i in range(MAX_CHAIN + 5)]
    longest = parse_message(response(1, "start.test", TYPE_A, chain, ["192.0.2.1"]))
    assert longest.answers == ()  # the owner is past the chain's end
    shorter = parse_message(response(1, "start.test", TYPE_A, chain[:MAX_CHAIN], ["192.0.2.1"]))
    assert len(shorter.answers[0].chain) == MAX_CHAIN + 1


# --- hostile messages -------------------------------------------------------------------------

HOSTILE = {
    "empty": (b"", "shorter than the 12-octet DNS header"),
    "no question": (header(qd=0), "QDCOUNT 0"),
    "two questions": (header(qd=2) + QUESTION_A * 2, "QDCOUNT 2"),
    "pointer to itself": (header() + b"\xc0\x0c" + b"\0\1\0\1", "does not lead back"),
    "pointer loop through a label": (header() + b"\x01a\xc0\x0c\0\1\0\1", "does not lead back"),
    "forward pointer": (header() + b"\xc0\x20" + b"\0" * 30, "does not lead back"),
    "pointer out of bounds": (header() + b"\xff\xff\0\1\0\1", "does not lead back"),
    "pointer cut short": (header() + b"\xc0", "runs past the end"),
    "label of type 0x40": (header() + b"\x41abc\0\0\1\0\1", "type 0x40"),
    "label of type 0x80": (header() + b"\x80abc\0\0\1\0\1", "type 0x80"),
    "name over 255 octets": (
        header() + labels(*["x" * 63] * 4) + b"\0\1\0\1",
        "longer than 255 octets",
    ),
    "label cut short": (header() + b"\x3fabc", "runs past the end"),
    "no terminating label": (header() + b"\x03www", "runs past the end"),
    "question cut short": (header() + labels("a") + b"\0", "question runs past the end"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_questions_are_refused_with_the_reason(case: str) -> None:
    data, problem = HOSTILE[case]
    message = parse_message(data)
    assert problem in message.problem
    assert message.question is None and message.answers == ()
    assert message.problem.isprintable()


def test_a_name_over_255_octets_through_a_pointer() -> None:
    long_question = labels(*["q" * 60] * 4)[:-1] + b"\0"  # 245 octets
    owner = labels("x" * 20)[:-1] + TO_QUESTION  # 21 more octets, then the question's
    data = header(an=1) + long_question + b"\0\1\0\1" + record(owner, TYPE_A, b"\1\2\3\4")
    assert "longer than 255 octets" in parse_message(data).problem


def test_truncated_records_keep_what_came_before() -> None:
    whole = response(3, "www.example.com", TYPE_A, [], ["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    for cut in range(len(whole) - 1, len(whole) - 16, -1):
        message = parse_message(whole[:cut])
        assert "runs past the end" in message.problem
        assert [answer.address for answer in message.answers] == [v4("192.0.2.1"), v4("192.0.2.2")]


def test_counts_that_lie() -> None:
    honest = response(3, "www.example.com", TYPE_A, [], ["192.0.2.1", "192.0.2.2"])
    lying = honest[:6] + struct.pack("!H", 65535) + honest[8:]
    message = parse_message(lying)
    assert "the message ends after 2 of the 512 answer records" in message.problem
    assert len(message.answers) == 2


def test_bad_record_data() -> None:
    five = record(TO_QUESTION, TYPE_A, b"\1\2\3\4\5")
    assert "an A record of 5 octets" in parse_message(header(an=1) + QUESTION_A + five).problem
    three = record(TO_QUESTION, TYPE_AAAA, b"\1\2\3")
    assert "an AAAA record of 3 octets" in parse_message(header(an=1) + QUESTION_A + three).problem
    loose = record(TO_QUESTION, 5, TO_QUESTION + b"\0")
    assert "does not fill" in parse_message(header(an=1) + QUESTION_A + loose).problem


def test_more_records_than_read() -> None:
    many = [str(ipaddress.IPv4Address(v4("10.0.0.0") + i)) for i in range(MAX_RECORDS + 40)]
    message = parse_message(response(1, "many.test", TYPE_A, [], many))
    assert f"ANCOUNT {MAX_RECORDS + 40}: only the first {MAX_RECORDS}" in message.problem
    assert len(message.answers) == MAX_RECORDS


# --- bounded work -----------------------------------------------------------------------------


def lines_run(work: Callable[[], Any]) -> int:
    """How many lines of agent/collect/dns/parse.py ``work()`` executes."""
    count = 0
    target = dnsparse.__file__

    def tracer(frame: FrameType, event: str, arg: Any) -> Optional[Callable[..., Any]]:
        nonlocal count
        if frame.f_code.co_filename != target:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)
    return count


def pointer_maze(records: int, depth: int) -> bytes:
    """A question, then an unknown record holding a descending chain of ``depth`` pointers
    (each to the one before, the first to the question), then ``records`` A records whose
    owner points at the top of the chain: without a memo each owner would walk all of it."""
    start = 12 + len(QUESTION_A) + 11
    chain = b"".join(
        struct.pack("!H", 0xC000 | (12 if i == 0 else start + 2 * (i - 1))) for i in range(depth)
    )
    top = struct.pack("!H", 0xC000 | (start + 2 * (depth - 1)))
    body = b"".join(record(top, TYPE_A, struct.pack("!I", 0x0A000000 + i)) for i in range(records))
    return header(an=records + 1) + QUESTION_A + record(b"\0", 99, chain) + body


def test_many_pointers_to_a_pointer_chain_cost_linear_work() -> None:
    maze = pointer_maze(records=400, depth=120)
    message = parse_message(maze)
    assert message.problem == "" and len(message.answers) == 400
    assert message.answers[0].chain == ("www.example.com",)
    deep = lines_run(lambda: parse_message(maze))
    shallow = pointer_maze(records=400, depth=1)
    assert deep - lines_run(lambda: parse_message(shallow)) < 20 * 120  # the chain, walked once
    assert deep < 6 * len(maze)


hostile_bytes = st.binary(max_size=1500)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bytes)
def test_random_bytes_never_raise(data: bytes) -> None:
    check(parse_message(data), data)


REAL = response(0xBEEF, "deb.debian.org", TYPE_A, FASTLY, ["151.101.2.132", "151.101.66.132"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=8,
    )
)
def test_mutated_real_messages_never_raise(mutations: Any) -> None:
    data = bytearray(REAL)
    for position, value, kind in mutations:
        position = min(position, len(data) - 1) if data else 0
        if kind == "r" and data:
            data[position] = value
        elif kind == "i":
            data.insert(position, value)
        elif data:
            del data[position]
    check(parse_message(bytes(data)), bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=70),
            st.integers(0, 0x3FFF).map(lambda target: struct.pack("!H", 0xC000 | target)),
            st.just(b"\0"),
            st.just(struct.pack("!HHIH", TYPE_A, 1, 300, 4) + b"\1\2\3\4"),
            st.just(struct.pack("!HHIH", 5, 1, 300, 2) + TO_QUESTION),
        ),
        max_size=60,
    ),
)
def test_crafted_records_never_raise_and_stay_bounded(flags: int, count: int, parts: Any) -> None:
    """Headers with any flags and ANCOUNT, then names, pointers anywhere (loops, forward,
    out of bounds), labels of every length and record tails, in any order."""
    data = header(flags=flags, an=count) + QUESTION_A + b"".join(parts)
    check(parse_message(data), data)
    assert lines_run(lambda: parse_message(data)) < 40 * len(data) + 400


def check(message: Message, data: bytes) -> None:
    """What every parse promises, whatever the input."""
    assert isinstance(message, Message)
    assert message.problem == "" or message.problem.isprintable()
    assert len(message.answers) <= MAX_RECORDS
    names = [message.question.name] if message.question else []
    for answer in message.answers:
        assert answer.version in (4, 6)
        assert 0 <= answer.address < 1 << (32 if answer.version == 4 else 128)
        assert 0 <= answer.ttl < 1 << 31
        assert 1 <= len(answer.chain) <= MAX_CHAIN + 1
        names.extend(answer.chain)
    for name in names:
        assert len(name) <= 4 * 253 and name.isprintable() and " " not in name
        assert all(label for label in name.split(".")) or name == ""
