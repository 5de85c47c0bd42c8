"""``python -m bench.events_bench``: the kernel event source under a connect load (root).

Builds a test host (``bench.topology``, prefix ``eeb`` by default), a server in its server
namespace that accepts and closes, and generator processes in its client namespace that open
and reset TCP connections to a global address at a set rate.  The event source runs in this
process, polled as the agent will poll it, while the generators run beside it.  Per rate step:

- achieved connects/s, by the kernel's own count (``Tcp: ActiveOpens`` of the client
  namespace: the anchor), and how many of them the events saw;
- events lost (page headers and ``per_cpu/cpuN/stats``);
- the reader's CPU (this process: poll, read, decode, track) as % of one core, beside the
  generators' own CPU (the cost of making the load) as a ratio;
- the reader's CPU per event read (all events of the machine: other processes' too).

Plus the decoding cost alone on pages captured from a kernel (``tests/data/trace``), CPU time
per record.  Prints markdown tables.  The shared 2-core machine of the developers makes these
orders of magnitude; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from agent.collect.kernel.reader import choose_events
from agent.collect.kernel.ringbuffer import PageParser, parse_header_event, parse_header_page
from agent.collect.kernel.source import KernelEventSource, open_event_source
from agent.collect.sockets.procnet import parse_snmp
from bench.report import machine, markdown_table, publish
from bench.topology import Topology, build, teardown

PORT = 8000
TRACE_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "trace"
)


def _log(message: str) -> None:
    print(f"[events-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the load's processes (this module run with --serve / --generate inside a namespace)


def serve(port: int) -> int:
    """Accept and close every connection until stdin closes (``port`` 0: one the kernel picks;
    ``READY PORT`` says which)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))  # noqa: S104 - inside the test host's server namespace
    listener.listen(4096)
    listener.setblocking(False)
    print("READY", listener.getsockname()[1], flush=True)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
            return 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            conn.close()


_LINGER_RESET = struct.pack("ii", 1, 0)


