"""The binary format of the kernel's trace ring buffer: event formats and sub-buffer pages.

A tracing instance's per-CPU file ``per_cpu/cpuN/trace_pipe_raw`` hands out the ring buffer one
sub-buffer ("page") per ``read()``.  Everything about the layout is described by the kernel
itself, and read from it here rather than assumed:

- ``events/header_page`` gives the page header: a u64 ``timestamp`` (the clock value the deltas
  of the page's events add up from) and a ``commit`` word of the size of a ``long`` whose low
  27 bits are the length of the data that follows.  Bit 31 (``RB_MISSED_EVENTS``) says events
  were lost before this page; bit 30 (``RB_MISSED_STORED``) that their count is stored as a
  ``long`` right after the data (``ring_buffer_read_page`` in ``kernel/trace/ring_buffer.c``).
- ``events/header_event`` gives the event header: a u32 of ``type_len`` (5 bits) and
  ``time_delta`` (27 bits), in that bit order for the host's byte order (``struct
  ring_buffer_event`` in ``include/linux/ring_buffer.h``).  ``type_len`` 1-28: a data event
  of ``type_len * 4`` bytes follows; 0: the next u32 is its length plus 4, the data after it;
  29: padding (``time_delta`` 0: the rest of the page is empty; else a discarded event whose
  length is in the next u32); 30: a time extend (``delta += next_u32 << 27``); 31: an absolute
  time stamp (59 bits, the top 5 taken from the running time stamp: ``rb_fix_abs_ts``).
- ``events/SYSTEM/NAME/format`` lists each event's fields with offset, size and signedness
  (``print_event_fields`` in ``kernel/trace/trace_events.c``); ``__data_loc`` fields are a u32
  of (length << 16 | offset from the event's start), ``__rel_loc`` ones (5.18+) the same with the
  offset counted from the end of the field.

The same reading is libtraceevent's ``kbuffer-parse.c`` and ``event-parse.c``.  A page is only
ever parsed, never trusted: a truncated or garbage page ends its parse with
``PageInfo.malformed`` set, never an exception.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar

T = TypeVar("T")


class FormatError(ValueError):
    """A ``format``, ``header_page`` or ``header_event`` text that cannot be understood."""


class FieldFormat(NamedTuple):
    """One field of an event as its ``format`` file describes it."""

    name: str
    declaration: str
    """The C declaration as printed, e.g. ``__u8 saddr[4]`` or ``__data_loc char[] filename``."""
    offset: int
    size: int
    signed: bool
    location: str = ""
    """``data_loc`` or ``rel_loc`` for variable-length fields (the field holds where the
    data is), else ""."""

    @property
    def is_array(self) -> bool:
        return self.declaration.rstrip().endswith("]") and not self.location


class EventFormat(NamedTuple):
    """An event's id (the ``common_type`` of its records) and fields, common ones included."""

    system: str
    name: str
    id: int
    fields: Tuple[FieldFormat, ...]

    def field(self, name: str) -> Optional[FieldFormat]:
        for candidate in self.fields:
            if candidate.name == name:
                return candidate
        return None

    def require(self, name: str) -> FieldFormat:
        """The field ``name``.  Raises FormatError when this kernel's event lacks it."""
        found = self.field(name)
        if found is None:
            raise FormatError(f"{self.system}:{self.name} has no field {name!r}")
        return found


_FIELD = re.compile(
    r"field:(?P<declaration>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"(?:\s*signed:(?P<signed>\d+);)?"
)
_IDENTIFIER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\[[^\]]*\])?\s*$")


def _field_name(declaration: str) -> Tuple[str, str]:
    """(name, location kind) of a field declaration."""
    location = ""
    text = declaration.strip()
    for kind in ("__data_loc", "__rel_loc"):
        if text.startswith(kind + " "):
            location = kind[2:]
            text = text[len(kind) :].replace("[]", " ")
    match = _IDENTIFIER.search(text)
    if not match:
        raise FormatError(f"cannot find the name in field declaration {declaration!r}")
    return match.group(1), location


def parse_event_format(text: str, system: str = "") -> EventFormat:
    """Parse an event's ``format`` file.  Raises FormatError when it has no name, id or
    fields."""
    name_match = re.search(r"^name:\s*(\S+)", text, re.M)
    id_match = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not name_match or not id_match:
        raise FormatError("an event format needs a name: and an ID: line")
    fields = []
    for match in _FIELD.finditer(text):
        declaration = match.group("declaration").strip()
        name, location = _field_name(declaration)
        fields.append(
            FieldFormat(
                name,
                declaration,
                int(match.group("offset")),
                int(match.group("size")),
                match.group("signed") == "1",
                location,
            )
        )
    if not fields:
        raise FormatError(f"event {name_match.group(1)} lists no fields")
    return EventFormat(system, name_match.group(1), int(id_match.group(1)), tuple(fields))


