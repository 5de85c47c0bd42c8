"""Issue 25, tamper evidence: a copy of a history edited by hand is ``tampered`` (exit 4), with
the first broken link or row named; a chain rewritten to match is caught by a head recorded
off the host (``--expect-head``) or by the host key (``--key``).

The edits are made as an intruder would, with SQLite itself on a copy (Python's ``sqlite3``
module, the same library as the ``sqlite3`` shell), never through the agent's store.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from history_fixture import connection, egress_agent, run, write_history

from agent.history import HistoryStore, RunFigures, RunStart
from agent.history import chain as chain_module

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
WINDOW = ("--since", str(T0), "--until", str(T0 + 3600))
FULL_RUN = run(T0 - 60, T0 + 3700)


def audit(history: Path, *args: str) -> Tuple[int, List[str], Dict[str, Any]]:
    text = egress_agent("audit", *WINDOW, "--history", str(history), *args)
    document = egress_agent("audit", *WINDOW, "--history", str(history), "--format", "json", *args)
    assert text.returncode == document.returncode, (text.stdout, document.stdout)
    return text.returncode, text.stdout.splitlines(), json.loads(document.stdout)


def verdict(lines: List[str]) -> str:
    (line,) = [line for line in lines if line.startswith("verdict: ")]
    return line


def history(tmp_path: Path, unexpected: bool = True, **run_fields: Any) -> Path:
    connections = [connection()] if unexpected else []
    samples = [(T0 + 600, connections), (T0 + 660, connections), (T0 + 720, [])]
    path = tmp_path / "history.db"
    write_history(str(path), samples, [run(T0 - 60, T0 + 3700, **run_fields)])
    return path


def edited_copy(original: Path, *statements: str) -> Path:
    copy = original.with_name("copy.db")
    shutil.copy(original, copy)
    db = sqlite3.connect(copy)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return copy


def head_of(path: Path) -> str:
    store = HistoryStore(str(path), read_only=True)
    try:
        head = store.verify_chain().head
    finally:
        store.close()
    assert head is not None
    return head


def test_an_untouched_copy_is_intact_and_holds_its_head(tmp_path: Path) -> None:
    original = history(tmp_path)
    code, lines, document = audit(original, "--expect-head", head_of(original))
    assert code == 1, lines
    assert document["chain"]["intact"] is True and document["chain"]["expected_head_found"]
    assert any(line.startswith("chain: intact (") for line in lines)


def test_a_deleted_unexpected_row_is_tampered(tmp_path: Path) -> None:
    original = history(tmp_path)
    copy = edited_copy(original, "DELETE FROM history WHERE remote_address = '9.9.9.9'")
    code, lines, document = audit(copy)
    assert code == 4, lines
    assert document["outcome"] == "tampered"
    assert "history row 1 is chained but missing (it was deleted)" in verdict(lines)


def test_lost_events_set_to_zero_are_tampered(tmp_path: Path) -> None:
    original = history(tmp_path, unexpected=False, events_lost=12)
    assert audit(original)[0] == 3
    copy = edited_copy(original, "UPDATE runs SET events_lost = 0")
    code, lines, _ = audit(copy)
    assert code == 4, lines
    assert "runs row 1 differs from what was chained (it was edited)" in verdict(lines)


def test_a_deleted_loss_is_tampered(tmp_path: Path) -> None:
    original = history(tmp_path, unexpected=False)
    store = HistoryStore(str(original), retention_days=0, max_rows=0)
    assert store.record_loss("lost_writes", T0 + 100, T0 + 200, 3, "test")
    store.close()
    code, lines, document = audit(original)
    assert code == 3 and document["coverage"]["reasons"][0]["reason"] == "lost_writes", lines
    copy = edited_copy(original, "DELETE FROM losses")
    code, lines, _ = audit(copy)
    assert code == 4, lines
    assert "losses row 1 is chained but missing" in verdict(lines)


def test_a_row_and_its_digest_deleted_break_the_state(tmp_path: Path) -> None:
    original = history(tmp_path)
    copy = edited_copy(
        original,
        "DELETE FROM history WHERE id = 1",
        "DELETE FROM row_digests WHERE tbl = 'history' AND id = 1",
    )
    code, lines, _ = audit(copy)
    assert code == 4, lines
    assert "the row digests do not add up to its state" in verdict(lines)


def test_a_deleted_link_is_tampered(tmp_path: Path) -> None:
    original = history(tmp_path)
    store = HistoryStore(str(original), retention_days=0, max_rows=0)
    run_id = store.start_run(RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs"))
    assert run_id is not None and store.heartbeat(run_id, RunFigures("tracefs"))
    store.close()
    copy = edited_copy(original, "DELETE FROM chain WHERE seq = 2")
    code, lines, _ = audit(copy)
    assert code == 4, lines
    assert "link 2 is missing (a link was deleted)" in verdict(lines)


def test_a_dropped_chain_is_tampered(tmp_path: Path) -> None:
    original = history(tmp_path, unexpected=False)
    assert audit(original)[0] == 0
    copy = edited_copy(original, "DROP TABLE row_digests")
    code, lines, _ = audit(copy)
    assert code == 4, lines
    assert "the chain's tables were removed (row_digests)" in verdict(lines)


def test_a_dropped_chain_passed_off_as_an_old_store_is_never_clean(tmp_path: Path) -> None:
    original = history(tmp_path, unexpected=False)
    copy = edited_copy(
        original, "DROP TABLE chain", "DROP TABLE row_digests", "PRAGMA user_version = 2"
    )
    code, lines, document = audit(copy)
    assert code == 3, lines
    assert [r["reason"] for r in document["coverage"]["reasons"]] == ["unchained"]


def _forge(path: Path) -> None:
    """What root on the host can do: delete the row, then recompute every digest and link
    with the agent's own code, so that the file is consistent again."""
    db = sqlite3.connect(path)
    db.execute("DELETE FROM history WHERE remote_address = '9.9.9.9'")
    db.execute("DELETE FROM row_digests")
    db.execute("DELETE FROM chain")
    db.commit()
    chain_module.adopt(db, T0, "forged", 0.0)
    links = db.execute("SELECT head FROM chain").fetchall()
    assert len(links) == 1
    db.commit()
    db.close()


