"""Rendering records as ``table``, ``json``, ``jsonl``, ``csv`` and ``ecs``.

Records are mappings of column name to ``str``/``int``/``bool``/``None``.  Their strings come
from processes (names, command lines, paths) and a process can name itself anything: control
characters, ANSI escape sequences, bidirectional overrides, bytes that are not UTF-8 (which
arrive from ``os.fsdecode`` as lone surrogates, PEP 383).  So:

- ``table`` and ``csv`` show every unprintable code point as a visible escape (``\\n``,
  ``\\x1b``, ``\\u009b``, ``\\u202e``; an undecodable byte as ``\\xff``) and double
  backslashes, so a printed line is exactly one line, cannot drive the terminal, and reads
  back unambiguously.
  ``table`` also cuts cells that are too wide, with an ellipsis.
- ``json``, ``jsonl`` and ``ecs`` are lossless: JSON's own escapes (ASCII only, RFC 8259
  section 7), except undecodable bytes, which JSON cannot carry and which become ``\\xff`` as
  text.  Nothing is cut.
"""

from __future__ import annotations

import csv
import datetime
import io
import ipaddress
import json
import time
import unicodedata
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from agent.records import Value

FORMATS = ("table", "json", "jsonl", "csv", "ecs")
TABLE_CELL_LIMIT = 60
"""Display columns a table cell may take before it is cut."""
TABLE_COLUMNS = (
    "pid",
    "name",
    "username",
    "direction",
    "protocol",
    "remote_address",
    "remote_port",
    "address_class",
    "local_port",
    "container_id",
    "systemd_unit",
    "path",
)
"""A table-width choice of the Connection columns: the process first, then the destination."""
HISTORY_TABLE_COLUMNS = (
    *TABLE_COLUMNS[: TABLE_COLUMNS.index("address_class") + 1],
    *("first_seen", "last_seen", "samples", "connections", "open"),
)
"""The same for history rows: who, where to, then when and how often."""
ECS_VERSION = "8.11.0"
ELLIPSIS = "\u2026"

# --- escaping -------------------------------------------------------------------------------

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    """The visible escape of one unprintable character (or of the backslash).

    ``\\xHH`` is an ASCII control or, from 0x80 up, a byte that was not UTF-8; code points
    from U+0080 up are ``\\uHHHH`` or ``\\UHHHHHHHH``, so no two inputs share an escape.
    """
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte under surrogateescape (PEP 383)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: object, limit: Optional[int], reversible: bool) -> str:
    if not isinstance(text, str):
        text = str(text)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1 display column, not {limit}")
        return _cut(text, limit, reversible)
    if text.isprintable() and not (reversible and "\\" in text):
        return text
    return "".join(
        c if c.isprintable() and not (reversible and c == "\\") else _escape(c) for c in text
    )


def safe_text(text: object, limit: Optional[int] = None) -> str:
    """``text`` as one line that is safe on a terminal and in a log (for messages).

    Every character ``str.isprintable`` refuses (C0 and C1 controls, DEL, ESC, line and
    paragraph separators, format characters such as U+202E, surrogates, unassigned code
    points) is shown as an escape, so no text can start a new line or drive the terminal.
    Backslashes stay as they are, so a message that already quotes a value with ``repr``
    reads the same.  With ``limit``, the result is cut to at most that many display columns,
    ending in an ellipsis.
    """
    return _escaped(text, limit, reversible=False)


def cell_text(text: object, limit: Optional[int] = None) -> str:
    """Like :func:`safe_text`, but reversible: backslashes are doubled too, so the text of a
    process named ``a\\nb`` (backslash, n) differs from that of one named ``a``, newline,
    ``b``.  Table and CSV cells are shown this way.
    """
    return _escaped(text, limit, reversible=True)


