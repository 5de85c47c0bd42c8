"""Names for destinations end to end: a DNS server in a test host answers a client in another
with a CNAME chain, the client connects to the answer, and the asked name reaches every output.

``egress-agent watch`` observes the answer (its DNS watch enters every namespace) and keeps it
in the history store; ``check`` (one sample) reads the names the running agent recorded there;
the extension started by the core stand-in does both.  A ``domains:`` rule turns the
connection from unexpected (exit 1) to allowlisted (exit 0).  The test hosts are those of
tests/test_dnswatch.py; every assertion looks at the client namespace's rows only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from commands import egress_agent
from dnshost import FASTLY, DnsHost, resolve, wait_for
from lines import Lines
from osquery_core import CoreStandIn

ROOT = Path(__file__).resolve().parent.parent
ASKED = "deb.debian.org"
ANSWER = "151.101.2.132"


def config_file(path: Path, history: Path, allow: str = "") -> Path:
    path.write_text(f"sampling:\n  interval: 0.5\nhistory:\n  path: {history}\n{allow}")
    return path


def rows_of(text: str, namespace: int) -> List[Dict[str, Any]]:
    return [r for r in json.loads(text) if int(r["net_namespace"]) == namespace]


def start_watch(config: Path) -> subprocess.Popen[str]:
    """``watch`` printing JSON lines, with ``config``."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "watch", "--format", "jsonl"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config)),
    )
    return watch


