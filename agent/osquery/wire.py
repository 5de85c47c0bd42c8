"""The bytes of the one hot message: the reply to ``Extension.call``, written without the
generated code, and table rows encoded straight from records.

The reply is ``call_result{success: ExtensionResponse{status: ExtensionStatus{code, message,
uuid}, response: list<map<string, string>>}}`` in Thrift's binary protocol with strict writes
(thrift ``lib/py/src/protocol/TBinaryProtocol.py``; osquery's
``osquery/extensions/thrift/osquery.thrift``)::

    i32 0x80010002 (VERSION_1 | REPLY)   string "call"   i32 seqid
    0x0c i16 0                           call_result.success, a struct
      0x0c i16 1                         ExtensionResponse.status, a struct
        0x08 i16 1 i32 code   0x0b i16 2 string message   (0x0a i16 3 i64 uuid)   0x00
      0x0f i16 2 0x0d i32 rows           ExtensionResponse.response, a list of maps
        per row: 0x0b 0x0b i32 pairs, then string key, string value per pair
      0x00                               end of ExtensionResponse
    0x00                                 end of call_result

where ``string`` is an i32 byte length and the UTF-8 bytes, every integer big-endian, and a
field that is None is left out, as the generated ``write`` does.  That code spends 25-40 ms
(CPython 3.11) to 70-110 ms (3.8) on 1,840 rows of 30 columns, several protocol calls per
cell (``bench/RESULTS.md``, issue 16).  thrift's C codec (``fastbinary``) would be faster but
cannot be used: osquery-python's bindings (Thrift compiler 0.10.0) give it struct specs as
tuples, which thrift >= 0.11 refuses ("expecting list of size 2 for struct args"), and the
packages vendor thrift without it (a C extension built for one CPython version; the packages
serve every CPython from 3.8 on).

Rows are encoded straight from records (:class:`RowEncoder`): each row's values become one
``%``-formatted text with a NUL between cells, one ``str.encode``, one ``split``; lengths,
keys and cells are interleaved by slice assignment and joined; every step runs in C, none is
a Python call per cell.  The text of a cell is :func:`agent.osquery.table.cell`'s: ``""`` for
None, ``1``/``0`` for booleans, ``repr`` for floats, ``str`` for integers, and text that
UTF-8 cannot encode (lone surrogates: undecodable bytes, PEP 383) escaped by ``utf8_safe``.
Values of other types, and text holding a NUL, take ``cell`` itself, one cell at a time.  A
long-lived connection's row does not change between generates, so the encoder can keep the
bytes of the rows it answered last and reuse them (``remember=True``).
"""

from __future__ import annotations

import itertools
import operator
import struct
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

from agent.osquery.table import Cell, cell
from agent.textsafe import utf8_safe

Row = Dict[str, str]

_I32 = struct.Struct("!i").pack
_I64 = struct.Struct("!q").pack
_REPLY_HEADER = _I32(TBinaryProtocol.TBinaryProtocol.VERSION_1 | 2) + _I32(4) + b"call"
"""``writeMessageBegin("call", REPLY, seqid)`` up to the seqid (TMessageType.REPLY is 2)."""
_STRUCT, _I32_TYPE, _I64_TYPE, _STRING, _MAP, _LIST, _STOP = 12, 8, 10, 11, 13, 15, b"\x00"
_MAP_OF_STRINGS = bytes((_STRING, _STRING))
_SEPARATOR = "\x00"
WRITE_BATCH_BYTES = 1 << 20
"""Rows are handed to the transport (and flushed) about this many bytes at a time, so a big
answer is never copied whole once more into the transport's buffer."""


def _field(kind: int, number: int) -> bytes:
    return bytes((kind,)) + struct.pack("!h", number)


def _string(text: str) -> bytes:
    data = utf8_safe(text).encode("utf-8")
    return _I32(len(data)) + data


# -- rows ---------------------------------------------------------------------------------------


class EncodedRows(Sequence[Row]):
    """Table rows already in the binary protocol: one ``map<string, string>`` each.

    A sequence of rows like the list of dicts it stands for: its length is the row count,
    and an item is decoded on demand (by thrift's own reader, for tests and logs).  Equal to
    any sequence of the same rows.
    """

    __slots__ = ("chunks",)

    def __init__(self, chunks: List[bytes]) -> None:
        self.chunks = chunks
        """The rows' bytes, one item per row."""

    def __len__(self) -> int:
        return len(self.chunks)

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> List[Row]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Row, List[Row]]:
        if isinstance(index, slice):
            return [decode_row(chunk) for chunk in self.chunks[index]]
        return decode_row(self.chunks[index])

    def __iter__(self) -> Iterator[Row]:
        return map(decode_row, self.chunks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedRows):
            return self.chunks == other.chunks
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"EncodedRows({len(self.chunks)} rows, {sum(map(len, self.chunks))} bytes)"


def decode_row(data: bytes) -> Row:
    """One encoded row read back by thrift's binary protocol (``readMapBegin``, ``readString``).

    Raises thrift's ``TTransportException`` or ``UnicodeDecodeError`` when ``data`` is not one.
    """
    protocol = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(data))
    _, _, size = protocol.readMapBegin()
    row: Row = {}
    for _ in range(size):
        key = protocol.readString()
        row[key] = protocol.readString()
    return row


