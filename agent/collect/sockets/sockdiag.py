"""Read a network namespace's inet sockets through netlink ``sock_diag``, filtered in the kernel.

``/proc/PID/net/tcp`` makes the kernel format a line of text for every socket of the namespace
and Python split it again; ``ss(8)`` instead asks ``NETLINK_SOCK_DIAG`` for ``inet_diag``
records (``sock_diag(7)``, ``include/uapi/linux/inet_diag.h``): fixed binary records, and an
optional bytecode program that the kernel runs on each socket before copying it out
(``inet_diag_bc_run`` in ``net/ipv4/inet_diag.c``).  The sampler uses such a program to leave
out every socket whose peer lies in a block that is never external (loopback, private ranges,
the configured ``internal_networks``): on a host with tens of thousands of internal
connections the kernel returns only the few that matter, and Python decodes only those.

What it costs stays bound by the kernel: each dump walks the whole established hash table,
which every network namespace shares (unless ``net.ipv4.tcp_child_ehash_entries`` gives a
namespace its own), once per address family.

A netlink socket belongs to the network namespace it was created in, so for another namespace
we enter it with ``setns(2)`` (CAP_SYS_ADMIN), create the socket and come back at once; the
socket keeps answering for that namespace.  Records decode into the same
:class:`agent.collect.sockets.procnet.Socket` as the ``/proc`` text does, addresses as integers in
network order.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from agent.collect.netns import PROC_ROOT, open_in_namespace
from agent.collect.sockets.opener import OPENER_STATES, connected_here
from agent.collect.sockets.procnet import Ends, Socket, SocketTable, socket_ends
from agent.inet import TCP_LISTEN, is_listening

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
_INFO = 2  # INET_DIAG_INFO: struct tcp_info, asked for by its bit in idiag_ext
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>

ALL_STATES = 0xFFFFFFFF
"""Every TCP state, as ``ss -a`` asks: ``/proc/net/tcp`` shows them all too."""
OPENED_STATES = sum(1 << state for state in OPENER_STATES)
"""The states in which ``tcp_info`` can tell which end opened a connection."""
LISTEN_ONLY = 1 << TCP_LISTEN
"""A dump of listeners only walks the listening hash, not the established one: cheap."""
NOT_LISTENING = ALL_STATES & ~LISTEN_ONLY

# inet_diag_bc_op codes (include/uapi/linux/inet_diag.h)
_BC_JMP = 1
_BC_S_COND = 7
_BC_D_COND = 8

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBBBI48x")  # struct inet_diag_req_v2, empty inet_diag_sockid
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr (nlattr)
_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes, no
_HOSTCOND = struct.Struct("=BBxxi")  # struct inet_diag_hostcond without its address
_ERROR = struct.Struct("=i")
_MESSAGE_V4 = struct.Struct("=xB2xHH4s12x4s12x24xII")
_MESSAGE_V6 = struct.Struct("=xB2xHH16s16s24xII")
"""struct inet_diag_msg after its nlmsghdr: (family,) state, (timer, retrans), sport, dport,
src, dst, (if, cookie, expires, rqueue, wqueue), uid, inode.  An IPv4 address is the first
4 of its 16 bytes."""
_RECEIVE_BUFFER = 1 << 18

Prefix = Tuple[int, int, int]
"""(IP version, network address as an integer, prefix length)"""


class SockDiagError(OSError):
    """The kernel refused a dump or cannot be asked (no sock_diag, not allowed to enter)."""


def _netlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)  # CLOEXEC
    sock.bind((0, 0))
    return sock


_ACCEPT = -1
_REJECT = -2
_Op = Tuple[int, bytes, int, int]
"""(code, host condition or b"", *yes* target, *no* target): a target is an op's index,
:data:`_ACCEPT` (the end of the program) or :data:`_REJECT` (4 bytes past it)."""


def _assemble(ops: Sequence[_Op]) -> bytes:
    """The bytecode of ``ops``, each jump made relative to its op."""
    offsets = []
    position = 0
    for _, condition, _, _ in ops:
        offsets.append(position)
        position += _OP.size + len(condition)
    offsets.append(position)  # the index just past the last op is the end: accept

    def where(target: int) -> int:
        if target == _ACCEPT:
            return position
        if target == _REJECT:
            return position + _OP.size
        return offsets[target]

    return b"".join(
        _OP.pack(code, where(yes) - offsets[index], where(no) - offsets[index]) + condition
        for index, (code, condition, yes, no) in enumerate(ops)
    )


def _host_condition(version: int, value: int, length: int, port: int = -1) -> bytes:
    family, size = (socket.AF_INET, 4) if version == 4 else (socket.AF_INET6, 16)
    return _HOSTCOND.pack(family, length, port) + value.to_bytes(size, "big")


def _any_of(code: int, conditions: Sequence[bytes], first: int, then: int) -> List[_Op]:
    """Ops (numbered from ``first``) that jump to ``then`` when any condition holds and
    otherwise fall through: each condition's *yes* lands on a ``JMP`` to ``then``, its *no*
    on the next condition.  The kernel's audit (``inet_diag_bc_audit``) follows the *yes*
    chain and wants every *no* to land on it, which the ``JMP`` between conditions (its *yes*
    is the next op) provides."""
    ops: List[_Op] = []
    for condition in conditions:
        index = first + len(ops)
        ops.append((code, condition, index + 1, index + 2))
        ops.append((_BC_JMP, b"", index + 2, then))
    return ops


def _remote_conditions(prefixes: Sequence[Prefix], version: int) -> List[bytes]:
    # An IPv4 condition also matches IPv4-mapped addresses of IPv6 sockets (inet_diag_bc_run),
    # so a v6 program carries the v4 prefixes as well; a v6 prefix never matches a v4 socket.
    return [
        _host_condition(prefix_version, value, length)
        for prefix_version, value, length in prefixes
        if not (prefix_version == 6 and version == 4)
    ]


def exclude_remote(prefixes: Sequence[Prefix], version: int) -> bytes:
    """A bytecode program that drops every socket whose remote address lies in ``prefixes``;
    falling off its end accepts."""
    return _assemble(_any_of(_BC_D_COND, _remote_conditions(prefixes, version), 0, _REJECT))


LocalEnd = Tuple[int, Optional[int], int]
"""(IP version, address or None for any address, port) of a listener."""

MAX_LISTENER_CONDITIONS = 1024
"""More listeners than this and :func:`exclude_inbound_internal` gives up (no filter): the
program must stay well inside a netlink attribute (64 KiB)."""


def exclude_inbound_internal(
    listeners: Sequence[LocalEnd], prefixes: Sequence[Prefix], version: int
) -> bytes:
    """A program that drops the sockets a listener accepted (local end on a listener's
    address and port) whose peer lies in ``prefixes``: what counting outbound connections
    and finding external ones can both do without.  b"" (keep all) when nothing to drop."""
    return _on_listening_ends(listeners, prefixes, version, others=_ACCEPT)


def only_on_listening_ends(
    listeners: Sequence[LocalEnd], prefixes: Sequence[Prefix], version: int
) -> bytes:
    """A program that keeps only the sockets on a listener's address and port whose peer lies
    outside ``prefixes``: those whose direction the socket tables leave open.  b"" when
    no program can say it (no listener, or too many)."""
    return _on_listening_ends(listeners, prefixes, version, others=_REJECT)


def _on_listening_ends(
    listeners: Sequence[LocalEnd], prefixes: Sequence[Prefix], version: int, others: int
) -> bytes:
    """Sockets on a listener's end: dropped when their peer lies in ``prefixes``, kept
    otherwise; the sockets on no listener's end go to ``others``."""
    local = []
    for end_version, address, port in listeners:
        if end_version == 6 and version == 4:
            continue
        length = 0 if address is None else (32 if end_version == 4 else 128)
        local.append(_host_condition(end_version, address or 0, length, port))
    remote = _remote_conditions(prefixes, version)
    if not local or len(local) > MAX_LISTENER_CONDITIONS or (others == _ACCEPT and not remote):
        return b""
    check_remote = 2 * len(local) + 1
    ops = _any_of(_BC_S_COND, local, 0, check_remote)
    ops.append((_BC_JMP, b"", len(ops) + 1, others))  # no listener's end
    ops += _any_of(_BC_D_COND, remote, check_remote, _REJECT)
    return _assemble(ops)


