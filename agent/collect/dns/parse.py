"""Decode one DNS message: its question, and the A/AAAA answers with the CNAME chain to each.

:func:`parse_message` takes one message as it travels (a UDP payload, or a TCP message after
its 2-byte length prefix, RFC 1035 section 4.2.2) and never raises: whatever is wrong with it
comes back as :attr:`Message.problem`, one line, beside what could be read before it.  Work is
bounded by the message's length: each name at most 255 octets (RFC 1035 section 2.3.4) read
in place, every compression pointer (section 4.1.4) strictly backwards of the name that uses
it, so that pointers cannot loop, each position reached through a pointer decoded once per
message, and at most :data:`MAX_RECORDS` answer records read.

Names come back in presentation form, normalised for comparison: ASCII letters lowered (DNS
names compare without case, RFC 4343), no trailing dot, internationalised names as the A-labels
that travel (``xn--...``, RFC 5890), and any octet other than a letter, digit, ``-`` or ``_``
escaped as ``\\DDD`` (RFC 1035 section 5.1), so a name never holds a dot, space or control
character of its own.

Written for the agent's DNS watch instead of using dnspython: 13-22 us per typical answer
here, against 210-270 us for dnspython 2.8's ``dns.message.from_wire`` and 40-60 ms and
11 MiB to import it (``python -m bench.dns_bench``; ``docs/DNS.md``); it reads only what the
watch needs (RFC 1035 section 4.1, RFC 3596 for AAAA).
"""

from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

HEADER_SIZE = 12
MAX_NAME_OCTETS = 255
"""RFC 1035 section 2.3.4: a name on the wire, length octets and the root label included."""
MAX_LABEL_OCTETS = 63
MAX_POINTERS = 126
"""More compression pointers than a 255-octet name could need; the backwards rule already
ends every chain, this keeps each one short."""
MAX_CHAIN = 16
"""CNAMEs followed from the question name (resolvers stop near here: BIND's limit is 16)."""
MAX_RECORDS = 512
"""Answer records read; a message claiming more is read that far."""

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1
OPCODE_QUERY = 0
RCODE_NOERROR = 0

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")
_TTL_SIGN = 0x80000000

_PLAIN = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_ESCAPED = tuple(
    chr(octet) if bytes([octet]) in _PLAIN else f"\\{octet:03d}" for octet in range(256)
)


class Question(NamedTuple):
    """The question section's one entry (RFC 1035 section 4.1.2)."""

    name: str
    qtype: int
    qclass: int


class Answer(NamedTuple):
    """One A or AAAA record reached from the question name.

    ``chain`` runs from the question name through each CNAME to the record's owner, so
    ``chain[0]`` is the name that was asked and ``chain[-1]`` the name the address belongs to.
    ``ttl`` is the smallest TTL along the chain (an alias holds no longer than its CNAME),
    with TTLs whose top bit is set counted as 0 (RFC 2181 section 8).
    """

    version: int
    address: int
    ttl: int
    chain: Tuple[str, ...]

    @property
    def asked(self) -> str:
        return self.chain[0]


class Message(NamedTuple):
    """What :func:`parse_message` read.  ``problem`` is empty when the message was sound;
    otherwise it says what was wrong, and the fields hold what was read before it."""

    id: int
    response: bool
    opcode: int
    rcode: int
    truncated: bool
    question: Optional[Question]
    answers: Tuple[Answer, ...]
    problem: str = ""


class _Malformed(Exception):
    """Raised inside the parser only; :func:`parse_message` turns it into ``problem``."""


_Memo = Dict[int, Tuple[str, int]]
"""message offset -> (the name that starts there, its length on the wire)"""


def _label_text(raw: bytes) -> str:
    if raw.translate(None, _PLAIN):  # an octet other than a letter, digit, '-' or '_'
        return "".join([_ESCAPED[octet] for octet in raw.lower()])
    return raw.lower().decode("ascii")


def read_name(data: bytes, offset: int, memo: _Memo) -> Tuple[str, int]:
    """The name at ``offset`` and the offset just past it where it stands.

    Raises :class:`_Malformed`.  ``memo`` (one per message) holds names already decoded by
    their offset, so that the many pointers to one name cost one decoding.
    """
    size = len(data)
    pieces: List[Tuple[int, Optional[bytes]]] = []  # (offset, label), label None: a pointer
    in_place = 0  # octets of labels read so far
    position = offset
    lowest = offset  # a pointer must lead below every place this name was read from
    end = -1
    jumps = 0
    while True:
        if end >= 0:  # past the first pointer: names seen before may be reused
            known = memo.get(position)
            if known is not None:
                text, octets = known
                break
        if position >= size:
            raise _Malformed("a name runs past the end of the message")
        length = data[position]
        if length == 0:
            text, octets = "", 1
            if end < 0:
                end = position + 1
            break
        if length <= MAX_LABEL_OCTETS:
            start = position + 1
            in_place += 1 + length
            if in_place >= MAX_NAME_OCTETS:
                raise _Malformed("a name longer than 255 octets (RFC 1035 section 2.3.4)")
            pieces.append((position, data[start : start + length]))
            position = start + length
            if position > size:
                raise _Malformed("a label runs past the end of the message")
            continue
        if length < 0xC0:
            raise _Malformed(
                f"a label of type {length & 0xC0:#04x}: only lengths up to 63 and compression "
                "pointers are defined (RFC 6891 section 5)"
            )
        if position + 1 >= size:
            raise _Malformed("a compression pointer runs past the end of the message")
        target = ((length & 0x3F) << 8) | data[position + 1]
        if target >= lowest:
            raise _Malformed(
                "a compression pointer that does not lead back to an earlier name "
                "(a loop, or a forward pointer; RFC 1035 section 4.1.4)"
            )
        jumps += 1
        if jumps > MAX_POINTERS:
            raise _Malformed(f"more than {MAX_POINTERS} compression pointers in one name")
        if end < 0:
            end = position + 2
        pieces.append((position, None))
        lowest = position = target
    for place, label in reversed(pieces):
        if label is not None:
            octets += 1 + len(label)
            if octets > MAX_NAME_OCTETS:
                raise _Malformed("a name longer than 255 octets (RFC 1035 section 2.3.4)")
            piece = _label_text(label)
            text = f"{piece}.{text}" if text else piece
        memo[place] = (text, octets)
    return text, end


