"""DNS packets to answers: matched to the queries that asked for them, TCP reassembled.

Which answers count (RFC 5452 section 3, what a resolver itself accepts): a response must
come from the address and port a query seen leaving this namespace went to, to the address and
port it came from, with its id and question; anything else is an unsolicited answer, and is
dropped.  Loopback too (issue 23): any process of the namespace can send there, a local user
included, so an answer from a local stub (systemd-resolved at 127.0.0.53, dnsmasq) counts only
when it matches a query sent to it.  Docker's embedded server (127.0.0.11) gets its queries on
a port its NAT rules chose and answers from port 53: on loopback the server's port is not
compared (its address, the client's address and port, the id and the question are).  At most
:data:`MAX_ANSWERS_TAKEN` address records of one message are taken.  DNS over TCP (RFC 7766;
after a truncated UDP answer) is reassembled per flow, from its SYN, within small bounds.

:class:`AnswerTracker` is that logic on packets, without sockets; answers go into a
:class:`agent.collect.dns.cache.NameCache`.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple, TypeVar

from agent.collect.dns.cache import NameCache
from agent.collect.dns.filter import (
    DNS_PORT,
    PACKET_HOST,
    PACKET_OUTGOING,
    SNAPLEN,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)
from agent.collect.dns.parse import OPCODE_QUERY, RCODE_NOERROR, parse_message
from agent.inet import IPPROTO_TCP, IPPROTO_UDP

MAX_PENDING = 4096
PENDING_TIMEOUT = 15.0
"""How long a query waits for its answer (resolvers give up after 5 s a try)."""
MAX_FLOWS = 256
MAX_BUFFERED = 1 << 20
"""TCP bytes held for reassembly across every flow."""
MAX_HELD_SEGMENTS = 8
"""Out-of-order segments kept per flow until the gap before them fills."""
FLOW_TIMEOUT = 30.0
MAX_ANSWERS_TAKEN = 32
"""Address records taken from one answer (a name served by many addresses has a dozen or two;
a message may hold hundreds, all to fill the cache)."""
# --- packets to answers ----------------------------------------------------------------------


@dataclass
class Counters:
    """What one namespace's packets came to."""

    packets: int = 0
    queries: int = 0
    """Queries seen leaving the namespace (to a server beyond it, or on loopback)."""
    responses: int = 0
    accepted: int = 0
    """Responses matched to their query, whose answers were taken."""
    unsolicited: int = 0
    """Responses no query seen asked for (late, spoofed, or asked before the watch began)."""
    malformed: int = 0
    answers: int = 0
    """Address records added to the name cache."""
    answers_cut: int = 0
    """Address records of accepted answers past :data:`MAX_ANSWERS_TAKEN`, not taken."""
    tcp_messages: int = 0
    tcp_dropped: int = 0
    """TCP flows given up: joined mid-stream, a gap that did not fill, over the bounds."""
    kernel_drops: int = 0
    """Packets the kernel dropped because the socket's buffer was full (PACKET_STATISTICS)."""
    errors: int = 0
    """Packets whose handling failed inside the agent (a bug: ``last_error`` says which)."""
    last_error: str = ""


_Address = bytes
_FlowKey = Tuple[int, _Address, int, _Address, int]
"""(namespace, source address, source port, destination address, destination port)"""
_PendingKey = Tuple[int, int, _Address, int, _Address, int, int]
"""(namespace, protocol, client address, client port, server address, server port, id)"""


@dataclass
class _Stream:
    """One direction of a TCP flow: bytes of DNS messages, each after its 2-byte length."""

    next_seq: int
    last_seen: float
    loopback: bool
    buffer: bytearray = field(default_factory=bytearray)
    held: List[Tuple[int, bytes]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.buffer) + sum(len(data) for _, data in self.held)


def _after(seq: int, base: int) -> int:
    """How far ``seq`` lies after ``base`` in 32-bit sequence space (negative: before)."""
    return ((seq - base + 0x80000000) & 0xFFFFFFFF) - 0x80000000


_IPV4 = struct.Struct("!BxHxxHxBxx4s4s")
_IPV6 = struct.Struct("!BxxxHBx16s16s")
_PORTS = struct.Struct("!HH")
_UDP_LENGTH = struct.Struct("!xxxxH")
_TCP = struct.Struct("!HHIxxxxBB")


