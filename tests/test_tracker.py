"""The tracker's state machines, fed event sequences in buffer order over a /proc of files.

The kernel side is covered by ``test_events.py`` with real sockets; here each rule is pinned
down one sequence at a time: a process gone before /proc could be read keeps what its fork and
exec told, threads count for their process, namespaces follow clone flags and setns, a socket
address reused after CLOSE starts afresh, connects wait for their local port, refused and
timed-out outcomes, UDP flows once per destination.  The /proc here is a directory of files
laid out as the kernel's (``stat``, ``status``, ``exe``, ``ns/net`` links), not a mock.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from agent.collect.events import SocketEvent
from agent.collect.kernel.listeners import ListenerResolver
from agent.collect.kernel.records import (
    CLONE_THREAD,
    FLAG_SOFTIRQ,
    KernelEvent,
    NamespaceSwitch,
    ProcessExec,
    ProcessExit,
    ProcessFork,
    RouteLookup,
    TaskRename,
    TcpReset,
    TcpStateChange,
)
from agent.collect.kernel.tracker import NO_OWNER, Tracker
from agent.collect.netns import CLONE_NEWNET
from agent.identity import IdentityCache, process_uuid

BOOT_ID = "5e1f1d2c-0000-4000-8000-000000000000"
MS = 1_000_000
SECOND = 1000 * MS
CLI_NS, SRV_NS, OTHER_NS = 4026532001, 4026532002, 4026532003
LOCAL, REMOTE = bytes([10, 0, 0, 2]), bytes([9, 9, 9, 9])


class FakeProc:
    """A /proc tree of files for the processes a test says exist."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "stat").write_text("cpu 0 0 0 0\nbtime 1700000000\n")

    def process(
        self,
        pid: int,
        name: str,
        exe: str,
        cmdline: Sequence[str] = (),
        ppid: int = 1,
        start_ticks: int = 100,
        uid: int = 0,
        netns: int = CLI_NS,
        tgid: Optional[int] = None,
    ) -> None:
        directory = self.root / str(pid)
        (directory / "ns").mkdir(parents=True, exist_ok=True)
        fields = ["S", str(ppid)] + ["0"] * 17 + [str(start_ticks)]
        (directory / "stat").write_text(f"{pid} ({name}) {' '.join(fields)}\n")
        (directory / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
        (directory / "status").write_text(
            f"Name:\t{name}\nTgid:\t{tgid or pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        )
        (directory / "cgroup").write_text("0::/system.slice/test.service\n")
        for link, target in (("exe", exe), ("ns/net", f"net:[{netns}]")):
            path = directory / link
            if path.is_symlink():
                path.unlink()
            os.symlink(target, path)

    def gone(self, pid: int) -> None:
        directory = self.root / str(pid)
        for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        directory.rmdir()


def _no_way_in(pid: int) -> object:
    raise OSError(1, "no namespaces to enter in this test")


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def make_tracker(proc: FakeProc, own_pid: int = 999999, hold_s: float = 0.5) -> Tracker:
    identities = IdentityCache(str(proc.root), boot_id=BOOT_ID)
    resolver = ListenerResolver(identities, str(proc.root), opener=_no_way_in)  # type: ignore[arg-type]
    tracker = Tracker(identities, resolver, str(proc.root), own_pid=own_pid, hold_s=hold_s)
    tracker.offset = 1_700_000_000.0
    return tracker


def tcp(
    time: int,
    pid: int,
    skaddr: int,
    old: int,
    new: int,
    sport: int = 0,
    dport: int = 443,
    flags: int = 0,
    local: bytes = LOCAL,
    remote: bytes = REMOTE,
) -> TcpStateChange:
    return TcpStateChange(
        time, flags, pid, skaddr, old, new, sport, dport, 2, 6, local, remote, bytes(16), bytes(16)
    )


def kinds(events: Sequence[SocketEvent]) -> List[str]:
    return [event.kind for event in events]


def feed(tracker: Tracker, *events: KernelEvent) -> List[SocketEvent]:
    return tracker.feed(list(events))


# ---------------------------------------------------------------------------------------------
# processes


def test_a_process_gone_before_proc_was_read_keeps_what_its_fork_and_exec_said(
    proc: FakeProc,
) -> None:
    proc.process(100, "launcher", "/usr/bin/python3", ["python3", "launch.py"], uid=1000)
    tracker = make_tracker(proc)
    start = 5 * SECOND
    out = feed(
        tracker,
        ProcessFork(start, 100, 100, 200, "launcher", 0x1200000),
        TaskRename(start + MS, 200, 200, "bash"),
        ProcessExec(start + MS, 200, 200, 200, "/usr/bin/bash"),
        tcp(start + 2 * MS, 200, 0xA, 7, 2),
        tcp(start + 3 * MS, 200, 0xA, 2, 1, sport=40000),
        ProcessExit(start + 4 * MS, 200, 200, "bash", True),
    )
    assert kinds(out) == ["connect", "established"]
    identity = out[0].identity
    assert (identity.pid, identity.parent, identity.name, identity.path) == (
        200,
        100,
        "bash",
        "/usr/bin/bash",
    )
    assert identity.cmdline == ""  # not read: the process was never in /proc
    assert (identity.uid, identity.systemd_unit) == (1000, "test.service")  # inherited
    assert identity.process_start_time == 1_700_000_005
    ticks = start * os.sysconf("SC_CLK_TCK") // SECOND
    assert identity.process_uuid == process_uuid(BOOT_ID, 200, str(ticks))
    assert out[0].net_namespace == CLI_NS  # the parent's, over a fork without CLONE_NEWNET
    assert out[0].local_port == out[1].local_port == 40000
    assert out[0].time == pytest.approx(1_700_000_000 + 5.002)


def test_an_exec_read_while_alive_has_its_command_line(proc: FakeProc) -> None:
    proc.process(100, "launcher", "/usr/bin/python3")
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 300, "launcher", 0))
    proc.process(300, "curl", "/usr/bin/curl", ["curl", "https://example.net"], ppid=100)
    out = feed(
        tracker,
        ProcessExec(SECOND + MS, 300, 300, 300, "/bin/curl"),
        tcp(SECOND + 2 * MS, 300, 0xB, 7, 2),
    )
    tracker.feed([])
    out += tracker.flush(SECOND + SECOND)
    (connect,) = out
    assert connect.identity.cmdline == "curl https://example.net"
    assert connect.identity.path == "/usr/bin/curl"  # /proc's exe, not the name exec was given
    assert connect.local_port == 0  # no next event within the hold: announced without it