def encode_string_map(row: Mapping[str, str]) -> bytes:
    """One ``map<string, string>`` with the keys in ``row``'s order, as the generated writer
    writes it; text UTF-8 cannot encode is escaped (where the generated writer raises).

    Raises ``AttributeError``/``TypeError`` when a key or a value is not a ``str``.
    """
    texts = list(itertools.chain.from_iterable(row.items()))
    try:
        parts = _SEPARATOR.join(texts).encode("utf-8").split(b"\x00")
    except (UnicodeEncodeError, TypeError):
        parts = []
    if len(parts) != len(texts):
        parts = [utf8_safe(text).encode("utf-8") for text in texts]
    chunks: List[bytes] = [b""] * (2 * len(parts))
    chunks[0::2] = map(_I32, map(len, parts))
    chunks[1::2] = parts
    return _MAP_OF_STRINGS + _I32(len(row)) + b"".join(chunks)


def encode_rows(rows: Iterable[Mapping[str, str]]) -> EncodedRows:
    """Rows of strings (any keys, each row its own) as :class:`EncodedRows`."""
    if isinstance(rows, EncodedRows):
        return rows
    return EncodedRows([encode_string_map(row) for row in rows])


class _Format(NamedTuple):
    """How rows whose values have one tuple of types become text: ``template % pick(values)``."""

    template: str
    pick: Callable[[Sequence[Cell]], Tuple[Cell, ...]]
    keepable: bool
    """Equal values of these types have the same text, so their row can be kept by value:
    not so for floats (``0.0 == -0.0``)."""


_NONE = type(None)
_SPECIFIERS: Dict[type, str] = {str: "%s", int: "%s", bool: "%d", float: "%r", _NONE: ""}
"""A cell's text by the exact type of its value, the same as ``table.cell``'s: ``str`` and
``int`` print themselves, a boolean as 1/0, a float as its repr, None as nothing (and takes
no argument).  A subclass (an ``IntEnum``) or any other type is not here: ``cell`` does it."""


def _compile(types: Tuple[type, ...]) -> Optional[_Format]:
    if not all(kind in _SPECIFIERS for kind in types):
        return None
    template = _SEPARATOR.join(_SPECIFIERS[kind] for kind in types)
    used = [index for index, kind in enumerate(types) if kind is not _NONE]
    pick: Callable[[Sequence[Cell]], Tuple[Cell, ...]]
    if len(used) > 1:
        pick = operator.itemgetter(*used)
    elif used:
        (only,) = used
        pick = lambda values: (values[only],)  # noqa: E731
    else:
        pick = lambda values: ()  # noqa: E731
    return _Format(template, pick, keepable=float not in types)


MAX_FORMATS = 1024
"""Formats an encoder holds, one per tuple of value types seen (a table has a few: which of
its optional columns are empty)."""
_NOTHING_KEPT: Dict[Tuple[Cell, ...], bytes] = {}


