"""Whether a network namespace's TCP connections can have changed since their last dump.

Every ``sock_diag`` dump of the TCP tables walks the kernel's whole established hash, which
every network namespace shares (``inet_diag_dump_icsk`` in ``net/ipv4/inet_diag.c``), so
reading N namespaces costs about N times reading one, however few sockets each holds.  A
namespace's own counters cost microseconds to read.  :func:`read_tcp_signals` reads those that
move when its set of TCP connections or their states change, and :class:`TcpReuse` keeps each
namespace's last dump with the signals read *before* it: when the signals read before the next
sample are equal, that dump still holds, and the sampler uses it instead of walking the hash.

The signals (``Documentation/networking/snmp_counter.rst``; ``tcp_set_state`` in
``net/ipv4/tcp.c``, ``sockstat_seq_show`` in ``net/ipv4/proc.c``), all per namespace:

- ``Tcp:`` of ``/proc/PID/net/snmp``, monotonic: ``ActiveOpens`` (every ``connect``),
  ``PassiveOpens`` (every accepted connection), ``AttemptFails`` (SYN_SENT or SYN_RECV to
  CLOSE), ``EstabResets`` (ESTABLISHED or CLOSE_WAIT to CLOSE); and the gauge ``CurrEstab``
  (ESTABLISHED, and since Linux 6.10 CLOSE_WAIT too);
- ``TCP: inuse`` and ``tw`` of ``sockstat``, ``TCP6: inuse`` of ``sockstat6``: sockets in the
  hash tables (every socket entering or leaving them) and TIME_WAIT sockets.

Not used: sockstat's ``orphan``, ``alloc`` and ``mem``, which count the whole host
(``tcp_orphan_count_sum``, ``proto_sockets_allocated_sum_positive``) and would move every
namespace whenever any one did; and the segment counters (``InSegs``, ``OutSegs``), which move
with every packet: they would see every state change, but a namespace carrying any traffic at
all would be read every time, which is where the saving is needed.

What the signals cannot see (the dump kept may be stale until the next full read):

- a TCP state change that moves no counter: ESTABLISHED to CLOSE_WAIT on Linux 6.10 and later
  (CLOSE_WAIT to LAST_ACK before 6.10), FIN_WAIT1 to FIN_WAIT2 or CLOSING; the connection is
  reported, with its earlier state;
- request sockets (SYN_RECV before the handshake's last ACK), which are counted nowhere;
- changes that cancel out in the gauges while no monotonic counter moves: a connection
  leaving from LAST_ACK (or reset in FIN_WAIT) while a listener opens; one connection's
  handshake completing while another closes; a TIME_WAIT ending while another begins while a
  listener opens.

Listeners and UDP sockets are not kept: their dumps are cheap (the listening hash, the UDP
table) and the sampler reads them every time, so direction, and UDP sockets connected or not,
are always current.  Owners are looked up anew for every sample, so a socket handed to another
process is seen with its new owner.  Whatever the signals miss is caught by the full read that
each namespace gets at least every ``full_read_every`` seconds.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from agent.collect.procnet import (
    INET_SOCKET_COUNTS,
    PROC_ROOT,
    Socket,
    parse_snmp,
    parse_sockstat_fields,
)

TCP_COUNTERS = ("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "CurrEstab")
"""The ``Tcp:`` counters of ``/proc/PID/net/snmp`` in a signature."""
SOCKSTAT_GAUGES = (("TCP", "inuse"), ("TCP", "tw"), ("TCP6", "inuse"))
"""The per-namespace sockstat figures in a signature."""

Signature = Tuple[int, ...]


@dataclass(frozen=True)
class TcpSignals:
    """One namespace's counters at one moment."""

    signature: Signature
    """The counters that move when its TCP connections change (see the module docstring)."""
    sockets: int
    """Its inet sockets: TCP and UDP ``inuse`` of both families plus TCP ``tw``."""
    active_opens: Optional[int]


