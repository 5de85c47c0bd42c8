"""Watch the DNS answers of every network namespace and note which names each address had.

One ``AF_PACKET`` ``SOCK_DGRAM`` ("cooked") socket per network namespace (``packet(7)``),
created after ``setns(2)`` into it (:func:`agent.collect.sockdiag.open_in_namespace`), with a
classic BPF program attached (``SO_ATTACH_FILTER``, ``Documentation/networking/filter.rst``) that
lets through only UDP and TCP to or from port 53, over IPv4 (first fragments) and IPv6
(without extension headers), received by this host or sent by it.  A cooked socket's filter
sees the packet from its IP header in both directions (``packet_rcv`` in
``net/packet/af_packet.c``), so one program serves Ethernet, veth, tun and WireGuard alike.
A packet received passes only from port 53 (an answer), a packet sent only to port 53 (a
query), so a namespace that holds a DNS server costs nothing for the queries it receives and
the answers it sends.  Loopback shows every packet twice, once sent (``PACKET_OUTGOING``) and
once received: the program drops the sent copy.

Which answers count (RFC 5452 section 3, what a resolver itself accepts): on any interface but
loopback, a response must come from the address and port a query seen leaving this namespace
went to, to the address and port it came from, with its id and question; anything else is an
unsolicited answer that anyone on the network could send, and is dropped.  On loopback only
the namespace's own processes can send, so answers there (a local stub such as
systemd-resolved at 127.0.0.53, or Docker's embedded server at 127.0.0.11, whose queries on
the wire carry a NATed port) are taken as they come.  DNS over TCP (RFC 7766; after a
truncated UDP answer) is reassembled per flow, from its SYN, within small bounds.

:class:`AnswerTracker` is that logic on packets, no sockets; :class:`DnsWatch` owns the
sockets and polls them from one thread.  Answers go into a :class:`agent.collect.names.
NameCache`.  Without CAP_NET_RAW (not root), or without ``AF_PACKET`` in the kernel, the
watch does nothing and :attr:`DnsWatch.unavailable` says why in one line.  Kernel needs: all
of this exists on 4.18 (``SKF_AD_PKTTYPE`` and ``SKF_AD_HATYPE`` since 2.6/3.x).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from agent.collect.dnsparse import OPCODE_QUERY, RCODE_NOERROR, parse_message
from agent.collect.names import NameCache
from agent.collect.procnet import PROC_ROOT, NetNamespace, discover_namespaces, proc_entry
from agent.collect.sockdiag import open_in_namespace

DNS_PORT = 53
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ARPHRD_LOOPBACK = 772
PACKET_HOST = 0
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04

SNAPLEN = 1 << 18
"""Bytes kept of a packet: a whole TCP segment after GRO, a whole 64 KiB UDP answer."""
RECEIVE_BUFFER = 1 << 20
"""SO_RCVBUF of each socket: room for some thousand answers while the thread is busy."""
BATCH = 256
"""Packets read from one socket before the others get their turn."""

MAX_PENDING = 4096
PENDING_TIMEOUT = 15.0
"""How long a query waits for its answer (resolvers give up after 5 s a try)."""
MAX_FLOWS = 256
MAX_BUFFERED = 1 << 20
"""TCP bytes held for reassembly across every flow."""
MAX_HELD_SEGMENTS = 8
"""Out-of-order segments kept per flow until the gap before them fills."""
FLOW_TIMEOUT = 30.0
SWEEP_INTERVAL = 10.0
RESCAN_INTERVAL = 10.0
CATCH_UP_ROUNDS = 4
"""Batches read from each socket for a :meth:`DnsWatch.catch_up` at most (a flood must not
hold the caller)."""


# --- the filter ------------------------------------------------------------------------------

_BPF_LD_W_ABS, _BPF_LD_H_ABS, _BPF_LD_B_ABS = 0x20, 0x28, 0x30
_BPF_LD_H_IND = 0x48
_BPF_LD_IMM, _BPF_LD_MEM, _BPF_ST = 0x00, 0x60, 0x02
_BPF_LDX_MSH = 0xB1
_BPF_ADD_X, _BPF_TAX = 0x0C, 0x07
_BPF_JA, _BPF_JEQ_K, _BPF_JSET_K = 0x05, 0x15, 0x45
_BPF_RET_K = 0x06
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL, _SKF_AD_PKTTYPE, _SKF_AD_HATYPE = 0, 4, 28

_Instruction = Tuple[int, object, object, int]
"""(opcode, jump-if-true label, jump-if-false label, k): a label is a name or None (next);
``BPF_JA`` jumps to its jump-if-true label."""


def _ancillary(offset: int) -> int:
    return (_SKF_AD_OFF + offset) & 0xFFFFFFFF


def _program() -> List[Tuple[str, _Instruction]]:
    """The filter as labelled instructions; :func:`dns_filter` assembles it.

    A packet received must come from port 53 (an answer), a packet sent must go to port 53
    (a query): so a namespace holding a DNS server, whose queries come in and answers go
    out, costs the watch nothing.  Scratch memory M[0] holds the offset of the port to test
    within the UDP or TCP header (0: source, 2: destination)."""
    return [
        ("", (_BPF_LD_W_ABS, None, None, _ancillary(_SKF_AD_PKTTYPE))),
        ("", (_BPF_JEQ_K, "received", None, PACKET_HOST)),
        ("", (_BPF_JEQ_K, None, "drop", PACKET_OUTGOING)),
        ("", (_BPF_LD_W_ABS, None, None, _ancillary(_SKF_AD_HATYPE))),
        ("", (_BPF_JEQ_K, "drop", None, ARPHRD_LOOPBACK)),  # loopback's sent copy
        ("", (_BPF_LD_IMM, None, None, 2)),  # sent: the destination port
        ("", (_BPF_ST, None, None, 0)),
        ("", (_BPF_JA, "protocol", None, 0)),
        ("received", (_BPF_LD_IMM, None, None, 0)),  # received: the source port
        ("", (_BPF_ST, None, None, 0)),
        ("protocol", (_BPF_LD_W_ABS, None, None, _ancillary(_SKF_AD_PROTOCOL))),
        ("", (_BPF_JEQ_K, "ipv4", None, ETH_P_IP)),
        ("", (_BPF_JEQ_K, "ipv6", "drop", ETH_P_IPV6)),
        ("ipv4", (_BPF_LD_B_ABS, None, None, 9)),  # protocol
        ("", (_BPF_JEQ_K, "ipv4-port", None, IPPROTO_UDP)),
        ("", (_BPF_JEQ_K, "ipv4-port", "drop", IPPROTO_TCP)),
        ("ipv4-port", (_BPF_LD_H_ABS, None, None, 6)),  # flags and fragment offset
        ("", (_BPF_JSET_K, "drop", None, 0x1FFF)),  # a later fragment: no ports in it
        ("", (_BPF_LDX_MSH, None, None, 0)),  # X = the IPv4 header's length
        ("", (_BPF_LD_MEM, None, None, 0)),
        ("", (_BPF_ADD_X, None, None, 0)),
        ("", (_BPF_TAX, None, None, 0)),  # X = header length + the port's offset
        ("", (_BPF_LD_H_IND, None, None, 0)),
        ("", (_BPF_JEQ_K, "accept", "drop", DNS_PORT)),
        ("ipv6", (_BPF_LD_B_ABS, None, None, 6)),  # next header
        ("", (_BPF_JEQ_K, "ipv6-port", None, IPPROTO_UDP)),
        ("", (_BPF_JEQ_K, "ipv6-port", "drop", IPPROTO_TCP)),
        ("ipv6-port", (_BPF_LD_MEM, None, None, 0)),
        ("", (_BPF_TAX, None, None, 0)),
        ("", (_BPF_LD_H_IND, None, None, 40)),
        ("", (_BPF_JEQ_K, "accept", "drop", DNS_PORT)),
        ("accept", (_BPF_RET_K, None, None, SNAPLEN)),
        ("drop", (_BPF_RET_K, None, None, 0)),
    ]


def dns_filter() -> bytes:
    """The classic BPF program (an array of ``struct sock_filter``) described above."""
    program = _program()
    where = {label: index for index, (label, _) in enumerate(program) if label}

    def jump(target: object, index: int) -> int:
        return 0 if target is None else where[str(target)] - index - 1

    def encode(index: int, code: int, true: object, false: object, k: int) -> bytes:
        if code == _BPF_JA:  # an unconditional jump carries its distance in k
            return struct.pack("=HBBI", code, 0, 0, jump(true, index))
        return struct.pack("=HBBI", code, jump(true, index), jump(false, index), k)

    return b"".join(encode(index, *instruction) for index, (_, instruction) in enumerate(program))


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """``SO_ATTACH_FILTER``: the kernel copies the program, whose address ``struct
    sock_fprog`` carries (hence ctypes, only here).  Raises OSError."""
    import ctypes

    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_packet_socket(program: Optional[bytes] = None) -> socket.socket:
    """A non-blocking cooked packet socket of this thread's network namespace, filtered.

    Packets that arrived between creating the socket and attaching the filter are read away
    unfiltered and dropped.  Raises OSError (PermissionError without CAP_NET_RAW)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    try:
        attach_filter(sock, dns_filter() if program is None else program)
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
                break
            except OSError:
                continue
        sock.setblocking(False)
        while True:
            try:
                sock.recv(1)
            except BlockingIOError:
                break
        return sock
    except BaseException:
        sock.close()
        raise


