"""Names everywhere (issue 24): the DNS watch attaches to a namespace as soon as it appears
(``ip netns add``: a namespace with no process, kept by a file under /run/netns), not at a
sample, so the first connection after the first resolution is named; through
``egress-agent watch`` (kernel events, a sample a minute), its history and ``history``.

Real programs resolve through glibc (A and AAAA in parallel over UDP, the TCP fallback after a
truncated answer, a CNAME chain) against dnsmasq in a test host (tests/truthhost.py): curl,
wget, python's urllib, and curl in a podman container (runc) joined to the test host's
namespace.  The test host is built after ``watch`` started: its namespaces are new to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from nethost import NetHost
from truthhost import (
    ALIAS,
    BIG,
    DNS,
    NAME,
    OTHER,
    TruthHost,
    Watch,
    build,
    described,
    program,
    watched_by,
)


@pytest.fixture
def truth(watch: Watch, nethost: NetHost) -> Iterator[TruthHost]:
    host = build(nethost)  # after watch started: its namespaces appear while it runs
    try:
        yield host
    finally:
        host.close()


def rootfs(tmp_path: Path) -> Path:
    """A root for ``podman --rootfs``: /usr and /etc come from the host (read-only mounts)."""
    root = tmp_path / "rootfs"
    for name in ("usr", "etc", "proc", "sys", "dev", "tmp", "run"):
        (root / name).mkdir(parents=True)
    for name in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{name}", root / name)
    return root


def podman_curl(truth: TruthHost, root: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            program("podman"),
            "--runtime",
            program("runc"),
            "--cgroup-manager=cgroupfs",
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--pids-limit",
            "0",
            "-v",
            "/usr:/usr:ro",
            "-v",
            "/etc:/etc:ro",
            "--network",
            f"ns:/run/netns/{truth.cli.name}",
            "--dns",
            DNS,
            "--rootfs",
            str(root),
            "/usr/bin/curl",
            "-s",
            "-m",
            "10",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_first_connection_after_the_first_answer_is_named(
    truth: TruthHost, watch: Watch, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 20  # a sample is a minute away: attached by the events
    while not watched_by(truth, watch.process.pid):
        assert time.monotonic() < deadline, "the DNS watch did not attach to the new namespace"
        time.sleep(0.2)
    curl = program("curl")
    asked: Dict[int, str] = {}
    for argv, name in (
        ([curl, "-s", "-m", "10", f"http://{NAME}/"], NAME),  # A and AAAA in parallel
        ([curl, "-s", "-m", "10", f"http://{ALIAS}/"], ALIAS),  # a CNAME chain
        ([curl, "-s", "-4", "-m", "10", f"http://{BIG}/"], BIG),  # truncated: TCP again
        ([program("wget"), "-q", "-O", "/dev/null", "-T", "10", f"http://{NAME}/"], NAME),
        (
            [
                sys.executable,
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://{OTHER}/', timeout=10)",
            ],
            OTHER,
        ),
    ):
        proc = truth.start(argv)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{argv}: {stderr}"
        asked[proc.pid] = name
    contained = podman_curl(truth, rootfs(tmp_path), f"http://{ALIAS}/")
    assert contained.returncode == 0, contained.stderr

    def tcp(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [  # to the web (the TCP fallback's own connection to dnsmasq has no name)
            r
            for r in rows
            if r["protocol"] == 6
            and r["remote_port"] == 80
            and r["net_namespace"] == truth.cli.inode
        ]

    def complete(rows: List[Dict[str, Any]]) -> bool:
        pids = {r["pid"] for r in tcp(rows)}
        return pids >= set(asked) and any(r["pid"] not in asked for r in tcp(rows))

    rows = watch.wait_rows(None, complete, "--netns", truth.cli.name)
    connections = tcp(rows)
    assert complete(rows), (
        f"asked {asked}; in the namespace: {described(rows)}; "
        f"theirs anywhere: {described(watch.rows(set(asked)))}; {watch.losses()}"
    )
    assert any(r["remote_port"] == 53 and r["protocol"] == 6 for r in rows)  # it fell back
    for row in connections:
        expected = asked.get(row["pid"], ALIAS)  # the container's curl: its pid is its own
        assert row["remote_domain"] == expected, described([row])
