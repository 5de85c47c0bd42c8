"""Datagram flows from kernel events: a flow is a datagram that left, and a reply is inbound.

:class:`DatagramFlows` turns output route lookups (``fib``/``fib6``: the sending thread,
protocol, destination and ports), the sends and receives of datagram sockets
(``sock:sock_send_length``/``sock_recv_length``, 6.3+) and the bounds of ``connect(2)``
(``syscalls:sys_enter_connect``/``sys_exit_connect``) into one record per flow: process,
namespace, protocol, local port, peer and direction.

The kernel facts, and what each decides (``docs/EVENTS.md`` has the versions):

- A route lookup made inside ``connect()`` is a connect's: a UDP, ping or raw socket's
  connect sends nothing (glibc's ``getaddrinfo`` connects a UDP socket to each address of an
  answer to sort them by RFC 6724, ping connects one to learn its source address).  It becomes
  a flow only when the process then sends through a socket (``sock_send_length`` with a
  length): the newest such lookup of the process not older than that socket's last send is
  the one it sent to.  Without the send events (before 6.3) it is not reported: samples show a
  connected socket that lives through one.  SCTP's connect sends its INIT: a flow at once.
- A lookup outside ``connect()`` is a send's (``sendto()`` on an unconnected socket): with the
  send events it becomes a flow at the send that follows it in the same process (a failed
  send makes none); without them, at once.
- A reply: the datagram is inbound when its socket (``sk`` of the send) received a datagram
  (``sock_recv_length``) since its last send from the same local port, and had not connected
  to its peer: the peer wrote first (dnsmasq answering a client).  Once a flow read one way,
  it keeps it while the table remembers it, so a client polling from a bound port (NTP) stays
  outbound after its first answer.  Without the receive events the ports decide
  (:func:`agent.inet.reply_by_ports`: from a service port to a port above them).

Where the kernel cannot tell: the send event names the socket but not its peer, so a process
that connects a socket and then sends through another one it connected earlier has that send
taken for the newer connect (the older socket's flow was reported when it first sent); a
socket address reused by a new socket is told apart by its local port.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Set, Tuple

from agent.collect.kernel.records import (
    IN_INTERRUPT,
    LOOPBACK_IFINDEX,
    ConnectCall,
    RouteLookup,
    SocketTransfer,
)
from agent.identity import NO_OWNER, Identity
from agent.inet import (
    INBOUND,
    IPPROTO_RAW,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    OUTBOUND,
    reply_by_ports,
)

_NS_PER_S = 1_000_000_000
_UNSEEN = -1
"""The protocol of a placeholder: a ``connect()`` whose lookup did not reach us."""


@dataclass(eq=False)
class Datagram:
    """One output route lookup of a datagram protocol, with who made it and where it was."""

    time: int
    identity: Identity
    netns: Optional[int]
    tgid: int
    version: int
    protocol: int
    saddr: bytes
    sport: int
    daddr: bytes
    dport: int
    in_connect: bool

    def same_flow(self, other: Datagram) -> bool:
        return (
            self.protocol == other.protocol
            and self.sport == other.sport
            and self.daddr == other.daddr
            and self.dport == other.dport
            and self.in_connect == other.in_connect
        )


@dataclass
class _Socket:
    """What the events told of one datagram socket (by its kernel address)."""

    claimed_ns: int = -1
    """When a send of it last took a route lookup as its own."""
    sent_ns: int = -1
    received_ns: int = -1
    port: Optional[int] = None
    """The local port of the lookup its last claimed send took."""


Who = Callable[[int], Tuple[Identity, Optional[int], int]]
"""thread id -> (identity of its process, its network namespace, its process id)."""
Emit = Callable[[Datagram, str], None]
Place = Callable[[int, int, bytes, str], Optional[int]]
"""(thread id, version, source address, output device) -> the namespace holding them, for a
thread whose own namespace could not be read."""


class DatagramFlows:
    """The datagram state machine of the tracker (see the module's docstring).

    ``who`` names the process and namespace of a thread; ``emit`` takes each new flow with its
    direction.  ``sends_known``/``receives_known``: whether the kernel gives the send and
    receive events (set by the source from the events it enabled).  Not thread-safe.
    """

    def __init__(
        self,
        who: Who,
        emit: Emit,
        ttl_s: float = 60.0,
        max_flows: int = 1 << 16,
        max_candidates: int = 8,
        sends_known: bool = False,
        receives_known: bool = False,
        place: Optional[Place] = None,
    ) -> None:
        self.place = place
        self.who = who
        self.emit = emit
        self.ttl_ns = int(ttl_s * _NS_PER_S)
        self.max_flows = max_flows
        self.max_candidates = max_candidates
        self.sends_known = sends_known
        self.receives_known = receives_known
        self.flows: collections.OrderedDict[Tuple[object, ...], int] = collections.OrderedDict()
        """flow key -> when a datagram of it last left (one record per ``ttl_s`` of quiet)."""
        self.directions: collections.OrderedDict[Tuple[object, ...], str] = (
            collections.OrderedDict()
        )
        """flow key -> the direction it first read (kept longer than the flow: ``max_flows``)."""
        self.candidates: Dict[int, Deque[Datagram]] = {}
        """process -> its lookups waiting for a send, newest last."""
        self.sockets: collections.OrderedDict[int, _Socket] = collections.OrderedDict()
        self.in_connect: Set[int] = set()
        """Threads inside ``connect(2)`` now."""
        self._placeholders: Dict[int, Datagram] = {}
        self.connect_lookups = 0
        """Lookups made by ``connect()`` (a socket that may never send)."""
        self.unsent = 0
        """Candidates dropped without a send (expired or pushed out)."""

    # -- events ------------------------------------------------------------------------------------

    def connect_call(self, event: ConnectCall) -> None:
        """Inside ``connect()``, a placeholder waits for the process's next send: a datagram
        socket connected where no lookup reached us (a destination the kernel filter drops),
        whose sends must not take an older lookup (RFC 6724 probes) for theirs.  The
        connect's own lookup replaces it; a TCP connect takes it away."""
        if not event.entering:
            self.in_connect.discard(event.pid)
            return
        self.in_connect.add(event.pid)
        if not self.sends_known:
            return
        _, _, tgid = self.who(event.pid)
        stand_in = Datagram(event.time, NO_OWNER, None, tgid, 0, _UNSEEN, b"", 0, b"", 0, True)
        self._placeholders[event.pid] = stand_in
        self._wait(stand_in)

    def tcp_connect(self, tid: int) -> None:
        """Thread ``tid``'s ``connect()`` is a TCP one: its placeholder goes."""
        stand_in = self._placeholders.pop(tid, None)
        if stand_in is not None:
            waiting = self.candidates.get(stand_in.tgid)
            if waiting and stand_in in waiting:
                waiting.remove(stand_in)

    def lookup(self, event: RouteLookup) -> None:
        protocol = event.protocol
        if event.flags & IN_INTERRUPT or event.iif != LOOPBACK_IFINDEX or protocol == IPPROTO_TCP:
            return
        if protocol == 0:
            return
        identity, netns, tgid = self.who(event.pid)
        if netns is None and self.place is not None:
            netns = self.place(event.pid, event.version, event.saddr, event.device)
        in_connect = event.pid in self.in_connect
        datagram = Datagram(
            event.time,
            identity,
            netns,
            tgid,
            event.version,
            protocol,
            event.saddr,
            event.sport,
            event.daddr,
            event.dport,
            in_connect,
        )
        if in_connect:
            self.connect_lookups += 1
            stand_in = self._placeholders.pop(event.pid, None)
            waiting = self.candidates.get(tgid)
            if stand_in is not None and waiting and stand_in in waiting:
                waiting.remove(stand_in)
        if protocol == IPPROTO_SCTP:
            self._flow(datagram, OUTBOUND)  # an association's INIT leaves at once
        elif self.sends_known:
            self._wait(datagram)
        elif not in_connect:
            reply = reply_by_ports(datagram.sport, datagram.dport)
            self._flow(datagram, INBOUND if reply else OUTBOUND)

    def transfer(self, event: SocketTransfer) -> None:
        if event.flags & IN_INTERRUPT:
            return
        sock = self.sockets.get(event.sk)
        if sock is None:
            sock = self.sockets[event.sk] = _Socket()
            if len(self.sockets) > self.max_flows:
                self.sockets.popitem(last=False)
        else:
            self.sockets.move_to_end(event.sk)
        if not event.sent:
            sock.received_ns = event.time
            return
        _, _, tgid = self.who(event.pid)
        waiting = self.candidates.get(tgid)
        taken = self._take(waiting, event, sock) if waiting else None
        if taken is not None:
            sock.claimed_ns = event.time
            if taken.protocol != _UNSEEN:
                direction = OUTBOUND if taken.in_connect else self._reply_direction(sock, taken)
                sock.port = taken.sport
                self._flow(taken, direction)
        sock.sent_ns = event.time

    # -- inside ------------------------------------------------------------------------------------

    def _wait(self, datagram: Datagram) -> None:
        waiting = self.candidates.get(datagram.tgid)
        if waiting is None:
            waiting = self.candidates[datagram.tgid] = collections.deque()
        elif waiting and waiting[-1].same_flow(datagram):
            waiting[-1] = datagram  # one lookup per routing table tried (local, then main)
            return
        waiting.append(datagram)
        horizon = datagram.time - self.ttl_ns
        while waiting and (len(waiting) > self.max_candidates or waiting[0].time < horizon):
            waiting.popleft()
            self.unsent += 1

    def _take(
        self, waiting: Deque[Datagram], event: SocketTransfer, sock: _Socket
    ) -> Optional[Datagram]:
        """The newest waiting lookup of the sending process of the send's protocol (any, from a
        raw socket of another) made after the socket last took one: the one this send sent."""
        protocol = event.protocol
        for index in range(len(waiting) - 1, -1, -1):
            candidate = waiting[index]
            if candidate.time <= sock.claimed_ns:
                return None  # and every older one
            if candidate.protocol in (protocol, _UNSEEN) or protocol in (0, IPPROTO_RAW):
                del waiting[index]
                return candidate
        return None

    def _reply_direction(self, sock: _Socket, datagram: Datagram) -> str:
        if not self.receives_known or datagram.protocol != IPPROTO_UDP:
            return INBOUND if reply_by_ports(datagram.sport, datagram.dport) else OUTBOUND
        answered = sock.received_ns > sock.sent_ns and sock.port in (None, datagram.sport)
        return INBOUND if answered else OUTBOUND

    def _flow(self, datagram: Datagram, direction: str) -> None:
        key = (
            datagram.netns,
            datagram.identity.pid,
            datagram.version,
            datagram.protocol,
            datagram.sport,
            datagram.daddr,
            datagram.dport,
        )
        flows = self.flows
        seen = flows.get(key)
        flows[key] = datagram.time
        flows.move_to_end(key)
        if seen is not None and datagram.time - seen < self.ttl_ns:
            return
        horizon = datagram.time - self.ttl_ns
        while flows:
            oldest_key, oldest = next(iter(flows.items()))
            if oldest >= horizon and len(flows) <= self.max_flows:
                break
            del flows[oldest_key]
        directions = self.directions
        direction = directions.setdefault(key, direction)
        directions.move_to_end(key)
        if len(directions) > self.max_flows:
            directions.popitem(last=False)
        self.emit(datagram, direction)

    # -- upkeep ------------------------------------------------------------------------------------

    def forget_thread(self, tid: int) -> None:
        self.in_connect.discard(tid)
        self._placeholders.pop(tid, None)

    def forget_process(self, tgid: int) -> None:
        """A process that exited sends nothing more: its waiting lookups go."""
        waiting = self.candidates.pop(tgid, None)
        if waiting:
            self.unsent += len(waiting)
