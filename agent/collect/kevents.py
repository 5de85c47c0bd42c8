"""Kernel trace events as typed records, the kernel filters for them, and the per-CPU reader.

Each event below is decoded with the offsets its ``format`` file gives on this kernel (see
:mod:`agent.collect.ringbuffer`), never assumed ones: ``inet_sock_set_state.protocol`` grew from
u8 to u16 in 5.6, ``sched_process_fork`` carries its comms as ``char[16]`` or ``__data_loc``
strings depending on the kernel, ``sched_process_exit.group_dead`` is new in 6.x.

The events and why (``docs/EVENTS.md`` has the kernel versions):

- ``sock:inet_sock_set_state`` (4.16+): every TCP state change in every network namespace.
  CLOSE -> SYN_SENT runs in the context of the thread calling ``connect()``
  (``tcp_v4_connect``/``tcp_v6_connect``); LISTEN -> SYN_RECV is the child socket of an
  accepted connection, made in softirq (``inet_csk_clone_lock``); CLOSE -> LISTEN is
  ``listen()`` in its caller's context (``inet_csk_listen_start``).
- ``tcp:tcp_receive_reset`` (4.15+): an RST received, just before the socket goes to CLOSE
  (``tcp_reset``): tells a refused connect from one that timed out.
- ``fib:fib_table_lookup`` (4.9+; ports and protocol since 4.17) and
  ``fib6:fib6_table_lookup`` (4.15+): route lookups.  Output lookups run in the sending
  thread's context with ``iif`` = 1 (``LOOPBACK_IFINDEX``, set by ``ip_route_output_key_hash``
  and ``ip6_route_output_flags``): a UDP ``connect()`` or ``sendto()`` names its process and
  destination.  Filtered in the kernel to UDP output lookups outside interrupts.
- ``sched:sched_process_exec``, ``sched:sched_process_exit``, ``task:task_rename``,
  ``task:task_newtask`` (whose ``clone_flags`` tell a thread from a process and flag
  ``CLONE_NEWNET``) or, where that is missing, ``sched:sched_process_fork``: the process table.
- ``syscalls:sys_exit_setns`` and ``syscalls:sys_exit_unshare`` (``CONFIG_FTRACE_SYSCALLS``):
  a thread that changed its namespaces, whose network namespace must be read again.

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
import struct
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from agent.collect.ringbuffer import (
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
from agent.collect.tracefs import EventSetting, Instance

# common_flags (TRACE_FLAG_* in include/linux/trace_events.h)
FLAG_HARDIRQ = 0x08
FLAG_SOFTIRQ = 0x10
FLAG_NMI = 0x40
IN_INTERRUPT = FLAG_HARDIRQ | FLAG_SOFTIRQ | FLAG_NMI
"""An event with any of these flags ran in interrupt context: its ``pid`` is whichever task
the interrupt happened to find on the CPU."""

# include/net/tcp_states.h
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_CLOSE = 7
TCP_LISTEN = 10

CLONE_THREAD = 0x00010000
CLONE_NEWNET = 0x40000000
AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17
LOOPBACK_IFINDEX = 1


class TcpStateChange(NamedTuple):
    """``sock:inet_sock_set_state``.  ``saddr``/``daddr`` are the addresses of the socket's
    family (4 or 16 bytes, network order); ports are numbers.

    Both address pairs are kept as the kernel wrote them (the IPv4 pair and the IPv6 pair,
    which holds IPv4-mapped addresses for an IPv4 socket): choosing one per record cost
    more than the properties do where an address is used."""

    time: int
    """Trace clock, nanoseconds."""
    flags: int
    pid: int
    """The thread the event ran in (``common_pid``): meaningful outside interrupts only."""
    skaddr: int
    oldstate: int
    newstate: int
    sport: int
    dport: int
    family: int
    protocol: int
    saddr4: bytes
    daddr4: bytes
    saddr6: bytes
    daddr6: bytes

    @property
    def saddr(self) -> bytes:
        return self.saddr6 if self.family == AF_INET6 else self.saddr4

    @property
    def daddr(self) -> bytes:
        return self.daddr6 if self.family == AF_INET6 else self.daddr4


class TcpReset(NamedTuple):
    """``tcp:tcp_receive_reset``: the socket at ``skaddr`` received an RST."""

    time: int
    pid: int
    flags: int
    skaddr: int


class RouteLookup(NamedTuple):
    """``fib:fib_table_lookup`` (version 4) or ``fib6:fib6_table_lookup`` (version 6)."""

    time: int
    pid: int
    flags: int
    version: int
    protocol: int
    iif: int
    oif: int
    err: int
    sport: int
    dport: int
    saddr: bytes
    daddr: bytes


class ProcessExec(NamedTuple):
    """``sched:sched_process_exec``: ``tid`` (now the process's pid) ran ``filename``."""

    time: int
    pid: int
    tid: int
    old_tid: int
    filename: str


class ProcessFork(NamedTuple):
    """``sched:sched_process_fork`` or ``task:task_newtask``: thread ``parent`` made ``child``.

    ``clone_flags`` is None from ``sched_process_fork`` (which does not carry them)."""

    time: int
    pid: int
    parent: int
    child: int
    comm: str
    clone_flags: Optional[int]


class ProcessExit(NamedTuple):
    """``sched:sched_process_exit``: thread ``tid`` exited; ``group_dead`` (6.x) says it was
    the last of its process (None where the kernel does not say)."""

    time: int
    pid: int
    tid: int
    comm: str
    group_dead: Optional[bool]


class TaskRename(NamedTuple):
    """``task:task_rename``: thread ``tid`` is now called ``comm`` (``prctl(PR_SET_NAME)``,
    a write to ``/proc/PID/comm``, and exec)."""

    time: int
    pid: int
    tid: int
    comm: str


class NamespaceSwitch(NamedTuple):
    """``syscalls:sys_exit_setns`` / ``sys_exit_unshare`` returning 0: thread ``pid`` may be
    in another network namespace now."""

    time: int
    pid: int
    syscall: str


KernelEvent = Union[
    TcpStateChange,
    TcpReset,
    RouteLookup,
    ProcessExec,
    ProcessFork,
    ProcessExit,
    TaskRename,
    NamespaceSwitch,
]


# ---------------------------------------------------------------------------------------------
# decoding


def _code(field: FieldFormat) -> str:
    """The struct code reading ``field``: integers by size and sign, arrays as bytes,
    ``__data_loc``/``__rel_loc`` as their u32."""
    if field.location:
        return "I"
    if not field.is_array:
        code = {1: "B", 2: "H", 4: "I", 8: "Q"}.get(field.size)
        if code is not None:
            return code.lower() if field.signed else code
    return f"{field.size}s"


Unpack = Callable[[bytes, int], Tuple[Any, ...]]


def field_reader(fmt: EventFormat, names: Sequence[str]) -> Tuple[Unpack, int]:
    """A function reading the ``names`` fields of a record (in that order) and the number of
    bytes a record must have for it.  Raises FormatError when a field is missing."""
    fields = [fmt.require(name) for name in names]
    by_offset = sorted(range(len(fields)), key=lambda index: fields[index].offset)
    parts = ["<" if sys.byteorder == "little" else ">"]
    position = 0
    for index in by_offset:
        field = fields[index]
        if field.offset < position:
            raise FormatError(f"{fmt.name}: field {field.name} overlaps the one before it")
        if field.offset > position:
            parts.append(f"{field.offset - position}x")
        parts.append(_code(field))
        position = field.offset + field.size
    layout = struct.Struct("".join(parts))
    if by_offset == sorted(by_offset):
        return layout.unpack_from, layout.size
    order = [by_offset.index(index) for index in range(len(fields))]
    reorder = operator.itemgetter(*order)
    unpack = layout.unpack_from

    def reordered(page: bytes, offset: int) -> Tuple[Any, ...]:
        values: Tuple[Any, ...] = reorder(unpack(page, offset))
        return values

    return reordered, layout.size


def _text(raw: bytes) -> str:
    """A NUL-terminated kernel string as the file system encoding reads it (undecodable
    bytes kept as surrogates, as :mod:`agent.identity` does)."""
    end = raw.find(b"\0")
    return os.fsdecode(raw if end < 0 else raw[:end])


StringReader = Callable[[bytes, int, int, Any], str]


def _string_reader(fmt: EventFormat, name: str) -> StringReader:
    """Read the string field ``name`` given (page, record offset, record length, the field's
    raw value): a fixed ``char[N]`` (the raw value is its bytes) or a ``__data_loc`` /
    ``__rel_loc`` string (the raw value is its location word)."""
    field = fmt.require(name)
    if not field.location:
        return lambda page, offset, length, raw: _text(raw)
    base = field.offset + field.size if field.location == "rel_loc" else 0

    def located(page: bytes, offset: int, length: int, raw: int) -> str:
        start, size = (raw & 0xFFFF) + base, raw >> 16
        if start + size > length:
            return ""
        return _text(page[offset + start : offset + start + size])

    return located


def decode_tcp_state(fmt: EventFormat) -> Decoder[TcpStateChange]:
    """Decoder of ``sock:inet_sock_set_state``."""
    read, needed = field_reader(
        fmt,
        (
            "common_flags",
            "common_pid",
            "skaddr",
            "oldstate",
            "newstate",
            "sport",
            "dport",
            "family",
            "protocol",
            "saddr",
            "daddr",
            "saddr_v6",
            "daddr_v6",
        ),
    )
    make = tuple.__new__
    cls = TcpStateChange  # its fields are in the order read, after the time stamp

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[TcpStateChange]:
        if length < needed:
            return None
        return make(cls, (time, *read(page, offset)))

    return decode


def decode_tcp_reset(fmt: EventFormat) -> Decoder[TcpReset]:
    """Decoder of ``tcp:tcp_receive_reset``."""
    read, needed = field_reader(fmt, ("common_flags", "common_pid", "skaddr"))

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[TcpReset]:
        if length < needed:
            return None
        flags, pid, sk = read(page, offset)
        return TcpReset(time, pid, flags, sk)

    return decode


def decode_route_lookup(fmt: EventFormat, version: int) -> Decoder[RouteLookup]:
    """Decoder of ``fib:fib_table_lookup`` (``version`` 4) or ``fib6:fib6_table_lookup`` (6).
    Raises FormatError on kernels whose event lacks ports and protocol (before 4.17)."""
    read, needed = field_reader(
        fmt,
        (
            "common_flags",
            "common_pid",
            "proto",
            "iif",
            "oif",
            "err",
            "sport",
            "dport",
            "src",
            "dst",
        ),
    )

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[RouteLookup]:
        if length < needed:
            return None
        flags, pid, proto, iif, oif, err, sport, dport, src, dst = read(page, offset)
        return RouteLookup(
            time,
            pid,
            flags,
            version,
            proto,
            iif,
            oif,
            err,
            sport,
            dport,
            src,
            dst,
        )

    return decode


def decode_exec(fmt: EventFormat) -> Decoder[ProcessExec]:
    """Decoder of ``sched:sched_process_exec``."""
    read, needed = field_reader(fmt, ("common_pid", "filename", "pid", "old_pid"))
    filename = _string_reader(fmt, "filename")

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ProcessExec]:
        if length < needed:
            return None
        pid, location, tid, old = read(page, offset)
        return ProcessExec(
            time,
            pid,
            tid,
            old,
            filename(page, offset, length, location),
        )

    return decode


