"""The names and numbers of the internet protocols, in one place: families, protocols, TCP
states, the IPv6 prefixes that carry an IPv4 host, and what it means for a socket to listen.

Every module that reads sockets, judges addresses, matches rules or renders rows takes these
from here, so the kernel's numbers and osquery's names are written down once, each with its
source.  Addresses are integers, as ``int(ipaddress.ip_address(text))`` gives them.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

AF_INET = 2
AF_INET6 = 10
"""Address families as Linux numbers them (``include/linux/socket.h``) and osquery reports them
(``process_open_sockets.family``)."""

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_RAW = 255
"""IANA protocol numbers (``include/uapi/linux/in.h``), osquery's ``protocol`` column.  A raw
socket (``SOCK_RAW``, any protocol) is reported as ``IPPROTO_RAW``, as osquery's
``process_open_sockets`` reports the rows of ``/proc/net/raw``; a ping socket (``SOCK_DGRAM``
with ``IPPROTO_ICMP``/``IPPROTO_ICMPV6``, ``net.ipv4.ping_group_range``) as ICMP or ICMPv6."""

PROTOCOL_NAMES: Dict[int, str] = {
    IPPROTO_ICMP: "icmp",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_ICMPV6: "icmp6",
    IPPROTO_SCTP: "sctp",
    IPPROTO_RAW: "raw",
}
"""The name a table shows for each protocol number."""
DATAGRAM_PROTOCOLS = frozenset({IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_RAW})
"""Protocols without connections: a flow of them is a datagram that left (``connect()`` on
such a socket sends nothing)."""


def protocol_name(number: int) -> str:
    """The name of a protocol number as the tables show it; the number itself when unnamed."""
    return PROTOCOL_NAMES.get(number, str(number))


def reported_protocol(number: int) -> int:
    """The number a flow of IP protocol ``number`` is reported with: TCP, UDP, ICMP, ICMPv6 and
    SCTP as they are; anything else can only have come from a raw socket: ``IPPROTO_RAW``."""
    return number if number in PROTOCOL_NAMES else IPPROTO_RAW


PROTOCOL_NUMBERS: Dict[str, int] = {name: number for number, name in PROTOCOL_NAMES.items()}
FAMILY_NAMES: Dict[int, str] = {AF_INET: "ipv4", AF_INET6: "ipv6"}
"""The names ECS gives them (``network.type``)."""
FAMILY_OF_VERSION: Dict[int, int] = {4: AF_INET, 6: AF_INET6}

IPV4_BITS = 32
IPV6_BITS = 128

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12
"""The kernel's TCP states (``include/net/tcp_states.h``)."""

TCP_STATE_NAMES: Tuple[str, ...] = (
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSED",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
)
"""TCP state names exactly as osquery's ``process_open_sockets`` spells them (``tcp_states`` in
``osquery/filesystem/linux/proc.h``), indexed by the kernel's state number.  Note ``CLOSED``
(the kernel says ``TCP_CLOSE``) and that anything else, ``TCP_NEW_SYN_RECV`` (12) included, is
``UNKNOWN`` there too."""


CLOSING_STATES = frozenset({"FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSED", "LAST_ACK", "CLOSING"})
"""The osquery names of the TCP states a socket is in once its own side has closed."""


def tcp_state_name(state: int) -> str:
    """The osquery name of a kernel TCP state number; ``UNKNOWN`` outside the known range."""
    if 0 < state < len(TCP_STATE_NAMES):
        return TCP_STATE_NAMES[state]
    return "UNKNOWN"


Block = Tuple[int, int]
"""(network as an integer, prefix length) of an IPv6 block."""

IPV4_MAPPED: Block = (0xFFFF << 32, 96)
"""``::ffff:0:0/96``, RFC 4291 section 2.5.5.2: an AF_INET6 socket talking IPv4."""
NAT64_WELL_KNOWN: Block = (0x0064FF9B << 96, 96)
"""``64:ff9b::/96``, RFC 6052 section 2.1: a NAT64 gateway reaching the IPv4 host."""


def in_block(value: int, block: Block, bits: int = IPV6_BITS) -> bool:
    """Whether the address ``value`` lies in ``block``."""
    network, length = block
    return value >> (bits - length) == network >> (bits - length)


def is_ipv4_mapped(value: int) -> bool:
    """An IPv6 address in ``::ffff:0:0/96``: IPv4 on the wire."""
    return value >> 32 == 0xFFFF


def ipv4_host(value: int, version: int) -> Optional[int]:
    """The IPv4 host an IPv6 address reaches through IPv4-mapping or the NAT64 well-known prefix
    (its last 32 bits), else None.  6to4 and Teredo carry a relay's or a client's address, not
    the peer's, so they reach no IPv4 host here (RFC 3056, RFC 4380)."""
    if version == 6 and (is_ipv4_mapped(value) or in_block(value, NAT64_WELL_KNOWN)):
        return value & 0xFFFFFFFF
    return None


OUTBOUND, INBOUND, UNKNOWN = "outbound", "inbound", "unknown"


def direction_of(on_listening_end: bool, has_owner: bool, connected: Optional[bool] = None) -> str:
    """Which way a connection was opened, from what the socket tables and fds tell.

    A socket on a listener's address and port is ``inbound`` only when the kernel says a
    listener accepted it (``connected`` False: :mod:`agent.collect.sockets.opener`) and
    ``outbound`` when it says this end connected (True): a process may listen on a port with
    ``SO_REUSEPORT`` and ``connect()`` out from it, and the tables alone show the two alike, so
    without the kernel's word (None) it is ``unknown``, which counts as egress.  One a process
    holds on no listener's end was connected by it: ``outbound``.  Neither (an ownerless
    TIME_WAIT, or another user's socket when not root): ``unknown``, rather than a guess.
    """
    if on_listening_end:
        if connected is None:
            return UNKNOWN
        return OUTBOUND if connected else INBOUND
    return OUTBOUND if has_owner else UNKNOWN


def is_listening(protocol: int, state: int, remote_address: int, remote_port: int) -> bool:
    """Whether a socket listens: a TCP socket in ``LISTEN``, or a UDP socket with no peer (bound,
    unconnected: what ``/proc/net/udp`` shows as remote ``0:0``)."""
    if protocol == IPPROTO_TCP:
        return state == TCP_LISTEN
    return remote_address == 0 and remote_port == 0


SERVICE_PORTS_BELOW = 1024
"""Ports below this are bound by services (``/proc/sys/net/ipv4/ip_unprivileged_port_start``'s
default); ephemeral client ports are above (``ip_local_port_range``: 32768-60999)."""


def reply_by_ports(local_port: int, remote_port: int) -> bool:
    """Whether a datagram from ``local_port`` to ``remote_port`` reads as a server's reply when
    the kernel cannot say whether the peer wrote first: from a service port to a port above
    them (a DNS server's 53 to a client's 41000; not NTP's 123 to 123)."""
    return 0 < local_port < SERVICE_PORTS_BELOW <= remote_port
