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
from typing import Any, Collection, Dict, FrozenSet, List, Optional, Protocol, Set, Tuple

from agent.classify import Classifier, Verdict, format_ipv4, format_ipv6
from agent.identity import NO_OWNER, Identity, IdentityCache
from agent.owners import OwnerFinder
from agent.procnet import (
    IPPROTO_TCP,
    PROC_ROOT,
    SOCKET_TABLES,
    TCP_LISTEN,
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
from agent.sockdiag import (
    ALL_STATES,
    LISTEN_ONLY,
    NOT_LISTENING,
    DiagSocket,
    Record,
    count_sockets,
    exclude_inbound_internal,
    exclude_remote,
    is_listening_record,
    port,
    to_socket,
)

UNPRIVILEGED_NOTICE = (
    "egress-agent: not running as root, so this report is partial: sockets of other users' "
    "processes show without an owner (pid -1), and network namespaces (containers) in which "
    "none of your own processes run are not seen at all"
)
"""What to say once on stderr when :attr:`Sampler.limited` is true."""


class SamplerError(RuntimeError):
    """The sampler cannot work here at all (no /proc to list); the message says why."""


OutboundKey = int
"""One outbound TCP connection: the hash of (namespace inode, local end, remote end).  Only
ever compared with the keys of other samples of the same process, to count connections; an
int is a fraction of the memory of the tuple (the extension holds two samples' worth, every
outbound connection of the host), and two of the host's connections share a 64-bit hash with
odds around one in 10**9."""


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
    outbound_tcp: Optional[int] = None
    """Outbound TCP connections in its tables, when the sampler counts them."""
    error: str = ""


@dataclass
class SampleStats:
    """What one sample looked at and what it cost."""

    sockets: int = 0
    """Inet sockets in every namespace: the rows of their tables, or, when the kernel filtered
    the tables (sock_diag), its own count of them (``/proc/PID/net/sockstat``)."""
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
    outbound_tcp: Optional[FrozenSet[OutboundKey]] = None
    """Every outbound TCP connection in the tables, external or not; only when the sampler
    counts them (``count_outbound_tcp``).  Read through sock_diag, a namespace whose
    ``ActiveOpens`` has not moved since the last count keeps the connections of that count:
    none can have been opened since, so the next count of new ones is still right, and the
    kernel is spared a dump of every socket."""
    backend: str = ""
    """How the socket tables were read: ``sock_diag`` (netlink, filtered in the kernel),
    ``proc`` (``/proc/PID/net`` text), or ``sock_diag+proc`` when some namespaces fell back."""


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
    count_outbound_tcp: bool
    """Collect :attr:`SampleStats.outbound_tcp` in the next samples (when the backend can)."""

    @property
    def limited(self) -> bool: ...

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]: ...


def connection_of(identity: Identity, verdict: Optional[Verdict], **socket: Any) -> Connection:
    """One record from its three parts: the process holding the socket, the socket's own
    columns, and the verdict on its remote address (None when it has none)."""
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
        remote_address=verdict.normalized if verdict is not None else "",
        external=verdict is not None and verdict.external,
        expanded_address=verdict.expanded if verdict is not None else "",
        address_int=verdict.address_int if verdict is not None else "",
        address_class=verdict.category if verdict is not None else "",
        via=verdict.via if verdict is not None else None,
        embedded_ipv4=verdict.embedded_ipv4 if verdict is not None else None,
        **socket,
    )


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
    into: Set[OutboundKey],
    namespace_inode: int,
    listeners: ListenerIndex,
    tcp_ends: Dict[int, List[Tuple[str, str]]],
) -> int:
    """Add the TCP connections of one namespace that no listener accepted (so this host
    opened them: what the kernel counts as ``ActiveOpens``); how many."""
    added = 0
    for version, ends in tcp_ends.items():
        for local, remote in ends:
            try:
                address, local_port = decode_endpoint(local, version)
            except ValueError:
                continue
            if not listeners.is_inbound(IPPROTO_TCP, version, address, local_port):
                into.add(hash((namespace_inode, local, remote)))
                added += 1
    return added