def decode_fork(fmt: EventFormat) -> Decoder[ProcessFork]:
    """Decoder of ``sched:sched_process_fork``."""
    read, needed = field_reader(fmt, ("common_pid", "parent_pid", "child_comm", "child_pid"))
    comm = _string_reader(fmt, "child_comm")

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ProcessFork]:
        if length < needed:
            return None
        pid, parent, raw, child = read(page, offset)
        return ProcessFork(
            time,
            pid,
            parent,
            child,
            comm(page, offset, length, raw),
            None,
        )

    return decode


def decode_newtask(fmt: EventFormat) -> Decoder[ProcessFork]:
    """Decoder of ``task:task_newtask`` (fires in the parent's context: ``common_pid``)."""
    read, needed = field_reader(fmt, ("common_pid", "pid", "comm", "clone_flags"))
    comm = _string_reader(fmt, "comm")

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ProcessFork]:
        if length < needed:
            return None
        parent, child, raw, flags = read(page, offset)
        return ProcessFork(
            time,
            parent,
            parent,
            child,
            comm(page, offset, length, raw),
            flags,
        )

    return decode


def decode_exit(fmt: EventFormat) -> Decoder[ProcessExit]:
    """Decoder of ``sched:sched_process_exit``."""
    has_group_dead = fmt.field("group_dead") is not None
    names = ("common_pid", "comm", "pid") + (("group_dead",) if has_group_dead else ())
    read, needed = field_reader(fmt, names)
    comm = _string_reader(fmt, "comm")

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ProcessExit]:
        if length < needed:
            return None
        values = read(page, offset)
        dead = bool(values[3]) if has_group_dead else None
        return ProcessExit(
            time,
            values[0],
            values[2],
            comm(page, offset, length, values[1]),
            dead,
        )

    return decode


def decode_rename(fmt: EventFormat) -> Decoder[TaskRename]:
    """Decoder of ``task:task_rename``."""
    read, needed = field_reader(fmt, ("common_pid", "pid", "newcomm"))
    comm = _string_reader(fmt, "newcomm")

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[TaskRename]:
        if length < needed:
            return None
        pid, tid, raw = read(page, offset)
        return TaskRename(time, pid, tid, comm(page, offset, length, raw))

    return decode


def decode_namespace_switch(fmt: EventFormat, syscall: str) -> Decoder[NamespaceSwitch]:
    """Decoder of ``syscalls:sys_exit_setns`` / ``sys_exit_unshare`` (filtered to ``ret == 0``
    in the kernel; checked again here)."""
    read, needed = field_reader(fmt, ("common_pid", "ret"))

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[NamespaceSwitch]:
        if length < needed:
            return None
        pid, ret = read(page, offset)
        if ret != 0:
            return None
        return NamespaceSwitch(time, pid, syscall)

    return decode


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