def unavailable_reason(error: OSError) -> str:
    """One line on why no packet socket could be had, for the log."""
    if error.errno in (errno.EPERM, errno.EACCES):
        return "DNS names off: AF_PACKET sockets need CAP_NET_RAW (run as root)"
    if error.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
        return "DNS names off: this kernel has no AF_PACKET sockets (CONFIG_PACKET)"
    return f"DNS names off: AF_PACKET socket refused: {error.strerror or error}"


# --- packets to answers ----------------------------------------------------------------------


@dataclass
class Counters:
    """What one namespace's packets came to."""

    packets: int = 0
    queries: int = 0
    """Queries seen leaving the namespace (loopback's are not needed and not counted)."""
    responses: int = 0
    accepted: int = 0
    """Responses matched to their query (or on loopback), whose answers were taken."""
    unsolicited: int = 0
    """Responses no query seen asked for (late, spoofed, or asked before the watch began)."""
    malformed: int = 0
    answers: int = 0
    """Address records added to the name cache."""
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
    hold (:data:`MAX_BUFFERED`); the oldest go first.
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
        if loopback:
            if sport != DNS_PORT:  # a query or a stranger: loopback answers need no query
                return
            outgoing = False
        elif sport == DNS_PORT and packet_type == PACKET_HOST:
            outgoing = False
        elif dport == DNS_PORT and packet_type == PACKET_OUTGOING:
            outgoing = True
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
            key = (namespace, protocol, source, sport, destination, dport, head.id)
            self._pending[key] = (now + PENDING_TIMEOUT, head.question.name, head.question.qtype)
            self._pending.move_to_end(key)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
            return
        if not head.response:
            return
        counters.responses += 1
        if not loopback:
            key = (namespace, protocol, destination, dport, source, sport, head.id)
            waiting = self._pending.pop(key, None)
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
        for found in message.answers:
            self.cache.add(namespace, found.version, found.address, found.chain, found.ttl, now)
            counters.answers += 1

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
            while len(self._flows) > self.max_flows:
                self._close(next(iter(self._flows)), lost=True)
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
        self._buffered -= stream.size()
        if lost:
            self.counters_of(key[0]).tcp_dropped += 1

    # --- upkeep -------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop queries that waited too long and TCP flows idle for :data:`FLOW_TIMEOUT`."""
        for query in [key for key, waiting in self._pending.items() if waiting[0] < now]:
            del self._pending[query]
        for flow in [k for k, s in self._flows.items() if s.last_seen + FLOW_TIMEOUT < now]:
            self._close(flow)

    def forget_namespace(self, namespace: int) -> None:
        for key in [key for key in self._pending if key[0] == namespace]:
            del self._pending[key]
        for flow in [key for key in self._flows if key[0] == namespace]:
            self._close(flow)
        self.counters.pop(namespace, None)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def flows(self) -> int:
        return len(self._flows)

    @property
    def buffered(self) -> int:
        return self._buffered


