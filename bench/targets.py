"""The Python methods, as factories for ``bench.worker``: each returns a one-sample callable.

``psutil_table`` is the naive Python table an administrator would write: psutil's
``net_connections('inet')`` (which readlinks every fd of every process, then parses all of
``/proc/net/{tcp,tcp6,udp,udp6}`` of its own namespace only), then the identity of every pid
that owns a socket via ``Process.oneshot()``, the same fields the agent reports.

``our_sampler`` is egress-agent's own sampler (``agent.collect.sockets.sampler``): every network
namespace, external connections only, each with its process, as ``egress-agent check`` takes it.

Imports are inside the factories: the worker times the factory in cold mode, so what a fresh
process must import (psutil for the naive table; the agent's modules for the sampler) is part
of the cold number, as it is of the command an administrator would run.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

Identity = Tuple[str, str, Tuple[str, ...], str, float, int]


def _identity(pid: int) -> Optional[Identity]:
    import psutil

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
    import psutil

    def sample() -> int:
        connections = psutil.net_connections("inet")
        identities: Dict[int, Optional[Identity]] = {}
        for connection in connections:
            if connection.pid and connection.pid not in identities:
                identities[connection.pid] = _identity(connection.pid)
        return len(connections)

    return sample


def our_sampler() -> Callable[[], List[object]]:
    """One sample of ``agent.collect.sockets.sampler``: all namespaces, external rows only,
    with identity.

    Cold and warm differ only in the process: cold is a fresh interpreter per run (imports,
    classifier and sampler construction included), warm keeps this closure (and the sampler's
    caches: verdicts, owner scan order, identities) across runs.
    """
    from agent.classify import Classifier
    from agent.collect.sockets.sampler import LinuxSampler

    return _sampling(LinuxSampler(Classifier()))


def _sampling(sampler: Any) -> Callable[[], List[object]]:
    """One sample of ``sampler`` a call, with ``quiet()``: (namespaces left undumped of the last
    sample, its namespaces), for the results table."""

    def sample() -> List[object]:
        return list(sampler.sample())

    def quiet() -> Tuple[int, int]:
        return sampler.last.namespaces_quiet, sampler.last.namespaces

    sample.quiet = quiet  # type: ignore[attr-defined]
    return sample


def our_sampler_reading_all() -> Callable[[], List[object]]:
    """:func:`our_sampler` reading every namespace in full every time
    (``full_read_every=0``): the sampler before namespaces were reused, for comparison."""
    from agent.classify import Classifier
    from agent.collect.sockets.sampler import LinuxSampler

    return _sampling(LinuxSampler(Classifier(), full_read_every=0))


REJECT_ALL = b"\x01\x04\x08\x00"
"""An inet_diag bytecode program of one JMP past its end: the kernel keeps no socket."""


def kernel_floor() -> Callable[[], int]:
    """What reading every namespace's tables costs in the kernel alone: for each network
    namespace one sock_diag dump per table (TCP, TCP6, UDP, UDP6) with a program that keeps
    nothing, so the kernel walks its hash tables and copies nothing out.  Warm only (the
    sockets are opened once); the floor under the sampler, as ``ss -tunaH`` is for one
    namespace."""
    from agent.collect.netns import discover_namespaces
    from agent.collect.sockets.procnet import SOCKET_TABLES
    from agent.collect.sockets.sockdiag import ALL_STATES, DiagSocket

    def sample() -> int:
        walked = 0
        for namespace in discover_namespaces().namespaces:
            try:
                diag = DiagSocket.in_namespace(namespace.pid)
            except OSError:
                continue
            with diag:
                for table in SOCKET_TABLES:
                    diag.records(table, ALL_STATES, REJECT_ALL)
                    walked += 1
        return walked

    return sample
