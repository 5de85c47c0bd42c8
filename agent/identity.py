"""Who a process is: name, executable, command line, user, parent, container, systemd unit,
and what proves the executable.

On Linux, identity is read from ``/proc/PID/{stat,status,cmdline,exe,cgroup}`` (``proc(5)``)
exactly as psutil reads it (the same name, cmdline, exe, uid, username and create time, see
:func:`read_linux_identity`), without importing psutil: a fresh ``egress-agent check`` would
otherwise spend more time importing psutil than sampling.  Elsewhere psutil answers
(``Process.oneshot()``).  Three parts are read by modules of their own, so that what a local
user can forge stays apart from what they cannot:

- placement (:mod:`agent.cgroups`): the system manager's unit apart from a user manager's
  (``systemd_unit``, ``user_unit``), a runtime's container apart from one a user's subtree
  claims (``container_id``, ``rootless_container_id``, ``rootless_uid``);
- the executable (:mod:`agent.exe_check`): the host's file at ``path`` or not, its SHA-256 and
  package (``exe_status``, ``sha256``, ``package``), digests read within a byte budget, so a
  row may read ``pending`` first and be completed by :meth:`IdentityCache.settle`;
- the command line, kept to :data:`CMDLINE_MAX_BYTES` with :data:`CMDLINE_CUT_MARK` where cut
  (ARG_MAX allows 2 MiB; the cache, the event log and each history row keep this bound).

It is looked up only for processes that own a socket worth reporting, and cached by
(pid, start time), which names one process instance: a recycled pid has another start time.

A process that vanishes or hides (another user's process when not root) yields what could be
read, possibly nothing but its pid, never an exception.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, List, Optional, Tuple

from agent.cgroups import NOWHERE, Placement, placement
from agent.collect.netns import PROC_ROOT
from agent.exe_check import UNKNOWN, ExeChecker, ExeFacts, FileKey
from agent.who import NO_WHO, Who, WhoReader

if TYPE_CHECKING:
    import psutil  # imported where used: only off Linux (see the module's docstring)


def read_boot_id(proc_root: str = PROC_ROOT) -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``, random per boot); off Linux, the
    boot time, which is as stable."""
    try:
        with open(f"{proc_root}/sys/kernel/random/boot_id", "rb") as handle:
            return handle.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        import psutil

        return f"boot-time-{psutil.boot_time():.0f}"


_NAMESPACE_URL = bytes.fromhex("6ba7b8119dad11d180b400c04fd430c8")
"""RFC 4122 appendix C: the name space ID for URLs (``uuid.NAMESPACE_URL``)."""


@functools.lru_cache(maxsize=None)
def _sha1() -> Callable[[bytes], Any]:
    """SHA-1 without hashlib's OpenSSL start-up (several ms of a fresh ``check``): CPython's
    built-in ``_sha1`` where there is one; a UUID needs no certified digest."""
    try:
        from _sha1 import sha1  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        from hashlib import sha1
    found: Callable[[bytes], Any] = sha1
    return found


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))`` (RFC 4122 section 4.3), spelled out."""
    digest = bytearray(_sha1()(namespace + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


@functools.lru_cache(maxsize=None)
def _process_uuid_namespace() -> bytes:
    return bytes.fromhex(_uuid5(_NAMESPACE_URL, "urn:egress-agent:process").replace("-", ""))


def process_uuid(boot_id: str, pid: int, start: str) -> str:
    """A UUID (RFC 4122 version 5) naming one process instance on one boot."""
    return _uuid5(_process_uuid_namespace(), f"{boot_id}/{pid}/{start}")


@dataclass(frozen=True)
class Identity:
    """The process columns of a :class:`agent.records.Connection`, under the same names."""

    pid: int = -1
    name: str = ""
    path: str = ""
    cmdline: str = ""
    uid: Optional[int] = None
    username: str = ""
    parent: Optional[int] = None
    process_start_time: Optional[int] = None
    process_uuid: str = ""
    container_id: str = ""
    systemd_unit: str = ""
    user_unit: str = ""
    rootless_container_id: str = ""
    rootless_uid: Optional[int] = None
    exe_status: str = ""
    sha256: str = ""
    package: str = ""
    who: Who = NO_WHO
    """Login user, parents, the container's names (:mod:`agent.who`)."""
    exe_key: Optional[FileKey] = field(default=None, compare=False, repr=False)
    """The executable's (device, inode, size, mtime): what :meth:`IdentityCache.settle` looks
    its digests up by.  Not a column."""

    def after_exec(self, path: str, name: str) -> Identity:
        """This identity after an ``exec`` of ``path`` that ``/proc`` could not be read for:
        the new program is unproved (no digests, no status, so no ``path``, ``sha256`` or
        ``package`` rule matches it) and its command line unknown."""
        return dataclasses.replace(
            self,
            name=name,
            path=path,
            cmdline="",
            exe_status="",
            sha256="",
            package="",
            exe_key=None,
        )


