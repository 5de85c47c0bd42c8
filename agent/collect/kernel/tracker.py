"""From kernel events to facts: who connected where, how it ended, who accepted what.

Three state machines, fed the decoded events of :mod:`agent.collect.kernel.records` in buffer time
order (:meth:`Tracker.feed`):

- :class:`ProcessTable`: thread -> process (tgid), and per process the identity columns of
  :class:`agent.identity.Identity`.  Kept from ``task_newtask`` (or ``sched_process_fork``),
  ``sched_process_exec``, ``task_rename`` and ``sched_process_exit``, plus ``/proc`` reads
  through :class:`agent.identity.IdentityCache` while a process lives (at its ``exec`` and
  when first seen): a process that exits a millisecond after its ``connect()`` still has its
  pid, parent, name and executable (its command line only if it lived until we read it).
  Each thread's network namespace is read from ``/proc/TID/ns/net`` when first seen or after
  it ran ``setns``/``unshare`` (``syscalls:sys_exit_*``), and inherited over ``clone`` unless
  ``CLONE_NEWNET``.
- TCP sockets keyed by the kernel's socket address (``skaddr``; reset at CLOSE, since a freed
  socket's address is reused): CLOSE -> SYN_SENT is a ``connect`` in the caller's context (its
  local port comes with the next event of the socket, so the ``connect`` record waits for that
  up to ``hold_s``), then ``established``, ``refused`` (an RST seen, ``tcp_receive_reset``) or
  ``timeout`` (any other end before ESTABLISHED: no answer, an ICMP error, the caller gave up),
  and ``closed``; LISTEN -> SYN_RECV is an ``accepted`` connection, attributed to the
  listener's owner by :class:`agent.collect.kernel.listeners.ListenerResolver`.
- Datagrams (UDP, ICMP, ICMPv6, SCTP, raw): one ``udp`` record per new flow (process,
  namespace, protocol, local port, remote address and port, direction) once a datagram left,
  by :class:`agent.collect.kernel.datagrams.DatagramFlows`; a flow is new again after
  ``udp_ttl_s`` without packets, so an unconnected socket's ``sendto()`` per packet makes one
  record.

Racy corners, said once here and in ``docs/EVENTS.md``: a process that exits before we read
``/proc`` keeps what the events told (no command line; the executable as ``exec`` was given
it, unresolved and unproved: no ``exe_status``, so no ``path``, ``sha256`` or ``package`` rule
matches it); a thread that switches namespaces back and forth faster than we read is
placed where we found it; namespace inode numbers are reused once a namespace is gone.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

from agent.collect.events import EventKind, SocketEvent
from agent.collect.kernel.datagrams import Datagram, DatagramFlows
from agent.collect.kernel.listeners import ListenerResolver
from agent.collect.kernel.placement import NamespacePlacer
from agent.collect.kernel.records import (
    CLONE_THREAD,
    IN_INTERRUPT,
    ConnectCall,
    ExecArgs,
    KernelEvent,
    NamespaceSwitch,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    RouteLookup,
    SocketTransfer,
    TaskRename,
    TcpReset,
    TcpStateChange,
    UidGranted,
    UidRequest,
)
from agent.collect.kernel.users import real_uid_after
from agent.collect.netns import CLONE_NEWNET, PROC_ROOT, parse_namespace_link
from agent.identity import NO_OWNER, Identity, IdentityCache, process_uuid
from agent.inet import (
    AF_INET,
    AF_INET6,
    INBOUND,
    IPPROTO_TCP,
    OUTBOUND,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    reported_protocol,
)
from agent.who import MAX_ANCESTORS, Ancestor, Who

_COMM_LENGTH = 15
_NS_PER_S = 1_000_000_000
_WITNESSED = frozenset({EventKind.ESTABLISHED, EventKind.ACCEPTED, EventKind.CLOSED})
"""The records after which the tracker knows a connection's four ends and direction."""


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class _Thread:
    tgid: int
    netns: Optional[int]


