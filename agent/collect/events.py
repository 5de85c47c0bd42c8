"""What an event source reports, and what the pipeline needs of one: :class:`SocketEvent`,
:class:`EventKind`, the :class:`EventSource` protocol.

A sampler (:class:`agent.collect.Sampler`) says what the socket tables hold at one moment; an
event source says what happened in between, as it happens: every connect and its outcome,
every accepted connection and its close, every datagram flow.  The kernel events of
:mod:`agent.collect.kernel` are one; a source of another kind (an eBPF program, an audit
log, a test's own file) only has to meet :class:`EventSource` and be named in
:data:`agent.pipeline.agent.EVENT_SOURCES` to reach the history, the events table, ``watch``
and the audit (``docs/DESIGN.md``, "Add an event source").
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Protocol

if TYPE_CHECKING:
    from agent.identity import Identity


class EventKind(str, enum.Enum):
    """What one :class:`SocketEvent` says happened (its value is the word the tables show)."""

    CONNECT = "connect"
    """A TCP connect began (``SYN_SENT``); its outcome follows with the same key."""
    ESTABLISHED = "established"
    REFUSED = "refused"
    """The peer answered with a reset."""
    TIMEOUT = "timeout"
    """Any other end before ``ESTABLISHED``: no answer, an ICMP error, the caller gave up."""
    ACCEPTED = "accepted"
    """A listener's connection, its owner the listener's process."""
    CLOSED = "closed"
    """An established or accepted connection ended."""
    UDP = "udp"
    """A new datagram flow: a connection that opened and is done."""

    def __str__(self) -> str:
        return self.value


OPENING_KINDS = frozenset({EventKind.CONNECT, EventKind.ACCEPTED, EventKind.UDP})
"""The kinds that begin a connection (a row of the events table)."""


class SocketEvent(NamedTuple):
    """One fact about a connection, for the history, a table row or ``watch``.

    ``connect`` and its outcome (``established``, ``refused``, ``timeout``) share ``key``, as do
    ``accepted`` and its ``closed``; ``closed`` also ends an ``established`` one.  A socket the
    source did not see begin (older than the source) ends with a ``closed``, ``refused`` or
    ``timeout`` whose identity is :data:`agent.identity.NO_OWNER` and namespace None.
    Addresses are integers (network order, as :mod:`agent.collect.sockets.procnet`); ``version``
    6 with an IPv4-mapped address is an ``AF_INET6`` socket talking IPv4, as the socket tables
    show it.
    """

    time: float
    """Unix seconds of the event (the connect for ``connect``, the outcome for the others)."""
    kind: EventKind
    protocol: int
    family: int
    version: int
    local_address: int
    local_port: int
    remote_address: int
    remote_port: int
    net_namespace: Optional[int]
    identity: Identity
    """The process: the caller of ``connect()``/``sendto()``; the listener's owner for
    ``accepted``."""
    direction: str
    """:data:`agent.inet.OUTBOUND` or :data:`agent.inet.INBOUND`."""
    key: int
    """The socket, numbered by this source (unique while it runs)."""


class EventSource(Protocol):
    """What the pipeline's feed (:class:`agent.pipeline.feed.EventFeed`) needs of a source.

    ``poll`` and ``close`` are called from the feed's thread only.
    """

    name: str
    """The history's source name (``seen_by``, the runs' ``events_source``)."""

    def poll(self, timeout: float) -> List[SocketEvent]:
        """The events since the last call, waiting up to ``timeout`` seconds for the first.
        Raises OSError when the source is gone for good (the feed stops, sampling goes on)."""
        ...

    @property
    def lost(self) -> int:
        """Events the source knows it lost so far (the audit's ``incomplete``)."""
        ...

    @property
    def outbound_tcp_seen(self) -> int:
        """Outbound TCP connects seen so far, in every namespace (the coverage figure)."""
        ...

    def close(self) -> None:
        """Release what the source holds; it is not polled again."""
        ...
