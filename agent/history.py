"""The history store: every external connection the samplers have seen, in one SQLite file.

A live sample misses every connection that opens and closes between two queries; the
background sampler of the extension (and ``egress-agent watch``) records each sample here,
so a connection that lived at least one sampling interval is still visible after it closed.

Rows are aggregated per (process_uuid, protocol, remote_address, remote_port, direction):
``first_seen``/``last_seen`` (unix seconds), ``samples`` (samples it was in), ``connections``
(distinct local ends: a local end counts again only when it was absent from the previous
sample), ``open`` (1 when it was in the latest sample), plus the identity and classification
columns of the latest sample.

Operational rules (https://sqlite.org/wal.html, https://sqlite.org/howtocorrupt.html):

- WAL journal, ``synchronous=NORMAL``: readers never block the writer, a crash loses at most
  the last transaction.  Two writers (the extension and ``watch``) serialise through SQLite's
  own lock, waiting up to :data:`BUSY_TIMEOUT_S` (``busy_timeout``).
- Directory created 0700, file 0600 (SQLite gives ``-wal``/``-shm`` the database file's mode).
- Bounded after every write: rows older than ``retention_days`` go, then the oldest rows
  (by ``last_seen``) beyond ``max_rows``.
- A file that is not a database, is corrupt, or holds another schema is renamed to
  ``<path>.corrupt-<time>`` (nothing is deleted) and a new store is created.  Any other
  failure (unwritable, disk full, locked too long) is logged once per condition; the next
  write tries again.  The store never raises from :meth:`HistoryStore.record`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import operator
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from agent.output import utf8_safe
from agent.records import COLUMNS, Connection, Value

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0

KEY_COLUMNS: Tuple[str, ...] = (
    "process_uuid",
    "protocol",
    "remote_address",
    "remote_port",
    "direction",
)
"""What one history row aggregates over."""

PER_SOCKET_COLUMNS = frozenset({"fd", "socket", "state", "local_address", "local_port"})
"""Record columns that differ between the sockets of one row, so the history leaves them out."""

RECORD_COLUMNS: Tuple[Tuple[str, str], ...] = tuple(
    (name, sql_type) for name, sql_type in COLUMNS if name not in PER_SOCKET_COLUMNS
)
AGGREGATE_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("first_seen", "BIGINT"),
    ("last_seen", "BIGINT"),
    ("samples", "BIGINT"),
    ("connections", "BIGINT"),
    ("open", "INTEGER"),
)
HISTORY_COLUMNS: Tuple[Tuple[str, str], ...] = RECORD_COLUMNS + AGGREGATE_COLUMNS
"""(column name, osquery type) of a history row, in table order."""

_RECORD_NAMES = [name for name, _ in RECORD_COLUMNS]
_HISTORY_NAMES = [name for name, _ in HISTORY_COLUMNS]
_BOOL_COLUMNS = frozenset(
    f.name for f in dataclasses.fields(Connection) if f.type in ("bool", bool)
)
_SQLITE_TYPE = {"TEXT": "TEXT", "INTEGER": "INTEGER", "BIGINT": "INTEGER", "DOUBLE": "REAL"}

# The statements name columns of the Connection dataclass only, never anything from input.
_FIND = "SELECT id FROM history WHERE " + " AND ".join(f"{n} = ?" for n in KEY_COLUMNS)  # noqa: S608
_INSERT = (
    f"INSERT INTO history ({', '.join(_RECORD_NAMES)}, first_seen, last_seen, samples, "  # noqa: S608
    f"connections, open) VALUES ({', '.join('?' for _ in _RECORD_NAMES)}, ?, ?, 1, ?, 1)"
)
_UPDATE = (
    f"UPDATE history SET {', '.join(f'{n} = ?' for n in _RECORD_NAMES)}, "  # noqa: S608
    "last_seen = MAX(last_seen, ?), samples = samples + 1, connections = connections + ?, "
    "open = 1 WHERE id = ?"
)
_SELECT = f"SELECT {', '.join(_HISTORY_NAMES)} FROM history"  # noqa: S608
_OPEN_ROWS = f"SELECT id, {', '.join(KEY_COLUMNS)} FROM history WHERE open = 1"  # noqa: S608

LocalEnd = Tuple[str, int]
Key = Tuple[Any, ...]

log = logging.getLogger("egress_agent.history")


class HistoryUnavailable(RuntimeError):
    """The store cannot be read now; the message says why and names the file."""


def _schema() -> List[str]:
    record_columns = ",\n  ".join(
        f"{name} {_SQLITE_TYPE[sql_type]}" for name, sql_type in RECORD_COLUMNS
    )
    return [
        f"""CREATE TABLE IF NOT EXISTS history (
  id INTEGER PRIMARY KEY,
  {record_columns},
  first_seen INTEGER NOT NULL,
  last_seen INTEGER NOT NULL,
  samples INTEGER NOT NULL,
  connections INTEGER NOT NULL,
  open INTEGER NOT NULL,
  UNIQUE ({", ".join(KEY_COLUMNS)})
)""",
        "CREATE INDEX IF NOT EXISTS history_last_seen ON history (last_seen)",
        # The local ends of each row in the latest sample: what the next sample compares with.
        """CREATE TABLE IF NOT EXISTS open_ends (
  history_id INTEGER NOT NULL,
  local_address TEXT NOT NULL,
  local_port INTEGER NOT NULL,
  PRIMARY KEY (history_id, local_address, local_port)
) WITHOUT ROWID""",
        f"PRAGMA user_version = {SCHEMA_VERSION}",
    ]


class _Corrupt(Exception):
    """The file is not a history store we can use: move it aside."""


def _is_corruption(error: sqlite3.DatabaseError) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB map to the base DatabaseError (Modules/_sqlite/util.c);
    # locks, permissions, a full disk and I/O errors are OperationalError.
    name = getattr(error, "sqlite_errorname", None)
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    return type(error) is sqlite3.DatabaseError


class HistoryStore:
    """The SQLite history file at ``path``, opened on first use and reopened after a failure.

    Thread-safe: one connection behind a lock (the extension writes from its sampler thread
    and reads from Thrift handler threads).
    """

    def __init__(
        self,
        path: str,
        retention_days: float = 30,
        max_rows: int = 100_000,
        logger: Optional[logging.Logger] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self._log = logger or log
        self._clock = clock
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self._inode: Optional[Tuple[int, int]] = None
        self._conditions: Dict[str, str] = {}

    # -- public ----------------------------------------------------------------------------

    @property
    def problem(self) -> Optional[str]:
        """What keeps the store from working now (writing first), or None when it works."""
        for kind in ("write to", "read", "corrupt"):
            if kind in self._conditions:
                return self._conditions[kind]
        return None

    def record(self, connections: Iterable[Connection], at: Optional[float] = None) -> bool:
        """Add one sample (the connections seen at ``at``, unix seconds); True when stored.

        Pass the whole sample: a row absent from it is marked closed (``open`` 0).
        """
        now = int(self._clock() if at is None else at)
        groups = _group(connections)
        with self._lock:
            stored: Optional[bool] = self._attempt(
                "write to", lambda db: self._write(db, groups, now)
            )
            return bool(stored)

    def rows(self, since: Optional[float] = None) -> List[Dict[str, Value]]:
        """Every row (or those last seen at or after ``since``), oldest first.

        Raises :class:`HistoryUnavailable` when the file cannot be read.
        """
        with self._lock:
            result: Optional[List[Dict[str, Value]]] = self._attempt(
                "read", lambda db: self._select(db, since)
            )
            if result is None:
                raise HistoryUnavailable(self.problem or f"history store {self.path} unavailable")
            return result

    def query(
        self,
        *,
        columns: Optional[Sequence[str]] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        pids: Optional[Iterable[int]] = None,
        open_: Optional[bool] = None,
        directions: Optional[Iterable[str]] = None,
        limit: Optional[int] = None,
    ) -> List[Dict[str, Value]]:
        """Rows of ``external_connection_history``, newest first (by ``last_seen``), so that a
        ``limit`` keeps the newest.

        ``columns`` limits the keys of each row (None: every column); ``since``/``until``
        keep the rows that overlap [since, until] (``last_seen >= since``, ``first_seen <=
        until``); ``pids``, ``open_`` and ``directions`` keep rows with those values.
        Raises :class:`HistoryUnavailable` when the file cannot be read, ValueError for a
        column the history has not.
        """
        names = list(_HISTORY_NAMES if columns is None else columns)
        unknown = set(names) - set(_HISTORY_NAMES)
        if unknown:
            raise ValueError(f"history has no column {sorted(unknown)[0]!r}")
        where: List[str] = []
        parameters: List[Any] = []
        if since is not None:
            where.append("last_seen >= ?")
            parameters.append(int(since))
        if until is not None:
            where.append("first_seen <= ?")
            parameters.append(int(until))
        # Beyond 500 values an IN is left out (SQLite before 3.32 binds at most 999): a
        # superset is still right, callers filter (osquery core re-applies every constraint).
        wanted_pids = sorted(set(pids)) if pids is not None else []
        if pids is not None and len(wanted_pids) <= 500:
            where.append(f"pid IN ({', '.join('?' for _ in wanted_pids)})")
            parameters.extend(wanted_pids)
        wanted_directions = sorted(set(directions)) if directions is not None else []
        if directions is not None and len(wanted_directions) <= 500:
            where.append(f"direction IN ({', '.join('?' for _ in wanted_directions)})")
            parameters.extend(wanted_directions)
        if open_ is not None:
            where.append("open = ?")
            parameters.append(1 if open_ else 0)
        # Column names come from HISTORY_COLUMNS only (checked above), values are bound.
        statement = f"SELECT {', '.join(names) or '1'} FROM history"  # noqa: S608
        if where:
            statement += " WHERE " + " AND ".join(where)
        statement += " ORDER BY last_seen DESC, id DESC"
        if limit is not None:
            statement += " LIMIT ?"
            parameters.append(max(int(limit), 0))

        flags = [name in _BOOL_COLUMNS for name in names]

        def select(db: sqlite3.Connection) -> List[Dict[str, Value]]:
            return [
                {
                    name: bool(value) if flag and value is not None else value
                    for name, flag, value in zip(names, flags, values)
                }
                for values in db.execute(statement, parameters)
            ]

        with self._lock:
            result: Optional[List[Dict[str, Value]]] = self._attempt("read", select)
            if result is None:
                raise HistoryUnavailable(self.problem or f"history store {self.path} unavailable")
            return result

    def count(self) -> Optional[int]:
        """How many rows the store holds; None when it cannot be read."""
        with self._lock:
            result: Optional[int] = self._attempt(
                "read", lambda db: int(db.execute("SELECT COUNT(*) FROM history").fetchone()[0])
            )
            return result

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    # -- opening, failing, recovering ------------------------------------------------------

    def _attempt(self, verb: str, operation: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``operation`` on an open connection; log and return None when it fails."""
        for _ in range(2):  # a second time only after a corrupt file was moved aside
            try:
                db = self._connection()
                result = operation(db)
            except _Corrupt as error:
                if not self._set_aside(str(error)):
                    return None
                continue
            except sqlite3.DatabaseError as error:
                self._rollback()
                if _is_corruption(error):
                    if not self._set_aside(f"{error}"):
                        return None
                    continue
                self._fail(verb, error)
                return None
            except (OSError, ValueError) as error:  # ValueError: text SQLite cannot take
                self._rollback()
                self._fail(verb, error)
                return None
            self._recovered(verb)
            return result
        return None

    def _connection(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            if os.path.lexists(directory):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            status = os.fstat(fd)
            if status.st_mode & 0o077 and status.st_uid == os.geteuid():
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._inode = (status.st_dev, status.st_ino)
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version == 0 and tables:
                raise _Corrupt(f"holds tables {sorted(tables)[:5]} but no history store schema")
            if version not in (0, SCHEMA_VERSION):
                raise _Corrupt(f"has schema version {version}, this agent knows {SCHEMA_VERSION}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Corrupt(f"fails SQLite's quick_check: {check}")
            if version == 0:
                for statement in _schema():
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _disconnect(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _set_aside(self, why: str) -> bool:
        """Rename the unusable file (and its WAL) out of the way; True when a new one can start."""
        opened = self._inode
        self._disconnect()
        self._inode = None
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError as error:
            self._fail("inspect", error)
            return False
        if opened is not None and (status.st_dev, status.st_ino) != opened:
            return True  # another writer already replaced it
        target = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(self._clock()))}"
        suffix = 0
        while os.path.exists(target if not suffix else f"{target}.{suffix}"):
            suffix += 1
        if suffix:
            target = f"{target}.{suffix}"
        try:
            os.rename(self.path, target)
        except OSError as error:
            self._report(
                "corrupt",
                f"history store {self.path} is unusable ({why}) and cannot be moved aside: "
                f"{error.strerror or error}",
            )
            return False
        for extension in ("-wal", "-shm"):
            try:
                if extension == "-wal":
                    os.rename(self.path + extension, target + extension)
                else:
                    os.unlink(self.path + extension)
            except OSError:
                pass
        self._log.error(
            "history store %s is unusable (%s); moved it to %s and started a new one",
            self.path,
            why,
            target,
        )
        self._conditions.pop("corrupt", None)
        return True

    def _fail(self, verb: str, error: BaseException) -> None:
        self._disconnect()
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            if error.filename:
                reason = f"{reason}: {error.filename}"
        else:
            reason = str(error)
        self._report(verb, f"cannot {verb} history store {self.path}: {reason}")

    def _report(self, kind: str, message: str) -> None:
        """Log ``message`` unless the same condition of this kind was the last one logged."""
        if self._conditions.get(kind) != message:
            self._log.error("%s", message)
        self._conditions[kind] = message

    def _recovered(self, kind: str) -> None:
        # A write that worked means the store works; a read that worked says nothing of writes.
        cleared = [kind, "corrupt"] + (["read"] if kind == "write to" else [])
        if [name for name in cleared if self._conditions.pop(name, None) is not None]:
            self._log.warning("history store %s works again", self.path)

    # -- the SQL ---------------------------------------------------------------------------

    def _write(
        self, db: sqlite3.Connection, groups: Dict[Key, Tuple[Connection, Set[LocalEnd]]], now: int
    ) -> bool:
        """One sample in one transaction, in a few statements whatever its size: the open
        rows and their ends are read at once, rows seen again are updated with one
        ``executemany``, and ``open_ends`` is rewritten to this sample's ends (which is what
        it holds: the local ends of each open row in the latest sample)."""
        db.execute("BEGIN IMMEDIATE")
        open_rows: Dict[Key, int] = {tuple(row[1:]): row[0] for row in db.execute(_OPEN_ROWS)}
        previous: Dict[int, Set[LocalEnd]] = {}
        for row_id, address, port in db.execute(
            "SELECT history_id, local_address, local_port FROM open_ends"
        ):
            previous.setdefault(row_id, set()).add((address, port))
        db.execute("UPDATE history SET open = 0 WHERE open = 1")
        db.execute("DELETE FROM open_ends")
        updates: List[List[Value]] = []
        ends_rows: List[Tuple[int, str, int]] = []
        for key, (connection, ends) in groups.items():
            values = _record_values(connection)
            row_id = open_rows.get(key)
            if row_id is None:
                found = db.execute(_FIND, key).fetchone()  # seen before, closed since
                if found is None:
                    row_id = db.execute(_INSERT, [*values, now, now, len(ends)]).lastrowid
                else:
                    row_id = found[0]
                    updates.append([*values, now, len(ends), row_id])
            else:
                updates.append([*values, now, len(ends - previous.get(row_id, set())), row_id])
            ends_rows.extend((row_id, address, port) for address, port in ends)
        db.executemany(_UPDATE, updates)
        db.executemany("INSERT OR IGNORE INTO open_ends VALUES (?, ?, ?)", ends_rows)
        self._prune(db, now)
        db.execute("COMMIT")
        return True

    def _prune(self, db: sqlite3.Connection, now: int) -> None:
        pruned = 0
        if self.retention_days and self.retention_days > 0:
            cutoff = now - int(self.retention_days * 86400)
            pruned += db.execute("DELETE FROM history WHERE last_seen < ?", (cutoff,)).rowcount
        if self.max_rows and self.max_rows > 0:
            excess = db.execute("SELECT COUNT(*) FROM history").fetchone()[0] - self.max_rows
            if excess > 0:
                pruned += db.execute(
                    "DELETE FROM history WHERE id IN "
                    "(SELECT id FROM history ORDER BY last_seen, id LIMIT ?)",
                    (excess,),
                ).rowcount
        if pruned:
            db.execute("DELETE FROM open_ends WHERE history_id NOT IN (SELECT id FROM history)")

    def _select(self, db: sqlite3.Connection, since: Optional[float]) -> List[Dict[str, Value]]:
        query = _SELECT
        parameters: Tuple[Any, ...] = ()
        if since is not None:
            query += " WHERE last_seen >= ?"
            parameters = (int(since),)
        query += " ORDER BY first_seen, id"
        return [_row(values) for values in db.execute(query, parameters)]


def history_key(connection: Connection) -> Key:
    """The connection as history (and ``watch``) counts it: :data:`KEY_COLUMNS`."""
    return tuple(getattr(connection, name) for name in KEY_COLUMNS)


def _group(connections: Iterable[Connection]) -> Dict[Key, Tuple[Connection, Set[LocalEnd]]]:
    groups: Dict[Key, Tuple[Connection, Set[LocalEnd]]] = {}
    for connection in connections:
        key = history_key(connection)
        end = (connection.local_address, connection.local_port)
        if key in groups:
            groups[key][1].add(end)
        else:
            groups[key] = (connection, {end})
    return groups


_record_getter = operator.attrgetter(*_RECORD_NAMES)
_TEXT_INDEXES = [i for i, (_, sql_type) in enumerate(RECORD_COLUMNS) if sql_type == "TEXT"]


def _record_values(connection: Connection) -> List[Value]:
    """The record columns of ``connection`` as SQLite takes them (booleans are ints to
    sqlite3 already); text that UTF-8 cannot encode is escaped."""
    values: List[Value] = list(_record_getter(connection))
    for index in _TEXT_INDEXES:
        value = values[index]
        if isinstance(value, str) and not value.isascii():
            values[index] = utf8_safe(value)  # a process name may hold undecodable bytes
    return values


def _row(values: Iterable[Any]) -> Dict[str, Value]:
    row: Dict[str, Value] = {}
    for name, value in zip(_HISTORY_NAMES, values):
        row[name] = bool(value) if name in _BOOL_COLUMNS and value is not None else value
    return row