@dataclass
class _Process:
    identity: Identity
    start_ns: Optional[int] = None
    """When the events saw it forked (trace clock), else None."""
    exited_ns: Optional[int] = None
    lineage: bool = False
    """Its ancestors come from fork events (kept after the parents exit), not from ``/proc``."""


R = TypeVar("R")


def _with(record: R, **changes: Any) -> R:
    """``dataclasses.replace`` for the frozen records of the process table, without running
    ``__init__`` again (a tenth of its cost: this runs for every fork and exec of the host)."""
    new: R = object.__new__(type(record))
    fields = new.__dict__
    fields.update(record.__dict__)
    fields.update(changes)
    return new


def child_who(parent: Identity) -> Who:
    """What a forked child inherits of its parent's :class:`agent.who.Who` (login, container),
    with the parent put first in its ancestors (at most :data:`agent.who.MAX_ANCESTORS`)."""
    who = parent.who
    first = Ancestor(parent.pid, parent.name, parent.container_id)
    return _with(who, ancestors=(first, *who.ancestors[: MAX_ANCESTORS - 1]))


def _basename_comm(filename: str) -> str:
    """The name a process gets at ``exec`` (``__set_task_comm(kbasename(filename))``)."""
    return os.path.basename(filename)[:_COMM_LENGTH]


