"""The history store: every external connection the agent has seen, in one SQLite file.

A live sample misses every connection that opens and closes between two queries; the
extension's background sampler, ``egress-agent watch`` and the kernel event source record
what they see here, so a connection stays visible after it closed.  Several sources write the
same store, each in its own terms:

- :meth:`HistoryStore.snapshot`: a source's whole view of some namespaces at one moment (a
  sample); rows of that source and scope that are absent from it are closed, nothing else;
- :meth:`HistoryStore.observe`: :class:`Observation` events, a connection seen opening, seen
  alive or seen closing, at a time, by a source.

Rows are aggregated per :data:`KEY_COLUMNS`, with the aggregate columns of
:data:`agent.history.schema.AGGREGATE_COLUMNS` and the identity and classification columns of
the latest sighting.  A row is open while some source holds one of its local ends open
(``open_ends``: which source, which namespace, which end).  The agent's own runs (start,
heartbeats, stop) are kept beside them (:meth:`HistoryStore.runs`), so that gaps are known.

Operational rules (https://sqlite.org/wal.html, https://sqlite.org/howtocorrupt.html):

- WAL journal, ``synchronous=NORMAL``: readers never block the writer, a crash loses at most
  the last transaction.  Two writers (the extension and ``watch``) serialise through SQLite's
  own lock, waiting up to :data:`BUSY_TIMEOUT_S` (``busy_timeout``).
- Directory created 0700, file 0600 (SQLite gives ``-wal``/``-shm`` the database file's mode).
- Bounded after every write: rows older than ``retention_days`` go (as of the boot clock's
  time, never ahead of it: a wall clock jumping forward deletes nothing early), then rows
  beyond ``max_rows``, closed inbound rows first and unexpected egress last, every unexpected
  row evicted counted in ``losses`` (issue 25).
- A file of an earlier (or later) version is brought up to date in place, every row kept
  (:func:`agent.history.schema.upgrade`).  A file that is not a database, is corrupt, or is
  another program's database is renamed to ``<path>.corrupt-<time>`` (nothing is deleted) and
  a new store is created.  Any other failure (unwritable, disk full, locked too long) is logged
  once per condition; the write waits in a bounded in-memory queue and every later write tries
  it again first, in order; what the full queue drops is a ``lost_writes`` loss with its span.
  Writes never raise.
- Every write checks the wall clock against ``CLOCK_BOOTTIME`` (a jump is a ``clock_jump``
  loss) and folds the rows it changed into the tamper-evident chain
  (:mod:`agent.history.chain`); each heartbeat makes a link.
- ``read_only=True`` reads a private copy of the file and its ``-wal`` (an auditor's file, or
  the live store for a report): nothing is written beside the file, upgraded or moved, and
  the columns an old file lacks read as NULL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import operator
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

from agent.history import chain, schema
from agent.history.clocks import BootClock, boot_clock, read_boot_id
from agent.history.copy import HistoryUnavailable, private_copy, remove_copy
from agent.history.schema import (
    HISTORY_COLUMNS,
    KEY_COLUMNS,
    LOSS_COLUMNS,
    RECORD_COLUMNS,
    RUN_COLUMNS,
)
from agent.inet import CLOSING_STATES, INBOUND
from agent.records import Connection, Value
from agent.textsafe import utf8_safe

BUSY_TIMEOUT_S = 5.0
MAX_PENDING = 20_000
"""Observations (connections of a sample, events) a store holds in memory while its file
cannot be written; beyond, the oldest writes are dropped and counted as a loss."""
CLOCK_JUMP_S = 2.0
"""A difference between the wall clock's and the boot clock's advance beyond this is a jump."""
T = TypeVar("T")

OPENED, ALIVE, CLOSED = "opened", "alive", "closed"
"""The kinds of :class:`Observation`."""

Key = Tuple[Any, ...]
End = Tuple[int, str, int]
"""(network namespace inode, local address, local port) of one socket of a row."""

log = logging.getLogger("egress_agent.history")


@dataclass(frozen=True)
class Observation:
    """One event for the store: ``connection`` seen ``kind`` (:data:`OPENED`, :data:`ALIVE`,
    :data:`CLOSED`) at ``at`` (unix seconds) by ``source``."""

    kind: str
    at: float
    source: str
    connection: Connection


@dataclass(frozen=True)
class RunStart:
    """What a writer says of itself when it starts (:meth:`HistoryStore.start_run`)."""

    kind: str
    """``extension`` or ``watch``."""
    pid: int
    hostname: str
    machine_id: str
    version: str
    heartbeat_interval: float
    events_source: str


@dataclass(frozen=True)
class RunFigures:
    """Totals over a run so far, written with each heartbeat."""

    events_source: str
    events_lost: int = 0
    tcp_active_opens: Optional[int] = None
    outbound_tcp_seen: int = 0


class _Corrupt(Exception):
    """The file is not a history store we can use: move it aside."""


def _is_corruption(error: sqlite3.DatabaseError) -> bool:
    # SQLITE_CORRUPT and SQLITE_NOTADB map to the base DatabaseError (Modules/_sqlite/util.c);
    # locks, permissions, a full disk and I/O errors are OperationalError.
    name = getattr(error, "sqlite_errorname", None)
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    return type(error) is sqlite3.DatabaseError


# The statements name columns of the record and the schema only, never anything from input.
_RECORD_NAMES = [name for name, _ in RECORD_COLUMNS]
_HISTORY_NAMES = [name for name, _ in HISTORY_COLUMNS]
_RUN_NAMES = [name for name, _ in RUN_COLUMNS]
_KEY_MATCH = " AND ".join(f"{n} = ?" for n in KEY_COLUMNS)
_FIND = f"SELECT id FROM history WHERE {_KEY_MATCH}"  # noqa: S608
_OPEN_ROWS = f"SELECT id, {', '.join(KEY_COLUMNS)} FROM history WHERE open = 1"  # noqa: S608
_INSERT = (
    f"INSERT INTO history ({', '.join(_RECORD_NAMES)}, first_seen, last_seen, samples, "  # noqa: S608
    f"connections, open, seen_by, listen_port) VALUES ({', '.join('?' for _ in _RECORD_NAMES)}, "
    "?, ?, ?, ?, ?, ?, ?)"
)
_SEEN_BY = (
    "seen_by = CASE WHEN seen_by IS NULL OR seen_by = '' THEN :source "
    "WHEN instr(',' || seen_by || ',', ',' || :source || ',') > 0 THEN seen_by "
    "ELSE seen_by || ',' || :source END"
)
_UPDATE_SEEN = (
    f"UPDATE history SET {', '.join(f'{n} = :{n}' for n in _RECORD_NAMES)}, "  # noqa: S608
    "first_seen = MIN(first_seen, :at), last_seen = MAX(last_seen, :at), samples = samples + 1, "
    f"connections = connections + :new_ends, open = 1, {_SEEN_BY} WHERE id = :id"
)
_UPDATE_CLOSED = f"UPDATE history SET last_seen = MAX(last_seen, :at), {_SEEN_BY} WHERE id = :id"  # noqa: S608
_UPDATE_BRIEF = (
    f"UPDATE history SET {', '.join(f'{n} = :{n}' for n in _RECORD_NAMES)}, "  # noqa: S608
    "first_seen = MIN(first_seen, :first), last_seen = MAX(last_seen, :at), "
    f"samples = samples + :samples, connections = connections + :count, {_SEEN_BY} WHERE id = :id"
)
_BOOL_COLUMNS = frozenset(
    f.name for f in dataclasses.fields(Connection) if f.type in ("bool", bool)
)


class _OpenEnds:
    """The open ends of every open row, read once per write: row id -> source -> ends."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.rows: Dict[Key, int] = {tuple(row[1:]): row[0] for row in db.execute(_OPEN_ROWS)}
        self.ends: Dict[int, Dict[str, Set[End]]] = {}
        for row_id, source, namespace, address, port in db.execute(
            "SELECT history_id, source, net_namespace, local_address, local_port FROM open_ends"
        ):
            self.ends.setdefault(row_id, {}).setdefault(source, set()).add(
                (namespace, address, port)
            )

    def any_source(self, row_id: int) -> Set[End]:
        found: Set[End] = set()
        for ends in self.ends.get(row_id, {}).values():
            found |= ends
        return found


