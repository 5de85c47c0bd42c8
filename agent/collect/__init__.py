"""Where connections come from: the sources, what they report about themselves, and the factory.

A :class:`Sampler` takes one sample of the host's inet sockets and returns
:class:`agent.records.Connection` records; :func:`open_sampler` picks the one for this platform:

- :mod:`agent.collect.sockets.sampler`: every network namespace, through netlink ``sock_diag``
  (:mod:`agent.collect.sockets.sockdiag`) filtered in the kernel, or ``/proc/PID/net`` text
  (:mod:`agent.collect.sockets.procnet`); owners and identities from ``/proc``;
- :mod:`agent.collect.sockets.psutil_backend`: ``psutil.net_connections()``, this namespace
  only, for other platforms and as the reference the Linux sampler is checked against.

The statistics types live here, beside the protocol, so that each backend imports them from its
package and no backend imports another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Collection, Dict, FrozenSet, List, Optional, Protocol

from agent.classify import Classifier

if TYPE_CHECKING:
    from agent.collect.netns import NamespaceDiscovery
    from agent.records import Connection

SAMPLING = "sampling"
"""The history's source name of every sampler (``seen_by``; a run's ``events_source`` while no
event source feeds it)."""
TRACEFS = "tracefs"
"""The source name of the kernel events (:class:`agent.collect.kernel.source.KernelEventSource`).
Every event source names itself (:attr:`agent.collect.events.EventSource.name`)."""

UNPRIVILEGED_NOTICE = (
    "not running as root, so this report is partial: sockets of other users' processes show "
    "without an owner (pid -1), and network namespaces (containers) in which none of your own "
    "processes run are not seen at all"
)
"""What to say once when :attr:`Sampler.limited` is true."""


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
    outbound_tcp: Optional[int] = None
    """Outbound TCP connections in its tables, when the sampler counts them."""
    reused: bool = False
    """Its TCP connections are those of an earlier dump: none of its TCP counters moved since
    (:mod:`agent.collect.sockets.changes`)."""
    quiet: bool = False
    """Nothing was dumped at all: none of its counters moved since its last read."""
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
    namespaces_reused: int = 0
    """Namespaces whose TCP connections came from an earlier dump (``NamespaceStats.reused``)."""
    namespaces_quiet: int = 0
    """Namespaces of which nothing was dumped (``NamespaceStats.quiet``)."""
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
    outbound_tcp: Optional[FrozenSet[int]] = None
    """Every outbound TCP connection in the tables, external or not, as
    :func:`agent.collect.sockets.outbound.outbound_key` names them; only when the sampler counts
    them (:attr:`Sampler.count_outbound_tcp`)."""
    discovery: Optional[NamespaceDiscovery] = None
    """The network namespaces a whole-host sample found (None for a sample narrowed to pids, and
    from backends that do not see namespaces): what other per-namespace readers can reuse."""
    backend: str = ""
    """How the socket tables were read: ``sock_diag`` (netlink, filtered in the kernel),
    ``proc`` (``/proc/PID/net`` text), ``sock_diag+proc`` when some namespaces fell back, or
    ``psutil``."""

    @property
    def active_opens(self) -> Dict[int, int]:
        """``{namespace inode: Tcp ActiveOpens}`` of the namespaces whose counters were read."""
        return {
            namespace.inode: namespace.active_opens
            for namespace in self.per_namespace
            if namespace.active_opens is not None
        }


class Sampler(Protocol):
    """What the pipeline needs of a sampler: :class:`~agent.collect.sockets.sampler.LinuxSampler`
    on Linux, :class:`~agent.collect.sockets.psutil_backend.PsutilSampler` elsewhere or with
    ``--backend psutil``.

    Not thread-safe: one caller at a time (the pipeline serialises samples).
    """

    last: SampleStats
    count_outbound_tcp: bool
    """Collect :attr:`SampleStats.outbound_tcp` in the next samples."""

    @property
    def limited(self) -> bool:
        """True when the sample is partial for lack of privilege (see
        :data:`UNPRIVILEGED_NOTICE`)."""
        ...

    def sample(
        self, want_all: bool = False, pids: Optional[Collection[int]] = None
    ) -> List[Connection]:
        """The connections of this moment: external ones (every inet socket with ``want_all``),
        of the processes ``pids`` only when given.  Raises :class:`SamplerError` when the host
        cannot be sampled at all."""
        ...


BACKENDS = ("auto", "proc", "psutil")
"""What ``--backend`` accepts: ``proc`` is the Linux sampler (sock_diag, else /proc)."""


def open_sampler(
    classifier: Classifier,
    backend: str = "auto",
    count_outbound_tcp: bool = False,
    full_read_every: Optional[float] = None,
) -> Sampler:
    """The sampler for this platform: every network namespace on Linux (``backend="proc"``),
    psutil's view of this namespace elsewhere (``backend="psutil"``).  Each backend is imported
    only when chosen.  ``full_read_every``: the Linux sampler's bound on reusing a namespace's
    TCP dump (``sampling.full_read_every``; None: its default)."""
    if backend == "psutil" or (backend == "auto" and not os.path.isdir("/proc/self/net")):
        from agent.collect.sockets.psutil_backend import PsutilSampler

        return PsutilSampler(classifier)
    from agent.collect.sockets.sampler import LinuxSampler

    if full_read_every is None:
        return LinuxSampler(classifier, count_outbound_tcp=count_outbound_tcp)
    return LinuxSampler(
        classifier, count_outbound_tcp=count_outbound_tcp, full_read_every=full_read_every
    )