class ProcessTable:
    """Threads, processes and their identities, kept from events plus ``/proc`` reads.

    ``to_unix`` turns a trace time stamp into unix seconds; ``to_ticks`` into clock ticks
    since boot (the start time ``/proc/PID/stat`` gives, which names a process instance in
    :func:`agent.identity.process_uuid`).
    """

    def __init__(
        self,
        identities: IdentityCache,
        to_unix: Callable[[int], float],
        to_ticks: Callable[[int], int],
        proc_root: str = PROC_ROOT,
        own_pid: Optional[int] = None,
        exit_grace_s: float = 10.0,
        on_namespace: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.identities = identities
        self.to_unix = to_unix
        self.to_ticks = to_ticks
        self.proc_root = proc_root
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self.exit_grace_ns = int(exit_grace_s * _NS_PER_S)
        self.on_namespace = on_namespace
        """Called with (namespace, tid) for each namespace read: a way into it."""
        self.threads: Dict[int, _Thread] = {}
        self.processes: Dict[int, _Process] = {}
        self.proc_reads = 0
        self._uid_asked: Dict[int, Tuple[str, Optional[int]]] = {}
        """tid -> (syscall, real uid asked) between a setuid-family call and its return."""

    # -- reading /proc -----------------------------------------------------------------------------

    def _read_netns(self, tid: int) -> Optional[int]:
        try:
            namespace = parse_namespace_link(os.readlink(f"{self.proc_root}/{tid}/ns/net"))
        except (OSError, ValueError):
            return None
        if self.on_namespace is not None:
            self.on_namespace(namespace, tid)
        return namespace

    def _read_tgid(self, tid: int) -> Optional[int]:
        try:
            with open(f"{self.proc_root}/{tid}/status", "rb") as handle:
                for line in handle.read().split(b"\n"):
                    if line.startswith(b"Tgid:"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _read_identity(
        self, pid: int, start_ns: Optional[int], lineage: bool = False
    ) -> Optional[Identity]:
        """The identity ``/proc`` shows for ``pid`` now, if it is the process we mean (same
        start time when we know it); None when gone.  ``lineage``: its ancestors are known
        from forks, so ``/proc``'s are not read."""
        self.proc_reads += 1
        self.identities.forget(pid)
        if lineage:
            with self.identities.who.without_ancestors():
                identity = self.identities.lookup(pid)
        else:
            identity = self.identities.lookup(pid)
        if not identity.name and not identity.path:
            return None
        started = identity.process_start_time
        if (
            start_ns is not None
            and started is not None
            and abs(started - self.to_unix(start_ns)) > 2
        ):
            return None  # the pid was reused since
        return identity

    # -- look-ups ----------------------------------------------------------------------------------

    def thread(self, tid: int) -> _Thread:
        """The thread ``tid``, read from ``/proc`` when the events have not shown it."""
        found = self.threads.get(tid)
        if found is None:
            tgid = self._read_tgid(tid) or tid
            found = self.threads[tid] = _Thread(tgid, self._read_netns(tid))
        return found

    def process(self, tgid: int) -> _Process:
        """The process ``tgid``, its identity read from ``/proc`` when first seen."""
        found = self.processes.get(tgid)
        if found is None:
            identity = self._read_identity(tgid, None) if tgid > 0 else None
            found = self.processes[tgid] = _Process(identity or Identity(pid=tgid))
        return found

    def who(self, tid: int) -> Tuple[Identity, Optional[int]]:
        """(identity of the process, network namespace of the thread) for an event that ran
        in thread ``tid``'s context."""
        if tid <= 0:
            return NO_OWNER, None
        thread = self.thread(tid)
        process = self.process(thread.tgid)
        process.identity = self.identities.settle(process.identity)  # digests read since
        return process.identity, thread.netns

    # -- events ------------------------------------------------------------------------------------

    def forked(self, event: ProcessFork) -> None:
        parent = self.thread(event.parent)
        flags = event.clone_flags
        if flags is None:  # sched_process_fork: a thread or a process?
            tgid = self._read_tgid(event.child) or event.child
            is_thread = tgid != event.child
        else:
            is_thread = bool(flags & CLONE_THREAD)
        new_namespace = flags is not None and bool(flags & CLONE_NEWNET)
        netns = self._read_netns(event.child) if new_namespace else parent.netns
        if is_thread:
            self.threads[event.child] = _Thread(parent.tgid, netns)
            return
        self.threads[event.child] = _Thread(event.child, netns)
        base = self.process(parent.tgid).identity
        ticks = self.to_ticks(event.time)
        self.processes[event.child] = _Process(
            _with(
                base,
                pid=event.child,
                name=event.comm or base.name,
                parent=parent.tgid,
                process_start_time=int(self.to_unix(event.time)),
                process_uuid=process_uuid(self.identities.boot_id, event.child, str(ticks)),
                who=child_who(base),
            ),
            start_ns=event.time,
            lineage=True,
        )

    def executed(self, event: ProcessExec, latest: bool) -> None:
        """An exec; ``latest`` when no later exec of the same pid is in this batch (only then
        is ``/proc`` worth reading: it shows the last program)."""
        if event.old_tid != event.tid:  # a non-leader thread exec'd: it took the leader's pid
            self.threads.pop(event.old_tid, None)
        thread = self.threads.get(event.tid)
        if thread is None:
            thread = self.threads[event.tid] = _Thread(event.tid, self._read_netns(event.tid))
        else:
            thread.tgid = event.tid
        process = self.processes.get(event.tid)
        if process is None:
            process = self.processes[event.tid] = _Process(Identity(pid=event.tid))
        read = self._read_identity(event.tid, process.start_ns, process.lineage) if latest else None
        if read is not None:
            if not read.path:  # exiting already: /proc/PID/exe goes with the memory map
                read = _with(read, path=event.filename)
            if process.lineage:  # the parent it was forked by, even if it exited since
                read = _with(
                    read,
                    parent=process.identity.parent,
                    who=_with(read.who, ancestors=process.identity.who.ancestors),
                )
            process.identity = read
            if thread.netns is None:
                thread.netns = self._read_netns(event.tid)
            return
        process.identity = _with(process.identity, pid=event.tid).after_exec(
            event.filename, _basename_comm(event.filename)
        )

    def argued(self, event: ExecArgs) -> None:
        """The arguments of the program ``event.pid`` just started (our probe at its
        loader's entry, right after the exec).  They stand unless ``/proc`` gave the whole
        command line and the probe's was cut."""
        process = self.processes.get(event.pid)
        if process is None:
            return
        identity = process.identity
        if event.cut and identity.cmdline:
            return
        process.identity = _with(identity, cmdline=event.cmdline)

    def uid_requested(self, event: UidRequest) -> None:
        if len(self._uid_asked) >= 4096:  # returns lost with their threads: start afresh
            self._uid_asked.clear()
        self._uid_asked[event.pid] = (event.syscall, event.uid)

    def uid_granted(self, event: UidGranted) -> None:
        """A granted setuid-family call: the process's real uid and user name, as they are now
        (:mod:`agent.collect.kernel.users`)."""
        asked = self._uid_asked.pop(event.pid, None)
        if asked is None or asked[0] != event.syscall:
            return
        thread = self.threads.get(event.pid)
        process = self.processes.get(thread.tgid if thread is not None else event.pid)
        if process is None:
            return
        identity = process.identity
        uid = real_uid_after(event.syscall, asked[1], identity.uid)
        if uid is None or uid == identity.uid:
            return
        process.identity = _with(identity, uid=uid, username=self.identities.who.user_name(uid))

    def renamed(self, event: TaskRename) -> None:
        thread = self.threads.get(event.tid)
        if thread is None or thread.tgid != event.tid:
            return  # a thread's own name: the process keeps its name
        process = self.processes.get(event.tid)
        if process is None:
            return
        name = process.identity.name
        if len(event.comm) >= _COMM_LENGTH and name.startswith(event.comm):
            return  # already the longer name psutil makes of a full-length comm
        process.identity = _with(process.identity, name=event.comm)

    def exited(self, event: ProcessExit) -> None:
        thread = self.threads.pop(event.tid, None)
        tgid = thread.tgid if thread is not None else event.tid
        if event.group_dead or (event.group_dead is None and tgid == event.tid):
            process = self.processes.get(tgid)
            if process is not None:
                process.exited_ns = event.time

    def switched(self, event: NamespaceSwitch) -> None:
        thread = self.thread(event.pid)
        if thread.tgid == self.own_pid:
            return  # our own sock_diag going into a namespace and back
        thread.netns = self._read_netns(event.pid)

    # -- upkeep ------------------------------------------------------------------------------------

    def prune(self, now_ns: int) -> int:
        """Forget processes that exited more than the grace period ago; how many went."""
        horizon = now_ns - self.exit_grace_ns
        gone = [
            pid
            for pid, process in self.processes.items()
            if process.exited_ns is not None and process.exited_ns < horizon
        ]
        for pid in gone:
            del self.processes[pid]
        return len(gone)

    def resync(self) -> None:
        """After lost events: forget threads and processes ``/proc`` no longer has, and read
        the namespace of every thread again (a ``setns`` may be among the lost)."""
        for tid in list(self.threads):
            if not os.path.exists(f"{self.proc_root}/{tid}"):
                del self.threads[tid]
            else:
                self.threads[tid].netns = self._read_netns(tid)
        for pid, process in list(self.processes.items()):
            if process.exited_ns is None and not os.path.exists(f"{self.proc_root}/{pid}"):
                del self.processes[pid]


# ---------------------------------------------------------------------------------------------
# sockets


@dataclass
class _TcpSocket:
    key: int
    direction: str
    identity: Identity
    netns: Optional[int]
    family: int
    local: bytes
    local_port: int
    remote: bytes
    remote_port: int
    time_ns: int
    state: int
    reset: bool = False
    announced: bool = False
    witnessed: bool = True
    """The events saw it begin (its connect or its accept); False for one older than them."""


class Tracker:
    """Feeds events to the process table and the socket state machines; returns the
    :class:`SocketEvent` records they produce.

    ``offset`` converts the trace clock to unix time (``unix = ns / 1e9 + offset``); the owner
    updates it before each :meth:`feed` (NTP moves the wall clock).  ``boot_offset_ns`` is what
    to add to a trace time stamp to get ``CLOCK_BOOTTIME`` (0 with the ``boot`` trace clock).
    Not thread-safe.
    """

    def __init__(
        self,
        identities: IdentityCache,
        resolver: ListenerResolver,
        proc_root: str = PROC_ROOT,
        own_pid: Optional[int] = None,
        hold_s: float = 0.5,
        udp_ttl_s: float = 60.0,
        max_sockets: int = 1 << 18,
        max_flows: int = 1 << 16,
        boot_offset_ns: int = 0,
        max_seen: int = 1 << 15,
        placer: Optional[NamespacePlacer] = None,
    ) -> None:
        self.offset = 0.0
        self.boot_offset_ns = boot_offset_ns
        self.resolver = resolver
        self.processes = ProcessTable(
            identities,
            self.to_unix,
            self._ticks,
            proc_root,
            own_pid,
            on_namespace=self._learned,
        )
        self.placer = placer if placer is not None else NamespacePlacer(proc_root)
        self.namespaces_seen: Set[int] = set()
        self.on_new_namespace: Optional[Callable[[int, int], None]] = None
        """Called with (namespace inode, a thread in it) the first time the events show a
        namespace (a process forked into it, or one that entered it by ``setns``/
        ``unshare``), so that the DNS watch attaches at once; with (0, tid) when a thread
        switched namespaces but was gone before it could be read (look in the runtimes'
        directories)."""
        self.hold_ns = int(hold_s * _NS_PER_S)
        self.udp_ttl_ns = int(udp_ttl_s * _NS_PER_S)
        self.max_sockets = max_sockets
        self.max_flows = max_flows
        self.overflowed = 0
        """Sockets dropped to keep ``max_sockets`` (their connects may never be reported)."""
        self.sockets: Dict[int, _TcpSocket] = {}
        self.seen: collections.OrderedDict[Tuple[object, ...], str] = collections.OrderedDict()
        """TCP connections the events saw begin -> their direction (see :meth:`seen_direction`),
        the newest ``max_seen``."""
        self.max_seen = max_seen
        self.datagrams = DatagramFlows(
            self._who_process,
            self._datagram,
            ttl_s=udp_ttl_s,
            max_flows=max_flows,
            place=self._place,
        )
        self.connects_by_namespace: Dict[Optional[int], int] = {}
        """Outbound TCP connects (CLOSE -> SYN_SENT) seen, per network namespace (None:
        unknown), to stand beside each namespace's ``Tcp: ActiveOpens``."""
        self.dropped_in_kernel: Optional[Callable[[int, bytes], bool]] = None
        """``(family, daddr4)`` -> whether the kernel filter drops the rest of that socket's
        events (:func:`agent.collect.kernel.kfilter.dropped_after_connect`): its connect is
        counted and nothing is kept for it."""
        self.last_ns = 0
        """The time stamp of the newest event fed."""
        self._serial = 0
        self._pruned_ns = 0
        self._pending: Deque[_TcpSocket] = collections.deque()
        self._resets: Dict[int, int] = {}
        self._out: List[SocketEvent] = []
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._handlers: Dict[type, Callable[[KernelEvent], None]] = {
            TcpStateChange: self._tcp,  # type: ignore[dict-item]
            TcpReset: self._reset,  # type: ignore[dict-item]
            RouteLookup: self.datagrams.lookup,  # type: ignore[dict-item]
            SocketTransfer: self.datagrams.transfer,  # type: ignore[dict-item]
            ConnectCall: self.datagrams.connect_call,  # type: ignore[dict-item]
            ProcessFork: self.processes.forked,  # type: ignore[dict-item]
            ProcessExit: self._exited,  # type: ignore[dict-item]
            TaskRename: self.processes.renamed,  # type: ignore[dict-item]
            NamespaceSwitch: self._switched,  # type: ignore[dict-item]
            ExecArgs: self.processes.argued,  # type: ignore[dict-item]
            UidRequest: self.processes.uid_requested,  # type: ignore[dict-item]
            UidGranted: self.processes.uid_granted,  # type: ignore[dict-item]
        }

    @property
    def holding(self) -> bool:
        """Connects are waiting for their local port (see ``hold_s``)."""
        return bool(self._pending)

    def to_unix(self, ns: int) -> float:
        return ns / _NS_PER_S + self.offset

    def _ticks(self, ns: int) -> int:
        return (ns + self.boot_offset_ns) * self._ticks_per_s // _NS_PER_S

    # -- feeding -----------------------------------------------------------------------------------

    def feed(self, events: Sequence[KernelEvent]) -> List[SocketEvent]:
        """Apply ``events`` (time-ordered) and return the records they complete, followed by
        the ``connect`` records whose hold ran out (see :meth:`flush`)."""
        out: List[SocketEvent] = []
        self._out = out
        self.resolver.new_batch()
        last_exec: Dict[int, int] = {}
        for index, event in enumerate(events):
            if type(event) is ProcessExec:
                last_exec[event.tid] = index
        handlers = self._handlers
        for index, event in enumerate(events):
            kind = type(event)
            if kind is ProcessExec:
                self.processes.executed(event, last_exec[event.tid] == index)  # type: ignore[union-attr,arg-type]
            else:
                handler = handlers.get(kind)
                if handler is not None:
                    handler(event)
        if events:
            self.last_ns = max(self.last_ns, events[-1][0])
        self._resets.clear()
        self.resolver.refresh_dirty()
        return out + self.flush(self.last_ns)

    def flush(self, now_ns: int) -> List[SocketEvent]:
        """``connect`` records of sockets still in SYN_SENT after the hold (their local port
        unknown: 0), and the upkeep of the tables."""
        out: List[SocketEvent] = []
        self._out = out
        pending = self._pending
        while pending and (pending[0].announced or now_ns - pending[0].time_ns >= self.hold_ns):
            sock = pending.popleft()
            if not sock.announced:
                self._announce(sock)
        if now_ns - self._pruned_ns >= _NS_PER_S:
            self._pruned_ns = now_ns
            self.processes.prune(now_ns)
        return out

    def _emit(self, kind: EventKind, sock: _TcpSocket, time_ns: int) -> None:
        if sock.witnessed and sock.local_port and kind in _WITNESSED:
            self._witness(sock)
        self._out.append(
            SocketEvent(
                self.to_unix(time_ns),
                kind,
                IPPROTO_TCP,
                sock.family,
                4 if sock.family == AF_INET else 6,
                int.from_bytes(sock.local, "big"),
                sock.local_port,
                int.from_bytes(sock.remote, "big"),
                sock.remote_port,
                sock.netns,
                sock.identity,
                sock.direction,
                sock.key,
            )
        )

    def _witness(self, sock: _TcpSocket) -> None:
        version = 4 if sock.family == AF_INET else 6
        key = (
            sock.netns,
            version,
            int.from_bytes(sock.local, "big"),
            sock.local_port,
            int.from_bytes(sock.remote, "big"),
            sock.remote_port,
        )
        seen = self.seen
        seen[key] = sock.direction
        seen.move_to_end(key)
        if len(seen) > self.max_seen:
            seen.popitem(last=False)

    def seen_direction(
        self,
        netns: Optional[int],
        version: int,
        local: int,
        local_port: int,
        remote: int,
        remote_port: int,
    ) -> Optional[str]:
        """Which way the events saw this TCP connection opened (``outbound``: they saw its
        ``connect()``, from whatever port; ``inbound``: they saw it accepted), or None when
        they did not see it begin.  Kept after its close, so that its TIME_WAIT, ownerless in
        a sample, keeps the direction.  Safe to call from another thread (a dict look-up)."""
        return self.seen.get((netns, version, local, local_port, remote, remote_port))

    def _announce(self, sock: _TcpSocket) -> None:
        sock.announced = True
        self._emit(EventKind.CONNECT, sock, sock.time_ns)

    def _new_key(self) -> int:
        self._serial += 1
        return self._serial

    # -- TCP ---------------------------------------------------------------------------------------

    def _tcp(self, event: TcpStateChange) -> None:
        old, new = event.oldstate, event.newstate
        if event.protocol != IPPROTO_TCP:
            return
        if old == TCP_CLOSE and new == TCP_SYN_SENT:
            self._connect(event)
        elif old == TCP_SYN_SENT and new == TCP_ESTABLISHED:
            sock = self.sockets.get(event.skaddr)
            if sock is not None and sock.state == TCP_SYN_SENT:
                sock.state = TCP_ESTABLISHED
                sock.local, sock.local_port = event.saddr, event.sport
                if not sock.announced:
                    self._announce(sock)
                self._emit(EventKind.ESTABLISHED, sock, event.time)
        elif old == TCP_LISTEN and new == TCP_SYN_RECV:
            self._accepted(event)
        elif new == TCP_LISTEN:
            identity, netns = self.processes.who(event.pid)
            version = 4 if event.family == AF_INET else 6
            address = int.from_bytes(event.saddr, "big")
            self.resolver.listened(netns, version, address, event.sport, identity)
        elif old == TCP_LISTEN and new == TCP_CLOSE:
            _, netns = self.processes.who(event.pid)
            version = 4 if event.family == AF_INET else 6
            address = int.from_bytes(event.saddr, "big")
            self.resolver.unlistened(netns, version, address, event.sport)
        elif new == TCP_CLOSE:
            self._closed(event)

    def _connect(self, event: TcpStateChange) -> None:
        if event.flags & IN_INTERRUPT:
            identity, netns = NO_OWNER, None
        else:
            identity, netns = self.processes.who(event.pid)
            if netns is None:
                version = 4 if event.family == AF_INET else 6
                netns = self._place(event.pid, version, event.saddr)
            self.datagrams.tcp_connect(event.pid)
        counts = self.connects_by_namespace
        counts[netns] = counts.get(netns, 0) + 1
        dropped = self.dropped_in_kernel
        if dropped is not None and dropped(event.family, event.daddr4):
            return
        sock = self._socket(event, OUTBOUND, identity, netns, TCP_SYN_SENT, local_port=0)
        self._track(event.skaddr, sock)
        self._pending.append(sock)

    def _track(self, skaddr: int, sock: _TcpSocket) -> None:
        sockets = self.sockets
        sockets.pop(skaddr, None)  # a reused address: the old socket's CLOSE was lost
        sockets[skaddr] = sock
        if len(sockets) > self.max_sockets:
            del sockets[next(iter(sockets))]
            self.overflowed += 1

    def _accepted(self, event: TcpStateChange) -> None:
        listener = self.resolver.resolve(
            event.family, event.saddr, event.sport, event.daddr, event.dport
        )
        identity = listener.identity if listener else NO_OWNER
        netns = listener.net_namespace if listener else None
        sock = self._socket(event, INBOUND, identity, netns, TCP_SYN_RECV, announced=True)
        self._track(event.skaddr, sock)
        self._emit(EventKind.ACCEPTED, sock, event.time)

    def _reset(self, event: TcpReset) -> None:
        sock = self.sockets.get(event.skaddr)
        if sock is not None:
            sock.reset = True
        else:
            self._resets[event.skaddr] = event.time

    def _closed(self, event: TcpStateChange) -> None:
        sock = self.sockets.pop(event.skaddr, None)
        if sock is None:
            sock = self._untracked(event)
        if sock.state == TCP_SYN_SENT:
            if not sock.local_port:
                sock.local, sock.local_port = event.saddr, event.sport
            if not sock.announced:
                self._announce(sock)
            self._emit(EventKind.REFUSED if sock.reset else EventKind.TIMEOUT, sock, event.time)
        else:
            self._emit(EventKind.CLOSED, sock, event.time)

    def _untracked(self, event: TcpStateChange) -> _TcpSocket:
        """A socket whose beginning the events did not show (older than the source, or its
        events were lost)."""
        version = 4 if event.family == AF_INET else 6
        address = int.from_bytes(event.saddr, "big")
        inbound = bool(self.resolver.candidates(version, address, event.sport))
        outcome = event.oldstate == TCP_SYN_SENT
        sock = self._socket(
            event,
            INBOUND if inbound and not outcome else OUTBOUND,
            NO_OWNER,
            None,
            TCP_SYN_SENT if outcome else TCP_ESTABLISHED,
            announced=True,
        )
        sock.witnessed = False
        sock.reset = event.skaddr in self._resets
        return sock

    def _socket(
        self,
        event: TcpStateChange,
        direction: str,
        identity: Identity,
        netns: Optional[int],
        state: int,
        local_port: Optional[int] = None,
        announced: bool = False,
    ) -> _TcpSocket:
        """A new tracked socket with the ends ``event`` shows (its own port unless given)."""
        return _TcpSocket(
            self._new_key(),
            direction,
            identity,
            netns,
            event.family,
            event.saddr,
            event.sport if local_port is None else local_port,
            event.daddr,
            event.dport,
            event.time,
            state,
            announced=announced,
        )

    # -- datagrams -------------------------------------------------------------------------------

    def _who_process(self, tid: int) -> Tuple[Identity, Optional[int], int]:
        identity, netns = self.processes.who(tid)
        thread = self.processes.threads.get(tid)
        return identity, netns, thread.tgid if thread is not None else tid

    def _place(self, tid: int, version: int, address: bytes, device: str = "") -> Optional[int]:
        """The namespace of a thread whose own could not be read (gone after a ``setns``),
        from the address (or device) of its connection; kept for the thread's next ones."""
        netns = self.placer.place(version, address, device)
        thread = self.processes.threads.get(tid)
        if netns is not None and thread is not None and thread.netns is None:
            thread.netns = netns
        return netns

    def _switched(self, event: NamespaceSwitch) -> None:
        self.processes.switched(event)
        thread = self.processes.threads.get(event.pid)
        if thread is not None and thread.netns is None and self.on_new_namespace is not None:
            self.on_new_namespace(0, event.pid)  # gone already: a namespace kept by a file?

    def _learned(self, namespace: int, tid: int) -> None:
        self.resolver.learn(namespace, tid)
        self.placer.learn(namespace, tid)
        if namespace not in self.namespaces_seen:
            self.namespaces_seen.add(namespace)
            if self.on_new_namespace is not None:
                self.on_new_namespace(namespace, tid)

    def _datagram(self, datagram: Datagram, direction: str) -> None:
        self._out.append(
            SocketEvent(
                self.to_unix(datagram.time),
                EventKind.UDP,
                reported_protocol(datagram.protocol),
                AF_INET if datagram.version == 4 else AF_INET6,
                datagram.version,
                int.from_bytes(datagram.saddr, "big"),
                datagram.sport,
                int.from_bytes(datagram.daddr, "big"),
                datagram.dport,
                datagram.netns,
                datagram.identity,
                direction,
                self._new_key(),
            )
        )

    def _exited(self, event: ProcessExit) -> None:
        self.processes.exited(event)
        self.datagrams.forget_thread(event.tid)
        if event.group_dead or (event.group_dead is None and event.pid == event.tid):
            self.datagrams.forget_process(event.tid)

    # -- upkeep ------------------------------------------------------------------------------------

    def resync(self) -> None:
        """After lost events: connects older than the longest SYN retry (~127 s) cannot still
        be pending; the process table is checked against ``/proc``; the listeners are dumped
        again."""
        horizon = self.last_ns - 180 * _NS_PER_S
        for skaddr, sock in list(self.sockets.items()):
            if sock.state == TCP_SYN_SENT and sock.time_ns < horizon:
                del self.sockets[skaddr]
        self.processes.resync()
        self.resolver.refresh()
