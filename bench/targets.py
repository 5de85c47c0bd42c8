"""The Python methods, as factories for ``bench.worker``: each returns a one-sample callable.

``psutil_table`` is the naive Python table an administrator would write: psutil's
``net_connections('inet')`` (which readlinks every fd of every process, then parses all of
``/proc/net/{tcp,tcp6,udp,udp6}`` of its own namespace only), then the identity of every pid
that owns a socket via ``Process.oneshot()``, the same fields the agent reports.

``our_sampler`` is the plug-in point for ``agent.sampler`` (issue 6): until it is wired it
raises ``Unavailable`` and the benchmark prints the method as n/a.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import psutil

from bench.measure import Unavailable

Identity = Tuple[str, str, Tuple[str, ...], str, float, int]


def _identity(pid: int) -> Optional[Identity]:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return (
                process.name(),
                process.exe(),
                tuple(process.cmdline()),
                process.username(),
                process.create_time(),
                process.ppid(),
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def psutil_table() -> Callable[[], int]:
    """``psutil.net_connections('inet')`` plus the identity of every owning pid."""

    def sample() -> int:
        connections = psutil.net_connections("inet")
        identities: Dict[int, Optional[Identity]] = {}
        for connection in connections:
            if connection.pid and connection.pid not in identities:
                identities[connection.pid] = _identity(connection.pid)
        return len(connections)

    return sample


def our_sampler() -> Callable[[], int]:
    """Plug-in point: one sample of ``agent.sampler`` (all namespaces, external rows only).

    To wire: build the sampler here (this is timed in cold mode: a fresh process pays for it)
    and return a closure that takes one sample and returns its row count.  Cold and warm differ
    only in the process: cold is a fresh interpreter per run, warm keeps this closure (and the
    sampler's caches) across runs.
    """
    try:
        import agent.sampler  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"agent.sampler has not landed ({exc})") from None
    raise Unavailable("agent.sampler is not wired into bench.targets.our_sampler yet")
