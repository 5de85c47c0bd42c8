"""The history table at 100,000 rows through the extension (issue 16): time, size, bound.

``python -m bench.history_bench [--rows 100000] [--runs 3] [--no-write]``: builds a history
store of ``--rows`` rows (1,000 processes x 100 destinations, written as one snapshot and
closed, as a long-lived host's store looks), starts the extension on it behind the stand-in of
osquery core (``tests/osquery_core.py``), and asks ``external_connection_history`` two queries
as core asks them: every column (``SELECT *``) and the columns and constraint of the pack's
hourly query (``config/osquery``: ``WHERE direction = 'outbound'``).  For each: the wall time
of the generate (the stand-in's pure-Python decoding included), the extension's CPU for it
(schedstat), the rows answered, the bytes of the reply, and what the answer takes in core by
``agent.osquery.external_connection_history.core_bytes`` beside ``HISTORY_ANSWER_BUDGET``, the
bound on one answer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from agent.history import HistoryStore
from agent.osquery import external_connection_history
from agent.osquery.external_connection_history import HISTORY_ANSWER_BUDGET, core_bytes
from agent.records import Connection
from bench.extension import StandInExtension, cpu_ns, memory_kb

HOURLY_COLUMNS = (
    "process_uuid", "pid", "name", "path", "username", "container_id", "systemd_unit",
    "connections", "allowlisted", "first_seen", "last_seen", "remote_address", "direction",
)  # fmt: skip
"""What the pack's hourly query reads of ``external_connection_history``."""
EQUALS = 2


def fill(path: str, rows: int) -> float:
    """A store at ``path`` holding ``rows`` rows; seconds it took."""
    started = time.monotonic()
    store = HistoryStore(path, max_rows=rows)
    per_process = 100
    connections = [
        Connection(
            pid=40000 + i // per_process,
            name=f"worker-{i // per_process}",
            path="/usr/bin/worker",
            cmdline="/usr/bin/worker --serve",
            username="www-data",
            process_uuid=f"{i // per_process:032x}",
            net_namespace=4026531840,
            socket=100000 + i,
            family=2,
            protocol=6,
            state="ESTABLISHED",
            local_address="192.0.2.10",
            local_port=30000 + i % 30000,
            remote_address=f"{11 + i % 200}.{i // 200 % 250}.{i // 50000}.{1 + i % 7}",
            remote_port=443,
            external=True,
            address_class="global",
        )
        for i in range(rows)
    ]
    at = time.time() - 3600
    store.snapshot("sampling", connections, at)
    store.snapshot("sampling", [], at + 60)  # closed: the store keeps them
    store.close()
    return time.monotonic() - started


def context(columns: Sequence[str], direction: Optional[str] = None) -> str:
    names = external_connection_history.SPEC.column_names
    constraints = [
        {
            "name": name,
            "list": [{"op": EQUALS, "expr": direction}]
            if name == "direction" and direction
            else [],
            "affinity": "TEXT",
        }
        for name in names
    ]
    bits = sum(1 << names.index(c) for c in columns)
    return json.dumps(
        {"constraints": constraints, "colsUsed": list(columns), "colsUsedBitset": bits}
    )


def measure(extension: StandInExtension, query: str, runs: int) -> Dict[str, Any]:
    connection = extension._connection
    pid = extension.pids[0]
    figures: Dict[str, List[float]] = {"ms": [], "cpu_ms": [], "bytes": []}
    answered: List[Dict[str, str]] = []
    for _ in range(runs):
        socket = connection._socket
        before_bytes, before_cpu = socket.bytes_read, cpu_ns(pid)
        started = time.perf_counter()
        answered = connection.generate(external_connection_history.SPEC.name, query)
        figures["ms"].append((time.perf_counter() - started) * 1000)
        figures["cpu_ms"].append((cpu_ns(pid) - before_cpu) / 1e6)
        figures["bytes"].append(socket.bytes_read - before_bytes)
    result: Dict[str, Any] = {key: statistics.median(values) for key, values in figures.items()}
    result["rows"] = len(answered)
    result["core_bytes"] = sum(core_bytes(row) for row in answered)
    result["rss_mb"] = memory_kb(pid, "VmHWM") / 1024
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the store (100000)")
    parser.add_argument("--runs", type=int, default=3, help="generates per query (3)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    from bench.report import machine, markdown_table, publish

    directory = tempfile.mkdtemp(prefix="eab-history-")
    try:
        path = os.path.join(directory, "history.db")
        seconds = fill(path, args.rows)
        extension = StandInExtension(3600.0, history_path=path)
        try:
            queries = {
                "every column (SELECT *)": context(external_connection_history.SPEC.column_names),
                "the pack's hourly query (13 columns, direction = 'outbound')": context(
                    HOURLY_COLUMNS, "outbound"
                ),
            }
            results = {
                label: measure(extension, query, args.runs) for label, query in queries.items()
            }
        finally:
            extension.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    rows = [
        [
            label,
            f"{r['rows']:,}",
            f"{r['ms']:.0f}",
            f"{r['cpu_ms']:.0f}",
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['core_bytes'] / 2**20:.1f} of {HISTORY_ANSWER_BUDGET / 2**20:.0f}",
            f"{r['rss_mb']:.0f}",
        ]
        for label, r in results.items()
    ]
    info = machine()
    body = "\n".join(
        [
            "## The history table at 100,000 rows (issue 16)",
            "",
            f"Run: `python -m bench.history_bench {' '.join(argv or sys.argv[1:])}`; a store of "
            f"{args.rows:,} rows (1,000 processes x 100 destinations, written in {seconds:.1f} s), "
            f"the extension behind the stand-in core, medians of {args.runs} generates per query; "
            f"{info['python']}, load average {info['load average']}.",
            "",
            markdown_table(
                [
                    "query",
                    "rows answered",
                    "generate ms (wall, stand-in decoding included)",
                    "extension CPU ms",
                    "reply MiB",
                    "in core, MiB (core_bytes) of the bound",
                    "extension peak RSS MB",
                ],
                rows,
            ),
        ]
    )
    publish("history", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