def _add_outbound_records(
    into: Set[OutboundKey],
    namespace_inode: int,
    table: SocketTable,
    records: List[Record],
    listeners: ListenerIndex,
    listening_ports: Set[int],
) -> int:
    """:func:`_add_outbound` for sock_diag records of a TCP table; ``listening_ports`` (as
    in the records) spares the listener lookup for the connections on ephemeral ports."""
    added = 0
    version = table.version
    for state, local_port, remote_port, local, remote, _, _ in records:
        if state == TCP_LISTEN:
            continue
        if local_port in listening_ports and listeners.is_inbound(
            IPPROTO_TCP, version, int.from_bytes(local, "big"), port(local_port)
        ):
            continue
        into.add(hash((namespace_inode, local, local_port, remote, remote_port)))
        added += 1
    return added


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
        use_sock_diag: Optional[bool] = None,
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
        self._external_by_bytes: Dict[bytes, bool] = {}
        self._outbound_by_namespace: Dict[int, Tuple[int, FrozenSet[OutboundKey]]] = {}
        """namespace inode -> (its ActiveOpens, its outbound TCP connections) when last
        counted through sock_diag."""
        self._text: Dict[Tuple[int, int], str] = {}
        self._threads: Dict[int, int] = {}
        self.use_sock_diag = (
            use_sock_diag
            if use_sock_diag is not None
            else proc_root == PROC_ROOT and os.geteuid() == 0
        )
        """Read the tables through netlink sock_diag (:mod:`agent.sockdiag`), which needs root
        to enter other namespaces; otherwise, and wherever it fails, through ``/proc``."""
        self._never_external = classifier.never_external()
        self._prefilter = {
            version: exclude_remote(self._never_external, version) for version in (4, 6)
        }

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
        for memo in (self._external_by_hex, self._external_by_bytes, self._text):
            if len(memo) > self.HEX_MEMO_LIMIT:
                memo.clear()

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
        outbound_tcp: Optional[Set[OutboundKey]] = set() if self.count_outbound_tcp else None
        backends: Set[str] = set()
        for namespace in discovery.namespaces:
            info: Optional[NamespaceStats] = None
            if self.use_sock_diag:
                info = self._diag_namespace(namespace, want_all, kept, outbound_tcp)
            if info is None:
                info = self._read_namespace(namespace, want_all, kept, outbound_tcp)
                backends.add("proc")
            else:
                backends.add("sock_diag")
            stats.sockets += info.sockets
            stats.per_namespace.append(info)
        stats.backend = "+".join(sorted(backends, reverse=True))
        if outbound_tcp is not None:
            stats.outbound_tcp = frozenset(outbound_tcp)
            seen = {namespace.inode for namespace in discovery.namespaces}
            for inode in [i for i in self._outbound_by_namespace if i not in seen]:
                del self._outbound_by_namespace[inode]
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

    def _diag_namespace(
        self,
        namespace: NetNamespace,
        want_all: bool,
        kept: List[_Kept],
        outbound_tcp: Optional[Set[OutboundKey]],
    ) -> Optional[NamespaceStats]:
        """Read one namespace through sock_diag; None when it cannot (then ``/proc`` does).

        First what can listen: the TCP listeners (a cheap dump: the kernel walks only its
        listening hash) and the UDP tables (small), or every table when ``want_all``.  Then
        the rest of TCP, one table at a time, the kernel dropping the sockets whose peer is
        never external (:meth:`Classifier.never_external`) unless every outbound connection
        is being counted.  Records are decoded only when kept."""
        diag = None
        for pid in namespace.pids:
            try:
                diag = DiagSocket.in_namespace(*proc_entry(pid, self._threads, self.proc_root))
                break
            except OSError:
                continue  # gone, or not ours to enter: try the next process
        if diag is None:
            return None
        info = NamespaceStats(namespace.inode, pid)
        entry = proc_entry(pid, self._threads, self.proc_root)
        with contextlib.suppress(OSError):
            info.active_opens = read_tcp_counters(*entry).get("ActiveOpens")
        unchanged: Optional[FrozenSet[OutboundKey]] = None
        if outbound_tcp is not None and not want_all:
            last = self._outbound_by_namespace.get(namespace.inode)
            if last is not None and info.active_opens is not None and last[0] == info.active_opens:
                unchanged = last[1]  # no connection opened since: the same ones, or fewer
        counting = outbound_tcp is not None and unchanged is None
        namespace_outbound: Set[OutboundKey] = set()
        listeners = ListenerIndex()
        listening_ports: Set[int] = set()  # of TCP listeners, as in the records
        rows = 0
        try:
            with diag:
                # None stands for the rest of a TCP table, read when its turn comes
                batches: List[Tuple[SocketTable, Optional[List[Record]]]] = []
                for table in SOCKET_TABLES:
                    tcp = table.protocol == IPPROTO_TCP
                    states = LISTEN_ONLY if tcp and not want_all else ALL_STATES
                    records = diag.records(table, states)
                    rows += len(records)
                    for record in records:
                        if is_listening_record(record, table.protocol) and record[1]:
                            address = int.from_bytes(record[3], "big")
                            listeners.add(table.protocol, table.version, address, port(record[1]))
                            if tcp:
                                listening_ports.add(record[1])
                    batches.append((table, records))
                if not want_all:
                    batches += [(t, None) for t in SOCKET_TABLES if t.protocol == IPPROTO_TCP]
                for table, batch in batches:
                    if batch is None:
                        # counting: every outbound connection, and the external among the rest
                        program = (
                            exclude_inbound_internal(
                                listeners.endpoints(IPPROTO_TCP),
                                self._never_external,
                                table.version,
                            )
                            if counting
                            else self._prefilter[table.version]
                        )
                        batch = diag.records(table, NOT_LISTENING, program)
                        rows += len(batch)
                    if counting and table.protocol == IPPROTO_TCP:
                        _add_outbound_records(
                            namespace_outbound, namespace.inode, table, batch, listeners,
                            listening_ports,
                        )  # fmt: skip
                    self._keep_records(table, batch, namespace.inode, listeners, want_all, kept)
                    batch.clear()  # one big table at a time in memory
        except OSError:
            return None
        if outbound_tcp is not None:
            keys = unchanged if unchanged is not None else frozenset(namespace_outbound)
            outbound_tcp.update(keys)
            info.outbound_tcp = len(keys)
            if info.active_opens is not None:
                self._outbound_by_namespace[namespace.inode] = (info.active_opens, keys)
        info.listeners = len(listeners)
        if want_all or counting:
            info.sockets = rows
        else:
            try:
                info.sockets = count_sockets(*entry)
            except OSError:
                info.sockets = rows
        return info

    def _keep_records(
        self,
        table: SocketTable,
        records: List[Record],
        namespace_inode: int,
        listeners: ListenerIndex,
        want_all: bool,
        kept: List[_Kept],
    ) -> None:
        """Decode and keep the records whose peer is external (all of them with ``want_all``)."""
        if want_all:
            kept.extend((namespace_inode, listeners, to_socket(r, table)) for r in records)
            return
        external_by_bytes = self._external_by_bytes
        version = table.version
        for record in records:
            remote = record[4]
            external = external_by_bytes.get(remote)
            if external is None:
                external = self.classifier.judge(int.from_bytes(remote, "big"), version).external
                external_by_bytes[remote] = external
            if external:
                kept.append((namespace_inode, listeners, to_socket(record, table)))

    def _read_namespace(
        self,
        namespace: NetNamespace,
        want_all: bool,
        kept: List[_Kept],
        outbound_tcp: Optional[Set[OutboundKey]] = None,
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
        if outbound_tcp is not None:
            info.outbound_tcp = _add_outbound(outbound_tcp, namespace.inode, listeners, tcp_ends)
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
        return connection_of(
            identity,
            verdict,
            net_namespace=namespace_inode,
            fd=fd,
            socket=sock.inode,
            family=sock.family,
            protocol=sock.protocol,
            state=sock.state_name,
            local_address=self._address_text(sock.local_address, sock.version),
            local_port=sock.local_port,
            remote_port=sock.remote_port,
            direction="inbound" if inbound else "outbound",
        )
