"""`egress-agent learn` and `audit --rules` on histories that `watch` recorded from test hosts
(tests/learn_hosts.py): three hosts, named by their own UTS namespaces, whose clients resolve
names through a DNS server of the test host and connect.

- web-1: a.mirror.test and b.mirror.test (two names under one parent: one wildcard), and an
  address asked by no name (a destinations rule);
- web-2: a.mirror.test;
- web-3: a.mirror.test, then (after the learned window) a new destination.

Every assertion is about the client namespaces' rows: the machine's other connections are
recorded too, and learned too, but not looked at.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
from commands import egress_agent
from dnshost import wait_for
from learn_hosts import BARE, NEW, A, B, LearnHost, Recording, has_row, learn_host, record

from agent.config import AllowRule, PortRange, parse_settings, parse_yaml
from agent.evidence import Window, evidence_of
from agent.history import HistoryStore
from agent.learn.merge import hand_written
from agent.learn.rows import read_history
from agent.trial import try_rules

MIRROR = "*.mirror.test"


def _web_1(host: LearnHost, recording: Recording, history: Path) -> None:
    assert host.resolve(0, "a.mirror.test") == [A]
    assert host.resolve(0, "b.mirror.test") == [B]
    clients = [host.connect(0, A), host.connect(0, B), host.connect(1, BARE)]
    for address, name in ((A, "a.mirror.test"), (B, "b.mirror.test"), (BARE, "")):
        wait_for(has_row(history, host.namespaces, address, name), f"{address} recorded", 60)
    for client in clients:
        host.net.kill(client)


def _web_2(host: LearnHost, recording: Recording, history: Path) -> None:
    assert host.resolve(0, "a.mirror.test") == [A]
    client = host.connect(0, A)
    wait_for(has_row(history, host.namespaces, A, "a.mirror.test"), "a.mirror.test recorded", 60)
    host.net.kill(client)


def _web_3(host: LearnHost, recording: Recording, history: Path) -> None:
    assert host.resolve(0, "a.mirror.test") == [A]
    client = host.connect(0, A)
    wait_for(has_row(history, host.namespaces, A, "a.mirror.test"), "a.mirror.test recorded", 60)
    time.sleep(1.1)  # a whole second of the learned window after the row's first
    recording.marks["learned"] = time.time()
    time.sleep(1.5)  # the new destination's first second is after the learned window
    late = host.connect(0, NEW)
    wait_for(has_row(history, host.namespaces, NEW), "the new destination recorded", 60)
    time.sleep(1.1)  # open into a whole second of the later window, whenever it began
    for proc in (client, late):
        host.net.kill(proc)


class Recorded:
    def __init__(self, host: LearnHost, recordings: Dict[str, Recording]) -> None:
        self.host = host
        self.recordings = recordings
        self.namespaces = host.namespaces
        self.port = host.dns.web_port


@pytest.fixture(scope="module")
def recorded() -> Iterator[Recorded]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, a UTS namespace per host, tracefs")
    with learn_host() as host:
        recordings = {
            name: record(host, name, script)
            for name, script in (("web-1", _web_1), ("web-2", _web_2), ("web-3", _web_3))
        }
        yield Recorded(host, recordings)


def window(since: float, until: float) -> Tuple[str, ...]:
    """The whole seconds inside [since, until]: the time a watch ran, all of it covered."""
    return ("--since", str(math.ceil(since)), "--until", str(math.floor(until)))


def of(recording: Recording, until: float = 0.0) -> Tuple[str, ...]:
    return (*window(recording.started, until or recording.ended), "--history", str(recording.path))


def rules_of(text: str) -> Tuple[AllowRule, ...]:
    """The rules of a configuration text, as the agent reads a file (raises if it would not)."""
    return parse_settings(parse_yaml(text, "learned"), "learned").allow


def learned(*args: str) -> str:
    result = egress_agent("learn", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def with_domain(rules: Sequence[AllowRule], domain: str) -> AllowRule:
    (rule,) = [rule for rule in rules if domain in rule.domains]
    return rule


def with_address(rules: Sequence[AllowRule], address: str) -> AllowRule:
    host = ipaddress.ip_address(address)
    (rule,) = [rule for rule in rules if any(host in net for net in rule.destinations)]
    return rule


def comment_of(text: str, needle: str) -> str:
    """The 'learned from' comment line above the rule whose lines hold ``needle``."""
    lines = text.splitlines()
    at = next(
        i for i, line in enumerate(lines) if needle in line and not line.lstrip().startswith("#")
    )
    return next(lines[i] for i in range(at, -1, -1) if lines[i].lstrip().startswith("# learned"))


def ours(recorded: Recorded, rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of the test host's clients (the audit's rows have no namespace column: the
    test host's destinations on its listener's port)."""
    return [
        row
        for row in rows
        if row.get("net_namespace") in recorded.namespaces
        or (row["remote_address"] in (A, B, BARE, NEW) and row["remote_port"] == recorded.port)
    ]


