"""The recipe of docs/DESIGN.md, "Add a column", tested as a developer would follow it.

A copy of the ``agent`` package gets one new column, edited in the two places the recipe names
(the record definition in records.py, and the reader that fills it in collect/sockets/sampler.py),
and nothing else.  The copy then runs for real, on a connection between two test hosts: the column
reaches ``check``'s JSON and CSV, the history store (an existing store gains the column), and
the osquery tables of the extension started by the core stand-in.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from nethost import NetHost
from osquery_core import CoreStandIn

from agent.history import HistoryStore
from agent.records import Connection

ROOT = Path(__file__).resolve().parent.parent
SERVER, CLIENT = "2001:4860:4862::8888", "2001:4860:4862::2"

RECORD_FIELD = '    allow_rule: str = _col("TEXT", "")\n'
SOCKET_FIELD = "    direction: str\n"
READER_LINE = (
    "                direction=direction_of(on_listening_end, identity.pid > 0, connected),\n"
)


def copy_with_a_new_column(target: Path) -> Path:
    """``agent/`` copied under ``target`` with the column ``reader_note`` added by the recipe."""
    package = target / "agent"
    shutil.copytree(ROOT / "agent", package, ignore=shutil.ignore_patterns("__pycache__"))
    edits = [
        (
            package / "records.py",
            RECORD_FIELD,
            RECORD_FIELD + '    reader_note: str = _col("TEXT", "")\n',
        ),
        (package / "records.py", SOCKET_FIELD, SOCKET_FIELD + '    reader_note: str = ""\n'),
        (
            package / "collect" / "sockets" / "sampler.py",
            READER_LINE,
            READER_LINE + '                reader_note=f"seen in {namespace_inode}",\n',
        ),
    ]
    for path, anchor, replacement in edits:
        text = path.read_text()
        assert text.count(anchor) == 1, f"the recipe's anchor moved in {path}: {anchor!r}"
        path.write_text(text.replace(anchor, replacement))
    # Like the packaged launcher: a script puts its own directory first on sys.path.
    (target / "egress-agent").write_text(
        "import sys\nfrom agent.cli import main\nsys.exit(main())\n"
    )
    return target


def run_copy(copy: Path, *args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EGRESS_AGENT_CONFIG=str(config))
    return subprocess.run(
        [sys.executable, str(copy / "egress-agent"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=str(copy),
    )


def test_a_new_column_reaches_every_output(nethost: NetHost, tmp_path: Path) -> None:
    copy = copy_with_a_new_column(tmp_path / "tree")
    (copy / "probe").write_text(
        "import agent.records as r\nprint(r.__file__, r.COLUMN_NAMES[-1])\n"
    )
    probe = subprocess.run(
        [sys.executable, str(copy / "probe")], capture_output=True, text=True, check=True
    )
    assert probe.stdout.split() == [str(copy / "agent" / "records.py"), "reader_note"]

    srv, cli = nethost.namespace("srv"), nethost.namespace("cli")
    nethost.veth(srv, "s0", cli, "c0")
    srv.add_address(nethost.name("s0"), SERVER + "/64")
    cli.add_address(nethost.name("c0"), CLIENT + "/64")
    server = nethost.listen(srv, SERVER)
    client = nethost.connect(cli, SERVER, server.port)
    expected = f"seen in {cli.inode}"

    history = tmp_path / "history.db"
    old = HistoryStore(str(history))  # a store from before the column existed, with a row
    earlier = [Connection(pid=1, process_uuid="old", external=True)]
    assert old.snapshot("sampling", earlier, at=time.time() - 60)
    old.close()
    config = tmp_path / "config.yaml"
    config.write_text(f"sampling:\n  interval: 1\nhistory:\n  path: {history}\n")

    checked = run_copy(copy, "check", "--format", "json", config=config)
    assert checked.returncode == 1, checked.stderr
    (row,) = [r for r in json.loads(checked.stdout) if r["pid"] == client.pid]
    assert row["reader_note"] == expected

    as_csv = run_copy(copy, "check", "--format", "csv", config=config)
    rows: List[Dict[str, Any]] = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["reader_note"] for r in rows if r["pid"] == str(client.pid)] == [expected]

    watched = run_copy(copy, "watch", "--count", "1", config=config)
    assert watched.returncode == 0, watched.stderr
    recorded = run_copy(copy, "history", "--format", "json", config=config)
    notes = {r["process_uuid"]: r["reader_note"] for r in json.loads(recorded.stdout)}
    assert notes["old"] is None  # the old row is kept, the new column empty
    assert expected in notes.values()

    env = {"EGRESS_AGENT_CONFIG": str(config)}
    with CoreStandIn() as core:
        process = core.launch([sys.executable, str(copy / "egress-agent"), "extension"], env=env)
        registration = core.wait_for_registration(process=process)
        assert "reader_note" in [
            route["name"] for route in registration.tables()["external_connections"]
        ]
        assert "reader_note" in [
            route["name"] for route in registration.tables()["external_connection_history"]
        ]
        with core.connect(registration) as extension:
            live = extension.generate("external_connections", {"pid": [(2, str(client.pid))]})
            assert [r["reader_note"] for r in live] == [expected]
            history_rows = extension.generate("external_connection_history")
            assert expected in [r["reader_note"] for r in history_rows]


def test_the_recipe_names_these_files() -> None:
    """If the recipe changes, this test's edits must change with it."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    recipe = design[design.index("### Add a column") :].split("\n### ", 1)[0]
    assert "agent/records.py" in recipe and "agent/collect/sockets/sampler.py" in recipe
