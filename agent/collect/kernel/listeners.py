"""Who listens where, per network namespace: the owner of an accepted TCP connection.

An inbound connection's kernel events run in softirq, where the current task is whatever the
interrupt found (``sock:inet_sock_set_state`` LISTEN -> SYN_RECV comes from
``inet_csk_clone_lock`` on the packet's path), and they carry no namespace.  The process behind
an accepted connection is the owner of the listening socket it came through, so this module
keeps the listeners of every namespace:

- from ``sock_diag`` dumps of listening sockets, one per namespace (cheap: the kernel walks only
  its listening hash, :data:`agent.collect.sockets.sockdiag.LISTEN_ONLY`), their owners found by
  :class:`agent.owners.OwnerFinder` and named by :class:`agent.identity.IdentityCache`;
- from ``listen()`` itself where the kernel traces it (CLOSE -> LISTEN in the caller's context:
  Linux 6.18 does; kernels whose ``inet_csk_listen_start()`` stores the state with
  ``inet_sk_state_store()``, as upstream did through at least 6.0, do not), which the tracker
  reports with :meth:`ListenerResolver.listened` so that a listener younger than the last dump
  is known at once, and which marks its namespace for a fresh dump.  Without it, an accepted
  connection that matches no known listener has the namespaces dumped again (at most once per
  :attr:`~ListenerResolver.min_refresh_s`).

A connection to a port that listeners of several namespaces share (two containers both serving
``0.0.0.0:80``) is placed by looking for its exact four-tuple in each candidate namespace's
socket table (one ``sock_diag`` dump per namespace per batch of events); when none has it any
more (it closed before we looked) the owner stays unknown rather than guessed.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from agent.collect.netns import PROC_ROOT, discover_namespaces, namespace_of
from agent.collect.sockets.procnet import TCP4, TCP6, SocketTable
from agent.collect.sockets.sockdiag import LISTEN_ONLY, NOT_LISTENING, DiagSocket
from agent.identity import Identity, IdentityCache
from agent.owners import OwnerFinder

AnyAddress = None


class Listener(NamedTuple):
    """A listening TCP socket: where (namespace, version, address or None for any, port) and
    whose."""

    net_namespace: Optional[int]
    version: int
    address: Optional[int]
    port: int
    identity: Identity


Opener = Callable[[int], DiagSocket]


def _normal(version: int, address: int) -> Tuple[int, int]:
    """(version, address) with an IPv4-mapped IPv6 address (RFC 4291 2.5.5.2) as IPv4."""
    if version == 6 and address >> 32 == 0xFFFF:
        return 4, address & 0xFFFFFFFF
    return version, address


class ListenerResolver:
    """The TCP listeners of every network namespace and their owners.

    ``namespaces`` maps a namespace inode to a pid living in it (through which it is entered);
    the tracker adds what it learns with :meth:`learn`, :meth:`discover` adds every namespace
    of the host.  Not thread-safe: used by the event source's thread only.
    """

    def __init__(
        self,
        identities: IdentityCache,
        proc_root: str = PROC_ROOT,
        opener: Optional[Opener] = None,
        min_refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identities = identities
        self.proc_root = proc_root
        self.owners = OwnerFinder(proc_root)
        self._open: Opener = opener or (lambda pid: DiagSocket.in_namespace(pid, proc_root))
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self.namespaces: Dict[int, int] = {}
        self._listeners: Dict[Tuple[int, Optional[int], int], List[Listener]] = {}
        """(version, address or None, port) -> the listeners there, one per namespace."""
        self._refreshed: Dict[int, float] = {}
        self._dirty: Set[int] = set()
        self._discovered = -1e9
        self._full_refresh = -1e9
        self._tables: Dict[Tuple[int, str], Set[Tuple[int, bytes, int, bytes]]] = {}
        self.dumps = 0
        """sock_diag dumps made so far (listener dumps and four-tuple look-ups)."""
        self.errors: Dict[int, str] = {}
        """namespace -> why it could not be read last time."""

    # -- namespaces ------------------------------------------------------------------------------

    def learn(self, namespace: int, pid: int) -> None:
        """``pid`` lives in ``namespace`` (a way in)."""
        self.namespaces.setdefault(namespace, pid)

    def discover(self, force: bool = False) -> None:
        """Every network namespace of the host's processes (``/proc/*/ns/net``, one readlink
        per process): at most once per :attr:`min_refresh_s` * 10, or with ``force`` (a way
        into a namespace was lost) once per :attr:`min_refresh_s`."""
        now = self._clock()
        wait = self.min_refresh_s if force else self.min_refresh_s * 10
        if now - self._discovered < wait:
            return
        self._discovered = now
        for namespace in discover_namespaces(self.proc_root).namespaces:
            self.namespaces[namespace.inode] = namespace.pid

    def _diag(self, namespace: int) -> Optional[DiagSocket]:
        """A sock_diag socket in ``namespace``: through the pid we know there, else through the
        owner of a listener we know there, else through a pid rediscovered; None when none
        works (:attr:`errors` says why).

        The pid first learnt in a namespace is often a setup command long gone (``ip netns
        exec NS ip link set lo up``), and rediscovery is rationed: a listener's owner is the
        way in that lasts, and the one an accepted connection needs."""
        for find_another in (None, self._way_in_through_listeners, self._way_in_rediscovered):
            if find_another is not None and namespace not in self.namespaces:
                find_another(namespace)
            pid = self.namespaces.get(namespace)
            if pid is None:
                continue
            try:
                return self._open(pid)
            except OSError as error:
                self.errors[namespace] = str(error)
                del self.namespaces[namespace]
        return None

    def _way_in_through_listeners(self, namespace: int) -> None:
        for entries in self._listeners.values():
            for entry in entries:
                pid = entry.identity.pid
                if entry.net_namespace != namespace or pid <= 0:
                    continue
                try:
                    if namespace_of(pid, self.proc_root) == namespace:  # still there
                        self.namespaces[namespace] = pid
                        return
                except (OSError, ValueError):
                    continue

    def _way_in_rediscovered(self, namespace: int) -> None:
        self.discover(force=True)

    # -- listeners -------------------------------------------------------------------------------

    def listened(
        self, namespace: Optional[int], version: int, address: int, port: int, identity: Identity
    ) -> None:
        """A ``listen()`` seen in the events: known at once, its namespace dumped again at the
        next :meth:`refresh_dirty`."""
        version, address = _normal(version, address)
        self._add(Listener(namespace, version, address or AnyAddress, port, identity))
        if namespace is not None:
            self._dirty.add(namespace)
            if identity.pid > 0:  # a way in likelier to last than the one learnt first
                self.namespaces[namespace] = identity.pid

    def unlistened(self, namespace: Optional[int], version: int, address: int, port: int) -> None:
        """A listener went to CLOSE in ``namespace`` (None: unknown, so every namespace with a
        listener there is dumped again)."""
        if namespace is not None:
            self._dirty.add(namespace)
            return
        for entry in self.candidates(version, address, port):
            if entry.net_namespace is not None:
                self._dirty.add(entry.net_namespace)

    def _add(self, listener: Listener) -> None:
        key = (listener.version, listener.address, listener.port)
        entries = [
            entry
            for entry in self._listeners.get(key, [])
            if entry.net_namespace != listener.net_namespace
        ]
        entries.append(listener)
        self._listeners[key] = entries

    def refresh(self, namespace: Optional[int] = None) -> int:
        """Dump the listeners of ``namespace`` (every known one when None) and find their
        owners; returns how many namespaces were read."""
        if namespace is None:
            self.discover()
            targets = list(self.namespaces)
        else:
            targets = [namespace]
        found: Dict[int, List[Tuple[int, int, int, int]]] = {}
        for target in targets:
            diag = self._diag(target)
            if diag is None:
                continue
            try:
                sockets = [
                    (sock.inode, sock.version, sock.local_address, sock.local_port)
                    for table in (TCP4, TCP6)
                    for sock in diag.dump(table, LISTEN_ONLY)
                ]
                self.dumps += 2
            except OSError as error:
                self.errors[target] = str(error)
                continue
            finally:
                diag.close()
            found[target] = sockets
            self._refreshed[target] = self._clock()
            self._dirty.discard(target)
        inodes = [inode for sockets in found.values() for inode, _, _, _ in sockets]
        owners = self.owners.find(inodes).owners if inodes else {}
        for target, sockets in found.items():
            self._forget_namespace(target)
            for inode, version, address, listen_port in sockets:
                owner = owners.get(inode)
                identity = self.identities.lookup(owner[0]) if owner else Identity()
                version, address = _normal(version, address)
                self._add(Listener(target, version, address or AnyAddress, listen_port, identity))
        return len(found)

    def _forget_namespace(self, namespace: int) -> None:
        for key in list(self._listeners):
            kept = [entry for entry in self._listeners[key] if entry.net_namespace != namespace]
            if kept:
                self._listeners[key] = kept
            else:
                del self._listeners[key]

    def refresh_dirty(self) -> int:
        """Dump again the namespaces where ``listen()`` or a listener's close was seen, each
        at most once per :attr:`min_refresh_s`; returns how many were read."""
        now = self._clock()
        due = [
            namespace
            for namespace in self._dirty
            if now - self._refreshed.get(namespace, -1e9) >= self.min_refresh_s
        ]
        return sum(self.refresh(namespace) for namespace in due)

    def candidates(self, version: int, address: int, listen_port: int) -> List[Listener]:
        """The listeners a connection to ``address``:``listen_port`` could have come through:
        those on that exact address, else the wildcard ones."""
        version, address = _normal(version, address)
        exact = self._listeners.get((version, address, listen_port), [])
        wildcard = list(self._listeners.get((version, AnyAddress, listen_port), []))
        if version == 4:  # a dual-stack "::" listener takes IPv4 too (RFC 3493 3.7)
            wildcard += self._listeners.get((6, AnyAddress, listen_port), [])
        covered = {entry.net_namespace for entry in exact}
        return list(exact) + [entry for entry in wildcard if entry.net_namespace not in covered]

    # -- resolving accepted connections ----------------------------------------------------------

    def new_batch(self) -> None:
        """Forget the socket tables dumped for the last batch of events."""
        self._tables.clear()

    def resolve(
        self, family: int, local: bytes, local_port: int, remote: bytes, remote_port: int
    ) -> Optional[Listener]:
        """The listener an accepted connection (its child socket's ends as the event gave
        them) came through, or None when unknown or ambiguous."""
        version = 4 if len(local) == 4 else 6
        address = int.from_bytes(local, "big")
        found = self.candidates(version, address, local_port)
        if not found and self._clock() - self._full_refresh >= self.min_refresh_s:
            # a listener younger than our dumps whose listen() the kernel did not trace
            self._full_refresh = self._clock()
            self.refresh()
            found = self.candidates(version, address, local_port)
        if not found:
            return None
        namespaces = {entry.net_namespace for entry in found}
        if len(namespaces) == 1:
            return found[0]
        tuple_key = (local_port, local, remote_port, remote)
        table = TCP4 if family == 2 else TCP6
        holders = [
            entry
            for entry in found
            if entry.net_namespace is not None
            and tuple_key in self._table(entry.net_namespace, table)
        ]
        return holders[0] if len(holders) == 1 else None

    def _table(self, namespace: int, table: SocketTable) -> Set[Tuple[int, bytes, int, bytes]]:
        """The four-tuples of ``namespace``'s non-listening sockets in ``table`` (dumped once
        per batch)."""
        key = (namespace, table.name)
        cached = self._tables.get(key)
        if cached is not None:
            return cached
        ends: Set[Tuple[int, bytes, int, bytes]] = set()
        diag = self._diag(namespace)
        if diag is not None:
            try:
                for record in diag.records(table, NOT_LISTENING):
                    ends.add((record.local_port, record.src, record.remote_port, record.dst))
                self.dumps += 1
            except OSError as error:
                self.errors[namespace] = str(error)
            finally:
                diag.close()
        self._tables[key] = ends
        return ends

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._listeners.values())
