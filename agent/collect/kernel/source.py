"""The kernel event source: a tracefs instance of our own, its reader and the tracker, as one
object with ``poll(timeout) -> [SocketEvent]``.

Usage, from one background thread::

    try:
        source = open_event_source()
    except EventsUnavailable as error:
        log.warning("kernel events unavailable (%s); sampling", error)   # events_source=sampling
    else:
        while running:
            for event in source.poll(1.0):       # blocks up to 1 s; returns within it
                ...                              # SocketEvent records
            if source.lost != last_lost:         # the kernel dropped events: resynchronise
                ...
        source.close()

Idle, ``poll`` sleeps in the kernel (``poll(2)`` on the per-CPU buffers, woken by the first
event since ``buffer_percent`` is 0).  Busy, it reads at most every ``min_interval_s`` so that
a storm is read in batches rather than one wake-up per event.  Every ``verify_every_s`` it
checks that nobody reset the instance (and applies the settings again if so) and reads the
kernel's loss counters.  After a loss it resynchronises the tracker (``Tracker.resync``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from agent.collect import TRACEFS
from agent.collect.events import SocketEvent
from agent.collect.kernel.execargs import ExecProbe, decode_exec_args
from agent.collect.kernel.kfilter import Prefix, dropped_after_connect, with_internal_dropped
from agent.collect.kernel.listeners import ListenerResolver
from agent.collect.kernel.reader import (
    CLOCK_IDS,
    EVENT_SPECS,
    ChosenEvents,
    EventReader,
    EventSpec,
    choose_events,
)
from agent.collect.kernel.ringbuffer import FormatError
from agent.collect.kernel.tracefs import (
    INSTANCE_PREFIX,
    TRACEFS_PATHS,
    EventsUnavailable,
    Instance,
    InstanceSettings,
    find_tracefs,
)
from agent.collect.kernel.tracker import Tracker
from agent.collect.kernel.users import USER_SPECS
from agent.collect.netns import PROC_ROOT
from agent.identity import IdentityCache

log = logging.getLogger(__name__)

UDP_EVENTS = (
    "fib:fib_table_lookup",
    "fib6:fib6_table_lookup",
    "sock:sock_send_length",
    "sock:sock_recv_length",
    "syscalls:sys_enter_connect",
    "syscalls:sys_exit_connect",
)
"""The events of datagram flows (UDP, ICMP, SCTP, raw): ``udp=False`` leaves them out."""
NAMESPACE_EVENTS = ("syscalls:sys_exit_setns", "syscalls:sys_exit_unshare")


def default_buffer_kb(cpus: Optional[int] = None) -> int:
    """Ring buffer per CPU: 16 MiB in all, each CPU between 256 KiB and 2 MiB (about 3,400 to
    27,000 TCP events, the fullest a burst between two reads should need)."""
    count = cpus or os.cpu_count() or 1
    return max(256, min(2048, 16384 // count))


@dataclass(frozen=True)
class KernelLoss:
    """Events the source knows it lost over [start, end] (unix seconds): ``kind`` is
    ``tracker_overflow`` or ``instance_reset`` (the history's loss kinds)."""

    kind: str
    start: float
    end: float
    count: int
    detail: str


class KernelEventSource:
    """Decoded, attributed connection events from a tracing instance of our own: an
    :class:`agent.collect.events.EventSource`.

    Made by :func:`open_event_source`.  :meth:`poll` and :meth:`close` belong to one thread;
    the counters (:attr:`lost`, :attr:`resyncs`, :meth:`connects_by_namespace`) may be read
    from any.
    """

    name = TRACEFS

    def __init__(
        self,
        instance: Instance,
        reader: EventReader,
        tracker: Tracker,
        chosen: ChosenEvents,
        verify_every_s: float = 5.0,
        min_interval_s: float = 0.05,
        exec_probe: Optional[ExecProbe] = None,
    ) -> None:
        self.instance = instance
        self.exec_probe = exec_probe
        """Our uprobe on the loader's entry (command lines at exec), when defined."""
        self.reader = reader
        self.tracker = tracker
        self.unavailable = dict(chosen.unavailable)
        """``system:event`` -> why this kernel's events lack it (what the source does
        without)."""
        self.verify_every_s = verify_every_s
        self.min_interval_s = min_interval_s
        self.resyncs = 0
        """Times the tracker was resynchronised after a loss or a reset of the instance."""
        self.resets = 0
        """Times another tool had changed our instance's settings (re-applied)."""
        self.events_read = 0
        self._clock_id = CLOCK_IDS[instance.clock]
        self._boot_offset_ns = 0
        self._last_read = 0.0
        self._last_verify = time.monotonic()
        self._lost_seen = 0
        self._last_resync = -1e9
        self.resync_every_s = 5.0
        self._closed = False
        self._overflow_seen = 0
        self._losses: List[KernelLoss] = []
        self._last_poll_wall = time.time()
        self._last_verify_wall = time.time()
        self.kernel_filter = "none: every event reaches the agent"
        """What the kernel filters out before the agent reads (internal IPv4 connections where
        the kernel accepts the expression, :mod:`agent.collect.kernel.kfilter`)."""
        self._sync_clock()

    def take_losses(self) -> List[KernelLoss]:
        """The losses noticed since the last call, for the history (``HistoryStore.record_loss``):
        sockets the tracker dropped at its bound, and resets of the instance by another tool
        (the events between the last check and the reset are gone, uncounted by the kernel)."""
        losses, self._losses = self._losses, []
        return losses

    def _sync_clock(self) -> None:
        now = time.time()
        trace_ns = time.clock_gettime_ns(self._clock_id)
        self.tracker.offset = now - trace_ns / 1e9
        if self._clock_id != time.CLOCK_BOOTTIME:
            self.tracker.boot_offset_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - trace_ns

    def poll(self, timeout: float) -> List[SocketEvent]:
        """Wait up to ``timeout`` seconds for kernel events and return the records they make
        (possibly none).  Never raises for what the kernel or /proc hand it; raises OSError
        only if our instance is gone for good."""
        if self._closed:
            return []
        started = time.monotonic()
        since = started - self._last_read
        if since < self.min_interval_s:
            time.sleep(min(self.min_interval_s - since, max(0.0, timeout)))
        wait = timeout
        if self.reader.held:
            wait = min(wait, self.min_interval_s)  # the other CPUs will have caught up
        elif self.tracker.holding:
            wait = min(wait, self.tracker.hold_ns / 1e9)
        ready = self.reader.wait(max(0.0, wait - (time.monotonic() - started)))
        self._sync_clock()
        records: List[SocketEvent]
        if ready or self.reader.held:
            events = self.reader.read()
            self._last_read = time.monotonic()
            self.events_read += len(events)
            records = self.tracker.feed(events)
        else:
            records = self.tracker.flush(time.clock_gettime_ns(self._clock_id))
        now = time.time()
        dropped = self.tracker.overflowed - self._overflow_seen
        if dropped > 0:
            self._overflow_seen = self.tracker.overflowed
            self._losses.append(
                KernelLoss(
                    "tracker_overflow",
                    self._last_poll_wall,
                    now,
                    dropped,
                    f"{dropped} socket(s) dropped at the tracker's bound of "
                    f"{self.tracker.max_sockets}",
                )
            )
        self._last_poll_wall = now
        if time.monotonic() - self._last_verify >= self.verify_every_s:
            self._verify()
        self._check_loss()
        return records

    def _verify(self) -> None:
        self._last_verify = time.monotonic()
        try:
            changed = self.instance.verify()
        except OSError as error:
            log.warning("kernel events: cannot check instance %s: %s", self.instance.name, error)
            return
        checked_since, self._last_verify_wall = self._last_verify_wall, time.time()
        if changed:
            self.resets += 1
            self._losses.append(
                KernelLoss(
                    "instance_reset",
                    checked_since,
                    self._last_verify_wall,
                    1,
                    f"another tool changed {self.instance.name} ({', '.join(changed)})",
                )
            )
            log.warning(
                "kernel events: another tool changed %s (%s); applied our settings again",
                self.instance.name,
                ", ".join(changed),
            )
            if "trace_clock" in changed or "buffer_size_kb" in changed:
                self.reader.rebase_stats()  # the kernel reset the buffer and its counters
            self._resync("a reset of the instance")
        self.reader.refresh_stats()

    def _check_loss(self) -> None:
        """After a loss: log it and resynchronise, at most once per ``resync_every_s`` (under
        a sustained overload a resync per batch would only deepen it)."""
        lost = self.reader.lost
        if lost <= self._lost_seen:
            return
        if time.monotonic() - self._last_resync < self.resync_every_s:
            return
        self.reader.refresh_stats()
        lost = self.reader.lost
        log.warning(
            "kernel events: %d events lost (buffer full); resynchronising",
            lost - self._lost_seen,
        )
        self._lost_seen = lost
        self._resync("lost events")

    def _resync(self, why: str) -> None:
        self.resyncs += 1
        self._last_resync = time.monotonic()
        try:
            self.tracker.resync()
        except OSError as error:
            log.warning("kernel events: resynchronising after %s failed: %s", why, error)

    @property
    def lost(self) -> int:
        """Events the kernel lost so far (buffer overruns, from page headers and its stats)."""
        return self.reader.lost

    def connects_by_namespace(self) -> Dict[Optional[int], int]:
        """Outbound TCP connects seen per network namespace (None: namespace unknown)."""
        return dict(self.tracker.connects_by_namespace)

    @property
    def outbound_tcp_seen(self) -> int:
        return sum(self.tracker.connects_by_namespace.values())

    def close(self) -> None:
        """Stop tracing, close the buffers and remove the instance."""
        if self._closed:
            return
        self._closed = True
        self.reader.close()
        if not self.instance.close():
            log.warning("kernel events: %s is busy and was left behind", self.instance.path)
        if self.exec_probe is not None:
            self.exec_probe.remove()

    def __enter__(self) -> KernelEventSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_event_source(
    identities: Optional[IdentityCache] = None,
    *,
    buffer_size_kb: Optional[int] = None,
    prefix: str = INSTANCE_PREFIX,
    tracefs_paths: Sequence[str] = TRACEFS_PATHS,
    mount: bool = True,
    udp: bool = True,
    track_namespaces: bool = True,
    proc_root: str = PROC_ROOT,
    hold_s: float = 0.5,
    exclude: Sequence[str] = (),
    drop_internal: Sequence[Prefix] = (),
    exec_args: bool = True,
    track_users: bool = True,
) -> KernelEventSource:
    """Make our instance, enable the events this kernel has, start tracing.

    ``identities`` is the cache process identities come from (give the event source its own,
    or one only its thread uses: :class:`~agent.identity.IdentityCache` is not thread-safe).
    ``udp=False`` leaves out the route lookup events, ``track_namespaces=False`` the syscall
    events (then a thread's namespace is read once and inherited, not re-read after setns).
    ``drop_internal`` (the classifier's never-external blocks): the events of connections to
    those IPv4 blocks are dropped in the kernel where it accepts the filter
    (:mod:`agent.collect.kernel.kfilter`; :attr:`KernelEventSource.kernel_filter` says).
    ``exec_args=False`` leaves out the probe that captures command lines at exec
    (:mod:`agent.collect.kernel.execargs`; without it, or where the kernel cannot have it,
    ``/proc`` at exec gives them, for processes that live until it is read);
    ``track_users=False`` the setuid-family syscall events (:mod:`agent.collect.kernel.users`:
    then a process's user is read from ``/proc`` at exec, or inherited).
    Raises :class:`~agent.collect.kernel.tracefs.EventsUnavailable`; nothing is left behind then.
    """
    if os.geteuid() != 0:
        raise EventsUnavailable(
            EventsUnavailable.NOT_ROOT, "kernel events need root (tracefs, every namespace)"
        )
    root = find_tracefs(tracefs_paths, mount=mount)
    instance = Instance.create(root, prefix)
    reader: Optional[EventReader] = None
    probe: Optional[ExecProbe] = None
    try:
        probe_specs: List[EventSpec] = []
        probe_missing = ""
        if exec_args:
            try:
                probe = ExecProbe.define(root, instance.name)
            except (OSError, ValueError) as error:
                probe_missing = str(error)
            else:
                probe_specs.append(EventSpec(probe.system, probe.name, ("",), decode_exec_args))
        excluded = list(exclude)
        if not udp:
            excluded += UDP_EVENTS
        if not track_namespaces:
            excluded += NAMESPACE_EVENTS
        try:
            specs = []
            dropping_filters: Dict[Tuple[str, str], Set[str]] = {}
            for spec in EVENT_SPECS:
                filters = with_internal_dropped(spec.system, spec.name, spec.filters, drop_internal)
                dropping_filters[(spec.system, spec.name)] = set(filters) - set(spec.filters)
                specs.append(spec._replace(filters=filters))
            specs += probe_specs
            if track_users:
                specs += USER_SPECS
            chosen = choose_events(instance.read_format, specs, exclude=excluded)
        except FormatError as error:
            raise EventsUnavailable(EventsUnavailable.EVENT_MISSING, str(error)) from error
        settings = InstanceSettings(chosen.settings, buffer_size_kb or default_buffer_kb())
        instance.apply(settings)
        for system, name in instance.missing:
            chosen.unavailable[f"{system}:{name}"] = "not in this kernel"
        if probe_missing:
            chosen.unavailable["uprobe:exec_argv"] = probe_missing
        try:
            reader = EventReader(instance, chosen.decoders, chosen.type_field)
        except (OSError, FormatError) as error:
            raise EventsUnavailable(
                EventsUnavailable.FAILED, f"reading {instance.path}: {error}"
            ) from error
        cache = identities or IdentityCache(proc_root)
        resolver = ListenerResolver(cache, proc_root)
        tracker = Tracker(cache, resolver, proc_root, hold_s=hold_s)
        tracker.datagrams.sends_known = "sock:sock_send_length" not in chosen.unavailable
        tracker.datagrams.receives_known = "sock:sock_recv_length" not in chosen.unavailable
        dropping = sorted(
            f"{system}:{name}"
            for (system, name), accepted in instance.filters.items()
            if accepted in dropping_filters.get((system, name), ())
        )
        if "sock:inet_sock_set_state" in dropping:
            tracker.dropped_in_kernel = dropped_after_connect(drop_internal)
        source = KernelEventSource(instance, reader, tracker, chosen, exec_probe=probe)
        source.kernel_filter = (
            "internal IPv4 dropped in the kernel (" + ", ".join(dropping) + ")"
            if dropping
            else "none: every event reaches the agent"
        )
        for key, why in sorted(chosen.unavailable.items()):
            if key not in excluded:
                log.info("kernel events: without %s (%s)", key, why)
        resolver.refresh()
        return source
    except BaseException:
        if reader is not None:
            reader.close()
        instance.close()
        if probe is not None:
            probe.remove()
        raise