class HistoryStore:
    """The SQLite history file at ``path``, opened on first use and reopened after a failure.

    Thread-safe: one connection behind a lock (the extension writes from its sampler and event
    threads and reads from Thrift handler threads).
    """

    def __init__(
        self,
        path: str,
        retention_days: float = 30,
        max_rows: int = 100_000,
        logger: Optional[logging.Logger] = None,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        boot_clock: BootClock = boot_clock,
        boot_id: Optional[str] = None,
        max_pending: int = MAX_PENDING,
        key: Optional[bytes] = None,
        busy_timeout: float = BUSY_TIMEOUT_S,
    ) -> None:
        """``clock`` and ``boot_clock``: wall time and ``CLOCK_BOOTTIME`` (both injected in
        tests); ``max_pending``: observations held while the file cannot be written; ``key``:
        the operator's host key, which signs each link of the chain (HMAC-SHA256)."""
        self.path = path
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.read_only = read_only
        self._log = logger or log
        self._clock = clock
        self._boot_clock = boot_clock
        self._boot_id = read_boot_id() if boot_id is None else boot_id
        self._key = key
        self._busy_timeout = busy_timeout
        self._opened_at = clock()
        self._ended_before: Dict[str, Dict[Key, Set[End]]] = {}
        """Per source that wrote a snapshot through this store: the closed, ownerless sockets
        of its first view (connections that ended before the agent looked), while they last."""
        self._pending: List[_Pending] = []
        self._pending_weight = 0
        self.max_pending = max_pending
        self._dropped: Optional[_Dropped] = None
        """Writes dropped from the full queue and not yet recorded as a loss."""
        self.run_id: Optional[int] = None
        """The run this store's writer started (:meth:`start_run`): losses are its."""
        self._boot_anchor: Optional[Tuple[float, float]] = None
        self._head: Optional[str] = None
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None
        self._inode: Optional[Tuple[int, int]] = None
        self._conditions: Dict[str, str] = {}
        self._present: Optional[Dict[str, Set[str]]] = None
        """The columns of each table of a read-only file (None: the file is ours, up to date)."""
        self._copy: Optional[str] = None
        """The private copy a read-only store reads."""

    # -- public ----------------------------------------------------------------------------

    @property
    def problem(self) -> Optional[str]:
        """What keeps the store from working now (writing first), or None when it works."""
        for kind in ("write to", "read", "corrupt"):
            if kind in self._conditions:
                return self._conditions[kind]
        return None

    def snapshot(
        self,
        source: str,
        connections: Iterable[Connection],
        at: Optional[float] = None,
        scope: Optional[Collection[int]] = None,
        unread: Collection[int] = (),
    ) -> bool:
        """Record ``source``'s whole view at ``at`` of the network namespaces in ``scope`` (None:
        every namespace, those that are gone included) but those it could not read
        (``unread``); True when stored.  Rows that ``source`` held open in that scope and that
        are absent here are closed; what other sources hold open stays open."""
        now = int(self._clock() if at is None else at)
        groups, ended = _group(connections)
        covered = _Scope(None if scope is None else frozenset(scope), frozenset(unread))
        # The first view of a source: a socket already closed and without an owner (TIME_WAIT)
        # is a connection that ended before the agent looked, so it is dated before then, and
        # later views of those same sockets say nothing new.
        before = None
        if source not in self._ended_before:
            before = min(now, int(self._opened_at)) - 1
            self._ended_before[source] = {key: groups[key][1] for key in ended}
        else:
            earlier = self._ended_before[source]
            for key in [key for key in ended if key in earlier]:
                if groups[key][1] <= earlier[key]:
                    del groups[key]
            self._ended_before[source] = {
                key: ends & groups[key][1] if key in groups else ends
                for key, ends in earlier.items()
                if key in ended
            }
            ended = set()
        return self._write(
            lambda db: self._write_snapshot(db, source, groups, now, covered, ended, before),
            now,
            weight=len(groups),
        )

    def observe(self, observations: Sequence[Observation]) -> bool:
        """Record events, in order, in one transaction; True when stored."""
        if not observations:
            return True
        latest = int(max(observation.at for observation in observations))
        return self._write(
            lambda db: self._write_observations(db, observations),
            latest,
            weight=len(observations),
            earliest=int(min(observation.at for observation in observations)),
        )

    def query(
        self,
        *,
        columns: Optional[Sequence[str]] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        pids: Optional[Collection[int]] = None,
        open_: Optional[bool] = None,
        directions: Optional[Collection[str]] = None,
        limit: Optional[int] = None,
        newest_first: bool = False,
    ) -> List[Dict[str, Value]]:
        """History rows, oldest first (by ``first_seen``; with ``newest_first``, the latest
        ``last_seen`` first, so that a ``limit`` keeps the newest): those overlapping
        [``since``, ``until``] (last seen at or after ``since``, first seen at or before
        ``until``), of ``pids``, ``open_`` or not, in ``directions``, at most ``limit``; with
        only the keys ``columns`` (default: all).

        Raises :class:`HistoryUnavailable` when the file cannot be read, ValueError for a
        column the table does not have.
        """
        names = list(columns) if columns is not None else list(_HISTORY_NAMES)
        unknown = [name for name in names if name not in _HISTORY_NAMES]
        if unknown:
            raise ValueError(f"no history column {unknown[0]!r}")
        filters = _Filters(since, until, pids, open_, directions, limit, newest_first)
        return self._read(lambda db: self._select(db, names, filters))

    def rows(self, since: Optional[float] = None) -> List[Dict[str, Value]]:
        """Every row (or those last seen at or after ``since``), oldest first; every column.
        Raises :class:`HistoryUnavailable` when the file cannot be read."""
        return self.query(since=since)

    def count(self) -> Optional[int]:
        """How many rows the store holds; None when it cannot be read."""
        with self._lock:
            result: Optional[int] = self._attempt(
                "read", lambda db: int(db.execute("SELECT COUNT(*) FROM history").fetchone()[0])
            )
            return result

    def start_run(self, run: RunStart, at: Optional[float] = None) -> Optional[int]:
        """Record that a writer started; its run id, or None when the store cannot be written
        (try again with the next heartbeat)."""
        started = self._clock() if at is None else at
        boottime = self._boot_clock()
        values = dataclasses.asdict(run)
        values.update(
            started_at=started,
            last_heartbeat=started,
            boot_id=self._boot_id,
            started_boottime=boottime - (self._clock() - started),
            last_heartbeat_boottime=boottime,
        )
        names = list(values)
        statement = (
            f"INSERT INTO runs ({', '.join(names)}) "  # noqa: S608 (our own column names)
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        inserted: List[int] = []

        def insert(db: sqlite3.Connection) -> None:
            inserted.append(int(db.execute(statement, [values[n] for n in names]).lastrowid or 0))

        if self.read_only:
            return None
        with self._lock:
            # Not queued: a run starts when the store can first be written (the writer tries
            # again with its next heartbeat), but what is queued is written first.
            if not self._flush() or not self._attempt(
                "write to", lambda db: self._transaction(db, insert, int(started))
            ):
                return None
            self.run_id = inserted[-1]
            return self.run_id

    def heartbeat(
        self, run_id: int, figures: RunFigures, at: Optional[float] = None, stopped: bool = False
    ) -> bool:
        """Record that the run is alive at ``at`` (and stopped then, with ``stopped``), with its
        totals so far; True when stored."""
        moment = self._clock() if at is None else at
        values = dict(
            dataclasses.asdict(figures),
            at=moment,
            run_id=run_id,
            boottime=self._boot_clock() - (self._clock() - moment),
        )
        stop = ", stopped_at = :at" if stopped else ""
        # The heartbeat's own time, not the latest ever: a clock that ran ahead and came back
        # must not leave the run covering a future it never saw (the jump is a loss of its own).
        statement = (
            "UPDATE runs SET last_heartbeat = :at, "  # noqa: S608
            "last_heartbeat_boottime = :boottime, "
            "events_source = :events_source, events_lost = :events_lost, "
            f"tcp_active_opens = :tcp_active_opens, outbound_tcp_seen = :outbound_tcp_seen{stop} "
            "WHERE run_id = :run_id"
        )
        return self._write(
            lambda db: db.execute(statement, values), int(moment), link=chain.HEARTBEAT
        )

    def record_loss(
        self, kind: str, start: float, end: float, count: int = 1, detail: str = ""
    ) -> bool:
        """Record that ``count`` observations of ``kind`` (:data:`schema.LOSS_KINDS`) over
        [``start``, ``end``] could not be kept; True when stored (else it waits in the queue
        with the other writes)."""
        return self._write(
            lambda db: self._insert_loss(db, kind, start, end, count, detail), int(end)
        )

    def losses(
        self, since: Optional[float] = None, until: Optional[float] = None
    ) -> List[Dict[str, Value]]:
        """The losses whose span overlaps [``since``, ``until``], oldest first, with the keys
        of :data:`agent.history.schema.LOSS_COLUMNS` (none in a file from before they were
        kept).  Raises :class:`HistoryUnavailable`."""
        names = [name for name, _ in LOSS_COLUMNS]

        def select(db: sqlite3.Connection) -> List[Dict[str, Value]]:
            if self._present is not None and "losses" not in self._present:
                return []
            where, parameters = _overlapping('"end"', "start", since, until)
            columns = ", ".join(f'"{name}"' for name in names)
            query = f"SELECT {columns} FROM losses{where} ORDER BY start, loss_id"  # noqa: S608
            return [dict(zip(names, values)) for values in db.execute(query, parameters)]

        return self._read(select)

    def verify_chain(
        self, expect_head: Optional[str] = None, key: Optional[bytes] = None
    ) -> chain.ChainCheck:
        """The tamper check of the file (:func:`agent.history.chain.verify`).  Raises
        :class:`HistoryUnavailable`."""
        return self._read(lambda db: chain.verify(db, expect_head, key or self._key))

    @property
    def head(self) -> Optional[str]:
        """The head of the chain's last heartbeat link (None: none yet, or unreadable): what
        the agent publishes so that a copy can be checked against it off the host."""
        if self._head is not None:
            return self._head
        with self._lock:
            found = self._attempt(
                "read",
                lambda db: db.execute(
                    "SELECT head FROM chain WHERE kind != ? ORDER BY seq DESC LIMIT 1",
                    (chain.TIP,),
                ).fetchone(),
            )
        return None if not found else str(found[0])

    @property
    def pending(self) -> int:
        """Observations waiting in memory for the file to be writable again."""
        with self._lock:
            return self._pending_weight

    def runs(
        self, since: Optional[float] = None, until: Optional[float] = None
    ) -> List[Dict[str, Value]]:
        """The agent runs that overlap [``since``, ``until``], oldest first, with the keys of
        :data:`agent.history.schema.RUN_COLUMNS`.  Raises :class:`HistoryUnavailable`."""

        def select(db: sqlite3.Connection) -> List[Dict[str, Value]]:
            present = self._present.get("runs", set()) if self._present is not None else None
            if present is not None and not present:
                return []  # a file from before runs were kept
            names = [n for n in _RUN_NAMES if present is None or n in present]
            ended = "COALESCE(stopped_at, last_heartbeat)"
            where, parameters = _overlapping(ended, "started_at", since, until)
            query = f"SELECT {', '.join(names)} FROM runs{where} ORDER BY started_at, run_id"  # noqa: S608
            return [
                {name: dict(zip(names, values)).get(name) for name in _RUN_NAMES}
                for values in db.execute(query, parameters)
            ]

        return self._read(select)

    def save_names(self, boot_id: str, rows: Sequence[Tuple[int, str, str, float, int]]) -> bool:
        """Replace the recorded DNS answers with ``rows`` (``NameCache.export()``) of the boot
        ``boot_id``; True when stored."""
        latest = int(max((row[3] for row in rows), default=self._clock()))

        def replace(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM dns_answers")
            db.executemany(
                "INSERT INTO dns_answers VALUES (?, ?, ?, ?, ?, ?)",
                [(boot_id, *row) for row in rows],
            )

        return self._write(replace, latest)

    def names(self, boot_id: str) -> List[Tuple[int, str, str, float, int]]:
        """The recorded DNS answers of the boot ``boot_id`` (none from another boot, whose
        namespace inodes mean nothing now).  Raises :class:`HistoryUnavailable`."""

        def select(db: sqlite3.Connection) -> List[Tuple[int, str, str, float, int]]:
            if self._present is not None and "dns_answers" not in self._present:
                return []
            return [
                (int(ns), str(address), str(chain), float(seen), int(ttl))
                for ns, address, chain, seen, ttl in db.execute(
                    "SELECT net_namespace, address, chain, seen, ttl FROM dns_answers "
                    "WHERE boot_id = ? ORDER BY seen",
                    (boot_id,),
                )
            ]

        return self._read(select)

    def close(self) -> None:
        """Write what waits in the queue, if the file takes it now, and close the file (what
        still waits after that is lost with the process: the run's last heartbeat ends its
        coverage before it)."""
        with self._lock:
            if self._pending:
                self._flush()
            self._disconnect()

    def _write(
        self,
        operation: Callable[[sqlite3.Connection], Any],
        now: int,
        weight: int = 1,
        earliest: Optional[int] = None,
        link: str = chain.TIP,
    ) -> bool:
        """Run ``operation`` in one transaction, then bound the store as of ``now``; True when
        written.  When the file cannot be written (locked by another process, disk full,
        read-only), the operation waits in memory with those before it and every later write
        tries them again first, in order; past :attr:`max_pending` observations the oldest are
        dropped and recorded, once the file works again, as a ``lost_writes`` loss with their
        span."""
        if self.read_only:
            return False
        with self._lock:
            start = now if earliest is None else earliest
            self._pending.append(_Pending(operation, now, max(1, weight), start, link))
            self._pending_weight += max(1, weight)
            if self._flush():
                return True
            while self._pending_weight > self.max_pending and len(self._pending) > 1:
                dropped = self._pending.pop(0)
                self._pending_weight -= dropped.weight
                self._dropped = _Dropped.of(self._dropped, dropped)
            return False

    def _flush(self) -> bool:
        """Write what waits, in order; True when nothing is left waiting."""
        while self._pending:
            pending = self._pending[0]
            if not self._attempt("write to", functools.partial(self._write_pending, pending)):
                return False
            self._pending.pop(0)
            self._pending_weight -= pending.weight
            self._dropped = None
        return True

    def _write_pending(self, pending: _Pending, db: sqlite3.Connection) -> bool:
        """One waiting write, and first the loss of those dropped before it, if any."""
        dropped = self._dropped

        def operation(db: sqlite3.Connection) -> None:
            if dropped is not None:
                self._insert_loss(
                    db,
                    "lost_writes",
                    dropped.start,
                    dropped.end,
                    dropped.weight,
                    f"{dropped.writes} write(s) of {dropped.weight} observation(s) dropped "
                    "while the store could not be written",
                )
            pending.operation(db)

        return self._transaction(db, operation, pending.now, pending.link)

    def _insert_loss(
        self, db: sqlite3.Connection, kind: str, start: float, end: float, count: int, detail: str
    ) -> None:
        db.execute(
            'INSERT INTO losses (run_id, kind, start, "end", count, detail, recorded_at) '
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.run_id, kind, min(start, end), max(start, end), count, detail, self._clock()),
        )

    def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            result: Optional[T] = self._attempt("read", operation)
            if result is None:
                raise HistoryUnavailable(self.problem or f"history store {self.path} unavailable")
            return result

    def _transaction(
        self,
        db: sqlite3.Connection,
        operation: Callable[[sqlite3.Connection], Any],
        now: int,
        link: str = chain.TIP,
    ) -> bool:
        """``operation``, the clock check, the bounds and the chain, in one transaction."""
        db.execute("BEGIN IMMEDIATE")
        wall, boottime = self._clock(), self._boot_clock()
        last = self._last_link(db)
        self._check_clock(db, last, wall, boottime)
        operation(db)
        self._prune(db, min(now, int(self._trusted_now(db, wall, boottime))))
        self._chain(db, last, link, wall, boottime)
        db.execute("COMMIT")
        return True

    # -- the clocks and the chain ----------------------------------------------------------

    @staticmethod
    def _last_link(db: sqlite3.Connection) -> Optional[Dict[str, Any]]:
        cursor = db.execute("SELECT * FROM chain ORDER BY seq DESC LIMIT 1")
        names = [description[0] for description in cursor.description]
        found = cursor.fetchone()
        return None if found is None else dict(zip(names, found))

    def _check_clock(
        self, db: sqlite3.Connection, last: Optional[Dict[str, Any]], wall: float, boottime: float
    ) -> None:
        """Record a jump of the wall clock since the last write of this boot: the span between
        where the wall clock should be (the last write's wall time plus the boot clock's
        advance) and where it is.  A forward jump's span starts no earlier than the last write
        of an earlier boot: a host without a real-time clock that wrote in 1970 until NTP set
        it makes the time since it last ran doubtful, not the decades in between."""
        if last is None or last.get("boot_id") != self._boot_id or not self._boot_id:
            return
        expected = float(last["at"]) + (boottime - float(last["boottime"]))
        jump = wall - expected
        advanced = boottime - float(last["boottime"])
        if abs(jump) > CLOCK_JUMP_S:
            start = expected
            if jump > 0:
                before = db.execute(
                    "SELECT MAX(at) FROM chain WHERE boot_id != ? AND at <= ?",
                    (self._boot_id, wall),
                ).fetchone()[0]
                start = expected if before is None else max(expected, float(before))
            self._insert_loss(
                db,
                "clock_jump",
                start,
                wall,
                1,
                f"the wall clock jumped {'forward' if jump > 0 else 'back'} by "
                f"{abs(jump):.0f} s (the boot clock advanced {advanced:.0f} s)",
            )
            self._log.warning(
                "history store %s: the wall clock jumped %+.0f s; recorded", self.path, jump
            )

    def _trusted_now(self, db: sqlite3.Connection, wall: float, boottime: float) -> float:
        """The wall time as the boot clock counts it from this boot's first write (never later
        than the wall clock): retention never runs ahead of time that really passed, so a
        clock jumping forward deletes nothing early."""
        if self._boot_anchor is None:
            found = db.execute(
                "SELECT at, boottime FROM chain WHERE boot_id = ? ORDER BY seq LIMIT 1",
                (self._boot_id,),
            ).fetchone()
            self._boot_anchor = (wall, boottime) if found is None else (found[0], found[1])
        anchor_wall, anchor_boot = self._boot_anchor
        return min(wall, anchor_wall + (boottime - anchor_boot))

    def _chain(
        self,
        db: sqlite3.Connection,
        last: Optional[Dict[str, Any]],
        kind: str,
        wall: float,
        boottime: float,
    ) -> None:
        """Fold the rows this transaction changed into the chain's tip; a heartbeat makes the
        tip a link of its own (:mod:`agent.history.chain`)."""
        touched: Dict[Tuple[str, int], None] = {}
        for table, row_id in db.execute("SELECT tbl, id FROM temp.touched ORDER BY rowid"):
            touched.setdefault((str(table), int(row_id)), None)
        if last is None:
            chain.adopt(db, wall, self._boot_id, boottime, self._key)
            last = self._last_link(db) or {}
        if last["kind"] == chain.TIP:
            tip = dict(last)
        else:
            tip = dict(
                seq=int(last["seq"]) + 1,
                kind=chain.TIP,
                written=str(last["head"]),
                state=str(last["state"]),
                prev=str(last["head"]),
            )
        written, state = str(tip["written"]), str(tip["state"])
        current = _touched_rows(db)
        old_digests: Dict[Tuple[str, int], str] = {
            (str(table), int(row_id)): str(digest)
            for table, row_id, digest in db.execute(
                "SELECT d.tbl, d.id, d.digest FROM row_digests AS d JOIN "
                "(SELECT DISTINCT tbl, id FROM temp.touched) AS t ON d.tbl = t.tbl AND d.id = t.id"
            )
        }
        db.execute("DELETE FROM temp.touched")
        replaced: List[Tuple[str, int, str]] = []
        deleted: List[Tuple[str, int]] = []
        for key in touched:
            row = current.get(key)
            new = None if row is None else chain.row_digest(key[0], row)
            old = old_digests.get(key)
            if old is not None:
                state = chain.add(state, old, -1)
            if new is None:
                deleted.append(key)
            else:
                state = chain.add(state, new)
                replaced.append((key[0], key[1], new))
            written = chain.fold(written, key[0], key[1], new)
        db.executemany("DELETE FROM row_digests WHERE tbl = ? AND id = ?", deleted)
        db.executemany("INSERT OR REPLACE INTO row_digests VALUES (?, ?, ?)", replaced)
        tip.update(
            kind=kind,
            run_id=self.run_id,
            at=wall,
            boot_id=self._boot_id,
            boottime=boottime,
            written=written,
            state=state,
        )
        tip["head"] = chain.link_head(tip)
        tip["mac"] = (
            None
            if self._key is None or kind == chain.TIP
            else chain.link_mac(self._key, tip["head"])
        )
        db.execute(
            "INSERT OR REPLACE INTO chain (seq, kind, run_id, at, boot_id, boottime, written, "
            "state, prev, head, mac) VALUES (:seq, :kind, :run_id, :at, :boot_id, :boottime, "
            ":written, :state, :prev, :head, :mac)",
            tip,
        )
        if kind != chain.TIP:
            self._head = str(tip["head"])

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
        if self.read_only:
            return self._read_only_connection()
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
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Check the file and bring it up to date (:func:`agent.history.schema.upgrade`); a
        file without a chain gets its first link (:func:`agent.history.chain.adopt`); this
        connection notes every chained row it changes (``temp.touched``)."""
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Corrupt(f"fails SQLite's quick_check: {check}")
            try:
                version, added = schema.upgrade(db)
            except schema.NotOurs as error:
                raise _Corrupt(str(error)) from None
            if db.execute("SELECT COUNT(*) FROM chain").fetchone()[0] == 0:
                chain.adopt(db, self._clock(), self._boot_id, self._boot_clock(), self._key)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("CREATE TEMP TABLE IF NOT EXISTS touched (tbl TEXT NOT NULL, id INTEGER)")
        for table, id_column in chain.CHAINED:
            for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
                db.execute(
                    f"CREATE TEMP TRIGGER IF NOT EXISTS touched_{table}_{event.lower()} "  # noqa: S608
                    f"AFTER {event} ON main.{table} BEGIN INSERT INTO touched "
                    f"VALUES ('{table}', {row}.{id_column}); END"
                )
        if 0 < version < schema.SCHEMA_VERSION:
            self._log.warning(
                "history store %s: upgraded from schema version %d to %d, every row kept",
                self.path,
                version,
                schema.SCHEMA_VERSION,
            )
        elif version > schema.SCHEMA_VERSION:
            self._log.warning(
                "history store %s was written by a newer egress-agent (schema version %d; this "
                "one knows %d): using the columns this version knows",
                self.path,
                version,
                schema.SCHEMA_VERSION,
            )
        if added and version >= schema.SCHEMA_VERSION:
            self._log.warning("history store %s: added the columns %s", self.path, ", ".join(added))

    def _read_only_connection(self) -> sqlite3.Connection:
        """A private copy of the file (:mod:`agent.history.copy`), never the file itself: an
        auditor's copy stays as it was collected, the live store as its writers left it.
        Whatever its version, the columns it lacks read as NULL."""
        self._copy = private_copy(self.path)
        db = sqlite3.connect(self._copy, check_same_thread=False)
        try:
            db.execute("PRAGMA query_only = 1")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Corrupt(f"fails SQLite's quick_check: {check}")
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "history" not in tables:
                raise _Corrupt(f"it has no history table (its tables: {sorted(tables)[:5]})")
            self._present = {table: set(schema.table_columns(db, table)) for table in tables}
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _disconnect(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        if self._copy is not None:
            remove_copy(self._copy)
            self._copy = None

    def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _set_aside(self, why: str) -> bool:
        """Rename the unusable file (and its WAL) out of the way; True when a new one can start.
        A read-only store is never moved: it reports the problem instead."""
        if self.read_only:
            self._disconnect()
            self._report("corrupt", f"{self.path} is not a history store: {why}")
            return False
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
        """Log ``message`` unless the same condition of this kind was the last one logged.  A
        read-only store logs nothing: its reader gets the message as HistoryUnavailable."""
        if self._conditions.get(kind) != message and not self.read_only:
            self._log.error("%s", message)
        self._conditions[kind] = message

    def _recovered(self, kind: str) -> None:
        # A write that worked means the store works; a read that worked says nothing of writes.
        cleared = [kind, "corrupt"] + (["read"] if kind == "write to" else [])
        if [name for name in cleared if self._conditions.pop(name, None) is not None]:
            self._log.warning("history store %s works again", self.path)

    # -- the SQL ---------------------------------------------------------------------------

    def _write_snapshot(
        self,
        db: sqlite3.Connection,
        source: str,
        groups: Dict[Key, Tuple[Connection, Set[End]]],
        now: int,
        scope: _Scope,
        ended: Collection[Key] = (),
        before: Optional[int] = None,
    ) -> None:
        """One snapshot in a few statements whatever its size: the open rows and their ends
        are read at once, rows seen again are updated with one ``executemany``, and the
        source's ends in scope are replaced by this snapshot's.  A new row of a key in
        ``ended`` (only closed, ownerless sockets in the source's first view) is recorded
        closed, at ``before``: it ended before the agent looked."""
        state = _OpenEnds(db)
        updates: List[Dict[str, Value]] = []
        kept: Dict[int, Set[End]] = {}
        for key, (connection, ends) in groups.items():
            values = _record_values(connection)
            row_id = state.rows.get(key)
            if row_id is None:
                found = db.execute(_FIND, key).fetchone()  # seen before, closed since
                if found is None and before is not None and key in ended:
                    _insert(db, values, (before, before, 1), len(ends), False, source, key[-1])
                    continue
                if found is None:
                    row_id = _insert(db, values, (now, now, 1), len(ends), True, source, key[-1])
                else:
                    row_id = found[0]
                    updates.append(_update(values, now, len(ends), row_id, source))
            else:
                new_ends = len(ends - state.any_source(row_id))
                updates.append(_update(values, now, new_ends, row_id, source))
            kept[row_id] = ends
        db.executemany(_UPDATE_SEEN, updates)
        gone: List[Tuple[int, str, int, str, int]] = []
        closed: List[Tuple[int]] = []
        for row_id, by_source in state.ends.items():
            ours = {end for end in by_source.get(source, ()) if scope.covers(end[0])}
            gone.extend((row_id, source, *end) for end in ours - kept.get(row_id, set()))
            remaining = self._remaining(by_source, source, ours)
            if row_id not in kept and not remaining:
                closed.append((row_id,))
        db.executemany(
            "DELETE FROM open_ends WHERE history_id = ? AND source = ? AND net_namespace = ? "
            "AND local_address = ? AND local_port = ?",
            gone,
        )
        db.executemany("UPDATE history SET open = 0 WHERE id = ?", closed)
        db.executemany(
            "INSERT OR IGNORE INTO open_ends VALUES (?, ?, ?, ?, ?)",
            [(row_id, source, *end) for row_id, ends in kept.items() for end in ends],
        )

    @staticmethod
    def _remaining(by_source: Dict[str, Set[End]], source: str, replaced: Set[End]) -> bool:
        """Whether a row keeps an open end once ``source``'s ends ``replaced`` are gone."""
        return any(ends if name != source else ends - replaced for name, ends in by_source.items())

    def _write_observations(
        self, db: sqlite3.Connection, observations: Sequence[Observation]
    ) -> None:
        """Events in order: an opening or a sighting adds the end for its source (counting a
        connection when no source had that end open), a closing removes the end for every
        source and closes the row when none is left."""
        state = _OpenEnds(db)
        closed_rows: Dict[Key, Optional[int]] = {}
        keys = [_key(observation.connection) for observation in observations]
        briefs = _briefs(observations, keys, state)
        for key, observation in zip(keys, observations):
            if key in briefs:
                continue
            connection = observation.connection
            end = _end(connection)
            at = int(observation.at)
            row_id = state.rows.get(key)
            if row_id is None:
                if key not in closed_rows:
                    found = db.execute(_FIND, key).fetchone()
                    closed_rows[key] = None if found is None else found[0]
                row_id = closed_rows[key]
            opening = observation.kind != CLOSED
            if row_id is None:
                values = _record_values(connection)
                row_id = _insert(db, values, (at, at, 1), 1, opening, observation.source, key[-1])
                closed_rows[key] = row_id
                if opening:
                    state.rows[key] = row_id
                    state.ends[row_id] = {observation.source: {end}}
                    db.execute(
                        "INSERT OR IGNORE INTO open_ends VALUES (?, ?, ?, ?, ?)",
                        (row_id, observation.source, *end),
                    )
                continue
            by_source = state.ends.setdefault(row_id, {})
            if opening:
                new_end = end not in state.any_source(row_id)
                db.execute(
                    _UPDATE_SEEN,
                    _update(
                        _record_values(connection), at, int(new_end), row_id, observation.source
                    ),
                )
                by_source.setdefault(observation.source, set()).add(end)
                state.rows[key] = row_id
                db.execute(
                    "INSERT OR IGNORE INTO open_ends VALUES (?, ?, ?, ?, ?)",
                    (row_id, observation.source, *end),
                )
                continue
            db.execute(_UPDATE_CLOSED, {"at": at, "id": row_id, "source": observation.source})
            for ends in by_source.values():
                ends.discard(end)
            db.execute(
                "DELETE FROM open_ends WHERE history_id = ? AND net_namespace = ? "
                "AND local_address = ? AND local_port = ?",
                (row_id, *end),
            )
            if not any(by_source.values()):
                db.execute("UPDATE history SET open = 0 WHERE id = ?", (row_id,))
                state.rows.pop(key, None)
                closed_rows[key] = row_id
        for key, brief in briefs.items():
            row_id = state.rows.get(key)
            if row_id is None:
                found = db.execute(_FIND, key).fetchone()
                row_id = None if found is None else found[0]
            values = _record_values(brief.connection)
            if row_id is None:
                seen = (brief.first, brief.last, brief.samples)
                _insert(db, values, seen, brief.count, False, brief.source, key[-1])
                continue
            parameters = _update(values, brief.last, brief.count, row_id, brief.source)
            parameters.update(first=brief.first, count=brief.count, samples=brief.samples)
            db.execute(_UPDATE_BRIEF, parameters)

    def _prune(self, db: sqlite3.Connection, now: int) -> None:
        """Retention as of ``now`` (never ahead of the boot clock: :meth:`_trusted_now`), then
        ``max_rows`` by :data:`_EVICTION_ORDER`: closed inbound rows, then other rows that are
        not unexpected egress, and unexpected egress last, each evicted one counted in an
        ``evicted`` loss with the span of what went."""
        pruned = 0
        if self.retention_days and self.retention_days > 0:
            cutoff = now - int(self.retention_days * 86400)
            pruned += db.execute("DELETE FROM history WHERE last_seen < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM runs WHERE COALESCE(stopped_at, last_heartbeat) < ?", (cutoff,))
            db.execute('DELETE FROM losses WHERE "end" < ?', (cutoff,))
            self._prune_chain(db, cutoff)
        if self.max_rows and self.max_rows > 0:
            excess = db.execute("SELECT COUNT(*) FROM history").fetchone()[0] - self.max_rows
            if excess > 0:
                victims = db.execute(_EVICTION_ORDER, (excess,)).fetchall()
                unexpected = [row for row in victims if row[1] == _UNEXPECTED_TIER]
                if unexpected:
                    self._insert_loss(
                        db,
                        "evicted",
                        min(row[2] for row in unexpected),
                        max(row[3] for row in unexpected),
                        len(unexpected),
                        f"{len(unexpected)} unexpected egress row(s) evicted to keep "
                        f"max_rows {self.max_rows}",
                    )
                db.executemany("DELETE FROM history WHERE id = ?", [(row[0],) for row in victims])
                pruned += len(victims)
        if pruned:
            db.execute("DELETE FROM open_ends WHERE history_id NOT IN (SELECT id FROM history)")

    @staticmethod
    def _prune_chain(db: sqlite3.Connection, cutoff: int) -> None:
        """Links older than the retention go, but the last heartbeat link always stays; the
        last one removed is kept in ``chain_base``, the first kept link's ``prev``."""
        found = db.execute(
            "SELECT MAX(seq) FROM chain WHERE at < ? AND seq < "
            "(SELECT MAX(seq) FROM chain WHERE kind != ?)",
            (cutoff, chain.TIP),
        ).fetchone()
        if found is None or found[0] is None:
            return
        last = db.execute("SELECT seq, head FROM chain WHERE seq = ?", (found[0],)).fetchone()
        db.execute("INSERT OR REPLACE INTO chain_base VALUES (1, ?, ?)", (last[0], last[1]))
        db.execute("DELETE FROM chain WHERE seq <= ?", (last[0],))

    def _select(
        self, db: sqlite3.Connection, names: List[str], filters: _Filters
    ) -> List[Dict[str, Value]]:
        present = self._present.get("history") if self._present is not None else None
        selected = [name for name in names if present is None or name in present]
        where, parameters = filters.sql(present)
        order = "last_seen DESC, id DESC" if filters.newest_first else "first_seen, id"
        query = f"SELECT {', '.join(selected) or 'id'} FROM history{where} ORDER BY {order}"  # noqa: S608
        if filters.limit is not None:
            query += " LIMIT ?"
            parameters.append(filters.limit)
        rows = []
        for values in db.execute(query, parameters):
            found = dict(zip(selected, values))
            rows.append({name: _value(name, found.get(name)) for name in names})
        return rows


def _touched_rows(db: sqlite3.Connection) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The rows, as they are now, of every chained table that ``temp.touched`` names (a
    deleted row is absent)."""
    rows: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for table, id_column in chain.CHAINED:
        cursor = db.execute(
            f"SELECT * FROM {table} WHERE {id_column} IN "  # noqa: S608 (our own names)
            "(SELECT id FROM temp.touched WHERE tbl = ?)",
            (table,),
        )
        names = [description[0] for description in cursor.description]
        for values in cursor:
            row = dict(zip(names, values))
            rows[(table, int(row[id_column]))] = row
    return rows


_UNEXPECTED_TIER = 3
_EXPECTED = (
    "NOT (direction IN ('outbound', 'unknown') AND external = 1 AND COALESCE(allowlisted, 0) = 0)"
)
_EVICTION_ORDER = (
    "SELECT id, CASE WHEN direction = 'inbound' AND open = 0 THEN 0 "  # noqa: S608 (constants)
    f"WHEN {_EXPECTED} AND open = 0 THEN 1 WHEN {_EXPECTED} THEN 2 "
    f"ELSE {_UNEXPECTED_TIER} END AS tier, first_seen, last_seen "
    "FROM history ORDER BY tier, last_seen, id LIMIT ?"
)
"""The rows ``max_rows`` takes, in order: closed inbound rows, closed rows that are not
unexpected egress (allowed, internal), open ones of those, then unexpected egress (an outbound
or unknown external row no allow rule expects: what the audit is about)."""


@dataclass(frozen=True)
class _Pending:
    """A write waiting for the file: ``weight`` observations at ``earliest``..``now``."""

    operation: Callable[[sqlite3.Connection], Any]
    now: int
    weight: int
    earliest: int
    link: str


@dataclass(frozen=True)
class _Dropped:
    """Writes dropped from the full queue, as one loss: their span and how many."""

    start: int
    end: int
    weight: int
    writes: int

    @classmethod
    def of(cls, before: Optional[_Dropped], pending: _Pending) -> _Dropped:
        if before is None:
            return cls(pending.earliest, pending.now, pending.weight, 1)
        return cls(
            min(before.start, pending.earliest),
            max(before.end, pending.now),
            before.weight + pending.weight,
            before.writes + 1,
        )


@dataclass(frozen=True)
class _Scope:
    """The namespaces a snapshot speaks for: ``only`` these (None: all), but not ``unread``."""

    only: Optional[FrozenSet[int]]
    unread: FrozenSet[int]

    def covers(self, namespace: int) -> bool:
        return (self.only is None or namespace in self.only) and namespace not in self.unread


@dataclass(frozen=True)
class _Filters:
    """The constraints :meth:`HistoryStore.query` pushes into SQL, as bound parameters."""

    since: Optional[float]
    until: Optional[float]
    pids: Optional[Collection[int]]
    open_: Optional[bool]
    directions: Optional[Collection[str]]
    limit: Optional[int]
    newest_first: bool = False

    MAX_LISTED = 500
    """Beyond this many values an IN is left out (SQLite before 3.32 binds at most 999
    parameters): a superset is still right, and every caller filters again (osquery core
    re-applies every constraint)."""

    def sql(self, present: Optional[Set[str]]) -> Tuple[str, List[Any]]:
        clauses: List[str] = []
        parameters: List[Any] = []
        if self.since is not None:
            clauses.append("last_seen >= ?")
            parameters.append(int(self.since))
        if self.until is not None:
            clauses.append("first_seen <= ?")
            parameters.append(int(self.until))
        for column, values in (("pid", self.pids), ("direction", self.directions)):
            if values is not None and len(values) <= self.MAX_LISTED:
                listed = sorted(values)
                clauses.append(f"{column} IN ({', '.join('?' for _ in listed)})" if listed else "0")
                parameters.extend(listed)
        if self.open_ is not None:
            clauses.append("open = ?")
            parameters.append(int(self.open_))
        return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), parameters


def history_key(connection: Connection) -> Key:
    """The connection as history (and ``watch``) counts it: :data:`KEY_COLUMNS`."""
    return _key(connection)


_KEY_OF_RECORD = operator.attrgetter(*KEY_COLUMNS[:-1])


def _key(connection: Connection) -> Key:
    """:data:`KEY_COLUMNS`: an inbound connection by its listening (local) port, any client
    port (0); any other by its remote port, listening port 0."""
    if connection.direction == INBOUND:
        return (
            connection.process_uuid,
            connection.protocol,
            connection.remote_address,
            0,
            INBOUND,
            connection.local_port,
        )
    return (*_KEY_OF_RECORD(connection), 0)


def _end(connection: Connection) -> End:
    """One socket of a row: its local end, or for an inbound row (one listening port, many
    clients) the client's port beside the local address."""
    port = connection.remote_port if connection.direction == INBOUND else connection.local_port
    return (connection.net_namespace or 0, connection.local_address, port)


def _group(
    connections: Iterable[Connection],
) -> Tuple[Dict[Key, Tuple[Connection, Set[End]]], Set[Key]]:
    """The connections by row, and the rows whose sockets are all closed and ownerless."""
    groups: Dict[Key, Tuple[Connection, Set[End]]] = {}
    live: Set[Key] = set()
    for connection in connections:
        key = _key(connection)
        if connection.pid >= 0 or connection.state not in CLOSING_STATES:
            live.add(key)
        if key in groups:
            groups[key][1].add(_end(connection))
        else:
            groups[key] = (connection, {_end(connection)})
    return groups, set(groups) - live


_record_getter = operator.attrgetter(*_RECORD_NAMES)
_TEXT_INDEXES = [i for i, (_, sql_type) in enumerate(RECORD_COLUMNS) if sql_type == "TEXT"]
_REMOTE_PORT = _RECORD_NAMES.index("remote_port")


def _record_values(connection: Connection) -> List[Value]:
    """The record columns of ``connection`` as SQLite takes them (booleans are ints to
    sqlite3 already); text that UTF-8 cannot encode is escaped."""
    values: List[Value] = list(_record_getter(connection))
    if connection.direction == INBOUND:
        values[_REMOTE_PORT] = 0  # the row stands for every client port (listen_port)
    for index in _TEXT_INDEXES:
        value = values[index]
        if isinstance(value, str) and not value.isascii():
            values[index] = utf8_safe(value)  # a process name may hold undecodable bytes
    return values


def _insert(
    db: sqlite3.Connection,
    values: List[Value],
    seen: Tuple[int, int, int],
    connections: int,
    is_open: bool,
    source: str,
    listen_port: int,
) -> int:
    """A new row seen from ``seen[0]`` to ``seen[1]`` in ``seen[2]`` samples; its id."""
    row_id = db.execute(
        _INSERT, [*values, *seen, connections, int(is_open), source, listen_port]
    ).lastrowid
    return int(row_id or 0)


@dataclass
class _Brief:
    """The connections of one row that opened and closed within one write, and whose ends no
    source had open before it: written as one statement, not five each."""

    connection: Connection
    source: str
    first: int
    last: int
    count: int
    """Connections: the openings."""
    samples: int
    """The openings and the sightings of an open end (:data:`ALIVE`)."""


def _briefs(
    observations: Sequence[Observation], keys: Sequence[Key], state: _OpenEnds
) -> Dict[Key, _Brief]:
    """The rows whose every observation in ``observations`` is an opening by one source that
    a later closing of the same end ends (with sightings of it between), each end not open
    before: what :meth:`HistoryStore._write_observations` writes as one :class:`_Brief`.  The
    effect is that of writing each observation: the row's ``open`` does not change, its
    ``connections`` grow by one for each opening and its ``samples`` for each opening and
    sighting, and its columns are the last of those's."""
    grouped: Dict[Key, List[Observation]] = {}
    for key, observation in zip(keys, observations):
        grouped.setdefault(key, []).append(observation)
    briefs: Dict[Key, _Brief] = {}
    for key, group in grouped.items():
        row_id = state.rows.get(key)
        open_before = state.any_source(row_id) if row_id is not None else set()
        brief = _brief(group, open_before)
        if brief is not None:
            briefs[key] = brief
    return briefs


def _brief(group: List[Observation], open_before: Set[End]) -> Optional[_Brief]:
    source = group[0].source
    pending: Set[End] = set()
    opening: Optional[Observation] = None
    count = samples = 0
    for observation in group:
        end = _end(observation.connection)
        if observation.source != source:
            return None
        if observation.kind == OPENED and end not in pending and end not in open_before:
            pending.add(end)
            opening = observation
            count += 1
            samples += 1
        elif observation.kind == ALIVE and end in pending:
            opening = observation
            samples += 1
        elif observation.kind == CLOSED and end in pending:
            pending.discard(end)
        else:
            return None
    if pending or opening is None:
        return None
    moments = [int(observation.at) for observation in group]
    return _Brief(opening.connection, source, min(moments), max(moments), count, samples)


def _update(
    values: List[Value], at: int, new_ends: int, row_id: int, source: str
) -> Dict[str, Value]:
    parameters: Dict[str, Value] = dict(zip(_RECORD_NAMES, values))
    parameters.update(at=at, new_ends=new_ends, id=row_id, source=source)
    return parameters


def _value(name: str, value: Any) -> Value:
    return bool(value) if name in _BOOL_COLUMNS and value is not None else value


def _overlapping(
    end: str, start: str, since: Optional[float], until: Optional[float]
) -> Tuple[str, List[float]]:
    """The ``WHERE`` clause (and its parameters) of the spans from ``start`` to ``end`` (SQL
    expressions of our own) that overlap [``since``, ``until``]; "" when neither is given."""
    clauses, parameters = [], []
    if since is not None:
        clauses.append(f"{end} >= ?")
        parameters.append(since)
    if until is not None:
        clauses.append(f"{start} <= ?")
        parameters.append(until)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), parameters
