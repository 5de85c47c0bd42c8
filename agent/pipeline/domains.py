"""Names for destinations, from the DNS answers seen on this host: :class:`DomainNames`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Tuple

from agent.config import Settings
from agent.records import Connection

if TYPE_CHECKING:
    from agent.collect.dns.cache import NameCache
    from agent.collect.dns.watch import DnsWatch
    from agent.collect.netns import NamespaceDiscovery
    from agent.history import HistoryStore


class DomainNames:
    """Names for destinations: each connection's ``remote_domain``, and the names the
    ``domains`` allow rules match, from the DNS answers seen on this host (``docs/DNS.md``).

    :meth:`watching` (``watch``, the extension) observes the answers in every network
    namespace and keeps them in the history, so that a restart and a one-shot ``check`` know
    the names of the connections still open; :meth:`recorded` (``check``) reads what the
    running agent kept.  Without root or packet sockets, or with nothing recorded, names stay
    empty and :attr:`notice` says why, once.
    """

    PERSIST_EVERY_S = 10.0

    def __init__(self, cache: NameCache, watch: Optional[DnsWatch] = None, notice: str = ""):
        from agent.identity import read_boot_id

        self.cache = cache
        self.watch = watch
        self.notice = notice
        self.boot_id = read_boot_id()
        self._saved_changes = cache.changes
        self._saved_at = float("-inf")

    @classmethod
    def watching(cls, store: Optional[HistoryStore]) -> DomainNames:
        """Answers observed from now on, on top of those this boot's agent recorded."""
        from agent.collect.dns.cache import NameCache
        from agent.collect.dns.watch import DnsWatch

        cache = NameCache()
        watch = DnsWatch(cache)
        names = cls(cache, watch)
        names._load(store)
        names._saved_changes = cache.changes
        if not watch.start():
            names.notice = f"no names for destinations: {watch.unavailable}"
        return names

    @classmethod
    def recorded(cls, settings: Settings) -> DomainNames:
        """The answers the running agent recorded in the history store (none, and a notice
        saying so, when there is no store or it holds none of this boot)."""
        from agent.collect.dns.cache import NameCache
        from agent.history import open_store

        names = cls(NameCache())
        path = settings.history_path
        if not (settings.history_enabled and os.path.exists(path)):
            names.notice = (
                f"no names for destinations: no history store at {path} "
                "(names come from a running extension or watch)"
            )
            return names
        if not os.access(path, os.R_OK):
            names.notice = f"no names for destinations: cannot read the history store {path}"
            return names
        store = open_store(settings, read_only=True)  # a private copy: never the writers' lock
        try:
            loaded = names._load(store)
        finally:
            store.close()
        if not loaded:
            names.notice = (
                f"no names for destinations: the history store {path} holds no DNS answers "
                "of this boot (names come from a running extension or watch)"
            )
        return names

    def _load(self, store: Optional[HistoryStore]) -> int:
        if store is None:
            return 0
        from agent.history import HistoryUnavailable

        try:
            return self.cache.load(store.names(self.boot_id))
        except HistoryUnavailable:
            return 0

    def lookup(self, namespace: int, version: int, address: int) -> Tuple[str, ...]:
        """Every name answered for the address in the namespace (the allow rules' lookup)."""
        return self.cache.names(namespace, version, address)

    CATCH_UP_S = 1.0
    """How long :meth:`annotate` waits for the watch to read the answers queued already.  A
    healthy watch answers in milliseconds; on a loaded host (two cores shared with a busy test
    run) 0.2 s was measured too short, and a connection reported nameless stays so in ``watch``,
    which prints each connection once.  The wait happens only for a batch holding a connection
    without a name, at most once a batch."""

    def annotate(self, connections: List[Connection]) -> None:
        """Set ``remote_domain`` (the name asked, for the newest answer) on each connection, and
        keep the names of every live connection past their TTL.

        When some have no name, the watch first reads what its sockets hold (an answer
        queued a moment before the connection, not handled yet) and those are looked up again.
        """
        nameless = self._annotate(connections)
        if nameless and self.watch is not None and self.watch.catch_up(self.CATCH_UP_S):
            self._annotate(nameless)

    def _annotate(self, connections: List[Connection]) -> List[Connection]:
        """:meth:`annotate` from the cache as it is; the connections it found no name for."""
        cache = self.cache
        nameless: List[Connection] = []
        for connection in connections:
            namespace = connection.net_namespace
            if namespace is None or not connection.address_int:
                continue
            version = 6 if ":" in connection.remote_address else 4
            address = int(connection.address_int)
            if cache.touch(namespace, version, address):
                connection.remote_domain = cache.lookup(namespace, version, address) or ""
            else:
                nameless.append(connection)
        return nameless

    def rescan(self, discovery: Optional[NamespaceDiscovery]) -> None:
        """Watch the namespaces a whole-host sample found (new ones at once, gone ones no more)."""
        if self.watch is not None and discovery is not None and not self.watch.unavailable:
            self.watch.rescan(discovery.namespaces, discovery.threads)

    def attach(self, namespace: int, tid: int) -> None:
        """The kernel events just saw ``namespace`` (0: a thread gone right after entering
        one): the DNS watch attaches now, not at the next sample (see
        :meth:`agent.collect.dns.watch.DnsWatch.attach`).  From any thread."""
        if self.watch is not None and not self.watch.unavailable:
            self.watch.attach(namespace, tid)

    def persist(self, store: Optional[HistoryStore], at: float) -> None:
        """Keep the recent answers in the store when they changed (at most every
        :data:`PERSIST_EVERY_S`)."""
        changes = self.cache.changes
        if store is None or changes == self._saved_changes:
            return
        if at - self._saved_at < self.PERSIST_EVERY_S:
            return
        if store.save_names(self.boot_id, self.cache.export()):
            self._saved_changes, self._saved_at = changes, at

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
