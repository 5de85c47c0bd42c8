"""The live table's rows from real records: the encoded path gives what ``string_row`` gave.

A test host of two namespaces joined by a veth pair: "internet" servers (2a0e:4a00:16::1 and
9.9.16.1, which exist only inside these namespaces) and clients over TCP (IPv4, IPv6,
IPv4-mapped) and UDP.  The real sampler samples their pids; its records are turned into rows
the old way (``table.string_row`` and the generated Thrift writer) and the new way
(``wire.RowEncoder`` and ``wire.call_reply``), cold and from kept rows, and the bytes compared.
"""

from __future__ import annotations

import os
from typing import Dict, List

import pytest
from nethost import NetHost, Proc
from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus
from osquery_core import generated_call_reply

from agent.classify import Classifier
from agent.collect.sockets.sampler import LinuxSampler as Sampler
from agent.osquery import external_connections, table, wire
from agent.records import Connection

SERVER6, CLIENT6 = "2a0e:4a00:16::1", "2a0e:4a00:16::2"
SERVER4, CLIENT4 = "9.9.16.1", "9.9.16.2"
LIVE = external_connections.SPEC.column_names

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, veth pairs, every /proc/PID/fd"
)


def old_reply(rows: List[Dict[str, str]]) -> bytes:
    status = ExtensionStatus(code=0, message="OK")
    return generated_call_reply(1, ExtensionResponse(status=status, response=rows))


def new_reply(rows: wire.EncodedRows) -> bytes:
    status = ExtensionStatus(code=0, message="OK")
    return wire.call_reply(1, ExtensionResponse(status=status, response=rows)).data()


def test_rows_of_a_real_sample_are_the_same_bytes(nethost: NetHost) -> None:
    srv, cli = nethost.namespace("srv"), nethost.namespace("cli")
    nethost.veth(srv, "s0", cli, "c0")
    srv.add_address(nethost.name("s0"), f"{SERVER6}/64")
    srv.add_address(nethost.name("s0"), f"{SERVER4}/24")
    cli.add_address(nethost.name("c0"), f"{CLIENT6}/64")
    cli.add_address(nethost.name("c0"), f"{CLIENT4}/24")
    tcp = nethost.listen(srv, "::", dualstack=True)
    udp = nethost.listen(srv, SERVER4, proto="udp")
    procs: List[Proc] = [tcp, udp]
    for address in (SERVER6, SERVER4, "::ffff:" + SERVER4):
        procs += [nethost.connect(cli, address, tcp.port) for _ in range(3)]
    procs.append(nethost.connect(cli, SERVER4, udp.port, proto="udp"))

    sampler = Sampler(Classifier())
    pids = frozenset(proc.pid for proc in procs)
    first = [c for c in sampler.sample(pids=pids) if c.pid in pids]
    assert len({c.pid for c in first}) >= 10  # every client and the TCP server
    assert {c.family for c in first} == {2, 10} and {c.protocol for c in first} == {6, 17}
    assert any(c.embedded_ipv4 for c in first) and any(c.fd is not None for c in first)

    old = [table.string_row(c.as_dict(), LIVE) for c in first]
    encoder = wire.RowEncoder(LIVE)
    cold = encoder.encode_records(first, remember=True)
    assert list(cold) == old
    assert new_reply(cold) == old_reply(old)

    second: List[Connection] = [c for c in sampler.sample(pids=pids) if c.pid in pids]
    assert second and all(a is not b for a, b in zip(first, second))  # fresh records
    warm = encoder.encode_records(second, remember=True)
    old_second = [table.string_row(c.as_dict(), LIVE) for c in second]
    assert list(warm) == old_second
    assert new_reply(warm) == old_reply(old_second)
    reused = set(map(id, cold.chunks)) & set(map(id, warm.chunks))
    assert len(reused) >= len(second) // 2  # the long-lived connections' rows were kept
