"""A namespace whose counters did not move keeps its last TCP dump: proven right on real sockets.

The test host: a server namespace with listeners on global addresses, two client namespaces
on veth pairs to it, clients that can change their socket on command (``tests/sockholder.py``).
Each step samples with a sampler that reuses (its period set by a clock the test moves) and
with a sampler that reads every namespace in full; on the namespaces of this test both must
give the same rows: owners, fds, states and directions, except for the one change the
counters cannot see, which only the periodic full read catches.  Only this test's namespaces
are looked at (foreign connections live elsewhere on the host, tests/foreign.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest
from nethost import Namespace, NetHost, Proc

from agent.classify import Classifier
from agent.collect import NamespaceStats
from agent.collect.sockets.changes import Reuse, read_signals
from agent.collect.sockets.sampler import LinuxSampler
from agent.records import Connection

SRV4, SRV6 = "9.9.9.9", "2001:4860:4860::8888"
PERIOD = 30.0
HOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sockholder.py")

Row = Tuple[int, int, Optional[int], int, str, int, str, int, str, str]
"""(net_namespace, pid, fd, protocol, local_address, local_port, remote_address, remote_port,
state, direction)"""


def row_key(row: Connection) -> Row:
    assert row.net_namespace is not None
    return (
        row.net_namespace,
        row.pid,
        row.fd,
        row.protocol,
        row.local_address,
        row.local_port,
        row.remote_address,
        row.remote_port,
        row.state,
        row.direction,
    )


class Clock:
    """The reuse period's clock, moved by the test: no sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    net: NetHost
    srv: Namespace
    clients: Dict[str, Namespace]
    listener4: Proc
    listener6: Proc
    clock: Clock = field(default_factory=Clock)
    extra_pids: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sampler = LinuxSampler(
            Classifier(), use_sock_diag=True, reuse=Reuse(PERIOD, clock=self.clock)
        )

    @property
    def inodes(self) -> Set[int]:
        return {self.srv.inode, *(ns.inode for ns in self.clients.values())}

    def hold(self, name: str, address: str, proto: str = "tcp", port: int = 0) -> Proc:
        """A client in namespace ``name`` holding one socket to ``address``; a TCP one once
        the server has accepted it (until then the server's side has no owner)."""
        listener = self.listener6 if ":" in address else self.listener4
        fds = f"/proc/{listener.pid}/fd"
        before = len(os.listdir(fds))
        argv = [sys.executable, HOLDER, proto, address, str(port or listener.port)]
        proc = self.net.spawn(self.clients[name], argv, ready=True)
        deadline = time.monotonic() + 10
        while proto == "tcp" and len(os.listdir(fds)) <= before:
            assert time.monotonic() < deadline, "the server did not accept"
            time.sleep(0.01)
        return proc

    def sample(self) -> Tuple[Set[Row], Dict[int, NamespaceStats]]:
        """A sample by the reusing sampler: this test's rows and namespaces."""
        rows = {row_key(r) for r in self.sampler.sample() if r.net_namespace in self.inodes}
        stats = {n.inode: n for n in self.sampler.last.per_namespace if n.inode in self.inodes}
        return rows, stats

    def full(self) -> Set[Row]:
        """What a sampler that reads every namespace in full sees now, once two such reads
        agree (a handshake or a close the test just made takes a round trip to settle)."""
        last: Optional[Set[Row]] = None
        for _ in range(100):
            sampler = LinuxSampler(Classifier(), use_sock_diag=True, full_read_every=0)
            rows = {row_key(r) for r in sampler.sample() if r.net_namespace in self.inodes}
            if rows == last:
                return rows
            last = rows
            time.sleep(0.02)
        raise AssertionError("the test's sockets did not settle")

    def same_as_full(self, *stale: Namespace) -> Tuple[Set[Row], Dict[int, NamespaceStats]]:
        """A sample that equals a full read, but in the ``stale`` namespaces (where the test
        made a change that the counters cannot see)."""
        full = self.full()
        rows, stats = self.sample()
        skip = {namespace.inode for namespace in stale}
        assert {r for r in rows if r[0] not in skip} == {r for r in full if r[0] not in skip}
        return rows, stats


def tell(proc: Proc, command: str) -> List[str]:
    """Send a command to a sockholder; the words of its answer after ``OK``."""
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(command + "\n")
    proc.popen.stdin.flush()
    answer = (proc.line(30) or "").split()
    assert answer[:1] == ["OK"], answer
    return answer[1:]


