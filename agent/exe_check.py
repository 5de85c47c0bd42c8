"""What a process runs, proved from the file itself: the host's file at its path or not, its
SHA-256, and whether a package vouches for it.

``exe_status`` (a column of every record):

- ``mismatch``: the file ``/proc/PID/exe`` opens is not the file the host has at the path the
  link reads (device and inode differ; the host's view is ``/proc/1/root`` where the agent may
  read it, else its own): a private mount namespace (``unshare -rm`` and a bind mount) or a
  container put another file there.  ``path`` rules do not match.
- ``deleted``: the link reads ``PATH (deleted)``: the file was removed or replaced (an upgrade
  while the program ran, or a program that deleted itself).
- ``memory``: the program runs from memory (``/memfd:NAME (deleted)``, ``memfd_create(2)``).
- ``pending``: the path is the host's file; its digests are not computed yet (the reading
  budget below).
- ``packaged``: an installed package lists the path and the digest it recorded matches the
  file's (dpkg's MD5, rpm's SHA-256: ``agent.packages``); ``package`` names it.
- ``modified``: a package lists the path but the file's digest differs from the recorded one.
- ``unpackaged``: no package lists the path (or the package recorded no digest for it).
- "": unknown (the process was gone, or its executable unreadable: another user's process
  when the agent is not root).

Only ``pending``, ``packaged``, ``modified`` and ``unpackaged`` say the path is the host's file.

The digests are read through the descriptor that opening ``/proc/PID/exe`` gives, which is the
file the process runs whatever its mount namespace shows (``proc(5)``).  They are cached by
(device, inode, size, mtime), so a program is read once however many processes run it.
Reading is bounded by a byte budget (a token bucket: ``rate`` bytes a second, ``burst`` at
most at once); what does not fit waits for a later call (``advance``), and its rows read
``pending`` meanwhile; a file written to while it was read is read again under its new
(size, mtime).  Look-ups in the package databases are charged to the same budget.
"""

from __future__ import annotations

import collections
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Sequence, Tuple

from agent.packages import (
    MD5,
    SHA256,
    PackageDatabase,
    default_databases,
    merged_usr_alias,
    package_name,
)

PROC_ROOT = "/proc"

PACKAGED = "packaged"
MODIFIED = "modified"
UNPACKAGED = "unpackaged"
DELETED = "deleted"
MEMORY = "memory"
MISMATCH = "mismatch"
PENDING = "pending"
EXE_STATUSES = (PACKAGED, MODIFIED, UNPACKAGED, DELETED, MEMORY, MISMATCH, PENDING)
HOST_FILE_STATUSES = frozenset({PACKAGED, MODIFIED, UNPACKAGED, PENDING})
"""The statuses that say the executable is the file the host has at its path."""

FileKey = Tuple[int, int, int, int]
"""(device, inode, size, mtime in ns) of an executable."""

_DELETED_SUFFIX = " (deleted)"
_CHUNK = 256 << 10


@dataclass(frozen=True)
class ExeFacts:
    """What is known about one process's executable now."""

    status: str = ""
    sha256: str = ""
    package: str = ""
    key: Optional[FileKey] = None


UNKNOWN = ExeFacts()