def _width(char: str) -> int:
    """Display columns of one printable character (East Asian wide: 2, combining: 0)."""
    if char < "\u0300":
        return 1
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Display columns of escaped text (the output of :func:`safe_text`, :func:`cell_text`)."""
    if text.isascii():
        return len(text)
    return sum(_width(c) for c in text)


def _cut(text: str, limit: int, reversible: bool) -> str:
    """Escape ``text`` and cut it to ``limit`` display columns, looking at no more of it than
    that needs (a 100 KB command line costs no more than a short one).  Characters are also
    capped at four per column, so a pile of combining marks cannot make a cell tall.
    """
    pieces: List[Tuple[str, int]] = []
    width = 0
    cut = False
    for count, char in enumerate(text):
        if count >= 4 * limit:
            cut = True
            break
        plain = char.isprintable() and not (reversible and char == "\\")
        piece = char if plain else _escape(char)
        piece_width = _width(piece) if len(piece) == 1 else len(piece)
        if width + piece_width > limit:
            cut = True
            break
        pieces.append((piece, piece_width))
        width += piece_width
    if cut:
        room = max(limit - 1, 0)
        while pieces and width > room:
            width -= pieces.pop()[1]
        return "".join(piece for piece, _ in pieces) + ELLIPSIS
    return "".join(piece for piece, _ in pieces)


def utf8_safe(text: str) -> str:
    """``text`` with each lone surrogate (an undecodable byte, PEP 383) replaced by its escape
    as text (``\\xff``), so that it can be encoded as UTF-8: for JSON, for Thrift (which
    refuses the whole response otherwise) and for SQLite.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape(c) if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def json_safe(document: Any) -> Any:
    """``document`` (dicts, lists, tuples, scalars) with every string, keys too, made
    :func:`utf8_safe`: what ``json.dumps`` can write as lossless ASCII."""
    if isinstance(document, str):
        return utf8_safe(document)
    if isinstance(document, dict):
        return {utf8_safe(str(k)): json_safe(v) for k, v in document.items()}
    if isinstance(document, (list, tuple)):
        return [json_safe(v) for v in document]
    return document


# --- the formats ----------------------------------------------------------------------------


def _columns(records: Sequence[Mapping[str, Value]], columns: Optional[Sequence[str]]) -> List[str]:
    """The given columns, or every key of the records in order of first appearance."""
    if columns is not None:
        return list(columns)
    seen: Dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    return list(seen)


def _table_value(value: Value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(records: Sequence[Mapping[str, Value]], columns: List[str], cell_limit: int) -> str:
    if not records:
        return ""
    rows = [[cell_text(column, cell_limit) for column in columns]]
    for record in records:
        rows.append([cell_text(_table_value(record.get(c)), cell_limit) for c in columns])
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(columns))]
    numeric = [
        all(
            isinstance(record.get(c), int) and not isinstance(record.get(c), bool)
            for record in records
            if record.get(c) is not None
        )
        for c in columns
    ]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - display_width(cell))
            cells.append(pad + cell if numeric[i] else cell + pad)
        lines.append("  ".join(cells).rstrip(" "))
    return "\n".join(lines) + "\n"


def _json_value(value: Value) -> Value:
    return utf8_safe(value) if isinstance(value, str) else value


def _json_record(record: Mapping[str, Value], columns: List[str]) -> Dict[str, Value]:
    return {utf8_safe(c): _json_value(record.get(c)) for c in columns}


def _dumps(document: object) -> str:
    return json.dumps(document, ensure_ascii=True, separators=(", ", ": "))


