"""Whether a network namespace's sockets can have changed since its last dump.

Every ``sock_diag`` dump of the TCP tables walks the kernel's whole established hash, which
every network namespace shares (``inet_diag_dump_icsk`` in ``net/ipv4/inet_diag.c``), so
reading N namespaces costs about N times reading one, however few sockets each holds.  A
namespace's own counters cost microseconds to read.  :func:`read_signals` reads those that
move when its sockets or their states change, and :class:`Reuse` keeps each namespace's last
read with the signals read *before* it: when the signals read before the next sample are equal,
that read still holds, and the sampler uses it instead of asking the kernel again.

The signals, all per namespace (``Documentation/networking/snmp_counter.rst``;
``tcp_set_state`` in ``net/ipv4/tcp.c``, ``sockstat_seq_show`` in ``net/ipv4/proc.c``):

- TCP: ``Tcp:`` of ``/proc/PID/net/snmp``, monotonic: ``ActiveOpens`` (every ``connect``),
  ``PassiveOpens`` (every accepted connection), ``AttemptFails`` (SYN_SENT or SYN_RECV to
  CLOSE), ``EstabResets`` (ESTABLISHED or CLOSE_WAIT to CLOSE); the gauge ``CurrEstab``
  (ESTABLISHED, and since Linux 6.10 CLOSE_WAIT too); ``TCP: inuse`` and ``tw`` of
  ``sockstat`` and ``TCP6: inuse`` of ``sockstat6``: sockets in the hash tables, listeners
  included (every socket entering or leaving them), and TIME_WAIT sockets;
- UDP: ``UDP: inuse`` and ``UDP6: inuse`` (every socket bound or connected, every close), and
  the datagram counters ``Udp: InDatagrams, OutDatagrams`` of ``snmp`` and, when the namespace
  has UDP6 sockets, ``Udp6InDatagrams, Udp6OutDatagrams`` of ``snmp6`` (every datagram: a
  socket connected to a new peer moves them with its first one).

Not used: sockstat's ``orphan``, ``alloc`` and ``mem``, which count the whole host
(``tcp_orphan_count_sum``, ``proto_sockets_allocated_sum_positive``) and would move every
namespace whenever any one did; and TCP's segment counters (``InSegs``, ``OutSegs``), which
move with every packet: they would see every state change, but a namespace carrying any TCP
traffic at all would be dumped every time, which is where the saving is needed.

What the signals cannot see (the read kept is stale until the next full read):

- a TCP state change that moves no counter: ESTABLISHED to CLOSE_WAIT on Linux 6.10 and later
  (CLOSE_WAIT to LAST_ACK before 6.10), FIN_WAIT1 to FIN_WAIT2 or CLOSING; the connection is
  reported, with its earlier state;
- request sockets (SYN_RECV before the handshake's last ACK), which are counted nowhere;
- a UDP socket connected to another peer that has sent nothing yet (nothing went out);
- changes that cancel out in the gauges while no monotonic counter moves: a connection
  leaving from LAST_ACK (or reset in FIN_WAIT) while a listener opens; one connection's
  handshake completing while another closes; a TIME_WAIT ending while another begins while a
  listener opens; a UDP socket closing while another opens, neither sending.

Owners are looked up anew for every sample (one readlink per socket when they stay), so a
socket handed to another process is seen with its new owner.  Whatever the signals miss is
caught by the full read that each namespace gets at least every ``full_read_every`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from agent.collect.netns import PROC_ROOT
from agent.collect.sockets.procnet import ListenerIndex, Socket

TCP_COUNTERS = ("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "CurrEstab")
"""The ``Tcp:`` counters of ``/proc/PID/net/snmp`` in a TCP signature."""
UDP_COUNTERS = ("InDatagrams", "OutDatagrams")
"""The ``Udp:`` counters of ``snmp`` (IPv4, and IPv4-mapped sends of IPv6 sockets)."""
UDP6_COUNTERS = (b"Udp6InDatagrams", b"Udp6OutDatagrams")
"""Their IPv6 counterparts in ``/proc/PID/net/snmp6``, read when the namespace has UDP6
sockets."""


Signature = Tuple[int, ...]


@dataclass(frozen=True)
class Signals:
    """One namespace's counters at one moment."""

    tcp: Signature
    """What moves when its TCP sockets (listeners included) change (the module docstring)."""
    udp: Signature
    """What moves when its UDP sockets change or send: UDP ``inuse`` of both families and the
    datagram counters."""
    sockets: int
    """Its inet sockets: TCP and UDP ``inuse`` of both families plus TCP ``tw``."""
    active_opens: Optional[int]


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


