"""Results: statistics per method, the printed tables, and ``bench/RESULTS.md``.

RESULTS.md is made of sections between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
markers; a run rewrites only its own sections (the scales table, the over-time run, the
classifier micro-benchmark) and keeps everything else, including hand-written analysis.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import psutil

from bench.load import Census, Scale
from bench.measure import Sample

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


@dataclass
class MethodResult:
    key: str
    label: str
    command: str
    samples: List[Sample] = field(default_factory=list)
    unavailable: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.samples) and not self.unavailable and not self.error

    def _ms(self) -> List[float]:
        return [s.ms for s in self.samples]

    @property
    def median_ms(self) -> float:
        return statistics.median(self._ms())

    @property
    def min_ms(self) -> float:
        return min(self._ms())

    @property
    def max_ms(self) -> float:
        return max(self._ms())

    @property
    def peak_rss_mb(self) -> float:
        return max(s.rss_kb for s in self.samples) / 1024

    @property
    def rows(self) -> int:
        return int(statistics.median([s.rows for s in self.samples]))

    @property
    def quiet(self) -> str:
        """Median namespaces left undumped by a sample, of its namespaces ("" when unknown)."""
        pairs = [s.quiet for s in self.samples if s.quiet is not None]
        if not pairs:
            return ""
        undumped = statistics.median(p[0] for p in pairs)
        return f"{undumped:g} of {statistics.median(p[1] for p in pairs):g}"

    @property
    def process_ms(self) -> Optional[float]:
        values = [s.process_ms for s in self.samples if s.process_ms is not None]
        return statistics.median(values) if values else None


@dataclass
class ScaleResult:
    scale: Scale
    census: Census
    setup_seconds: float
    runs: int
    methods: List[MethodResult]

    def floor(self) -> Optional[MethodResult]:
        for method in self.methods:
            if method.key == "ss" and method.ok:
                return method
        return None


def machine() -> Dict[str, str]:
    """What the numbers were measured on."""
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ss_version = subprocess.run(["ss", "-V"], capture_output=True, text=True, check=False)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "kernel": platform.release(),
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "psutil": psutil.__version__,
        "ss": ss_version.stdout.strip().replace("ss utility, ", "") or "?",
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def describe_load(result: ScaleResult) -> str:
    c, s = result.census, result.scale
    sockets = ", ".join(f"{ns} {n}" for ns, n in c.sockets_by_namespace.items())
    return (
        f"scale {s.name}: {s.clients} clients x ({s.files} files + {s.tcp} TCP + 1 UDP), "
        f"external={s.external}; load {c.load_processes} processes / {c.load_fds} fds, "
        f"{c.external_connections} external connections; sockets (ss -tuna rows) {sockets}; "
        f"whole host {c.host_processes} processes / {c.host_fds} fds; "
        f"built in {result.setup_seconds:.1f} s"
    )


def _num(value: Optional[float], digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


HEADER = (
    "method",
    "median ms",
    "min",
    "max",
    "x ss -tunaH",
    "peak RSS MB",
    "rows",
    "process ms",
    "namespaces undumped",
)


def scale_rows(result: ScaleResult) -> List[List[str]]:
    floor = result.floor()
    rows = []
    for m in result.methods:
        if not m.ok:
            rows.append([m.label, "n/a", "", "", "", "", "", m.unavailable or m.error, ""])
            continue
        ratio = m.median_ms / floor.median_ms if floor else None
        rows.append(
            [
                m.label,
                _num(m.median_ms),
                _num(m.min_ms),
                _num(m.max_ms),
                _num(ratio, 2),
                _num(m.peak_rss_mb),
                str(m.rows),
                _num(m.process_ms),
                m.quiet,
            ]
        )
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def summary_rows(results: Sequence[ScaleResult]) -> List[List[str]]:
    """Methods x scales: median ms (ratio to ss -tunaH)."""
    labels: List[str] = []
    for r in results:
        labels += [m.label for m in r.methods if m.label not in labels]
    rows = []
    for label in labels:
        row = [label]
        for r in results:
            m = next((m for m in r.methods if m.label == label), None)
            floor = r.floor()
            if m is None or not m.ok:
                row.append("n/a")
            elif floor:
                row.append(f"{m.median_ms:.1f} ({m.median_ms / floor.median_ms:.2f}x)")
            else:
                row.append(f"{m.median_ms:.1f}")
        rows.append(row)
    return rows


def print_scale(result: ScaleResult) -> None:
    print(describe_load(result))
    print(text_table(HEADER, scale_rows(result)))
    print()


def scales_section(
    results: Sequence[ScaleResult], argv: Sequence[str], load_before: str = ""
) -> str:
    methods: Dict[str, str] = {}
    for r in results:
        for m in r.methods:
            methods.setdefault(m.label, m.command)
    info = machine()
    if load_before:  # the end's figure counts the load's own processes starting (L: 1000)
        info["load average"] = f"{load_before} before the run, {info['load average']} after"
    parts = [
        "## Socket listing: medians, min and max per scale",
        "",
        f"Run: `python -m bench {' '.join(argv)}`; {results[0].runs if results else 0} "
        "measured rounds after one discarded round; in each round every method runs once, "
        "side by side on the same load, starting with a different method each round.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "Methods:",
        "",
        *(f"- {label}: `{command}`" for label, command in methods.items()),
        "",
        "Times are wall milliseconds. For commands, the whole process (spawn to reaping, "
        "output drained through a pipe). For the Python methods, the time after the "
        "interpreter's start-up: cold ones run a fresh interpreter per run (bytecode "
        "cached, as installed) and time the imports the method needs, its construction and "
        "its first sample (`process ms` is that interpreter's whole wall time); warm ones "
        "keep one process and time one sample per "
        "run; the extension is timed per generate request through the Thrift stand-in, round "
        "trip included. Peak RSS: GNU time's %M for commands, VmHWM for Python processes. "
        "`rows` is what each method returned: `ss` and psutil see only this network "
        "namespace; the sampler and the extension see every namespace but report external "
        "connections only. The kernel walks every namespace's sockets to answer any one "
        "namespace's dump, so the server and client namespaces weigh on the floor too.",
        "",
        "Summary (median ms, ratio to `ss -tunaH`):",
        "",
        markdown_table(["method", *(r.scale.name for r in results)], summary_rows(results)),
        "",
    ]
    for r in results:
        parts += [
            f"### {r.scale.name}",
            "",
            describe_load(r),
            "",
            markdown_table(HEADER, scale_rows(r)),
            "",
        ]
    return "\n".join(parts)


def publish(name: str, body: str, write: bool) -> None:
    """Print a section and, when ``write`` (no ``--no-write``), put it in RESULTS.md."""
    print(body)
    if write:
        write_section(name, body)


def write_section(name: str, body: str, path: str = RESULTS_PATH) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md, keeping the rest."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if not text:
        text = (
            "# Benchmark results (issue 6)\n\n"
            "Written by `python -m bench` (`make bench`); `python -m bench --help` says how.\n"
        )
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
