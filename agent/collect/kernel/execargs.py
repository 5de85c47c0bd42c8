"""Command lines from the kernel at exec: a uprobe event on the dynamic loader's entry point.

A process that connects and exits within milliseconds is gone before ``/proc/PID/cmdline`` can
be read.  Its arguments are on its stack when its first instruction runs: at the entry of the
program interpreter (``ld-linux-x86-64.so.2``, which the kernel starts for every dynamically
linked program, and so for every script's interpreter) the stack pointer points at ``argc``,
then the ``argv`` pointers (the System V ABI's process entry; the same on aarch64), and the
argument strings lie one after the other, NUL-terminated, from ``argv[0]`` on.

One uprobe event (``Documentation/trace/uprobetracer.rst``; ``CONFIG_UPROBE_EVENTS``, on in
Debian, Ubuntu and RHEL kernels) at the loader's entry fetches ``argc`` (``$stack0``) and
the bytes from ``argv[0]`` on (``+OFFSET($stack1)`` as arrays of u64, Linux 4.20+; plain
u64 fields before): the arguments, NUL-separated.  Fixed-size fields, never ``:string``
fetches: a uprobe event whose strings total more than a page is dropped with a kernel
warning (``prepare_uprobe_buffer``, seen on 6.18), and a ``panic_on_warn`` host would panic.
The kernel takes at most 3 KiB of fields per probe event ("Event too big") and each element
costs a read in the trap: :data:`LAYOUTS` (2 KiB first) are tried largest first, and the
bytes beyond what a layout holds are cut (the record says so).  Bytes past the last argument
(the environment follows) are dropped by the decoder, never kept.

The probe is defined in the global ``uprobe_events`` under a group of its own named after our
instance (``egress_agent_<...>``), enabled only in our instance, and removed at close; other
tools' probes are never touched.  Uprobes attach to an inode: processes of a container whose
loader is another file (its own image) are not seen; nor are statically linked programs (Go,
busybox-static).  For them ``/proc`` at exec is the fallback, as before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
from typing import List, Optional, Sequence, Tuple

from agent.collect.kernel.records import ExecArgs
from agent.collect.kernel.ringbuffer import Decoder, EventFormat, FormatError

log = logging.getLogger(__name__)

LOADERS: Tuple[str, ...] = (
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/ld-linux-aarch64.so.1",
    "/lib64/ld-linux-aarch64.so.1",
)
"""The 64-bit glibc program interpreters (``PT_INTERP`` of the host's programs); the first
that exists and is a 64-bit ELF file for this machine is probed (its real path, one inode)."""

GROUP_PREFIX = "egress_agent_"
EVENT_NAME = "exec_argv"

SCALAR = 0
"""A layout entry for one plain u64 field (kernels before 4.20 have no arrays)."""

LAYOUTS: Tuple[Tuple[int, ...], ...] = (
    (64, 64, 64, 64),
    (64, 64),
    (SCALAR,) * 96,
)
"""u64 counts of the argument arrays, tried in order until the kernel takes one: 2,048 bytes
of arguments (arrays cannot exceed 64 elements; the kernel takes at most about 3 KiB of fields
per event).  Each u64 is one user-memory read in the trap: on this 2-core machine 6 x 64
cost about 120 us per exec, 4 x 64 about 70, 1 x 64 about 20 (``bench/exec_bench.py``);
2 KiB holds the command lines of short-lived programs, and a longer one is cut, marked, and
whole from ``/proc`` when the process lives until it is read.  The last layout, 96 plain u64
fields (768 bytes), is for kernels without array fetches (before 4.20)."""


def elf_entry_offset(path: str) -> int:
    """The file offset of the entry point of the ELF file ``path`` (for a uprobe), when it is
    a 64-bit little-endian ELF file.  Raises ValueError (not one) or OSError."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
        entry, phoff = struct.unpack_from("<QQ", header, 0x18)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        if phentsize < 56 or not 0 < phnum <= 64:
            raise ValueError(f"{path}: bad program headers")
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    for index in range(phnum):
        if len(table) < (index + 1) * phentsize:
            break
        kind, _, offset, vaddr, _, _, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", table, index * phentsize
        )
        if kind == 1 and vaddr <= entry < vaddr + memsz:  # PT_LOAD holding the entry
            return int(entry - vaddr + offset)
    raise ValueError(f"{path}: no loadable segment holds the entry point")


def find_loader(candidates: Sequence[str] = LOADERS) -> Optional[Tuple[str, int]]:
    """(real path, entry offset) of the first usable program interpreter, or None."""
    for candidate in candidates:
        try:
            real = os.path.realpath(candidate)
            return real, elf_entry_offset(real)
        except (OSError, ValueError):
            continue
    return None


def group_name(instance_name: str) -> str:
    """Our probe group for an instance (group names take letters, digits and ``_``)."""
    tail = re.sub(r"[^A-Za-z0-9_]", "_", instance_name)
    if tail.startswith("egress_agent_"):
        tail = tail[len("egress_agent_") :]
    return GROUP_PREFIX + tail


def probe_definition(group: str, path: str, offset: int, layout: Sequence[int]) -> str:
    """The ``uprobe_events`` line of our probe."""
    fields = ["argc=$stack0:u64"]
    start = 0
    for index, count in enumerate(layout):
        if count == SCALAR:
            fields.append(f"a{index}=+{start}($stack1):u64")
            start += 8
        else:
            fields.append(f"a{index}=+{start}($stack1):u64[{count}]")
            start += count * 8
    return f"p:{group}/{EVENT_NAME} {path}:0x{offset:x} {' '.join(fields)}"