def _md5() -> Any:
    try:
        return hashlib.md5(usedforsecurity=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # Python 3.8: no usedforsecurity
        return hashlib.md5()  # noqa: S324 - dpkg's own digest, compared, not trusted alone


class _Job:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.md5 = _md5()


class ExeChecker:
    """Checks executables against the host and hashes them within a byte budget.

    ``inspect(pid)`` answers at once (``pending`` while the digests wait); ``settle(facts,
    path)`` gives the final answer once :meth:`advance` (called by both) has read the file.
    Not thread-safe.  ``max_pending`` bounds the descriptors held by files waiting to be read;
    ``max_entries`` the digests kept.
    """

    def __init__(
        self,
        proc_root: str = PROC_ROOT,
        packages: Optional[Sequence[PackageDatabase]] = None,
        rate: int = 16 << 20,
        burst: int = 64 << 20,
        max_pending: int = 32,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        host_root: Optional[str] = None,
    ) -> None:
        self.proc_root = proc_root
        self.host_root = host_root if host_root is not None else default_host_root(proc_root)
        """Prefixed to a path to reach the host's file: ``/proc/1/root`` where it can be read
        (the init process's root: the host's, whatever mount namespace the agent runs in, such
        as a unit's ``PrivateTmp``), else "" (the agent's own view)."""
        self.packages = list(packages) if packages is not None else default_databases()
        self.rate = max(1, rate)
        self.burst = max(1, burst)
        self.max_pending = max(1, max_pending)
        self.max_entries = max(1, max_entries)
        self.clock = clock
        self.bytes_read = 0
        """Bytes read so far, file contents and package lists."""
        self._tokens = float(self.burst)
        self._last = clock()
        self._pending: Dict[FileKey, _Job] = {}
        self._order: Deque[FileKey] = collections.deque()
        self._digests: Dict[FileKey, Tuple[str, str]] = {}
        self._verdicts: Dict[Tuple[FileKey, str], Tuple[str, str]] = {}

    # -- the answers ------------------------------------------------------------------------------

    def inspect(self, pid: int, link: str) -> ExeFacts:
        """The facts of ``pid``'s executable, whose ``exe`` link read ``link`` (raw, with any
        `` (deleted)``); :data:`UNKNOWN` when it cannot be opened."""
        exe = f"{self.proc_root}/{pid}/exe"
        try:
            status = os.stat(exe)
        except OSError:
            return UNKNOWN
        key: FileKey = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        found = _where(link, key, self.host_root)
        if key not in self._digests and key not in self._pending:
            self._start(exe, key)
        self.advance()
        return self.settle(ExeFacts(status=found, key=key), _path_of(link))

    def settle(self, facts: ExeFacts, path: str) -> ExeFacts:
        """``facts`` completed with what is known now: the digest, and for a ``pending`` one
        its package's verdict."""
        if facts.key is None or (facts.sha256 and facts.status != PENDING):
            return facts
        digests = self._digests.get(facts.key)
        if digests is None:
            return facts
        if facts.status != PENDING:
            return ExeFacts(facts.status, digests[0], "", facts.key)
        status, package = self._verdict(facts.key, path, digests)
        return ExeFacts(status, digests[0], package, facts.key)

    def waiting(self, key: Optional[FileKey]) -> bool:
        """Whether the file ``key`` is queued to be read."""
        return key is not None and key in self._pending

    # -- reading within the budget ----------------------------------------------------------------

    def _start(self, exe: str, key: FileKey) -> None:
        if len(self._pending) >= self.max_pending:
            return  # asked again at a later look-up
        try:
            handle = open(exe, "rb")  # noqa: SIM115 - kept open until the file is read
        except OSError:
            return
        if _key_of(handle) != key:
            handle.close()  # the process exec'd since the stat: asked again later
            return
        self._pending[key] = _Job(handle)
        self._order.append(key)

    def advance(self) -> int:
        """Read queued files while the budget allows, a chunk (256 KiB at most) of each in
        turn; the bytes read."""
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        done = 0
        while self._order and self._tokens > 0:
            key = self._order[0]
            job = self._pending[key]
            try:
                chunk = job.handle.read(int(min(_CHUNK, self._tokens)) or 1)
            except OSError:
                chunk = None
            if chunk:
                job.sha256.update(chunk)
                job.md5.update(chunk)
                self._tokens -= len(chunk)
                done += len(chunk)
                self._order.rotate(-1)  # a chunk each in turn: a huge file delays no other
                continue
            self._order.popleft()
            del self._pending[key]
            unchanged = chunk is not None and _key_of(job.handle) == key
            job.handle.close()
            if unchanged:  # the end of a file that was not written to while it was read
                if len(self._digests) >= self.max_entries:
                    self._digests.clear()
                    self._verdicts.clear()
                self._digests[key] = (job.sha256.hexdigest(), job.md5.hexdigest())
        self.bytes_read += done
        return done

    def _verdict(self, key: FileKey, path: str, digests: Tuple[str, str]) -> Tuple[str, str]:
        """(status, package) for the host's file ``path`` whose (SHA-256, MD5) are
        ``digests``; (``pending``, "") while a look-up it needs waits for the budget."""
        cached = self._verdicts.get((key, path))
        if cached is not None:
            return cached
        computed = {SHA256: digests[0], MD5: digests[1]}
        verdict = (UNPACKAGED, "")
        candidates = [c for c in (path, merged_usr_alias(path)) if c]
        if self._tokens <= 0 and not all(
            database.known(c) for database in self.packages for c in candidates
        ):
            return (PENDING, "")
        for database in self.packages:
            for candidate in candidates:
                if candidate != path and not _same_file(self.host_root + candidate, key):
                    continue
                stem, worked = database.owner(candidate)
                if worked:
                    self._tokens -= database.cost
                    self.bytes_read += database.cost
                if not stem:
                    continue
                algorithm, recorded = database.digest(stem, candidate)
                if recorded and algorithm in computed:
                    status = PACKAGED if recorded == computed[algorithm] else MODIFIED
                    verdict = (status, package_name(stem))
                    break
            if verdict[1]:
                break
        if len(self._verdicts) >= self.max_entries:
            self._verdicts.clear()
        self._verdicts[(key, path)] = verdict
        return verdict

    def close(self) -> None:
        """Let go of the files still waiting to be read."""
        for job in self._pending.values():
            job.handle.close()
        self._pending.clear()
        self._order.clear()


def default_host_root(proc_root: str = PROC_ROOT) -> str:
    """``PROC_ROOT/1/root`` when the agent may look through it (root with ``CAP_SYS_PTRACE``
    over pid 1, ``proc(5)``), else "": the agent's own view of the file system."""
    candidate = f"{proc_root}/1/root"
    try:
        os.stat(candidate + "/")
    except OSError:
        return ""
    return candidate


def _key_of(handle: Any) -> Optional[FileKey]:
    try:
        status = os.fstat(handle.fileno())
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _path_of(link: str) -> str:
    return link[: -len(_DELETED_SUFFIX)] if link.endswith(_DELETED_SUFFIX) else link


def _same_file(path: str, key: FileKey) -> bool:
    try:
        status = os.stat(path)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == key[:2]


def _where(link: str, key: FileKey, host_root: str) -> str:
    """``memory``, ``deleted`` or ``mismatch`` when the link's path is not the host's file
    (``key``; the host's path is ``host_root`` + the path), else ``pending``."""
    if link.startswith("/memfd:"):
        return MEMORY
    if not link.startswith("/"):
        return MISMATCH  # anon_inode or anything else that is no path
    if _same_file(host_root + link, key):
        return PENDING
    if link.endswith(_DELETED_SUFFIX):
        return DELETED
    return MISMATCH