def test_an_exec_superseded_in_the_same_batch_is_not_read(proc: FakeProc) -> None:
    proc.process(100, "shim", "/usr/bin/bash")
    proc.process(400, "python3", "/usr/bin/python3.11", ["python3", "app.py"])
    tracker = make_tracker(proc)
    feed(
        tracker,
        ProcessFork(SECOND, 100, 100, 400, "shim", 0),
        ProcessExec(SECOND + 1, 400, 400, 400, "/root/.pyenv/shims/python3"),
        ProcessExec(SECOND + 2, 400, 400, 400, "/usr/bin/python3.11"),
    )
    assert tracker.processes.processes[400].identity.cmdline == "python3 app.py"
    assert tracker.processes.proc_reads == 1 + 1  # the parent when first seen, the last exec


def test_a_threads_connect_is_its_process(proc: FakeProc) -> None:
    proc.process(100, "server", "/usr/sbin/server")
    tracker = make_tracker(proc)
    out = feed(
        tracker,
        ProcessFork(SECOND, 100, 100, 101, "server", CLONE_THREAD | 0x100),
        tcp(SECOND + 1, 101, 0xC, 7, 2),
        tcp(SECOND + 2, 101, 0xC, 2, 1, sport=5000),
    )
    assert {event.identity.pid for event in out} == {100}
    assert out[0].identity.path == "/usr/sbin/server"


def test_a_thread_first_seen_is_read_as_its_process(proc: FakeProc) -> None:
    proc.process(100, "server", "/usr/sbin/server")
    proc.process(105, "worker", "/usr/sbin/server", tgid=100)  # /proc/TID of a thread
    tracker = make_tracker(proc)
    out = feed(tracker, tcp(SECOND, 105, 0xC, 7, 2), tcp(SECOND + 1, 105, 0xC, 2, 1, sport=1))
    assert out[0].identity.pid == 100 and out[0].identity.name == "server"


