"""Kernel trace events as typed records, and their decoders.

Each event below is decoded with the offsets its ``format`` file gives on this kernel (see
:mod:`agent.collect.kernel.ringbuffer`), never assumed ones: ``inet_sock_set_state.protocol`` grew
from u8 to u16 in 5.6, ``sched_process_fork`` carries its comms as ``char[16]`` or ``__data_loc``
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
- ``syscalls:sys_enter_connect``/``sys_exit_connect``: a route lookup made inside
  ``connect(2)`` is the connect's, not a datagram's.
- ``sock:sock_send_length``/``sock:sock_recv_length`` (6.3+): a datagram socket (``sk``)
  sent or received: a flow is one whose datagram left, and a socket that received before it
  sent answers (a reply).

Which of them this kernel has, their kernel filters, and the per-CPU reader:
:mod:`agent.collect.kernel.reader`.
"""

from __future__ import annotations

import operator
import os
import struct
import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

from agent.collect.kernel.ringbuffer import (
    Decoder,
    EventFormat,
    FieldFormat,
    FormatError,
)
from agent.identity import CMDLINE_CUT_MARK
from agent.inet import (
    AF_INET6,
)

# common_flags (TRACE_FLAG_* in include/linux/trace_events.h)
FLAG_HARDIRQ = 0x08
FLAG_SOFTIRQ = 0x10
FLAG_NMI = 0x40
IN_INTERRUPT = FLAG_HARDIRQ | FLAG_SOFTIRQ | FLAG_NMI
"""An event with any of these flags ran in interrupt context: its ``pid`` is whichever task
the interrupt happened to find on the CPU."""

CLONE_THREAD = 0x00010000
"""``clone(2)`` flag of a new thread rather than a process (``<sched.h>``)."""
LOOPBACK_IFINDEX = 1
"""The loopback device's ifindex, which output route lookups carry as ``iif``."""


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
    device: str = ""
    """The output device of the route found (``-`` for none): where the source address is
    still 0 (an unconnected socket), the device tells the namespace apart."""


class ProcessExec(NamedTuple):
    """``sched:sched_process_exec``: ``tid`` (now the process's pid) ran ``filename``."""

    time: int
    pid: int
    tid: int
    old_tid: int
    filename: str


CUT_MARK = CMDLINE_CUT_MARK
"""Appended to a command line the exec probe could not hold whole: the mark
:mod:`agent.identity` puts on one longer than its bound."""


class ExecArgs(NamedTuple):
    """The arguments a process started with, from our probe at its loader's entry
    (:mod:`agent.collect.kernel.execargs`): ``argv`` as far as captured, ``cut`` when there
    was more."""

    time: int
    pid: int
    argv: Tuple[str, ...]
    cut: bool

    @property
    def cmdline(self) -> str:
        """The command line as :mod:`agent.identity` joins it, marked when cut."""
        return " ".join(self.argv) + (CUT_MARK if self.cut else "")


class UidRequest(NamedTuple):
    """``syscalls:sys_enter_setresuid`` / ``setreuid`` / ``setuid``: thread ``pid`` asks for
    real uid ``uid`` (None: unchanged) (:mod:`agent.collect.kernel.users`)."""

    time: int
    pid: int
    syscall: str
    uid: Optional[int]


class UidGranted(NamedTuple):
    """``syscalls:sys_exit_setresuid`` / ``setreuid`` / ``setuid`` returning 0."""

    time: int
    pid: int
    syscall: str


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


class SocketTransfer(NamedTuple):
    """``sock:sock_send_length`` or ``sock:sock_recv_length`` (6.3+): the thread ``pid`` sent
    (``sent``) or received ``length`` bytes through the socket at ``sk`` of ``family`` and
    ``protocol`` (the socket's, ``sk_protocol``: 17 for UDP, 1 or 58 for a ping socket, a raw
    socket's own number).  Filtered in the kernel to datagram protocols and ``ret > 0``: a
    send that returned a length handed a datagram to the IP layer."""

    time: int
    pid: int
    flags: int
    sk: int
    family: int
    protocol: int
    length: int
    sent: bool


class ConnectCall(NamedTuple):
    """``syscalls:sys_enter_connect`` (``entering``) or ``sys_exit_connect``: thread ``pid``
    is inside ``connect(2)`` between the two; a route lookup it makes there is the connect's
    (a UDP, ping or raw socket's connect sends nothing), not a datagram's."""

    time: int
    pid: int
    entering: bool


KernelEvent = Union[
    TcpStateChange,
    TcpReset,
    RouteLookup,
    ProcessExec,
    ProcessFork,
    ProcessExit,
    TaskRename,
    NamespaceSwitch,
    SocketTransfer,
    ConnectCall,
    ExecArgs,
    UidRequest,
    UidGranted,
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
    names = ("common_flags", "common_pid", "proto", "iif", "oif", "err", "sport", "dport")
    has_device = fmt.field("name") is not None
    read, needed = field_reader(fmt, names + ("src", "dst") + (("name",) if has_device else ()))
    device = _string_reader(fmt, "name") if has_device else None

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[RouteLookup]:
        if length < needed:
            return None
        values = read(page, offset)
        flags, pid, proto, iif, oif, err, sport, dport, src, dst = values[:10]
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
            device(page, offset, length, values[10]) if device is not None else "",
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


def decode_transfer(fmt: EventFormat, sent: bool) -> Decoder[SocketTransfer]:
    """Decoder of ``sock:sock_send_length`` (``sent``) or ``sock:sock_recv_length``."""
    read, needed = field_reader(
        fmt, ("common_flags", "common_pid", "sk", "family", "protocol", "ret")
    )

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[SocketTransfer]:
        if length < needed:
            return None
        flags, pid, sk, family, protocol, ret = read(page, offset)
        if ret <= 0:
            return None
        return SocketTransfer(time, pid, flags, sk, family, protocol, ret, sent)

    return decode


def decode_connect_call(fmt: EventFormat, entering: bool) -> Decoder[ConnectCall]:
    """Decoder of ``syscalls:sys_enter_connect`` (``entering``) / ``sys_exit_connect``."""
    read, needed = field_reader(fmt, ("common_pid",))

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ConnectCall]:
        if length < needed:
            return None
        (pid,) = read(page, offset)
        return ConnectCall(time, pid, entering)

    return decode