class PageLayout(NamedTuple):
    """Where a page's header fields are (``events/header_page``)."""

    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16


def parse_header_page(text: str) -> PageLayout:
    """Parse ``events/header_page``.  Raises FormatError when a field is missing or odd."""
    found: Dict[str, Tuple[int, int]] = {}
    for match in _FIELD.finditer(text):
        name, _ = _field_name(match.group("declaration"))
        found.setdefault(name, (int(match.group("offset")), int(match.group("size"))))
    try:
        (ts_offset, ts_size), (commit_offset, commit_size) = found["timestamp"], found["commit"]
        data_offset = found["data"][0]
    except KeyError as missing:
        raise FormatError(f"header_page has no {missing} field") from None
    if ts_size != 8 or commit_size not in (4, 8) or data_offset < commit_offset + commit_size:
        raise FormatError(f"unexpected header_page layout: {found}")
    return PageLayout(ts_offset, ts_size, commit_offset, commit_size, data_offset)


class EventLayout(NamedTuple):
    """The event header's bits and special ``type_len`` values (``events/header_event``)."""

    type_len_bits: int = 5
    time_delta_bits: int = 27
    padding: int = 29
    time_extend: int = 30
    time_stamp: int = 31
    data_max: int = 28


def parse_header_event(text: str) -> EventLayout:
    """Parse ``events/header_event``.  Raises FormatError when it is not the layout this
    parser reads (5 + 27 bits, types 29/30/31, data up to 28): a future kernel that changes
    it must be read by code that knows the change."""

    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        if not match:
            raise FormatError(f"header_event: no {pattern!r}")
        return int(match.group(1))

    layout = EventLayout(
        number(r"type_len\s*:\s*(\d+)\s*bits"),
        number(r"time_delta\s*:\s*(\d+)\s*bits"),
        number(r"padding\s*:\s*type\s*==\s*(\d+)"),
        number(r"time_extend\s*:\s*type\s*==\s*(\d+)"),
        # 4.14 and later print "time_stamp"; older kernels had no absolute time stamps
        number(r"time_stamp\s*:\s*type\s*==\s*(\d+)") if "time_stamp" in text else 31,
        number(r"data max type_len\s*==\s*(\d+)"),
    )
    if layout != DEFAULT_EVENT:
        raise FormatError(f"unsupported event header layout {layout}")
    return layout


DEFAULT_PAGE = PageLayout()
"""The page layout of every 64-bit kernel so far."""
DEFAULT_EVENT = EventLayout()

# ---------------------------------------------------------------------------------------------
# pages

MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
COMMIT_MASK = (1 << 27) - 1
TS_SHIFT = 27
TS_MSB = 0xF8 << 56
LOST_UNKNOWN = -1
""":attr:`PageInfo.lost` when events were lost but the page had no room for their count."""

_PAD = bytes(8)

Decoder = Callable[[bytes, int, int, int], Optional[T]]
"""``decode(page, offset, length, timestamp)``: the record at ``page[offset:offset+length]``
as an event, or None to drop it.  Must not raise on short or odd records."""


class PageInfo(NamedTuple):
    """What the header and walk of one page said."""

    timestamp: int
    """The page's base time stamp (trace clock, ns)."""
    length: int
    """Bytes of event data (the commit's length)."""
    lost: int
    """Events lost before this page: 0, a count, or :data:`LOST_UNKNOWN`."""
    records: int
    """Data records on the page (decoded or not)."""
    malformed: bool
    """The page was truncated or inconsistent; the records before the fault were kept."""


