"""The history's tamper evidence: a digest of every chained row, and a hash chain of links that
commit to them.

Every row of the chained tables (:data:`CHAINED`: the connections, the runs, the losses) has a
digest, ``sha256`` of its canonical form (:func:`row_digest`), kept in ``row_digests``.  The
*state* is the sum of those digests modulo 2**256 (a multiset hash: one row changes it by its
old and new digest, so a write updates it without reading the rest).  Each write transaction
updates the chain's *tip*; each heartbeat turns the tip into a *link* of its own, so a link
commits to:

- ``written``: sha256 over every change since the previous link (table, row id, new digest or
  ``-`` when deleted), in the order written;
- ``state``: the state after them, hence every row as it is then;
- ``prev``: the previous link's ``head``;

and its ``head`` is sha256 of all of these (:func:`link_head`); with an operator's key file,
``mac`` is HMAC-SHA256 of the head under that key (RFC 2104).

:func:`verify` recomputes all of it from a file: every row's digest against ``row_digests``
(a row deleted, edited or added by hand is named), the sum against the last link's state, and
each link's head and its ``prev``.  What it cannot catch: whoever can write the file (root on
the host) can recompute every digest and head after an edit; a head recorded off the host
(``egress_agent_info.history_head``, the ``watch`` log line) catches that for every link up to
it, and a MAC catches it without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from agent.timetext import iso

CHAINED: Tuple[Tuple[str, str], ...] = (
    ("history", "id"),
    ("runs", "run_id"),
    ("losses", "loss_id"),
)
"""(table, id column) of the tables whose rows are chained."""

CHAINED_SINCE = 3
"""The schema version from which every store is chained."""

GENESIS = "0" * 64
"""The ``prev`` of the first link."""
MODULUS = 1 << 256

CREATE_TABLES = (
    """CREATE TABLE IF NOT EXISTS row_digests (
  tbl TEXT NOT NULL,
  id INTEGER NOT NULL,
  digest TEXT NOT NULL,
  PRIMARY KEY (tbl, id)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS chain (
  seq INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  run_id INTEGER,
  at REAL NOT NULL,
  boot_id TEXT NOT NULL,
  boottime REAL NOT NULL,
  written TEXT NOT NULL,
  state TEXT NOT NULL,
  prev TEXT NOT NULL,
  head TEXT NOT NULL,
  mac TEXT
)""",
    """CREATE TABLE IF NOT EXISTS chain_base (
  only INTEGER PRIMARY KEY CHECK (only = 1),
  seq INTEGER NOT NULL,
  head TEXT NOT NULL
)""",
)
"""``chain_base``: the last link pruned with the retention (the first kept link's ``prev``)."""

TIP, HEARTBEAT, ADOPTED = "tip", "heartbeat", "adopted"
"""Link kinds: the writes since the last heartbeat (updated in place), a heartbeat's link, and
the first link of a store that was written before chaining (it commits to every row then)."""

LINK_FIELDS = ("seq", "kind", "run_id", "at", "boot_id", "boottime", "written", "state", "prev")


def canonical(table: str, row: Dict[str, Any]) -> bytes:
    """The bytes a row's digest is taken of: the table and its non-NULL columns, sorted (a
    column added by an upgrade is NULL in old rows and changes no digest)."""
    kept = {name: value for name, value in row.items() if value is not None}
    return json.dumps(
        [table, kept], separators=(",", ":"), ensure_ascii=True, sort_keys=True
    ).encode()


def row_digest(table: str, row: Dict[str, Any]) -> str:
    return hashlib.sha256(canonical(table, row)).hexdigest()


def add(state: str, digest: str, sign: int = 1) -> str:
    """``state`` with ``digest`` added (``sign`` -1: taken out), modulo 2**256."""
    return format((int(state, 16) + sign * int(digest, 16)) % MODULUS, "064x")


def fold(written: str, table: str, row_id: int, digest: Optional[str]) -> str:
    """The running digest of changes with one more: ``table`` row ``row_id`` is now ``digest``
    (None: deleted)."""
    text = f"{written}|{table}|{row_id}|{digest or '-'}"
    return hashlib.sha256(text.encode()).hexdigest()


def link_head(link: Dict[str, Any]) -> str:
    """sha256 of the link's fields (:data:`LINK_FIELDS`), times as SQLite's REAL gives them."""
    values = [
        float(link[name])
        if name in ("at", "boottime") and link.get(name) is not None
        else link.get(name)
        for name in LINK_FIELDS
    ]
    return hashlib.sha256(
        json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()


def link_mac(key: bytes, head: str) -> str:
    return hmac.new(key, head.encode(), hashlib.sha256).hexdigest()


def read_rows(db: sqlite3.Connection, table: str, id_column: str) -> Iterable[Tuple[int, str]]:
    """(row id, digest) of every row of ``table`` as it is in the file."""
    cursor = db.execute(f"SELECT * FROM {table}")  # noqa: S608 (our table names)
    names = [description[0] for description in cursor.description]
    for values in cursor:
        row = dict(zip(names, values))
        yield int(row[id_column]), row_digest(table, row)


def tables_of(db: sqlite3.Connection) -> List[str]:
    return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def adopt(
    db: sqlite3.Connection, at: float, boot_id: str, boottime: float, key: Optional[bytes] = None
) -> None:
    """Chain a store written before chaining (or a new one): a digest of every row, one
    ``adopted`` link (signed with ``key`` when given)."""
    state = GENESIS
    present = set(tables_of(db))
    digests = []
    for table, id_column in CHAINED:
        if table not in present:
            continue
        for row_id, digest in read_rows(db, table, id_column):
            digests.append((table, row_id, digest))
            state = add(state, digest)
    db.executemany("INSERT OR REPLACE INTO row_digests VALUES (?, ?, ?)", digests)
    link: Dict[str, Any] = dict(
        seq=1,
        kind=ADOPTED,
        run_id=None,
        at=at,
        boot_id=boot_id,
        boottime=boottime,
        written=GENESIS,
        state=state,
        prev=GENESIS,
    )
    link["head"] = link_head(link)
    link["mac"] = None if key is None else link_mac(key, link["head"])
    db.execute(
        "INSERT INTO chain (seq, kind, run_id, at, boot_id, boottime, written, state, prev, "
        "head, mac) VALUES (:seq, :kind, :run_id, :at, :boot_id, :boottime, :written, :state, "
        ":prev, :head, :mac)",
        link,
    )


@dataclass(frozen=True)
class ChainCheck:
    """What :func:`verify` found."""

    chained: bool
    """The file has a chain (False: written before chaining, or the chain was removed)."""
    broken: Optional[str]
    """The first broken link or row, in words (None: intact)."""
    head: Optional[str]
    """The head of the last heartbeat link (what was published last)."""
    links: int
    expected_head: Optional[str] = None
    expected_found: Optional[bool] = None

    @property
    def intact(self) -> bool:
        return self.chained and self.broken is None and self.expected_found is not False


def _links(db: sqlite3.Connection) -> List[Dict[str, Any]]:
    cursor = db.execute("SELECT * FROM chain ORDER BY seq")
    names = [description[0] for description in cursor.description]
    return [dict(zip(names, values)) for values in cursor]


def verify(
    db: sqlite3.Connection,
    expect_head: Optional[str] = None,
    key: Optional[bytes] = None,
) -> ChainCheck:
    """Check the chain of the file open in ``db`` (see the module docstring); never raises for
    what the file holds."""
    present = set(tables_of(db))
    if not {"chain", "row_digests"} <= present:
        version = int(db.execute("PRAGMA user_version").fetchone()[0] or 0)
        if version >= CHAINED_SINCE:  # a chained store whose chain is gone
            missing = sorted({"chain", "row_digests"} - present)
            return ChainCheck(
                True,
                f"the chain's tables were removed ({', '.join(missing)})",
                None,
                0,
                expect_head,
                None if expect_head is None else False,
            )
        return ChainCheck(False, None, None, 0, expect_head, None if expect_head is None else False)
    try:
        links = _links(db)
        base = (
            db.execute("SELECT seq, head FROM chain_base").fetchone()
            if ("chain_base" in present)
            else None
        )
    except sqlite3.Error as error:
        return ChainCheck(True, f"the chain cannot be read: {error}", None, 0, expect_head, False)
    try:
        broken = _check_links(links, base, key)
        if broken is None:
            broken = _check_rows(db, present, links)
    except (sqlite3.Error, ValueError, TypeError, OverflowError) as error:
        # values of the wrong kind where ours were: edited by hand
        broken = f"the chain or its digests hold what the agent never writes ({error})"
    published = [link for link in links if link.get("kind") != TIP]
    head = str(published[-1]["head"]) if published else None
    found: Optional[bool] = None
    if expect_head is not None:
        found = any(str(link.get("head")) == expect_head.strip().lower() for link in published)
        if broken is None and not found:
            broken = (
                f"no link of the chain has the head {expect_head.strip()[:64]!r} recorded off "
                f"the host (its {len(published)} link(s) run from "
                f"{_describe(published[0]) if published else 'nothing'}): the chain was rewritten "
                "or replaced"
            )
    return ChainCheck(True, broken, head, len(links), expect_head, found)


def _describe(link: Dict[str, Any]) -> str:
    try:
        when = iso(float(link.get("at") or 0))
    except (TypeError, ValueError, OverflowError, OSError):
        when = "?"
    return f"link {link.get('seq')} ({link.get('kind')} at {when})"


def _check_links(
    links: Sequence[Dict[str, Any]], base: Optional[Tuple[int, str]], key: Optional[bytes]
) -> Optional[str]:
    if not links:
        return "the chain has no link"
    expected_seq, expected_prev = (int(base[0]) + 1, str(base[1])) if base else (1, GENESIS)
    for index, link in enumerate(links):
        if link.get("seq") != expected_seq:
            return f"{_describe(link)}: link {expected_seq} is missing (a link was deleted)"
        if link.get("prev") != expected_prev:
            return f"{_describe(link)}: its prev is not the head of the link before it"
        if link_head(link) != link.get("head"):
            return f"{_describe(link)}: its head does not match its content (the link was edited)"
        if (
            key is not None
            and link.get("kind") != TIP
            and not hmac.compare_digest(
                str(link.get("mac") or ""), link_mac(key, str(link.get("head")))
            )
        ):
            return f"{_describe(link)}: its MAC does not match under the given key"
        if link.get("kind") == TIP and index != len(links) - 1:
            return f"{_describe(link)}: a tip that is not the last link"
        expected_seq += 1
        expected_prev = str(link.get("head"))
    return None


def _check_rows(
    db: sqlite3.Connection, present: Iterable[str], links: Sequence[Dict[str, Any]]
) -> Optional[str]:
    recorded: Dict[Tuple[str, int], str] = {
        (str(table), int(row_id)): str(digest)
        for table, row_id, digest in db.execute("SELECT tbl, id, digest FROM row_digests")
    }
    state = GENESIS
    for digest in recorded.values():
        state = add(state, digest)
    tables = set(present)
    for table, id_column in CHAINED:
        if table not in tables:
            if any(key[0] == table for key in recorded):
                return f"the table {table} was dropped"
            continue
        seen = set()
        for row_id, digest in read_rows(db, table, id_column):
            seen.add(row_id)
            chained = recorded.get((table, row_id))
            if chained is None:
                return f"{table} row {row_id} is not chained (it was added outside the agent)"
            if chained != digest:
                return f"{table} row {row_id} differs from what was chained (it was edited)"
        for key in recorded:
            if key[0] == table and key[1] not in seen:
                return f"{table} row {key[1]} is chained but missing (it was deleted)"
    last = links[-1]
    if state != last.get("state"):
        return (
            f"{_describe(last)}: the row digests do not add up to its state (digests were "
            "deleted, added or edited)"
        )
    return None
