"""The Python side of a measured method: ``python -m bench.worker cold|warm MODULE:FACTORY``.

``FACTORY`` is called with no arguments and returns a callable that takes one sample of the
host and returns its rows (a count or a sized collection).  Importing ``MODULE`` is not timed
(interpreter start-up is the same for every Python method, and ``bench.targets`` imports
nothing heavy); the factory is, in cold mode, with the imports it makes and the sampler it
builds, because a fresh process pays for them on its first sample.

With a third argument ``cpu`` the figures are this process's CPU time
(``time.process_time``: user and system, so a system call's kernel time counts) instead of
wall time.

Replies are one JSON object per line on stdout: ``{"ms", "rows", "rss_kb"}``, or
``{"ready": true}`` once a warm worker has taken its untimed first sample, or
``{"unavailable": reason}`` when the factory raises ``bench.measure.Unavailable``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Callable, Dict, List, Sized, Union

from bench.measure import Unavailable

Sampler = Callable[[], Union[int, Sized]]


def load_factory(spec: str) -> Callable[[], Sampler]:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"bench.worker: target {spec!r} is not MODULE:FACTORY")
    factory: Callable[[], Sampler] = getattr(importlib.import_module(module_name), attribute)
    return factory


def _rows(result: Union[int, Sized]) -> int:
    return result if isinstance(result, int) else len(result)


def _quiet(sample: Sampler) -> Dict[str, Any]:
    """``{"quiet": [undumped, namespaces]}`` when the sample says how many namespaces it left
    undumped (a ``quiet()`` attribute: the sampler's reuse, agent/collect/sockets/changes.py)."""
    quiet = getattr(sample, "quiet", None)
    return {"quiet": list(quiet())} if callable(quiet) else {}


def _reply(payload: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _rss_kb() -> int:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would include the parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main(argv: List[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] not in ("cold", "warm") or argv[2:] not in ([], ["cpu"]):
        raise SystemExit("usage: python -m bench.worker cold|warm MODULE:FACTORY [cpu]")
    mode, spec = argv[:2]
    clock = time.process_time if argv[2:] == ["cpu"] else time.perf_counter
    factory = load_factory(spec)
    try:
        started = clock()
        sample = factory()
        rows = _rows(sample())
        first_ms = (clock() - started) * 1000
    except Unavailable as exc:
        _reply({"unavailable": str(exc)})
        return 3
    if mode == "cold":
        _reply({"ms": first_ms, "rows": rows, "rss_kb": _rss_kb(), **_quiet(sample)})
        return 0
    _reply({"ready": True, "first_ms": first_ms})
    for _request in sys.stdin:
        started = clock()
        rows = _rows(sample())
        ms = (clock() - started) * 1000
        _reply({"ms": ms, "rows": rows, "rss_kb": _rss_kb(), **_quiet(sample)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
