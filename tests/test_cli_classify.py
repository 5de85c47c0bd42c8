"""`egress-agent classify` end to end, as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest


def run(*args: str, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "classify", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_json_is_one_array_of_records() -> None:
    result = run(
        "--format", "json", "::ffff:a00:1", "2001:db8::1", "64:ff9b::8.8.8.8", "FE80::1%eth0"
    )
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["address"] for r in records] == [
        "::ffff:a00:1",
        "2001:db8::1",
        "64:ff9b::8.8.8.8",
        "FE80::1%eth0",
    ]
    assert [r["external"] for r in records] == [False, False, True, False]
    assert records[0]["embedded_ipv4"] == "10.0.0.1" and records[0]["via"] == "ipv4_mapped"
    assert records[3]["zone"] == "eth0" and records[3]["normalized"] == "fe80::1"
    assert set(records[0]) == {
        "address",
        "version",
        "normalized",
        "expanded",
        "address_int",
        "external",
        "category",
        "via",
        "embedded_ipv4",
        "zone",
        "reason",
    }


def test_invalid_address_is_named_valid_ones_still_print_exit_2() -> None:
    result = run("--format", "csv", "8.8.8.8", "010.1.2.3", "::1")
    assert result.returncode == 2
    assert "'010.1.2.3'" in result.stderr and "leading zero" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["address"] for r in rows] == ["8.8.8.8", "::1"]
    assert "Traceback" not in result.stderr


def test_reads_addresses_from_stdin() -> None:
    result = run("--format", "json", "-", stdin="8.8.8.8\n\n10.0.0.1\r\n")
    assert result.returncode == 0, result.stderr
    assert [r["category"] for r in json.loads(result.stdout)] == ["global", "private"]


def test_table_shows_verdicts() -> None:
    result = run("2606:4700::1111", "::1")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["address", "external", "category"]
    assert lines[1].split()[:3] == ["2606:4700::1111", "yes", "global"]
    assert lines[2].split()[:3] == ["::1", "no", "loopback"]


def test_internal_networks_from_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("classification:\n  internal_networks: [2606:4700::/32, 8.8.8.0/24]\n")
    result = run(
        "--config", str(config), "--format", "json", "2606:4700::1111", "::ffff:8.8.8.8", "1.1.1.1"
    )
    assert result.returncode == 0, result.stderr
    assert [r["category"] for r in json.loads(result.stdout)] == ["internal", "internal", "global"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "classification:\n  internal_networks: [10.0.0.1/8]\n",
            "classification.internal_networks[0]",
        ),
        ("bogus: 1\n", "bogus"),
        ("classification: [\n", "line"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = run("--config", str(config), "8.8.8.8")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and message in lines[0], result.stderr