_Columns = Dict[Tuple[bytes, Tuple[bytes, ...]], Tuple[int, ...]]
_COLUMNS: _Columns = {}


def _line(text: bytes, prefix: bytes, start: int = 0) -> Tuple[bytes, int]:
    """The first line of ``text`` from ``start`` on that begins with ``prefix`` (without it),
    and where it ends; (b"", -1) when there is none."""
    at = start if text.startswith(prefix, start) else -1
    if at < 0:
        at = text.find(b"\n" + prefix, start)
        if at < 0:
            return b"", -1
        at += 1
    end = text.find(b"\n", at)
    if end < 0:
        end = len(text)
    return text[at + len(prefix) : end], end


def _section(text: bytes, prefix: bytes, names: Tuple[bytes, ...]) -> Tuple[int, ...]:
    """The values of ``names`` in a ``snmp`` section: a line of names, then one of values."""
    header, end = _line(text, prefix)
    if end < 0:
        return ()
    line, _ = _line(text, prefix, end)
    values = line.split()
    key = (header, names)
    columns = _COLUMNS.get(key)
    if columns is None:  # the same header for every namespace of a kernel: looked up once
        words = header.split()
        columns = _COLUMNS[key] = tuple(words.index(n) if n in words else -1 for n in names)
    return tuple(int(values[i]) if 0 <= i < len(values) else -1 for i in columns)


def _figures(text: bytes, name: bytes, keys: Tuple[bytes, ...]) -> Tuple[int, ...]:
    """``keys`` of the sockstat line ``name`` (``TCP: inuse 7 orphan 0 tw 3 ...``); -1 for
    what is missing."""
    line, _ = _line(text, name)
    words = line.split()
    figures = []
    for key in keys:
        try:
            figures.append(int(words[words.index(key) + 1]))
        except (ValueError, IndexError):
            figures.append(-1)
    return tuple(figures)


def _snmp6_udp(path: str) -> Tuple[int, ...]:
    text = _read(path)
    values = []
    for name in UDP6_COUNTERS:
        start = text.find(name + b" ")
        values.append(int(text[start + len(name) :].split(None, 1)[0]) if start >= 0 else -1)
    return tuple(values)


_TCP_NAMES = tuple(name.encode() for name in TCP_COUNTERS)
_UDP_NAMES = tuple(name.encode() for name in UDP_COUNTERS)


def read_signals(pid: int, proc_root: str = PROC_ROOT) -> Signals:
    """The signals of PID's network namespace (``/proc/PID/net/{snmp,sockstat,sockstat6}``,
    and ``snmp6`` when it has UDP6 sockets).

    ``sockstat6`` is missing without IPv6: its figures read as 0.  Raises OSError (the process
    is gone) and ValueError when ``snmp`` has no ``Tcp:`` section.  Read often (every
    namespace, every sample): a few microseconds of Python each."""
    base = f"{proc_root}/{pid}/net/"
    snmp = _read(base + "snmp")
    tcp = _section(snmp, b"Tcp:", _TCP_NAMES)
    if not tcp:
        raise ValueError(f"{base}snmp has no Tcp: counters")
    udp = _section(snmp, b"Udp:", _UDP_NAMES)
    sockstat = _read(base + "sockstat")
    tcp_inuse, tw = _figures(sockstat, b"TCP:", (b"inuse", b"tw"))
    (udp_inuse,) = _figures(sockstat, b"UDP:", (b"inuse",))
    tcp6_inuse = udp6_inuse = 0
    with contextlib.suppress(FileNotFoundError):
        sockstat6 = _read(base + "sockstat6")
        (tcp6_inuse,) = _figures(sockstat6, b"TCP6:", (b"inuse",))
        (udp6_inuse,) = _figures(sockstat6, b"UDP6:", (b"inuse",))
    udp6 = _snmp6_udp(base + "snmp6") if udp6_inuse > 0 else ()
    sockets = sum(max(0, n) for n in (tcp_inuse, tw, udp_inuse, tcp6_inuse, udp6_inuse))
    return Signals(
        (*tcp, tcp_inuse, tw, tcp6_inuse),
        (*udp, udp_inuse, udp6_inuse, *udp6),
        sockets,
        tcp[0] if tcp[0] >= 0 else None,
    )


