"""Churn: samples taken while 200 short-lived processes a second open and close connections.

A test host: a server namespace with a dual-stack listener that holds its connections and a
"sink" that accepts and closes at once; a client namespace and a second one.  Long-lived
clients hold TCP connections over IPv6, IPv4 and IPv4-mapped IPv6, a UDP flow, and one from
the second namespace.  Meanwhile a churn process in the client namespace forks 200 children a
second for 12 seconds; each dials the sink (external, global IPv6), waits 50 milliseconds,
closes and exits, so sockets, fds, pids and process identities come and go under the sampler
all the time, and thousands of TIME_WAIT sockets pile up on the server side.

Every sample in that window must return without raising, and report every long-lived
connection exactly once with its owner; every other sample is restricted to one long-lived
client's pid (osquery's ``WHERE pid = N``) and must report exactly that client's connection.
The test is bounded: the churn runs for a fixed time, then everything is torn down.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from nethost import NetHost, Proc

from agent.classify import Classifier
from agent.collect.sockets.sampler import LinuxSampler
from agent.records import Connection

PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "c"
SRV6, CLI6, CLI6B = "2a0e:4a00:9::1", "2a0e:4a00:9::2", "2a0e:4a00:a::2"
SRV6B = "2a0e:4a00:a::1"
SRV4, CLI4 = "9.9.6.1", "9.9.6.2"
CHURN_RATE = 200
CHURN_SECONDS = 12
CHURN_HOLD_MS = 50
HELPER = str(Path(__file__).with_name("hostile_procs.py"))

LongLived = Tuple[int, int, int, int]
"""(namespace inode, protocol, local port, owner pid)"""


class Host:
    def __init__(self, net: NetHost) -> None:
        self.net = net
        self.srv = srv = net.namespace("srv")
        self.cli = cli = net.namespace("cli")
        self.cli2 = cli2 = net.namespace("cli2")
        net.veth(srv, "s0", cli, "c0")
        net.veth(srv, "s1", cli2, "c1")
        srv.add_address(f"{PREFIX}-s0", SRV6 + "/64")
        srv.add_address(f"{PREFIX}-s0", SRV4 + "/24")
        srv.add_address(f"{PREFIX}-s1", SRV6B + "/64")
        cli.add_address(f"{PREFIX}-c0", CLI6 + "/64")
        cli.add_address(f"{PREFIX}-c0", CLI4 + "/24")
        cli2.add_address(f"{PREFIX}-c1", CLI6B + "/64")
        server = net.listen(srv, "::", dualstack=True)
        udp = net.listen(srv, "::", proto="udp", dualstack=True)
        self.sink = net.spawn(srv, [sys.executable, HELPER, "sink", SRV6], ready=True)
        self.clients: List[Tuple[Proc, int, int]] = [
            (net.connect(cli, SRV6, server.port), cli.inode, 6),
            (net.connect(cli, SRV4, server.port), cli.inode, 6),
            (net.connect(cli, "::ffff:" + SRV4, server.port), cli.inode, 6),
            (net.connect(cli, SRV6, udp.port, proto="udp"), cli.inode, 17),
            (net.connect(cli2, SRV6B, server.port), cli2.inode, 6),
        ]

    def long_lived(self) -> Dict[LongLived, Proc]:
        return {
            (namespace, protocol, proc.local_port, proc.pid): proc
            for proc, namespace, protocol in self.clients
        }

    def start_churn(self) -> Proc:
        argv = [sys.executable, HELPER, "churn", SRV6, str(self.sink.port)]
        argv += [str(CHURN_RATE), str(CHURN_SECONDS), str(CHURN_HOLD_MS)]
        return self.net.spawn(self.cli, argv, ready=True)


@pytest.fixture
def host() -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs and every /proc/PID/fd")
    with NetHost(PREFIX) as net:
        yield Host(net)


def _done(churn: Proc) -> List[str]:
    """The churn process's ``DONE FORKED FAILED`` words once it has finished, else []."""
    line = churn.line(0)
    if line is not None and line.startswith("DONE"):
        return line.split()[1:]
    assert line is not None or churn.popen.poll() is None, "the churn process died: " + (
        churn.popen.stderr.read() if churn.popen.stderr else ""
    )
    return []


def _long_lived_rows(rows: List[Connection], host: Host) -> Dict[LongLived, int]:
    namespaces = {host.cli.inode, host.cli2.inode}
    counts: Dict[LongLived, int] = {}
    for row in rows:
        if row.net_namespace in namespaces and row.remote_port != host.sink.port:
            key = (row.net_namespace or 0, row.protocol, row.local_port, row.pid)
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_every_long_lived_connection_in_every_sample_while_processes_churn(host: Host) -> None:
    sampler = LinuxSampler(Classifier())
    expected = host.long_lived()
    restricted_client = host.clients[0][0]
    churn = host.start_churn()
    samples = restricted = churn_rows = churn_ownerless = 0
    done: List[str] = []
    while not done:
        rows = sampler.sample()
        samples += 1
        assert _long_lived_rows(rows, host) == dict.fromkeys(expected, 1), f"sample {samples}"
        for row in rows:
            if row.remote_port == host.sink.port and row.net_namespace == host.cli.inode:
                # outbound while its process holds it; once the process is gone, unknown
                assert row.direction == ("outbound" if row.pid > 0 else "unknown")
                churn_rows += row.pid > 0
                churn_ownerless += row.pid < 0
        mine = sampler.sample(pids=[restricted_client.pid])
        restricted += 1
        assert [(r.pid, r.local_port) for r in mine] == [
            (restricted_client.pid, restricted_client.local_port)
        ]
        done = _done(churn)
    forked, failed = int(done[0]), int(done[1])
    print(
        f"churn: {forked} processes in {CHURN_SECONDS} s ({forked / CHURN_SECONDS:.0f}/s, "
        f"{failed} failed to connect); {samples} full and {restricted} pid-restricted samples, "
        f"{churn_rows} rows of short-lived connections with an owner, {churn_ownerless} without"
    )
    assert samples >= 3 and forked > 0
    assert churn_rows + churn_ownerless > 0  # the samples did overlap the churn
    assert sampler.identities.max_entries >= len(sampler.identities)