def test_clone_newnet_and_setns_move_a_thread_and_our_own_do_not(proc: FakeProc) -> None:
    proc.process(100, "runtime", "/usr/bin/runc", netns=CLI_NS)
    tracker = make_tracker(proc, own_pid=700)
    feed(tracker, ProcessFork(SECOND, 100, 100, 500, "runtime", CLONE_NEWNET))
    assert tracker.processes.threads[500].netns is None  # not in /proc (yet): unknown
    proc.process(600, "runtime", "/usr/bin/runc", netns=CLI_NS)
    feed(tracker, ProcessFork(SECOND, 100, 100, 600, "runtime", 0))
    proc.process(600, "runtime", "/usr/bin/runc", netns=OTHER_NS)  # it ran setns(2)
    out = feed(
        tracker,
        NamespaceSwitch(SECOND + 1, 600, "setns"),
        tcp(SECOND + 2, 600, 0xD, 7, 2),
        tcp(SECOND + 3, 600, 0xD, 2, 1, sport=7),
    )
    assert out[0].net_namespace == OTHER_NS
    proc.process(700, "egress-agent", "/usr/bin/python3", netns=CLI_NS)
    feed(tracker, tcp(SECOND + 4, 700, 0xE, 7, 2))
    proc.process(700, "egress-agent", "/usr/bin/python3", netns=OTHER_NS)
    feed(tracker, NamespaceSwitch(SECOND + 5, 700, "setns"))  # our sock_diag, there and back
    assert tracker.processes.threads[700].netns == CLI_NS


def test_a_setns_by_a_process_gone_meanwhile_is_nowhere_not_elsewhere(proc: FakeProc) -> None:
    proc.process(100, "ip", "/usr/sbin/ip", netns=CLI_NS)
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 800, "ip", 0))
    out = feed(
        tracker,
        NamespaceSwitch(SECOND + 1, 800, "setns"),  # /proc/800 is gone by the time we read
        tcp(SECOND + 2, 800, 0xF, 7, 2),
        tcp(SECOND + 3, 800, 0xF, 2, 1, sport=9),
    )
    assert out[0].net_namespace is None


def test_renames_name_the_process_but_not_for_a_thread(proc: FakeProc) -> None:
    proc.process(100, "daemon", "/usr/sbin/daemon")
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 101, "daemon", CLONE_THREAD))
    feed(tracker, TaskRename(SECOND + 1, 101, 101, "io-thread"))
    assert tracker.processes.process(100).identity.name == "daemon"
    feed(tracker, TaskRename(SECOND + 2, 100, 100, "daemon: idle"))
    assert tracker.processes.process(100).identity.name == "daemon: idle"


def test_an_exec_by_a_non_leader_thread_takes_the_leaders_pid(proc: FakeProc) -> None:
    proc.process(100, "app", "/usr/bin/app")
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 101, "app", CLONE_THREAD))
    proc.gone(100)
    out = feed(
        tracker,
        ProcessExec(SECOND + 1, 101, 100, 101, "/usr/bin/other"),
        tcp(SECOND + 2, 100, 0x10, 7, 2),
        tcp(SECOND + 3, 100, 0x10, 2, 1, sport=3),
    )
    assert 101 not in tracker.processes.threads
    assert (out[0].identity.pid, out[0].identity.path) == (100, "/usr/bin/other")


def test_sched_process_fork_without_clone_flags(proc: FakeProc) -> None:
    proc.process(100, "shell", "/usr/bin/sh")
    proc.process(101, "shell", "/usr/bin/sh", tgid=100)
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 101, "shell", None))
    feed(tracker, ProcessFork(SECOND, 100, 100, 102, "shell", None))
    assert tracker.processes.threads[101].tgid == 100  # /proc says it is a thread
    assert tracker.processes.threads[102].tgid == 102  # gone: taken as a process


def test_exited_processes_are_forgotten_after_the_grace(proc: FakeProc) -> None:
    proc.process(100, "parent", "/usr/bin/parent")
    tracker = make_tracker(proc)
    feed(tracker, ProcessFork(SECOND, 100, 100, 200, "parent", 0))
    feed(tracker, ProcessExit(2 * SECOND, 200, 200, "parent", None))
    assert 200 in tracker.processes.processes
    tracker.flush(5 * SECOND)
    assert 200 in tracker.processes.processes
    tracker.flush(20 * SECOND)
    assert 200 not in tracker.processes.processes


def test_identity_cache_forget_drops_the_entry_of_a_pid(proc: FakeProc) -> None:
    proc.process(100, "before", "/usr/bin/before")
    cache = IdentityCache(str(proc.root), boot_id=BOOT_ID)
    assert cache.lookup(100).name == "before"
    proc.process(100, "after", "/usr/bin/after")  # an exec: same pid and start time
    assert cache.lookup(100).name == "before"
    cache.forget(100)
    assert cache.lookup(100).name == "after"