def link(net: NetHost, srv: Namespace, cli: Namespace, index: int) -> None:
    """A veth pair srv <-> cli on 9.9.(10+index).0/24 and 2001:4860:4860:(index)::/64, with
    the client's default routes through the server."""
    net.veth(srv, f"rs{index}", cli, f"rc{index}")
    srv.add_address(net.name(f"rs{index}"), f"9.9.{10 + index}.1/24")
    srv.add_address(net.name(f"rs{index}"), f"2001:4860:4860:{index}::1/64")
    cli.add_address(net.name(f"rc{index}"), f"9.9.{10 + index}.2/24")
    cli.add_address(net.name(f"rc{index}"), f"2001:4860:4860:{index}::2/64")
    cli.ip("route", "add", "default", "via", f"9.9.{10 + index}.1")
    cli.ip("-6", "route", "add", "default", "via", f"2001:4860:4860:{index}::1")


@pytest.fixture
def host(nethost: NetHost) -> Iterator[Host]:
    srv = nethost.namespace("rsrv")
    srv.add_address("lo", f"{SRV4}/32")
    srv.add_address("lo", f"{SRV6}/128")
    clients = {}
    for index, name in enumerate(("rc1", "rc2"), start=1):
        clients[name] = nethost.namespace(name)
        link(nethost, srv, clients[name], index)
    made = Host(nethost, srv, clients, nethost.listen(srv, SRV4), nethost.listen(srv, SRV6))
    try:
        yield made
    finally:
        for pid in made.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def rows_of(rows: Set[Row], pid: int) -> List[Row]:
    return [row for row in rows if row[1] == pid]


def test_an_unchanged_namespace_keeps_its_rows_and_owners(host: Host) -> None:
    a = host.hold("rc1", SRV4)
    b = host.hold("rc2", SRV6)
    first, stats = host.same_as_full()
    assert not any(n.reused for n in stats.values())  # nothing known yet: every one is read
    assert len(rows_of(first, a.pid)) == len(rows_of(first, b.pid)) == 1
    second, stats = host.same_as_full()
    assert second == first
    assert all(n.reused and n.quiet for n in stats.values())  # nothing moved: no dump at all
    assert host.sampler.last.namespaces_quiet >= len(host.inodes)


def test_a_new_and_a_closed_connection_are_seen_at_once(host: Host) -> None:
    a = host.hold("rc1", SRV4)
    host.hold("rc2", SRV4)
    before, _ = host.same_as_full()
    b = host.hold("rc1", SRV6)  # ActiveOpens moves in rc1, PassiveOpens in the server's
    rows, stats = host.same_as_full()
    assert len(rows_of(rows, b.pid)) == 1 and rows_of(rows, a.pid) == rows_of(before, a.pid)
    assert not stats[host.clients["rc1"].inode].reused
    assert not stats[host.srv.inode].reused
    assert stats[host.clients["rc2"].inode].reused

    (mine,) = rows_of(rows, a.pid)
    tell(a, "close")  # ESTABLISHED -> FIN_WAIT, then an ownerless TIME_WAIT: CurrEstab, tw
    rows, stats = host.same_as_full(host.srv)  # the server's side: CLOSE_WAIT, unseen
    assert not rows_of(rows, a.pid)
    assert not stats[host.clients["rc1"].inode].reused
    left = [row for row in rows if row[0] == mine[0] and row[5] == mine[5]]
    assert left and all(row[1] == -1 and row[9] == "unknown" for row in left)  # ownerless


def test_a_state_change_that_moves_a_counter(host: Host) -> None:
    a = host.hold("rc1", SRV4)
    before, _ = host.same_as_full()
    assert [row[8] for row in rows_of(before, a.pid)] == ["ESTABLISHED"]
    tell(a, "shutdown")  # our side FIN_WAIT2 (CurrEstab drops); the server's CLOSE_WAIT
    rows, stats = host.same_as_full(host.srv)
    assert [row[8] for row in rows_of(rows, a.pid)] == ["FIN_WAIT2"]
    assert not stats[host.clients["rc1"].inode].reused


