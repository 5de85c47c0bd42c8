"""The benchmark's load generator and harness, at a tiny scale: builds, counts, leaves nothing.

Real namespaces, veths, processes and sockets (prefix ``eab-t``, addresses 10.214.x.x and their
IPv6/global counterparts inside the namespaces only), so these need root.  No timing is asserted:
the numbers belong to ``python -m bench``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from bench.extension import over_time
from bench.harness import run_scale
from bench.load import SCALES, Load
from bench.measure import ColdPython, Command, WarmPython
from bench.report import write_section
from bench.topology import Topology, leftovers

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
TOPOLOGY = Topology("eab-t", net=214)
TINY = SCALES["tiny"]


def peers(netns: str = "") -> List[str]:
    """Remote addresses of ``ss -tunaH`` rows in a namespace ("" for this one)."""
    argv = ["ss", "-tunaH"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split()[5].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line]


def client_sockets(addresses: List[str]) -> Dict[str, int]:
    """The load's client sockets by kind: internal, external, and IPv4-mapped ones."""
    ours = set(TOPOLOGY.server_addresses())
    external = {*TOPOLOGY.external_v4, *TOPOLOGY.external_v6}
    counts = {"all": 0, "external": 0, "mapped": 0}
    for address in addresses:
        plain = address[len("::ffff:") :] if address.startswith("::ffff:") else address
        if plain in ours:
            counts["all"] += 1
            counts["external"] += plain in external
            counts["mapped"] += plain != address
    return counts


def alive(pids: List[int]) -> List[int]:
    """Those pids that still run a process of this load (by its name, pids may be reused)."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith(TOPOLOGY.prefix):
                    found.append(pid)
        except OSError:
            pass
    return found


@needs_root
def test_tiny_load_builds_the_planned_sockets_and_leaves_nothing_behind() -> None:
    with Load(TINY, TOPOLOGY) as load:
        pids = list(load.pids)
        files_dir = load._files_dir
        expected = load.expected_sockets()
        host = client_sockets(peers())
        second = client_sockets(peers(TOPOLOGY.client_ns))
        census = load.census()
        assert len(pids) == TINY.clients + 1
        assert host["all"] == expected["host"] > 0
        assert second["all"] == expected[TOPOLOGY.client_ns] > 0
        assert host["all"] + second["all"] == TINY.sockets
        assert host["external"] + second["external"] == load.expected_external() > 0
        assert host["mapped"] > 0 and second["mapped"] > 0
        assert census.load_fds >= TINY.clients * (TINY.files + TINY.tcp + 1)
    assert leftovers(TOPOLOGY) == []
    assert alive(pids) == []
    assert not os.path.exists(files_dir)
    # nor ownerless connections lingering in this namespace (the clients reset theirs)
    assert client_sockets(peers())["all"] == 0


def test_variants_place_external_connections_as_documented() -> None:
    none, one = (Load(SCALES[name], TOPOLOGY) for name in ("M-none", "M-all"))
    assert none.expected_external() == 0
    assert one.expected_external() == SCALES["M-all"].clients
    assert all(p.external_tcp == 1 and not p.external_udp for p in one.plans)


@needs_root
def test_an_exception_inside_the_load_still_tears_it_down() -> None:
    pids: List[int] = []
    with pytest.raises(RuntimeError, match="boom"), Load(TINY, TOPOLOGY) as load:
        pids = list(load.pids)
        raise RuntimeError("boom")
    assert pids and alive(pids) == []
    assert leftovers(TOPOLOGY) == []


@needs_root
def test_methods_measure_the_load_side_by_side() -> None:
    """One sample of each method shape on the tiny load."""
    methods = [
        Command("ss", "ss -tunaH", ["ss", "-tunaH"]),
        ColdPython("psutil", "psutil + identity", "bench.targets:psutil_table"),
        WarmPython("psutil-warm", "psutil warm", "bench.targets:psutil_table"),
    ]
    with Load(TINY, TOPOLOGY) as load:
        result = run_scale(load, methods, runs=1)
    by_key = {m.key: m for m in result.methods}
    for key in ("ss", "psutil", "psutil-warm"):
        assert by_key[key].ok, by_key[key].error
        assert by_key[key].rows >= load.expected_sockets()["host"]
        assert by_key[key].peak_rss_mb > 0
    assert result.floor() is by_key["ss"]


def test_results_sections_are_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "RESULTS.md")
    write_section("scales", "first", path)
    with open(path, "a") as f:
        f.write("\nhand-written analysis\n")
    write_section("classify", "micro", path)
    write_section("scales", "second", path)
    with open(path) as f:
        text = f.read()
    assert "second" in text and "first" not in text
    assert "micro" in text and "hand-written analysis" in text


class SleeperHarness:
    """Stands in for the extension to exercise ``over_time``'s bookkeeping alone: a real
    process whose CPU and RSS are read from /proc; ``generate`` returns no rows, ``info`` a
    fixed table (``bench --over-time`` runs the real extension)."""

    def __init__(self, _interval: float) -> None:
        self._proc = subprocess.Popen(["sleep", "30"])
        self.generated = 0

    @property
    def pids(self) -> List[int]:
        return [self._proc.pid]

    def generate(self) -> int:
        self.generated += 1
        return 0

    def info(self) -> Dict[str, str]:
        return {"events_source": "sleeper", "generated": str(self.generated)}

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


def test_over_time_reads_cpu_and_rss_of_the_extension_processes() -> None:
    harnesses: List[SleeperHarness] = []

    def start(interval: float) -> SleeperHarness:
        harnesses.append(SleeperHarness(interval))
        return harnesses[-1]

    result = over_time(1.0, interval=0.1, query_every=0.25, sample_every=0.3, start=start)
    assert result.idle_rss_kb > 0
    assert len(result.points) >= 3 and result.points[-1][0] >= 1.0
    assert 0.0 <= result.cpu_share < 50.0
    assert result.generates == harnesses[0].generated >= 3
    assert result.info_before == {"events_source": "sleeper", "generated": "0"}
    assert result.info_after["generated"] == str(result.generates)
    assert harnesses[0]._proc.returncode is not None


@needs_root
def test_a_load_over_many_namespaces_with_a_storm_leaves_nothing_behind() -> None:
    import time

    from agent.collect.netns import namespace_of
    from agent.collect.sockets.procnet import read_tcp_counters

    scale = SCALES["tiny-ns"]
    with Load(scale, TOPOLOGY) as load:
        pids = list(load.pids)
        assert len(load.extras) == scale.namespaces
        assert len(load.storm_pids) == scale.storm_namespaces
        census = load.census()
        assert census.sockets_by_namespace[f"{scale.namespaces} more namespaces"] > 0
        in_extras = [p for p in load.plans if p.extra >= 0]
        assert in_extras and all(p.extra < scale.namespaces for p in in_extras)
        extra_inodes = {os.stat(f"/run/netns/{name}").st_ino for name in load.extras}
        client_inodes = {namespace_of(pid) for pid in load.client_pids}
        assert extra_inodes <= client_inodes  # clients live in the added namespaces too
        storm = load.storm_pids[0]
        opened = read_tcp_counters(storm)["ActiveOpens"]
        deadline = time.monotonic() + 10
        while read_tcp_counters(storm)["ActiveOpens"] <= opened:  # the storm storms
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert leftovers(TOPOLOGY) == []
    assert alive(pids) == []
