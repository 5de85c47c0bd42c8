"""How each method is timed, and how its peak memory is taken.

Three shapes of method, all measured the same way round after round:

``Command``
    a program run fresh each time (``ss``); wall time from spawn to reaping, output drained
    from a pipe (as a consumer would).  Peak RSS from a second, untimed run under
    ``/usr/bin/time -f %M``.
``ColdPython``
    a fresh interpreter per run (``python -m bench.worker cold MODULE:FACTORY``); the worker
    times ``FACTORY()`` plus the first sample, i.e. everything after its imports, and the
    process wall time is kept beside it.  Peak RSS is the worker's ``VmHWM``.
``WarmPython``
    one long-lived worker (``python -m bench.worker warm MODULE:FACTORY``) that builds its
    sampler once, samples once untimed, then times one sample per request; peak RSS is its
    ``VmHWM`` at each reply.

Why not ``ru_maxrss`` from ``wait4`` of our own child: Linux carries the high-water mark across
``execve`` (``exec_mmap`` folds the old mm's into ``signal->maxrss``), and the old mm of a
child forked (or vforked) from this benchmark is the benchmark's own, so every child would
report at least the benchmark's RSS.  ``VmHWM`` belongs to the new mm; GNU time forks from a
process of a megabyte or two.

``ExtensionGenerate`` (in ``bench.extension``) follows the same interface for the osquery
extension behind the Thrift stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(RuntimeError):
    """A method cannot run here yet (a plug-in that has not landed); the message says which."""


@dataclass
class Sample:
    """One timed run of one method."""

    ms: float
    rows: int
    rss_kb: int
    process_ms: Optional[float] = None  # a fresh interpreter's whole wall time, startup included
    cpu_ms: Optional[float] = None  # the measured process's CPU for this run, when known
    quiet: Optional[Tuple[int, int]] = None  # (namespaces left undumped, namespaces) of a sample


class Method:
    """A measured way of listing this host's sockets.  ``open``/``close`` bracket all rounds."""

    key = ""
    label = ""

    def describe(self) -> str:
        """The command line, for RESULTS.md."""
        raise NotImplementedError

    def open(self) -> None:
        """Start whatever persists across rounds; raises ``Unavailable``."""

    def measure(self) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        """Stop what ``open`` started."""


def run_timed(argv: Sequence[str], cwd: Optional[str] = None) -> Tuple[bytes, int, float]:
    """Run ``argv``, drain its stdout, reap it: (stdout, exit code, wall ms)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=cwd)
    assert proc.stdout is not None
    out = proc.stdout.read()
    code = proc.wait()
    elapsed = (time.perf_counter() - started) * 1000
    proc.stdout.close()
    return out, code, elapsed


GNU_TIME = "/usr/bin/time"


def peak_rss_kb(argv: Sequence[str]) -> int:
    """Peak RSS of one run of ``argv`` (GNU time's %M); 0 when GNU time is missing."""
    if not os.path.exists(GNU_TIME):
        return 0
    done = subprocess.run(
        [GNU_TIME, "-f", "%M", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


class Command(Method):
    def __init__(self, key: str, label: str, argv: Sequence[str]) -> None:
        self.key, self.label, self.argv = key, label, list(argv)

    def describe(self) -> str:
        return " ".join(self.argv)

    def measure(self) -> Sample:
        out, code, ms = run_timed(self.argv)
        if code != 0:
            raise RuntimeError(f"{self.describe()}: exit {code}")
        return Sample(ms=ms, rows=out.count(b"\n"), rss_kb=peak_rss_kb(self.argv))


def worker_argv(mode: str, target: str, cpu: bool = False) -> List[str]:
    return [sys.executable, "-m", "bench.worker", mode, target, *(["cpu"] if cpu else [])]


def _parse_reply(line: bytes, who: str) -> Dict[str, Any]:
    try:
        reply: Dict[str, Any] = json.loads(line)
    except ValueError:
        raise RuntimeError(f"{who}: unreadable reply {line[:200]!r}") from None
    if "unavailable" in reply:
        raise Unavailable(str(reply["unavailable"]))
    if "error" in reply:
        raise RuntimeError(f"{who}: {reply['error']}")
    return reply


def _quiet(reply: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    quiet = reply.get("quiet")
    return (int(quiet[0]), int(quiet[1])) if quiet else None


class ColdPython(Method):
    def __init__(self, key: str, label: str, target: str, cpu: bool = False) -> None:
        self.key, self.label, self.target, self.cpu = key, label, target, cpu

    def describe(self) -> str:
        return f"python -m bench.worker cold {self.target}" + (" cpu" if self.cpu else "")

    def open(self) -> None:
        self.measure()  # raises Unavailable early, and warms the page cache like ss's first run

    def measure(self) -> Sample:
        out, code, process_ms = run_timed(worker_argv("cold", self.target, self.cpu), REPO_ROOT)
        lines = out.strip().splitlines()
        if not lines:
            raise RuntimeError(f"{self.describe()}: exit {code} without a reply")
        reply = _parse_reply(lines[-1], self.describe())
        return Sample(
            ms=reply["ms"],
            rows=reply["rows"],
            rss_kb=reply["rss_kb"],
            process_ms=process_ms,
            quiet=_quiet(reply),
        )


class WarmPython(Method):
    def __init__(self, key: str, label: str, target: str, cpu: bool = False) -> None:
        self.key, self.label, self.target, self.cpu = key, label, target, cpu
        self._proc: Optional[subprocess.Popen[bytes]] = None

    def describe(self) -> str:
        return f"python -m bench.worker warm {self.target}" + (" cpu" if self.cpu else "")

    def _stdio(self) -> Tuple[IO[bytes], IO[bytes]]:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        return self._proc.stdin, self._proc.stdout

    def _reply(self) -> Dict[str, Any]:
        _, stdout = self._stdio()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"{self.describe()}: the worker exited")
        return _parse_reply(line, self.describe())

    def open(self) -> None:
        self._proc = subprocess.Popen(
            worker_argv("warm", self.target, self.cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        try:
            self._reply()  # {"ready": ...} after the untimed first sample
        except BaseException:
            self.close()
            raise

    def measure(self) -> Sample:
        stdin, _ = self._stdio()
        stdin.write(b"sample\n")
        stdin.flush()
        reply = self._reply()
        return Sample(
            ms=reply["ms"], rows=reply["rows"], rss_kb=reply["rss_kb"], quiet=_quiet(reply)
        )

    def close(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