def test_a_rewritten_chain_is_caught_by_the_head_recorded_off_the_host(tmp_path: Path) -> None:
    original = history(tmp_path)
    published = head_of(original)
    copy = original.with_name("copy.db")
    shutil.copy(original, copy)
    _forge(copy)
    code, lines, _ = audit(copy)
    assert code == 0, lines  # the limit, said in the README: a consistent rewrite passes alone
    code, lines, document = audit(copy, "--expect-head", published)
    assert code == 4, lines
    assert document["chain"]["expected_head_found"] is False
    assert "the chain was rewritten or replaced" in verdict(lines)


def test_a_signed_chain_rewritten_without_the_key_is_tampered(tmp_path: Path) -> None:
    key = tmp_path / "host.key"
    key.write_bytes(b"an operator's secret host key\n")
    path = tmp_path / "signed.db"
    store = HistoryStore(str(path), retention_days=0, max_rows=0, key=key.read_bytes().strip())
    assert store.snapshot("sampling", [connection(allowlisted=True)], at=T0 + 10)
    start = RunStart("watch", 1, "web-1", "m", "0.test", 30.0, "tracefs")
    run_id = store.start_run(start, at=T0 - 60)
    assert run_id is not None
    assert store.heartbeat(run_id, RunFigures("tracefs"), at=T0 + 3700, stopped=True)
    store.close()
    assert audit(path, "--key", str(key))[0] == 0
    db = sqlite3.connect(path)  # re-hash the last link after an edit, without the key
    db.execute("UPDATE runs SET events_lost = 0, hostname = 'forged'")
    db.commit()
    db.close()
    forged = HistoryStore(str(path), retention_days=0, max_rows=0)  # reopened without the key
    assert forged.heartbeat(run_id, RunFigures("tracefs"), at=T0 + 3700, stopped=True)
    forged.close()
    code, lines, _ = audit(path, "--key", str(key))
    assert code == 4, lines
    assert "its MAC does not match under the given key" in verdict(lines)


def test_watch_publishes_each_head_and_audit_checks_a_copy_against_it(tmp_path: Path) -> None:
    history_path = tmp_path / "history.db"
    config = tmp_path / "config.yaml"
    config.write_text(f"history:\n  path: {history_path}\nevents:\n  enabled: false\n")
    env = dict(os.environ, EGRESS_AGENT_CONFIG=str(config))
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "watch",
            "--log-head",
            "--interval",
            "0.3",
            "--count",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _, errors = watch.communicate(timeout=60)
    assert watch.returncode == 0, errors
    heads = [
        line.split()[-1]
        for line in errors.splitlines()
        if line.startswith("egress-agent watch: history head ")
    ]
    assert len(heads) >= 4 and len(set(heads)) == len(heads), errors
    since, until = str(time.time() - 600), str(time.time())
    window = ("--since", since, "--until", until, "--history", str(history_path))
    for head in heads:  # every published head is a link of the chain
        result = egress_agent("audit", *window, "--expect-head", head, "--format", "json")
        assert json.loads(result.stdout)["chain"]["expected_head_found"] is True, result.stdout
    copy = edited_copy(history_path, "UPDATE runs SET events_source = 'tracefs'")
    result = egress_agent(
        "audit",
        "--since",
        since,
        "--until",
        until,
        "--history",
        str(copy),
        "--expect-head",
        heads[-1],
    )
    assert result.returncode == 4, result.stdout


def test_watch_signs_with_the_configured_host_key(tmp_path: Path) -> None:
    history_path = tmp_path / "history.db"
    key, wrong = tmp_path / "host.key", tmp_path / "other.key"
    key.write_bytes(os.urandom(32))
    wrong.write_bytes(os.urandom(32))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"history:\n  path: {history_path}\n  key_file: {key}\nevents:\n  enabled: false\n"
    )
    watch = egress_agent("watch", "--interval", "0.2", "--count", "2", config=config)
    assert watch.returncode == 0, watch.stderr
    window = ("--since", str(time.time() - 600), "--history", str(history_path), "--format", "json")
    signed = egress_agent("audit", *window, "--key", str(key))
    assert json.loads(signed.stdout)["chain"]["intact"] is True, signed.stdout
    forged = egress_agent("audit", *window, "--key", str(wrong))
    assert forged.returncode == 4, forged.stdout
    missing = egress_agent("audit", *window, "--key", str(tmp_path / "none.key"))
    assert missing.returncode == 2 and "cannot read the key file" in missing.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE row_digests SET id = 'x', digest = 'not hex' WHERE tbl = 'history'",
        "UPDATE chain SET at = 'yesterday' WHERE seq = 1",
    ],
)
def test_garbage_in_the_chain_is_tampered_not_a_traceback(tmp_path: Path, statement: str) -> None:
    copy = edited_copy(history(tmp_path), statement)
    code, lines, document = audit(copy)
    assert code == 4, lines
    assert "Traceback" not in "\n".join(lines)
    assert document["chain"]["broken"]