@dataclass
class NamespaceRead:
    """What one read of a namespace kept, and the signals read before it."""

    witness: int
    """The pid its tables were read through: a namespace whose first pid changed is read
    again (its inode could be a new namespace's; see :meth:`Reuse.whole`)."""
    cookie: Optional[int]
    """The namespace's cookie (``SO_NETNS_COOKIE``, never reused), when the kernel has one."""
    signals: Signals
    tcp: List[Socket]
    """The kept TCP sockets of the established hash (not listening)."""
    rest: List[Socket]
    """The other kept sockets: UDP (and, with ``want_all``, listeners)."""
    listeners: ListenerIndex
    records: int
    """How many records the kernel returned."""
    due: float
    """When (``clock()``) this namespace must be read in full again, whatever its signals."""


DEFAULT_FULL_READ_EVERY = 30.0
"""Seconds: the longest a namespace's sockets are taken from an earlier dump."""


class Reuse:
    """The last read of every namespace, and the rules for using it again.

    - :meth:`whole`: nothing is dumped, the last read's sockets and listeners serve, when the
      namespace's TCP and UDP signals both equal those read before that read, its first pid is
      the one it was read through, and the read is not due;
    - :meth:`tcp`: only the established hash is not walked again (listeners and UDP are
      dumped: cheap), when the TCP signals are equal, the namespace has the same cookie, and
      the read is not due.

    A read is due ``full_read_every`` seconds after it was made (spread by up to a quarter
    below that per namespace, so that namespaces read together do not all come due in the same
    sample).  ``full_read_every`` 0 turns reuse off.
    """

    def __init__(
        self,
        full_read_every: float = DEFAULT_FULL_READ_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full_read_every = max(0.0, full_read_every)
        self.clock = clock
        self._reads: Dict[int, NamespaceRead] = {}

    @property
    def enabled(self) -> bool:
        return self.full_read_every > 0

    def _current(self, inode: int) -> Optional[NamespaceRead]:
        read = self._reads.get(inode)
        if read is None or self.clock() >= read.due:
            return None
        return read

    def whole(self, inode: int, witness: int, signals: Signals) -> Optional[NamespaceRead]:
        """The last read if none of the namespace's sockets can have changed since.

        Without a netlink socket there is no cookie to tell a namespace from a later one that
        got its inode number: the first pid stands in (a new namespace has new processes)."""
        read = self._current(inode)
        if read is None or read.witness != witness or read.signals != signals:
            return None
        return read

    def tcp(self, inode: int, cookie: Optional[int], signals: Signals) -> Optional[NamespaceRead]:
        """The last read if the namespace's TCP connections cannot have changed since."""
        read = self._current(inode)
        if read is None or read.cookie != cookie or read.signals.tcp != signals.tcp:
            return None
        return read

    def remember(self, inode: int, read: NamespaceRead) -> None:
        """Keep a read made after ``read.signals`` were read; ``read.due`` is set here."""
        if not self.enabled:
            return
        spread = ((inode * 2654435761) & 0xFFFFFFFF) / 2**32  # Knuth's multiplicative hash
        read.due = self.clock() + self.full_read_every * (1.0 - 0.25 * spread)
        self._reads[inode] = read

    def refresh(self, inode: int, read: NamespaceRead) -> None:
        """Keep a read whose TCP part came from an earlier one: it stays due when that was."""
        if self.enabled:
            self._reads[inode] = read

    def forget(self, inode: int) -> None:
        self._reads.pop(inode, None)

    def keep_only(self, inodes: Iterable[int]) -> None:
        """Forget the namespaces that are gone (not among ``inodes``)."""
        alive: FrozenSet[int] = frozenset(inodes)
        for inode in [inode for inode in self._reads if inode not in alive]:
            del self._reads[inode]

    def __len__(self) -> int:
        return len(self._reads)

    def __contains__(self, inode: object) -> bool:
        return inode in self._reads
