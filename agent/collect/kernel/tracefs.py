"""A private tracing instance of the agent's own under tracefs: find, create, configure, remove.

A directory made under ``instances/`` is a tracer of its own: its own ring buffer, enabled
events, event filters, clock and ``tracing_on`` (``Documentation/trace/ftrace.rst``, "Instances").
The agent makes one named for itself and its pid (``egress-agent-<pid>``), writes only inside
it, and removes it when done.  It never writes a top-level tracing file nor another tool's
instance; the only thing outside its instance it may do is mount tracefs where none is mounted.

Another tool can still reset every instance (``trace-cmd reset -a`` disables their events and
clears their filters) or try to remove it: the kernel refuses ``rmdir`` of an instance while
any of its files is open (``instance_rmdir`` -> ``__remove_instance`` returns ``-EBUSY`` while the
trace array has references), so the reader keeps its per-CPU files open, and
:meth:`Instance.verify` notices a reset and applies the settings again.  An instance left by a
killed agent (its pid dead, or reused by a process started after the instance was made) is
removed by :func:`remove_stale_instances` before a new one is made.

Raises :class:`EventsUnavailable` (with a :attr:`~EventsUnavailable.reason`) for everything that
means "use sampling instead": no tracefs, lockdown, not root, an event this kernel lacks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

TRACEFS_PATHS: Tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
"""Where tracefs lives: its own mount point since Linux 4.1, else under debugfs (where the
kernel automounts it when debugfs is mounted)."""

INSTANCE_PREFIX = "egress-agent"
LOCKDOWN_PATH = "/sys/kernel/security/lockdown"
MOUNTS_PATH = "/proc/self/mounts"

CLOCKS: Tuple[str, ...] = ("boot", "mono")
"""Trace clocks we can convert to unix time, best first.  ``boot`` (Linux 4.10+) is
``CLOCK_BOOTTIME``: global across CPUs (so per-CPU streams merge in order, which the default
``local`` clock does not promise), counting suspend like ``/proc/PID/stat`` start times do.
``mono`` (``CLOCK_MONOTONIC``, 3.10+) is the fallback.  Both are NMI-safe fast clocks
(``kernel/trace/trace.c``: ``trace_clocks[]``)."""

STALE_SLACK_S = 2.0
"""A live pid counts as the owner of an instance unless its process started more than this
after the instance was made: the directory's ctime has whole seconds, ``btime`` too."""


class EventsUnavailable(Exception):
    """Kernel events cannot be had here; the caller samples instead.

    ``reason`` is one of the constants below, ``detail`` says what exactly failed.  One log
    line of ``str(error)`` is what an operator needs.
    """

    NO_TRACEFS = "no-tracefs"
    """tracefs is not mounted and could not be mounted (not built in, an unprivileged container
    such as LXC, or a distribution without it such as Talos)."""
    LOCKDOWN = "lockdown"
    """``lockdown=confidentiality`` denies tracefs (``security_locked_down(LOCKDOWN_TRACEFS)``)."""
    NOT_ROOT = "not-root"
    """Not root (or without CAP_SYS_ADMIN): tracefs files are root's."""
    EVENT_MISSING = "event-missing"
    """This kernel lacks an event the source cannot do without (or a field of it)."""
    FAILED = "failed"
    """Anything else the kernel refused (the detail has its error)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def lockdown_mode(path: str = LOCKDOWN_PATH) -> str:
    """The kernel lockdown mode (``none``, ``integrity``, ``confidentiality``), "" if unknown.

    ``/sys/kernel/security/lockdown`` lists the modes with the active one in brackets
    (``security/lockdown/lockdown.c``, Linux 5.4+; RHEL 8 backports it)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return ""
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else ""


def _unavailable(error: OSError, what: str) -> EventsUnavailable:
    """The :class:`EventsUnavailable` that an OSError while doing ``what`` means."""
    detail = f"{what}: {error.strerror or error}"
    if error.errno in (errno.EPERM, errno.EACCES):
        if os.geteuid() != 0:
            return EventsUnavailable(EventsUnavailable.NOT_ROOT, detail)
        if lockdown_mode() == "confidentiality":
            return EventsUnavailable(EventsUnavailable.LOCKDOWN, detail)
    return EventsUnavailable(EventsUnavailable.FAILED, detail)


def _tracefs_mounts(mounts_path: str) -> List[str]:
    """Mount points of tracefs in ``/proc/self/mounts`` (``proc(5)``: octal escapes)."""
    try:
        with open(mounts_path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().split("\n")
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 2 and fields[2] == "tracefs":
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    return points


def _usable(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "instances")) and os.path.isfile(
        os.path.join(path, "events", "header_page")
    )


