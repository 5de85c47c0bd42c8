"""One live sample: namespaces -> sockets -> verdicts -> owners -> identity -> Connections.

The order is the point (``shared/reference/performance-notes.md``): the socket tables of every
network namespace are read first and only the remote address of each row is decoded and
classified; the expensive steps, mapping sockets to processes through ``/proc/*/fd`` and
looking up who those processes are, run only for the sockets that are kept (external ones,
or every one when asked).  That is osquery's ``process_open_sockets``
(``osquery/tables/networking/linux/process_open_sockets.cpp``) turned inside out, so that the
cost follows the few sockets that matter rather than every fd on the host.

Races are normal: a socket that closes between the passes simply has no owner (pid -1), a
process that exits yields an identity with nothing but its pid.  Neither raises.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Collection, Dict, FrozenSet, List, Optional, Protocol, Set, Tuple

from agent.classify import Classifier, format_ipv4, format_ipv6
from agent.identity import NO_OWNER, Identity, IdentityCache
from agent.owners import OwnerFinder
from agent.procnet import (
    IPPROTO_TCP,
    PROC_ROOT,
    SOCKET_TABLES,
    ListenerIndex,
    NetNamespace,
    Socket,
    SocketTable,
    decode_address,
    decode_endpoint,
    discover_namespaces,
    proc_entry,
    read_socket_table,
    read_tcp_counters,
    scan_socket_table,
)
from agent.records import Connection

UNPRIVILEGED_NOTICE = (
    "egress-agent: not running as root, so this report is partial: sockets of other users' "
    "processes show without an owner (pid -1), and network namespaces (containers) in which "
    "none of your own processes run are not seen at all"
)
"""What to say once on stderr when :attr:`Sampler.limited` is true."""


class SamplerError(RuntimeError):
    """The sampler cannot work here at all (no /proc to list); the message says why."""


@dataclass
class NamespaceStats:
    """One network namespace as the last sample saw it."""

    inode: int
    pid: int
    """The pid its tables were read through (-1 when none could be read)."""
    sockets: int = 0
    listeners: int = 0
    active_opens: Optional[int] = None
    """``Tcp: ActiveOpens`` from ``/proc/PID/net/snmp``: connections this namespace opened
    since it was created (RFC 1213 ``tcpActiveOpens``)."""
    error: str = ""


@dataclass
class SampleStats:
    """What one sample looked at and what it cost."""

    sockets: int = 0
    """Rows in the socket tables of every namespace."""
    wanted: int = 0
    """Sockets kept (external ones, or all) before owners were looked up."""
    rows: int = 0
    """Connections returned."""
    namespaces: int = 0
    processes: int = 0
    """Distinct owning processes of the rows."""
    ownerless: int = 0
    pids_scanned: int = 0
    fds_scanned: int = 0
    unreadable_pids: int = 0
    owner_scan_skipped: bool = False
    namespace_errors: Dict[int, str] = field(default_factory=dict)
    """pid -> why its network namespace could not be read."""
    duration_ms: float = 0.0
    per_namespace: List[NamespaceStats] = field(default_factory=list)
    outbound_tcp: Optional[FrozenSet[Tuple[int, str, str]]] = None
    """(namespace inode, local end, remote end) of every outbound TCP connection in the tables,
    external or not; only when the sampler counts them (``count_outbound_tcp``)."""


@dataclass
class SamplerTotals:
    """Counters over the sampler's life, for the extension's info table and the benchmark."""

    samples: int = 0
    sockets: int = 0
    wanted: int = 0
    rows: int = 0
    pids_scanned: int = 0
    fds_scanned: int = 0
    owner_scans_skipped: int = 0
    duration_ms: float = 0.0

    def add(self, stats: SampleStats) -> None:
        self.samples += 1
        self.sockets += stats.sockets
        self.wanted += stats.wanted
        self.rows += stats.rows
        self.pids_scanned += stats.pids_scanned
        self.fds_scanned += stats.fds_scanned
        self.owner_scans_skipped += stats.owner_scan_skipped
        self.duration_ms += stats.duration_ms


class SocketSampler(Protocol):
    """What the CLI and the osquery tables need of a sampler: :class:`Sampler` on Linux,
    :class:`agent.psutil_backend.PsutilSampler` elsewhere or with ``--backend psutil``."""

    last: SampleStats
    totals: SamplerTotals

    @property
    def limited(self) -> bool: ...

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]: ...


def open_sampler(
    classifier: Classifier, backend: str = "auto", count_outbound_tcp: bool = False
) -> SocketSampler:
    """The sampler for this platform: /proc in every network namespace on Linux
    (``backend="proc"``), psutil's view of this namespace elsewhere (``backend="psutil"``)."""
    if backend == "psutil" or (backend == "auto" and not os.path.isdir("/proc/self/net")):
        from agent.psutil_backend import PsutilSampler

        return PsutilSampler(classifier)
    return Sampler(classifier, count_outbound_tcp=count_outbound_tcp)