def _csv_value(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return cell_text(value)


def _csv(records: Sequence[Mapping[str, Value]], columns: List[str]) -> str:
    if not columns:
        return ""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([cell_text(c) for c in columns])
    for record in records:
        writer.writerow([_csv_value(record.get(c)) for c in columns])
    return stream.getvalue()


def render(
    records: Iterable[Mapping[str, Value]],
    columns: Optional[Sequence[str]] = None,
    fmt: str = "table",
    *,
    now: Optional[float] = None,
    cell_limit: int = TABLE_CELL_LIMIT,
) -> str:
    """The records as text in format ``fmt`` (one of :data:`FORMATS`), ending in a newline.

    ``columns`` picks and orders the columns (``None``: every key, in order of first
    appearance); a record without a column has ``None`` there.  ``ecs`` ignores ``columns``:
    each document is built from the whole record (see :func:`ecs_document`), stamped with the
    record's ``last_seen`` or else ``now`` (default: the current time).  ``table`` renders no
    records as an empty string, ``json`` as ``[]``, ``csv`` as the header alone (nothing
    when there are no columns either).
    """
    records = list(records)
    if fmt == "ecs":
        stamp = time.time() if now is None else now
        return "".join(_dumps(ecs_document(record, stamp)) + "\n" for record in records)
    names = _columns(records, columns)
    if fmt == "table":
        return _table(records, names, cell_limit)
    if fmt == "csv":
        return _csv(records, names)
    if fmt == "jsonl":
        return "".join(_dumps(_json_record(record, names)) + "\n" for record in records)
    if fmt == "json":
        if not records:
            return "[]\n"
        body = ",\n".join("  " + _dumps(_json_record(record, names)) for record in records)
        return "[\n" + body + "\n]\n"
    raise ValueError(f"unknown output format {fmt!r} (known: {', '.join(FORMATS)})")


# --- Elastic Common Schema ------------------------------------------------------------------

TRANSPORTS = {6: "tcp", 17: "udp"}
FAMILIES = {2: "ipv4", 10: "ipv6"}
ECS_DIRECTIONS = {"outbound": "egress", "inbound": "ingress"}
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # RFC 4291 section 2.5.5.2
# Columns that land in ECS fields; every other column goes under ``egress_agent``.
ECS_MAPPED = frozenset(
    {
        "pid",
        "name",
        "path",
        "cmdline",
        "uid",
        "username",
        "parent",
        "process_start_time",
        "process_uuid",
        "container_id",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "protocol",
        "family",
    }
)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ip(text: Value) -> Optional[str]:
    """``text`` without its zone index when it is an IP address (Elasticsearch's ``ip`` type
    takes no zone), as written: ``::ffff:192.0.2.1`` stays readable, and Elasticsearch treats
    it as the same value as ``192.0.2.1``.
    """
    if not isinstance(text, str):
        return None
    address = text.partition("%")[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    return address


def _put(document: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set a nested field; missing values (``None``, ``""``) are left out, as ECS asks."""
    if value is None or value == "":
        return
    *parents, leaf = dotted.split(".")
    for parent in parents:
        document = document.setdefault(parent, {})
    document[leaf] = utf8_safe(value) if isinstance(value, str) else value


def _endpoint(document: Dict[str, Any], prefix: str, address: Value, port: Value) -> None:
    _put(document, f"{prefix}.address", address)
    _put(document, f"{prefix}.ip", _ip(address))
    if isinstance(port, int) and not isinstance(port, bool) and port > 0:
        _put(document, f"{prefix}.port", port)


def ecs_document(record: Mapping[str, Value], timestamp: float) -> Dict[str, Any]:
    """One connection record as an Elastic Common Schema event (ECS 8.x, network category).

    ``source`` is the end that opened the connection (ECS: "the sender"), so for an inbound
    connection it is the remote end; ``network.direction`` is ``egress``/``ingress``, the
    values ECS gives for a host's own view.  ``network.type`` says what is on the wire: an
    IPv4-mapped remote address on an AF_INET6 socket is ``ipv4``.  Columns without an ECS
    field go under ``egress_agent`` with their own names.
    """
    get = record.get
    stamp = get("last_seen")
    document: Dict[str, Any] = {}
    _put(document, "@timestamp", _iso(stamp if isinstance(stamp, (int, float)) else timestamp))
    _put(document, "ecs.version", ECS_VERSION)
    document["event"] = {
        "kind": "event",
        "category": ["network"],
        "type": ["connection"],
        "module": "egress_agent",
        "dataset": "egress_agent.connection",
    }
    pid = get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        _put(document, "process.pid", pid)
    _put(document, "process.name", get("name"))
    _put(document, "process.executable", get("path"))
    _put(document, "process.command_line", get("cmdline"))
    _put(document, "process.parent.pid", get("parent"))
    start = get("process_start_time")
    if isinstance(start, int) and not isinstance(start, bool):
        _put(document, "process.start", _iso(start))
    _put(document, "process.entity_id", get("process_uuid"))
    _put(document, "user.name", get("username"))
    uid = get("uid")
    if uid is not None:
        _put(document, "user.id", str(uid))
    _put(document, "container.id", get("container_id"))

    local = (get("local_address"), get("local_port"))
    remote = (get("remote_address"), get("remote_port"))
    direction = get("direction")
    source, destination = (remote, local) if direction == "inbound" else (local, remote)
    _endpoint(document, "source", *source)
    _endpoint(document, "destination", *destination)

    protocol = get("protocol")
    if isinstance(protocol, int):
        _put(document, "network.transport", TRANSPORTS.get(protocol))
        _put(document, "network.iana_number", str(protocol))
    remote_ip = _ip(remote[0])
    family = get("family")
    network_type = FAMILIES.get(family) if isinstance(family, int) else None
    if remote_ip is not None and ipaddress.ip_address(remote_ip) in IPV4_MAPPED:
        network_type = "ipv4"
    _put(document, "network.type", network_type)
    _put(document, "network.direction", ECS_DIRECTIONS.get(str(direction)))
    related = [ip for ip in (_ip(local[0]), remote_ip) if ip is not None]
    if related:
        document["related"] = {"ip": sorted(set(related))}

    for key, value in record.items():
        if key not in ECS_MAPPED:
            _put(document, f"egress_agent.{utf8_safe(key)}", value)
    return document