# ---------------------------------------------------------------------------------------------
# TCP


@pytest.fixture
def client(proc: FakeProc) -> Tracker:
    proc.process(100, "client", "/usr/bin/client")
    return make_tracker(proc)


def test_refused_and_timed_out_connects(client: Tracker) -> None:
    out = feed(
        client,
        tcp(SECOND, 100, 0x1, 7, 2),
        TcpReset(SECOND + 1, FLAG_SOFTIRQ, 0, 0x1),
        tcp(SECOND + 2, 100, 0x1, 2, 7, sport=41000, flags=FLAG_SOFTIRQ),
        tcp(SECOND + 3, 100, 0x2, 7, 2),
        tcp(4 * SECOND, 42, 0x2, 2, 7, sport=41001, flags=FLAG_SOFTIRQ),
    )
    assert kinds(out) == ["connect", "refused", "connect", "timeout"]
    assert out[0].key == out[1].key != out[2].key == out[3].key
    assert [event.local_port for event in out] == [41000, 41000, 41001, 41001]
    assert {event.identity.pid for event in out} == {100}  # not the softirq's pid 42


def test_a_reused_socket_address_starts_afresh(client: Tracker) -> None:
    out = feed(
        client,
        tcp(SECOND, 100, 0x3, 7, 2),
        tcp(SECOND + 1, 100, 0x3, 2, 1, sport=1000),
        tcp(SECOND + 2, 100, 0x3, 1, 7, sport=1000),
        tcp(SECOND + 3, 100, 0x3, 7, 2, dport=80),
        tcp(SECOND + 4, 100, 0x3, 2, 1, sport=1001, dport=80),
    )
    assert kinds(out) == ["connect", "established", "closed", "connect", "established"]
    assert out[0].key != out[3].key
    assert (out[3].remote_port, out[4].local_port) == (80, 1001)