class DiagRecord(NamedTuple):
    """One ``inet_diag_msg`` as it comes (``include/uapi/linux/inet_diag.h``).

    Ports are still in network byte order as read in host order (:func:`port` turns them into
    numbers); addresses are 4 bytes for IPv4 and 16 for IPv6, in network order, so equal
    addresses are equal bytes and a dict can key on them."""

    state: int
    sport: int
    dport: int
    src: bytes
    dst: bytes
    uid: int
    inode: int

    @property
    def local_port(self) -> int:
        return port(self.sport)

    @property
    def remote_port(self) -> int:
        return port(self.dport)

    @property
    def local_address(self) -> int:
        return int.from_bytes(self.src, "big")

    @property
    def remote_address(self) -> int:
        return int.from_bytes(self.dst, "big")

    def listening(self, protocol: int) -> bool:
        """:func:`agent.inet.is_listening` of this record."""
        return is_listening(protocol, self.state, int(any(self.dst)), self.dport)


_SWAP_PORTS = sys.byteorder == "little"


def port(wire: int) -> int:
    """A port of a :class:`DiagRecord` as a number."""
    return ((wire & 0xFF) << 8) | (wire >> 8) if _SWAP_PORTS else wire


class DiagSocket:
    """One namespace's ``sock_diag`` socket: dumps of one socket table at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sequence = 0
        self._buffer = bytearray(_RECEIVE_BUFFER)

    @classmethod
    def in_namespace(cls, pid: int, proc_root: str = PROC_ROOT) -> DiagSocket:
        return cls(open_in_namespace(pid, _netlink_socket, proc_root))

    def close(self) -> None:
        self._sock.close()

    def netns_cookie(self) -> Optional[int]:
        """The cookie of the network namespace this socket answers for (``SO_NETNS_COOKIE``,
        Linux 5.14): unlike its inode number, never given to another namespace.  None on
        older kernels."""
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return None
        return int.from_bytes(raw, sys.byteorder) if len(raw) == 8 else None

    def __enter__(self) -> DiagSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dump(
        self, table: SocketTable, states: int = ALL_STATES, bytecode: bytes = b""
    ) -> List[Socket]:
        """Every socket of ``table`` in one of ``states`` (a bit per TCP state) that
        ``bytecode`` accepts.  Raises :class:`SockDiagError` when the kernel refuses."""
        return [to_socket(record, table) for record in self.records(table, states, bytecode)]

    def records(
        self, table: SocketTable, states: int = ALL_STATES, bytecode: bytes = b""
    ) -> List[DiagRecord]:
        """:meth:`dump` without decoding: the sampler decodes only the records it keeps."""
        unpack = (_MESSAGE_V4 if table.version == 4 else _MESSAGE_V6).unpack_from
        records: List[DiagRecord] = []
        append = records.append
        make = DiagRecord._make
        header_size = _HEADER.size

        def each(view: memoryview, offset: int, length: int) -> None:
            append(make(unpack(view, offset + header_size)))

        self._dump(table, states, bytecode, 0, each)
        return records

    def openers(self, table: SocketTable, bytecode: bytes) -> Dict[Ends, bool]:
        """Each socket's :data:`Ends` -> whether this end ``connect()``ed (True) or a listener
        accepted it (False), for the TCP sockets of ``table`` that ``bytecode`` accepts and
        whose ``tcp_info`` tells (:func:`agent.collect.sockets.opener.connected_here`).
        Raises :class:`SockDiagError` when the kernel refuses."""
        unpack = (_MESSAGE_V4 if table.version == 4 else _MESSAGE_V6).unpack_from
        found: Dict[Ends, bool] = {}
        header_size, message_size = _HEADER.size, _MESSAGE_V4.size

        def each(view: memoryview, offset: int, length: int) -> None:
            record = DiagRecord._make(unpack(view, offset + header_size))
            info = _attribute(view, offset + header_size + message_size, offset + length, _INFO)
            connected = None if info is None else connected_here(record.state, info)
            if connected is not None:
                found[socket_ends(to_socket(record, table))] = connected

        self._dump(table, OPENED_STATES, bytecode, 1 << (_INFO - 1), each)
        return found

    def _dump(
        self,
        table: SocketTable,
        states: int,
        bytecode: bytes,
        extensions: int,
        each: Callable[[memoryview, int, int], None],
    ) -> None:
        """Ask for a dump and hand each socket's message (its offset and length in the
        buffer) to ``each``."""
        self._sock.send(self._request(table, states, bytecode, extensions))
        unpack_header = _HEADER.unpack_from
        header_size, message_size = _HEADER.size, _MESSAGE_V4.size
        buffer = self._buffer
        view = memoryview(buffer)
        sequence = self._sequence
        while True:
            received = self._sock.recv_into(buffer)
            offset = 0
            while offset + header_size <= received:
                length, kind, _, seq, _ = unpack_header(buffer, offset)
                if length < header_size or offset + length > received:
                    raise SockDiagError(errno.EPROTO, "sock_diag: truncated netlink message")
                if seq == sequence:
                    if kind == SOCK_DIAG_BY_FAMILY and length >= header_size + message_size:
                        each(view, offset, length)
                    elif kind == NLMSG_DONE:
                        return
                    elif kind == NLMSG_ERROR:
                        (code,) = _ERROR.unpack_from(buffer, offset + header_size)
                        raise SockDiagError(
                            -code, f"sock_diag refused the {table.name} dump: {os.strerror(-code)}"
                        )
                # else: left over from an earlier, abandoned dump
                offset += (length + 3) & ~3

    def _request(
        self, table: SocketTable, states: int, bytecode: bytes, extensions: int = 0
    ) -> bytes:
        self._sequence += 1
        body = _REQUEST.pack(table.family, table.protocol, extensions, 0, states)
        if bytecode:
            body += _ATTRIBUTE.pack(_ATTRIBUTE.size + len(bytecode), INET_DIAG_REQ_BYTECODE)
            body += bytecode
        flags = NLM_F_REQUEST | NLM_F_DUMP
        return (
            _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, self._sequence, 0)
            + body
        )


def _attribute(view: memoryview, start: int, end: int, kind: int) -> Optional[bytes]:
    """The payload of the first netlink attribute of ``kind`` between ``start`` and ``end``."""
    while start + _ATTRIBUTE.size <= end:
        length, found = _ATTRIBUTE.unpack_from(view, start)
        if length < _ATTRIBUTE.size or start + length > end:
            return None
        if found == kind:
            return bytes(view[start + _ATTRIBUTE.size : start + length])
        start += (length + 3) & ~3
    return None


def to_socket(record: DiagRecord, table: SocketTable) -> Socket:
    """A record of ``table`` decoded as :mod:`agent.collect.sockets.procnet` decodes a ``/proc``
    row."""
    return Socket(
        record.inode,
        table.family,
        table.protocol,
        table.version,
        record.local_address,
        record.local_port,
        record.remote_address,
        record.remote_port,
        record.state,
        record.uid,
    )