def test_learned_rules_make_the_learned_window_clean(recorded: Recorded, tmp_path: Path) -> None:
    web1 = recorded.recordings["web-1"]
    text = learned(*of(web1))
    rules = rules_of(text)  # the configuration accepts the output as it is
    assert all(rule.domains or rule.destinations for rule in rules)
    assert all(
        rule.name or rule.path or rule.systemd_unit or rule.package or rule.sha256 for rule in rules
    )
    mirror = with_domain(rules, MIRROR)  # two names under one parent: one wildcard
    assert (mirror.ports, mirror.protocol) == ((PortRange(recorded.port, recorded.port),), (6,))
    assert with_address(rules, BARE).destinations == (ipaddress.ip_network(f"{BARE}/32"),)
    assert "# learned from 2 connection(s) on web-1, first seen " in comment_of(text, MIRROR)
    assert "# seen: a.mirror.test, b.mirror.test" in text

    span = Window(math.ceil(web1.started), math.floor(web1.ended))
    source = read_history(str(web1.path), span)
    mine = ours(recorded, source.rows)
    assert {row["remote_address"] for row in mine} == {A, B, BARE}
    before = try_rules(evidence_of(mine, source.runs, span), ())
    assert before.statement.outcome == "unexpected"
    after = try_rules(evidence_of(mine, source.runs, span), rules)
    assert after.statement.evidence.unexpected == ()
    coverage = after.statement.evidence.coverage
    assert after.statement.outcome == "clean", coverage.shortfalls

    # the same through the command: audit --rules, rule by rule
    rules_file = tmp_path / "learned.yaml"
    rules_file.write_text(text)
    judged = egress_agent("audit", *of(web1), "--rules", str(rules_file), "--format", "json")
    document = json.loads(judged.stdout)
    assert ours(recorded, document["unexpected"]) == []
    (use,) = [use for use in document["rules"] if use["comment"] == mirror.comment]
    assert use["connections"] >= 2 and use["destinations"] >= 2
    recorded_verdict = json.loads(egress_agent("audit", *of(web1), "--format", "json").stdout)
    assert len(ours(recorded, recorded_verdict["unexpected"])) == 3  # no rule in the history
    as_text = egress_agent("audit", *of(web1), "--rules", str(rules_file)).stdout
    assert f"{mirror.label}: allowed " in as_text
    assert as_text.splitlines()[0] == f"rules tried: {len(rules)} from {rules_file}"


def test_a_new_destination_afterwards_stays_unexpected(recorded: Recorded, tmp_path: Path) -> None:
    web3 = recorded.recordings["web-3"]
    mark = web3.marks["learned"]
    text = learned(*window(web3.started, mark), "--history", str(web3.path))
    assert NEW not in text
    rules_file = tmp_path / "learned.yaml"
    rules_file.write_text(text)
    later = window(mark + 1, web3.ended)
    judged = egress_agent(
        "audit", *later, "--history", str(web3.path), "--rules", str(rules_file), "--format", "json"
    )
    assert judged.returncode == 1, judged.stdout
    unexpected = ours(recorded, json.loads(judged.stdout)["unexpected"])
    assert [row["remote_address"] for row in unexpected] == [NEW]
    assert "a.mirror.test" not in {row["remote_domain"] for row in unexpected}  # still allowed


HAND = """\
# egress-agent configuration of the web role, reviewed by hand
sampling:
  interval: 5   # seconds

allow:
    # the bare address: checked with the vendor (ticket 4711)
    - comment: vendor by address
      destinations: [151.101.66.140/32]   # only this one
# a note at column 0 that belongs to nobody

history:
  retention_days: 30
"""


