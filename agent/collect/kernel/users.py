"""A process that changes its user: the ``setuid`` family's syscall events (issue 22).

``su``, ``sudo -u``, ``setpriv``, a daemon dropping privileges: the real uid changes in the
middle of a process's life, usually just before it execs the program that connects.  A process
that exits before ``/proc`` is read keeps the user the events knew, so the change itself is
taken from the kernel: ``syscalls:sys_enter_setresuid`` / ``setreuid`` / ``setuid`` carry the
uids asked for, ``syscalls:sys_exit_*`` (``ret == 0``) say they were granted.  Both need
``CONFIG_FTRACE_SYSCALLS`` (on in Debian, Ubuntu and RHEL kernels); without them the user
comes from ``/proc`` at exec, as before.

The real uid (the ``uid`` column, as psutil's ``uids().real``) after a granted call:
``setresuid(r, e, s)`` and ``setreuid(r, e)``: ``r`` unless it is -1 (unchanged).
``setuid(u)``: every uid for a privileged caller, only the effective one otherwise; the events
do not say which, so the real uid becomes ``u`` unless it already is (an unprivileged caller
may only ask for its real or saved uid: a set-user-ID program going back to its saved uid is
the one case read wrong, until ``/proc`` is read at its next exec).
"""

from __future__ import annotations

from typing import Optional, Tuple

from agent.collect.kernel.reader import EventSpec
from agent.collect.kernel.records import UidGranted, UidRequest, field_reader
from agent.collect.kernel.ringbuffer import Decoder, EventFormat

UNCHANGED = 0xFFFFFFFF
"""``(uid_t)-1``: leave this uid as it is."""

SYSCALLS: Tuple[Tuple[str, str], ...] = (
    ("setresuid", "ruid"),
    ("setreuid", "ruid"),
    ("setuid", "uid"),
)
"""Each syscall and the argument that names the new real uid."""


def decode_request(fmt: EventFormat, syscall: str, argument: str) -> Decoder[UidRequest]:
    """Decoder of ``syscalls:sys_enter_<syscall>``: the thread and the real uid it asks for."""
    read, needed = field_reader(fmt, ("common_pid", argument))

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[UidRequest]:
        if length < needed:
            return None
        pid, uid = read(page, offset)
        uid &= 0xFFFFFFFF  # the syscall's uid_t, stored in a long
        return UidRequest(time, pid, syscall, None if uid == UNCHANGED else uid)

    return decode


def decode_granted(fmt: EventFormat, syscall: str) -> Decoder[UidGranted]:
    """Decoder of ``syscalls:sys_exit_<syscall>`` returning 0 (filtered so in the kernel,
    checked again here)."""
    read, needed = field_reader(fmt, ("common_pid", "ret"))

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[UidGranted]:
        if length < needed:
            return None
        pid, ret = read(page, offset)
        return UidGranted(time, pid, syscall) if ret == 0 else None

    return decode


def _request_spec(syscall: str, argument: str) -> EventSpec:
    return EventSpec(
        "syscalls", f"sys_enter_{syscall}", ("",), lambda f: decode_request(f, syscall, argument)
    )


def _granted_spec(syscall: str) -> EventSpec:
    return EventSpec(
        "syscalls", f"sys_exit_{syscall}", ("ret == 0", ""), lambda f: decode_granted(f, syscall)
    )


USER_SPECS: Tuple[EventSpec, ...] = tuple(
    spec
    for syscall, argument in SYSCALLS
    for spec in (_request_spec(syscall, argument), _granted_spec(syscall))
)
"""The events :func:`agent.collect.kernel.source.open_event_source` adds for user changes."""


def real_uid_after(syscall: str, asked: Optional[int], current: Optional[int]) -> Optional[int]:
    """The real uid after a granted call (see the module's docstring); None: unchanged."""
    if asked is None:
        return None
    if syscall == "setuid" and asked == current:
        return None
    return asked
