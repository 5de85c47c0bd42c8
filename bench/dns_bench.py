"""What the DNS watch costs (issue 12): parser, observer CPU under load, memory at the bound.

``python -m bench.dns_bench [--seconds 10] [--rates 100,1000] [--prefix edb]`` as root.

- **Parser**: microseconds per message for a typical answer (a CNAME chain to two A
  records), a question alone (what a query or an unsolicited answer costs), and a 512-record
  answer; beside dnspython's ``dns.message.from_wire`` on the same typical answer, and what
  importing each costs (a fresh interpreter: time and RSS growth), when dnspython is
  importable (it is no dependency of ours: ``PYTHONPATH`` to a copy).
- **Observer CPU**: a DNS server (``bench.dnsload``) in one test host namespace answering a
  client in another at each rate for ``--seconds``, unique names and addresses; the watch
  runs in a process of its own in the host namespace, watching every namespace of the
  machine, and reports its CPU time over the window.  Beside it, the DNS server's CPU for
  the same answers (a small Python server: the anchor), and the watch idle.
- **Memory at the bound**: the name cache filled far past its default bounds with typical and
  with longest-chain answers, and the tracker's tables full (pending queries, TCP flows
  holding their byte bound); tracemalloc's figure beside the bound and the RSS growth.

Prints a markdown table and writes it as the ``dns`` section of ``bench/RESULTS.md`` (not
with ``--no-write``).  Machines shared with other work give noisy CPU
figures: read them as orders of magnitude, and the ratio to the server as the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import struct
import subprocess
import sys
import time
import timeit
import tracemalloc
from typing import Dict, List, Optional, Sequence, Tuple

from agent.collect.dns.answers import AnswerTracker
from agent.collect.dns.cache import MAX_BYTES, MAX_ENTRIES, NameCache
from agent.collect.dns.filter import PACKET_HOST, PACKET_OUTGOING
from agent.collect.dns.parse import parse_message
from agent.collect.dns.watch import DnsWatch
from bench.dnsload import TYPE_A, ipv4_packet, query, response

TYPICAL = response(
    0x1234,
    "deb.debian.org",
    TYPE_A,
    ["debian.map.fastly.net", "dualstack.f3.shared.global.fastly.net"],
    ["151.101.2.132", "151.101.66.132"],
)
LARGE = response(
    7, "many.test", TYPE_A, [], [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(512)]
)

Row = Tuple[str, str, str]


def _per_call_us(work: object, number: int) -> float:
    timer = timeit.Timer(work)  # type: ignore[arg-type]
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def _import_cost(module: str) -> Optional[Tuple[float, float]]:
    """(milliseconds, MiB of RSS growth) to import ``module`` in a fresh interpreter."""
    code = (
        "import os, time\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "before = rss()\n"
        "started = time.perf_counter()\n"
        f"import {module}\n"
        "took = time.perf_counter() - started\n"
        "print(took * 1000, (rss() - before) / 2**20)\n"
    )
    runs = []
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            return None
        took, grew = (float(word) for word in done.stdout.split())
        runs.append((took, grew))
    return min(runs)


def parser_rows() -> List[Row]:
    rows: List[Row] = [
        (
            "parser: typical answer (3-name chain, 2 A)",
            f"{_per_call_us(lambda: parse_message(TYPICAL), 5000):.1f} us",
            "",
        ),
        (
            "parser: question only (a query, or an unsolicited answer)",
            f"{_per_call_us(lambda: parse_message(TYPICAL, answers=False), 5000):.1f} us",
            "",
        ),
        ("parser: 512 A records", f"{_per_call_us(lambda: parse_message(LARGE), 20):.0f} us", ""),
    ]
    ours = _import_cost("agent.collect.dns.parse")
    if ours is not None:
        rows.append(
            ("import agent.collect.dns.parse", f"{ours[0]:.1f} ms", f"+{ours[1]:.1f} MiB RSS")
        )
    try:
        import dns.message  # type: ignore[import-not-found]
    except ImportError:
        rows.append(("dnspython from_wire, typical answer", "n/a", "not importable here"))
        return rows
    theirs = _per_call_us(lambda: dns.message.from_wire(TYPICAL), 2000)
    mine = _per_call_us(lambda: parse_message(TYPICAL), 5000)
    version = getattr(dns, "version", None)
    label = getattr(version, "version", "?")
    rows.append(
        (
            f"dnspython {label} from_wire, typical answer",
            f"{theirs:.0f} us",
            f"{theirs / mine:.0f}x ours",
        )
    )
    cost = _import_cost("dns.message")
    if cost is not None:
        rows.append(("import dns.message", f"{cost[0]:.0f} ms", f"+{cost[1]:.1f} MiB RSS"))
    return rows


# --- memory at the bound -----------------------------------------------------------------------


HOME = 4026531840
"""The namespace the memory figures fill: the cache's home (the agent's own), whose bound is the
largest; every other namespace has a smaller budget of its own (``NAMESPACE_BYTES``)."""


def _fill(cache: NameCache, long: bool) -> None:
    """Three times the entry bound of distinct answers in the home namespace, as a flood would
    bring them."""
    for index in range(3 * MAX_ENTRIES):
        if long:
            chain = tuple(f"{index}-{j}.{'a' * 60}.{'b' * 60}.{'c' * 60}.test" for j in range(17))
        else:
            chain = (f"host{index}.example.com", f"edge{index % 50}.cdn.test")
        cache.add(HOME, 4, index, chain, 300)


def memory_rows() -> List[Row]:
    rows: List[Row] = []
    for label, long in (("typical answers", False), ("longest chains (17 names)", True)):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        cache = NameCache(home=HOME)
        _fill(cache, long)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        rows.append(
            (
                f"name cache at its bound, {label}",
                f"{held / 2**20:.2f} MiB held ({len(cache)} entries)",
                f"bound {MAX_BYTES >> 20} MiB (estimated), {MAX_ENTRIES} entries",
            )
        )
        del cache
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracker = AnswerTracker(NameCache())
    client, server = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
    now = time.time()
    for ident in range(2 * tracker.max_pending):
        udp_payload = query(ident & 0xFFFF, f"pending{ident}.test")
        l4 = struct.pack("!HHHH", 1024 + ident % 60000, 53, 8 + len(udp_payload), 0) + udp_payload
        tracker.packet(1, ipv4_packet(client, server, 17, l4), PACKET_OUTGOING, False, now)
    for port in range(2 * tracker.max_flows):
        syn = struct.pack("!HHIIBBHHH", 53, port + 1, 0, 0, 0x50, 0x12, 0, 0, 0)
        tracker.packet(1, ipv4_packet(server, client, 6, syn), PACKET_HOST, False, now)
        data = struct.pack("!HHIIBBHHH", 53, port + 1, 1, 0, 0x50, 0x18, 0, 0, 0)
        data += b"\xff\xff" + b"x" * 8000
        tracker.packet(1, ipv4_packet(server, client, 6, data), PACKET_HOST, False, now)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    rows.append(
        (
            "tracker at its bounds (queries waiting, TCP flows)",
            f"{held / 2**20:.2f} MiB held",
            f"{tracker.pending} queries, {tracker.flows} flows, {tracker.buffered >> 10} KiB held",
        )
    )
    return rows


# --- the observer under load ---------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _cleanup(prefix: str) -> None:
    for name in ("srv", "cli"):
        subprocess.run(["ip", "netns", "del", f"{prefix}-{name}"], capture_output=True)


def _spawn(namespace: Optional[str], argv: Sequence[str]) -> subprocess.Popen[str]:
    full = list(argv) if namespace is None else ["ip", "netns", "exec", namespace, *argv]
    proc = subprocess.Popen(
        full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 30)[0] or not proc.stdout.readline().startswith(
        "READY"
    ):
        proc.kill()
        raise RuntimeError(
            f"{' '.join(full)}: not ready: {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


def _say(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            proc.wait(5)


def load_rows(prefix: str, rates: Sequence[float], seconds: float) -> List[Row]:
    _cleanup(prefix)
    srv, cli = f"{prefix}-srv", f"{prefix}-cli"
    procs: List[subprocess.Popen[str]] = []
    rows: List[Row] = []
    try:
        for name in (srv, cli):
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            f"{prefix}-s0",
            "netns",
            srv,
            "type",
            "veth",
            "peer",
            "name",
            f"{prefix}-c0",
            "netns",
            cli,
        )
        _ip("-n", srv, "address", "add", "10.54.0.1/24", "dev", f"{prefix}-s0")
        _ip("-n", cli, "address", "add", "10.54.0.2/24", "dev", f"{prefix}-c0")
        _ip("-n", srv, "link", "set", f"{prefix}-s0", "up")
        _ip("-n", cli, "link", "set", f"{prefix}-c0", "up")
        server = _spawn(srv, [sys.executable, "-m", "bench.dnsload", "serve", "10.54.0.1", "{}"])
        procs.append(server)
        cli_inode = os.stat(f"/run/netns/{cli}").st_ino
        for rate in [0.0, *rates]:
            flood = (
                _spawn(
                    cli,
                    [
                        sys.executable,
                        "-m",
                        "bench.dnsload",
                        "flood",
                        "10.54.0.1",
                        str(rate or 1),
                        str(seconds),
                    ],
                )
                if rate
                else None
            )
            if flood is not None:
                procs.append(flood)
            holder = None
            if flood is None:  # a process in cli, so that the watch enters it, as under load
                holder = _spawn(cli, [sys.executable, "-m", "bench.dnsload", "stub"])
                procs.append(holder)
            observer = _spawn(
                None, [sys.executable, "-m", "bench.dns_bench", "observe", str(cli_inode)]
            )
            procs.append(observer)
            server_before = _cpu_of(server.pid)
            _say(observer, "go")
            if flood is not None:
                _say(flood, "go")
                assert flood.stdout is not None
                select.select([flood.stdout], [], [], seconds + 30)
                done = flood.stdout.readline().split()
            else:
                time.sleep(seconds)
                done = ["DONE", "0", "0"]
            time.sleep(0.5)
            _say(observer, "stop")
            assert observer.stdout is not None
            result: Dict[str, float] = json.loads(observer.stdout.readline())
            server_cpu = _cpu_of(server.pid) - server_before
            window = result["window"]
            share = result["cpu"] / window * 100
            rss = f"RSS {result['rss']:.0f} MiB"
            if rate:
                ratio = result["cpu"] / max(server_cpu, 1e-9)
                per_answer = result["cpu"] / max(result["answers"], 1) * 1e6
                rows.append(
                    (
                        f"watch CPU at {rate:g} answers/s"
                        f" ({done[2]} answered, {result['answers']:.0f} seen)",
                        f"{share:.2f}% of a core ({per_answer:.0f} us/answer)",
                        f"DNS server {server_cpu / window * 100:.1f}% ({ratio:.2f}x);"
                        f" kernel drops {result['drops']:.0f}; {rss}",
                    )
                )
            else:
                namespaces = f"{result['namespaces']:.0f} namespaces watched"
                rows.append((f"watch CPU idle ({namespaces})", f"{share:.2f}% of a core", rss))
            for proc in (observer, flood, holder):
                if proc is not None:
                    _end(proc)
    finally:
        for proc in procs:
            _end(proc)
        _cleanup(prefix)
    return rows


def observe(namespace: int) -> None:
    """The watch in a process of its own: READY once it watches ``namespace``; CPU counted
    from ``go`` to ``stop`` on stdin; one JSON line at the end."""
    watch = DnsWatch(NameCache())
    if not watch.start():
        print(watch.unavailable, file=sys.stderr)
        sys.exit(1)
    deadline = time.monotonic() + 20
    while namespace not in watch.watched() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("READY", flush=True)
    sys.stdin.readline()
    started, cpu = time.monotonic(), time.process_time()
    sys.stdin.readline()
    cpu, window = time.process_time() - cpu, time.monotonic() - started
    counters = watch.counters(namespace)
    result = {
        "cpu": cpu,
        "window": window,
        "answers": counters.answers,
        "drops": counters.kernel_drops,
        "namespaces": len(watch.watched()),
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    watch.close()
    print(json.dumps(result), flush=True)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["observe"]:
        observe(int(argv[1]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.dns_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate (default 10)")
    parser.add_argument("--rates", default="100,1000", help="answers per second (100,1000)")
    parser.add_argument("--prefix", default="edb", help="namespace name prefix (edb)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    rows = parser_rows() + memory_rows()
    if os.geteuid() == 0:
        rates = [float(rate) for rate in args.rates.split(",") if rate]
        rows += load_rows(args.prefix, rates, args.seconds)
    else:
        rows.append(("watch CPU under load", "n/a", "needs root (network namespaces, AF_PACKET)"))
    from bench.report import machine, markdown_table, publish

    info = machine()
    body = "\n".join(
        [
            "## The DNS watch (issue 12)",
            "",
            f"Run: `python -m bench.dns_bench {' '.join(argv)}`; {info['python']}, "
            f"load average {info['load average']}.",
            "",
            markdown_table(["measured", "figure", "beside it"], [list(row) for row in rows]),
        ]
    )
    publish("dns", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
