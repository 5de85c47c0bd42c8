"""The rows to learn from: history files and osquery results exported from Fleet, each row
labelled with its host.

- A history file is opened through a private copy (:mod:`agent.history.copy`, what
  ``HistoryStore(read_only=True)`` does): nothing is written beside it.  Its host is the
  host name its agent runs recorded (the latest), else the file's name.
- An export holds rows of ``external_connection_history`` as Fleet gives them: a JSON array of
  rows, the JSON of a query report (``{"results": [{"host_name", "columns": {...}}]}``) or of a
  live query (``[{"host": ..., "rows": [...]}]``), osquery's result log (JSON lines with
  ``hostIdentifier`` and ``columns`` or ``snapshot``), or CSV with a header.  Every value may
  come as text (CSV always does) and is read back into the history's types.  The host of a row
  is its first non-empty :data:`HOST_KEYS` column, else the file's name.

Only egress rows are kept (direction ``outbound`` or ``unknown``, external) that overlap the
window.  A file that cannot be read, or is neither a history nor such an export, raises
:class:`SourceError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from agent.evidence import EGRESS_DIRECTIONS, Window, evidence_of, text, truthy
from agent.textsafe import safe_text

HOST_KEYS = (
    "host_display_name",
    "host_hostname",
    "host_name",
    "hostname",
    "hostIdentifier",
    "host_identifier",
    "computer_name",
    "host",
)
"""Where an export names the host of a row, in the order they are tried."""

INTEGER_COLUMNS = frozenset(
    {"pid", "uid", "protocol", "remote_port", "first_seen", "last_seen", "connections", "family"}
)
BOOLEAN_COLUMNS = frozenset({"external", "allowlisted", "open"})
EXPORT_LIMIT = 256 * 1024 * 1024
"""Bytes of an export read at most: a bigger file is refused rather than read into memory."""


class SourceError(Exception):
    """A source that cannot be learned from; the message names the file and the problem."""


@dataclass
class Source:
    """What one file gave: its egress rows (each with a ``host`` key), the agent runs a history
    recorded (none for an export), and its hosts."""

    path: str
    kind: str
    """``history`` or ``export``."""
    rows: List[Dict[str, Any]] = field(default_factory=list)
    runs: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def hosts(self) -> List[str]:
        return sorted({str(row["host"]) for row in self.rows})


def _file_label(path: str) -> str:
    return os.path.basename(path) or path


def read_history(path: str, window: Window) -> Source:
    """The egress rows and runs of the history file ``path`` in ``window``."""
    from agent.history import HISTORY_COLUMNS, HistoryStore, HistoryUnavailable

    store = HistoryStore(path, retention_days=0, max_rows=0, read_only=True)
    try:
        rows = store.query(
            columns=[name for name, _ in HISTORY_COLUMNS],
            since=window.since,
            until=window.until,
            directions=EGRESS_DIRECTIONS,
        )
        runs = store.runs(since=window.since, until=window.until)
        every = runs or store.runs()  # a window without runs: the file's hosts name it
    except HistoryUnavailable as error:
        raise SourceError(str(error)) from None
    finally:
        store.close()
    named = [text(run, "hostname") for run in every if text(run, "hostname")]
    host = named[-1] if named else _file_label(path)
    kept = evidence_of(rows, [], window).rows
    return Source(path, "history", [dict(row, host=host) for row in kept], list(runs))


# --- exports ----------------------------------------------------------------------------------


def read_export(path: str, window: Window) -> Source:
    """The egress rows in ``window`` of an osquery results file exported from Fleet."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(EXPORT_LIMIT + 1)
    except OSError as error:
        raise SourceError(f"cannot read {safe_text(path)}: {error.strerror or error}") from None
    if len(data) > EXPORT_LIMIT:
        raise SourceError(f"{safe_text(path)}: larger than {EXPORT_LIMIT // 2**20} MiB")
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceError(
            f"{safe_text(path)}: not UTF-8 text (byte {data[error.start]:#04x} at {error.start})"
        ) from None
    label = _file_label(path)
    stripped = content.lstrip()
    if stripped[:1] in ("[", "{"):
        found = list(_json_rows(_json_documents(stripped, path), label))
    else:
        found = _csv_rows(content, path, label)
    if not found:
        raise SourceError(f"{safe_text(path)}: no rows of external_connection_history in it")
    for row in found:
        if "remote_address" not in row:
            raise SourceError(
                f"{safe_text(path)}: not an export of external_connection_history: its rows "
                "have no remote_address column"
            )
    rows = [_typed(row) for row in found]
    kept = [row for row in rows if _is_egress(row) and _in_window(row, window)]
    return Source(path, "export", kept)


