"""``egress-agent`` run as a command by the tests, as a user runs it: a fresh interpreter, the
configuration chosen by the test (never the caller's ``$EGRESS_AGENT_CONFIG``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def egress_agent(
    *args: str, config: Optional[Path] = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``egress-agent ARGS...``, its output captured as text; ``config``: the file to use."""
    env = dict(os.environ)
    env.pop("EGRESS_AGENT_CONFIG", None)
    if config is not None:
        env["EGRESS_AGENT_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
