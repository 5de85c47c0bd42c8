"""``python -m bench.rate_bench``: the agent's CPU per connection at a fixed connect rate, by
destination, this tree beside the previous release in one run (root; issue 20).

The whole agent runs, as an operator runs it: ``egress-agent watch`` (kernel events on, a
sample at start and then every 600 s, its own history store) from each tree, one after the
other, while generator processes in the test host's client namespace (``bench.topology``)
make short TCP connections (connect, then reset) at ``--rate`` per second for ``--seconds`` to
one destination at a time:

- ``loopback``: 127.0.0.1 inside the client namespace (a server there);
- ``private``: an internal 10.N.1.x address of the server namespace;
- ``external``: a global address of the server namespace (it exists only there).

On a shared machine the agent also handles everyone else's events (it watches the whole host):
before each load the same span is measured without it, and that CPU is taken off.

Then ``churn``: ``--churn`` short processes a second (``/bin/true``, fork and exec, exiting at
once) for ``--seconds``, the agent's CPU per process (the process table's cost).

Per tree and destination: the connections made (the client namespace's ``Tcp: ActiveOpens``),
the agent's CPU (every thread: ``/proc/PID/stat`` utime + stime) over the load and a settling
second after it, per connection in microseconds; its RSS at the end; whether it logged lost
events; and the kernel path it used (its tracing instance's filter on ``inet_sock_set_state``:
the internal blocks dropped in the kernel, or not).  The previous release is ``--baseline``
(a commit of this repository, extracted with ``git archive``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from agent.collect.sockets.procnet import parse_snmp
from bench.events_bench import PORT
from bench.report import machine, markdown_table, publish
from bench.topology import Topology, build, teardown

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "7ebd9df"
"""The last commit of the 0.2.0 line before issue 20 (the previous release's code)."""
TICKS = os.sysconf("SC_CLK_TCK")
DESTINATIONS = ("loopback", "private", "external")
CHURN = "churn"


def _log(message: str) -> None:
    print(f"[rate-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def extract(revision: str, into: Path) -> Path:
    """The ``agent`` package of ``revision`` under ``into`` (with a launcher); ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "agent"], capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(into)  # noqa: S202 - our own repository's archive
    launcher(into)
    return into


def launcher(tree: Path) -> None:
    (tree / "egress-agent").write_text("import sys\nfrom agent.cli import main\nsys.exit(main())\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def active_opens(namespace: str) -> int:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return parse_snmp(done.stdout)["ActiveOpens"]


def kernel_path(pid: int) -> str:
    """What the agent's tracing instance filters out on ``inet_sock_set_state``."""
    root = "/sys/kernel/tracing/instances"
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(f"-{pid}"):
            path = f"{root}/{name}/events/sock/inet_sock_set_state/filter"
            with open(path, encoding="ascii") as handle:
                text = handle.read()
            return "internal IPv4 dropped in the kernel" if "daddr &" in text else "all to Python"
    return "no kernel events"


@dataclass
class Step:
    tree: str
    destination: str
    connections: int
    cpu_s: float
    """The agent's CPU over the load and a second after it, less the same span idle."""
    idle_s: float
    rss_mb: float
    lost: bool
    path: str

    @property
    def per_connection_us(self) -> float:
        return 1e6 * self.cpu_s / self.connections if self.connections else float("nan")


class Agent:
    """``egress-agent watch`` of one tree, with a store and config of its own."""

    def __init__(self, tree: Path, work: Path) -> None:
        config = work / "config.yaml"
        # one sample at start, none in the measured spans: the idle span must be idle
        config.write_text(f"sampling:\n  interval: 600\nhistory:\n  path: {work / 'h.db'}\n")
        self.stderr = open(work / "stderr.log", "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, str(tree / "egress-agent"), "watch", "--format", "jsonl"],
            stdout=subprocess.DEVNULL, stderr=self.stderr, cwd=str(tree),
            env=dict(os.environ, EGRESS_AGENT_CONFIG=str(config), PYTHONDONTWRITEBYTECODE="1"),
        )  # fmt: skip
        time.sleep(4.0)  # the first sample, the tracing instance, the DNS watch

    def lost(self) -> bool:
        self.stderr.seek(0)
        return " lost" in self.stderr.read()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.stderr.close()


def load(topology: Topology, address: str, port: int, rate: float, seconds: float) -> None:
    """Two generators in the client namespace, ``rate`` connections a second in all."""
    generators = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                topology.client_ns,
                sys.executable,
                "-m",
                "bench.events_bench",
                "--generate",
                address,
                str(port),
                str(rate / 2),
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        for _ in range(2)
    ]
    for generator in generators:
        generator.communicate(timeout=seconds + 60)


def churn(rate: float, seconds: float) -> int:
    """``rate`` short processes a second for ``seconds``; how many were started."""
    started = 0
    begin = time.monotonic()
    next_at = begin
    children = []
    while time.monotonic() - begin < seconds:
        now = time.monotonic()
        if now < next_at:
            time.sleep(min(next_at - now, 0.005))
            continue
        children.append(os.posix_spawn("/bin/true", ["true"], {}))
        started += 1
        next_at += 1.0 / rate
        if len(children) > 64:
            for pid in children:
                os.waitpid(pid, 0)
            children.clear()
    for pid in children:
        os.waitpid(pid, 0)
    return started


def servers(topology: Topology) -> List[subprocess.Popen[str]]:
    started = []
    for namespace in (topology.server_ns, topology.client_ns):
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "bench.events_bench",
             "--serve", str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().startswith("READY")
        started.append(server)
    return started


@contextlib.contextmanager
def test_host(prefix: str, net: int) -> Iterator[Topology]:
    """The test host of ``bench.topology`` with a server in each namespace, torn down after."""
    topology = Topology(prefix=prefix, net=net)
    build(topology)
    started = servers(topology)
    try:
        yield topology
    finally:
        for server in started:
            server.communicate("", timeout=30)
        teardown(topology)


def this_tree(into: Path) -> Path:
    """A tree at ``into`` that runs this repository's ``agent`` (with a launcher); ``into``."""
    into.mkdir()
    (into / "agent").symlink_to(ROOT / "agent")
    launcher(into)
    return into


def measure(
    name: str,
    tree: Path,
    topology: Topology,
    rate: float,
    seconds: float,
    work: Path,
    churn_rate: float = 0.0,
) -> List[Step]:
    targets: Dict[str, str] = {
        "loopback": "127.0.0.1",
        "private": topology.internal_v4[0],
        "external": topology.external_v4[0],
    }
    steps = []
    agent = Agent(tree, work)
    try:
        path = kernel_path(agent.process.pid)
        for destination in DESTINATIONS:
            # the same span without the load first: what the rest of the machine costs the
            # agent meanwhile (other processes' events), taken off the load's CPU
            idle_from = cpu_seconds(agent.process.pid)
            time.sleep(seconds + 1.0)
            idle = cpu_seconds(agent.process.pid) - idle_from
            before_opens = active_opens(topology.client_ns)
            before_cpu = cpu_seconds(agent.process.pid)
            load(topology, targets[destination], PORT, rate, seconds)
            time.sleep(1.0)  # the agent drains what the load left in its buffers
            cpu = cpu_seconds(agent.process.pid) - before_cpu - idle
            made = active_opens(topology.client_ns) - before_opens
            rss = rss_mb(agent.process.pid)
            step = Step(name, destination, made, cpu, idle, rss, agent.lost(), path)
            _log(f"{name} {destination}: {made} connections, {step.per_connection_us:.1f} us each")
            steps.append(step)
        if churn_rate > 0:
            idle_from = cpu_seconds(agent.process.pid)
            time.sleep(seconds + 1.0)
            idle = cpu_seconds(agent.process.pid) - idle_from
            before_cpu = cpu_seconds(agent.process.pid)
            made = churn(churn_rate, seconds)
            time.sleep(1.0)
            cpu = cpu_seconds(agent.process.pid) - before_cpu - idle
            step = Step(name, CHURN, made, cpu, idle, rss_mb(agent.process.pid), agent.lost(), path)
            _log(f"{name} churn: {made} processes, {step.per_connection_us:.1f} us each")
            steps.append(step)
    finally:
        agent.stop()
    return steps


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rate_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rate", type=float, default=2000.0, help="connections/s (2000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per load (10)")
    parser.add_argument(
        "--churn", type=float, default=500.0, help="short processes/s for the churn step (500)"
    )
    parser.add_argument("--baseline", default=BASELINE, help=f"previous release ({BASELINE})")
    parser.add_argument("--prefix", default="erb", help="namespace/veth name prefix (erb)")
    parser.add_argument("--net", type=int, default=196, help="addresses 10.NET.x.x (196)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("rate_bench: needs root (tracefs, network namespaces)", file=sys.stderr)
        return 2
    steps: List[Step] = []
    with test_host(args.prefix, args.net) as topology, tempfile.TemporaryDirectory(
        prefix="rate-bench-"
    ) as temp:
        work = Path(temp)
        baseline = extract(args.baseline, work / "baseline")
        current = this_tree(work / "current")
        for name, tree in ((f"previous ({args.baseline})", baseline), ("this tree", current)):
            (work / name).mkdir()
            steps += measure(name, tree, topology, args.rate, args.seconds, work / name, args.churn)
    publish("rate", report(steps, args, argv), not args.no_write)
    return 0


def report(steps: List[Step], args: argparse.Namespace, argv: Optional[Sequence[str]]) -> str:
    info = machine()
    by: Dict[Tuple[str, str], Step] = {(s.tree, s.destination): s for s in steps}
    trees = list(dict.fromkeys(s.tree for s in steps))
    rows = []
    for destination in (*DESTINATIONS, CHURN):
        old, new = by.get((trees[0], destination)), by.get((trees[-1], destination))
        ratio = (
            f"{new.per_connection_us / old.per_connection_us:.2f}"
            if old and new and old.per_connection_us
            else "-"
        )
        for step in (old, new):
            if step is not None:
                rows.append([
                    destination, step.tree, str(step.connections),
                    f"{step.per_connection_us:.1f}",
                    f"{100 * step.idle_s / (args.seconds + 1):.1f}", f"{step.rss_mb:.0f}",
                    "yes" if step.lost else "no", step.path,
                    ratio if step is new else "",
                ])  # fmt: skip
    lines = [
        "## The connect rate: agent CPU per connection by destination (issue 20)\n",
        f"Run: `python -m bench.rate_bench {' '.join(argv or sys.argv[1:])}`: `watch` (kernel "
        f"events on, one sample at start) while {args.rate:g} short TCP connections/s for "
        f"{args.seconds:g} s go to each destination in turn; load average {info['load average']}"
        f" after the run, {info['nproc']} CPUs.\n",
        markdown_table(
            [
                "destination",
                "tree",
                "connections or processes",
                "agent us each",
                "idle: % of a core",
                "RSS MB",
                "lost",
                "kernel path",
                "this/previous",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