def test_a_connect_waits_for_its_port_no_longer_than_the_hold(client: Tracker) -> None:
    assert feed(client, tcp(SECOND, 100, 0x4, 7, 2)) == []
    assert client.flush(SECOND + SECOND // 4) == []
    (connect,) = client.flush(SECOND + SECOND)
    assert (connect.kind, connect.local_port) == ("connect", 0)
    later = feed(client, tcp(3 * SECOND, 7, 0x4, 2, 1, sport=2222, flags=FLAG_SOFTIRQ))
    assert kinds(later) == ["established"] and later[0].key == connect.key


def test_sockets_the_events_did_not_see_begin_end_without_an_owner(client: Tracker) -> None:
    out = feed(
        client,
        tcp(SECOND, 5, 0x5, 4, 7, sport=3000, flags=FLAG_SOFTIRQ),
        TcpReset(SECOND + 1, FLAG_SOFTIRQ, 5, 0x6),
        tcp(SECOND + 2, 5, 0x6, 2, 7, sport=3001, flags=FLAG_SOFTIRQ),
    )
    assert kinds(out) == ["closed", "refused"]
    assert {event.identity for event in out} == {NO_OWNER}
    assert {event.net_namespace for event in out} == {None}


def test_an_accepted_connection_is_the_listeners(proc: FakeProc) -> None:
    proc.process(300, "nginx", "/usr/sbin/nginx", netns=SRV_NS)
    tracker = make_tracker(proc)
    listener = 0x100
    out = feed(
        tracker,
        tcp(SECOND, 300, listener, 7, 10, sport=8080, dport=0, local=bytes(4), remote=bytes(4)),
        tcp(
            SECOND + 1,
            55,
            0x101,
            10,
            3,
            sport=8080,
            dport=50000,
            flags=FLAG_SOFTIRQ,
            local=REMOTE,
            remote=LOCAL,
        ),
        tcp(SECOND + 2, 55, 0x101, 8, 7, sport=8080, dport=50000, local=REMOTE, remote=LOCAL),
        tcp(SECOND + 3, 300, listener, 10, 7, sport=8080, dport=0),
    )
    assert kinds(out) == ["accepted", "closed"]
    assert out[0].identity.pid == 300 and out[0].net_namespace == SRV_NS
    assert (out[0].direction, out[0].local_port, out[0].remote_port) == ("inbound", 8080, 50000)
    assert out[1].key == out[0].key and out[1].identity.pid == 300


class FakeDiag:
    """A sock_diag socket of a namespace holding ``tuples`` (local port, local address,
    remote port, remote address): the few calls the resolver makes."""

    def __init__(self, tuples: Sequence[Tuple[int, bytes, int, bytes]]) -> None:
        self.tuples = tuples

    def records(self, table: object, states: int) -> List[SimpleNamespace]:
        return [
            SimpleNamespace(local_port=lp, src=la, remote_port=rp, dst=ra)
            for lp, la, rp, ra in self.tuples
        ]

    def close(self) -> None:
        pass


def test_a_shared_port_is_placed_through_the_listeners_owner_when_the_way_in_is_gone(
    proc: FakeProc,
) -> None:
    """Two namespaces listen on the same address and port; the pid we knew in one of them was
    a setup command, gone, and rediscovery ran a moment ago: the listener's owner is the way
    in (the failure CI once showed: the accepted connection had no owner)."""
    proc.process(300, "nginx", "/usr/sbin/nginx", netns=SRV_NS)
    proc.process(301, "nginx", "/usr/sbin/nginx", netns=OTHER_NS)
    held = {SRV_NS: [(8443, REMOTE, 40001, LOCAL)], OTHER_NS: [(8443, REMOTE, 40002, LOCAL)]}
    opened: List[int] = []

    def opener(pid: int) -> FakeDiag:
        opened.append(pid)
        if pid not in (300, 301):
            raise OSError(2, "No such file or directory")
        return FakeDiag(held[SRV_NS if pid == 300 else OTHER_NS])

    identities = IdentityCache(str(proc.root), boot_id=BOOT_ID)
    resolver = ListenerResolver(identities, str(proc.root), opener=opener)  # type: ignore[arg-type]
    resolver.discover()  # rationed from now on
    for namespace, pid in ((SRV_NS, 300), (OTHER_NS, 301)):
        address = int.from_bytes(REMOTE, "big")
        resolver.listened(namespace, 4, address, 8443, identities.lookup(pid))
    resolver.namespaces[OTHER_NS] = 777  # as when the way in was learnt from a setup command
    resolver.new_batch()
    found = resolver.resolve(2, REMOTE, 8443, LOCAL, 40002)
    assert found is not None and (found.identity.pid, found.net_namespace) == (301, OTHER_NS)
    assert 777 in opened and resolver.namespaces[OTHER_NS] == 301
    other = resolver.resolve(2, REMOTE, 8443, LOCAL, 40001)
    assert other is not None and other.identity.pid == 300


def test_outbound_connects_are_counted_per_namespace(proc: FakeProc) -> None:
    proc.process(100, "a", "/a", netns=CLI_NS)
    proc.process(101, "b", "/b", netns=OTHER_NS)
    tracker = make_tracker(proc)
    feed(
        tracker,
        tcp(SECOND, 100, 0x7, 7, 2),
        tcp(SECOND, 100, 0x8, 7, 2),
        tcp(SECOND, 101, 0x9, 7, 2),
    )
    assert tracker.connects_by_namespace == {CLI_NS: 2, OTHER_NS: 1}


# ---------------------------------------------------------------------------------------------
# UDP


def route(time: int, pid: int, dport: int, sport: int = 33000, **kw: int) -> RouteLookup:
    fields: Dict[str, int] = {"flags": 0, "iif": 1, "protocol": 17, "err": 0}
    fields.update(kw)
    return RouteLookup(
        time,
        pid,
        fields["flags"],
        4,
        fields["protocol"],
        fields["iif"],
        0,
        fields["err"],
        sport,
        dport,
        bytes(4),
        REMOTE,
    )


def test_udp_flows_once_per_destination_until_idle(client: Tracker) -> None:
    out = feed(
        client,
        *[route(SECOND + i * MS, 100, 53) for i in range(20)],
        *[route(SECOND + i * MS, 100, 443) for i in range(20)],
        route(SECOND, 100, 123, flags=FLAG_SOFTIRQ),  # inbound: interrupt context
        route(SECOND, 100, 124, iif=3),  # an input lookup
        route(SECOND, 100, 125, protocol=6),  # TCP's own lookups
    )
    assert [(event.kind, event.remote_port) for event in out] == [("udp", 53), ("udp", 443)]
    assert out[0].identity.pid == 100 and out[0].net_namespace == CLI_NS
    again = feed(client, route(SECOND + 61 * SECOND, 100, 53))
    assert [event.remote_port for event in again] == [53]  # idle past the TTL: new again
