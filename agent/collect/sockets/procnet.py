"""Read and decode the kernel's inet socket tables, one network namespace at a time.

``/proc/PID/net/{tcp,tcp6,udp,udp6}`` list the sockets of the network namespace that PID lives
in (``Documentation/networking/proc_net_tcp.rst``; ``tcp4_seq_show``/``get_tcp4_sock`` in
``net/ipv4/tcp_ipv4.c``, ``get_tcp6_sock`` in ``net/ipv6/tcp_ipv6.c``, ``udp4_format_sock`` in
``net/ipv4/udp.c``).  An address is printed as the hex of its in-memory 32-bit words, each word
read as a host-order ``u32`` (``%08X``): one word for IPv4, four for IPv6.  On a little-endian
host every 4-byte group therefore comes out byte-reversed while the groups keep their order, so
``0100007F`` is 127.0.0.1 and ``::1`` is ``00000000000000000000000001000000``.

This module knows sockets only: no processes, no psutil.  Addresses are integers (as
``int(ipaddress.ip_address(...))``), so the classifier can work on them without text.
The same reading is what osquery's ``process_open_sockets`` does
(``osquery/filesystem/linux/proc.cpp``: one representative pid per ``/proc/PID/ns/net`` inode).
"""

from __future__ import annotations

import struct
import sys
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

from agent.collect.netns import PROC_ROOT
from agent.inet import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_RAW,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_LISTEN,
    is_ipv4_mapped,
    tcp_state_name,
)


class SocketTable(NamedTuple):
    """One of the per-namespace inet socket files and what its rows are."""

    name: str
    family: int
    protocol: int
    version: int


TCP4 = SocketTable("tcp", AF_INET, IPPROTO_TCP, 4)
TCP6 = SocketTable("tcp6", AF_INET6, IPPROTO_TCP, 6)
UDP4 = SocketTable("udp", AF_INET, IPPROTO_UDP, 4)
UDP6 = SocketTable("udp6", AF_INET6, IPPROTO_UDP, 6)
SOCKET_TABLES: Tuple[SocketTable, ...] = (TCP4, TCP6, UDP4, UDP6)
ICMP4 = SocketTable("icmp", AF_INET, IPPROTO_ICMP, 4)
ICMP6 = SocketTable("icmp6", AF_INET6, IPPROTO_ICMPV6, 6)
RAW4 = SocketTable("raw", AF_INET, IPPROTO_RAW, 4)
RAW6 = SocketTable("raw6", AF_INET6, IPPROTO_RAW, 6)
DATAGRAM_TABLES: Tuple[SocketTable, ...] = (ICMP4, ICMP6, RAW4, RAW6)
"""Ping sockets (``SOCK_DGRAM`` with ``IPPROTO_ICMP``/``IPPROTO_ICMPV6``) and raw sockets, as
``/proc/net/{icmp,icmp6,raw,raw6}`` show them (the columns of ``udp``; a raw socket's local
port is its protocol number).  Read as text: sock_diag has no ping sockets, and raw ones only
with ``CONFIG_INET_RAW_DIAG`` (a module many kernels leave out; an empty dump cannot be told
from a missing module).  Only a connected one has a peer: samples see ``ping`` (which sends
with ``sendto()``) only through the kernel events."""


class Socket(NamedTuple):
    """One decoded row of a socket table.  Addresses are integers in network order."""

    inode: int
    family: int
    protocol: int
    version: int
    local_address: int
    local_port: int
    remote_address: int
    remote_port: int
    state: int
    uid: int

    @property
    def state_name(self) -> str:
        """osquery's name of the TCP state; empty for UDP (as osquery leaves it)."""
        return tcp_state_name(self.state) if self.protocol == IPPROTO_TCP else ""


# ---------------------------------------------------------------------------------------------
# decoding


_HOST_WORDS = struct.Struct("<4I" if sys.byteorder == "little" else ">4I")


def decode_address(hex_text: str, version: int) -> int:
    """The integer value of an address as ``/proc/net/*`` prints it.

    Raises ValueError when the text is not 8 (IPv4) or 32 (IPv6) hex digits.
    """
    if version == 4:
        if len(hex_text) != 8:
            raise ValueError(f"an IPv4 address is 8 hex digits, got {hex_text!r}")
        return int.from_bytes(bytes.fromhex(hex_text), sys.byteorder)
    if len(hex_text) != 32:
        raise ValueError(f"an IPv6 address is 32 hex digits, got {hex_text!r}")
    words: Tuple[int, int, int, int] = _HOST_WORDS.unpack(bytes.fromhex(hex_text))
    return (words[0] << 96) | (words[1] << 64) | (words[2] << 32) | words[3]


def encode_address(value: int, version: int) -> str:
    """The inverse of :func:`decode_address`: the text the kernel would print (for tests)."""
    if version == 4:
        return value.to_bytes(4, sys.byteorder).hex().upper()
    words = [(value >> shift) & 0xFFFFFFFF for shift in (96, 64, 32, 0)]
    return _HOST_WORDS.pack(*words).hex().upper()