def _mount_tracefs(target: str) -> None:
    """``mount -t tracefs nodev TARGET`` through libc.  Raises OSError."""
    import ctypes  # only here: a few milliseconds to import

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", os.fsencode(target), b"tracefs", 0, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def find_tracefs(
    paths: Sequence[str] = TRACEFS_PATHS,
    mount: bool = True,
    mounts_path: str = MOUNTS_PATH,
    mounter: Callable[[str], None] = _mount_tracefs,
) -> str:
    """The directory where tracefs is mounted, mounting it at ``paths[0]`` when it is nowhere
    and ``mount`` is true (root only).

    Looks at the usual ``paths`` first, then at any tracefs mount point.  Raises
    :class:`EventsUnavailable`: NO_TRACEFS when none is there and it cannot be mounted,
    NOT_ROOT / LOCKDOWN when the kernel refuses us.
    """
    mounted = _tracefs_mounts(mounts_path)
    for path in [*paths, *mounted]:
        try:
            if _usable(path):
                return path
        except OSError as error:
            raise _unavailable(error, path) from error
    if lockdown_mode() == "confidentiality":
        raise EventsUnavailable(
            EventsUnavailable.LOCKDOWN, "kernel lockdown=confidentiality hides tracefs"
        )
    if not mount:
        raise EventsUnavailable(EventsUnavailable.NO_TRACEFS, "tracefs is not mounted")
    if os.geteuid() != 0:
        raise EventsUnavailable(
            EventsUnavailable.NOT_ROOT, "tracefs is not mounted and only root may mount it"
        )
    target = paths[0]
    if not os.path.isdir(target):
        raise EventsUnavailable(
            EventsUnavailable.NO_TRACEFS, f"tracefs is not mounted and {target} does not exist"
        )
    try:
        mounter(target)
    except OSError as error:
        reason = EventsUnavailable.NO_TRACEFS
        if error.errno == errno.EPERM and lockdown_mode() == "confidentiality":
            reason = EventsUnavailable.LOCKDOWN
        raise EventsUnavailable(
            reason, f"cannot mount tracefs on {target}: {error.strerror}"
        ) from error
    if not _usable(target):
        raise EventsUnavailable(
            EventsUnavailable.NO_TRACEFS, f"{target}: mounted tracefs shows no instances/"
        )
    return target


# ---------------------------------------------------------------------------------------------
# instances


class EventSetting(NamedTuple):
    """One event to enable, with the kernel filters to try, best first ("" = none).

    A kernel may refuse a filter (an older parser, a field it lacks): the next one is tried,
    and the caller filters again in user space anyway."""

    system: str
    name: str
    filters: Tuple[str, ...] = ("",)


class InstanceSettings(NamedTuple):
    """What :meth:`Instance.apply` sets up and :meth:`Instance.verify` keeps."""

    events: Tuple[EventSetting, ...]
    buffer_size_kb: int = 1024
    clocks: Tuple[str, ...] = CLOCKS


def instance_name(prefix: str = INSTANCE_PREFIX, pid: Optional[int] = None) -> str:
    """``<prefix>-<pid>``: the name of the instance of the agent with that pid (ours)."""
    return f"{prefix}-{os.getpid() if pid is None else pid}"


