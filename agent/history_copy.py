"""Reading a history file without touching it: a private copy, opened by the store.

SQLite does not leave a file alone even when asked to only read it: ``mode=ro`` on a WAL
database creates ``-wal`` and ``-shm`` files beside it and leaves them there (seen with SQLite
3.40), and the store moves a file it cannot use aside and starts a new one.  An auditor's copy
of a host's history is evidence, and the live store belongs to its writers, so ``report`` and
``audit`` copy the file and its ``-wal`` (https://sqlite.org/wal.html: committed transactions
not yet checkpointed live there) into a private directory and open the copy.  When either
file changed while it was copied (a writer committed or checkpointed), the copy is taken
again, up to :data:`COPY_ATTEMPTS` times.

:class:`CopiedHistory` gives today's store the two calls of :class:`agent.evidence.HistoryReader`
(``query`` and ``runs``) until the store has them itself; ``runs`` reads a ``runs`` table with
the columns :data:`agent.evidence.RUN_KEYS` when the file has one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from agent.evidence import RUN_KEYS, Window, number, row_span, run_span
from agent.history import HistoryStore, HistoryUnavailable

COPY_ATTEMPTS = 5
_FileState = Optional[Tuple[int, int, int, int]]


class HistoryFileError(RuntimeError):
    """The history file cannot be read; the message names it and says why."""


def _state(path: str) -> _FileState:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


@contextlib.contextmanager
def private_copy(path: str) -> Iterator[str]:
    """The path of a private copy of the history file ``path`` (and its ``-wal``), removed
    afterwards.  ``path`` itself is only ever read.

    Raises :class:`HistoryFileError` when ``path`` is missing, not a regular file, unreadable,
    or kept changing while it was copied.
    """
    try:
        status = os.stat(path)
    except OSError as error:
        raise HistoryFileError(f"cannot read history {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise HistoryFileError(f"cannot read history {path}: not a regular file")
    directory = tempfile.mkdtemp(prefix="egress-agent-history-")
    copy = os.path.join(directory, "history.db")
    try:
        for _ in range(COPY_ATTEMPTS):
            before = (_state(path), _state(path + "-wal"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy + "-wal")
            try:
                shutil.copyfile(path, copy)
                if before[1] is not None:
                    shutil.copyfile(path + "-wal", copy + "-wal")
            except FileNotFoundError:
                continue  # the -wal went away mid-copy (the last writer closed): again
            except OSError as error:
                raise HistoryFileError(
                    f"cannot read history {path}: {error.strerror or error}"
                ) from None
            if (_state(path), _state(path + "-wal")) == before:
                break
        else:
            raise HistoryFileError(
                f"cannot read history {path}: it changed every time it was copied "
                f"({COPY_ATTEMPTS} times)"
            )
        yield copy
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check(copy: str, original: str) -> List[str]:
    """The tables of the copy; raises :class:`HistoryFileError` when it is not a history
    store (not a database, corrupt, or without a ``history`` table)."""
    try:
        db = sqlite3.connect(copy)
        try:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        finally:
            db.close()
    except sqlite3.DatabaseError as error:
        raise HistoryFileError(f"{original} is not a history store: {error}") from None
    if verdict != "ok":
        raise HistoryFileError(f"{original} is corrupt: SQLite's quick_check says {verdict}")
    if "history" not in tables:
        raise HistoryFileError(f"{original} is not a history store: it has no history table")
    return tables


def _window(since: Optional[float], until: Optional[float]) -> Window:
    return Window(
        float("-inf") if since is None else since, float("inf") if until is None else until
    )


class CopiedHistory:
    """``query`` and ``runs`` over a private copy of a history file (interim: today's
    :class:`HistoryStore` has neither call)."""

    def __init__(self, copy: str, original: str) -> None:
        self._copy = copy
        self._original = original
        self._tables = _check(copy, original)
        self._store = HistoryStore(copy, retention_days=0, max_rows=0)

    def close(self) -> None:
        self._store.close()

    def query(
        self,
        *,
        columns: Optional[Sequence[str]] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        directions: Optional[Sequence[str]] = None,
    ) -> List[Dict[str, Any]]:
        """Rows overlapping ``[since, until]`` in the given directions, with ``columns``
        (a column the file lacks is None)."""
        try:
            rows = self._store.rows()
        except HistoryUnavailable as error:
            raise HistoryFileError(f"cannot read history {self._original}: {error}") from None
        if any(".corrupt-" in name for name in os.listdir(os.path.dirname(self._copy))):
            raise HistoryFileError(f"{self._original} is not a history store this agent reads")
        window = _window(since, until)
        kept = [
            row
            for row in rows
            if window.overlaps(row_span(row))
            and (directions is None or row.get("direction") in directions)
        ]
        if columns is None:
            return [dict(row) for row in kept]
        return [{name: row.get(name) for name in columns} for row in kept]

    def runs(
        self, since: Optional[float] = None, until: Optional[float] = None
    ) -> List[Dict[str, Any]]:
        """The runs overlapping ``[since, until]``, oldest first; none when the file has no
        ``runs`` table (written before runs were recorded)."""
        if "runs" not in self._tables:
            return []
        try:
            db = sqlite3.connect(self._copy)
            try:
                db.row_factory = sqlite3.Row
                records = [dict(r) for r in db.execute("SELECT * FROM runs")]
            finally:
                db.close()
        except sqlite3.DatabaseError as error:
            raise HistoryFileError(f"cannot read the runs in {self._original}: {error}") from None
        window = _window(since, until)
        runs = [{key: record.get(key) for key in RUN_KEYS} for record in records]
        overlapping = [run for run in runs if window.overlaps(run_span(run))]
        return sorted(overlapping, key=lambda run: number(run, "started_at"))


@contextlib.contextmanager
def open_history_copy(path: str) -> Iterator[CopiedHistory]:
    """The history file at ``path`` as a :class:`agent.evidence.HistoryReader`, read from a
    private copy; ``path`` is never written, locked, renamed or given companions.

    Raises :class:`HistoryFileError` (with the file's name and the reason).
    """
    with private_copy(path) as copy:
        reader = CopiedHistory(copy, path)
        try:
            yield reader
        finally:
            reader.close()
