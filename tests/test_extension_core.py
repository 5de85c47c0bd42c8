"""The extension under osquery core as it really behaves (issue 13), through tests/sqlcore.py.

Each test names the finding of issue 13 it stands for.  The extension is the real process,
launched as osqueryd launches it, except where a test must count what the sampler is asked
(the JOIN tests run the extension's own server in-process over a counting sample function:
a real sampler cannot be counted from outside).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import apsw
import psutil
import pytest
from fakes import FunctionSampler, monitor_of
from osquery.extensions.ttypes import InternalExtensionInfo
from osquery_core import default_extension_command
from sqlcore import WATCHDOG_BYTES, SqlCore

from agent.history import HistoryStore
from agent.osquery import dispatch
from agent.osquery.dispatch import ExtensionTables
from agent.osquery.egress_agent_info import INFO_COLUMNS
from agent.osquery.server import Options, Stopper, serve
from agent.osquery.table import AgentInfo
from agent.records import Connection

EXTENSION = default_extension_command()
HISTORY = "external_connection_history"
LIVE = "external_connections"


def write_config(directory: Path, history: Path, interval: float = 1) -> Dict[str, str]:
    config = directory / "config.yaml"
    config.write_text(f"sampling:\n  interval: {interval}\nhistory:\n  path: {history}\n")
    return {"EGRESS_AGENT_CONFIG": str(config)}


@pytest.fixture
def core() -> Iterator[SqlCore]:
    with SqlCore(extensions_interval=1, extensions_timeout=3) as stand_in:
        yield stand_in


@pytest.fixture
def env(tmp_path: Path) -> Dict[str, str]:
    return write_config(tmp_path, tmp_path / "state" / "history.db")


def launch(core: SqlCore, env: Dict[str, str], **flags: object) -> None:
    process = core.launch(EXTENSION, env=env, **{"timeout": 3, "interval": 1, **flags})  # type: ignore[arg-type]
    core.wait_for_registration(process=process)


# -- finding 1: the history table at 100,000 rows -------------------------------------------------

HISTORY_ROWS = 100_000
NOW = int(time.time())
BATCHES = 4  # last_seen NOW - 3000, - 2000, - 1000, - 0: a quarter of the rows each


def fill_history(path: Path) -> None:
    """100,000 history rows (the default ``max_rows``) of 1,000 pids, both directions."""
    store = HistoryStore(str(path), retention_days=3650)
    per_batch = HISTORY_ROWS // BATCHES
    for batch in range(BATCHES):
        connections = [
            Connection(
                pid=10_000 + n % 1000,
                name="worker",
                path="/usr/bin/worker",
                cmdline="/usr/bin/worker --serve",
                uid=0,
                username="root",
                process_start_time=NOW - 86400,
                process_uuid=f"{n % 1000:08d}-0000-4000-8000-000000000000",
                remote_address=f"2001:4860:{batch:x}::{n:x}",
                remote_port=443,
                local_address="2001:db8::2",
                local_port=40000 + n % 20000,
                direction="inbound" if n % 10 == 0 else "outbound",
                external=True,
                expanded_address=f"2001:4860:000{batch:x}:0000:0000:0000:0000:{n:04x}",
                address_int=str(n),
                address_class="global",
            )
            for n in range(batch * per_batch, (batch + 1) * per_batch)
        ]
        assert store.snapshot("sampling", connections, at=NOW - 1000 * (BATCHES - 1 - batch))
    assert store.count() == HISTORY_ROWS
    store.close()


@pytest.fixture(scope="module")
def big_history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlCore]:
    """The extension over a 100,000-row history; the background sampler never runs during
    the tests (a one-hour interval, after its first sample at start)."""
    base = tmp_path_factory.mktemp("history")
    history = base / "history.db"
    fill_history(history)
    with SqlCore(extensions_interval=1, extensions_timeout=3) as stand_in:
        launch(stand_in, write_config(base, history, interval=3600))
        time.sleep(1)  # the first background sample is written by now: rows stay put
        yield stand_in


def test_history_answers_only_the_columns_a_query_reads(big_history: SqlCore) -> None:
    result = big_history.query(f"SELECT pid, remote_address FROM {HISTORY} WHERE pid = 10007")
    # 100 rows, less the few the first background sample pruned (max_rows) to add this host's
    assert len(result.rows) >= 90
    assert result.stats.keys_returned[HISTORY] == {"pid", "remote_address"}
    assert result.stats.rows_returned[HISTORY] == len(result.rows)  # pid pushed down


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (f"last_seen >= {NOW - 1000}", HISTORY_ROWS // 2),
        (f"last_seen > {NOW - 1000}", HISTORY_ROWS // 4),
        (f"last_seen < {NOW - 1000}", HISTORY_ROWS // 2),
        ("open = 0", HISTORY_ROWS),
        ("direction = 'inbound'", HISTORY_ROWS // 10),
        ("pid IN (10001, 10002)", 2 * HISTORY_ROWS // 1000),
        (f"direction = 'inbound' AND last_seen > {NOW - 1000} AND pid = 10010", 25),
    ],
)
def test_history_pushes_constraints_down(big_history: SqlCore, where: str, expected: int) -> None:
    """The answer holds what the query asks for (plus, for ``last_seen <``, rows that began
    before: history can only bound first_seen there), not the whole table."""
    result = big_history.query(f"SELECT COUNT(*) AS n FROM {HISTORY} WHERE {where}")
    (row,) = result.rows
    assert row["n"] >= 0.9 * expected  # this host's own connections may add a few, or prune
    returned = result.stats.rows_returned[HISTORY]
    if "<" in where:
        assert row["n"] <= returned < HISTORY_ROWS
    else:
        assert returned == row["n"]
    assert result.stats.keys_returned[HISTORY] <= {"pid", "last_seen", "open", "direction"}


def test_no_history_answer_approaches_the_watchdog(big_history: SqlCore) -> None:
    """The pack's hourly query and ``SELECT *`` over 100,000 rows: core holds each answer
    twice (ExtensionClient::call copies it), so twice the answer must stay far below the
    200 MB watchdog."""
    pack = dict(pack_sql())["egress_history_by_process"]
    for name, sql in (("pack", pack), ("select *", f"SELECT * FROM {HISTORY}")):
        result = big_history.query(sql)
        held = 2 * result.stats.largest_answer_core_bytes
        print(
            f"\n{name}: {result.stats.rows_returned[HISTORY]} rows, "
            f"{result.stats.response_bytes[HISTORY] / 1e6:.1f} MB on the wire, "
            f"core holds {held / 1e6:.1f} MB, {result.stats.seconds:.2f} s"
        )
        assert held < WATCHDOG_BYTES / 2, name


def pack_sql() -> List[Tuple[str, str]]:
    from osquery_core import pack_queries

    return pack_queries(
        str(Path(__file__).resolve().parent.parent / "config/osquery/egress-agent.conf")
    )


# -- finding 2: JOINs and IN lists --------------------------------------------------------------


def test_pid_is_optimized_and_an_in_list_is_one_call(core: SqlCore, env: Dict[str, str]) -> None:
    launch(core, env)
    registration = core.registration_of()
    assert registration is not None
    options = {r["name"]: r["op"] for r in registration.tables()[LIVE]}
    assert int(options["pid"]) & 9 == 9  # INDEX | OPTIMIZED, as osquery's processes.pid
    own = os.getpid()
    result = core.query(f"SELECT pid FROM {LIVE} WHERE pid IN ({own}, 1, 2, {own + 1})")
    assert result.stats.generate[LIVE] == 1
    (context,) = [c for name, c in result.stats.contexts if name == LIVE]
    (pid,) = [c for c in context["constraints"] if c["name"] == "pid"]
    assert sorted(int(c["expr"]) for c in pid["list"]) == sorted([own, 1, 2, own + 1])


class CountingSampler:
    """A sample function that counts how often it is asked, over fixed connections."""

    def __init__(self, connections: List[Connection]) -> None:
        self.connections = connections
        self.calls: List[Optional[FrozenSet[int]]] = []
        self.lock = threading.Lock()

    def __call__(self, pids: Optional[FrozenSet[int]]) -> List[Connection]:
        with self.lock:
            self.calls.append(pids)
        return [c for c in self.connections if pids is None or c.pid in pids]


@pytest.fixture
def counted(core: SqlCore) -> Iterator[CountingSampler]:
    """The extension's server in-process, its live table over a :class:`CountingSampler`
    holding one external connection for each of a few live processes of ours."""
    me = psutil.Process()
    connections = [
        Connection(
            pid=me.pid,
            uid=os.getuid(),
            name=me.name(),
            remote_address=f"9.9.9.{n}",
            remote_port=443,
            external=True,
        )
        for n in range(1, 4)
    ]
    sampler = CountingSampler(connections)
    monitor = monitor_of(FunctionSampler(sampler), interval=3600)
    tables = ExtensionTables(monitor, None, AgentInfo("1", "", 1.0, ""))
    stopper = Stopper()
    options = Options(socket=core.socket_path, timeout=5, interval=1)
    server = threading.Thread(target=serve, args=(options, tables, None, stopper), daemon=True)
    server.start()
    try:
        core.wait_for_registration()
        yield sampler
    finally:
        stopper.request("test over")
        server.join(10)


def test_a_join_calling_per_row_costs_one_sample(core: SqlCore, counted: CountingSampler) -> None:
    """The issue's example: with core's default index every column is an index, so a JOIN on
    uid calls generate once per process of that uid."""
    result = core.query(
        f"SELECT p.pid, c.remote_address FROM processes AS p JOIN {LIVE} AS c ON c.uid = p.uid"
    )
    pids = {row["pid"] for row in result.rows}
    assert len(result.rows) == 3 * len(pids)  # every process of that uid, 3 rows each
    assert os.getpid() in pids and 1 in pids  # (processes come and go on a busy machine)
    assert result.stats.generate[LIVE] > 10  # core called per row: the test means something
    print(
        f"\nJOIN on uid: {result.stats.generate[LIVE]} generate calls, {len(counted.calls)} samples"
    )
    assert counted.calls == [None]


def test_a_join_on_pid_costs_at_most_one_full_sample(
    core: SqlCore, counted: CountingSampler
) -> None:
    result = core.query(
        f"SELECT p.name, c.remote_address FROM processes AS p JOIN {LIVE} AS c USING (pid) "
        "WHERE p.pid > 0"
    )
    assert len(result.rows) == 3
    full = [pids for pids in counted.calls if pids is None]
    narrowed = [pids for pids in counted.calls if pids is not None]
    assert len(full) <= 1 and len(narrowed) <= 1, counted.calls


def test_a_sample_is_not_reused_by_a_later_query(core: SqlCore, counted: CountingSampler) -> None:
    core.query(f"SELECT COUNT(*) FROM {LIVE}")
    time.sleep(3)  # longer than the reuse window (not a timing assertion: a lower bound)
    core.query(f"SELECT COUNT(*) FROM {LIVE}")
    assert counted.calls == [None, None]


# -- finding 3: registration as long as core takes ----------------------------------------------


def test_registration_waits_for_the_query_that_holds_the_attach_lock(
    core: SqlCore, env: Dict[str, str]
) -> None:
    """Core attaches a new extension's tables under the attach lock, which a running query
    holds for its whole duration: registration takes as long as that query."""
    held = threading.Thread(target=core.query, args=("SELECT stand_in_sleep(12)",), daemon=True)
    held.start()
    time.sleep(0.5)
    process = core.launch(EXTENSION, env=env, timeout=3, interval=1)
    registration = core.wait_for_registration(process=process, timeout=60)
    held.join(30)
    assert process.poll() is None
    assert core.query("SELECT version FROM egress_agent_info").rows[0]["version"]
    assert core.manager.refusals == []
    del registration


def test_a_duplicate_refusal_is_retried_until_core_drops_the_orphan(
    core: SqlCore, env: Dict[str, str]
) -> None:
    """An earlier extension gave up waiting and left core an orphan registration: core refuses
    the relaunched one as a duplicate until its watcher's ping of the orphan fails."""
    orphan = core.manager.registerExtension(
        InternalExtensionInfo(name="egress_agent", version="0", sdk_version="3.0.7"),
        dispatch.registry(),
    )
    assert orphan.code == 0
    process = core.launch(EXTENSION, env=env, timeout=3, interval=1)
    registration = core.wait_for_registration(process=process, timeout=60)
    assert registration.uuid != orphan.uuid
    assert orphan.uuid in core.dropped
    assert ("egress_agent", "Duplicate extension registered") in core.manager.refusals
    assert process.poll() is None


