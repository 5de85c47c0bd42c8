"""What ``watch`` prints (agent.cli._NewConnections): each connection once, and once more when a
connection printed without a name later shows one (its DNS answer was read after it).

The printer is fed records the way the sampling loop and the event feed hand them over; what it
writes to stdout is what a user sees.
"""

from __future__ import annotations

import argparse
import json
from typing import List

import pytest

from agent.cli import _NewConnections
from agent.collect import SampleStats
from agent.pipeline import Snapshot
from agent.records import Connection
from agent.scope import Scope


def printer() -> _NewConnections:
    args = argparse.Namespace(direction="outbound", once_per_run=False, allowlisted=False)
    args.format = "jsonl"
    return _NewConnections(args, Scope.of())


def connection(domain: str = "") -> Connection:
    return Connection(
        pid=7,
        name="curl",
        protocol=6,
        remote_address="151.101.2.132",
        remote_port=443,
        local_port=40000,
        net_namespace=4026531840,
        external=True,
        remote_domain=domain,
    )


def printed(capsys: pytest.CaptureFixture[str]) -> List[str]:
    return [json.loads(line)["remote_domain"] for line in capsys.readouterr().out.splitlines()]


def test_a_name_learned_later_is_printed_once_more(capsys: pytest.CaptureFixture[str]) -> None:
    watch = printer()
    watch.event(connection())  # the connect, before its DNS answer was read
    watch(Snapshot([connection()], SampleStats(), 0.0))  # still nameless: nothing new
    assert printed(capsys) == [""]
    watch(Snapshot([connection("deb.debian.org")], SampleStats(), 1.0))
    watch(Snapshot([connection("deb.debian.org")], SampleStats(), 2.0))
    watch.event(connection("deb.debian.org"))
    assert printed(capsys) == ["deb.debian.org"]  # once, not once per sample or event


def test_a_named_connection_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    watch = printer()
    watch.event(connection("deb.debian.org"))
    watch(Snapshot([connection("deb.debian.org")], SampleStats(), 0.0))
    assert printed(capsys) == ["deb.debian.org"]
