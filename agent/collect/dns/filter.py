"""The packet socket of the DNS watch and the classic BPF program that feeds it only DNS.

One ``AF_PACKET`` ``SOCK_DGRAM`` ("cooked") socket per network namespace (``packet(7)``),
created after ``setns(2)`` into it (:func:`agent.collect.netns.open_in_namespace`), with a
classic BPF program attached (``SO_ATTACH_FILTER``, ``Documentation/networking/filter.rst``) that
lets through only UDP and TCP to or from port 53, over IPv4 (first fragments) and IPv6
(without extension headers), received by this host or sent by it.  A cooked socket's filter
sees the packet from its IP header in both directions (``packet_rcv`` in
``net/packet/af_packet.c``), so one program serves Ethernet, veth, tun and WireGuard alike.
A packet received passes only from port 53 (an answer), a packet sent only to port 53 (a
query), so a namespace that holds a DNS server costs nothing for the queries it receives and
the answers it sends.  Loopback shows every packet twice, once sent (``PACKET_OUTGOING``) and
once received, so each query passes once (sent, to port 53) and each answer once (received,
from port 53): an answer on loopback is taken only when it matches a query seen
(:mod:`agent.collect.dns.answers`).  A query Docker's embedded server gets (127.0.0.11) is
sent to a port its NAT rules chose, not 53: a UDP packet sent on loopback also passes when its
first 12 bytes are a DNS query's header (QR 0, opcode 0, one question, no answer or authority
records).

Kernel needs: all of this exists on 4.18 (``SKF_AD_PKTTYPE`` and ``SKF_AD_HATYPE`` since
2.6/3.x).  Without CAP_NET_RAW (not root), or without ``AF_PACKET`` in the kernel, no socket can
be had and :func:`unavailable_reason` says why in one line.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import List, Optional, Tuple

from agent.inet import IPPROTO_TCP, IPPROTO_UDP

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
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04

SNAPLEN = 1 << 18
"""Bytes kept of a packet: a whole TCP segment after GRO, a whole 64 KiB UDP answer."""
RECEIVE_BUFFER = 1 << 20
"""SO_RCVBUF of each socket: room for some thousand answers while the thread is busy."""
# --- the filter ------------------------------------------------------------------------------

_BPF_LD_W_ABS, _BPF_LD_H_ABS, _BPF_LD_B_ABS = 0x20, 0x28, 0x30
_BPF_LD_H_IND, _BPF_LD_B_IND = 0x48, 0x50
_BPF_LD_IMM, _BPF_LD_MEM, _BPF_ST = 0x00, 0x60, 0x02
_BPF_AND_K = 0x54
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
        ("", (_BPF_JEQ_K, "loopback-sent", None, ARPHRD_LOOPBACK)),
        ("", (_BPF_LD_IMM, None, None, 0)),
        ("", (_BPF_ST, None, None, 1)),
        ("", (_BPF_JA, "sent", None, 0)),
        ("loopback-sent", (_BPF_LD_IMM, None, None, 1)),
        ("", (_BPF_ST, None, None, 1)),
        ("sent", (_BPF_LD_IMM, None, None, 2)),  # sent: the destination port
        ("", (_BPF_ST, None, None, 0)),
        ("", (_BPF_JA, "protocol", None, 0)),
        ("received", (_BPF_LD_IMM, None, None, 0)),  # received: the source port
        ("", (_BPF_ST, None, None, 0)),
        ("", (_BPF_ST, None, None, 1)),
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
        ("", (_BPF_JEQ_K, "accept", None, DNS_PORT)),
        ("", (_BPF_LD_MEM, None, None, 1)),  # not port 53: a query sent on loopback?
        ("", (_BPF_JEQ_K, None, "drop", 1)),
        ("", (_BPF_LD_B_ABS, None, None, 9)),
        ("", (_BPF_JEQ_K, None, "drop", IPPROTO_UDP)),
        *_query_header("ipv4", 8),  # X: the destination port; the flags byte is 8 on
        ("ipv6", (_BPF_LD_B_ABS, None, None, 6)),  # next header
        ("", (_BPF_JEQ_K, "ipv6-port", None, IPPROTO_UDP)),
        ("", (_BPF_JEQ_K, "ipv6-port", "drop", IPPROTO_TCP)),
        ("ipv6-port", (_BPF_LD_MEM, None, None, 0)),
        ("", (_BPF_TAX, None, None, 0)),
        ("", (_BPF_LD_H_IND, None, None, 40)),
        ("", (_BPF_JEQ_K, "accept", None, DNS_PORT)),
        ("", (_BPF_LD_MEM, None, None, 1)),
        ("", (_BPF_JEQ_K, None, "drop", 1)),
        ("", (_BPF_LD_B_ABS, None, None, 6)),
        ("", (_BPF_JEQ_K, None, "drop", IPPROTO_UDP)),
        *_query_header("ipv6", 48),  # X = 2: the flags byte is at 40 + 8 + 2 = X + 48
        ("accept", (_BPF_RET_K, None, None, SNAPLEN)),
        ("drop", (_BPF_RET_K, None, None, 0)),
    ]


def _query_header(family: str, flags: int) -> List[Tuple[str, _Instruction]]:
    """Accept when the DNS header whose flags byte is at X + ``flags`` is a query's: QR 0 and
    opcode 0 (the flags byte's top five bits), QDCOUNT 1, ANCOUNT 0, NSCOUNT 0; else drop."""
    return [
        (f"{family}-query", (_BPF_LD_B_IND, None, None, flags)),
        ("", (_BPF_AND_K, None, None, 0xF8)),
        ("", (_BPF_JEQ_K, None, "drop", 0)),
        ("", (_BPF_LD_H_IND, None, None, flags + 2)),  # QDCOUNT
        ("", (_BPF_JEQ_K, None, "drop", 1)),
        ("", (_BPF_LD_H_IND, None, None, flags + 4)),  # ANCOUNT
        ("", (_BPF_JEQ_K, None, "drop", 0)),
        ("", (_BPF_LD_H_IND, None, None, flags + 6)),  # NSCOUNT
        ("", (_BPF_JEQ_K, "accept", "drop", 0)),
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