def _chain_answers(
    question: str,
    cnames: Dict[str, Tuple[str, int]],
    addresses: List[Tuple[str, int, int, int]],
) -> Tuple[Answer, ...]:
    """The address records on the chain from ``question`` through ``cnames``; records of other
    owners are left out, as a resolver leaves out data it did not ask for."""
    place = {question: 0}
    path = [question]
    chain_ttl = [_TTL_SIGN]
    name = question
    while name in cnames and len(path) <= MAX_CHAIN:
        target, ttl = cnames[name]
        if target in place:  # a CNAME loop: what came before it still stands
            break
        place[target] = len(path)
        path.append(target)
        chain_ttl.append(min(chain_ttl[-1], ttl))
        name = target
    answers: List[Answer] = []
    seen = set()
    for owner, version, address, ttl in addresses:
        index = place.get(owner)
        if index is None or (version, address) in seen:
            continue
        seen.add((version, address))
        answers.append(
            Answer(version, address, min(ttl, chain_ttl[index]), tuple(path[: index + 1]))
        )
    return tuple(answers)


def _ttl(value: int) -> int:
    return 0 if value & _TTL_SIGN else value


def _read_answers(
    data: bytes,
    offset: int,
    count: int,
    memo: _Memo,
    cnames: Dict[str, Tuple[str, int]],
    addresses: List[Tuple[str, int, int, int]],
) -> None:
    """Read ``count`` answer records from ``offset`` into ``cnames`` (owner -> target, TTL) and
    ``addresses`` (owner, version, address, TTL).  Raises :class:`_Malformed`; what was read
    before stays."""
    size = len(data)
    for index in range(count):
        if offset >= size:
            raise _Malformed(f"the message ends after {index} of the {count} answer records")
        owner, offset = read_name(data, offset, memo)
        if offset + _RECORD_TAIL.size > size:
            raise _Malformed(f"answer record {index + 1} of {count} runs past the end")
        rtype, rclass, ttl, length = _RECORD_TAIL.unpack_from(data, offset)
        offset += _RECORD_TAIL.size
        rdata_end = offset + length
        if rdata_end > size:
            raise _Malformed(f"the data of answer record {index + 1} runs past the end")
        if rclass == CLASS_IN:
            if rtype in (TYPE_A, TYPE_AAAA):
                expected = 4 if rtype == TYPE_A else 16
                if length != expected:
                    kind = "A" if rtype == TYPE_A else "AAAA"
                    raise _Malformed(f"an {kind} record of {length} octets, not {expected}")
                value = int.from_bytes(data[offset:rdata_end], "big")
                addresses.append((owner, 4 if rtype == TYPE_A else 6, value, _ttl(ttl)))
            elif rtype == TYPE_CNAME:
                target, target_end = read_name(data, offset, memo)
                if target_end != rdata_end:
                    raise _Malformed("a CNAME whose name does not fill its record data")
                # a name with a CNAME has no other data (RFC 1034 section 3.6.2): keep the first
                cnames.setdefault(owner, (target, _ttl(ttl)))
        offset = rdata_end


def parse_message(data: bytes, answers: bool = True) -> Message:
    """Decode ``data`` as one DNS message (RFC 1035 section 4.1); never raises.

    ``answers=False`` reads only the header and question: what matching a response to its
    query needs, for the cost of one name.  Answers are the A/AAAA records (class IN) on the
    chain from the question name; with ``problem`` set they are those read before it.
    """
    if len(data) < HEADER_SIZE:
        return Message(0, False, 0, 0, False, None, (), "shorter than the 12-octet DNS header")
    ident, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(data)
    response = bool(flags & 0x8000)
    opcode = (flags >> 11) & 0xF
    truncated = bool(flags & 0x0200)
    rcode = flags & 0xF
    if qdcount != 1:
        problem = f"QDCOUNT {qdcount}: a query carries exactly one question (RFC 9619)"
        return Message(ident, response, opcode, rcode, truncated, None, (), problem)
    memo: _Memo = {}
    try:
        name, offset = read_name(data, HEADER_SIZE, memo)
        if offset + _QUESTION_TAIL.size > len(data):
            raise _Malformed("the question runs past the end of the message")
    except _Malformed as error:
        return Message(ident, response, opcode, rcode, truncated, None, (), str(error))
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
    question = Question(name, qtype, qclass)
    if not answers or ancount == 0:
        return Message(ident, response, opcode, rcode, truncated, question, ())
    cnames: Dict[str, Tuple[str, int]] = {}
    addresses: List[Tuple[str, int, int, int]] = []
    problem = ""
    count = min(ancount, MAX_RECORDS)
    try:
        _read_answers(data, offset + _QUESTION_TAIL.size, count, memo, cnames, addresses)
    except _Malformed as error:
        problem = str(error)
    if not problem and ancount > MAX_RECORDS:
        problem = f"ANCOUNT {ancount}: only the first {MAX_RECORDS} answer records were read"
    found = _chain_answers(name, cnames, addresses)
    return Message(ident, response, opcode, rcode, truncated, question, found, problem)
