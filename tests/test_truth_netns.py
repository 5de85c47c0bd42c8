"""Namespaces entered with setns (issue 24): every connection of a process that entered its
namespace with ``ip netns exec`` (``setns(2)``, then exec) carries that namespace, every time,
though each process is gone long before its events are read; through ``egress-agent watch``
(kernel events, a sample a minute), its history and ``history --netns``.

Real programs (curl, nc from Debian's packages) in the test host of tests/truthhost.py.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
from pathlib import Path

from truthhost import CLIENT, DNS, WEB, TruthHost, Watch, described, program

from agent.collect.kernel.placement import NamespacePlacer

COMMANDS = 200


def test_every_short_command_under_ip_netns_exec_carries_its_namespace(
    truth: TruthHost, watch: Watch
) -> None:
    curl, nc = program("curl"), program("nc")

    def one(index: int) -> int:
        if index % 10 == 0:  # a datagram too: nc connects a UDP socket and sends a line
            argv = [nc, "-u", "-w", "1", "-q", "0", DNS, "9999"]
        else:
            argv = [curl, "-s", "-o", "/dev/null", "-m", "10", f"http://{WEB}/"]
        proc = truth.start(argv)
        proc.communicate("x\n" if index % 10 == 0 else None, timeout=60)
        assert proc.returncode == 0, argv
        return proc.pid

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pids = set(pool.map(one, range(COMMANDS)))
    assert len(pids) == COMMANDS

    def all_seen(rows: list) -> bool:  # type: ignore[type-arg]
        return {r["pid"] for r in rows} >= pids

    rows = watch.wait_rows(pids, all_seen, timeout=60)
    assert {r["pid"] for r in rows} >= pids, f"{len(pids - {r['pid'] for r in rows})} unseen"
    elsewhere = [r for r in rows if r["net_namespace"] != truth.cli.inode]
    assert not elsewhere, f"{len(elsewhere)} rows not in the namespace: " + described(elsewhere)
    named = watch.rows(pids, "--netns", truth.cli.name)
    assert {r["pid"] for r in named} == pids
    assert {r["protocol"] for r in rows} == {6, 17}


def test_a_named_namespace_is_indexed_though_the_process_seen_in_it_is_gone(
    truth: TruthHost, tmp_path: Path
) -> None:
    """The placer's look at every namespace (:class:`NamespacePlacer`) finds the client
    namespace through a process of it that exits before the look reaches it (every command
    under ``ip netns exec`` soon does): it enters by the file that keeps the namespace
    (``/run/netns/NAME``) first.  The process that is gone is played by a ``/proc`` entry of
    our own whose ``ns/net`` names the namespace and enters nothing (a real exited process
    cannot be held at that instant); the namespace, its file and its addresses are real."""
    fake_proc = tmp_path / "proc"
    (fake_proc / "4242" / "ns").mkdir(parents=True)
    os.symlink(f"net:[{truth.cli.inode}]", fake_proc / "4242" / "ns" / "net")
    named = {truth.cli.inode: f"/run/netns/{truth.cli.name}"}
    placer = NamespacePlacer(str(fake_proc), named=lambda: named)
    client = ipaddress.ip_address(CLIENT).packed
    assert placer.place(4, client) == truth.cli.inode
    assert placer.entries[truth.cli.inode] == named[truth.cli.inode]