# --- the sockets and their thread ------------------------------------------------------------


@dataclass
class _Watched:
    namespace: int
    sock: socket.socket
    pid: int


class DnsWatch:
    """Packet sockets in every network namespace, polled by one thread, feeding ``cache``.

    Use :meth:`start` and :meth:`stop` (a thread of its own), or call :meth:`run` from a
    thread of yours with a stop event.  New namespaces are found by :meth:`rescan`, which
    the caller may trigger at any time, from any thread, with the namespaces it discovered
    (a sampler does so every sample, for free), and which the watch runs by itself every
    ``rescan_interval`` seconds (0: only when asked).  A namespace no longer seen is closed:
    our socket would otherwise keep a dead namespace, and its devices, alive.
    """

    def __init__(
        self,
        cache: NameCache,
        proc_root: str = PROC_ROOT,
        rescan_interval: float = RESCAN_INTERVAL,
        clock: Callable[[], float] = time.time,
        tracker: Optional[AnswerTracker] = None,
    ) -> None:
        self.cache = cache
        self.proc_root = proc_root
        self.rescan_interval = rescan_interval
        self.tracker = AnswerTracker(cache) if tracker is None else tracker
        self.unavailable = ""
        """Empty while the watch works; else one line on why it yields nothing."""
        self.errors: Dict[int, str] = {}
        """namespace inode -> why it could not be watched (not ours to enter, gone, ...)."""
        self._clock = clock
        self._watched: Dict[int, _Watched] = {}
        self._by_fd: Dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._requested: Optional[Tuple[Optional[Sequence[NetNamespace]], Dict[int, int]]] = None
        self._catch_ups: List[threading.Event] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._wake_read, select.POLLIN)
        self._program = dns_filter()
        self._buffer = bytearray(SNAPLEN)

    # --- control, from any thread ---------------------------------------------------------

    def probe(self) -> bool:
        """Whether packet sockets can be had here; sets :attr:`unavailable` if not."""
        try:
            open_packet_socket(self._program).close()
        except OSError as error:
            self.unavailable = unavailable_reason(error)
            return False
        self.unavailable = ""
        return True

    def start(self) -> bool:
        """Start the thread; False (and :attr:`unavailable` set) when packets cannot be had."""
        if self._thread is not None:
            return True
        if not self.probe():
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="egress-agent-dns", daemon=True
        )
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and close every socket."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._close_all()

    def close(self) -> None:
        """:meth:`stop`, and the wake-up pipe too: the watch cannot start again."""
        self.stop()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                continue

    def rescan(
        self,
        namespaces: Optional[Sequence[NetNamespace]] = None,
        threads: Optional[Dict[int, int]] = None,
    ) -> None:
        """Ask the thread to bring the watched namespaces up to date: ``namespaces`` as a full
        :func:`agent.collect.procnet.discover_namespaces` found them (with its ``threads``), or None
        to discover them itself.  Never pass a discovery limited to some pids: the namespaces
        it lacks would be closed."""
        with self._lock:
            self._requested = (namespaces, dict(threads or {}))
        self._wake()

    def catch_up(self, timeout: float) -> bool:
        """Wait, up to ``timeout`` seconds, until the thread has read the packets every watched
        socket holds now; False when it did not in time or is not running.

        A connection's events and its DNS answer reach us on different threads: the answer
        came first (its packet was queued on our socket before the resolver got it), but the
        connection may be handled before the answer is read.  A caller that found no name
        catches up and looks again.
        """
        if self._thread is None or self._stop.is_set():
            return False
        done = threading.Event()
        with self._lock:
            self._catch_ups.append(done)
        self._wake()
        return done.wait(timeout)

    def watched(self) -> FrozenSet[int]:
        """The inodes of the namespaces being watched now."""
        with self._lock:
            return frozenset(self._watched)

    def counters(self, namespace: int) -> Counters:
        """A copy of one namespace's counters (zero when it is not watched)."""
        with self._lock:
            found = self.tracker.counters.get(namespace)
            return Counters(**vars(found)) if found is not None else Counters()

    # --- the thread -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every socket until ``stop`` is set; then close them all."""
        next_rescan = 0.0
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not stop.is_set():
                monotonic = time.monotonic()
                with self._lock:
                    requested, self._requested = self._requested, None
                if (
                    requested is not None
                    or (self.rescan_interval > 0 and monotonic >= next_rescan)
                    or next_rescan == 0.0
                ):
                    self._apply(*(requested or (None, {})))
                    next_rescan = monotonic + (self.rescan_interval or 3600.0)
                if monotonic >= next_sweep:
                    self._upkeep()
                    next_sweep = monotonic + SWEEP_INTERVAL
                wait = max(0.0, min(next_sweep, next_rescan) - time.monotonic())
                for fd, events in self._poller.poll(min(wait, 1.0) * 1000):
                    if fd == self._wake_read:
                        self._drain_wake()
                        continue
                    watched = self._by_fd.get(fd)
                    if watched is None:
                        continue
                    if events & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                        self.errors[watched.namespace] = "the packet socket failed"
                        self._unwatch(watched.namespace)
                        continue
                    self._read(watched)
                self._serve_catch_ups()
        finally:
            self._close_all()
            self._serve_catch_ups()  # nobody waits on a thread that is gone

    def _serve_catch_ups(self) -> None:
        with self._lock:
            waiting, self._catch_ups = self._catch_ups, []
        if not waiting:
            return
        for watched in list(self._watched.values()):
            for _ in range(CATCH_UP_ROUNDS):
                if self._read(watched) < BATCH:
                    break
        for done in waiting:
            done.set()

    def _read(self, watched: _Watched) -> int:
        """Read and handle up to :data:`BATCH` packets of one socket; how many were read."""
        buffer = self._buffer
        view = memoryview(buffer)
        now = self._clock()
        packet = self.tracker.packet
        for count in range(BATCH):
            try:
                size, address = watched.sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError as error:
                self.errors[watched.namespace] = f"reading packets: {error.strerror or error}"
                self._unwatch(watched.namespace)
                return count
            try:
                packet(
                    watched.namespace,
                    bytes(view[: min(size, SNAPLEN)]),
                    address[2],
                    address[3] == ARPHRD_LOOPBACK,
                    now,
                )
            except Exception as error:  # a bug must cost one packet, never the thread
                counters = self.tracker.counters_of(watched.namespace)
                counters.errors += 1
                counters.last_error = f"{type(error).__name__}: {error}"
        return BATCH

    def _upkeep(self) -> None:
        now = self._clock()
        self.tracker.sweep(now)
        self.cache.sweep(now)
        for watched in list(self._watched.values()):
            try:
                raw = watched.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            except OSError:
                continue
            _, drops = struct.unpack("=II", raw)  # struct tpacket_stats; reading resets it
            self.tracker.counters_of(watched.namespace).kernel_drops += drops

    def _apply(self, namespaces: Optional[Sequence[NetNamespace]], threads: Dict[int, int]) -> None:
        if namespaces is None:
            try:
                discovery = discover_namespaces(self.proc_root)
            except OSError as error:
                self.errors[0] = f"cannot list {self.proc_root}: {error.strerror or error}"
                return
            namespaces, threads = discovery.namespaces, discovery.threads
        seen = {namespace.inode for namespace in namespaces}
        self.cache.retain_namespaces(seen)  # a gone namespace's inode may come back for another
        for inode in [inode for inode in self._watched if inode not in seen]:
            self._unwatch(inode)
        for inode in [inode for inode in self.errors if inode not in seen]:
            del self.errors[inode]
        for namespace in namespaces:
            if namespace.inode not in self._watched:
                self._watch(namespace, threads)

    def _watch(self, namespace: NetNamespace, threads: Dict[int, int]) -> None:
        problem = "no process to enter it through"
        for pid in namespace.pids:
            entry, root = proc_entry(pid, threads, self.proc_root)
            try:
                sock = open_in_namespace(entry, root, lambda: open_packet_socket(self._program))
            except OSError as error:
                problem = f"pid {pid}: {error.strerror or error}"
                if isinstance(error, PermissionError):
                    break  # the next pid will not be ours to enter either
                continue
            watched = _Watched(namespace.inode, sock, pid)
            with self._lock:
                self._watched[namespace.inode] = watched
                self._by_fd[sock.fileno()] = watched
                self.tracker.counters_of(namespace.inode)
            self._poller.register(sock.fileno(), select.POLLIN)
            self.errors.pop(namespace.inode, None)
            return
        self.errors[namespace.inode] = problem

    def _unwatch(self, inode: int) -> None:
        with self._lock:
            watched = self._watched.pop(inode, None)
            if watched is None:
                return
            self._by_fd.pop(watched.sock.fileno(), None)
            self.tracker.forget_namespace(inode)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(watched.sock.fileno())
        watched.sock.close()

    def _close_all(self) -> None:
        for inode in list(self._watched):
            self._unwatch(inode)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_write, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except OSError:
            return
