"""The sampler on real sockets in test hosts, on a /proc laid out on disk, and against psutil.

The scenario: a server namespace with listeners on a global IPv6, a global IPv4, a unique-local
IPv6 and a dual-stack ``::`` address, and a client namespace on the other end of a veth pair
whose processes dial each of them (one from an AF_INET6 socket to an IPv4-mapped address, one
over link-local, one over UDP, one that hangs up at once); two more clients in the server
namespace use loopback.  Every address lives only inside the two namespaces.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import psutil
import pytest
from conftest import needs_root, run_as_nobody
from nethost import NetHost, Proc

from agent.cgroups import placement
from agent.classify import Classifier
from agent.collect import Sampler, SamplerError
from agent.collect.netns import namespace_of
from agent.collect.sockets.procnet import Ends, SocketTable, encode_address
from agent.collect.sockets.sampler import LinuxSampler
from agent.collect.sockets.sockdiag import DiagSocket
from agent.records import Connection

SRV6, CLI6 = "2001:4860:4860::8888", "2001:4860:4860::2"
SRV4, CLI4 = "9.9.9.9", "9.9.9.10"
SRV_ULA, CLI_ULA = "fd5e:a5a5::1", "fd5e:a5a5::2"
MAPPED_SRV4, MAPPED_CLI4 = "::ffff:9.9.9.9", "::ffff:9.9.9.10"
PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
CLASSIFIER = Classifier()

Key = Tuple[int, int, int, int, str, int, str]
"""(net_namespace, pid, protocol, local_port, remote_address, remote_port, direction)"""


def key(row: Connection) -> Key:
    assert row.net_namespace is not None
    return (
        row.net_namespace,
        row.pid,
        row.protocol,
        row.local_port,
        row.remote_address,
        row.remote_port,
        row.direction,
    )


class Scenario:
    def __init__(self, net: NetHost) -> None:
        self.net = net
        self.srv = srv = net.namespace("srv")
        self.cli = cli = net.namespace("cli")
        net.veth(srv, "s0", cli, "c0")
        for address in (SRV6 + "/64", SRV4 + "/24", SRV_ULA + "/64"):
            srv.add_address(f"{PREFIX}-s0", address)
        for address in (CLI6 + "/64", CLI4 + "/24", CLI_ULA + "/64"):
            cli.add_address(f"{PREFIX}-c0", address)
        self.l6 = net.listen(srv, SRV6)
        self.l4 = net.listen(srv, SRV4)
        self.l_ula = net.listen(srv, SRV_ULA)
        self.l_dual = net.listen(srv, "::", dualstack=True)
        self.l_udp = net.listen(srv, SRV4, proto="udp")
        self.l_hangup = net.listen(srv, SRV4)
        self.c6 = net.connect(cli, SRV6, self.l6.port)
        self.c4 = net.connect(cli, SRV4, self.l4.port)
        self.c_mapped = net.connect(cli, MAPPED_SRV4, self.l4.port)
        self.c_ula = net.connect(cli, SRV_ULA, self.l_ula.port)
        self.c_dual4 = net.connect(cli, SRV4, self.l_dual.port)
        self.c_dual6 = net.connect(cli, SRV6, self.l_dual.port)
        self.link_local = srv.link_local(f"{PREFIX}-s0")
        self.c_link = net.connect(cli, f"{self.link_local}%{PREFIX}-c0", self.l_dual.port)
        self.c_udp = net.connect(cli, SRV4, self.l_udp.port, proto="udp")
        # the orphaned client end lives tcp_fin_timeout (at most 120 s, include/net/tcp.h)
        cli.run(["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=120"])
        self.c_hangup = net.connect(cli, SRV4, self.l_hangup.port, close=True)
        self.c_loop6 = net.connect(srv, "::1", self.l_dual.port)
        self.c_loop4 = net.connect(srv, "127.0.0.1", self.l_dual.port)
        self.namespaces = {srv.inode, cli.inode}

    def expected_external(self, inbound: str = "inbound") -> Set[Key]:
        """The external connections; an accepted one reads ``inbound``, or ``unknown`` where
        the kernel was not asked which end opened it (the ``/proc`` text has no
        ``tcp_info``: a connect from a listening port would read the same)."""
        srv, cli = self.srv.inode, self.cli.inode
        out = "outbound"
        return {
            (cli, self.c6.pid, 6, self.c6.local_port, SRV6, self.l6.port, out),
            (cli, self.c4.pid, 6, self.c4.local_port, SRV4, self.l4.port, out),
            (cli, self.c_mapped.pid, 6, self.c_mapped.local_port, MAPPED_SRV4, self.l4.port, out),
            (cli, self.c_dual4.pid, 6, self.c_dual4.local_port, SRV4, self.l_dual.port, out),
            (cli, self.c_dual6.pid, 6, self.c_dual6.local_port, SRV6, self.l_dual.port, out),
            (cli, self.c_udp.pid, 17, self.c_udp.local_port, SRV4, self.l_udp.port, out),
            # an orphan: no owner, no listener of its namespace: which way it went is unknown
            (cli, -1, 6, self.c_hangup.local_port, SRV4, self.l_hangup.port, "unknown"),
            (srv, self.l6.pid, 6, self.l6.port, CLI6, self.c6.local_port, inbound),
            (srv, self.l4.pid, 6, self.l4.port, CLI4, self.c4.local_port, inbound),
            (srv, self.l4.pid, 6, self.l4.port, CLI4, self.c_mapped.local_port, inbound),
            (
                srv,
                self.l_dual.pid,
                6,
                self.l_dual.port,
                MAPPED_CLI4,
                self.c_dual4.local_port,
                inbound,
            ),
            (srv, self.l_dual.pid, 6, self.l_dual.port, CLI6, self.c_dual6.local_port, inbound),
            (
                srv,
                self.l_hangup.pid,
                6,
                self.l_hangup.port,
                CLI4,
                self.c_hangup.local_port,
                inbound,
            ),
        }

    def ours(self, rows: List[Connection]) -> List[Connection]:
        return [row for row in rows if row.net_namespace in self.namespaces]

    def procs(self) -> Dict[int, Proc]:
        return {proc.pid: proc for proc in self.net.procs}


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and veth pairs")
    with NetHost(PREFIX) as net:
        yield Scenario(net)


@pytest.fixture(params=[True, False], ids=["sock_diag", "proc"])
def use_sock_diag(request: pytest.FixtureRequest) -> bool:
    """Both ways of reading the socket tables: netlink sock_diag (filtered in the kernel) and
    the ``/proc/PID/net`` text; they agree on everything but what only ``tcp_info`` (asked
    through sock_diag) tells: which end opened a connection on a listening port."""
    return bool(request.param)


def accepted(use_sock_diag: bool) -> str:
    """The direction of a connection a listener accepted, as each way reads it."""
    return "inbound" if use_sock_diag else "unknown"


@needs_root
def test_external_connections_with_owner_namespace_and_direction(
    scenario: Scenario, use_sock_diag: bool
) -> None:
    sampler = LinuxSampler(CLASSIFIER, use_sock_diag=use_sock_diag)
    rows = scenario.ours(sampler.sample())
    assert sampler.last.backend == ("sock_diag" if use_sock_diag else "proc")
    assert {key(row) for row in rows} == scenario.expected_external(accepted(use_sock_diag))
    assert len(rows) == len(scenario.expected_external())
    assert all(row.external for row in rows)


@needs_root
def test_rows_carry_the_process_identity(scenario: Scenario) -> None:
    rows = scenario.ours(LinuxSampler(CLASSIFIER).sample())
    procs = scenario.procs()
    uuids = set()
    for row in rows:
        if row.pid == -1:
            continue
        proc = procs[row.pid]
        real = psutil.Process(row.pid)
        assert row.name == real.name()
        assert row.path == os.path.realpath(sys.executable)
        assert row.cmdline == " ".join(proc.argv[proc.argv.index(sys.executable) :])
        assert (
            "nethost.py " + ("listen" if row.direction == "inbound" else "connect") in row.cmdline
        )
        assert (row.uid, row.username) == (0, "root")
        assert row.parent == os.getpid()
        assert row.process_start_time == int(real.create_time())
        cgroup = Path(f"/proc/{row.pid}/cgroup").read_text()
        assert row.container_id == placement(cgroup).container_id
        assert row.systemd_unit == placement(cgroup).systemd_unit
        assert row.net_namespace == namespace_of(row.pid)
        assert os.readlink(f"/proc/{row.pid}/fd/{row.fd}") == f"socket:[{row.socket}]"
        uuids.add((row.pid, row.process_uuid))
    assert len({u for _, u in uuids}) == len({p for p, _ in uuids}) == 10


@needs_root
def test_columns_of_each_kind_of_row(scenario: Scenario) -> None:
    rows = {key(row): row for row in scenario.ours(LinuxSampler(CLASSIFIER).sample())}
    s, c = scenario.srv.inode, scenario.cli.inode
    v6 = rows[(c, scenario.c6.pid, 6, scenario.c6.local_port, SRV6, scenario.l6.port, "outbound")]
    assert (v6.family, v6.state, v6.local_address, v6.address_class) == (
        10,
        "ESTABLISHED",
        CLI6,
        "global",
    )
    assert v6.expanded_address == "2001:4860:4860:0000:0000:0000:0000:8888"
    assert v6.address_int == str(0x20014860486000000000000000008888)
    mapped = rows[
        (
            c,
            scenario.c_mapped.pid,
            6,
            scenario.c_mapped.local_port,
            MAPPED_SRV4,
            scenario.l4.port,
            "outbound",
        )
    ]
    assert (mapped.family, mapped.via, mapped.embedded_ipv4) == (10, "ipv4_mapped", SRV4)
    assert mapped.local_address == MAPPED_CLI4
    dual = rows[
        (
            s,
            scenario.l_dual.pid,
            6,
            scenario.l_dual.port,
            MAPPED_CLI4,
            scenario.c_dual4.local_port,
            "inbound",
        )
    ]
    assert (dual.family, dual.local_address, dual.via) == (10, MAPPED_SRV4, "ipv4_mapped")
    udp = rows[
        (
            c,
            scenario.c_udp.pid,
            17,
            scenario.c_udp.local_port,
            SRV4,
            scenario.l_udp.port,
            "outbound",
        )
    ]
    assert (udp.family, udp.state) == (2, "")
    orphan = rows[(c, -1, 6, scenario.c_hangup.local_port, SRV4, scenario.l_hangup.port, "unknown")]
    assert (orphan.fd, orphan.socket, orphan.name, orphan.cmdline, orphan.process_uuid) == (
        -1,
        0,
        "",
        "",
        "",
    )
    assert orphan.state in ("FIN_WAIT2", "TIME_WAIT")
    hung_up = rows[
        (
            s,
            scenario.l_hangup.pid,
            6,
            scenario.l_hangup.port,
            CLI4,
            scenario.c_hangup.local_port,
            "inbound",
        )
    ]
    assert hung_up.state == "CLOSE_WAIT"


@needs_root
def test_every_socket_when_asked_and_never_ula_link_local_or_loopback_as_external(
    scenario: Scenario, use_sock_diag: bool
) -> None:
    rows = scenario.ours(
        LinuxSampler(CLASSIFIER, use_sock_diag=use_sock_diag).sample(want_all=True)
    )
    by_class: Dict[str, List[Connection]] = collections.defaultdict(list)
    for row in rows:
        by_class[row.address_class].append(row)
    assert {k for k, _ in by_class.items()} >= {
        "global",
        "unique_local",
        "link_local",
        "loopback",
        "unspecified",
    }
    for category in ("unique_local", "link_local", "loopback", "unspecified"):
        assert not any(row.external for row in by_class[category]), category
    externals = {key(row) for row in rows if row.external}
    assert externals == scenario.expected_external(accepted(use_sock_diag))
    never = (SRV_ULA, CLI_ULA, scenario.link_local, "::1", "127.0.0.1", "::ffff:127.0.0.1")
    assert not [row for row in rows if row.external and row.remote_address in never]

    ula = [row for row in rows if row.address_class == "unique_local"]
    assert {(row.pid, row.direction) for row in ula} == {
        (scenario.c_ula.pid, "outbound"),
        (scenario.l_ula.pid, accepted(use_sock_diag)),
    }
    loop = [row for row in rows if row.address_class == "loopback"]
    assert {(row.pid, row.direction) for row in loop} == {
        (scenario.c_loop6.pid, "outbound"),
        (scenario.c_loop4.pid, "outbound"),
        (scenario.l_dual.pid, accepted(use_sock_diag)),
    }
    link = [row for row in rows if row.address_class == "link_local"]
    assert {(row.pid, row.direction) for row in link} == {
        (scenario.c_link.pid, "outbound"),
        (scenario.l_dual.pid, accepted(use_sock_diag)),
    }
    listening = [row for row in rows if row.state == "LISTEN"]
    assert {row.pid for row in listening} == {
        scenario.l6.pid,
        scenario.l4.pid,
        scenario.l_ula.pid,
        scenario.l_dual.pid,
        scenario.l_hangup.pid,
    }


@needs_root
def test_pid_filter_keeps_only_those_processes(scenario: Scenario, use_sock_diag: bool) -> None:
    sampler = LinuxSampler(CLASSIFIER, use_sock_diag=use_sock_diag)
    only = sampler.sample(pids=[scenario.c6.pid])
    assert [key(row) for row in only] == [
        (
            scenario.cli.inode,
            scenario.c6.pid,
            6,
            scenario.c6.local_port,
            SRV6,
            scenario.l6.port,
            "outbound",
        )
    ]
    assert sampler.last.namespaces == 1 and sampler.last.pids_scanned == 1
    everything = sampler.sample(want_all=True, pids=[scenario.l_dual.pid])
    assert {row.pid for row in everything} == {scenario.l_dual.pid}
    assert len(everything) == 1 + 5  # the listener and five accepted connections
    assert sampler.sample(pids=[scenario.c_ula.pid]) == []


@needs_root
def test_stats_and_a_warm_second_sample(scenario: Scenario, use_sock_diag: bool) -> None:
    sampler = LinuxSampler(CLASSIFIER, use_sock_diag=use_sock_diag)
    first = {key(row) for row in scenario.ours(sampler.sample())}
    cold = sampler.last
    second = {key(row) for row in scenario.ours(sampler.sample())}
    warm = sampler.last
    assert first == second == scenario.expected_external(accepted(use_sock_diag))
    assert cold.wanted >= 13 and cold.rows >= 13 and cold.ownerless >= 1
    assert cold.processes >= 10 and cold.namespaces >= 3
    assert cold.sockets >= cold.wanted and cold.fds_scanned > 0
    # the second sample knew our processes already (the fd scan's cost is host-wide: bench/)
    assert sampler.identities.hits >= 10
    namespaces = {n.inode: n for n in warm.per_namespace}
    cli, srv = namespaces[scenario.cli.inode], namespaces[scenario.srv.inode]
    assert cli.active_opens == 8  # eight TCP connects from the client namespace
    assert srv.active_opens == 2  # the two loopback clients
    assert srv.listeners >= 5 and cli.sockets >= 9
    assert not sampler.limited


@needs_root
def test_outbound_tcp_ends_match_the_kernels_active_opens(
    scenario: Scenario, use_sock_diag: bool
) -> None:
    """Every TCP connection this host opened, external or not, is counted once: in each
    namespace as many as the kernel's ActiveOpens (nothing closed during the scenario)."""
    sampler = LinuxSampler(CLASSIFIER, count_outbound_tcp=True, use_sock_diag=use_sock_diag)
    sampler.sample()
    stats = sampler.last
    assert stats.outbound_tcp is not None
    assert len(stats.outbound_tcp) == sum(n.outbound_tcp or 0 for n in stats.per_namespace)
    for namespace in stats.per_namespace:
        if namespace.inode in scenario.namespaces:
            assert namespace.outbound_tcp == namespace.active_opens, namespace
    plain = LinuxSampler(CLASSIFIER)
    plain.sample()
    assert plain.last.outbound_tcp is None


