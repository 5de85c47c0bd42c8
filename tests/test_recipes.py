"""The recipes of docs/DESIGN.md, each followed on a copy of the tree as a developer would.

"Add an event source", "Add an output format", "Add an osquery table" and "Add a command": a
copy of the ``agent`` package gets one new module (or entry) and the one line of wiring the
recipe names, and nothing else; the copy then runs for real (``watch``, ``check``, the
extension under the core stand-in) and the addition shows where the recipe says it will.
("Add a column" has tests/test_add_a_column.py.)  An edit whose anchor moved fails loudly: the
recipe and this file must change together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

from nethost import NetHost
from osquery_core import CoreStandIn

ROOT = Path(__file__).resolve().parent.parent
SERVER, CLIENT = "2001:4860:4863::8888", "2001:4860:4863::2"

Edit = Tuple[str, str, str]
"""(path under the copy, anchor that must occur once, replacement)"""


def copy_tree(target: Path, edits: List[Edit], new_files: Dict[str, str]) -> Path:
    """``agent/`` copied under ``target``, with ``new_files`` written and ``edits`` applied,
    and a launcher like the packaged one (its own directory first on ``sys.path``)."""
    shutil.copytree(ROOT / "agent", target / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in new_files.items():
        (target / name).write_text(textwrap.dedent(text))
    for name, anchor, replacement in edits:
        path = target / name
        text = path.read_text()
        assert text.count(anchor) == 1, f"the recipe's anchor moved in {name}: {anchor!r}"
        path.write_text(text.replace(anchor, replacement))
    (target / "egress-agent").write_text(
        "import sys\nfrom agent.cli import main\nsys.exit(main())\n"
    )
    return target


def run(copy: Path, *args: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(copy / "egress-agent"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config), **env),
        cwd=str(copy),
    )


def config_file(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sampling:\n  interval: 0.5\nhistory:\n  path: {tmp_path / 'history.db'}\n{extra}"
    )
    return config


def recipe(title: str) -> str:
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    return design[design.index(f"### {title}") :].split("\n### ", 1)[0]


# -- add an event source -------------------------------------------------------------------------

REPLAY_SOURCE = '''
    """Connections replayed from a JSON-lines file: the recipe's example event source."""

    from __future__ import annotations

    import ipaddress
    import json
    import logging
    import os
    import time
    from typing import List, Optional, Tuple

    from agent.collect.events import EventKind, EventSource, SocketEvent
    from agent.config import Settings
    from agent.identity import IdentityCache
    from agent.inet import AF_INET, IPPROTO_UDP, OUTBOUND


    class ReplaySource:
        name = "replay"
        lost = 0
        outbound_tcp_seen = 0

        def __init__(self, path: str) -> None:
            self._path = path
            self._read = 0
            self._identities = IdentityCache()

        def poll(self, timeout: float) -> List[SocketEvent]:
            time.sleep(min(timeout, 0.1))
            with open(self._path, encoding="utf-8") as lines:
                new = lines.read().splitlines()[self._read :]
            events = []
            for line in new:
                self._read += 1
                seen = json.loads(line)
                events.append(
                    SocketEvent(
                        time.time(), EventKind.UDP, IPPROTO_UDP, AF_INET, 4, 0, seen["lport"],
                        int(ipaddress.ip_address(seen["raddr"])), seen["rport"], None,
                        self._identities.lookup(seen["pid"]), OUTBOUND, self._read,
                    )
                )
            return events

        def close(self) -> None:
            pass


    def replay_events(
        settings: Settings, logger: logging.Logger
    ) -> Tuple[Optional[EventSource], str]:
        path = os.environ.get("EGRESS_AGENT_REPLAY", "")
        return (ReplaySource(path), "") if path else (None, "no replay file")
