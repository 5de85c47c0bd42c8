"""Test hosts with DNS servers of their own: a server namespace answering zones over UDP and TCP,
client namespaces with a stub that sends queries, and an "internet" listener on the answers'
addresses.  Used by tests/test_dnswatch.py and tests/test_names_end_to_end.py (the fixture
``dns_host`` is offered to every test through conftest.py).

Topology (``$NETHOST_PREFIX``-named namespaces; nothing leaves them)::

    cli1 10.53.1.2, fd53:1::2  <-> s1  srv  s2 <->  10.53.2.2 cli2
                                   10.53.1.1, fd53:1::1: a DNS server (zone ONE)
                                   10.53.2.1: another DNS server (zone TWO)
                                   lo: 151.101.2.132, 151.101.66.132, 2a04:4e42::644
                                       (the "internet": one TCP listener on all of them)
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
from nethost import Namespace, NetHost, Proc

from agent.collect.dns.cache import NameCache
from agent.collect.dns.watch import DnsWatch

FASTLY = "debian.map.fastly.net"
ONE = {
    "deb.debian.org": {
        "cnames": [FASTLY],
        "a": ["151.101.2.132"],
        "aaaa": ["2a04:4e42::644"],
        "ttl": 300,
    },
    "big.test": {"tc": True, "a": ["151.101.66.132"], "cnames": ["large.cdn.test"]},
}
TWO = {"deb.debian.org": {"cnames": [FASTLY], "a": ["151.101.66.132"]}}
WEB = ("151.101.2.132/32", "151.101.66.132/32", "2a04:4e42::644/128")


def address(text: str) -> Tuple[int, int]:
    parsed = ipaddress.ip_address(text)
    return parsed.version, int(parsed)


class LateWatch:
    """Stands in for a DnsWatch whose thread has not read an answer yet (the race
    ``DnsWatch.catch_up`` exists for cannot be timed from a test): catching up reads it,
    ``name`` for the IPv4 ``answer`` in ``namespace``, into ``cache``; counted."""

    def __init__(self, cache: NameCache, namespace: int, answer: str, name: str) -> None:
        self.cache, self.namespace, self.name = cache, namespace, name
        self.version, self.value = address(answer)
        self.catch_ups = 0

    def catch_up(self, timeout: float) -> bool:
        self.catch_ups += 1
        self.cache.add(self.namespace, self.version, self.value, (self.name,), 300)
        return True


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


@dataclass
class DnsHost:
    net: NetHost
    srv: Namespace
    clients: List[Namespace]
    stubs: List[Proc]
    servers: List[Proc]
    web_port: int
    watches: List[DnsWatch] = field(default_factory=list)

    def watch(self, cache: Optional[NameCache] = None, **options: float) -> DnsWatch:
        """A started watch that sees our namespaces (stopped when the test ends)."""
        watch = DnsWatch(NameCache() if cache is None else cache, **options)
        self.watches.append(watch)
        assert watch.start(), watch.unavailable
        watch.rescan()
        for namespace in (self.srv, *self.clients):
            wait_for(lambda n=namespace: n.inode in watch.watched(), f"{namespace.name} watched")
        return watch

    def add_client(self, short: str, subnet: int) -> Tuple[Namespace, Proc]:
        client = self.net.namespace(short)
        self.net.veth(self.srv, f"s{subnet}", client, f"c{subnet}")
        self.srv.add_address(self.net.name(f"s{subnet}"), f"10.53.{subnet}.1/24")
        self.srv.add_address(self.net.name(f"s{subnet}"), f"fd53:{subnet}::1/64")
        client.add_address(self.net.name(f"c{subnet}"), f"10.53.{subnet}.2/24")
        client.add_address(self.net.name(f"c{subnet}"), f"fd53:{subnet}::2/64")
        client.ip("route", "add", "default", "via", f"10.53.{subnet}.1")
        client.ip("-6", "route", "add", "default", "via", f"fd53:{subnet}::1")
        stub = self.net.spawn(client, [sys.executable, "-m", "bench.dnsload", "stub"], ready=True)
        return client, stub

    def serve(self, namespace: Namespace, where: str, zone: object, port: int = 53) -> Proc:
        argv = [sys.executable, "-m", "bench.dnsload", "serve", where, json.dumps(zone)]
        argv += [] if port == 53 else [str(port)]
        server = self.net.spawn(namespace, argv, ready=True)
        self.servers.append(server)
        return server


def resolve(stub: Proc, server: str, name: str, kind: str = "a") -> Tuple[str, List[str]]:
    """(transport, addresses) as the stub in a client namespace got them."""
    assert stub.popen.stdin is not None
    stub.popen.stdin.write(f"resolve {server} {name} {kind}\n")
    stub.popen.stdin.flush()
    line = stub.line(10)
    assert line is not None, f"no answer from the stub for {name}"
    words = line.split()
    assert words and words[0] == "ANSWER", words
    return words[1], words[2:]


@pytest.fixture
def dns_host(nethost: NetHost) -> Iterator[DnsHost]:
    srv = nethost.namespace("srv")
    for cidr in WEB:
        srv.ip("address", "add", cidr, "dev", "lo")
    host = DnsHost(nethost, srv, [], [], [], 0)
    for subnet in (1, 2):
        client, stub = host.add_client(f"cli{subnet}", subnet)
        host.clients.append(client)
        host.stubs.append(stub)
    host.serve(srv, "10.53.1.1", ONE)
    host.serve(srv, "fd53:1::1", ONE)
    host.serve(srv, "10.53.2.1", TWO)
    host.web_port = nethost.listen(srv, "::", dualstack=True).port
    try:
        yield host
    finally:
        for watch in host.watches:  # before the namespaces go: a socket keeps one alive
            watch.close()
