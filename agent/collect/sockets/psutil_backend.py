"""The same Connection records from ``psutil.net_connections('inet')``, for other platforms.

psutil works wherever psutil does (macOS, the BSDs, Windows), which is why it is the fallback,
and on Linux it is the reference the filter-first sampler is checked against (``--backend
psutil``).  It is slower and sees less: on Linux it reads only the caller's network namespace
and scans every fd of every process before it can filter (``performance-notes.md``); it gives
no socket inode.  Fields it cannot fill stay empty: ``socket`` is None, and ``net_namespace``
is set on Linux only.
"""

from __future__ import annotations

import os
import socket as socketlib
import time
from typing import Any, Collection, Dict, Iterator, List, Optional, Set, Tuple

import psutil

from agent.classify import AddressError, Classifier, Verdict
from agent.collect import NamespaceStats, SampleStats
from agent.collect.netns import PROC_ROOT, namespace_of
from agent.collect.sockets.outbound import add_outbound
from agent.collect.sockets.procnet import ListenerIndex
from agent.identity import NO_OWNER, Identity, IdentityCache
from agent.inet import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_LISTEN,
    direction_of,
    is_listening,
)
from agent.records import Connection, SocketColumns, connection_of

_PSUTIL_TO_OSQUERY_STATE = {"CLOSE": "CLOSED", "NONE": ""}
"""psutil's status names (``psutil.CONN_*``) that osquery spells otherwise; the rest agree."""


class PsutilSampler:
    """A :class:`agent.collect.Sampler` built on ``psutil.net_connections``."""

    def __init__(self, classifier: Classifier, identities: Optional[IdentityCache] = None) -> None:
        self.classifier = classifier
        self.identities = identities if identities is not None else IdentityCache()
        self.last = SampleStats()
        self.count_outbound_tcp = False
        """Also collect every outbound TCP connection (:attr:`SampleStats.outbound_tcp`)."""
        self._verdicts: Dict[str, Optional[Verdict]] = {}

    @property
    def limited(self) -> bool:
        """True when not root (psutil cannot read other users' fds either)."""
        return hasattr(os, "geteuid") and os.geteuid() != 0

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]:
        """The connections of this moment; same meaning of arguments as ``Sampler.sample``."""
        started = time.perf_counter()
        stats = SampleStats(namespaces=1)
        try:
            found: List[Any] = list(psutil.net_connections("inet"))
        except psutil.AccessDenied:
            found = []  # macOS without root refuses the whole listing
        stats.sockets = len(found)
        namespace = _own_namespace()
        listeners = ListenerIndex()
        for conn in found:
            if _listens(conn):
                verdict = self._verdict(conn.laddr.ip)
                if verdict is not None:
                    address = int(verdict.address_int)
                    listeners.add(_protocol(conn.type), verdict.version, address, conn.laddr.port)

        if self.count_outbound_tcp:
            outbound: Set[int] = set()
            add_outbound(outbound, namespace or 0, listeners, self._tcp_ends(found))
            stats.outbound_tcp = frozenset(outbound)

        wanted_pids = None if pids is None else set(pids)
        rows: List[Connection] = []
        identities: Dict[int, Identity] = {}
        for conn in found:
            if wanted_pids is not None and conn.pid not in wanted_pids:
                continue
            remote = self._verdict(conn.raddr.ip if conn.raddr else _unspecified(conn.family))
            if not want_all and (remote is None or not remote.external):
                continue
            stats.wanted += 1
            identity = NO_OWNER
            if conn.pid is not None:
                known = identities.get(conn.pid)
                if known is None:
                    known = identities[conn.pid] = self.identities.lookup(conn.pid)
                identity = known
            else:
                stats.ownerless += 1
            rows.append(self._record(conn, remote, listeners, identity, namespace))

        stats.rows = len(rows)
        stats.processes = len(identities)
        stats.per_namespace = [NamespaceStats(namespace or 0, -1, stats.sockets, len(listeners))]
        stats.backend = "psutil"
        stats.duration_ms = (time.perf_counter() - started) * 1000.0
        self.last = stats
        return rows

    def _tcp_ends(self, found: List[Any]) -> Iterator[Tuple[int, int, int, int, int]]:
        """(version, local, local port, remote, remote port) of each connected TCP socket."""
        for conn in found:
            if _protocol(conn.type) != IPPROTO_TCP or not (conn.laddr and conn.raddr):
                continue
            local, remote = self._verdict(conn.laddr.ip), self._verdict(conn.raddr.ip)
            if local is not None and remote is not None:
                yield (
                    remote.version,
                    int(local.address_int),
                    conn.laddr.port,
                    int(remote.address_int),
                    conn.raddr.port,
                )

    def _verdict(self, text: str) -> Optional[Verdict]:
        if text not in self._verdicts:
            try:
                self._verdicts[text] = self.classifier.classify(text)
            except AddressError:
                self._verdicts[text] = None
        return self._verdicts[text]

    def _record(
        self,
        conn: Any,
        remote: Optional[Verdict],
        listeners: ListenerIndex,
        identity: Identity,
        namespace: Optional[int],
    ) -> Connection:
        protocol = _protocol(conn.type)
        local = self._verdict(conn.laddr.ip) if conn.laddr else None
        local_port = conn.laddr.port if conn.laddr else 0
        inbound = local is not None and listeners.is_inbound(
            protocol, local.version, int(local.address_int), local_port
        )
        family = AF_INET6 if conn.family == socketlib.AF_INET6 else AF_INET
        state = str(conn.status) if protocol == IPPROTO_TCP else ""
        remote_port = conn.raddr.port if conn.raddr else 0
        return connection_of(
            identity,
            remote,
            SocketColumns(
                net_namespace=namespace,
                fd=conn.fd if conn.fd is not None else -1,
                socket=None,
                family=family,
                protocol=protocol,
                state=_PSUTIL_TO_OSQUERY_STATE.get(state, state),
                local_address=local.normalized if local is not None else "",
                local_port=local_port,
                remote_port=remote_port,
                direction=direction_of(
                    inbound, conn.pid is not None, False if _listens(conn) else None
                ),
            ),
        )


def _protocol(sock_type: int) -> int:
    return IPPROTO_UDP if sock_type == socketlib.SOCK_DGRAM else IPPROTO_TCP


def _listens(conn: Any) -> bool:
    """:func:`agent.inet.is_listening` of a psutil connection bound to a port."""
    if not conn.laddr or not conn.laddr.port:
        return False
    state = TCP_LISTEN if conn.status == psutil.CONN_LISTEN else 0
    return is_listening(_protocol(conn.type), state, int(bool(conn.raddr)), 0)


def _unspecified(family: int) -> str:
    """What an unconnected socket's remote end reads as (psutil gives an empty tuple)."""
    return "::" if family == socketlib.AF_INET6 else "0.0.0.0"  # noqa: S104 (not a bind)


def _own_namespace() -> Optional[int]:
    try:
        return namespace_of(os.getpid(), PROC_ROOT)
    except (OSError, ValueError):
        return None