def _add_outbound(
    into: Set[Tuple[int, str, str]],
    namespace_inode: int,
    listeners: ListenerIndex,
    tcp_ends: Dict[int, List[Tuple[str, str]]],
) -> None:
    """Add the TCP connections of one namespace that no listener accepted (so this host
    opened them: what the kernel counts as ``ActiveOpens``)."""
    for version, ends in tcp_ends.items():
        for local, remote in ends:
            try:
                address, port = decode_endpoint(local, version)
            except ValueError:
                continue
            if not listeners.is_inbound(IPPROTO_TCP, version, address, port):
                into.add((namespace_inode, local, remote))


_Kept = Tuple[int, ListenerIndex, Socket]
"""(namespace inode, its listeners, a kept socket)"""


class Sampler:
    """Samples the inet sockets of every network namespace, keeping caches between samples.

    Kept between samples: the classifier's verdicts, the remote-address hex -> external
    memo, the owner scan's order and negative cache (:class:`OwnerFinder`) and process
    identities (:class:`IdentityCache`).  Not thread-safe: one sampler per thread.
    """

    HEX_MEMO_LIMIT = 65536

    def __init__(
        self,
        classifier: Classifier,
        proc_root: str = PROC_ROOT,
        owners: Optional[OwnerFinder] = None,
        identities: Optional[IdentityCache] = None,
        count_outbound_tcp: bool = False,
    ) -> None:
        self.classifier = classifier
        self.count_outbound_tcp = count_outbound_tcp
        """Also collect every outbound TCP connection's ends (:attr:`SampleStats.outbound_tcp`),
        so that the extension can set what it saw beside the kernel's ``ActiveOpens``."""
        self.proc_root = proc_root
        self.owners = owners if owners is not None else OwnerFinder(proc_root)
        self.identities = identities if identities is not None else IdentityCache(proc_root)
        self.last = SampleStats()
        self.totals = SamplerTotals()
        self._external_by_hex: Dict[str, bool] = {}
        self._text: Dict[Tuple[int, int], str] = {}
        self._threads: Dict[int, int] = {}

    @property
    def limited(self) -> bool:
        """True when not root: other users' fd links are unreadable, so their sockets come
        without an owner (see :data:`UNPRIVILEGED_NOTICE`)."""
        return os.geteuid() != 0

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]:
        """The connections of this moment.

        ``want_all``: every inet socket, each with its verdict; otherwise only those whose
        remote address is external.  ``pids``: only the sockets those processes hold, from
        their namespaces (osquery pushes ``WHERE pid = N`` down); ownerless sockets are then
        left out, as osquery does.  Raises :class:`SamplerError` when /proc cannot be listed.
        """
        started = time.perf_counter()
        stats = SampleStats()
        if len(self._external_by_hex) > self.HEX_MEMO_LIMIT:
            self._external_by_hex.clear()
        if len(self._text) > self.HEX_MEMO_LIMIT:
            self._text.clear()

        try:
            discovery = discover_namespaces(self.proc_root, pids)
        except OSError as error:
            raise SamplerError(
                f"cannot list the processes in {self.proc_root}: "
                f"{error.strerror or error}; without /proc use the psutil backend"
            ) from error
        stats.namespace_errors = discovery.errors
        stats.namespaces = len(discovery.namespaces)
        self._threads = discovery.threads
        kept: List[_Kept] = []
        outbound_tcp: Optional[Set[Tuple[int, str, str]]] = (
            set() if self.count_outbound_tcp else None
        )
        for namespace in discovery.namespaces:
            stats.per_namespace.append(
                self._read_namespace(namespace, want_all, kept, stats, outbound_tcp)
            )
        if outbound_tcp is not None:
            stats.outbound_tcp = frozenset(outbound_tcp)
        stats.wanted = len(kept)

        scan = self.owners.find({sock.inode for _, _, sock in kept}, pids, discovery.threads)
        stats.pids_scanned = scan.pids_scanned
        stats.fds_scanned = scan.fds_scanned
        stats.unreadable_pids = scan.unreadable_pids
        stats.owner_scan_skipped = scan.skipped

        rows: List[Connection] = []
        identities: Dict[int, Identity] = {}
        for namespace_inode, listeners, sock in kept:
            owner = scan.owners.get(sock.inode)
            if owner is None:
                if pids is not None:
                    continue
                identity, fd = NO_OWNER, -1
                stats.ownerless += 1
            else:
                pid, fd = owner
                known = identities.get(pid)
                if known is None:
                    known = identities[pid] = self.identities.lookup(pid)
                identity = known
            rows.append(self._record(namespace_inode, listeners, sock, identity, fd))

        stats.rows = len(rows)
        stats.processes = len(identities)
        stats.duration_ms = (time.perf_counter() - started) * 1000.0
        self.last = stats
        self.totals.add(stats)
        return rows

    def _is_external_hex(self, hex_text: str, version: int) -> bool:
        external = self._external_by_hex.get(hex_text)
        if external is None:
            try:
                value = decode_address(hex_text, version)
            except ValueError:
                return False
            external = self.classifier.judge(value, version).external
            self._external_by_hex[hex_text] = external
        return external

    def _read_namespace(
        self,
        namespace: NetNamespace,
        want_all: bool,
        kept: List[_Kept],
        stats: SampleStats,
        outbound_tcp: Optional[Set[Tuple[int, str, str]]] = None,
    ) -> NamespaceStats:
        """Read the four tables of one namespace, trying its next pid when one exits."""
        listeners = ListenerIndex()
        tcp_ends: Dict[int, List[Tuple[str, str]]] = {}
        info = NamespaceStats(namespace.inode, -1)
        candidates = namespace.pids
        current = 0
        for table in SOCKET_TABLES:
            text, current = self._read_table(candidates, current, table)
            if text is None:
                continue
            info.pid = candidates[current]
            sockets, seen = scan_socket_table(
                text,
                table,
                None if want_all else self._is_external_hex,
                listeners,
                None if outbound_tcp is None else tcp_ends.setdefault(table.version, []),
            )
            info.sockets += seen
            kept.extend((namespace.inode, listeners, sock) for sock in sockets)
        if info.pid < 0:
            info.error = "no process of this namespace let its socket tables be read"
        else:
            with contextlib.suppress(OSError):
                counters = read_tcp_counters(*proc_entry(info.pid, self._threads, self.proc_root))
                info.active_opens = counters.get("ActiveOpens")
        info.listeners = len(listeners)
        stats.sockets += info.sockets
        if outbound_tcp is not None:
            _add_outbound(outbound_tcp, namespace.inode, listeners, tcp_ends)
        return info

    def _read_table(
        self, candidates: List[int], current: int, table: SocketTable
    ) -> Tuple[Optional[str], int]:
        """The table's text through the first candidate pid still there, from ``current``."""
        for index in range(current, len(candidates)):
            entry, root = proc_entry(candidates[index], self._threads, self.proc_root)
            try:
                return read_socket_table(entry, table, root), index
            except FileNotFoundError:
                # No such table on this kernel (IPv6 disabled), or the process is gone or a
                # zombie (whose /proc/PID/net is still a directory, but cannot be listed).
                try:
                    present = os.listdir(f"{root}/{entry}/net")
                except OSError:
                    continue
                if table.name not in present:
                    return None, index
            except OSError:
                continue  # gone, or not ours to read: try the next process
        return None, current

    def _address_text(self, value: int, version: int) -> str:
        key = (version, value)
        text = self._text.get(key)
        if text is None:
            text = format_ipv4(value) if version == 4 else format_ipv6(value)
            self._text[key] = text
        return text

    def _record(
        self,
        namespace_inode: int,
        listeners: ListenerIndex,
        sock: Socket,
        identity: Identity,
        fd: int,
    ) -> Connection:
        verdict = self.classifier.classify_int(sock.remote_address, sock.version)
        inbound = listeners.is_inbound(
            sock.protocol, sock.version, sock.local_address, sock.local_port
        )
        return Connection(
            pid=identity.pid,
            name=identity.name,
            path=identity.path,
            cmdline=identity.cmdline,
            uid=identity.uid,
            username=identity.username,
            parent=identity.parent,
            process_start_time=identity.process_start_time,
            process_uuid=identity.process_uuid,
            container_id=identity.container_id,
            systemd_unit=identity.systemd_unit,
            net_namespace=namespace_inode,
            fd=fd,
            socket=sock.inode,
            family=sock.family,
            protocol=sock.protocol,
            state=sock.state_name,
            local_address=self._address_text(sock.local_address, sock.version),
            local_port=sock.local_port,
            remote_address=verdict.normalized,
            remote_port=sock.remote_port,
            direction="inbound" if inbound else "outbound",
            external=verdict.external,
            expanded_address=verdict.expanded,
            address_int=verdict.address_int,
            address_class=verdict.category,
            via=verdict.via,
            embedded_ipv4=verdict.embedded_ipv4,
        )
