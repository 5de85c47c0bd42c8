"""Watch the DNS answers of every network namespace and note which names each address had.

One packet socket per network namespace (:mod:`agent.collect.dns.filter`), entered with
:func:`agent.collect.netns.open_in_namespace`; the packets go through an
:class:`~agent.collect.dns.answers.AnswerTracker` into a
:class:`~agent.collect.dns.cache.NameCache`.  :class:`DnsWatch` owns the sockets and polls them
from one thread.  Without CAP_NET_RAW (not root), or without ``AF_PACKET`` in the kernel, the
watch does nothing and :attr:`DnsWatch.unavailable` says why in one line.

At most :data:`MAX_WATCHED` namespaces are watched (a descriptor each; any user can make
namespaces with ``unshare -rn``): the agent's own first, then those with a process of root's
(the host's services, containers a root daemon runs), then the rest in the order found,
those already watched before others.  The rest are counted in :attr:`DnsWatch.left_out`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from agent.collect.dns.answers import AnswerTracker, Counters
from agent.collect.dns.cache import MAX_NAMESPACES, NameCache, own_namespace
from agent.collect.dns.filter import (
    ARPHRD_LOOPBACK,
    PACKET_STATISTICS,
    SNAPLEN,
    SOL_PACKET,
    dns_filter,
    open_packet_socket,
    unavailable_reason,
)
from agent.collect.netns import (
    PROC_ROOT,
    NetNamespace,
    discover_namespaces,
    open_in_namespace,
    proc_entry,
)

MAX_WATCHED = MAX_NAMESPACES
"""Namespaces watched at once (one packet socket each): as many as the name cache keeps."""

BATCH = 256
"""Packets read from one socket before the others get their turn."""

SWEEP_INTERVAL = 10.0
RESCAN_INTERVAL = 10.0
CATCH_UP_ROUNDS = 4
"""Batches read from each socket for a :meth:`DnsWatch.catch_up` at most (a flood must not
hold the caller)."""


# --- the sockets and their thread ------------------------------------------------------------


@dataclass
class _Watched:
    namespace: int
    sock: socket.socket
    pid: int


class DnsWatch:
    """Packet sockets in every network namespace, polled by one thread, feeding ``cache``.

    Use :meth:`start` and :meth:`stop` (a thread of its own), or call :meth:`run` from a
    thread of yours with a stop event.  New namespaces are found by :meth:`rescan`, which
    the caller may trigger at any time, from any thread, with the namespaces it discovered
    (a sampler does so every sample, for free), and which the watch runs by itself every
    ``rescan_interval`` seconds (0: only when asked).  A namespace no longer seen is closed:
    our socket would otherwise keep a dead namespace, and its devices, alive.
    """

    def __init__(
        self,
        cache: NameCache,
        proc_root: str = PROC_ROOT,
        rescan_interval: float = RESCAN_INTERVAL,
        clock: Callable[[], float] = time.time,
        tracker: Optional[AnswerTracker] = None,
        max_watched: int = MAX_WATCHED,
    ) -> None:
        self.cache = cache
        self.max_watched = max_watched
        self.left_out = 0
        """Namespaces found but not watched at the last rescan: over :attr:`max_watched`."""
        self._home = own_namespace(proc_root)
        self.proc_root = proc_root
        self.rescan_interval = rescan_interval
        self.tracker = AnswerTracker(cache) if tracker is None else tracker
        self.unavailable = ""
        """Empty while the watch works; else one line on why it yields nothing."""
        self.errors: Dict[int, str] = {}
        """namespace inode -> why it could not be watched (not ours to enter, gone, ...)."""
        self._clock = clock
        self._watched: Dict[int, _Watched] = {}
        self._by_fd: Dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._requested: Optional[Tuple[Optional[Sequence[NetNamespace]], Dict[int, int]]] = None
        self._catch_ups: List[threading.Event] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._wake_read, select.POLLIN)
        self._program = dns_filter()
        self._buffer = bytearray(SNAPLEN)

    # --- control, from any thread ---------------------------------------------------------

    def probe(self) -> bool:
        """Whether packet sockets can be had here; sets :attr:`unavailable` if not."""
        try:
            open_packet_socket(self._program).close()
        except OSError as error:
            self.unavailable = unavailable_reason(error)
            return False
        self.unavailable = ""
        return True

    def start(self) -> bool:
        """Start the thread; False (and :attr:`unavailable` set) when packets cannot be had."""
        if self._thread is not None:
            return True
        if not self.probe():
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="egress-agent-dns", daemon=True
        )
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and close every socket."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._close_all()

    def close(self) -> None:
        """:meth:`stop`, and the wake-up pipe too: the watch cannot start again."""
        self.stop()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                continue

    def rescan(
        self,
        namespaces: Optional[Sequence[NetNamespace]] = None,
        threads: Optional[Dict[int, int]] = None,
    ) -> None:
        """Ask the thread to bring the watched namespaces up to date: ``namespaces`` as a full
        :func:`agent.collect.netns.discover_namespaces` found them (with its ``threads``), or None
        to discover them itself.  Never pass a discovery limited to some pids: the namespaces
        it lacks would be closed."""
        with self._lock:
            self._requested = (namespaces, dict(threads or {}))
        self._wake()

    def catch_up(self, timeout: float) -> bool:
        """Wait, up to ``timeout`` seconds, until the thread has read the packets every watched
        socket holds now; False when it did not in time or is not running.

        A connection's events and its DNS answer reach us on different threads: the answer
        came first (its packet was queued on our socket before the resolver got it), but the
        connection may be handled before the answer is read.  A caller that found no name
        catches up and looks again.
        """
        if self._thread is None or self._stop.is_set():
            return False
        done = threading.Event()
        with self._lock:
            self._catch_ups.append(done)
        self._wake()
        return done.wait(timeout)

    def watched(self) -> FrozenSet[int]:
        """The inodes of the namespaces being watched now."""
        with self._lock:
            return frozenset(self._watched)

    def counters(self, namespace: int) -> Counters:
        """A copy of one namespace's counters (zero when it is not watched)."""
        with self._lock:
            found = self.tracker.counters.get(namespace)
            return Counters(**vars(found)) if found is not None else Counters()

    # --- the thread -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every socket until ``stop`` is set; then close them all."""
        next_rescan = 0.0
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not stop.is_set():
                monotonic = time.monotonic()
                with self._lock:
                    requested, self._requested = self._requested, None
                if (
                    requested is not None
                    or (self.rescan_interval > 0 and monotonic >= next_rescan)
                    or next_rescan == 0.0
                ):
                    self._apply(*(requested or (None, {})))
                    next_rescan = monotonic + (self.rescan_interval or 3600.0)
                if monotonic >= next_sweep:
                    self._upkeep()
                    next_sweep = monotonic + SWEEP_INTERVAL
                wait = max(0.0, min(next_sweep, next_rescan) - time.monotonic())
                for fd, events in self._poller.poll(min(wait, 1.0) * 1000):
                    if fd == self._wake_read:
                        self._drain_wake()
                        continue
                    watched = self._by_fd.get(fd)
                    if watched is None:
                        continue
                    if events & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                        self.errors[watched.namespace] = "the packet socket failed"
                        self._unwatch(watched.namespace)
                        continue
                    self._read(watched)
                self._serve_catch_ups()
        finally:
            self._close_all()
            self._serve_catch_ups()  # nobody waits on a thread that is gone

    def _serve_catch_ups(self) -> None:
        with self._lock:
            waiting, self._catch_ups = self._catch_ups, []
        if not waiting:
            return
        for watched in list(self._watched.values()):
            for _ in range(CATCH_UP_ROUNDS):
                if self._read(watched) < BATCH:
                    break
        for done in waiting:
            done.set()

    def _read(self, watched: _Watched) -> int:
        """Read and handle up to :data:`BATCH` packets of one socket; how many were read."""
        buffer = self._buffer
        view = memoryview(buffer)
        now = self._clock()
        packet = self.tracker.packet
        for count in range(BATCH):
            try:
                size, address = watched.sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                return count
            except OSError as error:
                self.errors[watched.namespace] = f"reading packets: {error.strerror or error}"
                self._unwatch(watched.namespace)
                return count
            try:
                packet(
                    watched.namespace,
                    bytes(view[: min(size, SNAPLEN)]),
                    address[2],
                    address[3] == ARPHRD_LOOPBACK,
                    now,
                )
            except Exception as error:  # a bug must cost one packet, never the thread
                counters = self.tracker.counters_of(watched.namespace)
                counters.errors += 1
                counters.last_error = f"{type(error).__name__}: {error}"
        return BATCH

    def _upkeep(self) -> None:
        now = self._clock()
        self.tracker.sweep(now)
        self.cache.sweep(now)
        for watched in list(self._watched.values()):
            try:
                raw = watched.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            except OSError:
                continue
            _, drops = struct.unpack("=II", raw)  # struct tpacket_stats; reading resets it
            self.tracker.counters_of(watched.namespace).kernel_drops += drops

    def _apply(self, namespaces: Optional[Sequence[NetNamespace]], threads: Dict[int, int]) -> None:
        if namespaces is None:
            try:
                discovery = discover_namespaces(self.proc_root)
            except OSError as error:
                self.errors[0] = f"cannot list {self.proc_root}: {error.strerror or error}"
                return
            namespaces, threads = discovery.namespaces, discovery.threads
        seen = {namespace.inode for namespace in namespaces}
        self.cache.retain_namespaces(seen)  # a gone namespace's inode may come back for another
        for inode in [inode for inode in self._watched if inode not in seen]:
            self._unwatch(inode)
        for inode in [inode for inode in self.errors if inode not in seen]:
            del self.errors[inode]
        chosen = self._choose(namespaces)
        self.left_out = len(seen) - len(chosen)
        for inode in [inode for inode in self._watched if inode not in chosen]:
            self._unwatch(inode)
        for namespace in namespaces:
            if namespace.inode in chosen and namespace.inode not in self._watched:
                self._watch(namespace, threads)

    def _choose(self, namespaces: Sequence[NetNamespace]) -> FrozenSet[int]:
        """The inodes of the at most :attr:`max_watched` namespaces to watch (see the module)."""
        if len(namespaces) <= self.max_watched:
            return frozenset(namespace.inode for namespace in namespaces)

        def rank(item: Tuple[int, NetNamespace]) -> Tuple[int, int, int]:
            index, namespace = item
            if namespace.inode == self._home:
                tier = 0
            elif self._has_root_process(namespace):
                tier = 1
            else:
                tier = 2
            return (tier, 0 if namespace.inode in self._watched else 1, index)

        ranked = sorted(enumerate(namespaces), key=rank)
        return frozenset(namespace.inode for _, namespace in ranked[: self.max_watched])

    def _has_root_process(self, namespace: NetNamespace) -> bool:
        """Whether a process of the namespace (among its first few) runs as root: its /proc
        directory is root's (a process in a user namespace of its own is its real user's)."""
        for pid in namespace.pids[:4]:
            try:
                if os.stat(f"{self.proc_root}/{pid}").st_uid == 0:
                    return True
            except OSError:
                continue
        return False

    def _watch(self, namespace: NetNamespace, threads: Dict[int, int]) -> None:
        problem = "no process to enter it through"
        for pid in namespace.pids:
            entry, root = proc_entry(pid, threads, self.proc_root)
            try:
                sock = open_in_namespace(entry, lambda: open_packet_socket(self._program), root)
            except OSError as error:
                problem = f"pid {pid}: {error.strerror or error}"
                if isinstance(error, PermissionError):
                    break  # the next pid will not be ours to enter either
                continue
            watched = _Watched(namespace.inode, sock, pid)
            with self._lock:
                self._watched[namespace.inode] = watched
                self._by_fd[sock.fileno()] = watched
                self.tracker.counters_of(namespace.inode)
            self._poller.register(sock.fileno(), select.POLLIN)
            self.errors.pop(namespace.inode, None)
            return
        self.errors[namespace.inode] = problem

    def _unwatch(self, inode: int) -> None:
        with self._lock:
            watched = self._watched.pop(inode, None)
            if watched is None:
                return
            self._by_fd.pop(watched.sock.fileno(), None)
            self.tracker.forget_namespace(inode)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(watched.sock.fileno())
        watched.sock.close()

    def _close_all(self) -> None:
        for inode in list(self._watched):
            self._unwatch(inode)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            os.write(self._wake_write, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except OSError:
            return
