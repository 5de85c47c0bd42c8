"""Who a process is: name, executable, command line, user, parent, container, systemd unit.

Identity comes from psutil (``Process.oneshot()``, one read of each /proc file) and, on Linux,
from ``/proc/PID/cgroup`` (``Documentation/admin-guide/cgroup-v2.rst``, "Processes"; the v1
format is ``hierarchy-ID:controller-list:cgroup-path`` and v2 has the single line ``0::PATH``).
It is looked up only for processes that own a socket worth reporting, and cached by
(pid, start time), which names one process instance: a recycled pid has another start time.

A process that vanishes or hides (another user's process when not root) yields what could be
read, possibly nothing but its pid, never an exception.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Tuple

import psutil

from agent.procnet import PROC_ROOT

_PROCESS_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:egress-agent:process")

_CONTAINER_COMPONENT = re.compile(
    r"(?:(?:docker|cri-containerd|containerd|crio|cri-o|libpod|nerdctl)-)?([0-9a-f]{64})"
)
"""A cgroup path component that names a container (after dropping a ``.scope`` suffix):
docker (``docker-ID.scope`` with the systemd driver, ``/docker/ID`` with cgroupfs),
containerd (``cri-containerd-ID.scope``, ``/k8s.io/ID``), cri-o (``crio-ID.scope``, ``crio-ID``),
podman (``libpod-ID.scope``), nerdctl, and kubepods with cgroupfs (``/kubepods/.../podUID/ID``).
The monitors (``crio-conmon-ID``, ``libpod-conmon-ID``) are outside the container: no match."""

_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
"""systemd unit types whose cgroups hold processes (``systemd.unit(5)``); slices only nest."""


def _cgroup_paths(text: str) -> List[Tuple[str, str]]:
    """(controllers, path) for each well-formed line of a ``/proc/PID/cgroup`` file."""
    entries = []
    for line in text.split("\n"):
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            entries.append((parts[1], parts[2]))
    return entries


def container_id_from_cgroup(text: str) -> str:
    """The container id (64 hex digits) in a ``/proc/PID/cgroup`` text, or "" when none.

    Looks through every hierarchy, deepest component first, so podman's ``.../libpod-ID.scope/
    container`` and kubepods' ``.../podUID/ID`` both yield ID.
    """
    for _, path in _cgroup_paths(text):
        for component in reversed(path.split("/")):
            if component.endswith(".scope"):
                component = component[: -len(".scope")]
            match = _CONTAINER_COMPONENT.fullmatch(component)
            if match:
                return match.group(1)
    return ""


def systemd_unit_from_cgroup(text: str) -> str:
    """The systemd unit (``nginx.service``, ``session-3.scope``) a process runs in, or "".

    Read from the systemd hierarchy: the ``name=systemd`` line on cgroup v1 (legacy and hybrid),
    else the unified ``0::`` line; the deepest component that is a unit names it.
    """
    entries = _cgroup_paths(text)
    systemd = [path for controllers, path in entries if controllers == "name=systemd"]
    unified = [path for controllers, path in entries if controllers == ""]
    for path in systemd + unified:
        for component in reversed(path.split("/")):
            if component.endswith(_UNIT_SUFFIXES):
                return component
    return ""


def read_boot_id(proc_root: str = PROC_ROOT) -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``, random per boot); off Linux, the
    boot time, which is as stable."""
    try:
        with open(f"{proc_root}/sys/kernel/random/boot_id", "rb") as handle:
            return handle.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return f"boot-time-{psutil.boot_time():.0f}"


def process_uuid(boot_id: str, pid: int, start: str) -> str:
    """A UUID (RFC 4122 version 5) naming one process instance on one boot."""
    return str(uuid.uuid5(_PROCESS_UUID_NAMESPACE, f"{boot_id}/{pid}/{start}"))


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


NO_OWNER = Identity()
"""The identity of a socket whose owner is unknown (pid -1), as osquery reports it."""


class IdentityCache:
    """Process identities keyed by (pid, start time), bounded to ``max_entries``.

    ``lookup`` reads one small file (``/proc/PID/stat``) on a hit and queries psutil on a miss.
    Entries of processes that are gone are dropped by :meth:`prune`, which ``lookup`` calls
    when the cache is full; the oldest entries go next if that is not enough.
    """

    def __init__(
        self, proc_root: str = PROC_ROOT, max_entries: int = 4096, boot_id: Optional[str] = None
    ) -> None:
        self.proc_root = proc_root
        self.max_entries = max(1, max_entries)
        self.boot_id = boot_id if boot_id is not None else read_boot_id(proc_root)
        self.hits = 0
        self.misses = 0
        self._entries: Dict[Tuple[int, str], Identity] = {}

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
            return cached
        self.misses += 1
        identity = self._read(pid, start)
        if len(self._entries) >= self.max_entries:
            self.prune()
        self._entries[key] = identity
        return identity

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
        try:
            return repr(psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def _read(self, pid: int, start: str) -> Identity:
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
        return Identity(
            pid=pid,
            name=str(values.get("name", "")),
            path=str(values.get("path", "")),
            cmdline=str(values.get("cmdline", "")),
            uid=_optional_int(values.get("uid")),
            username=str(values.get("username", "")),
            parent=_optional_int(values.get("parent")),
            process_start_time=_optional_int(values.get("process_start_time")),
            process_uuid=process_uuid(self.boot_id, pid, start),
            container_id=container_id_from_cgroup(cgroup),
            systemd_unit=systemd_unit_from_cgroup(cgroup),
        )

    def _read_cmdline(self, pid: int, process: psutil.Process) -> str:
        """The command line, arguments joined by spaces.  On Linux read as bytes from
        ``/proc/PID/cmdline`` (NUL-separated, ``proc(5)``): psutil opens it in text mode,
        whose newline translation turns a ``\\r`` in an argument into ``\\n``."""
        try:
            with open(f"{self.proc_root}/{pid}/cmdline", "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            if os.path.isdir(self.proc_root):
                raise
            return " ".join(process.cmdline())
        if data.endswith(b"\0"):
            data = data[:-1]
        return os.fsdecode(data.replace(b"\0", b" "))

    def _read_cgroup(self, pid: int) -> str:
        try:
            with open(f"{self.proc_root}/{pid}/cgroup", "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _optional_int(value: object) -> Optional[int]:
    return value if isinstance(value, int) else None
