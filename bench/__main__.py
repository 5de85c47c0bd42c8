"""``python -m bench``: list this host's sockets several ways on a load it builds, side by side.

For each scale: build the load (``bench.load``), open every method (``bench.measure``), take one
discarded round and ``--runs`` measured rounds (each round runs every method once, starting
with a different one), close the methods, tear the load down; then print the tables and write
the section of ``bench/RESULTS.md``.  ``--over-time SECONDS`` instead runs the osquery extension
on scale M for that long and reports its CPU share and RSS.  Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional, Sequence

from bench.extension import over_time
from bench.harness import methods, run_scale
from bench.load import SCALES, Load, LoadError
from bench.measure import Unavailable
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
    parser.add_argument("--runs", type=int, default=5, help="measured rounds (default 5)")
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
    parser.add_argument("--interval", type=float, default=5.0, help="extension interval (5 s)")
    parser.add_argument(
        "--query-every", type=float, default=0.0, help="over-time: also generate every N s"
    )
    args = parser.parse_args(argv)
    default = "M" if args.over_time is not None else "S,M,L,M-none,M-all"
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


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the teardown in Load.__exit__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if os.geteuid() != 0:
        print("bench: needs root (it builds network namespaces and veth pairs)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        topology = Topology(args.prefix, args.net)
        if args.cleanup:
            print("bench: removed", " ".join(teardown(topology)) or "nothing")
            return 0
        if args.over_time is not None:
            return _over_time(args, topology, argv)
        return _scales(args, topology, argv)
    except (LoadError, TopologyError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; load torn down", file=sys.stderr)
        return 130


def _scales(args: argparse.Namespace, topology: Topology, argv: Sequence[str]) -> int:
    chosen = [
        m
        for m in methods(args.interval)
        if not args.only_list or m.key in args.only_list or m.key == "ss"
    ]
    results = []
    for name in args.scale_list:
        with Load(SCALES[name], topology, log=_log) as load:
            result = run_scale(load, chosen, args.runs, _log)
        results.append(result)
        print_scale(result)
    if len(results) > 1:
        print(text_table(["method", *args.scale_list], summary_rows(results)))
    if not args.no_write:
        write_section("scales", scales_section(results, argv))
        _log("wrote bench/RESULTS.md")
    return 0


def _over_time(args: argparse.Namespace, topology: Topology, argv: Sequence[str]) -> int:
    scale = SCALES[args.scale_list[0]]
    with Load(scale, topology, log=_log):
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
    rows = [
        ["scale", f"{scale.name} ({scale.clients} clients)"],
        ["duration", f"{result.duration:.0f} s, extension interval {result.interval:g} s"],
        ["generates issued", f"{result.generates} (every {result.query_every:g} s; 0 = none)"],
        ["CPU share of one core", f"{result.cpu_share:.2f} %"],
        ["RSS idle (after one interval)", f"{result.idle_rss_kb / 1024:.1f} MB"],
        [
            "RSS at start / end",
            f"{result.points[0][2] / 1024:.1f} / {result.points[-1][2] / 1024:.1f} MB",
        ],
        ["RSS max", f"{max(p[2] for p in result.points) / 1024:.1f} MB"],
        ["RSS drift", f"{result.rss_drift_kb / 1024:+.1f} MB"],
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
