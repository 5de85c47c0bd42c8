"""``python -m bench``: list this host's sockets several ways on a load it builds, side by side.

For each scale: build the load (``bench.load``), open every method (``bench.measure``), take one
discarded round and ``--runs`` measured rounds (each round runs every method once, starting
with a different one), close the methods, tear the load down; then print the tables and write
the section of ``bench/RESULTS.md``.  Then the micro-benchmarks, each in a process of its own
writing its own section: the Thrift reply (``bench.thrift_bench``), start-up
(``bench.startup``), the DNS watch (``bench.dns_bench``) and the history table at 100,000 rows
(``bench.history_bench``), the kernel events (``bench.events_bench``), the connect rate
(``bench.rate_bench``) and a sustained rate with a memory soak (``bench.sustain_bench``);
``--no-extras`` leaves them out.  ``--quick`` (development): scales
M and N100, 3 rounds, the micro-benchmarks shortened.  ``--over-time SECONDS`` instead runs the
osquery extension on scale M for that long and reports its CPU share and RSS.  Needs root
(network namespaces).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from bench.extension import over_time
from bench.harness import methods, run_scale
from bench.load import SCALES, Load, LoadError
from bench.measure import REPO_ROOT, Unavailable
from bench.report import (
    markdown_table,
    print_scale,
    scales_section,
    summary_rows,
    text_table,
    write_section,
)
from bench.topology import Topology, TopologyError, teardown


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scales",
        default="",
        help=f"comma-separated, of: {','.join(SCALES)} (default: all but tiny; M for --over-time)",
    )
    parser.add_argument("--runs", type=int, default=11, help="measured rounds (default 11)")
    keys = [m.key for m in methods(5.0)]
    parser.add_argument(
        "--only", default="", help="comma-separated methods (ss is always kept): " + ",".join(keys)
    )
    parser.add_argument("--prefix", default="eab", help="namespace/veth name prefix (eab)")
    parser.add_argument("--net", type=int, default=213, help="addresses 10.NET.x.x (213)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="only delete this prefix's namespaces and link (after a kill -9 of the benchmark)",
    )
    parser.add_argument(
        "--over-time", type=float, metavar="SECONDS", help="run the extension this long instead"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help=f"extension interval (over time: {OVER_TIME_INTERVAL:g} s; scales: "
        f"{EXTENSION_INTERVAL:g} s, so that no background sample lands in a generate's CPU)",
    )
    parser.add_argument(
        "--query-every", type=float, default=0.0, help="over-time: also generate every N s"
    )
    parser.add_argument(
        "--connects",
        type=float,
        default=100.0,
        help="over-time: short TCP connections per second to a global address of the load (100)",
    )
    parser.add_argument("--quick", action="store_true", help="M and N100, 3 rounds, short extras")
    parser.add_argument("--no-extras", action="store_true", help="no micro-benchmarks")
    args = parser.parse_args(argv)
    if args.over_time is not None and args.interval is None:
        args.interval = OVER_TIME_INTERVAL
    if args.quick and args.runs == parser.get_default("runs"):
        args.runs = 3
    default = "M" if args.over_time is not None else DEFAULT_SCALES
    if args.quick and args.over_time is None:
        default = "M,N100"
    args.scale_list = [s.strip() for s in (args.scales or default).split(",") if s.strip()]
    unknown = [s for s in args.scale_list if s not in SCALES]
    if unknown:
        parser.error(f"unknown scale {', '.join(unknown)} (known: {', '.join(SCALES)})")
    args.only_list = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.only_list if k not in keys]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)} (known: {', '.join(keys)})")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


DEFAULT_SCALES = "S,M,L,M-none,M-all,N100,N100-storm"
OVER_TIME_INTERVAL = 5.0
EXTENSION_INTERVAL = 3600.0
"""The extension's sampling interval while its generates are measured: one background sample
at start, none after, so that the CPU of a generate is the generate's (the background loop's
cost is what ``--over-time`` measures)."""

EXTRAS = (
    ("bench.thrift_bench", ["--repeats", "25"], ["--repeats", "5"]),
    ("bench.startup", ["--runs", "5"], ["--runs", "2"]),
    ("bench.dns_bench", ["--seconds", "4"], ["--seconds", "2", "--rates", "100"]),
    ("bench.history_bench", ["--runs", "3"], ["--runs", "1"]),
    (
        "bench.events_bench",
        ["--rates", "0,100,1000,5000,10000", "--duration", "8"],
        ["--rates", "100", "--duration", "3"],
    ),
    (
        "bench.rate_bench",
        ["--rate", "2000", "--seconds", "10"],
        ["--rate", "500", "--seconds", "3"],
    ),
    (
        "bench.sustain_bench",
        ["--rate", "10000", "--seconds", "60", "--soak-rate", "1000", "--soak-seconds", "600"],
        ["--rate", "1000", "--seconds", "5", "--soak-rate", "300", "--soak-seconds", "80"],
    ),
)
"""The micro-benchmarks run after the scales: (module, arguments, arguments with --quick)."""


def _extras(args: argparse.Namespace) -> int:
    """Each micro-benchmark in a process of its own (it writes its own RESULTS.md section)."""
    failed = 0
    for module, arguments, quick in EXTRAS:
        argv = [sys.executable, "-m", module, *(quick if args.quick else arguments)]
        if module == "bench.dns_bench":
            argv += ["--prefix", f"{args.prefix}d"]
        if args.no_write:
            argv.append("--no-write")
        started = time.monotonic()
        _log(f"{module}: {' '.join(argv[3:])}")
        done = subprocess.run(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, check=False)
        _log(f"{module}: exit {done.returncode} after {time.monotonic() - started:.0f} s")
        failed += done.returncode != 0
    return failed


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the teardown in Load.__exit__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench: needs root (it builds network namespaces and veth pairs)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    pycache = _bytecode_cache()
    try:
        topology = Topology(args.prefix, args.net)
        if args.cleanup:
            print("bench: removed", " ".join(teardown(topology)) or "nothing")
            return 0
        if args.over_time is not None:
            return _over_time(args, topology, argv)
        started = time.monotonic()
        status = _scales(args, topology, argv)
        if not args.no_extras:
            status = status or (1 if _extras(args) else 0)
        _log(f"done in {(time.monotonic() - started) / 60:.1f} minutes")
        return status
    except (LoadError, TopologyError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; load torn down", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(pycache, ignore_errors=True)


def _bytecode_cache() -> str:
    """Let the Python processes we start cache their bytecode, in a directory of this run.

    The installed package has its bytecode compiled (its postinst runs compileall); a
    development shell may set PYTHONDONTWRITEBYTECODE, and then every fresh interpreter would
    compile the agent's modules again and the cold numbers would measure the compiler.  The
    first (discarded) round fills the cache.
    """
    pycache = tempfile.mkdtemp(prefix="eab-pycache-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = pycache
    return pycache


def _scales(args: argparse.Namespace, topology: Topology, argv: Sequence[str]) -> int:
    chosen = [
        m
        for m in methods(EXTENSION_INTERVAL if args.interval is None else args.interval)
        if not args.only_list or m.key in args.only_list or m.key == "ss"
    ]
    results = []
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for name in args.scale_list:
        with Load(SCALES[name], topology, log=_log) as load:
            result = run_scale(load, chosen, args.runs, _log)
        results.append(result)
        print_scale(result)
    if len(results) > 1:
        print(text_table(["method", *args.scale_list], summary_rows(results)))
    if not args.no_write:
        write_section("scales", scales_section(results, argv, load_before))
        _log("wrote bench/RESULTS.md")
    return 0


def _connect_load(topology: Topology, rate: float, duration: float) -> List[subprocess.Popen[str]]:
    """A server that accepts and closes, in the load's server namespace, and a generator of
    ``rate`` short connections a second to it from the client namespace (``bench.events_bench``)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", topology.server_ns, sys.executable, "-m", "bench.events_bench",
         "--serve", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert server.stdout is not None
    ready = server.stdout.readline().split()
    assert ready[:1] == ["READY"], ready
    port = ready[1]
    generator = subprocess.Popen(
        ["ip", "netns", "exec", topology.client_ns, sys.executable, "-m", "bench.events_bench",
         "--generate", topology.external_v4[0], port, f"{rate:g}", f"{duration:g}"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    return [generator, server]


def _stop(processes: List[subprocess.Popen[str]]) -> None:
    """Stop the connect load: the server ends when its stdin closes (``communicate`` closes
    it), the generator is terminated."""
    for process in processes:
        if process.stdin is None and process.poll() is None:
            process.terminate()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _over_time(args: argparse.Namespace, topology: Topology, argv: Sequence[str]) -> int:
    scale = SCALES[args.scale_list[0]]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with Load(scale, topology, log=_log):
        load = (
            _connect_load(topology, args.connects, args.over_time + args.interval + 60)
            if args.connects > 0
            else []
        )
        try:
            result = over_time(
                args.over_time,
                args.interval,
                args.query_every,
                log=_log,
                sample_every=min(10.0, max(1.0, args.over_time / 10)),
            )
        except Unavailable as exc:
            print(f"bench: over time: n/a ({exc})", file=sys.stderr)
            return 1
        finally:
            _stop(load)
    before, after = result.info_before, result.info_after
    seen = int(after.get("outbound_tcp_seen") or 0) - int(before.get("outbound_tcp_seen") or 0)
    opens = int(after.get("tcp_active_opens") or 0) - int(before.get("tcp_active_opens") or 0)
    rows = [
        ["scale", f"{scale.name} ({scale.clients} clients)"],
        ["duration", f"{result.duration:.0f} s, extension interval {result.interval:g} s"],
        ["generates issued", f"{result.generates} (every {result.query_every:g} s; 0 = none)"],
        ["connect load", f"{args.connects:g} short TCP connections/s to a global address"],
        [
            "event source",
            f"{after.get('events_source', '?')}, {after.get('events_lost', '?')} events lost"
            + (f" ({after.get('events_error')})" if after.get("events_error") else ""),
        ],
        ["TCP connects in the run: kernel / seen by the agent", f"{opens} / {seen}"],
        ["CPU share of one core", f"{result.cpu_share:.2f} %"],
        ["RSS idle (after one interval)", f"{result.idle_rss_kb / 1024:.1f} MB"],
        [
            "RSS at start / end",
            f"{result.points[0][2] / 1024:.1f} / {result.points[-1][2] / 1024:.1f} MB",
        ],
        ["RSS max", f"{max(p[2] for p in result.points) / 1024:.1f} MB"],
        ["RSS drift", f"{result.rss_drift_kb / 1024:+.1f} MB"],
        [
            "load average (start / end)",
            f"{load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        ],
    ]
    print(text_table(["extension over time", ""], rows))
    if not args.no_write:
        body = "\n".join(
            [
                "## The extension over time",
                "",
                f"Run: `python -m bench {' '.join(argv)}`",
                "",
                markdown_table(["measure", "value"], rows),
            ]
        )
        write_section("over-time", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