def test_merge_twice_changes_nothing_and_keeps_what_a_person_wrote(
    recorded: Recorded, tmp_path: Path
) -> None:
    web1 = recorded.recordings["web-1"]
    config = tmp_path / "config.yaml"
    config.write_text(HAND)
    os.chmod(config, 0o640)
    first = egress_agent("learn", *of(web1), "--merge", str(config))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"--- {config}\n+++ {config} (learned rules merged)\n")
    merged = config.read_text()
    assert hand_written(merged, str(config)) == HAND  # every line a person wrote, in order
    assert "1 row(s) already allowed by the rules you wrote" in first.stderr
    settings = parse_settings(parse_yaml(merged, "merged"), "merged")
    assert settings.allow[0].comment == "vendor by address"  # first, as written
    assert [with_address(settings.allow, BARE).comment] == ["vendor by address"]  # no duplicate
    assert with_domain(settings.allow, MIRROR).index > 0
    assert "    # >>> egress-agent learn" in merged  # indented like the rules of the file
    assert os.stat(config).st_mode & 0o777 == 0o640
    status = os.stat(config)

    second = egress_agent("learn", *of(web1), "--merge", str(config))
    assert second.returncode == 0, second.stderr
    assert second.stdout == "" and f"{config}: no change" in second.stderr
    assert config.read_text() == merged
    assert (os.stat(config).st_ino, os.stat(config).st_mtime_ns) == (
        status.st_ino,
        status.st_mtime_ns,
    )

    # learning again replaces the learned block only: a rule edited inside it comes back
    config.write_text(merged.replace('"*.mirror.test"', '"*.elsewhere.test"'))
    third = egress_agent("learn", *of(web1), "--merge", str(config))
    assert third.returncode == 0 and "-" in third.stdout
    assert config.read_text() == merged
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no temporary file left

    judged = egress_agent("audit", *of(web1), "--rules", str(config), "--format", "json")
    assert ours(recorded, json.loads(judged.stdout)["unexpected"]) == []


def _three(recorded: Recorded) -> Tuple[str, ...]:
    recordings = list(recorded.recordings.values())
    since = min(r.started for r in recordings)
    until = max(r.ended for r in recordings)
    return window(since, until)


def test_one_rule_set_for_three_hosts(recorded: Recorded) -> None:
    paths = [str(r.path) for r in recorded.recordings.values()]
    text = learned(*_three(recorded), *(arg for path in paths for arg in ("--history", path)))
    rules = rules_of(text)
    assert "on 3 of 3 hosts (web-1, web-2, web-3)" in comment_of(text, MIRROR)
    # the addresses asked by no name, one on web-1, one on web-3: one rule on 2 of the 3 hosts
    assert with_address(rules, BARE) == with_address(rules, NEW)
    assert "on 2 of 3 hosts (web-1, web-3)" in comment_of(text, f'"{BARE}/32"')
    assert len([rule for rule in rules if MIRROR in rule.domains]) == 1


def _export_rows(recordings: Sequence[Recording]) -> List[Dict[str, str]]:
    """The history rows of ``recordings`` as a Fleet export has them: text, with the host."""
    rows = []
    for recording in recordings:
        store = HistoryStore(str(recording.path), read_only=True)
        try:
            for row in store.rows():
                cells = {
                    k: "" if v is None else str(int(v) if isinstance(v, bool) else v)
                    for k, v in row.items()
                }
                rows.append({"host_hostname": recording.hostname, **cells})
        finally:
            store.close()
    return rows


def test_an_osquery_results_export_learns_as_the_histories_do(
    recorded: Recorded, tmp_path: Path
) -> None:
    web1, web2, web3 = (recorded.recordings[name] for name in ("web-1", "web-2", "web-3"))
    span = _three(recorded)
    from_histories = learned(
        *span, "--history", str(web1.path), "--history", str(web2.path), "--history", str(web3.path)
    )
    rows = _export_rows([web2, web3])
    as_json = tmp_path / "fleet-report.json"
    as_json.write_text(
        json.dumps(
            {
                "results": [
                    {
                        "host_name": row["host_hostname"],
                        "columns": {k: v for k, v in row.items() if k != "host_hostname"},
                    }
                    for row in rows
                ]
            }
        )
    )
    as_csv = tmp_path / "fleet-export.csv"
    with as_csv.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for export in (as_json, as_csv):
        text = learned(*span, "--history", str(web1.path), "--history", str(export))
        assert text == from_histories, export.name


def test_an_export_that_is_no_history_export_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "processes.csv"
    bad.write_text("pid,name\n1,init\n")
    result = egress_agent("learn", "--history", str(bad))
    assert result.returncode == 2
    assert f"{bad}: not an export of external_connection_history" in result.stderr
    missing = egress_agent("learn", "--history", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "none.db: No such file or directory" in missing.stderr
    assert "Traceback" not in result.stderr + missing.stderr
