"""The extension with kernel events, as the events tests drive it: started under the core
stand-in (tests/osquery_core.py), its tables read through real Thrift calls, its tracing instance
checked gone afterwards.  Shared by tests/test_extension_events.py and test_truth_extension.py."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

from osquery_core import CoreStandIn, ExtensionConnection

TRACING = "/sys/kernel/tracing/instances"


def our_instances(pid: int) -> List[str]:
    try:
        return [name for name in os.listdir(TRACING) if name == f"egress-agent-{pid}"]
    except OSError:
        return []


class Extension:
    def __init__(self, core: CoreStandIn, config: Path, history: Path) -> None:
        self.process = core.launch(
            [sys.executable, "-m", "agent.cli", "extension"],
            interval=1,
            env={"EGRESS_AGENT_CONFIG": str(config)},
        )
        self.registration = core.wait_for_registration(process=self.process)
        self.history = history
        self.core = core

    def connection(self) -> ExtensionConnection:
        return self.core.connect(self.registration, timeout=60)

    def info(self) -> Dict[str, str]:
        with self.connection() as extension:
            (row,) = extension.generate("egress_agent_info")
            return row

    def events(self, pids: Set[int]) -> List[Dict[str, str]]:
        with self.connection() as extension:
            rows = extension.generate("external_connection_events")
        return [row for row in rows if int(row["pid"]) in pids]


@contextlib.contextmanager
def running_extension(tmp_path: Path) -> Iterator[Extension]:
    """The extension under the core stand-in with kernel events on (waited for), its own store
    and config under ``tmp_path``; afterwards, its tracing instance must be gone."""
    history = tmp_path / "history.db"
    config = tmp_path / "config.yaml"
    config.write_text(f"sampling:\n  interval: 60\nhistory:\n  path: {history}\n")
    with CoreStandIn() as core:
        running = Extension(core, config, history)
        deadline = time.monotonic() + 30
        while running.info()["events_source"] != "tracefs":
            assert time.monotonic() < deadline, running.info()
            time.sleep(0.2)
        yield running
    assert not our_instances(running.process.pid), "the extension left its instance"


def wait_until(done: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.25)
    return bool(done())