def read_named(watch: subprocess.Popen[str], namespace: int, timeout: float = 30) -> Dict[str, Any]:
    """The first row ``watch`` printed for ``namespace`` with a name (its stdout is read
    through :class:`Lines` from here on: call this once per watch)."""
    output = Lines(watch.stdout)
    printed: List[Dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = output.next(0.5)
        if line is None:
            assert not output.ended, "watch ended: " + (watch.stderr.read() if watch.stderr else "")
            continue
        row = json.loads(line)
        if row["net_namespace"] == namespace and row["remote_domain"]:
            return dict(row)
        printed.append(row)
    raise AssertionError(
        f"watch printed no named connection of namespace {namespace}; it printed: "
        + "; ".join(
            f"{r['pid']} {r['net_namespace']} {r['remote_address']}:{r['remote_port']} "
            f"{r['remote_domain']!r} {r.get('seen_by', '')}"
            for r in printed
        )
    )


def packet_sockets(pid: int, owner: int) -> List[int]:
    """The inodes of the AF_PACKET sockets in the namespace of ``pid`` that process ``owner``
    holds (the DNS watch opens one in each namespace).  Other agents on the machine (another
    test run's, a developer's) may hold packet sockets there too: only ours count."""
    with open(f"/proc/{pid}/net/packet", encoding="ascii") as table:
        inodes = {int(line.split()[8]) for line in table.readlines()[1:]}
    held = set()
    for fd in os.listdir(f"/proc/{owner}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{owner}/fd/{fd}")
            if link.startswith("socket:["):
                held.add(int(link[8:-1]))
    return sorted(inodes & held)


def stored_answer(history: Path, namespace: int, address: str) -> bool:
    """Whether the store at ``history`` holds a DNS answer for ``address`` in ``namespace``."""
    if not history.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{history}?mode=ro", uri=True)) as db:
        try:
            found = db.execute(
                "SELECT 1 FROM dns_answers WHERE net_namespace = ? AND address = ?",
                (namespace, address),
            ).fetchone()
        except sqlite3.OperationalError:  # not created yet, or locked by the writer
            return False
    return found is not None


def stop(watch: subprocess.Popen[str]) -> str:
    watch.send_signal(signal.SIGTERM)
    try:
        _, stderr = watch.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        watch.kill()
        _, stderr = watch.communicate()
    return stderr


def test_the_asked_name_reaches_every_output(dns_host: DnsHost, tmp_path: Path) -> None:
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    history = tmp_path / "history.db"
    config = config_file(tmp_path / "config.yaml", history)
    watch: Optional[subprocess.Popen[str]] = start_watch(config)
    try:
        assert watch is not None
        watching = watch.pid
        wait_for(
            lambda: packet_sockets(stub.pid, watching), "watch's DNS watch in the namespace", 60
        )
        assert resolve(stub, "10.53.1.1", ASKED) == ("udp", [ANSWER])
        client = dns_host.net.connect(cli1, ANSWER, dns_host.web_port)
        printed = read_named(watch, cli1.inode)
        assert (printed["pid"], printed["remote_domain"]) == (client.pid, ASKED)
        wait_for(lambda: stored_answer(history, cli1.inode, ANSWER), "the answer stored", 60)
    finally:
        stderr = stop(watch)
        watch = None
    assert "Traceback" not in stderr

    netns = ("--netns", cli1.name)
    checked = egress_agent("check", "--format", "json", *netns, config=config)
    assert checked.returncode == 1, checked.stderr  # unexpected: no rule allows it
    (row,) = rows_of(checked.stdout, cli1.inode)
    assert (row["remote_address"], row["remote_domain"]) == (ANSWER, ASKED)
    assert "no names for destinations" not in checked.stderr
    as_csv = egress_agent("check", "--format", "csv", *netns, config=config).stdout
    assert [r["remote_domain"] for r in csv.DictReader(io.StringIO(as_csv))] == [ASKED]
    ecs = egress_agent("check", "--format", "ecs", *netns, config=config).stdout
    assert json.loads(ecs)["destination"]["domain"] == ASKED
    table = egress_agent("check", "--format", "table", *netns, config=config).stdout
    assert "remote_domain" in table.splitlines()[0] and ASKED in table
    recorded = egress_agent("history", "--format", "json", *netns, config=config)
    assert [r["remote_domain"] for r in json.loads(recorded.stdout)] == [ASKED]

    allowing = config_file(
        tmp_path / "allow.yaml",
        history,
        "allow:\n  - comment: Debian mirrors\n    domains: ['*.debian.org']\n",
    )
    allowed = egress_agent("check", "--format", "json", "--allowlisted", *netns, config=allowing)
    assert allowed.returncode == 0, allowed.stdout
    (row,) = rows_of(allowed.stdout, cli1.inode)
    assert row["allowlisted"] and row["allow_rule"] == "Debian mirrors"
    by_cname = config_file(tmp_path / "cname.yaml", history, f"allow:\n  - domains: [{FASTLY}]\n")
    assert egress_agent("check", *netns, config=by_cname).returncode == 0  # the chain counts

    with CoreStandIn() as core:
        process = core.launch(
            [sys.executable, "-m", "agent.cli", "extension"],
            interval=1,
            env={"EGRESS_AGENT_CONFIG": str(config)},
        )
        registration = core.wait_for_registration(process=process)
        with core.connect(registration) as extension:
            live = extension.generate("external_connections", {"pid": [(2, str(client.pid))]})
            assert [r["remote_domain"] for r in live] == [ASKED]
            kept = extension.generate(
                "external_connection_history", {"pid": [(2, str(client.pid))]}
            )
            assert {r["remote_domain"] for r in kept} == {ASKED}
            (info,) = extension.generate("egress_agent_info")
            deadline = time.monotonic() + 30
            while info["dns_names"] == "" and time.monotonic() < deadline:
                time.sleep(0.2)  # the figure comes with the extension's first sample
                (info,) = extension.generate("egress_agent_info")
            assert int(info["dns_names"]) >= 1 and info["dns_error"] == ""


def test_check_says_when_it_has_no_names_to_offer(tmp_path: Path) -> None:
    config = config_file(tmp_path / "config.yaml", tmp_path / "none" / "history.db")
    result = egress_agent("check", "--format", "json", "--pid", str(os.getpid()), config=config)
    assert "no names for destinations: no history store at" in result.stderr
    assert "Traceback" not in result.stderr