# -- finding 4: request strings that are not UTF-8 -----------------------------------------------


def test_a_request_that_is_not_utf8_is_answered(core: SqlCore, env: Dict[str, str]) -> None:
    process = core.launch(EXTENSION, env=env, timeout=3, interval=1, verbose=True)
    core.wait_for_registration(process=process)
    # A BLOB constraint reaches the context as its raw bytes (sqlite3_value_text).
    result = core.query("SELECT version FROM egress_agent_info WHERE version <> X'C0FF'")
    assert len(result.rows) == 1
    joined = core.query(
        f"SELECT c.pid FROM (SELECT X'6E61FF6D65' AS n) AS t JOIN {LIVE} AS c ON c.name = t.n"
    )
    assert joined.rows == [] and joined.stats.generate[LIVE] == 1
    output = core.output(process)
    assert "'version': ['68:\\udcc0\\udcff']" in output  # every byte kept (PEP 383)
    assert "dropped a connection" not in output


# -- finding 5: writes ---------------------------------------------------------------------------


def test_writes_are_refused_as_osquery_refuses_them(core: SqlCore, env: Dict[str, str]) -> None:
    launch(core, env)
    values = ", ".join(
        "1" if kind in ("INTEGER", "BIGINT") else "1.0" if kind == "DOUBLE" else "'x'"
        for _, kind in INFO_COLUMNS
    )
    statements = [
        f"INSERT INTO egress_agent_info VALUES ({values})",
        "DELETE FROM egress_agent_info",
    ]
    for sql in statements:
        with pytest.raises(apsw.ReadOnlyError, match="table egress_agent_info may not be modified"):
            core.query(sql)
    assert len(core.query("SELECT * FROM egress_agent_info").rows) == 1


# -- finding 6: --timeout and --interval as core writes them -----------------------------------


@pytest.mark.parametrize(
    "value", ["3s", " 10", "-1", "", "abc", "1.5", "0", "99999999999999999999"]
)
def test_flags_core_accepts_never_stop_the_extension(
    core: SqlCore, env: Dict[str, str], value: str
) -> None:
    """osqueryd passes ``--extensions_timeout`` and ``--extensions_interval`` unparsed (they are
    string flags) and reads them itself with ``atoi``: whatever it takes, the extension takes."""
    process = core.launch(EXTENSION, env=env, timeout=value, interval=value)
    core.wait_for_registration(process=process, timeout=60)
    assert core.query("SELECT pid FROM egress_agent_info").rows == [{"pid": process.pid}]
    assert process.poll() is None
