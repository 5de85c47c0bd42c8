"""The history file's tables, derived from the record, and how a file of any version is brought
up to date without losing a row.

The ``history`` table's record columns are :data:`agent.records.COLUMNS` minus the per-socket
ones, so a column added to the record reaches the store by itself: :func:`upgrade` adds every
column a table lacks with ``ALTER TABLE ... ADD COLUMN`` (https://sqlite.org/lang_altertable.html),
whatever the file's version.  Changes that a new column cannot express are numbered steps
(:data:`STEPS`), each run once, in one transaction with the rest of the upgrade.  A file written
by a newer agent is used as it is: it holds at least our columns once they are added, and it is
never set aside for its version.

Versions (``PRAGMA user_version``):

1. egress-agent 0.1: ``history`` and ``open_ends`` (the local ends of each open row in the
   latest sample).
2. Several sources: ``open_ends`` says which source saw each end open and in which network
   namespace, so that a snapshot closes only what its own source saw in its own scope;
   ``history.seen_by``; the ``runs`` of the agent (start, heartbeats, stop) for the audit;
   ``dns_answers``, the recent answers of the name cache.
3. The verdict's evidence (issue 25): an inbound row aggregates per listening port
   (``listen_port`` joins the key, ``remote_port`` is 0), so the table is rebuilt with the new
   key, every row and id kept; runs carry the boot id and the boot-time clock beside wall time;
   ``losses`` (what the agent could not keep, with its span); ``row_digests``, ``chain`` and
   ``chain_base``, the tamper evidence (:mod:`agent.history.chain`).
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Dict, List, Sequence, Tuple

from agent.history import chain
from agent.records import COLUMNS

SCHEMA_VERSION = 3

Columns = Tuple[Tuple[str, str], ...]
"""(column name, osquery type)"""

KEY_COLUMNS: Tuple[str, ...] = (
    "process_uuid",
    "protocol",
    "remote_address",
    "remote_port",
    "direction",
    "listen_port",
)
"""What one history row aggregates over: an outbound row per remote port, an inbound one per
listening port (its clients' ports are 0)."""

PER_SOCKET_COLUMNS = frozenset({"fd", "socket", "state", "local_address", "local_port"})
"""Record columns that differ between the sockets of one row, so the history leaves them out."""

RECORD_COLUMNS: Columns = tuple(
    (name, sql_type) for name, sql_type in COLUMNS if name not in PER_SOCKET_COLUMNS
)
AGGREGATE_COLUMNS: Columns = (
    ("first_seen", "BIGINT"),
    ("last_seen", "BIGINT"),
    ("samples", "BIGINT"),
    ("connections", "BIGINT"),
    ("open", "INTEGER"),
    ("seen_by", "TEXT"),
    ("listen_port", "INTEGER"),
)
"""``first_seen``/``last_seen`` (unix seconds); ``samples``: the times it was seen (in a sample,
or as an event); ``connections``: distinct local ends (an end counts again only after it closed);
``open``: 1 while a source has an end of it open; ``seen_by``: the sources that saw it
(``sampling``, ``tracefs``), comma-separated; ``listen_port``: an inbound row's local
(listening) port, 0 for other rows."""
HISTORY_COLUMNS: Columns = RECORD_COLUMNS + AGGREGATE_COLUMNS
"""(column name, osquery type) of a history row, in table order."""
_HISTORY_NAMES = frozenset(name for name, _ in HISTORY_COLUMNS)

RUN_COLUMNS: Columns = (
    ("run_id", "BIGINT"),
    ("kind", "TEXT"),
    ("pid", "INTEGER"),
    ("hostname", "TEXT"),
    ("machine_id", "TEXT"),
    ("version", "TEXT"),
    ("started_at", "DOUBLE"),
    ("last_heartbeat", "DOUBLE"),
    ("stopped_at", "DOUBLE"),
    ("heartbeat_interval", "DOUBLE"),
    ("events_source", "TEXT"),
    ("events_lost", "BIGINT"),
    ("tcp_active_opens", "BIGINT"),
    ("outbound_tcp_seen", "BIGINT"),
    ("boot_id", "TEXT"),
    ("started_boottime", "DOUBLE"),
    ("last_heartbeat_boottime", "DOUBLE"),
)
"""One run of an agent that writes the store (the extension, ``watch``): when it started, when
it last said it was alive, when it stopped (NULL: running, or killed), and its coverage totals;
the boot (``/proc/sys/kernel/random/boot_id``) and ``CLOCK_BOOTTIME`` at its start and last
heartbeat, which no change of the wall clock moves."""

LOSS_COLUMNS: Columns = (
    ("loss_id", "BIGINT"),
    ("run_id", "BIGINT"),
    ("kind", "TEXT"),
    ("start", "DOUBLE"),
    ("end", "DOUBLE"),
    ("count", "BIGINT"),
    ("detail", "TEXT"),
    ("recorded_at", "DOUBLE"),
)
"""What the agent observed but could not keep, or could not trust, over [start, end] (unix
seconds): ``kind`` is one of :data:`LOSS_KINDS`; ``count``: how many observations or rows."""

LOSS_KINDS = ("evicted", "lost_writes", "clock_jump", "tracker_overflow", "instance_reset")

_SQLITE_TYPE = {"TEXT": "TEXT", "INTEGER": "INTEGER", "BIGINT": "INTEGER", "DOUBLE": "REAL"}
_DEFAULTS = {
    "first_seen": "0",
    "last_seen": "0",
    "samples": "0",
    "connections": "0",
    "open": "0",
    "listen_port": "0",
}


def _column_definition(name: str, sql_type: str) -> str:
    definition = f"{name} {_SQLITE_TYPE[sql_type]}"
    default = _DEFAULTS.get(name)
    return f"{definition} NOT NULL DEFAULT {default}" if default is not None else definition


def _create_history() -> str:
    columns = ",\n  ".join(_column_definition(name, kind) for name, kind in HISTORY_COLUMNS)
    return f"""CREATE TABLE IF NOT EXISTS history (
  id INTEGER PRIMARY KEY,
  {columns},
  UNIQUE ({", ".join(KEY_COLUMNS)})
)"""


_CREATE_OPEN_ENDS = """CREATE TABLE IF NOT EXISTS open_ends (
  history_id INTEGER NOT NULL,
  source TEXT NOT NULL,
  net_namespace INTEGER NOT NULL,
  local_address TEXT NOT NULL,
  local_port INTEGER NOT NULL,
  PRIMARY KEY (history_id, source, net_namespace, local_address, local_port)
) WITHOUT ROWID"""


def _create_runs() -> str:
    columns = ",\n  ".join(
        _column_definition(name, kind) for name, kind in RUN_COLUMNS if name != "run_id"
    )
    return f"CREATE TABLE IF NOT EXISTS runs (\n  run_id INTEGER PRIMARY KEY,\n  {columns}\n)"


_CREATE_NAMES = """CREATE TABLE IF NOT EXISTS dns_answers (
  boot_id TEXT NOT NULL,
  net_namespace INTEGER NOT NULL,
  address TEXT NOT NULL,
  chain TEXT NOT NULL,
  seen REAL NOT NULL,
  ttl INTEGER NOT NULL
)"""
"""The recent DNS answers of the agent's name cache (``agent.collect.dns.cache.NameCache.export``),
so that a restart, or a one-shot ``check``, knows the names of connections still open.
Namespace inodes mean something within one boot only: rows carry the boot's id."""


def _create_losses() -> str:
    columns = ",\n  ".join(
        _column_definition(name, kind) for name, kind in LOSS_COLUMNS if name != "loss_id"
    )
    return f"CREATE TABLE IF NOT EXISTS losses (\n  loss_id INTEGER PRIMARY KEY,\n  {columns}\n)"


def _create_rest(db: sqlite3.Connection) -> None:
    db.execute(_CREATE_OPEN_ENDS)
    db.execute(_create_runs())
    db.execute(_CREATE_NAMES)
    db.execute(_create_losses())
    for statement in chain.CREATE_TABLES:
        db.execute(statement)


def create(db: sqlite3.Connection) -> None:
    """The tables of a new store, at :data:`SCHEMA_VERSION` (its chain starts with the first
    write, :func:`agent.history.chain.adopt`)."""
    db.execute(_create_history())
    db.execute("CREATE INDEX IF NOT EXISTS history_last_seen ON history (last_seen)")
    _create_rest(db)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _version_1_to_2(db: sqlite3.Connection) -> None:
    """Ends get their source and namespace (every end of a version 1 file was the sampler's);
    rows are marked as seen by sampling; the runs table appears."""
    add_missing_columns(db, "history", HISTORY_COLUMNS)
    db.execute("UPDATE history SET seen_by = 'sampling' WHERE seen_by IS NULL OR seen_by = ''")
    db.execute("ALTER TABLE open_ends RENAME TO open_ends_version_1")
    db.execute(_CREATE_OPEN_ENDS)
    db.execute(
        "INSERT OR IGNORE INTO open_ends SELECT e.history_id, 'sampling', "
        "COALESCE(h.net_namespace, 0), e.local_address, e.local_port "
        "FROM open_ends_version_1 AS e JOIN history AS h ON h.id = e.history_id"
    )
    db.execute("DROP TABLE open_ends_version_1")
    db.execute(_create_runs())


def _version_2_to_3(db: sqlite3.Connection) -> None:
    """The history table again, with ``listen_port`` in its key: every row keeps its id (the
    open ends name them) and its values; rows written before keep ``listen_port`` 0."""
    add_missing_columns(db, "history", [c for c in HISTORY_COLUMNS if c[0] != "listen_port"])
    old = [name for name in table_columns(db, "history") if name != "listen_port"]
    db.execute("DROP INDEX IF EXISTS history_last_seen")
    db.execute("ALTER TABLE history RENAME TO history_version_2")
    db.execute(_create_history())
    db.execute("CREATE INDEX IF NOT EXISTS history_last_seen ON history (last_seen)")
    kept = [name for name in old if name == "id" or name in _HISTORY_NAMES]
    listed = ", ".join(kept)
    db.execute(f"INSERT INTO history ({listed}) SELECT {listed} FROM history_version_2")  # noqa: S608
    db.execute("DROP TABLE history_version_2")
    # An open inbound row goes on as its listening port's row: its open end says which port,
    # and the end keeps the client's port instead (unless another row of that port exists).
    opened = db.execute(
        "SELECT h.id, h.remote_port, MIN(e.local_port) FROM history AS h "
        "JOIN open_ends AS e ON e.history_id = h.id WHERE h.direction = 'inbound' GROUP BY h.id"
    ).fetchall()
    for row_id, client_port, listen_port in opened:
        moved = db.execute(
            "UPDATE OR IGNORE history SET listen_port = ?, remote_port = 0 WHERE id = ?",
            (listen_port, row_id),
        ).rowcount
        if moved:
            db.execute(
                "UPDATE OR IGNORE open_ends SET local_port = ? WHERE history_id = ?",
                (client_port, row_id),
            )


STEPS: Dict[int, Callable[[sqlite3.Connection], None]] = {1: _version_1_to_2, 2: _version_2_to_3}
"""``{version: the step from it to the next}``."""


def table_columns(db: sqlite3.Connection, table: str) -> List[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def add_missing_columns(
    db: sqlite3.Connection, table: str, columns: Sequence[Tuple[str, str]]
) -> List[str]:
    """Add the ``columns`` that ``table`` lacks; their names.  The names are ours (the record's
    fields), never input."""
    present = set(table_columns(db, table))
    added = []
    for name, sql_type in columns:
        if name not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {_column_definition(name, sql_type)}")
            added.append(name)
    return added


class NotOurs(Exception):
    """The file holds a database that is not a history store (its message says what it holds)."""


def upgrade(db: sqlite3.Connection) -> Tuple[int, List[str]]:
    """Bring the store in ``db`` up to this agent's tables, inside the caller's transaction.

    Returns (the file's version before, the columns added).  A new file gets :func:`create`;
    version 0 with tables of its own is another program's database: :class:`NotOurs`.
    """
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version == 0:
        if tables:
            raise NotOurs(f"holds tables {sorted(tables)[:5]} but no history store schema")
        create(db)
        return 0, []
    current = version
    while current < SCHEMA_VERSION:
        STEPS[current](db)
        current += 1
    db.execute(_create_history())  # tables a newer file might lack, though unlikely
    _create_rest(db)
    added = add_missing_columns(db, "history", HISTORY_COLUMNS)
    added += add_missing_columns(db, "runs", [c for c in RUN_COLUMNS if c[0] != "run_id"])
    if version < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return version, added