class AnswerTracker:
    """Packets of DNS (as :func:`dns_filter` lets them through) into the name cache.

    Not thread-safe: one thread feeds it (the watch's).  Every table it keeps is bounded:
    queries waiting (:data:`MAX_PENDING`), TCP flows (:data:`MAX_FLOWS`) and the bytes they
    hold (:data:`MAX_BUFFERED`).  Over a bound, the namespace holding the most pays, its oldest
    first (issue 23: a namespace flooding queries or flows never pushes out another's waiting
    query, whose answer would then count as unsolicited); a segment over the byte bound ends
    its own flow.
    """

    def __init__(
        self,
        cache: NameCache,
        max_pending: int = MAX_PENDING,
        max_flows: int = MAX_FLOWS,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.cache = cache
        self.max_pending = max_pending
        self.max_flows = max_flows
        self.max_buffered = max_buffered
        self.counters: Dict[int, Counters] = {}
        self._pending: OrderedDict[_PendingKey, Tuple[float, str, int]] = OrderedDict()
        self._flows: OrderedDict[_FlowKey, _Stream] = OrderedDict()
        self._pending_of: Dict[int, int] = {}
        """namespace -> its queries waiting"""
        self._flows_of: Dict[int, int] = {}
        """namespace -> its TCP flows followed"""
        self._buffered = 0

    def counters_of(self, namespace: int) -> Counters:
        found = self.counters.get(namespace)
        if found is None:
            found = self.counters[namespace] = Counters()
        return found

    def packet(
        self, namespace: int, data: bytes, packet_type: int, loopback: bool, now: float
    ) -> None:
        """One packet from the IP header on, as a cooked socket gives it, with the packet
        type and whether it came over loopback (``sockaddr_ll``); never raises on bad input."""
        counters = self.counters_of(namespace)
        counters.packets += 1
        if len(data) < 20:
            return
        version = data[0] >> 4
        if version == 4:
            first, total, fragment, protocol, source, destination = _IPV4.unpack_from(data)
            header = (first & 0x0F) * 4
            if header < 20 or fragment & 0x1FFF:
                return
            end = min(len(data), total)
        elif version == 6:
            if len(data) < 40:
                return
            _, payload_length, protocol, source, destination = _IPV6.unpack_from(data)
            header = 40
            end = min(len(data), 40 + payload_length)
        else:
            return
        if end < header + 8:
            return
        sport, dport = _PORTS.unpack_from(data, header)
        if sport == DNS_PORT and packet_type == PACKET_HOST:
            outgoing = False
        elif packet_type == PACKET_OUTGOING and (dport == DNS_PORT or loopback):
            outgoing = True  # on loopback, to whatever port Docker's NAT chose
        else:
            return
        if protocol == IPPROTO_UDP:
            (length,) = _UDP_LENGTH.unpack_from(data, header)
            payload = data[header + 8 : min(end, header + length)]
            self._message(
                namespace,
                protocol,
                source,
                sport,
                destination,
                dport,
                payload,
                now,
                outgoing,
                loopback,
            )
        elif protocol == IPPROTO_TCP:
            if end < header + 20:
                return
            _, _, seq, offset, flags = _TCP.unpack_from(data, header)
            start = header + (offset >> 4) * 4
            payload = data[start:end] if start <= end else b""
            key = (namespace, source, sport, destination, dport)
            self._segment(key, seq, flags, payload, now, outgoing, loopback)

    # --- UDP and reassembled TCP messages -------------------------------------------------

    def _message(
        self,
        namespace: int,
        protocol: int,
        source: bytes,
        sport: int,
        destination: bytes,
        dport: int,
        payload: bytes,
        now: float,
        outgoing: bool,
        loopback: bool,
    ) -> None:
        counters = self.counters_of(namespace)
        head = parse_message(payload, answers=False)
        if head.question is None:
            counters.malformed += 1
            return
        if outgoing:
            if head.response or head.opcode != OPCODE_QUERY:
                return
            counters.queries += 1
            server_port = 0 if loopback else dport
            key = (namespace, protocol, source, sport, destination, server_port, head.id)
            if key not in self._pending:
                _count(self._pending_of, namespace, 1)
            self._pending[key] = (now + PENDING_TIMEOUT, head.question.name, head.question.qtype)
            self._pending.move_to_end(key)
            while len(self._pending) > self.max_pending:
                self._drop_pending(_oldest_of(self._pending, _largest(self._pending_of)))
            return
        if not head.response:
            return
        counters.responses += 1
        server_port = 0 if loopback else sport
        key = (namespace, protocol, destination, dport, source, server_port, head.id)
        waiting = self._pending.pop(key, None)
        if waiting is not None:
            _count(self._pending_of, namespace, -1)
        if (
            waiting is None
            or waiting[0] < now
            or waiting[1] != head.question.name
            or waiting[2] != head.question.qtype
        ):
            counters.unsolicited += 1
            return
        counters.accepted += 1
        message = parse_message(payload)
        if message.problem:
            counters.malformed += 1
        if message.rcode != RCODE_NOERROR:
            return
        for found in message.answers[:MAX_ANSWERS_TAKEN]:
            self.cache.add(namespace, found.version, found.address, found.chain, found.ttl, now)
            counters.answers += 1
        counters.answers_cut += max(0, len(message.answers) - MAX_ANSWERS_TAKEN)

    def _segment(
        self,
        key: _FlowKey,
        seq: int,
        flags: int,
        payload: bytes,
        now: float,
        outgoing: bool,
        loopback: bool,
    ) -> None:
        namespace = key[0]
        if flags & TCP_SYN:
            self._close(key)
            self._flows[key] = _Stream((seq + 1) & 0xFFFFFFFF, now, loopback)
            _count(self._flows_of, namespace, 1)
            while len(self._flows) > self.max_flows:
                self._close(_oldest_of(self._flows, _largest(self._flows_of)), lost=True)
            seq = (seq + 1) & 0xFFFFFFFF  # data on a SYN (TCP Fast Open) follows it
        stream = self._flows.get(key)
        if stream is None:
            if payload:
                self.counters_of(namespace).tcp_dropped += 1
            return
        stream.last_seen = now
        self._flows.move_to_end(key)
        if payload and not self._take(key, stream, seq, payload):
            return
        while len(stream.buffer) >= 2:
            length = (stream.buffer[0] << 8) | stream.buffer[1]
            if len(stream.buffer) < 2 + length:
                break
            message = bytes(stream.buffer[2 : 2 + length])
            del stream.buffer[: 2 + length]
            self._buffered -= 2 + length
            self.counters_of(namespace).tcp_messages += 1
            _, source, sport, destination, dport = key
            self._message(
                namespace,
                IPPROTO_TCP,
                source,
                sport,
                destination,
                dport,
                message,
                now,
                outgoing,
                loopback,
            )
        if flags & (TCP_FIN | TCP_RST):
            self._close(key)

    def _take(self, key: _FlowKey, stream: _Stream, seq: int, payload: bytes) -> bool:
        """Add a segment's bytes in order; False when the flow had to be given up."""
        ahead = _after(seq, stream.next_seq)
        if ahead < 0:  # a retransmission: keep only what is new
            payload = payload[-ahead:]
            ahead = 0
            if not payload:
                return True
        if self._buffered + len(payload) > self.max_buffered:
            self._close(key, lost=True)
            return False
        if ahead > 0:
            if len(stream.held) >= MAX_HELD_SEGMENTS:
                self._close(key, lost=True)
                return False
            stream.held.append((seq, payload))
            self._buffered += len(payload)
            return True
        stream.buffer += payload
        self._buffered += len(payload)
        stream.next_seq = (stream.next_seq + len(payload)) & 0xFFFFFFFF
        while stream.held:  # segments that were waiting for this one
            for index, (held_seq, data) in enumerate(stream.held):
                gap = _after(held_seq, stream.next_seq)
                if gap <= 0:
                    del stream.held[index]
                    self._buffered -= len(data)
                    fresh = data[-gap:]
                    stream.buffer += fresh
                    self._buffered += len(fresh)
                    stream.next_seq = (stream.next_seq + len(fresh)) & 0xFFFFFFFF
                    break
            else:
                break
        if len(stream.buffer) > 2 + 0xFFFF + SNAPLEN:  # cannot happen with honest lengths
            self._close(key, lost=True)
            return False
        return True

    def _close(self, key: _FlowKey, lost: bool = False) -> None:
        stream = self._flows.pop(key, None)
        if stream is None:
            return
        _count(self._flows_of, key[0], -1)
        self._buffered -= stream.size()
        if lost:
            self.counters_of(key[0]).tcp_dropped += 1

    # --- upkeep -------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop queries that waited too long and TCP flows idle for :data:`FLOW_TIMEOUT`."""
        for query in [key for key, waiting in self._pending.items() if waiting[0] < now]:
            self._drop_pending(query)
        for flow in [k for k, s in self._flows.items() if s.last_seen + FLOW_TIMEOUT < now]:
            self._close(flow)

    def forget_namespace(self, namespace: int) -> None:
        for key in [key for key in self._pending if key[0] == namespace]:
            self._drop_pending(key)
        for flow in [key for key in self._flows if key[0] == namespace]:
            self._close(flow)
        self.counters.pop(namespace, None)

    def _drop_pending(self, key: _PendingKey) -> None:
        del self._pending[key]
        _count(self._pending_of, key[0], -1)

    def pending_of(self, namespace: int) -> int:
        """Queries of one namespace waiting for their answer."""
        return self._pending_of.get(namespace, 0)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def flows(self) -> int:
        return len(self._flows)

    @property
    def buffered(self) -> int:
        return self._buffered


def _count(counts: Dict[int, int], namespace: int, change: int) -> None:
    left = counts.get(namespace, 0) + change
    if left > 0:
        counts[namespace] = left
    else:
        counts.pop(namespace, None)


def _largest(counts: Dict[int, int]) -> int:
    """The namespace holding the most (the first such, on a tie)."""
    return max(counts, key=counts.__getitem__)


_Key = TypeVar("_Key", _PendingKey, _FlowKey)


def _oldest_of(table: Iterable[_Key], namespace: int) -> _Key:
    """The oldest key of ``namespace`` in an ordered table keyed by (namespace, ...)."""
    return next(key for key in table if key[0] == namespace)
