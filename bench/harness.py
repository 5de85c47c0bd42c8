"""One scale measured: every method opened, one discarded round, then the measured rounds.

Each round runs every method once on the same load, starting with a different method each
round so that no method always runs first (or right after the most expensive one).  A method
that is unavailable (a plug-in not landed) or fails is reported as such and the others go on.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from bench.extension import ExtensionGenerate
from bench.load import Load
from bench.measure import ColdPython, Command, Method, Sample, Unavailable, WarmPython
from bench.report import MethodResult, ScaleResult


def methods(interval: float) -> List[Method]:
    """Every method, in table order; ``ss -tunaH`` first: it is the floor the ratios use.

    ``true`` is there to show how much of a command's time is only starting a process, the
    kernel floor what walking the socket tables of every namespace costs the kernel alone.
    """
    return [
        Command("ss", "ss -tunaH", ["ss", "-tunaH"]),
        Command("ss-p", "ss -tunapH", ["ss", "-tunapH"]),
        Command("spawn", "spawn cost (true)", ["true"]),
        ColdPython("psutil", "psutil + identity", "bench.targets:psutil_table"),
        ColdPython("sampler-cold", "sampler cold", "bench.targets:our_sampler"),
        WarmPython("sampler-warm", "sampler warm", "bench.targets:our_sampler"),
        WarmPython(
            "sampler-warm-all",
            "sampler warm, every namespace read",
            "bench.targets:our_sampler_reading_all",
        ),
        WarmPython("floor", "kernel floor, every namespace", "bench.targets:kernel_floor"),
        ColdPython(
            "generate-cold", "live generate cold, CPU", "bench.generate:live_generate", cpu=True
        ),
        WarmPython(
            "generate-warm", "live generate warm, CPU", "bench.generate:live_generate", cpu=True
        ),
        ExtensionGenerate(interval),
    ]


CPU_SUFFIX = "-cpu"


def cpu_results(results: Sequence[MethodResult]) -> List[MethodResult]:
    """A result of its own for each method whose samples carry the measured process's CPU
    (the extension's, beside its round trip): ``extension CPU per generate``."""
    derived = []
    for result in results:
        cpu = [s for s in result.samples if s.cpu_ms is not None]
        if cpu and result.ok:
            label = "extension CPU per generate" if result.key == "extension" else result.label
            derived.append(
                MethodResult(
                    result.key + CPU_SUFFIX,
                    label if result.key == "extension" else f"{label}, CPU",
                    f"{result.command}: the extension's CPU (schedstat, every thread)",
                    [Sample(ms=s.cpu_ms or 0.0, rows=s.rows, rss_kb=s.rss_kb) for s in cpu],
                )
            )
    return derived


def run_scale(
    load: Load,
    chosen: Sequence[Method],
    runs: int,
    log: Callable[[str], None] = lambda _msg: None,
) -> ScaleResult:
    census = load.census()
    results = [MethodResult(m.key, m.label, m.describe()) for m in chosen]
    active = []
    try:
        for method, result in zip(chosen, results):
            try:
                method.open()
                active.append((method, result))
            except Unavailable as exc:
                result.unavailable = str(exc)
            except Exception as exc:  # one broken method must not sink the others
                result.error = f"{type(exc).__name__}: {exc}"
            else:
                continue
            log(f"{method.label}: n/a ({result.unavailable or result.error})")
        for round_ in range(runs + 1):
            turn = round_ % max(1, len(active))
            for method, result in active[turn:] + active[:turn]:
                if result.error:
                    continue
                try:
                    sample = method.measure()
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    log(f"{method.label}: {result.error}")
                    continue
                if round_:
                    result.samples.append(sample)
            log(f"scale {load.scale.name}: round {round_}/{runs} done")
    finally:
        for method, _ in active:
            method.close()
    return ScaleResult(load.scale, census, load.setup_seconds, runs, results + cpu_results(results))
