"""Records as text: ``table``, ``json``, ``jsonl``, ``csv`` and ``ecs``, one formatter each.

Records are mappings of column name to ``str``/``int``/``bool``/``None``.  Their text is
escaped by the policy of :mod:`agent.textsafe`:

- ``table`` and ``csv`` show every unprintable code point as a visible escape (``\\n``,
  ``\\x1b``, ``\\u202e``; an undecodable byte as ``\\xff``) and double backslashes, so a printed
  line is exactly one line, cannot drive the terminal, and reads back unambiguously.  ``table``
  also cuts cells that are too wide, with an ellipsis.  ``csv`` also neutralises formulas
  (:func:`csv_cell`, OWASP's "CSV Injection"): a spreadsheet never runs a cell as a formula.
- ``json``, ``jsonl`` and ``ecs`` are lossless: JSON's own escapes (ASCII only, RFC 8259
  section 7), except undecodable bytes, which JSON cannot carry and which become ``\\xff`` as
  text.  Nothing is cut.

:data:`FORMATTERS` is the one list of formats: the command line's ``--format`` choices derive
from it (:func:`format_choices`), so a new format is one entry here.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from agent.inet import PROTOCOL_NAMES
from agent.records import Value
from agent.textsafe import cell_text, display_width, utf8_safe

Record = Mapping[str, Value]

TABLE_CELL_LIMIT = 60
"""Display columns a table cell may take before it is cut."""
TABLE_COLUMNS = (
    "pid",
    "name",
    "username",
    "login_user",
    "direction",
    "protocol",
    "state",
    "remote_address",
    "remote_port",
    "remote_domain",
    "address_class",
    "local_port",
    "namespace",
    "systemd_unit",
    "path",
    "exe_status",
)
"""A table-width choice of the Connection columns: the process first, then the destination,
then where it lives (see :func:`table_view`)."""
HISTORY_TABLE_COLUMNS = (
    *(c for c in TABLE_COLUMNS[: TABLE_COLUMNS.index("address_class") + 1] if c != "state"),
    "namespace",
    *("first_seen", "last_seen", "samples", "connections", "open"),
)
"""The same for history rows: who, where to, then when and how often."""


def table_view(
    records: Iterable[Record], names: Mapping[int, str], host: Optional[int]
) -> List[Dict[str, Value]]:
    """Records as a person reads them in a table: ``protocol`` by name (``tcp``, ``udp``: the
    machine formats keep osquery's numbers), and a ``namespace`` column saying where a row
    outside the host's own network namespace lives: its container (short id), else the
    ``ip netns`` name of its namespace (``names``), else the namespace's inode; a container
    only a user's own cgroups claim says so (``rootless``) with its owner's uid."""
    rows = []
    for record in records:
        row = dict(record)
        protocol = row.get("protocol")
        if isinstance(protocol, int) and not isinstance(protocol, bool):
            row["protocol"] = PROTOCOL_NAMES.get(protocol, str(protocol))
        container = row.get("container_id")
        rootless = row.get("rootless_container_id")
        namespace = row.get("net_namespace")
        if container:
            row["namespace"] = _container_cell(row, str(container))
        elif rootless:
            row["namespace"] = f"rootless {str(rootless)[:12]} uid {row.get('rootless_uid')}"
        elif isinstance(namespace, int) and namespace != host:
            row["namespace"] = names.get(namespace, f"net:[{namespace}]")
        else:
            row["namespace"] = ""
        rows.append(row)
    return rows


def _container_cell(row: Mapping[str, Value], container: str) -> str:
    """Where a container's row lives: its pod (``pod NAMESPACE/POD``), else the container by
    name, else by short id."""
    namespace, pod, name = row.get("pod_namespace"), row.get("pod_name"), row.get("container_name")
    if namespace and pod:
        return f"pod {namespace}/{pod}"
    if name:
        return f"container {name}"
    return f"container {container[:12]}"


def _columns(records: Sequence[Record], columns: Optional[Sequence[str]]) -> List[str]:
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


def _table(records: Sequence[Record], columns: List[str], cell_limit: int) -> str:
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


def _json_record(record: Record, columns: List[str]) -> Dict[str, Value]:
    return {utf8_safe(c): _json_value(record.get(c)) for c in columns}


def _dumps(document: object) -> str:
    return json.dumps(document, ensure_ascii=True, separators=(", ", ": "))


CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters with which a spreadsheet (Excel, LibreOffice, Google Sheets) may read a cell
as a formula (OWASP, "CSV Injection")."""
CSV_QUOTE = "'"


def csv_cell(text: str) -> str:
    """``text`` as a CSV cell no spreadsheet runs: one ``'`` put in front when it begins with
    ``=``, ``+``, ``-``, ``@``, tab, CR (OWASP's list) or with ``'`` itself.

    The rule holds for numbers too (``-1`` is written ``'-1``): one rule that looks at the first
    character only, whatever the column, cannot be bypassed by a value that merely starts like a
    number (``-2+3+cmd|...`` is a formula).  Quoting a leading ``'`` as well keeps the cell
    reversible: to read the value back, drop one leading ``'``.
    """
    if text.startswith(CSV_FORMULA_STARTS) or text.startswith(CSV_QUOTE):
        return CSV_QUOTE + text
    return text


def _csv_value(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return csv_cell(cell_text(value))


def _csv(records: Sequence[Record], columns: List[str]) -> str:
    if not columns:
        return ""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([csv_cell(cell_text(c)) for c in columns])
    for record in records:
        writer.writerow([_csv_value(record.get(c)) for c in columns])
    return stream.getvalue()


def _jsonl(records: Sequence[Record], columns: List[str]) -> str:
    return "".join(_dumps(_json_record(record, columns)) + "\n" for record in records)


def _json(records: Sequence[Record], columns: List[str]) -> str:
    if not records:
        return "[]\n"
    body = ",\n".join("  " + _dumps(_json_record(record, columns)) for record in records)
    return "[\n" + body + "\n]\n"


def _ecs(records: Sequence[Record], stamp: float) -> str:
    from agent.ecs import ecs_document  # only this format needs it

    return "".join(_dumps(ecs_document(record, stamp)) + "\n" for record in records)


@dataclass(frozen=True)
class Formatter:
    """One output format: how it writes records, and what it suits."""

    name: str
    write: Callable[[Sequence[Record], List[str], RenderOptions], str]
    stream: bool
    """One document a line: it can follow a running ``watch``."""
    connections_only: bool = False
    """Meaningful only for connection records (a schema of connection fields)."""
    whole_records: bool = False
    """Ignores the choice of columns: each document is built from the whole record."""


@dataclass(frozen=True)
class RenderOptions:
    now: float
    cell_limit: int


FORMATTERS: Dict[str, Formatter] = {
    formatter.name: formatter
    for formatter in (
        Formatter("table", lambda r, c, o: _table(r, c, o.cell_limit), stream=False),
        Formatter("json", lambda r, c, o: _json(r, c), stream=False),
        Formatter("jsonl", lambda r, c, o: _jsonl(r, c), stream=True),
        Formatter("csv", lambda r, c, o: _csv(r, c), stream=False),
        Formatter(
            "ecs",
            lambda r, c, o: _ecs(r, o.now),
            stream=True,
            connections_only=True,
            whole_records=True,
        ),
    )
}
FORMATS = tuple(FORMATTERS)


def format_choices(*, stream: bool = False, connections: bool = True) -> List[str]:
    """The formats a command offers: every one, or those that ``stream`` one record a line,
    leaving out those meaningful for connections only when the records are something else."""
    return [
        name
        for name, formatter in FORMATTERS.items()
        if (formatter.stream or not stream) and (connections or not formatter.connections_only)
    ]


def render(
    records: Iterable[Record],
    columns: Optional[Sequence[str]] = None,
    fmt: str = "table",
    *,
    now: Optional[float] = None,
    cell_limit: int = TABLE_CELL_LIMIT,
) -> str:
    """The records as text in format ``fmt`` (one of :data:`FORMATS`), ending in a newline.

    ``columns`` picks and orders the columns (``None``: every key, in order of first
    appearance); a record without a column has ``None`` there.  ``ecs`` ignores ``columns``:
    each document is built from the whole record (:func:`agent.ecs.ecs_document`), stamped with
    the record's ``last_seen`` or else ``now`` (default: the current time).  ``table`` renders
    no records as an empty string, ``json`` as ``[]``, ``csv`` as the header alone (nothing
    when there are no columns either).  Raises ValueError for an unknown format.
    """
    formatter = FORMATTERS.get(fmt)
    if formatter is None:
        raise ValueError(f"unknown output format {fmt!r} (known: {', '.join(FORMATS)})")
    rows = list(records)
    names = [] if formatter.whole_records else _columns(rows, columns)
    options = RenderOptions(now=time.time() if now is None else now, cell_limit=cell_limit)
    return formatter.write(rows, names, options)
