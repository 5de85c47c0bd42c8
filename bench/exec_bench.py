"""``python -m bench.exec_bench``: what capturing command lines at exec costs (issue 22; root).

A spawner process starts ``--count`` short processes one after the other
(``/usr/bin/true`` with arguments of its own, dynamically linked: the exec probe fires for
each) and reports their CPU (``RUSAGE_CHILDREN``: the exec, the loader, the uprobe's trap and
fetch, all in the child's own context) and its wall time.  Three set-ups, measured side by
side in interleaved rounds (each round runs all three, starting with a different one):

- ``off``: no event source;
- ``events``: the kernel event source without the exec probe (``exec_args=False``);
- ``events+argv``: the event source with it.

Beside the children's CPU, the reader's (this process: poll, read, decode, track, the
``/proc`` reads at exec), per process started.  Medians of ``--rounds``; ratios against
``events``.  A shared 2-core machine: orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from agent.collect.kernel.source import KernelEventSource, open_event_source
from bench.report import machine, markdown_table, publish

SPAWN = r"""
import json, os, resource, sys, time
count, tag = int(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_CHILDREN)
started = time.perf_counter()
for index in range(count):
    os.spawnv(os.P_WAIT, "/usr/bin/true", ["/usr/bin/true", tag, str(index), "x" * 40])
wall = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"wall": wall, "cpu": cpu}))
"""

SETUPS = ("off", "events", "events+argv")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Poller:
    """Polls a source on a thread, as the agent does, until stopped."""

    def __init__(self, source: KernelEventSource) -> None:
        self.source = source
        self.execs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.source.poll(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _round(setup: str, count: int, prefix: str) -> Dict[str, float]:
    source: Optional[KernelEventSource] = None
    poller: Optional[_Poller] = None
    if setup != "off":
        source = open_event_source(prefix=prefix, exec_args=setup == "events+argv")
        poller = _Poller(source)
        time.sleep(0.5)  # the start-up reads are not the workload's
    cpu_before = _cpu()
    tag = f"bench-{setup}-{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-c", SPAWN, str(count), tag], capture_output=True, text=True, check=True
    )
    if poller is not None and source is not None:
        deadline = time.monotonic() + 10
        while source.reader.held and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the last batch read
        poller.stop()
    reader_cpu = _cpu() - cpu_before
    if source is not None:
        source.close()
    spawned = json.loads(result.stdout)
    return {
        "children_us": spawned["cpu"] / count * 1e6,
        "wall_us": spawned["wall"] / count * 1e6,
        "reader_us": reader_cpu / count * 1e6 if setup != "off" else 0.0,
    }


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exec_bench")
    parser.add_argument("--count", type=int, default=2000, help="processes per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (5)")
    parser.add_argument("--prefix", default="egress-agent-eeb", help="instance name prefix")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(list(argv) or None)
    if os.geteuid() != 0:
        print("exec_bench: needs root (tracefs)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    samples: Dict[str, List[Dict[str, float]]] = {setup: [] for setup in SETUPS}
    _round("events+argv", max(50, args.count // 10), args.prefix)  # warm-up, discarded
    for index in range(args.rounds):
        order = SETUPS[index % 3 :] + SETUPS[: index % 3]
        for setup in order:
            samples[setup].append(_round(setup, args.count, args.prefix))
    load_after = os.getloadavg()
    info = machine()

    def median(setup: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[setup])

    rows = []
    base_children = median("events", "children_us")
    base_reader = median("events", "reader_us")
    for setup in SETUPS:
        children, reader = median(setup, "children_us"), median(setup, "reader_us")
        rows.append(
            [
                setup,
                f"{median(setup, 'wall_us'):.0f}",
                f"{children:.0f}",
                f"{reader:.0f}",
                f"{children + reader:.0f}",
                f"{children / base_children:.2f}" if setup != "off" else "",
                f"{reader / base_reader:.2f}" if setup != "off" and base_reader else "",
            ]
        )
    extra = (median("events+argv", "children_us") - median("events", "children_us")) + (
        median("events+argv", "reader_us") - median("events", "reader_us")
    )
    body = "\n".join(
        [
            "## Command lines at exec: what the exec probe costs (issue 22)",
            "",
            f"Run: `python -m bench.exec_bench --count {args.count} --rounds {args.rounds}`; "
            f"{args.count} processes per round (`/usr/bin/true` with arguments of their own, "
            "one after the other), medians of the rounds, the three set-ups interleaved.  "
            f"Load average {' '.join(f'{v:.2f}' for v in load_before)} before, "
            f"{' '.join(f'{v:.2f}' for v in load_after)} after; {info['nproc']} CPUs, "
            f"kernel {info['kernel']}, {info['python']}.",
            "",
            markdown_table(
                [
                    "set-up",
                    "wall us per process",
                    "child CPU us per process (exec, loader, probe)",
                    "reader CPU us per process",
                    "CPU us per process in all",
                    "child CPU / events'",
                    "reader CPU / events'",
                ],
                rows,
            ),
            "",
            f"The probe's cost per process started, both sides: {extra:.0f} us of CPU "
            "(events+argv less events; negative or near zero: within the noise).",
        ]
    )
    publish("exec", body, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