def test_what_the_counters_cannot_see_shows_after_the_period(host: Host) -> None:
    """The server's side going ESTABLISHED -> CLOSE_WAIT moves no counter of its namespace on
    Linux 6.10 and later (CLOSE_WAIT counts in CurrEstab there): the row keeps its earlier
    state until the namespace's full read comes due, within the period."""
    a = host.hold("rc1", SRV4)
    host.sample()
    srv = host.srv.inode
    listener_pid = host.listener4.pid

    def server_states(rows: Set[Row]) -> List[str]:
        return [row[8] for row in rows if row[1] == listener_pid and row[0] == srv]

    signature = read_signals(listener_pid).tcp
    tell(a, "shutdown")
    host.full()  # settled
    rows, stats = host.sample()
    if read_signals(listener_pid).tcp == signature:  # as on this kernel (6.18)
        assert stats[srv].reused
        assert server_states(rows) == ["ESTABLISHED"]  # stale: the documented miss
    else:  # before 6.10 CurrEstab drops: seen at once
        assert server_states(rows) == ["CLOSE_WAIT"]
    host.clock.now += PERIOD * 0.74  # not yet due: at least three quarters of the period
    rows, stats = host.sample()
    assert stats[srv].reused == (read_signals(listener_pid).tcp == signature)
    host.clock.now += PERIOD * 0.26
    rows, stats = host.same_as_full()
    assert not stats[srv].reused
    assert server_states(rows) == ["CLOSE_WAIT"]


def test_a_socket_handed_to_another_process_gets_its_new_owner(host: Host) -> None:
    a = host.hold("rc1", SRV6)
    before, _ = host.same_as_full()
    (held,) = rows_of(before, a.pid)
    (child,) = tell(a, "handoff")  # fork, then the parent closes: same socket, new owner
    host.extra_pids.append(int(child))
    rows, stats = host.same_as_full()
    assert stats[host.clients["rc1"].inode].reused  # no counter moved ...
    assert not rows_of(rows, a.pid)
    (moved,) = rows_of(rows, int(child))  # ... and yet the owner is the child
    assert moved[3:] == held[3:] and moved[2] == held[2]  # same socket, same fd number


def test_a_udp_socket_that_sends_to_a_new_peer_is_seen(host: Host) -> None:
    """A connect() of a UDP socket moves no counter, its first datagram does (OutDatagrams):
    what sent nothing yet shows once the period is due."""
    udp = host.hold("rc2", "10.99.0.1", proto="udp", port=53)  # internal peer: no row
    rc2 = host.clients["rc2"].inode
    before, _ = host.same_as_full()
    assert not rows_of(before, udp.pid)
    tell(udp, f"reconnect {SRV4} 53")  # now external, and nothing was sent
    rows, stats = host.same_as_full(host.clients["rc2"])
    assert stats[rc2].quiet and not rows_of(rows, udp.pid)  # the documented miss
    tell(udp, "send")
    rows, stats = host.same_as_full()
    assert stats[rc2].reused and not stats[rc2].quiet  # TCP reused, UDP read
    ((_, _, _, protocol, *_rest),) = rows_of(rows, udp.pid)
    assert protocol == 17

    tell(udp, "reconnect 9.9.9.7 53")  # another peer, nothing sent: the old one shows ...
    rows, stats = host.same_as_full(host.clients["rc2"])
    assert stats[rc2].quiet and [r[6] for r in rows_of(rows, udp.pid)] == [SRV4]
    host.clock.now += PERIOD  # ... until the period is due
    rows, stats = host.same_as_full()
    assert not stats[rc2].reused and [r[6] for r in rows_of(rows, udp.pid)] == ["9.9.9.7"]


def test_an_ipv6_udp_socket_that_sends_to_a_new_peer_is_seen(host: Host) -> None:
    udp = host.hold("rc1", "fd00:99::1", proto="udp", port=53)  # internal peer: no row
    rc1 = host.clients["rc1"].inode
    host.same_as_full()
    tell(udp, f"reconnect {SRV6} 53")
    tell(udp, "send")  # Udp6OutDatagrams, in snmp6
    rows, stats = host.same_as_full()
    assert not stats[rc1].quiet
    assert [row[3] for row in rows_of(rows, udp.pid)] == [17]


def test_a_new_namespace_and_a_gone_one(host: Host) -> None:
    host.hold("rc1", SRV4)
    gone = host.hold("rc2", SRV4)
    host.same_as_full()
    fresh = host.net.namespace("rc3")
    link(host.net, host.srv, fresh, 3)
    host.clients["rc3"] = fresh
    newcomer = host.hold("rc3", SRV6)
    rows, stats = host.same_as_full()
    assert len(rows_of(rows, newcomer.pid)) == 1
    assert not stats[fresh.inode].reused

    old = host.clients.pop("rc2")
    old_inode = old.inode
    host.net.kill(gone)
    host.net.namespaces.remove(old)
    subprocess.run(["ip", "netns", "del", old.name], check=True)  # ours, by name
    rows, stats = host.sample()
    assert old_inode not in stats and all(row[0] != old_inode for row in rows)
    assert old_inode not in host.sampler.reuse  # forgotten with its namespace