class RowEncoder:
    """Encodes rows of fixed ``columns`` from records or mappings, as ``table.string_row``
    would make them (every column, every value a string) and Thrift would write them.

    The bytes of each key are made once.  With ``remember=True`` the encoder keeps the bytes
    of that answer's rows, keyed by their values and the types of their values (a cell's text
    depends on both: ``1`` and ``1.0`` are equal), and the next call reuses every row whose
    values did not change; what it keeps is exactly the last remembered answer, so its size is
    bounded by one answer.  Rows holding a float or a value of another type are not kept
    (``0.0 == -0.0``; another type's equality may not follow its text).  Calls may overlap
    (threads): each reads the rows kept and replaces them with its own when done.
    """

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns: Tuple[str, ...] = tuple(columns)
        self._values_of: Callable[[Any], Tuple[Cell, ...]] = (
            operator.attrgetter(*self.columns) if len(self.columns) > 1 else self._one_value
        )
        keys = [_string(name) for name in self.columns]
        header = _MAP_OF_STRINGS + _I32(len(self.columns))
        self._empty_row = header
        template: List[bytes] = []
        for key in keys:
            template += (key, b"", b"")
        if template:
            template[0] = header + template[0]
        self._template = template
        self._formats: Dict[Tuple[type, ...], Optional[_Format]] = {}
        self._kept: Dict[Tuple[type, ...], Dict[Tuple[Cell, ...], bytes]] = {}
        self._kept_answer = 0
        """How many rows the answer had that ``_kept`` was made of."""

    @property
    def kept_rows(self) -> int:
        """How many rows' bytes are kept for the next call."""
        return sum(map(len, self._kept.values()))

    def _one_value(self, record: Any) -> Tuple[Cell, ...]:
        return tuple(getattr(record, name) for name in self.columns)

    def encode_records(self, records: Iterable[Any], remember: bool = False) -> EncodedRows:
        """Rows from objects with an attribute per column (``agent.records.Connection``)."""
        return self.encode_values(map(self._values_of, records), remember)

    def encode_mappings(
        self, rows: Iterable[Mapping[str, Cell]], remember: bool = False
    ) -> EncodedRows:
        """Rows from mappings (history rows); a missing key is an empty cell."""
        columns = self.columns
        return self.encode_values(
            (tuple(map(row.get, columns)) for row in rows),
            remember,
        )

    def encode_values(
        self, rows: Iterable[Tuple[Cell, ...]], remember: bool = False
    ) -> EncodedRows:
        """Rows from tuples of values in column order.

        Raises ``ValueError`` for a tuple of the wrong length, ``TypeError`` for a value that
        cannot be hashed when rows are kept.
        """
        kept = self._kept
        chunks: List[bytes] = []
        append = chunks.append
        answer: List[Tuple[Tuple[type, ...], Tuple[Cell, ...], bytes]] = []
        reused = 0
        for values in rows:
            types = tuple(map(type, values))
            data = kept.get(types, _NOTHING_KEPT).get(values) if kept else None
            if data is None:
                data, keepable = self._encode(types, values)
            else:
                reused, keepable = reused + 1, True
            if remember and keepable:
                answer.append((types, values, data))
            append(data)
        if remember and not reused == len(chunks) == self._kept_answer:
            # Not the same rows as last time (when every row was kept, nothing changed).
            keep: Dict[Tuple[type, ...], Dict[Tuple[Cell, ...], bytes]] = {}
            for types, values, data in answer:
                keep.setdefault(types, {})[values] = data
            self._kept, self._kept_answer = keep, len(chunks)
        return EncodedRows(chunks)

    def _encode(self, types: Tuple[type, ...], values: Sequence[Cell]) -> Tuple[bytes, bool]:
        """(the row's bytes, whether they may be kept by value)."""
        if len(values) != len(self.columns):
            raise ValueError(f"a row of {len(values)} values for {len(self.columns)} columns")
        if not values:
            return self._empty_row, True
        try:
            form = self._formats[types]
        except KeyError:
            if len(self._formats) >= MAX_FORMATS:
                self._formats.clear()
            form = self._formats[types] = _compile(types)
        parts: List[bytes] = []
        if form is not None:
            text = form.template % form.pick(values)
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                data = utf8_safe(text).encode("utf-8")
            parts = data.split(b"\x00")
        if len(parts) != len(values):  # another type, or a NUL inside a value
            parts = [cell(value).encode("utf-8") for value in values]
        chunks = self._template[:]
        chunks[1::3] = map(_I32, map(len, parts))
        chunks[2::3] = parts
        return b"".join(chunks), form is not None and form.keepable


# -- the reply ---------------------------------------------------------------------------------


class CallReply(NamedTuple):
    """The reply to one ``call``, encoded: the bytes before the rows, the rows, the bytes after."""

    head: bytes
    rows: EncodedRows
    tail: bytes

    def data(self) -> bytes:
        """The whole message."""
        return b"".join([self.head, *self.rows.chunks, self.tail])

    def write(self, transport: Any) -> None:
        """Write the message to a buffered transport and flush it, flushing also about every
        :data:`WRITE_BATCH_BYTES` (an unframed stream may be flushed anywhere), so a big answer
        is not copied whole once more into the transport's buffer.

        Raises what the transport raises (``TTransportException``, ``OSError``).
        """
        batch: List[bytes] = [self.head]
        size = len(self.head)
        for chunk in self.rows.chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= WRITE_BATCH_BYTES:
                transport.write(b"".join(batch))
                transport.flush()
                batch, size = [], 0
        batch.append(self.tail)
        transport.write(b"".join(batch))
        transport.flush()


def call_reply(seqid: int, response: Any) -> CallReply:
    """The reply to ``call`` number ``seqid`` answering ``response`` (an ``ExtensionResponse``
    or None; its ``response`` may be :class:`EncodedRows`): byte for byte what the generated
    ``call_result(success=response).write`` writes after ``writeMessageBegin("call", REPLY,
    seqid)``, except that text UTF-8 cannot encode is escaped where the generated code raises.

    Everything that can fail to encode fails here, before a byte is written: ``struct.error``
    for a code or uuid out of range, ``AttributeError``/``TypeError`` for a row or a message
    that is not strings.
    """
    head = [_REPLY_HEADER, _I32(seqid)]
    if response is None:
        return CallReply(b"".join([*head, _STOP]), EncodedRows([]), b"")
    head.append(_field(_STRUCT, 0))
    status = response.status
    if status is not None:
        head.append(_field(_STRUCT, 1))
        if status.code is not None:
            head += (_field(_I32_TYPE, 1), _I32(status.code))
        if status.message is not None:
            head += (_field(_STRING, 2), _string(status.message))
        if status.uuid is not None:
            head += (_field(_I64_TYPE, 3), _I64(status.uuid))
        head.append(_STOP)
    if response.response is None:
        return CallReply(b"".join([*head, _STOP, _STOP]), EncodedRows([]), b"")
    rows = encode_rows(response.response)
    head += (_field(_LIST, 2), bytes((_MAP,)), _I32(len(rows)))
    return CallReply(b"".join(head), rows, _STOP + _STOP)
