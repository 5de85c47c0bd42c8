"""``python -m bench.soak DURATION``: the extension under load for a long time (issue 7).

The load of ``bench.load`` (scale M: 300 processes, 9,900 sockets, about 5% of them external, a
quarter in a second network namespace) stays up while the osquery extension, launched by the
core stand-in (``tests/osquery_core.py``) as osqueryd would, samples every ``--interval``
seconds into a history bounded by ``--max-rows`` and ``--retention`` and answers a query every
``--query-every`` seconds (``external_connections``; every tenth also ``egress_agent_info`` and
``external_connection_history``).  Meanwhile one short-lived process a second dials an external
server and lives a little longer than a sampling interval, so new history rows keep coming and
the bounds are what keeps the history small.

It passes (exit 0) when, over the whole run:

- every query is answered (status 0) and every live answer has every external connection of
  the load, with its owner;
- the extension's log has no error, warning or traceback, and it ends within 2 s of SIGTERM;
- its resident set (``VmRSS``, proc(5)) at the end is within ``--rss-limit-mb`` (5 MB) of what
  it was after the warm-up;
- the history never holds more than ``--max-rows`` rows, nor a row last seen longer ago than
  the retention (plus one sampling interval).

Examples::

    python -m bench.soak 10m                                  # the issue's soak
    python -m bench.soak 90s --scale S --max-rows 50          # a short check that it works

Needs root (network namespaces).  Names: ``--prefix`` (``eah-soak``) and ``--net`` (219), apart
from the benchmark's; everything is removed at the end, also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench.extension import memory_kb
from bench.load import SCALES, Load, LoadError
from bench.topology import SERVER_PORTS, Topology, TopologyError, teardown

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_duration(text: str) -> float:
    """``600``, ``600s``, ``10m`` or ``1h`` as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration (600, 90s, 10m, 1h): {text!r}")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be more than 0: {text!r}")
    return value