def _json_documents(content: str, path: str) -> List[Any]:
    """One JSON document, or JSON lines (osquery's result log: one object a line)."""
    try:
        return [json.loads(content)]
    except json.JSONDecodeError as whole:
        documents = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line))
            except json.JSONDecodeError:
                raise SourceError(
                    f"{safe_text(path)}: not JSON (line {whole.lineno}, column {whole.colno}: "
                    f"{whole.msg}) nor JSON lines (line {number})"
                ) from None
            except RecursionError:
                raise SourceError(f"{safe_text(path)}: JSON nested too deeply") from None
        return documents
    except RecursionError:
        raise SourceError(f"{safe_text(path)}: JSON nested too deeply") from None


def _host_of(mapping: Mapping[str, Any]) -> Optional[str]:
    for key in HOST_KEYS:
        value = mapping.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != "":
            return str(value)
    return None


def _json_rows(documents: Iterable[Any], label: str) -> Iterable[Dict[str, Any]]:
    """Rows with their hosts out of any of the JSON shapes the module docstring lists."""
    for document in documents:
        items = document if isinstance(document, list) else [document]
        for item in items:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("results"), list):  # a Fleet query report
                yield from _json_rows([item["results"]], _host_of(item) or label)
                continue
            host = _host_of(item) or label
            if isinstance(item.get("columns"), dict):  # a result log event, a report result
                yield dict(item["columns"], host=_host_of(item["columns"]) or host)
            elif isinstance(item.get("snapshot"), list):  # a result log snapshot
                for row in item["snapshot"]:
                    if isinstance(row, dict):
                        yield dict(row, host=_host_of(row) or host)
            elif isinstance(item.get("rows"), list):  # a live query's results, per host
                for row in item["rows"]:
                    if isinstance(row, dict):
                        yield dict(row, host=_host_of(row) or host)
            else:
                yield dict(item, host=host)


def _csv_rows(content: str, path: str, label: str) -> List[Dict[str, Any]]:
    try:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        rows = []
        for row in reader:
            if None in row:
                raise SourceError(
                    f"{safe_text(path)}: line {reader.line_num}: more fields than the header"
                )
            rows.append(dict(row, host=_host_of(row) or label))
        return rows
    except csv.Error as error:
        raise SourceError(f"{safe_text(path)}: not CSV: {error}") from None


def _integer(value: Any) -> Optional[int]:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(float(str(value).strip()))
    except (ValueError, OverflowError):
        return None


def _typed(row: Mapping[str, Any]) -> Dict[str, Any]:
    """A row with the history's types (text from CSV and some JSON exports)."""
    typed: Dict[str, Any] = {}
    for key, value in row.items():
        if key in INTEGER_COLUMNS:
            typed[key] = _integer(value)
        elif key in BOOLEAN_COLUMNS:
            typed[key] = truthy({key: value}, key) and str(value).lower() != "false"
        else:
            typed[key] = "" if value is None else str(value)
    typed.setdefault("protocol", 6)
    typed.setdefault("connections", 1)
    return typed


def _is_egress(row: Mapping[str, Any]) -> bool:
    """Outbound or unknown direction, external (an export without those columns is taken as
    the query chose it: external_connection_history holds external rows only)."""
    direction = text(row, "direction") or "outbound"
    external = row.get("external", True)
    return direction in EGRESS_DIRECTIONS and bool(external)


def _in_window(row: Mapping[str, Any], window: Window) -> bool:
    first, last = row.get("first_seen"), row.get("last_seen")
    if first is None and last is None:
        return True
    start = first if first is not None else last
    end = last if last is not None else first
    return start is not None and end is not None and start <= window.until and end >= window.since


def read_source(path: str, window: Window) -> Source:
    """A history file or an export, told apart by their first bytes (SQLite's header)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(16)
    except OSError as error:
        raise SourceError(f"cannot read {safe_text(path)}: {error.strerror or error}") from None
    if head == b"SQLite format 3\x00":
        return read_history(path, window)
    return read_export(path, window)


def every_host(sources: Iterable[Source]) -> Tuple[str, ...]:
    """Every host the sources name, sorted."""
    hosts = set()
    for source in sources:
        hosts.update(source.hosts)
        hosts.update(text(run, "hostname") for run in source.runs if text(run, "hostname"))
    return tuple(sorted(hosts))
