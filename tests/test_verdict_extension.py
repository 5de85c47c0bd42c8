"""Issue 25: the extension publishes the history chain's head in ``egress_agent_info`` with
each heartbeat (osquery's logger ships it), and a copy of the store taken later holds it, so
``audit --expect-head`` checks the copy against what left the host.  The extension runs as
osqueryd starts it, against the core stand-in (tests/osquery_core.py)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest
from history_fixture import egress_agent
from osquery_core import CoreError, CoreStandIn, default_extension_command

EXTENSION = default_extension_command()


@pytest.fixture
def core() -> Iterator[CoreStandIn]:
    with CoreStandIn() as stand_in:
        yield stand_in


def test_the_info_table_publishes_the_head_a_copy_is_checked_against(
    core: CoreStandIn, tmp_path: Path
) -> None:
    history = tmp_path / "state" / "history.db"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sampling:\n  interval: 0.3\nhistory:\n  path: {history}\nevents:\n  enabled: false\n"
    )
    env: Dict[str, str] = {"EGRESS_AGENT_CONFIG": str(config)}
    process = core.launch(EXTENSION, timeout=5, interval=0.3, env=env)
    registration = core.wait_for_registration(process=process)
    heads = []
    with core.connect(registration) as extension:
        deadline = time.monotonic() + 30
        while len(set(heads)) < 3:
            (info,) = extension.generate("egress_agent_info")
            if info["history_head"]:
                heads.append(info["history_head"])
            if time.monotonic() > deadline:
                raise CoreError(f"no three heads: {heads}")
            time.sleep(0.2)
    assert all(re.fullmatch(r"[0-9a-f]{64}", head) for head in heads)
    published = heads[-1]
    copy = tmp_path / "copy.db"
    db = sqlite3.connect(history)  # an auditor's copy, taken with SQLite's backup
    backup = sqlite3.connect(copy)
    db.backup(backup)
    backup.close()
    db.close()
    since = str(time.time() - 600)
    result = egress_agent(
        "audit",
        "--since",
        since,
        "--history",
        str(copy),
        "--format",
        "json",
        "--expect-head",
        published,
    )
    assert json.loads(result.stdout)["chain"]["expected_head_found"] is True, result.stdout
    edited = tmp_path / "edited.db"
    shutil.copy(copy, edited)
    db = sqlite3.connect(edited)
    db.execute("DELETE FROM runs")
    db.commit()
    db.close()
    result = egress_agent(
        "audit", "--since", since, "--history", str(edited), "--expect-head", published
    )
    assert result.returncode == 4, result.stdout