def _read(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode("latin-1")


def read_tcp_signals(pid: int, proc_root: str = PROC_ROOT) -> TcpSignals:
    """The signals of PID's network namespace (``/proc/PID/net/{snmp,sockstat,sockstat6}``).

    ``sockstat6`` is missing without IPv6: its figures read as 0.  Raises OSError (the process
    is gone) and ValueError when ``snmp`` has no ``Tcp:`` section."""
    tcp = parse_snmp(_read(f"{proc_root}/{pid}/net/snmp"))
    if not tcp:
        raise ValueError(f"{proc_root}/{pid}/net/snmp has no Tcp: counters")
    fields = parse_sockstat_fields(_read(f"{proc_root}/{pid}/net/sockstat"))
    with contextlib.suppress(FileNotFoundError):
        fields.update(parse_sockstat_fields(_read(f"{proc_root}/{pid}/net/sockstat6")))
    signature = tuple(tcp.get(name, -1) for name in TCP_COUNTERS) + tuple(
        fields.get(key, -1) for key in SOCKSTAT_GAUGES
    )
    sockets = sum(fields.get(key, 0) for key in INET_SOCKET_COUNTS)
    return TcpSignals(signature, sockets, tcp.get("ActiveOpens"))


@dataclass
class TcpRead:
    """What one full read of a namespace's TCP connections kept, and the signals before it."""

    cookie: Optional[int]
    """The namespace's cookie (``SO_NETNS_COOKIE``, never reused), when the kernel has one."""
    signature: Signature
    sockets: List[Socket]
    """The kept (non-listening) TCP sockets."""
    records: int
    """How many records the kernel returned for them."""
    due: float
    """When (``clock()``) this namespace must be read in full again, whatever its signals."""


DEFAULT_FULL_READ_EVERY = 30.0
"""Seconds: the longest a namespace's TCP connections are taken from an earlier dump."""


class TcpReuse:
    """The last full TCP read of every namespace, and the rule for using it again.

    A read is used again when the namespace is the same one (inode and cookie), its signals
    equal those read before that dump, and the dump is younger than ``full_read_every``
    (spread by up to a quarter below it per namespace, so that namespaces read together do not
    all come due in the same sample).  ``full_read_every`` 0 turns reuse off.
    """

    def __init__(
        self,
        full_read_every: float = DEFAULT_FULL_READ_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_read_every = max(0.0, full_read_every)
        self.clock = clock
        self._reads: Dict[int, TcpRead] = {}

    @property
    def enabled(self) -> bool:
        return self.full_read_every > 0

    def usable(self, inode: int, cookie: Optional[int], signature: Signature) -> Optional[TcpRead]:
        """The last read of the namespace ``inode`` if it still holds, else None."""
        read = self._reads.get(inode)
        if read is None or read.cookie != cookie or read.signature != signature:
            return None
        if self.clock() >= read.due:
            return None
        return read

    def remember(
        self,
        inode: int,
        cookie: Optional[int],
        signature: Signature,
        sockets: List[Socket],
        records: int,
    ) -> None:
        """Keep a full read made after ``signature`` was read."""
        if not self.enabled:
            return
        spread = ((inode * 2654435761) & 0xFFFFFFFF) / 2**32  # Knuth's multiplicative hash
        due = self.clock() + self.full_read_every * (1.0 - 0.25 * spread)
        self._reads[inode] = TcpRead(cookie, signature, sockets, records, due)

    def forget(self, inode: int) -> None:
        self._reads.pop(inode, None)

    def keep_only(self, inodes: Iterable[int]) -> None:
        """Forget the namespaces that are gone (not among ``inodes``)."""
        alive: FrozenSet[int] = frozenset(inodes)
        for inode in [inode for inode in self._reads if inode not in alive]:
            del self._reads[inode]

    def __len__(self) -> int:
        return len(self._reads)
