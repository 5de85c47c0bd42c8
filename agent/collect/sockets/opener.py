"""Which end opened a TCP connection, from the kernel's own counters: :func:`connected_here`.

A socket on a listening port is not always one the listener accepted: a process that listens
on port P with ``SO_REUSEPORT`` may ``bind()`` another socket to P and ``connect()`` out from
it, and the socket tables show the two alike.  ``tcp_info`` (``include/uapi/linux/tcp.h``,
read through ``sock_diag``'s ``INET_DIAG_INFO``) tells them apart without events:

- ``tcpi_bytes_acked`` (RFC 4898 ``tcpEStatsAppHCThruOctetsAcked``, Linux 4.1) is advanced by
  ``tcp_snd_una_update()`` as the peer acknowledges.  The end that sent the SYN starts it at
  its ISN, so the peer's SYN-ACK acknowledges one sequence number more than it ever sent as
  data: the SYN.  An accepted socket is made by ``tcp_create_openreq_child()`` with
  ``snd_una`` already past its SYN-ACK, and counts data only.
- ``tcpi_bytes_sent`` and ``tcpi_bytes_retrans`` (Linux 4.19) count the data bytes sent, with
  and without retransmissions.

With nothing in flight (``tcpi_unacked`` 0) and no FIN of ours sent, ``bytes_acked - (bytes_sent
- bytes_retrans)`` is 1 for the end that connected and 0 for the end that accepted; once our FIN
is acknowledged (``FIN_WAIT2``) each is one more.  Anything else (data or a FIN in flight, an
older kernel's shorter ``tcp_info``, TCP Fast Open's data in the SYN) says nothing: None.

No local user can move these counters: they are the kernel's, advanced by acknowledgements.
A server that accepts with TCP Fast Open (``net.ipv4.tcp_fastopen`` with the server bit, off by
default) acknowledges the client's SYN through ``tcp_ack()`` and reads as connected here: an
inbound connection reported ``outbound``, never the other way.
"""

from __future__ import annotations

import struct
from typing import Optional

from agent.inet import TCP_ESTABLISHED

TCP_FIN_WAIT2 = 5
TCP_CLOSE_WAIT = 8

_OPTIONS = 5
"""Offset of ``tcpi_options`` (``__u8``)."""
TCPI_OPT_SYN_DATA = 32
"""``tcpi_options``: data was sent or received in the SYN (TCP Fast Open)."""
_UNACKED = struct.Struct("=I")
_UNACKED_AT = 24
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
_SENT = struct.Struct("=QQ")
_SENT_AT = 200
"""Offsets in ``struct tcp_info`` of ``tcpi_unacked``, ``tcpi_bytes_acked`` and
``tcpi_bytes_sent``, ``tcpi_bytes_retrans`` (stable since they were added)."""
NEEDED = _SENT_AT + _SENT.size
"""The ``tcp_info`` length that holds every counter read here (Linux 4.19 and later)."""

_OWN_FIN_ACKED = {TCP_ESTABLISHED: 0, TCP_CLOSE_WAIT: 0, TCP_FIN_WAIT2: 1}
"""The states in which no FIN of ours is in flight: how many such FINs the peer acknowledged."""
OPENER_STATES = tuple(_OWN_FIN_ACKED)
"""The states :func:`connected_here` can answer for."""


def connected_here(state: int, tcp_info: bytes) -> Optional[bool]:
    """True when this end sent the SYN (``connect()``), False when a listener accepted it, None
    when ``tcp_info`` cannot say (see the module)."""
    fins = _OWN_FIN_ACKED.get(state)
    if fins is None or len(tcp_info) < NEEDED:
        return None
    if tcp_info[_OPTIONS] & TCPI_OPT_SYN_DATA:
        return None
    (unacked,) = _UNACKED.unpack_from(tcp_info, _UNACKED_AT)
    if unacked:
        return None
    (acked,) = _BYTES_ACKED.unpack_from(tcp_info, _BYTES_ACKED_AT)
    sent, retransmitted = _SENT.unpack_from(tcp_info, _SENT_AT)
    beyond = acked - (sent - retransmitted) - fins
    if beyond == 1:
        return True
    if beyond == 0:
        return False
    return None