def decode_port(hex_text: str) -> int:
    """A port as printed (4 hex digits, ``%04X``).  Raises ValueError otherwise."""
    if len(hex_text) != 4:
        raise ValueError(f"a port is 4 hex digits, got {hex_text!r}")
    return int.from_bytes(bytes.fromhex(hex_text), "big")


def decode_endpoint(text: str, version: int) -> Tuple[int, int]:
    """``ADDRESS:PORT`` as printed -> (address, port).  Raises ValueError on garbage."""
    address, sep, port = text.partition(":")
    if not sep:
        raise ValueError(f"an endpoint is ADDRESS:PORT, got {text!r}")
    return decode_address(address, version), decode_port(port)


def _decode_row(fields: List[str], table: SocketTable) -> Optional[Socket]:
    """Finish decoding a row split as ``line.split(None, 4)``; None when it is garbage."""
    try:
        rest = fields[4].split(None, 6)
        if len(rest) < 6:
            return None
        version = table.version
        local_address, local_port = decode_endpoint(fields[1], version)
        remote_address, remote_port = decode_endpoint(fields[2], version)
        return Socket(
            int(rest[5]),
            table.family,
            table.protocol,
            version,
            local_address,
            local_port,
            remote_address,
            remote_port,
            int(fields[3], 16),
            int(rest[3]),
        )
    except ValueError:
        return None


def parse_line(line: str, table: SocketTable) -> Optional[Socket]:
    """Decode one data line of a socket table; None for a header, truncated or garbage line."""
    fields = line.split(None, 4)
    if len(fields) < 5:
        return None
    return _decode_row(fields, table)


def _data_lines(text: str) -> List[str]:
    lines = text.split("\n")
    if lines and lines[0].lstrip().startswith("sl"):
        del lines[0]
    return lines


Ends = Tuple[int, int, int, int, int]
"""(IP version, local address, local port, remote address, remote port), addresses as integers:
one connection of a namespace (an ownerless socket has no inode to tell it by)."""


def socket_ends(sock: Socket) -> Ends:
    """The :data:`Ends` of ``sock``."""
    return (
        sock.version,
        sock.local_address,
        sock.local_port,
        sock.remote_address,
        sock.remote_port,
    )


class ListenerIndex:
    """The listening sockets of one network namespace, to tell inbound from outbound.

    A TCP socket in ``LISTEN`` or a bound, unconnected UDP socket (remote ``0:0``) listens.
    A connection is inbound when its local address and port match a listener of the same
    protocol: the same address, or a wildcard (``0.0.0.0`` for IPv4, ``::`` for both, since a
    dual-stack ``::`` listener accepts IPv4 too; RFC 3493 section 3.7).  IPv4-mapped IPv6
    addresses (``::ffff:a.b.c.d``, RFC 4291 section 2.5.5.2) count as the IPv4 address they
    carry, which is how an IPv4 connection accepted on ``::`` shows in ``tcp6``.
    """

    _ANY = -1

    def __init__(self) -> None:
        self._keys: Set[Tuple[int, int, int, int]] = set()
        self.opened: Dict[Ends, bool] = {}
        """A connection's :data:`Ends` -> whether its end ``connect()``ed (True) or was
        accepted (False), for the TCP sockets on a listener's end whose ``tcp_info`` told
        (:mod:`agent.collect.sockets.opener`); the others on a listener's end are unknown."""

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def _key(protocol: int, version: int, address: int, port: int) -> Tuple[int, int, int, int]:
        if version == 6 and is_ipv4_mapped(address):
            return (protocol, 4, address & 0xFFFFFFFF, port)
        return (protocol, version, address, port)

    def add(self, protocol: int, version: int, address: int, port: int) -> None:
        """Record a listener bound to ``address`` (0 for the wildcard) and ``port``."""
        if address == 0:
            self._keys.add((protocol, 4, self._ANY, port))
            if version == 6:
                self._keys.add((protocol, 6, self._ANY, port))
            return
        self._keys.add(self._key(protocol, version, address, port))

    def endpoints(self, protocol: int) -> List[Tuple[int, Optional[int], int]]:
        """(version, address or None for the wildcard, port) of each listener of
        ``protocol`` as :meth:`is_inbound` matches them (IPv4-mapped ones as IPv4)."""
        return [
            (version, None if address == self._ANY else address, port)
            for key_protocol, version, address, port in self._keys
            if key_protocol == protocol
        ]

    def is_inbound(self, protocol: int, version: int, address: int, port: int) -> bool:
        """Whether a socket with this local end is on a listener's address and port: accepted
        by it, or connected from a port it shares (``SO_REUSEPORT``); :attr:`opened` tells
        which where the kernel could."""
        key = self._key(protocol, version, address, port)
        keys = self._keys
        return key in keys or (protocol, key[1], self._ANY, port) in keys


_LISTEN_HEX = f"{TCP_LISTEN:02X}"
"""The state column of a TCP listener, as the kernel prints it (``%02X``)."""