NO_OWNER = Identity()
"""The identity of a socket whose owner is unknown (pid -1), as osquery reports it."""


class IdentityCache:
    """Process identities keyed by (pid, start time), bounded to ``max_entries``.

    ``lookup`` reads one small file (``/proc/PID/stat``) on a hit and queries psutil on a miss.
    Entries of processes that are gone are dropped by :meth:`prune`, which ``lookup`` calls
    when the cache is full; the oldest entries go next if that is not enough.  ``exe`` checks
    executables (one of its own when not given; only on Linux).
    """

    def __init__(
        self,
        proc_root: str = PROC_ROOT,
        max_entries: int = 4096,
        boot_id: Optional[str] = None,
        exe: Optional[ExeChecker] = None,
        who: Optional[WhoReader] = None,
    ) -> None:
        self.proc_root = proc_root
        self.who = who if who is not None else WhoReader(proc_root)
        self.max_entries = max(1, max_entries)
        self.boot_id = boot_id if boot_id is not None else read_boot_id(proc_root)
        self.hits = 0
        self.misses = 0
        self._entries: Dict[Tuple[int, str], Identity] = {}
        self._linux = os.path.isfile(f"{proc_root}/self/stat") or (
            proc_root != PROC_ROOT and os.path.isdir(proc_root)
        )
        self._usernames: Dict[int, str] = {}
        self._boot_time: Optional[float] = None
        self.exe: Optional[ExeChecker] = exe
        if exe is None and self._linux:
            self.exe = ExeChecker(proc_root)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, pid: int) -> Identity:
        """The identity of ``pid`` now; ``Identity(pid=pid)`` when it is gone or unreadable."""
        if pid <= 0:
            return NO_OWNER
        start = self._start_time_key(pid)
        if start is None:
            return Identity(pid=pid)
        key = (pid, start)
        cached = self._entries.get(key)
        if cached is not None:
            self.hits += 1
            settled = self.settle(cached)
            if settled is not cached:
                self._entries[key] = settled
            return settled
        self.misses += 1
        identity = self._read_linux(pid, start) if self._linux else self._read(pid, start)
        if len(self._entries) >= self.max_entries:
            self.prune()
        self._entries[key] = identity
        return identity

    def settle(self, identity: Identity) -> Identity:
        """``identity`` with its executable's digests and verdict when they are known by now
        (the same object when nothing changed).  Spends the reading budget first; a file that
        was not queued (the queue was full) is queued again while its process lives."""
        exe = self.exe
        key = identity.exe_key
        if exe is None or key is None or (identity.sha256 and identity.exe_status != "pending"):
            return identity
        exe.advance()
        facts = exe.settle(ExeFacts(identity.exe_status, "", "", key), identity.path)
        if not facts.sha256 and not exe.waiting(key) and identity.pid > 0:
            link = _read_link(f"{self.proc_root}/{identity.pid}/exe")
            again = exe.inspect(identity.pid, link) if link else UNKNOWN
            if again.key == key:
                facts = exe.settle(ExeFacts(identity.exe_status, "", "", key), identity.path)
        if not facts.sha256 or (facts.sha256, facts.status) == (
            identity.sha256,
            identity.exe_status,
        ):
            return identity
        return dataclasses.replace(
            identity, exe_status=facts.status, sha256=facts.sha256, package=facts.package
        )

    def forget(self, pid: int) -> None:
        """Drop what is cached for ``pid``: after an ``exec`` the process keeps its pid and
        start time (the cache key) but has a new name, executable and command line.  (An
        entry of an earlier process with this pid is never returned again: its start time
        differs; :meth:`prune` drops it.)"""
        start = self._start_time_key(pid)
        if start is not None:
            self._entries.pop((pid, start), None)

    def prune(self, live_pids: Optional[Collection[int]] = None) -> int:
        """Drop the entries of processes that are gone (not in ``live_pids`` when given, else
        whose start time no longer matches), then the oldest while over three quarters full.
        Returns how many entries went."""
        before = len(self._entries)
        if live_pids is not None:
            alive = set(live_pids)
            self._entries = {k: v for k, v in self._entries.items() if k[0] in alive}
        else:
            self._entries = {
                k: v for k, v in self._entries.items() if self._start_time_key(k[0]) == k[1]
            }
        excess = len(self._entries) - (self.max_entries * 3) // 4
        if excess > 0:
            for key in list(self._entries)[:excess]:
                del self._entries[key]
        return before - len(self._entries)

    def _start_time_key(self, pid: int) -> Optional[str]:
        """The process's start time as the kernel counts it (clock ticks since boot, field 22
        of ``/proc/PID/stat``, ``proc(5)``); off Linux, psutil's create time."""
        try:
            with open(f"{self.proc_root}/{pid}/stat", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return self._psutil_start_time_key(pid)
        except OSError:
            return None
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) < 20:
            return None
        return fields[19].decode("ascii", "replace")

    def _psutil_start_time_key(self, pid: int) -> Optional[str]:
        if os.path.isdir(self.proc_root):
            return None  # a Linux /proc without this pid: the process is gone
        import psutil

        try:
            return repr(psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def _read_linux(self, pid: int, start: str) -> Identity:
        """:func:`read_linux_identity` plus what this cache knows: usernames, boot time."""
        found = read_linux_identity(pid, self.proc_root)
        if found is None:
            return Identity(pid=pid)
        name, path, cmdline, uid, parent, start_ticks = found
        username = ""
        if uid is not None:
            username = self._usernames.get(uid, "")
            if not username:
                username = self._usernames[uid] = _username(uid)
        start_time = None
        if start_ticks is not None:
            if self._boot_time is None:
                self._boot_time = _boot_time(self.proc_root)
            if self._boot_time is not None:
                start_time = int(start_ticks / _clock_ticks() + self._boot_time)
        facts = UNKNOWN
        if self.exe is not None:
            link = _read_link(f"{self.proc_root}/{pid}/exe")
            if link:
                facts = self.exe.inspect(pid, link)
        cgroup = self._read_cgroup(pid)
        where = placement(cgroup)
        return _identity(
            Identity(
                pid=pid,
                name=name,
                path=path,
                cmdline=cmdline,
                uid=uid,
                username=username,
                parent=parent,
                process_start_time=start_time,
                process_uuid=process_uuid(self.boot_id, pid, start),
                who=self.who.read(pid, where.container_id, cgroup),
            ),
            where,
            facts,
        )

    def _read(self, pid: int, start: str) -> Identity:
        import psutil

        try:
            process = psutil.Process(pid)
        except psutil.Error:
            return Identity(pid=pid)
        values: Dict[str, object] = {}
        with process.oneshot():
            readers = (
                ("name", process.name),
                ("path", process.exe),
                ("cmdline", lambda: self._read_cmdline(pid, process)),
                ("uid", lambda: process.uids().real),
                ("username", process.username),
                ("parent", process.ppid),
                ("process_start_time", lambda: int(process.create_time())),
            )
            for column, read in readers:
                try:
                    values[column] = read()
                except (psutil.Error, OSError, KeyError, ValueError):
                    continue
        cgroup = self._read_cgroup(pid)
        where = placement(cgroup) if cgroup else NOWHERE
        return _identity(
            Identity(
                pid=pid,
                name=str(values.get("name", "")),
                path=str(values.get("path", "")),
                cmdline=str(values.get("cmdline", "")),
                uid=_optional_int(values.get("uid")),
                username=str(values.get("username", "")),
                parent=_optional_int(values.get("parent")),
                process_start_time=_optional_int(values.get("process_start_time")),
                process_uuid=process_uuid(self.boot_id, pid, start),
                who=self.who.read(pid, where.container_id, cgroup) if cgroup else NO_WHO,
            ),
            where,
            UNKNOWN,
        )

    def _read_cmdline(self, pid: int, process: psutil.Process) -> str:
        """The command line, arguments joined by spaces.  On Linux read as bytes from
        ``/proc/PID/cmdline`` (NUL-separated, ``proc(5)``): psutil opens it in text mode,
        whose newline translation turns a ``\\r`` in an argument into ``\\n``."""
        try:
            with open(f"{self.proc_root}/{pid}/cmdline", "rb") as handle:
                return _command_line(handle.read(_CMDLINE_READ))
        except FileNotFoundError:
            if os.path.isdir(self.proc_root):
                raise
            return bounded_cmdline(" ".join(process.cmdline()))

    def _read_cgroup(self, pid: int) -> str:
        try:
            with open(f"{self.proc_root}/{pid}/cgroup", "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _identity(base: Identity, where: Placement, facts: ExeFacts) -> Identity:
    """``base`` with its placement and its executable's facts."""
    return dataclasses.replace(
        base,
        container_id=where.container_id,
        systemd_unit=where.systemd_unit,
        user_unit=where.user_unit,
        rootless_container_id=where.rootless_container_id,
        rootless_uid=where.rootless_uid,
        exe_status=facts.status,
        sha256=facts.sha256,
        package=facts.package,
        exe_key=facts.key,
    )


def _optional_int(value: object) -> Optional[int]:
    return value if isinstance(value, int) else None


CMDLINE_MAX_BYTES = 4096
"""The most of a command line kept: ARG_MAX lets one be 2 MiB, and it would be kept in the
identity cache, the event log and every history row of the process."""
CMDLINE_CUT_MARK = " ...[cut]"
"""Appended to a command line that was longer than :data:`CMDLINE_MAX_BYTES`."""


def bounded_cmdline(text: str) -> str:
    """``text`` within :data:`CMDLINE_MAX_BYTES` (encoded as the file system's names), marked when
    cut."""
    data = os.fsencode(text)
    if len(data) <= CMDLINE_MAX_BYTES:
        return text
    return os.fsdecode(data[:CMDLINE_MAX_BYTES]) + CMDLINE_CUT_MARK


_CMDLINE_READ = CMDLINE_MAX_BYTES + 2
"""Bytes of ``/proc/PID/cmdline`` read: the bound, the closing NUL, and one to tell a longer
command line from one exactly at the bound."""

LinuxIdentity = Tuple[str, str, str, Optional[int], Optional[int], Optional[float]]
"""(name, path, cmdline, real uid, parent pid, start time in clock ticks since boot)"""

_FS_ENCODING = sys.getfilesystemencoding()
_COMM_LENGTH = 15
"""TASK_COMM_LEN - 1: the kernel keeps only this many bytes of a name."""


def read_linux_identity(pid: int, proc_root: str = PROC_ROOT) -> Optional[LinuxIdentity]:
    """A process's identity from its /proc files, as psutil 5.9-7.x reads them on Linux.

    ``name``: the ``comm`` in ``stat``; when it fills all 15 bytes the kernel keeps and the
    basename of ``argv[0]`` starts with it, that basename (psutil's ``Process.name``).
    ``cmdline``: the NUL-separated arguments joined with spaces; a process that rewrote its
    arguments with spaces (setproctitle) is split on spaces (psutil issue 1179); only the
    first :data:`CMDLINE_MAX_BYTES` are read, and a longer one ends in
    :data:`CMDLINE_CUT_MARK`.  ``path``: the ``exe`` link without a bogus `` (deleted)``;
    "" when unreadable (another user's process).  Text is decoded as psutil does (file system
    encoding, surrogateescape).  None when the process is gone (no ``stat``).
    """
    base = f"{proc_root}/{pid}"
    try:
        with open(f"{base}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    opening, closing = stat.find(b"("), stat.rfind(b")")
    name = stat[opening + 1 : closing].decode(_FS_ENCODING, "surrogateescape")
    fields = stat[closing + 2 :].split()
    parent = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
    start_ticks = float(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None
    raw = _read_or_empty(f"{base}/cmdline", _CMDLINE_READ)
    arguments = _cmdline(raw)
    if len(name) >= _COMM_LENGTH and arguments:
        extended = os.path.basename(arguments[0])
        if extended.startswith(name):
            name = extended
    return (
        name,
        _exe(f"{base}/exe"),
        _command_line(raw),
        _real_uid(_read_or_empty(f"{base}/status")),
        parent,
        start_ticks,
    )


def _read_or_empty(path: str, limit: int = -1) -> bytes:
    """The file's bytes (at most ``limit`` when given), or b"" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except OSError:
        return b""


def _read_link(path: str) -> str:
    """A link's target as the kernel gives it, or "" when it cannot be read."""
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _command_line(data: bytes) -> str:
    """The arguments in the first :data:`_CMDLINE_READ` bytes of ``/proc/PID/cmdline``, joined
    by spaces and bounded as :func:`bounded_cmdline` bounds psutil's."""
    return bounded_cmdline(" ".join(_cmdline(data)))


def _cmdline(data: bytes) -> List[str]:
    """The arguments in ``cmdline`` bytes as psutil splits them; a read cut at
    :data:`_CMDLINE_READ` keeps its last argument, partial."""
    if len(data) >= _CMDLINE_READ:
        data += b"\0"
    text = data.decode(_FS_ENCODING, "surrogateescape")
    if not text:
        return []
    separator = "\x00" if text.endswith("\x00") else " "
    if text.endswith(separator):
        text = text[:-1]
    arguments = text.split(separator)
    if separator == "\x00" and len(arguments) == 1 and " " in text:
        arguments = text.split(" ")
    return arguments


def _exe(path: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return ""
    target = target.split("\x00")[0]
    if target.endswith(" (deleted)") and not os.path.exists(target):
        target = target[: -len(" (deleted)")]
    return target


def _real_uid(status: bytes) -> Optional[int]:
    for line in status.split(b"\n"):
        if line.startswith(b"Uid:"):
            fields = line.split()
            if len(fields) > 1 and fields[1].isdigit():
                return int(fields[1])
    return None


def _username(uid: int) -> str:
    """The user name of ``uid``, or the number when no user has it (as psutil answers)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _boot_time(proc_root: str) -> Optional[float]:
    """``btime`` of ``/proc/stat``: the boot time in seconds since the epoch."""
    for line in _read_or_empty(f"{proc_root}/stat").split(b"\n"):
        if line.startswith(b"btime"):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


@functools.lru_cache(maxsize=None)
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")