'''


def test_an_event_source_is_one_module_and_one_line(tmp_path: Path) -> None:
    assert "agent/pipeline/agent.py" in recipe("Add an event source")
    copy = copy_tree(
        tmp_path / "tree",
        [
            (
                "agent/pipeline/agent.py",
                "EVENT_SOURCES: Tuple[SourceOpener, ...] = (kernel_events,)",
                "from agent.collect.replay import replay_events  # noqa: E402\n\n"
                "EVENT_SOURCES: Tuple[SourceOpener, ...] = (kernel_events, replay_events)",
            )
        ],
        {"agent/collect/replay.py": REPLAY_SOURCE},
    )
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        replay = tmp_path / "replay.jsonl"
        replay.write_text(
            json.dumps({"pid": sleeper.pid, "lport": 40001, "raddr": "9.9.9.9", "rport": 53}) + "\n"
        )
        config = config_file(tmp_path)
        watched = run(
            copy,
            "watch",
            "--count",
            "3",
            "--format",
            "jsonl",
            config=config,
            EGRESS_AGENT_REPLAY=str(replay),
        )
        assert watched.returncode == 0, watched.stderr
        printed = [json.loads(line) for line in watched.stdout.splitlines()]
        ours = [r for r in printed if r["pid"] == sleeper.pid]
        assert [(r["remote_address"], r["remote_port"], r["protocol"]) for r in ours] == [
            ("9.9.9.9", 53, 17)
        ]
        recorded = run(copy, "history", "--format", "json", config=config)
        rows = [r for r in json.loads(recorded.stdout) if r["pid"] == sleeper.pid]
        assert rows and "replay" in rows[0]["seen_by"].split(",")
    finally:
        sleeper.kill()
        sleeper.wait()


# -- add an output format ------------------------------------------------------------------------

TSV = (
    '        Formatter("csv", lambda r, c, o: _csv(r, c), stream=False),\n',
    '        Formatter("csv", lambda r, c, o: _csv(r, c), stream=False),\n'
    "        Formatter(\n"
    '            "tsv",\n'
    '            lambda r, c, o: "".join(\n'
    '                "\\t".join(str(record.get(name, "")) for name in c) + "\\n" for record in r\n'
    "            ),\n"
    "            stream=True,\n"
    "        ),\n",
)


def test_an_output_format_is_one_entry(nethost: NetHost, tmp_path: Path) -> None:
    assert "FORMATTERS" in recipe("Add an output format")
    copy = copy_tree(tmp_path / "tree", [("agent/render.py", *TSV)], {})
    srv, cli = nethost.namespace("rsrv"), nethost.namespace("rcli")
    nethost.veth(srv, "rs0", cli, "rc0")
    srv.add_address(nethost.name("rs0"), SERVER + "/64")
    cli.add_address(nethost.name("rc0"), CLIENT + "/64")
    server = nethost.listen(srv, SERVER)
    client = nethost.connect(cli, SERVER, server.port)
    config = config_file(tmp_path)

    checked = run(copy, "check", "--format", "tsv", "--pid", str(client.pid), config=config)
    assert checked.returncode == 1, checked.stderr  # an unexpected connection: a finding
    lines = [line.split("\t") for line in checked.stdout.splitlines()]
    assert any(str(client.pid) in fields and SERVER in fields for fields in lines)
    helped = run(copy, "watch", "--help", config=config)
    assert "tsv" in helped.stdout  # it streams: watch offers it too


# -- add an osquery table ------------------------------------------------------------------------

RULES_TABLE = '''
    """``egress_agent_rules``: the allow rules in force (the recipe's example table)."""

    from __future__ import annotations

    from typing import List

    from agent.osquery.context import QueryContext
    from agent.osquery.table import Row, Table, TableInputs, TablePlugin, make_spec, string_row

    SPEC = make_spec("egress_agent_rules", (("position", "INTEGER"), ("comment", "TEXT")))


    def make(inputs: TableInputs) -> Table:
        rules = inputs.monitor.pipeline.settings.allow

        def generate(context: QueryContext) -> List[Row]:
            columns = context.used(SPEC.column_names)
            return [
                string_row({"position": rule.index, "comment": rule.comment}, columns)
                for rule in rules
            ]

        return Table(SPEC, generate)


    PLUGIN = TablePlugin(SPEC, make)
'''


def test_an_osquery_table_is_one_module_and_one_line(tmp_path: Path) -> None:
    assert "agent/osquery/dispatch.py" in recipe("Add an osquery table")
    copy = copy_tree(
        tmp_path / "tree",
        [
            (
                "agent/osquery/dispatch.py",
                "    egress_agent_info.PLUGIN,\n)",
                "    egress_agent_info.PLUGIN,\n    egress_agent_rules.PLUGIN,\n)",
            ),
            (
                "agent/osquery/dispatch.py",
                "    egress_agent_info,\n",
                "    egress_agent_info,\n    egress_agent_rules,\n",
            ),
        ],
        {"agent/osquery/egress_agent_rules.py": RULES_TABLE},
    )
    config = config_file(
        tmp_path,
        "events:\n  enabled: false\nallow:\n  - {comment: mirrors, name: apt}\n"
        "  - {comment: resolver, destinations: 9.9.9.9/32}\n",
    )
    with CoreStandIn() as core:
        process = core.launch(
            [sys.executable, str(copy / "egress-agent"), "extension"],
            env={"EGRESS_AGENT_CONFIG": str(config)},
        )
        registration = core.wait_for_registration(process=process)
        routes = registration.tables()["egress_agent_rules"]
        assert [route["name"] for route in routes] == ["position", "comment"]
        with core.connect(registration) as extension:
            rows = extension.generate("egress_agent_rules")
    assert [row["comment"] for row in rows] == ["mirrors", "resolver"]


# -- add a command -------------------------------------------------------------------------------

RULES_COMMAND = """def cmd_rules(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    for rule in settings.allow:
        print(rule.index, rule.comment)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:"""


def test_a_command_is_a_handler_and_its_line(tmp_path: Path) -> None:
    assert "build_parser()" in recipe("Add a command")
    copy = copy_tree(
        tmp_path / "tree",
        [
            ("agent/cli.py", "def build_parser() -> argparse.ArgumentParser:", RULES_COMMAND),
            (
                "agent/cli.py",
                "    extension = command(\n",
                '    command("rules", cmd_rules, "list the allow rules in force").add_argument(\n'
                '        "--config"\n    )\n\n    extension = command(\n',
            ),
        ],
        {},
    )
    config = config_file(tmp_path, "allow:\n  - {comment: mirrors, name: apt}\n")
    listed = run(copy, "rules", "--config", str(config), config=config)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[0].endswith("mirrors")
    assert "rules" in run(copy, "--help", config=config).stdout
