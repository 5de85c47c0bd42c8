"""One live sample on Linux: namespaces -> sockets -> verdicts -> owners -> identity -> records.

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
from typing import Collection, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

from agent.classify import Classifier, format_ipv4, format_ipv6
from agent.collect import NamespaceStats, SamplerError, SampleStats
from agent.collect.netns import PROC_ROOT, NetNamespace, discover_namespaces, proc_entry
from agent.collect.sockets.changes import (
    DEFAULT_FULL_READ_EVERY,
    NamespaceRead,
    Reuse,
    Signals,
    read_signals,
)
from agent.collect.sockets.outbound import OutboundKey, OutboundMemo, add_outbound
from agent.collect.sockets.procnet import (
    DATAGRAM_TABLES,
    SOCKET_TABLES,
    Ends,
    ListenerIndex,
    Socket,
    SocketTable,
    connection_ends,
    decode_address,
    read_socket_table,
    read_tcp_counters,
    scan_socket_table,
    socket_ends,
)
from agent.collect.sockets.sockdiag import (
    ALL_STATES,
    LISTEN_ONLY,
    NOT_LISTENING,
    DiagRecord,
    DiagSocket,
    exclude_inbound_internal,
    exclude_remote,
    only_on_listening_ends,
    to_socket,
)
from agent.identity import NO_OWNER, Identity, IdentityCache
from agent.inet import IPPROTO_TCP, TCP_LISTEN, direction_of, is_listening
from agent.owners import OwnerFinder
from agent.records import Connection, SocketColumns, connection_of

_Kept = Tuple[int, ListenerIndex, Socket]
"""(namespace inode, its listeners, a kept socket)"""

_TCP_TABLES = tuple(table for table in SOCKET_TABLES if table.protocol == IPPROTO_TCP)


def _active_opens(entry: Tuple[int, str]) -> Optional[int]:
    """The namespace's ``Tcp: ActiveOpens`` through ``(pid, proc_root)``, None if unreadable."""
    with contextlib.suppress(OSError):
        return read_tcp_counters(*entry).get("ActiveOpens")
    return None


def _record_ends(records: List[DiagRecord], version: int) -> Iterator[Ends]:
    """The ends of the TCP connections among ``records`` (listeners left out)."""
    for record in records:
        if record.state != TCP_LISTEN:
            yield (
                version,
                record.local_address,
                record.local_port,
                record.remote_address,
                record.remote_port,
            )