WantedPredicate = Callable[[str, int], bool]
"""``wanted(remote_address_hex, version)``: whether to decode and keep a row."""


def scan_socket_table(
    text: str,
    table: SocketTable,
    wanted: Optional[WantedPredicate] = None,
    listeners: Optional[ListenerIndex] = None,
    tcp_ends: Optional[List[Tuple[str, str]]] = None,
) -> Tuple[List[Socket], int]:
    """Decode the rows of one socket table that ``wanted`` asks for (all rows when None).

    Only the remote-address field is looked at before ``wanted`` decides, so a caller that
    keeps few sockets pays little for the rest; the local end is decoded for listeners only,
    which go into ``listeners``.  ``tcp_ends`` collects the (local, remote) endpoint text of
    every TCP row that does not listen, for counting connections (:func:`connection_ends`
    decodes them when the count is taken).  Listening is :func:`agent.inet.is_listening` read
    off the text as printed: state ``0A``, or a UDP peer of all zeros.
    Truncated or garbage lines are skipped.

    A row the kernel printed twice is kept once.  The table is produced a page (4 KB) per
    ``read()``, and each read resumes at a (hash bucket, offset) position
    (``seq_read_iter`` in ``fs/seq_file.c``, ``tcp_seek_last_pos`` in
    ``net/ipv4/tcp_ipv4.c``): a socket opened meanwhile in the bucket being read shifts an
    already printed one into the next page.  Churn makes that common (see
    ``tests/test_churn.py``).  A socket is known by its inode, or when it has none (TIME_WAIT,
    request sockets) by its two ends, which no two sockets of one table share.
    Returns (the wanted sockets, how many well-formed rows the table had).
    """
    version = table.version
    address_len = 8 if version == 4 else 32
    remote_len = address_len + 5
    unconnected = "0" * address_len + ":0000"
    is_tcp = table.protocol == IPPROTO_TCP
    protocol = table.protocol
    kept: List[Socket] = []
    kept_keys: Set[object] = set()
    seen = 0
    for line in _data_lines(text):
        fields = line.split(None, 4)
        if len(fields) < 5:
            continue
        remote = fields[2]
        if len(remote) != remote_len or remote[address_len] != ":":
            continue
        seen += 1
        if tcp_ends is not None and is_tcp and fields[3] != _LISTEN_HEX:
            tcp_ends.append((fields[1], remote))
        if listeners is not None:
            listening = fields[3] == _LISTEN_HEX if is_tcp else remote == unconnected
            if listening:
                try:
                    address, port = decode_endpoint(fields[1], version)
                except ValueError:
                    pass
                else:
                    if port:
                        listeners.add(protocol, version, address, port)
        if wanted is None or wanted(remote[:address_len], version):
            sock = _decode_row(fields, table)
            if sock is not None:
                key = sock.inode or (fields[1], remote)
                if key not in kept_keys:
                    kept_keys.add(key)
                    kept.append(sock)
    return kept, seen


def connection_ends(pairs: Iterable[Tuple[str, str]], version: int) -> Iterator[Ends]:
    """(version, local address, local port, remote address, remote port) of each pair of
    endpoint texts that :func:`scan_socket_table` collected; garbage is skipped."""
    for local, remote in pairs:
        try:
            local_address, local_port = decode_endpoint(local, version)
            remote_address, remote_port = decode_endpoint(remote, version)
        except ValueError:
            continue
        yield (version, local_address, local_port, remote_address, remote_port)


# ---------------------------------------------------------------------------------------------
# reading /proc


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode("latin-1")


def read_socket_table(pid: int, table: SocketTable, proc_root: str = PROC_ROOT) -> str:
    """The text of ``/proc/PID/net/<table>``.  Raises OSError (the process may be gone)."""
    return _read_text(f"{proc_root}/{pid}/net/{table.name}")


def read_sockets(pid: int, table: SocketTable, proc_root: str = PROC_ROOT) -> List[Socket]:
    """Every socket of one table in PID's network namespace, fully decoded."""
    sockets, _ = scan_socket_table(read_socket_table(pid, table, proc_root), table)
    return sockets


def parse_snmp(text: str, section: str = "Tcp") -> Dict[str, int]:
    """One section of ``/proc/net/snmp`` (a header line of names, then a line of values)."""
    prefix = section + ":"
    rows = [line.split()[1:] for line in text.split("\n") if line.startswith(prefix)]
    if len(rows) < 2:
        return {}
    counters: Dict[str, int] = {}
    for name, value in zip(rows[0], rows[1]):
        try:
            counters[name] = int(value)
        except ValueError:
            continue
    return counters


def read_tcp_counters(pid: int, proc_root: str = PROC_ROOT) -> Dict[str, int]:
    """The ``Tcp:`` counters of PID's network namespace (``ActiveOpens``, ``CurrEstab``, ...)
    from ``/proc/PID/net/snmp`` (RFC 1213 tcp group).  Raises OSError."""
    return parse_snmp(_read_text(f"{proc_root}/{pid}/net/snmp"))