def generate(address: str, port: int, rate: float, duration: float) -> int:
    """Open and reset ``rate`` connections per second for ``duration`` seconds; print how many
    were made and this process's CPU seconds."""
    made = 0
    started = time.monotonic()
    interval = 1.0 / rate
    next_at = started
    while True:
        now = time.monotonic()
        if now - started >= duration:
            break
        if now < next_at:
            time.sleep(min(next_at - now, 0.01))
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        try:
            sock.connect((address, port))
            made += 1
        except OSError:
            pass
        sock.close()  # an RST: no TIME_WAIT or FIN_WAIT left behind
        next_at += interval
        if now - next_at > 1.0:  # fell behind by a second: do not burst to catch up
            next_at = now
    times = os.times()
    print(json.dumps({"made": made, "cpu": times.user + times.system}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# measuring


def _netns_run(namespace: str, argv: Sequence[str]) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, check=True
    )
    return done.stdout


def active_opens(namespace: str) -> int:
    return parse_snmp(_netns_run(namespace, ["cat", "/proc/net/snmp"]))["ActiveOpens"]


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


class Step:
    def __init__(self, rate: float, duration: float) -> None:
        self.rate = rate
        self.duration = duration
        self.made = 0
        self.active_opens = 0
        self.seen = 0
        self.lost = 0
        self.events = 0
        self.reader_cpu = 0.0
        self.generator_cpu = 0.0
        self.wall = 0.0
        self.baseline_pct: Optional[float] = None
        """The reader's CPU in the idle seconds just before this step (others' events)."""

    @property
    def achieved(self) -> float:
        return self.active_opens / self.duration

    @property
    def reader_pct(self) -> float:
        return 100.0 * self.reader_cpu / self.duration

    @property
    def above_idle(self) -> Optional[float]:
        if self.baseline_pct is None or not self.rate:
            return None
        return self.reader_pct - self.baseline_pct

    def cpu_text(self) -> str:
        above = self.above_idle
        extra = "" if above is None else f" ({above:+.2f}% above the idle seconds before)"
        return f"{self.reader_pct:.2f}%{extra}"

    def row(self) -> List[str]:
        ratio = self.reader_cpu / self.generator_cpu if self.generator_cpu else None
        per_event = 1e6 * self.reader_cpu / self.events if self.events else None
        above = self.above_idle
        return [
            f"{self.rate:g}",
            f"{self.achieved:.0f}",
            f"{self.seen} / {self.active_opens}",
            str(self.lost),
            f"{self.events / self.duration:.0f}",
            f"{self.reader_pct:.2f}%",
            "" if above is None else f"{above:+.2f}%",
            "" if ratio is None else f"{ratio:.2f}",
            "" if per_event is None else f"{per_event:.1f}",
        ]


HEADER = [
    "target connects/s",
    "achieved (ActiveOpens/s)",
    "seen by events / ActiveOpens",
    "lost",
    "events/s read (whole machine)",
    "reader CPU (% of one core)",
    "above the idle seconds before",
    "reader CPU / generators' CPU",
    "reader CPU us per event",
]


def run_step(
    source: KernelEventSource,
    topology: Topology,
    namespace_inode: int,
    rate: float,
    duration: float,
    generators: int,
) -> Step:
    step = Step(rate, duration)
    opens_before = active_opens(topology.client_ns)
    seen_before = source.connects_by_namespace().get(namespace_inode, 0)
    lost_before = source.lost
    events_before = source.events_read
    cpu_before = _cpu()
    wall_before = time.monotonic()
    address = topology.external_v4[0]
    procs = []
    if rate > 0:
        for _ in range(generators):
            argv = [sys.executable, "-m", "bench.events_bench", "--generate", address,
                    str(PORT), str(rate / generators), str(duration)]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", topology.client_ns, *argv],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
    deadline = wall_before + duration
    while time.monotonic() < deadline or any(p.poll() is None for p in procs):
        source.poll(0.2)
        if time.monotonic() > deadline + 30:
            break
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 0.5 and time.monotonic() < deadline + 40:
        if source.poll(0.1):
            quiet_since = time.monotonic()
    step.reader_cpu = _cpu() - cpu_before
    step.wall = time.monotonic() - wall_before
    for proc in procs:
        out, _ = proc.communicate(timeout=30)
        report = json.loads(out.strip().splitlines()[-1])
        step.made += report["made"]
        step.generator_cpu += report["cpu"]
    step.active_opens = active_opens(topology.client_ns) - opens_before
    step.seen = source.connects_by_namespace().get(namespace_inode, 0) - seen_before
    step.lost = source.lost - lost_before
    step.events = source.events_read - events_before
    return step


def decode_cost(repeats: int = 2000) -> Tuple[float, float]:
    """(CPU us per record decoded, per record walked only) on captured pages."""

    def read(name: str) -> str:
        with open(os.path.join(TRACE_DATA, name)) as handle:
            return handle.read()

    chosen = choose_events(lambda system, name: read(os.path.join("formats", f"{system}:{name}")))
    parser = PageParser(
        parse_header_page(read("header_page")),
        parse_header_event(read("header_event")),
        chosen.type_field.offset,
        chosen.type_field.size,
    )
    with open(os.path.join(TRACE_DATA, "lost.bin"), "rb") as handle:
        data = handle.read()
    pages = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    results = []
    for decoders in (chosen.decoders, {}):
        records = 0
        started = time.process_time()
        for _ in range(repeats):
            for page in pages:
                records += parser.parse(page, decoders, []).records
        results.append(1e6 * (time.process_time() - started) / records)
    return results[0], results[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.events_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--rates", default="0,100,1000,5000,10000,20000", help="connects/s steps (0: idle)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step (10)")
    parser.add_argument(
        "--idle", type=float, default=3.0, help="idle seconds measured before each step (3)"
    )
    parser.add_argument("--generators", type=int, default=2, help="generator processes (2)")
    parser.add_argument("--prefix", default="eeb", help="namespace/veth name prefix (eeb)")
    parser.add_argument("--net", type=int, default=197, help="addresses 10.NET.x.x (197)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve)
    if args.generate:
        address, port, rate, duration = args.generate
        return generate(address, int(port), float(rate), float(duration))
    if os.geteuid() != 0:
        print("events_bench: needs root (tracefs, network namespaces)", file=sys.stderr)
        return 2
    decoded, walked = decode_cost()
    topology = Topology(prefix=args.prefix, net=args.net)
    _log(f"building the test host {topology.server_ns}, {topology.client_ns}")
    build(topology)
    server = None
    try:
        server = subprocess.Popen(
            ["ip", "netns", "exec", topology.server_ns, sys.executable, "-m",
             "bench.events_bench", "--serve", str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().startswith("READY")
        inode = os.stat(topology.netns_path(topology.client_ns)).st_ino
        load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        steps: List[Step] = []
        with open_event_source(prefix="egress-agent-bench") as source:
            for rate in (float(r) for r in args.rates.split(",")):
                baseline = None
                if rate > 0:
                    baseline = run_step(source, topology, inode, 0, args.idle, 0).reader_pct
                _log(f"{rate:g} connects/s for {args.duration:g} s")
                step = run_step(source, topology, inode, rate, args.duration, args.generators)
                step.baseline_pct = baseline
                steps.append(step)
                _log(f"  achieved {step.achieved:.0f}/s, seen {step.seen}, lost {step.lost}")
            unavailable: Dict[str, str] = source.unavailable
        clean = [s for s in steps if s.rate > 0 and s.lost == 0 and s.seen == s.active_opens]
        best = max((s.achieved for s in clean), default=0.0)
        info = machine()
        lines: List[str] = []
        lines.append("## Kernel events: the reader under a connect load (issue 11)\n")
        lines.append(
            f"Run: `python -m bench.events_bench {' '.join(argv or sys.argv[1:])}`.  Load average "
            f"{load_before} before the run, {info['load average']} after; {info['nproc']} CPUs, "
            f"kernel {info['kernel']}, {info['python']}.  The reader alone: the whole "
            "pipeline (tracker, records, names, rules, history) is measured per connection by "
            "`bench.rate_bench` and at 10,000/s by `bench.sustain_bench` (the sections below).\n"
        )
        idle = next((s for s in steps if s.rate == 0), None)
        lines.append(markdown_table(HEADER, [s.row() for s in steps]))
        lines.append("")
        rows = [
            ["connects/s sustained without loss", f"{best:.0f}"],
            ["decode, CPU us per record (captured pages)", f"{decoded:.2f}"],
            ["page walk alone, CPU us per record", f"{walked:.2f}"],
        ]
        for s in steps:
            if s.rate in (100.0, 1000.0):
                rows.append([f"reader CPU at {s.rate:g}/s", s.cpu_text()])
        if idle is not None:
            rows.append(
                ["reader CPU idle (the machine's other events only)", f"{idle.reader_pct:.2f}%"]
            )
        lines.append(markdown_table(["figure", "value"], rows))
        if unavailable:
            lines.append(
                "\nEvents this kernel lacks: "
                + ", ".join(f"{k} ({v})" for k, v in unavailable.items())
            )
        body = "\n".join(lines)
        publish("events", body, write=not args.no_write)
    finally:
        if server is not None:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        teardown(topology)
    return 0


if __name__ == "__main__":
    sys.exit(main())