@needs_root
def test_which_end_opened_is_asked_once_a_socket(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``tcp_info`` dump (:meth:`DiagSocket.openers`, counted here, the real one still
    called) is made for sockets not told before: a second sample of the server's namespace,
    after a connection that moved its counters, asks nothing and reads the same directions."""
    calls: List[str] = []
    real = DiagSocket.openers

    def counting(self: DiagSocket, table: SocketTable, program: bytes) -> Dict[Ends, bool]:
        calls.append(table.name)
        return real(self, table, program)

    monkeypatch.setattr(DiagSocket, "openers", counting)
    sampler = LinuxSampler(CLASSIFIER)
    server = [scenario.l4.pid]  # narrowed to the server's namespace: hermetic

    def directions() -> Set[Tuple[int, str]]:
        return {(row.remote_port, row.direction) for row in sampler.sample(pids=server)}

    first = directions()
    assert first and {direction for _, direction in first} == {"inbound"}
    asked = len(calls)
    assert asked >= 1
    extra = scenario.net.connect(scenario.srv, "127.0.0.1", scenario.l_dual.port)  # ActiveOpens
    try:
        assert directions() == first
        assert len(calls) == asked, calls
    finally:
        scenario.net.kill(extra)


@needs_root
def test_psutil_backend_agrees_inside_a_namespace(scenario: Scenario) -> None:
    """psutil sees only its own namespace, so it runs inside the client namespace."""
    script = (
        "import json; from agent.classify import Classifier;"
        "from agent.collect.sockets.psutil_backend import PsutilSampler;"
        "rows = PsutilSampler(Classifier()).sample();"
        "print(json.dumps([r.as_dict() for r in rows]))"
    )
    out = scenario.cli.run([sys.executable, "-c", script])
    theirs = [Connection(**row) for row in json.loads(out)]
    mine = [r for r in LinuxSampler(CLASSIFIER).sample() if r.net_namespace == scenario.cli.inode]
    columns = [
        "pid",
        "name",
        "cmdline",
        "protocol",
        "family",
        "state",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "direction",
        "address_class",
        "via",
        "embedded_ipv4",
        "net_namespace",
        "fd",
        "process_uuid",
    ]

    def view(rows: List[Connection]) -> Set[tuple]:  # type: ignore[type-arg]
        return {tuple(getattr(row, column) for column in columns) for row in rows}

    assert view(theirs) == view(mine)


# ---------------------------------------------------------------------------------------------
# a /proc laid out on disk: exact control over every row, no root needed

NOBODY = 4194400  # above the largest pid_max: never a live process


def tcp_line(
    local: Tuple[int, int, int], remote: Tuple[int, int, int], state: int, inode: int
) -> str:
    """A /proc/net/tcp[6] row; endpoints are (version, address, port)."""
    lv, la, lp = local
    rv, ra, rp = remote
    return (
        f"   0: {encode_address(la, lv)}:{lp:04X} {encode_address(ra, rv)}:{rp:04X} {state:02X}"
        f" 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000"
    )


def make_process(
    root: Path, pid: int, namespace: Optional[int], tables: Dict[str, List[str]]
) -> None:
    base = root / str(pid)
    (base / "ns").mkdir(parents=True)
    (base / "fd").mkdir()
    (base / "net").mkdir()
    if namespace is not None:
        os.symlink(f"net:[{namespace}]", base / "ns" / "net")
    for name, lines in tables.items():
        (base / "net" / name).write_text(
            "  sl  local_address rem_address   st\n" + "\n".join(lines)
        )
    (base / "net" / "snmp").write_text("Tcp: ActiveOpens PassiveOpens\nTcp: 12 3\n")


def ip4(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return a << 24 | b << 16 | c << 8 | d


def test_sampling_a_proc_tree_on_disk(tmp_path: Path) -> None:
    host, peer, dns = ip4("10.0.0.5"), ip4("9.9.9.9"), ip4("8.8.8.8")
    make_process(
        tmp_path,
        NOBODY,
        9001,
        {
            "tcp": [
                tcp_line((4, 0, 443), (4, 0, 0), 0x0A, 10),
                tcp_line((4, host, 443), (4, peer, 5555), 0x01, 100),
                "garbage",
                tcp_line((4, host, 40000), (4, dns, 53), 0x01, 101)[:30],  # truncated
                tcp_line((4, host, 40001), (4, dns, 53), 0x01, 101),
                tcp_line((4, host, 40002), (4, dns, 853), 0x06, 0),
                tcp_line((4, host, 40003), (4, ip4("192.168.1.1"), 80), 0x01, 102),
                tcp_line((4, host, 40004), (4, peer, 80), 0x0C, 103),
            ],
            "tcp6": [tcp_line((6, 0, 8443), (6, 0, 0), 0x0A, 11)],
            # no udp, udp6: as on a kernel without them
        },
    )
    os.symlink("socket:[100]", tmp_path / str(NOBODY) / "fd" / "3")
    os.symlink("socket:[101]", tmp_path / str(NOBODY) / "fd" / "4")
    make_process(
        tmp_path,
        NOBODY + 1,
        9002,
        {"tcp6": [tcp_line((6, 1 << 100, 1), (6, 0x2A << 120, 2), 1, 200)]},
    )
    make_process(tmp_path, NOBODY + 2, None, {})  # its namespace link is unreadable

    sampler = LinuxSampler(CLASSIFIER, proc_root=str(tmp_path))
    rows = sampler.sample()
    got = {
        (r.net_namespace, r.pid, r.fd, r.socket, r.local_port, r.remote_port, r.direction, r.state)
        for r in rows
    }
    assert got == {
        # on a listening port, and the /proc text cannot say which end opened it:
        (9001, NOBODY, 3, 100, 443, 5555, "unknown", "ESTABLISHED"),
        (9001, NOBODY, 4, 101, 40001, 53, "outbound", "ESTABLISHED"),
        (9001, -1, -1, 0, 40002, 853, "unknown", "TIME_WAIT"),
        (9001, -1, -1, 103, 40004, 80, "unknown", "UNKNOWN"),
        (9002, -1, -1, 200, 1, 2, "unknown", "ESTABLISHED"),
    }
    owned = [r for r in rows if r.pid == NOBODY]
    assert all(r.name == "" and r.process_uuid == "" for r in owned)  # no such live process
    stats = sampler.last
    assert stats.namespaces == 2 and list(stats.namespace_errors) == [NOBODY + 2]
    assert stats.sockets == 8 and stats.wanted == 5 and stats.ownerless == 3
    assert [n.active_opens for n in stats.per_namespace] == [12, 12]

    every = sampler.sample(want_all=True)
    assert {r.socket for r in every} == {10, 11, 100, 101, 0, 102, 103, 200}
    private = [r for r in every if r.socket == 102]
    assert private[0].address_class == "private" and not private[0].external
    listeners = [r for r in every if r.state == "LISTEN"]
    assert {(r.local_port, r.direction, r.family) for r in listeners} == {
        (443, "inbound", 2),
        (8443, "inbound", 10),
    }

    mine = sampler.sample(pids=[NOBODY])
    assert {r.socket for r in mine} == {100, 101}


def test_nothing_external_means_no_fd_scan(tmp_path: Path) -> None:
    make_process(
        tmp_path, NOBODY, 9001, {"tcp": [tcp_line((4, 1, 1), (4, ip4("127.0.0.1"), 2), 1, 5)]}
    )
    os.symlink("socket:[5]", tmp_path / str(NOBODY) / "fd" / "3")
    sampler = LinuxSampler(CLASSIFIER, proc_root=str(tmp_path))
    assert sampler.sample() == []
    assert sampler.last.owner_scan_skipped and sampler.last.fds_scanned == 0
    assert [r.pid for r in sampler.sample(want_all=True)] == [NOBODY]


# ---------------------------------------------------------------------------------------------
# the differential test: the sampler and psutil on the same moment's sockets

OwnerKey = Tuple[Optional[int], int, Optional[int], int, object]
"""(socket inode or None when ownerless, family, remote address or None, remote port, pid)"""


class Unstable(Exception):
    """A socket or process changed while we looked: try again."""


def socket_owners() -> Dict[int, Set[int]]:
    """Every process holding each socket inode (a socket may be shared after fork)."""
    owners: Dict[int, Set[int]] = collections.defaultdict(set)
    for pid in psutil.pids():
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners[int(link[8:-1])].add(pid)
    return owners


def psutil_view() -> collections.Counter:  # type: ignore[type-arg]
    view: collections.Counter = collections.Counter()  # type: ignore[type-arg]
    for conn in psutil.net_connections("inet"):
        inode = None
        if conn.pid is not None:
            try:
                link = os.readlink(f"/proc/{conn.pid}/fd/{conn.fd}")
            except OSError as error:
                raise Unstable(str(error)) from error
            if not link.startswith("socket:["):
                raise Unstable(link)
            inode = int(link[8:-1])
        family = 10 if conn.family == 10 else 2
        remote = int(CLASSIFIER.classify(conn.raddr.ip).address_int) if conn.raddr else None
        view[(inode, family, remote, conn.raddr.port if conn.raddr else 0, conn.pid or -1)] += 1
    return view


def sampler_view(rows: List[Connection], namespace: int) -> collections.Counter:  # type: ignore[type-arg]
    view: collections.Counter = collections.Counter()  # type: ignore[type-arg]
    for row in rows:
        if row.net_namespace != namespace:
            continue
        inode = row.socket if row.pid != -1 else None
        remote = int(row.address_int) if row.remote_port else None
        view[(inode, row.family, remote, row.remote_port, row.pid)] += 1
    return view


def shared_as_set(view: collections.Counter, owners: Dict[int, Set[int]]) -> collections.Counter:  # type: ignore[type-arg]
    """For a socket several processes hold, any of them is a right answer: compare the set."""
    out: collections.Counter = collections.Counter()  # type: ignore[type-arg]
    for (inode, family, remote, port, pid), count in view.items():
        holders = owners.get(inode) if inode is not None else None
        who: object = frozenset(holders) if holders and len(holders) > 1 and pid in holders else pid
        out[(inode, family, remote, port, who)] += count
    return out


@needs_root
def test_same_sockets_and_owners_as_psutil_in_the_root_namespace(nethost: NetHost) -> None:
    listener4 = nethost.listen(None, "127.0.0.1")
    listener6 = nethost.listen(None, "::1", dualstack=False)
    nethost.connect(None, "127.0.0.1", listener4.port)
    nethost.connect(None, "::ffff:127.0.0.1", listener4.port)
    nethost.connect(None, "::1", listener6.port)
    udp = nethost.listen(None, "127.0.0.1", proto="udp")
    nethost.connect(None, "127.0.0.1", udp.port, proto="udp")
    root = namespace_of(os.getpid())

    for _ in range(30):
        try:
            before = psutil_view()
            owners = socket_owners()
            rows = LinuxSampler(CLASSIFIER).sample(want_all=True)
            after = psutil_view()
        except Unstable:
            continue
        if before == after:
            break
    else:
        pytest.fail("the root namespace's sockets never held still for one sample")

    mine = sampler_view(rows, root)
    assert shared_as_set(mine, owners) == shared_as_set(before, owners)
    ours = {(k[4]) for k in mine}
    assert {listener4.pid, listener6.pid, udp.pid} <= ours


@needs_root
def test_not_root_sees_other_users_sockets_without_owner() -> None:
    """A forked child drops to nobody: root's socket shows, ownerless, and nothing raises.
    The parent samples first, so the child needs no module it has not got (the interpreter's
    files may be unreadable to nobody)."""
    LinuxSampler(CLASSIFIER).sample(want_all=True)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        inode = os.fstat(server.fileno()).st_ino

        def look() -> List[object]:
            server.close()  # only the parent (root) holds it now
            sampler = LinuxSampler(CLASSIFIER)
            rows = sampler.sample(want_all=True)
            mine = [(row.pid, row.fd) for row in rows if row.socket == inode]
            return [sampler.limited, mine, len(sampler.last.namespace_errors)]

        limited, mine, namespace_errors = run_as_nobody(look)
    assert limited
    assert mine == [[-1, -1]]
    assert namespace_errors > 0  # other users' /proc/PID/ns/net links are not readable


def test_no_proc_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SamplerError, match=r"cannot list the processes in .*psutil backend"):
        LinuxSampler(CLASSIFIER, proc_root=str(tmp_path / "missing")).sample()


def test_both_backends_are_socket_samplers() -> None:
    from agent.collect.sockets.psutil_backend import PsutilSampler

    samplers: List[Sampler] = [LinuxSampler(CLASSIFIER), PsutilSampler(CLASSIFIER)]
    assert all(isinstance(s.limited, bool) for s in samplers)


@needs_root
def test_outbound_tcp_is_recounted_only_when_active_opens_moved(nethost: NetHost) -> None:
    """A namespace whose ActiveOpens did not move keeps its last count (no connection can
    have been opened since); a connect moves it and the namespace is counted anew."""
    space = nethost.namespace("oc")
    space.ip("addr", "add", "10.77.0.1/24", "dev", "lo")
    listener = nethost.listen(space, "10.77.0.1")
    nethost.connect(space, "10.77.0.1", listener.port)
    sampler = LinuxSampler(CLASSIFIER, count_outbound_tcp=True)

    def counted() -> Tuple[Optional[int], Optional[int]]:
        sampler.sample()
        (mine,) = [n for n in sampler.last.per_namespace if n.inode == space.inode]
        return mine.outbound_tcp, mine.active_opens

    memo = sampler._outbound_memo
    assert counted() == (1, 1)
    first = memo.unchanged(space.inode, 1)
    assert first is not None and len(first) == 1
    assert counted() == (1, 1) and memo.unchanged(space.inode, 1) is first  # not recounted
    nethost.connect(space, "10.77.0.1", listener.port)
    assert counted() == (2, 2)
