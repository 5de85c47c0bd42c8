"""The clocks the history records beside wall time: the boot id and ``CLOCK_BOOTTIME``.

``CLOCK_BOOTTIME`` counts seconds since boot, suspend included, and no setting of the wall
clock (``settimeofday``, an NTP step, a host without a real-time clock before NTP syncs) moves
it (clock_gettime(2), Linux 2.6.39+).  Two readings of the same boot therefore say how much time
really passed; a wall clock that moved by more than that jumped.  The boot id
(``/proc/sys/kernel/random/boot_id``, random(4)) says whether two readings are of the same boot.
"""

from __future__ import annotations

import time
from typing import Callable

BootClock = Callable[[], float]
"""Seconds on ``CLOCK_BOOTTIME`` (injected in tests: the machine's clock is not theirs)."""

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_clock() -> float:
    """``CLOCK_BOOTTIME`` (``CLOCK_MONOTONIC`` where the platform has no boot clock)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return time.monotonic()
    return time.clock_gettime(clock)


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot's id, or "" where the kernel gives none."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""
