"""Which kernel events to enable, with their kernel filters, and the per-CPU reader.

:func:`choose_events` reads the ``format`` of each event of :data:`EVENT_SPECS` (the records
and their decoders are in :mod:`agent.collect.kernel.records`), builds its decoder and the
setting that enables it with the first filter this kernel accepts, and says why any event is
not used.

:class:`EventReader` reads the per-CPU ``trace_pipe_raw`` files of an instance without blocking
(``poll`` with a timeout), decodes every page, merges the CPUs' events in time order per batch
and counts the events the kernel lost, from the page headers and, as a cross-check, from
``per_cpu/cpuN/stats``.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import select
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from agent.collect.kernel.records import (
    KernelEvent,
    decode_exec,
    decode_exit,
    decode_fork,
    decode_namespace_switch,
    decode_newtask,
    decode_rename,
    decode_route_lookup,
    decode_tcp_reset,
    decode_tcp_state,
)
from agent.collect.kernel.ringbuffer import (
    LOST_UNKNOWN,
    Decoder,
    EventFormat,
    FieldFormat,
    FormatError,
    PageParser,
    parse_event_format,
    parse_header_event,
    parse_header_page,
    subbuffer_size,
)
from agent.collect.kernel.tracefs import EventSetting, Instance

# ---------------------------------------------------------------------------------------------
# what to enable


TCP_FILTER = (
    "protocol == 6 && (newstate == 2 || newstate == 7 || newstate == 10 || oldstate == 10"
    " || (oldstate == 2 && newstate == 1))"
)
"""The TCP transitions the tracker needs: CLOSE -> SYN_SENT (connect), SYN_SENT -> ESTABLISHED,
anything -> CLOSE (outcome, close), CLOSE -> LISTEN and LISTEN -> anything (listeners and
accepted children).  SCTP and MPTCP sockets also use this tracepoint: ``protocol == 6``."""

UDP_FILTERS = (
    "iif == 1 && proto == 17 && !(common_flags & 0x58)",
    "iif == 1 && proto == 17",
)
"""UDP output route lookups outside interrupts (inbound lookups run in softirq).  The second,
for filter parsers without ``!``; the tracker drops interrupt-context lookups anyway."""


class EventSpec(NamedTuple):
    """One event the source may enable: where it is, its filters, how to decode it, and
    whether the source can do without it."""

    system: str
    name: str
    filters: Tuple[str, ...]
    build: Callable[[EventFormat], Decoder[KernelEvent]]
    required: bool = False


EVENT_SPECS: Tuple[EventSpec, ...] = (
    EventSpec("sock", "inet_sock_set_state", (TCP_FILTER, ""), decode_tcp_state, required=True),
    EventSpec("tcp", "tcp_receive_reset", ("",), decode_tcp_reset),
    EventSpec("fib", "fib_table_lookup", UDP_FILTERS, lambda f: decode_route_lookup(f, 4)),
    EventSpec("fib6", "fib6_table_lookup", UDP_FILTERS, lambda f: decode_route_lookup(f, 6)),
    EventSpec("sched", "sched_process_exec", ("",), decode_exec),
    EventSpec("sched", "sched_process_exit", ("",), decode_exit),
    EventSpec("task", "task_rename", ("",), decode_rename),
    EventSpec("task", "task_newtask", ("",), decode_newtask),
    EventSpec("sched", "sched_process_fork", ("",), decode_fork),
    EventSpec(
        "syscalls",
        "sys_exit_setns",
        ("ret == 0", ""),
        lambda f: decode_namespace_switch(f, "setns"),
    ),
    EventSpec(
        "syscalls",
        "sys_exit_unshare",
        ("ret == 0", ""),
        lambda f: decode_namespace_switch(f, "unshare"),
    ),
)
"""Every event the source knows.  ``sched_process_fork`` is enabled only where
``task_newtask`` is missing (:func:`choose_events`)."""


class ChosenEvents(NamedTuple):
    """The outcome of :func:`choose_events`: what to enable and how to decode it."""

    settings: Tuple[EventSetting, ...]
    decoders: Dict[int, Decoder[KernelEvent]]
    unavailable: Dict[str, str]
    """``system:name`` -> why it is not used (missing on this kernel, a field it lacks)."""
    type_field: FieldFormat


def choose_events(
    read_format: Callable[[str, str], str],
    specs: Sequence[EventSpec] = EVENT_SPECS,
    exclude: Sequence[str] = (),
) -> ChosenEvents:
    """Read the format of each event of ``specs`` (``read_format(system, name)``, raising
    OSError when the kernel lacks it), build its decoder and its setting.

    ``exclude`` names events (``system:name``) not to use.  Raises FormatError naming the
    problem when a required event is missing or cannot be decoded."""
    settings: List[EventSetting] = []
    decoders: Dict[int, Decoder[KernelEvent]] = {}
    unavailable: Dict[str, str] = {}
    type_field: Optional[FieldFormat] = None
    names = {f"{spec.system}:{spec.name}" for spec in specs}
    for spec in specs:
        key = f"{spec.system}:{spec.name}"
        if key in exclude:
            if spec.required:
                raise FormatError(f"{key} is required and cannot be excluded")
            unavailable[key] = "excluded"
            continue
        if (
            key == "sched:sched_process_fork"
            and "task:task_newtask" in names
            and "task:task_newtask" not in unavailable
        ):
            continue  # task_newtask says the same and more
        try:
            fmt = parse_event_format(read_format(spec.system, spec.name), spec.system)
            decoder = spec.build(fmt)
            type_field = type_field or fmt.require("common_type")
        except OSError as error:
            reason = "not in this kernel" if error.errno == errno.ENOENT else str(error)
            if spec.required:
                raise FormatError(f"{key}: {reason}") from error
            unavailable[key] = reason
            continue
        except FormatError as error:
            if spec.required:
                raise
            unavailable[key] = str(error)
            continue
        decoders[fmt.id] = decoder
        settings.append(EventSetting(spec.system, spec.name, spec.filters))
    if type_field is None:
        raise FormatError("no event could be decoded")
    return ChosenEvents(tuple(settings), decoders, unavailable, type_field)


# ---------------------------------------------------------------------------------------------
# reading


class CpuLoss(NamedTuple):
    """What one CPU's buffer lost so far."""

    pages: int
    """Events the page headers counted as lost."""
    unknown: int
    """Pages that flagged a loss without a count (each counts as one lost event)."""
    stats: int
    """``overrun`` + ``dropped events`` of ``per_cpu/cpuN/stats`` (the kernel's own count)."""