class PageParser:
    """Walks the records of pages laid out as ``header_page``/``header_event`` describe,
    handing each data record to the decoder registered for its event id.

    ``type_offset``/``type_size`` locate ``common_type`` in a record (from any event's
    format); ``byteorder`` is the tracing host's (the buffer is in its native order).
    """

    def __init__(
        self,
        page: PageLayout = DEFAULT_PAGE,
        event: EventLayout = DEFAULT_EVENT,
        type_offset: int = 0,
        type_size: int = 2,
        byteorder: str = sys.byteorder,
    ) -> None:
        if event != DEFAULT_EVENT:
            raise FormatError(f"unsupported event header layout {event}")
        order = "<" if byteorder == "little" else ">"
        self.layout = page
        self._timestamp = struct.Struct(order + "Q").unpack_from
        self._commit = struct.Struct(order + ("Q" if page.commit_size == 8 else "I")).unpack_from
        self._u32 = struct.Struct(order + "I").unpack_from
        type_code = {1: "B", 2: "H", 4: "I"}.get(type_size)
        if type_code is None:
            raise FormatError(f"common_type of {type_size} bytes")
        self._type = struct.Struct(f"{order}{type_offset}x{type_code}").unpack_from
        self._head = struct.Struct(f"{order}I{type_offset}x{type_code}").unpack_from
        self._type_end = type_offset + type_size
        # struct ring_buffer_event { u32 type_len:5, time_delta:27; }: the compiler puts the
        # first bit-field in the low bits on little-endian hosts, the high bits on big-endian.
        self._type_shift, self._delta_shift = (0, 5) if byteorder == "little" else (27, 0)

    def parse(self, page: bytes, decoders: Mapping[int, Decoder[T]], out: List[T]) -> PageInfo:
        """Decode the records of ``page`` into ``out`` (appended in page order, which is time
        order within one CPU).  Never raises on the page's content."""
        layout = self.layout
        size = len(page)
        start = layout.data_offset
        if size < start:
            return PageInfo(0, 0, 0, 0, True)
        timestamp: int = self._timestamp(page, layout.timestamp_offset)[0]
        commit: int = self._commit(page, layout.commit_offset)[0]
        length = commit & COMMIT_MASK
        end = start + length
        malformed = end > size
        if malformed:
            end = size
        lost = 0
        if commit & MISSED_EVENTS:
            lost = LOST_UNKNOWN
            if commit & MISSED_STORED and end + layout.commit_size <= size:
                lost = self._commit(page, end)[0]
        # reads of a header and the record's common_type may run up to 8 bytes past the data
        # (bounds are checked against `end`): pad instead of testing before every read
        page = page + _PAD
        head = self._head
        u32 = self._u32
        type_of = self._type
        type_end = self._type_end
        type_shift, delta_shift = self._type_shift, self._delta_shift
        decoder_for = decoders.get
        append = out.append
        records = 0
        position = start
        while position + 4 <= end:
            word, event_type = head(page, position)
            type_len = (word >> type_shift) & 0x1F
            if 0 < type_len <= 28:  # the common case: a small data record
                data = position + 4
                position = data + (type_len << 2)
                if position > end:
                    malformed = True
                    break
                timestamp += (word >> delta_shift) & 0x7FFFFFF
                records += 1
                decode = decoder_for(event_type)
                if decode is not None:
                    event = decode(page, data, type_len << 2, timestamp)
                    if event is not None:
                        append(event)
                continue
            delta = (word >> delta_shift) & 0x7FFFFFF
            if position + 8 > end:
                if type_len != 29 or delta:
                    malformed = True
                break
            array = u32(page, position + 4)[0]
            if type_len == 0:  # a record too long for type_len: its length in the next word
                record_length = (array - 4 + 3) & ~3
                data = position + 8
                if record_length < type_end or data + record_length > end:
                    malformed = True
                    break
                timestamp += delta
                records += 1
                decode = decoder_for(type_of(page, data)[0])
                if decode is not None:
                    event = decode(page, data, record_length, timestamp)
                    if event is not None:
                        append(event)
                position = data + record_length
            elif type_len == 30:  # time extend: a delta too big for 27 bits
                timestamp += (array << TS_SHIFT) + delta
                position += 8
            elif type_len == 31:  # absolute time stamp (59 bits)
                absolute = (array << TS_SHIFT) + delta
                if timestamp & TS_MSB:
                    absolute |= timestamp & TS_MSB
                    if absolute < timestamp:
                        absolute += 1 << 59
                timestamp = absolute
                position += 8
            else:  # 29: padding; the kernel's own reader does not add its delta
                if delta == 0:
                    break  # the rest of the page is empty
                if array < 4:
                    malformed = True
                    break
                position += 4 + array
        return PageInfo(timestamp, length, lost, records, malformed)


def subbuffer_size(read_file: Callable[[str], str]) -> int:
    """The size of one sub-buffer in bytes: ``buffer_subbuf_size_kb`` (Linux 6.8+) when the
    instance has it, else the page size (``read_file`` reads an instance file, raising
    OSError when it is absent)."""
    try:
        return int(read_file("buffer_subbuf_size_kb").split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE")
