"""The watch's systemd unit (packaging/systemd/egress-agent-watch.service): least privilege
(issue 23).

- The unit as text: root bounded to four capabilities, and the sandboxing directives present
  (and those that would break the agent absent).
- ``systemd-analyze verify`` accepts it and ``systemd-analyze security --offline`` rates it
  "OK" or better (5.0 or less; the unit before issue 23 rated 9.0, "UNSAFE").
- Each capability is needed, tried for real: the agent's own functions (tests/capability_probe.py)
  run as root with the unit's bounding set, then with each capability left out, against a
  process of nobody's in a network namespace of its own.  Leaving one out loses exactly what
  the unit's comment says it is for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from floods import Flood
from readable import readable_copies

UNIT = Path(__file__).resolve().parent.parent / "packaging/systemd/egress-agent-watch.service"
PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
CAPABILITIES = {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_NET_RAW"}
LOST_WITHOUT = {
    "CAP_SYS_ADMIN": {"setns"},
    "CAP_SYS_PTRACE": {"fd_link", "exe", "setns"},
    "CAP_DAC_READ_SEARCH": {"fd_list", "fd_link"},
    "CAP_NET_RAW": {"packet"},
}
"""What the probe cannot do once a capability is left out (listing /proc/PID/fd needs
CAP_DAC_READ_SEARCH; reading a link in it needs the listing's search permission too)."""


def service_settings() -> Dict[str, List[str]]:
    """The [Service] section: key -> every value given (systemd allows a key more than once)."""
    settings: Dict[str, List[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_bounds_the_capabilities_and_sandboxes_the_agent() -> None:
    service = service_settings()
    assert set(" ".join(service["CapabilityBoundingSet"]).split()) == CAPABILITIES
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "StateDirectory": "egress-agent",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "PrivateDevices": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {key: service.get(key, [""])[-1] for key in expected} == expected
    families = set(" ".join(service["RestrictAddressFamilies"]).split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    for breaks_the_agent in ("ProtectKernelTunables", "ProtectProc", "ProcSubset", "User"):
        assert breaks_the_agent not in service, breaks_the_agent
    comment = UNIT.read_text()
    assert all(f"#   {capability} " in comment for capability in CAPABILITIES)


@pytest.fixture
def unit_copy() -> Iterator[Path]:
    """The unit with ExecStart pointing at this checkout's command (verify wants an executable
    that exists)."""
    command = shutil.which("egress-agent", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.skip("no egress-agent command beside this interpreter (make .venv/.installed)")
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-unit-"))
    try:
        text = UNIT.read_text().replace("ExecStart=/usr/bin/egress-agent", f"ExecStart={command}")
        copy = directory / UNIT.name
        copy.write_text(text)
        yield copy
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_systemd_analyze_accepts_and_rates_the_unit(unit_copy: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (Debian's systemd package)")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=50", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-400:] + security.stderr
    assert "Overall exposure level" in security.stdout


def _probe(scripts: Path, pid: int, capabilities: List[str]) -> Dict[str, str]:
    """The probe's outcome as root bounded to ``capabilities`` (setpriv: root's capabilities
    after exec are its bounding set)."""
    bounding = ",".join(["-all", *(f"+{c[4:].lower()}" for c in capabilities)])
    argv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]
    argv += [sys.executable, str(scripts / "capability_probe.py"), str(pid)]
    argv.append(f"egress-agent-{PREFIX}-caps")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    found: Dict[str, str] = json.loads(result.stdout)
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: capabilities to leave out")
def test_each_capability_of_the_unit_is_needed() -> None:
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux)")
    flood = Flood(1)
    try:
        pid = flood.procs[0].pid
        with readable_copies("capability_probe.py") as scripts:
            whole = _probe(scripts, pid, sorted(CAPABILITIES))
            assert set(whole.values()) == {"ok"}, whole
            for left_out, lost in LOST_WITHOUT.items():
                outcome = _probe(scripts, pid, sorted(CAPABILITIES - {left_out}))
                failed = {need for need, result in outcome.items() if result != "ok"}
                assert failed == lost, (left_out, outcome)
    finally:
        flood.close()