class EventReader:
    """Reads an instance's per-CPU buffers: ``wait`` for data, ``read`` every CPU's pages.

    The per-CPU ``trace_pipe_raw`` files are opened non-blocking and stay open while the reader
    lives, which also keeps the instance from being removed by another tool.
    Raises OSError from the constructor when the files cannot be opened.
    """

    def __init__(
        self,
        instance: Instance,
        decoders: Dict[int, Decoder[KernelEvent]],
        type_field: FieldFormat,
        max_pages: int = 256,
    ) -> None:
        self.instance = instance
        self.decoders = decoders
        self.parser = PageParser(
            parse_header_page(instance.read("events/header_page")),
            parse_header_event(instance.read("events/header_event")),
            type_field.offset,
            type_field.size,
        )
        self.page_size = subbuffer_size(instance.read)
        self.max_pages = max_pages
        """Pages read from one CPU per :meth:`read`, so that one busy CPU cannot hold the
        others' events back for long."""
        self.pages_read = 0
        self.errors: Dict[int, str] = {}
        """cpu -> the last error reading its buffer (other than "no data now")."""
        self.malformed_pages = 0
        self.records = 0
        self._lost_pages: Dict[int, int] = {}
        self._lost_unknown: Dict[int, int] = {}
        self._stats: Dict[int, int] = {}
        self._stats_base: Dict[int, int] = {}
        self._fds: Dict[int, int] = {}
        self._held: List[KernelEvent] = []
        clock_id = CLOCK_IDS.get(instance.clock, time.CLOCK_BOOTTIME)
        self.clock_ns: Callable[[], int] = lambda: time.clock_gettime_ns(clock_id)
        """The trace clock's current time (the instance's clock as Python reads it)."""
        self._poll = select.poll()
        try:
            for cpu in instance.cpus():
                path = instance.file(f"per_cpu/cpu{cpu}/trace_pipe_raw")
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds[cpu] = fd
                self._poll.register(fd, select.POLLIN)
                self._lost_pages[cpu] = self._lost_unknown[cpu] = 0
        except OSError:
            self.close()
            raise
        self.rebase_stats()

    @property
    def cpus(self) -> List[int]:
        return sorted(self._fds)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for data on any CPU; True when some is there."""
        try:
            return bool(self._poll.poll(max(0, int(timeout * 1000))))
        except InterruptedError:
            return False

    def read(self) -> List[KernelEvent]:
        """The events the buffers hold now, all CPUs merged in time order, up to the moment
        every CPU had been read to its end.

        CPUs are read one after the other, so the last one read holds events newer than the
        moment the first was drained; a fork on the first CPU could then come in the next
        batch after the exec it made on the last.  Events newer than the earliest drain
        (the watermark) are held back for the next call (:attr:`held`)."""
        events: List[KernelEvent] = self._held
        self._held = []
        parse = self.parser.parse
        decoders = self.decoders
        size = self.page_size
        clock = self.clock_ns
        watermark: Optional[int] = None
        for cpu, fd in self._fds.items():
            drained: Optional[int] = None
            last = 0
            for _ in range(self.max_pages):
                now = clock()
                try:
                    page = os.read(fd, size)
                except BlockingIOError:
                    drained = now  # everything this CPU wrote before `now` has been read
                    break
                except InterruptedError:
                    continue
                except OSError as error:  # an offline CPU, say: nothing to read there now
                    self.errors[cpu] = error.strerror or str(error)
                    drained = now
                    break
                if not page:
                    drained = now
                    break
                self.pages_read += 1
                info = parse(page, decoders, events)
                last = info.timestamp
                self.records += info.records
                if info.malformed:
                    self.malformed_pages += 1
                if info.lost == LOST_UNKNOWN:
                    self._lost_unknown[cpu] += 1
                elif info.lost:
                    self._lost_pages[cpu] += info.lost
            if drained is None:  # stopped by max_pages: read up to its last page's end
                drained = last
            if watermark is None or drained < watermark:
                watermark = drained
        if not events:
            return events
        events.sort(key=_time_of)  # sorted runs, one per CPU: a merge for timsort
        split = len(events)
        if watermark is not None:
            while split and events[split - 1][0] > watermark:
                split -= 1
        if split < len(events):
            self._held = events[split:]
            del events[split:]
        return events

    @property
    def held(self) -> int:
        """Events read but held back until the other CPUs have been read past them."""
        return len(self._held)

    def rebase_stats(self) -> None:
        """Count the kernel's stats from now on (after the buffer was reset: a new clock)."""
        for cpu in self._fds:
            self._stats_base[cpu] = _stats_loss(self.instance.cpu_stats(cpu))
            self._stats.setdefault(cpu, 0)

    def refresh_stats(self) -> None:
        """Read ``per_cpu/cpuN/stats`` for the cross-check of :meth:`loss`."""
        for cpu in self._fds:
            value = _stats_loss(self.instance.cpu_stats(cpu))
            base = self._stats_base.get(cpu, 0)
            if value < base:  # the buffer was reset (someone changed the clock or size)
                self._stats[cpu] = self._stats.get(cpu, 0) + base
                base = self._stats_base[cpu] = 0
            self._stats[cpu] = max(self._stats.get(cpu, 0), value - base)

    def loss(self) -> Dict[int, CpuLoss]:
        """Per CPU: lost events by the page headers, pages with an unknown count, and the
        kernel's stats (as of the last :meth:`refresh_stats`)."""
        return {
            cpu: CpuLoss(self._lost_pages[cpu], self._lost_unknown[cpu], self._stats.get(cpu, 0))
            for cpu in self._fds
        }

    @property
    def lost(self) -> int:
        """Events lost so far: per CPU the larger of the page headers' count (an unknown
        count counting one) and the kernel's stats."""
        return sum(max(loss.pages + loss.unknown, loss.stats) for loss in self.loss().values())

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(fd)
            os.close(fd)
        self._fds.clear()


_time_of = operator.itemgetter(0)

CLOCK_IDS = {"boot": time.CLOCK_BOOTTIME, "mono": time.CLOCK_MONOTONIC}
"""The Python clock of each trace clock we use (``kernel/trace/trace.c``: ``trace_clocks``;
``boot`` is ``ktime_get_boot_fast_ns``, ``mono`` ``ktime_get_mono_fast_ns``)."""


def _stats_loss(stats: Dict[str, int]) -> int:
    return stats.get("overrun", 0) + stats.get("dropped events", 0)