class LinuxSampler:
    """Samples the inet sockets of every network namespace, keeping caches between samples.

    Kept between samples: the classifier's verdicts, the remote-address hex -> external
    memo, the owner scan's order and negative cache (:class:`OwnerFinder`), process
    identities (:class:`IdentityCache`), and each namespace's last read with the counters
    read before it (:class:`Reuse`): a namespace whose counters have not moved is not
    dumped again, for at most ``full_read_every`` seconds.  Not thread-safe: one sampler per
    thread.
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
        full_read_every: float = DEFAULT_FULL_READ_EVERY,
        reuse: Optional[Reuse] = None,
    ) -> None:
        self.classifier = classifier
        self.count_outbound_tcp = count_outbound_tcp
        """Also collect every outbound TCP connection's ends (:attr:`SampleStats.outbound_tcp`),
        so that the extension can set what it saw beside the kernel's ``ActiveOpens``."""
        self.proc_root = proc_root
        self.owners = owners if owners is not None else OwnerFinder(proc_root)
        self.identities = identities if identities is not None else IdentityCache(proc_root)
        self.last = SampleStats()
        self._external_by_hex: Dict[str, bool] = {}
        self._external_by_bytes: Dict[bytes, bool] = {}
        self._outbound_memo = OutboundMemo()
        """Each namespace's outbound TCP connections when last counted through sock_diag."""
        self._text: Dict[Tuple[int, int], str] = {}
        self._opened: Dict[int, Dict[Tuple[Ends, int], bool]] = {}
        """Per namespace, what ``tcp_info`` told of each socket (by its ends and inode: a new
        socket on the same ends is asked again) at the last sample."""
        self._threads: Dict[int, int] = {}
        self.use_sock_diag = (
            use_sock_diag
            if use_sock_diag is not None
            else proc_root == PROC_ROOT and os.geteuid() == 0
        )
        """Read the tables through netlink sock_diag (:mod:`agent.collect.sockets.sockdiag`), which
        needs root to enter other namespaces; otherwise, and wherever it fails, ``/proc``."""
        self.reuse = reuse if reuse is not None else Reuse(full_read_every)
        """Each namespace's last read, used again while its counters stand still
        (:mod:`agent.collect.sockets.changes`); through sock_diag only (``/proc`` reads every table
        every time), and never for ``want_all``."""
        self._never_external = classifier.never_external()
        self._prefilter = {
            version: exclude_remote(self._never_external, version) for version in (4, 6)
        }

    @property
    def limited(self) -> bool:
        """True when not root: other users' fd links are unreadable, so their sockets come
        without an owner (see :data:`agent.collect.UNPRIVILEGED_NOTICE`)."""
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
        if pids is None:
            stats.discovery = discovery
        self._threads = discovery.threads
        kept = self._read_namespaces(discovery.namespaces, want_all, stats)
        if pids is None:
            self.reuse.keep_only(namespace.inode for namespace in discovery.namespaces)
            live = {namespace.inode for namespace in discovery.namespaces}
            self._opened = {inode: v for inode, v in self._opened.items() if inode in live}

        scan = self.owners.find({sock.inode for _, _, sock in kept}, pids, discovery.threads)
        stats.pids_scanned = scan.pids_scanned
        stats.fds_scanned = scan.fds_scanned
        stats.unreadable_pids = scan.unreadable_pids
        stats.owner_scan_skipped = scan.skipped
        rows = self._records(kept, scan.owners, pids is not None, stats)

        stats.rows = len(rows)
        stats.duration_ms = (time.perf_counter() - started) * 1000.0
        self.last = stats
        return rows

    def _read_namespaces(
        self, namespaces: List[NetNamespace], want_all: bool, stats: SampleStats
    ) -> List[_Kept]:
        """The sockets worth an owner in every namespace: sock_diag where it works, ``/proc``
        where it does not; the figures of each namespace go into ``stats``."""
        kept: List[_Kept] = []
        outbound_tcp: Optional[Set[OutboundKey]] = set() if self.count_outbound_tcp else None
        backends: Set[str] = set()
        for namespace in namespaces:
            info: Optional[NamespaceStats] = None
            if self.use_sock_diag:
                info = self._diag_namespace(namespace, want_all, kept, outbound_tcp)
            if info is None:
                info = self._read_namespace(namespace, want_all, kept, outbound_tcp)
                backends.add("proc")
            else:
                backends.add("sock_diag")
            if info.pid >= 0:
                info.sockets += self._read_datagram_tables(namespace, want_all, kept)
            stats.sockets += info.sockets
            stats.namespaces_reused += info.reused
            stats.namespaces_quiet += info.quiet
            stats.per_namespace.append(info)
        stats.backend = "+".join(sorted(backends, reverse=True))
        if outbound_tcp is not None:
            stats.outbound_tcp = frozenset(outbound_tcp)
            self._outbound_memo.keep_only(namespace.inode for namespace in namespaces)
        stats.wanted = len(kept)
        return kept

    def _records(
        self,
        kept: List[_Kept],
        owners: Dict[int, Tuple[int, int]],
        narrowed: bool,
        stats: SampleStats,
    ) -> List[Connection]:
        """A record for each kept socket, with its owner's identity (looked up once per
        process); ownerless sockets are left out when the sample was ``narrowed`` to pids."""
        rows: List[Connection] = []
        identities: Dict[int, Identity] = {}
        for namespace_inode, listeners, sock in kept:
            owner = owners.get(sock.inode)
            if owner is None:
                if narrowed:
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
        stats.processes = len(identities)
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

        Its counters are read first (:func:`read_signals`).  When none moved since its last
        read (:meth:`Reuse.whole`), that read's sockets and listeners serve and nothing is
        dumped; when only UDP's moved (:meth:`Reuse.tcp`), listeners and UDP are dumped (cheap)
        and the TCP connections of the last read serve; otherwise every table is dumped.
        Counting outbound connections needs every TCP socket; a namespace whose ActiveOpens has
        not moved since its last count keeps the connections of that count instead
        (:class:`OutboundMemo`), and its tables stay filtered in the kernel."""
        inode = namespace.inode
        signals, witness = self._signals(namespace)
        unchanged: Optional[FrozenSet[OutboundKey]] = None
        if outbound_tcp is not None and not want_all and signals is not None:
            unchanged = self._outbound_memo.unchanged(inode, signals.active_opens)
        may_reuse = (
            signals is not None and not want_all and (outbound_tcp is None or unchanged is not None)
        )
        if may_reuse and signals is not None:
            whole = self.reuse.whole(inode, witness, signals)
            if whole is not None:
                info = NamespaceStats(inode, witness, active_opens=signals.active_opens)
                info.sockets, info.listeners = signals.sockets, len(whole.listeners)
                info.reused = info.quiet = True
                kept.extend((inode, whole.listeners, sock) for sock in whole.tcp)
                kept.extend((inode, whole.listeners, sock) for sock in whole.rest)
                self._count_unchanged(info, unchanged, outbound_tcp)
                return info
        opened = self._open_diag(namespace)
        if opened is None:
            return None
        diag, pid = opened
        active_opens = signals.active_opens if signals is not None else None
        if signals is None:
            active_opens = _active_opens(proc_entry(pid, self._threads, self.proc_root))
        info = NamespaceStats(inode, pid, active_opens=active_opens)
        cookie = diag.netns_cookie()
        prior: Optional[NamespaceRead] = None
        if may_reuse and signals is not None:
            prior = self.reuse.tcp(inode, cookie, signals)
        counted: Optional[Set[OutboundKey]] = (
            set() if outbound_tcp is not None and unchanged is None else None
        )
        listeners = ListenerIndex()
        fresh: List[Socket] = []
        rest: List[Socket] = []
        try:
            with diag:
                rows = self._diag_tables(
                    diag,
                    inode,
                    listeners,
                    want_all,
                    counted,
                    kept,
                    prior.tcp if prior is not None else None,
                    fresh,
                    rest,
                )
        except OSError:
            return None
        if not want_all and signals is not None:
            read = NamespaceRead(witness, cookie, signals, fresh, rest, listeners, rows, due=0.0)
            if prior is not None:
                read.tcp, read.due = prior.tcp, prior.due
                self.reuse.refresh(inode, read)
            else:
                self.reuse.remember(inode, read)
        elif not want_all:
            self.reuse.forget(inode)
        info.reused = prior is not None
        if counted is not None and outbound_tcp is not None:
            keys = frozenset(counted)
            outbound_tcp.update(keys)
            info.outbound_tcp = len(keys)
            self._outbound_memo.remember(inode, info.active_opens, keys)
        else:
            self._count_unchanged(info, unchanged, outbound_tcp)
        info.listeners = len(listeners)
        info.sockets = rows
        if not (want_all or counted is not None) and signals is not None:
            info.sockets = signals.sockets  # the kernel left most sockets out: its own count
        return info

    def _count_unchanged(
        self,
        info: NamespaceStats,
        unchanged: Optional[FrozenSet[OutboundKey]],
        outbound_tcp: Optional[Set[OutboundKey]],
    ) -> None:
        """The outbound connections of a namespace whose ActiveOpens did not move: its last
        count's."""
        if outbound_tcp is None or unchanged is None:
            return
        outbound_tcp.update(unchanged)
        info.outbound_tcp = len(unchanged)
        self._outbound_memo.remember(info.inode, info.active_opens, unchanged)

    def _signals(self, namespace: NetNamespace) -> Tuple[Optional[Signals], int]:
        """The namespace's counters through the first of its processes that lets them be read,
        and that pid; (None, its first pid) when none does."""
        for pid in namespace.pids:
            try:
                return read_signals(*proc_entry(pid, self._threads, self.proc_root)), pid
            except OSError:
                continue  # gone: try the next process
            except ValueError:
                break  # no TCP counters here: nothing to compare
        return None, namespace.pid

    def _open_diag(self, namespace: NetNamespace) -> Optional[Tuple[DiagSocket, int]]:
        """A sock_diag socket in the namespace, through the first of its processes we may
        enter, and that process's pid; None when none can be entered."""
        for pid in namespace.pids:
            try:
                return DiagSocket.in_namespace(*proc_entry(pid, self._threads, self.proc_root)), pid
            except OSError:
                continue  # gone, or not ours to enter: try the next process
        return None

    def _diag_tables(
        self,
        diag: DiagSocket,
        namespace_inode: int,
        listeners: ListenerIndex,
        want_all: bool,
        counted: Optional[Set[OutboundKey]],
        kept: List[_Kept],
        reused: Optional[List[Socket]] = None,
        fresh: Optional[List[Socket]] = None,
        rest: Optional[List[Socket]] = None,
    ) -> int:
        """Read the four tables of one namespace into ``kept``; how many records came.

        First what can listen: the TCP listeners (a cheap dump: the kernel walks only its
        listening hash) and the UDP tables (small), or every table when ``want_all``.  Then
        the rest of TCP, one table at a time, the kernel dropping what is never external
        (:meth:`_rest_program`), its kept sockets also into ``fresh`` (the others into
        ``rest``); or, given ``reused`` (the kept sockets of an earlier dump that still holds),
        those instead of walking the established hash.  Records are decoded only when kept,
        and one big table at a time is held in memory.  Raises OSError when the kernel refuses
        a dump."""
        batches: List[Tuple[SocketTable, Optional[List[DiagRecord]]]] = [
            (table, self._listening_pass(diag, table, want_all, listeners))
            for table in SOCKET_TABLES
        ]
        if not want_all and reused is None:
            batches += [(table, None) for table in _TCP_TABLES]  # None: read when its turn comes
        rows = 0
        first = len(kept)
        for table, batch in batches:
            into = rest
            if batch is None:
                program = self._rest_program(table, listeners, counting=counted is not None)
                batch = diag.records(table, NOT_LISTENING, program)
                into = fresh
            rows += len(batch)
            if counted is not None and table.protocol == IPPROTO_TCP:
                add_outbound(
                    counted, namespace_inode, listeners, _record_ends(batch, table.version)
                )
            start = len(kept)
            self._keep_records(table, batch, namespace_inode, listeners, want_all, kept)
            if into is not None:
                into.extend(sock for _, _, sock in kept[start:])
            batch.clear()
        if reused is not None:
            kept.extend((namespace_inode, listeners, sock) for sock in reused)
        sockets = [sock for _, _, sock in kept[first:]]
        self._ask_openers(diag, namespace_inode, listeners, sockets, want_all)
        return rows

    def _ask_openers(
        self,
        diag: DiagSocket,
        namespace_inode: int,
        listeners: ListenerIndex,
        sockets: List[Socket],
        want_all: bool,
    ) -> None:
        """Into ``listeners.opened``: which end opened each kept TCP socket on a listener's
        end, as ``tcp_info`` tells (:mod:`agent.collect.sockets.opener`).  What the last
        sample learned of a socket still there stands (an opener does not change); for the
        others, one more dump per table, filtered in the kernel to the sockets on a listener's
        end (with external peers, unless ``want_all``).  A refused dump leaves them unknown."""
        wanted = [
            (socket_ends(sock), sock.inode)
            for sock in sockets
            if sock.protocol == IPPROTO_TCP
            and sock.state != TCP_LISTEN
            and listeners.is_inbound(
                sock.protocol, sock.version, sock.local_address, sock.local_port
            )
        ]
        known = self._opened.get(namespace_inode, {})
        told = {key: known[key] for key in wanted if key in known}
        versions = {key[0][0] for key in wanted if key not in told}
        endpoints = listeners.endpoints(IPPROTO_TCP)
        for table in _TCP_TABLES:
            if table.version not in versions:
                continue
            never = [] if want_all else self._never_external
            try:
                found = diag.openers(table, only_on_listening_ends(endpoints, never, table.version))
            except OSError:
                continue
            told.update(
                ((ends, inode), found[ends])
                for ends, inode in wanted
                if ends[0] == table.version and ends in found
            )
        listeners.opened.update((ends, connected) for (ends, _), connected in told.items())
        # an ownerless socket (inode 0) is asked each time: its ends may be another's next
        self._opened[namespace_inode] = {key: v for key, v in told.items() if key[1]}

    @staticmethod
    def _listening_pass(
        diag: DiagSocket, table: SocketTable, want_all: bool, listeners: ListenerIndex
    ) -> List[DiagRecord]:
        """The records of ``table`` that can listen (all of them with ``want_all``, and all of
        UDP's), with the listeners among them added to ``listeners``."""
        listen_only = table.protocol == IPPROTO_TCP and not want_all
        records = diag.records(table, LISTEN_ONLY if listen_only else ALL_STATES)
        for record in records:
            if record.sport and record.listening(table.protocol):
                listeners.add(
                    table.protocol, table.version, record.local_address, record.local_port
                )
        return records

    def _rest_program(self, table: SocketTable, listeners: ListenerIndex, counting: bool) -> bytes:
        """The kernel filter for the rest of a TCP table: drop every peer that is never
        external; or, when every outbound connection is being counted, only the accepted
        sockets whose peer is never external (neither the count nor the verdicts need them)."""
        if counting:
            return exclude_inbound_internal(
                listeners.endpoints(IPPROTO_TCP), self._never_external, table.version
            )
        return self._prefilter[table.version]

    def _keep_records(
        self,
        table: SocketTable,
        records: List[DiagRecord],
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
            remote = record.dst
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
            info.active_opens = _active_opens(proc_entry(info.pid, self._threads, self.proc_root))
        info.listeners = len(listeners)
        if outbound_tcp is not None:
            info.outbound_tcp = sum(
                add_outbound(
                    outbound_tcp, namespace.inode, listeners, connection_ends(pairs, version)
                )
                for version, pairs in tcp_ends.items()
            )
        return info

    def _read_datagram_tables(
        self, namespace: NetNamespace, want_all: bool, kept: List[_Kept]
    ) -> int:
        """Ping and raw sockets (:data:`DATAGRAM_TABLES`) of one namespace, from ``/proc``
        text; how many rows they had."""
        listeners = ListenerIndex()
        rows = 0
        current = 0
        for table in DATAGRAM_TABLES:
            text, current = self._read_table(namespace.pids, current, table)
            if text is None:
                continue
            sockets, seen = scan_socket_table(
                text, table, None if want_all else self._is_external_hex, listeners
            )
            rows += seen
            kept.extend((namespace.inode, listeners, sock) for sock in sockets)
        return rows

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
        on_listening_end = listeners.is_inbound(
            sock.protocol, sock.version, sock.local_address, sock.local_port
        )
        connected = listeners.opened.get(socket_ends(sock)) if on_listening_end else None
        if on_listening_end and is_listening(
            sock.protocol, sock.state, sock.remote_address, sock.remote_port
        ):
            connected = False  # the listener itself: what accepts
        return connection_of(
            identity,
            verdict,
            SocketColumns(
                net_namespace=namespace_inode,
                fd=fd,
                socket=sock.inode,
                family=sock.family,
                protocol=sock.protocol,
                state=sock.state_name,
                local_address=self._address_text(sock.local_address, sock.version),
                local_port=sock.local_port,
                remote_port=sock.remote_port,
                direction=direction_of(on_listening_end, identity.pid > 0, connected),
            ),
        )