def _process_start(pid: int, proc_root: str = "/proc") -> Optional[float]:
    """When ``pid`` started, in unix seconds (``/proc/PID/stat`` field 22 and ``btime``);
    None when gone or unreadable."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as handle:
            stat = handle.read()
        with open(f"{proc_root}/stat", "rb") as handle:
            system = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    boot = [line.split()[1] for line in system.split(b"\n") if line.startswith(b"btime ")]
    try:
        return float(boot[0]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_instances(
    root: str, prefix: str = INSTANCE_PREFIX, proc_root: str = "/proc"
) -> List[str]:
    """Remove the instances named ``<prefix>-<pid>`` whose agent is gone; their names.

    Gone: the pid is dead, or now belongs to a process that started after the instance was
    made (pid reuse).  Others' instances (another prefix, or a live agent) are left alone; one
    that cannot be removed (busy: someone holds its files) is skipped.
    """
    pattern = re.compile(re.escape(prefix) + r"-(\d+)")
    removed = []
    instances = os.path.join(root, "instances")
    try:
        names = os.listdir(instances)
    except OSError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            continue
        pid = int(match.group(1))
        path = os.path.join(instances, name)
        if pid == os.getpid():
            stale = True  # ours from an earlier open in this process that was not closed
        elif _pid_alive(pid):
            started = _process_start(pid, proc_root)
            try:
                made = os.stat(path).st_ctime
            except OSError:
                continue
            stale = started is not None and started > made + STALE_SLACK_S
        else:
            stale = True
        if stale and _remove_dir(path):
            removed.append(name)
    return removed


def _remove_dir(path: str, attempts: int = 5) -> bool:
    """rmdir an instance, retrying a moment while it is busy; True when it is gone."""
    for attempt in range(attempts):
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == attempts - 1:
                return False
            time.sleep(0.05 * (attempt + 1))
    return False


def _bracketed(text: str) -> str:
    """The selected entry of a ``[a] b c`` list such as ``trace_clock``."""
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text.strip()


class Instance:
    """One tracing instance of ours: its directory, settings and lifecycle.

    Use :meth:`create`.  Every path it writes is inside its own directory.  Not thread-safe:
    one owner (the event source) configures it; the reader only reads its per-CPU files.
    """

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.name = name
        self.path = os.path.join(root, "instances", name)
        self.settings: Optional[InstanceSettings] = None
        self.clock = ""
        self.filters: Dict[Tuple[str, str], str] = {}
        """(system, event) -> the filter the kernel accepted ("" for none)."""
        self._buffer_shown: Optional[int] = None
        self.enabled: List[Tuple[str, str]] = []
        self.missing: List[Tuple[str, str]] = []
        """Events of the settings this kernel does not have."""
        self.closed = False

    @classmethod
    def create(
        cls,
        root: str,
        prefix: str = INSTANCE_PREFIX,
        pid: Optional[int] = None,
        remove_stale: bool = True,
    ) -> Instance:
        """Make ``instances/<prefix>-<pid>`` (stale ones of ours removed first).

        Raises :class:`EventsUnavailable`."""
        if remove_stale:
            remove_stale_instances(root, prefix)
        instance = cls(root, instance_name(prefix, pid))
        try:
            os.mkdir(instance.path)
        except FileExistsError:
            raise EventsUnavailable(
                EventsUnavailable.FAILED, f"{instance.path} exists and is in use"
            ) from None
        except OSError as error:
            raise _unavailable(error, f"cannot create {instance.path}") from error
        return instance

    # -- files ---------------------------------------------------------------------------------

    def file(self, relative: str) -> str:
        return os.path.join(self.path, relative)

    def has(self, relative: str) -> bool:
        return os.path.exists(self.file(relative))

    def read(self, relative: str) -> str:
        """A file of the instance as text.  Raises OSError."""
        with open(self.file(relative), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def write(self, relative: str, text: str) -> None:
        """Write a file of the instance (one write, as the kernel wants).  Raises OSError."""
        fd = os.open(self.file(relative), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def event_dir(self, system: str, name: str) -> str:
        return f"events/{system}/{name}"

    def has_event(self, system: str, name: str) -> bool:
        return self.has(self.event_dir(system, name) + "/enable")

    def read_format(self, system: str, name: str) -> str:
        """``events/SYSTEM/NAME/format``.  Raises OSError."""
        return self.read(self.event_dir(system, name) + "/format")

    def cpus(self) -> List[int]:
        """The CPUs the instance has buffers for (``per_cpu/cpuN``)."""
        try:
            names = os.listdir(self.file("per_cpu"))
        except OSError:
            return []
        return sorted(
            int(name[3:]) for name in names if name.startswith("cpu") and name[3:].isdigit()
        )

    def cpu_stats(self, cpu: int) -> Dict[str, int]:
        """``per_cpu/cpuN/stats`` as numbers (``entries``, ``overrun``, ``dropped events``, ...);
        {} when unreadable."""
        try:
            text = self.read(f"per_cpu/cpu{cpu}/stats")
        except OSError:
            return {}
        stats: Dict[str, int] = {}
        for line in text.split("\n"):
            key, _, value = line.partition(":")
            try:
                stats[key.strip()] = int(value.strip())
            except ValueError:
                continue
        return stats

    # -- settings ------------------------------------------------------------------------------

    def apply(self, settings: InstanceSettings) -> None:
        """Configure the instance and turn tracing on.

        Order: tracing off; buffer size; clock (changing it resets the buffer); wake-ups at
        any data (``buffer_percent`` 0, Linux 5.0+); overwrite mode (so that a full buffer
        drops the oldest events and the next page tells how many); each event's filter, then
        the event; tracing on.  Events the kernel lacks are listed in :attr:`missing`.
        Raises :class:`EventsUnavailable` (FAILED) when a setting is refused, or OSError.
        """
        self.settings = settings
        try:
            self.write("tracing_on", "0")
            self._apply_buffer(settings)
            self._apply_clock(settings)
            self._apply_percent()
            self.write("options/overwrite", "1")
            self.enabled, self.missing = [], []
            for event in settings.events:
                if not self.has_event(event.system, event.name):
                    self.missing.append((event.system, event.name))
                    continue
                self._apply_filter(event)
                self.write(self.event_dir(event.system, event.name) + "/enable", "1")
                self.enabled.append((event.system, event.name))
            self.write("tracing_on", "1")
        except OSError as error:
            raise _unavailable(error, f"configuring {self.path}") from error

    def _apply_buffer(self, settings: InstanceSettings) -> None:
        # the kernel rounds to whole pages of data (256 shows as 258): remember what it shows
        if self._buffer_size() not in (settings.buffer_size_kb, self._buffer_shown):
            self.write("buffer_size_kb", str(settings.buffer_size_kb))
        self._buffer_shown = self._buffer_size()

    def _buffer_size(self) -> Optional[int]:
        try:
            words = self.read("buffer_size_kb").split()
            return int(words[0]) if words else None
        except (OSError, ValueError):
            return None

    def _apply_clock(self, settings: InstanceSettings) -> None:
        available = self.read("trace_clock")
        names = available.replace("[", " ").replace("]", " ").split()
        for clock in settings.clocks:
            if clock in names:
                if _bracketed(available) != clock:
                    self.write("trace_clock", clock)
                self.clock = clock
                return
        raise EventsUnavailable(
            EventsUnavailable.FAILED,
            f"none of the trace clocks {', '.join(settings.clocks)} in {available.strip()!r}",
        )

    def _apply_percent(self) -> None:
        if self.has("buffer_percent") and self.read("buffer_percent").strip() != "0":
            self.write("buffer_percent", "0")

    def _apply_filter(self, event: EventSetting) -> None:
        path = self.event_dir(event.system, event.name) + "/filter"
        for candidate in event.filters:
            try:
                self.write(path, candidate or "0")
            except OSError as error:
                if error.errno == errno.EINVAL:
                    continue  # this kernel's filter parser refused it: try the next
                raise
            self.filters[(event.system, event.name)] = candidate
            return
        self.write(path, "0")
        self.filters[(event.system, event.name)] = ""

    def verify(self) -> List[str]:
        """Check the settings are still ours and apply again what another tool changed
        (``trace-cmd reset -a``, a script writing our files).  Returns what was re-applied
        (empty when all was well); events recorded before a clock change are gone.
        Raises OSError when the instance itself is gone.
        """
        settings = self.settings
        if settings is None or self.closed:
            return []
        changed = []
        if self._buffer_size() != self._buffer_shown:
            changed.append("buffer_size_kb")
        if _bracketed(self.read("trace_clock")) != self.clock:
            changed.append("trace_clock")
        if self.has("buffer_percent") and self.read("buffer_percent").strip() != "0":
            changed.append("buffer_percent")
        if self.read("options/overwrite").strip() != "1":
            changed.append("options/overwrite")
        for system, name in list(self.enabled):
            base = self.event_dir(system, name)
            if not self.has_event(system, name):  # a dynamic event of ours someone removed:
                changed.append(f"{system}:{name} removed")  # said once, then done without
                self.enabled.remove((system, name))
                continue
            if self.read(base + "/enable").strip() != "1":
                changed.append(f"{system}:{name}")
            elif _filter_text(self.read(base + "/filter")) != self.filters.get((system, name), ""):
                changed.append(f"{system}:{name} filter")
        if self.read("tracing_on").strip() != "1":
            changed.append("tracing_on")
        if changed:
            self._reapply(settings)
        return changed

    def _reapply(self, settings: InstanceSettings) -> None:
        self.write("tracing_on", "0")
        self._apply_buffer(settings)
        self._apply_clock(settings)
        self._apply_percent()
        self.write("options/overwrite", "1")
        for key in self.enabled:
            if not self.has_event(*key):
                continue
            base = self.event_dir(*key)
            self.write(base + "/filter", self.filters.get(key, "") or "0")
            if self.read(base + "/enable").strip() != "1":
                self.write(base + "/enable", "1")
        self.write("tracing_on", "1")

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> bool:
        """Remove the instance (the caller has closed its files first).  True when it is
        gone; False when it stayed busy (someone else holds one of its files)."""
        if self.closed:
            return True
        with contextlib.suppress(OSError):
            self.write("tracing_on", "0")
        gone = _remove_dir(self.path)
        self.closed = gone
        return gone


def _filter_text(text: str) -> str:
    """An event's ``filter`` file as the filter we wrote ("" for ``none``)."""
    text = text.strip()
    return "" if text == "none" else text