class ExecProbe:
    """Our uprobe event: defined by :meth:`define`, removed by :meth:`remove`."""

    def __init__(self, root: str, group: str, path: str, offset: int, capacity: int) -> None:
        self.root = root
        self.group = group
        self.path = path
        self.offset = offset
        self.capacity = capacity
        """Bytes of arguments the event holds."""
        self.removed = False

    @property
    def system(self) -> str:
        return self.group

    @property
    def name(self) -> str:
        return EVENT_NAME

    @classmethod
    def define(
        cls,
        root: str,
        instance_name: str,
        loaders: Sequence[str] = LOADERS,
        layouts: Sequence[Tuple[int, ...]] = LAYOUTS,
    ) -> ExecProbe:
        """Define the probe for our instance.  Raises OSError (no ``uprobe_events``: the
        kernel lacks ``CONFIG_UPROBE_EVENTS``; every layout refused) or ValueError (no
        loader to probe)."""
        found = find_loader(loaders)
        if found is None:
            raise ValueError("no 64-bit dynamic loader found to probe")
        path, offset = found
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", path):
            raise ValueError(f"the loader's path {path!r} cannot be written in a probe")
        group = group_name(instance_name)
        events = os.path.join(root, "uprobe_events")
        remove_stale_probes(root)
        last = OSError(errno.EINVAL, "no layout accepted")
        for layout in layouts:
            try:
                _append(events, probe_definition(group, path, offset, layout))
            except OSError as error:
                if error.errno == errno.ENOENT:
                    raise
                last = error
                continue
            return cls(root, group, path, offset, sum(count or 1 for count in layout) * 8)
        raise last

    def remove(self) -> bool:
        """Remove the probe (our instance must be gone or have it disabled).  True when gone."""
        if self.removed:
            return True
        try:
            _append(os.path.join(self.root, "uprobe_events"), f"-:{self.group}/{EVENT_NAME}")
        except OSError as error:
            if error.errno != errno.ENOENT:
                log.warning("kernel events: cannot remove probe %s: %s", self.group, error)
                return False
        self.removed = True
        return True


def _append(path: str, line: str) -> None:
    """One write to a dynamic events file, appending (never truncating: that would remove
    every other tool's probes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def remove_stale_probes(root: str, instances: Optional[str] = None) -> List[str]:
    """Remove probes of our group prefix whose instance is gone (an agent killed before its
    close); their groups.  A probe still enabled somewhere is busy and stays."""
    instances = instances or os.path.join(root, "instances")
    try:
        with open(os.path.join(root, "uprobe_events"), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    live = set()
    with contextlib.suppress(OSError):
        live = {group_name(name) for name in os.listdir(instances)}
    removed = []
    for line in lines:
        match = re.match(r"[pr]:(" + GROUP_PREFIX + r"\w+)/(\w+) ", line)
        if not match or match.group(1) in live:
            continue
        with contextlib.suppress(OSError):
            _append(os.path.join(root, "uprobe_events"), f"-:{match.group(1)}/{match.group(2)}")
            removed.append(match.group(1))
    return removed


def decode_exec_args(fmt: EventFormat) -> Decoder[ExecArgs]:
    """Decoder of our probe's records: ``argc`` and the argument bytes (arrays ``a0``...).
    Raises FormatError when the event is not laid out so."""
    argc_field = fmt.require("argc")
    arrays = sorted(
        (field for field in fmt.fields if re.fullmatch(r"a\d+", field.name)),
        key=lambda field: int(field.name[1:]),
    )
    pid_field = fmt.require("common_pid")
    if not arrays or argc_field.size != 8:
        raise FormatError(f"{fmt.system}:{fmt.name}: not our argument probe")
    start = arrays[0].offset
    end = arrays[-1].offset + arrays[-1].size
    contiguous = all(a.offset + a.size == b.offset for a, b in zip(arrays, arrays[1:]))
    if not contiguous:
        raise FormatError(f"{fmt.system}:{fmt.name}: argument arrays are not contiguous")
    pid_at, argc_at = pid_field.offset, argc_field.offset
    unpack_pid = struct.Struct("<i").unpack_from
    unpack_argc = struct.Struct("<Q").unpack_from

    def decode(page: bytes, offset: int, length: int, time: int) -> Optional[ExecArgs]:
        if length < end:
            return None
        (pid,) = unpack_pid(page, offset + pid_at)
        (argc,) = unpack_argc(page, offset + argc_at)
        return split_arguments(time, pid, argc, page[offset + start : offset + end])

    return decode


def split_arguments(time: int, pid: int, argc: int, data: bytes) -> ExecArgs:
    """The first ``argc`` NUL-terminated strings of ``data``; ``cut`` when it ends first.
    Whatever follows them (the environment) is dropped here."""
    if argc <= 0:
        return ExecArgs(time, pid, (), False)
    parts = data.split(b"\0", min(argc, len(data)))
    argv = [os.fsdecode(part) for part in parts[:-1]]
    cut = len(argv) < argc
    if cut and parts[-1]:
        argv.append(os.fsdecode(parts[-1]))  # the argument the bound cut
    return ExecArgs(time, pid, tuple(argv), cut)