@dataclass
class Findings:
    """What went wrong, and what was seen along the way."""

    errors: List[str] = field(default_factory=list)
    queries: int = 0
    live_rows_min: Optional[int] = None
    rss_kb: List[int] = field(default_factory=list)
    history_rows_max: int = 0
    history_bytes: List[int] = field(default_factory=list)
    samples_total: int = 0
    churned: int = 0

    def error(self, message: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(message)
        _log(f"ERROR: {message}")


class Churn:
    """One short-lived client a second, each holding an external connection ``hold_s``."""

    def __init__(self, address: str, hold_s: float) -> None:
        self.address = address
        self.hold_s = hold_s
        self.children: List[int] = []
        self.started = 0

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            status = 0
            try:
                family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as conn:
                    conn.settimeout(5)
                    conn.connect((self.address, SERVER_PORTS[0]))
                    time.sleep(self.hold_s)
            except BaseException:
                status = 1
            os._exit(status)
        self.children.append(pid)
        self.started += 1
        self.reap(block=False)

    def reap(self, block: bool) -> None:
        for pid in list(self.children):
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            if done:
                self.children.remove(pid)

    def stop(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reap(block=True)


def _write_config(directory: Path, args: argparse.Namespace) -> Path:
    config = directory / "config.yaml"
    config.write_text(
        "sampling:\n"
        f"  interval: {args.interval:g}\n"
        "history:\n"
        f"  path: {directory}/state/history.db\n"
        f"  max_rows: {args.max_rows}\n"
        f"  retention_days: {args.retention / 86400.0!r}\n"
    )
    return config


def _history_bytes(directory: Path) -> int:
    state = directory / "state"
    return sum(p.stat().st_size for p in state.iterdir()) if state.is_dir() else 0


def soak(args: argparse.Namespace) -> Findings:
    sys.path.insert(0, str(TESTS))
    from osquery_core import CoreStandIn, ExtensionConnection, default_extension_command

    findings = Findings()
    topology = Topology(args.prefix, args.net)
    scale = SCALES[args.scale]
    workdir = Path(tempfile.mkdtemp(prefix="eah-soak-", dir="/tmp"))
    churn = Churn(topology.external_v4[0], hold_s=args.interval * 1.5)
    try:
        with Load(scale, topology, log=_log) as load, CoreStandIn(str(workdir)) as core:
            load_pids = set(load.pids)
            expected = load.expected_external()
            config = _write_config(workdir, args)
            process = core.launch(
                default_extension_command(),
                timeout=10,
                interval=1,
                env={"EGRESS_AGENT_CONFIG": str(config)},
            )
            registration = core.wait_for_registration(process=process, timeout=120)
            extension = ExtensionConnection(core.extension_socket(registration), timeout=120)
            _log(
                f"extension pid {process.pid} up; load: {scale.sockets} sockets, "
                f"{expected} external"
            )

            def query(table: str) -> List[Dict[str, str]]:
                findings.queries += 1
                response = extension.call("table", table, {"action": "generate", "context": "{}"})
                if response.status is None or response.status.code != 0:
                    message = response.status.message if response.status else "no status"
                    findings.error(f"{table}: status {response.status.code}: {message}")
                    return []
                return list(response.response)

            def check_live() -> None:
                rows = [r for r in query("external_connections") if int(r["pid"]) in load_pids]
                owned = sum(1 for r in rows if r["name"])
                if owned < expected:
                    findings.error(
                        f"live: {owned} external connections of the load, {expected} open"
                    )
                if findings.live_rows_min is None or owned < findings.live_rows_min:
                    findings.live_rows_min = owned

            def check_stores(now: float) -> None:
                (info,) = query("egress_agent_info") or [{}]
                findings.samples_total = int(info.get("samples_total") or 0)
                if info.get("history_error"):
                    findings.error(f"history: {info['history_error']}")
                history = query("external_connection_history")
                findings.history_rows_max = max(findings.history_rows_max, len(history))
                if len(history) > args.max_rows:
                    findings.error(f"history: {len(history)} rows, the bound is {args.max_rows}")
                oldest = min((int(r["last_seen"]) for r in history), default=int(now))
                if oldest < now - args.retention - args.interval - 2:
                    findings.error(f"history: a row last seen {now - oldest:.0f} s ago is kept")
                findings.rss_kb.append(memory_kb(process.pid, "VmRSS"))
                findings.history_bytes.append(_history_bytes(workdir))

            # warm-up: two background samples, a few queries; then the baseline
            deadline = time.monotonic() + 120
            while int((query("egress_agent_info") or [{}])[0].get("samples_total") or 0) < 2:
                if time.monotonic() > deadline:
                    findings.error("no two background samples within 120 s")
                    break
                time.sleep(0.5)
            for _ in range(3):
                check_live()
            check_stores(time.time())
            _log(f"baseline: RSS {findings.rss_kb[0]} KB; running {args.duration:g} s")

            started = time.monotonic()
            tick = 0
            while time.monotonic() - started < args.duration:
                tick += 1
                churn.spawn()
                check_live()
                if tick % 10 == 0:
                    check_stores(time.time())
                if tick % args.report_every == 0:
                    _log(
                        f"{tick} s: RSS {findings.rss_kb[-1]} KB, history "
                        f"{findings.history_rows_max} rows max, {findings.samples_total} samples"
                    )
                pause = started + tick * args.query_every - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            check_stores(time.time())
            findings.churned = churn.started

            extension.close()
            process.send_signal(signal.SIGTERM)
            try:
                if process.wait(2.0) != 0:
                    findings.error(f"the extension exited with status {process.returncode}")
            except Exception:
                findings.error("the extension did not end within 2 s of SIGTERM")
            output = core.output(process)
            for word in ("ERROR", "WARNING", "Traceback"):
                if word in output:
                    findings.error(f"the extension logged {word}:\n{output[-2000:]}")
            growth = findings.rss_kb[-1] - findings.rss_kb[0]
            if growth > args.rss_limit_mb * 1024:
                findings.error(f"RSS grew {growth} KB, the limit is {args.rss_limit_mb} MB")
    finally:
        churn.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return findings


def _report(findings: Findings, args: argparse.Namespace) -> None:
    rss = findings.rss_kb
    print(f"soak: {args.duration:g} s at scale {args.scale} ({SCALES[args.scale].sockets} sockets)")
    print(f"  queries answered: {findings.queries}; background samples: {findings.samples_total}")
    print(f"  short-lived processes: {findings.churned}")
    print(
        f"  external connections of the load in each live answer, at least: "
        f"{findings.live_rows_min}"
    )
    if rss:
        print(
            f"  RSS: {rss[0]} KB after warm-up, {rss[-1]} KB at the end ({rss[-1] - rss[0]:+d} KB)"
            f", {max(rss)} KB at most (limit {args.rss_limit_mb} MB growth)"
        )
    print(
        f"  history: at most {findings.history_rows_max} rows (bound {args.max_rows}), "
        f"files {findings.history_bytes[0] if findings.history_bytes else 0} -> "
        f"{findings.history_bytes[-1] if findings.history_bytes else 0} bytes"
    )
    print(f"  result: {'PASS' if not findings.errors else 'FAIL'}")
    for error in findings.errors:
        print(f"  - {error}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("duration", type=parse_duration, help="how long: 600, 90s, 10m")
    parser.add_argument("--scale", default="M", choices=sorted(SCALES), help="load (M)")
    parser.add_argument("--interval", type=float, default=5.0, help="sampling interval (5 s)")
    parser.add_argument("--query-every", type=float, default=1.0, help="seconds between queries")
    parser.add_argument("--max-rows", type=int, default=300, help="history.max_rows (300)")
    parser.add_argument(
        "--retention", type=float, default=120.0, help="history retention in seconds (120)"
    )
    parser.add_argument("--rss-limit-mb", type=float, default=5.0, help="RSS growth limit (5)")
    parser.add_argument(
        "--report-every", type=int, default=60, help="log progress every N queries (60)"
    )
    parser.add_argument("--prefix", default="eah-soak", help="namespace/link prefix (eah-soak)")
    parser.add_argument("--net", type=int, default=219, help="addresses 10.NET.x.x (219)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        findings = soak(args)
    except (LoadError, TopologyError) as error:
        print(f"python -m bench.soak: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m bench.soak: interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        teardown(Topology(args.prefix, args.net))
    _report(findings, args)
    return 0 if not findings.errors else 1


if __name__ == "__main__":
    sys.exit(main())
