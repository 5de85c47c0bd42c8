"""The test host: a server network namespace on veth links, and a second client namespace.

Layout for ``Topology(prefix="eab", net=213)`` (``N`` is ``net``, ``X`` is ``net`` in hex)::

    host netns             eab-srv netns                   eab-cli2 netns
    eab-h0 10.N.0.1   <->  eab-s0 10.N.0.2
           fd00:X::1              fd00:X::2
                           eab-s2 10.N.2.2            <->  eab-c2 10.N.2.1
                                  fd00:X:2::2                     fd00:X:2::1
                           lo: the server addresses
                               internal 10.N.1.1-4, fd00:X:1::1-4
                               global   8.8.8.(N-112), 8.8.8.(N-111), 2001:4860:X::1-2

The server addresses sit on ``lo`` of the server namespace; the host namespace reaches them
through routes via its veth end (the global ones as /32 and /128 host routes only, so no other
traffic of this machine is diverted), the client namespace through its default route.  Nothing
leaves these namespaces: the global addresses exist only inside the server namespace.  Two
topologies with different prefixes and nets (the benchmark's and the smoke test's) coexist.

Teardown deletes the namespaces and the host veth end by name; routes go with the device.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from typing import List, Tuple

SERVER_PORTS = (8000, 8001, 8002, 8003)


class TopologyError(RuntimeError):
    """A namespace, link or address could not be set up (the message names the command)."""


@dataclass(frozen=True)
class Topology:
    """Names and addresses of everything this test host creates.

    ``prefix`` names the namespaces and links (interface names stay within 15 bytes for a
    prefix of up to 11); ``net`` (113-254) picks the addresses.
    """

    prefix: str = "eab"
    net: int = 213

    def __post_init__(self) -> None:
        if not 113 <= self.net <= 254 or len(self.prefix) > 11:
            raise TopologyError(f"topology {self.prefix!r}/{self.net}: prefix <= 11, 113 <= net")

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}-srv"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-cli2"

    @property
    def host_link(self) -> str:
        return f"{self.prefix}-h0"

    @property
    def namespaces(self) -> Tuple[str, str]:
        return (self.server_ns, self.client_ns)

    @staticmethod
    def netns_path(name: str) -> str:
        """Where ``ip netns add`` pins a namespace; opened for ``setns(2)``."""
        return f"/run/netns/{name}"

    def _v4(self, subnet: int, host: int) -> str:
        return f"10.{self.net}.{subnet}.{host}"

    def _v6(self, subnet: int, host: int) -> str:
        return f"fd00:{self.net:x}:{subnet:x}::{host:x}"

    @property
    def internal_v4(self) -> Tuple[str, ...]:
        return tuple(self._v4(1, h) for h in range(1, 5))

    @property
    def internal_v6(self) -> Tuple[str, ...]:
        return tuple(self._v6(1, h) for h in range(1, 5))

    @property
    def external_v4(self) -> Tuple[str, ...]:
        """Global unicast (outside every IANA special-purpose block): external."""
        return (f"8.8.8.{self.net - 112}", f"8.8.8.{self.net - 111}")

    @property
    def external_v6(self) -> Tuple[str, ...]:
        return (f"2001:4860:{self.net:x}::1", f"2001:4860:{self.net:x}::2")

    def server_addresses(self) -> List[str]:
        return [*self.internal_v4, *self.internal_v6, *self.external_v4, *self.external_v6]


def _ip(*args: str, netns: str = "") -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _sysctl(netns: str, key: str, value: str) -> None:
    argv = ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _host_route(address: str) -> str:
    return f"{address}/{ipaddress.ip_address(address).max_prefixlen}"


def _address_link(netns: str, dev: str, v4: str, v6: str) -> None:
    _ip("addr", "add", v4, "dev", dev, netns=netns)
    _ip("addr", "add", v6, "dev", dev, "nodad", netns=netns)
    _ip("link", "set", dev, "up", netns=netns)


def build(topo: Topology) -> None:
    """Create the namespaces, links, addresses and routes; tears down what exists first."""
    teardown(topo)
    srv, cli, p = topo.server_ns, topo.client_ns, topo.prefix
    gw4, gw6 = topo._v4(0, 2), topo._v6(0, 2)
    try:
        for ns in topo.namespaces:
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "add", topo.host_link, "type", "veth", "peer", "name", f"{p}-s0", "netns", srv)
        _ip("link", "add", f"{p}-c2", "netns", cli, "type", "veth",
            "peer", "name", f"{p}-s2", "netns", srv)  # fmt: skip
        _address_link("", topo.host_link, f"{topo._v4(0, 1)}/24", f"{topo._v6(0, 1)}/64")
        _address_link(srv, f"{p}-s0", f"{gw4}/24", f"{gw6}/64")
        _address_link(srv, f"{p}-s2", f"{topo._v4(2, 2)}/24", f"{topo._v6(2, 2)}/64")
        _address_link(cli, f"{p}-c2", f"{topo._v4(2, 1)}/24", f"{topo._v6(2, 1)}/64")
        for address in topo.server_addresses():
            _ip("addr", "add", _host_route(address), "dev", "lo", "nodad", netns=srv)
        _ip("route", "add", f"{topo._v4(1, 0)}/24", "via", gw4, "dev", topo.host_link)
        _ip("-6", "route", "add", f"{topo._v6(1, 0)}/64", "via", gw6, "dev", topo.host_link)
        for address in (*topo.external_v4, *topo.external_v6):
            gateway = gw6 if ":" in address else gw4
            _ip("route", "add", _host_route(address), "via", gateway, "dev", topo.host_link)
        _ip("route", "add", "default", "via", topo._v4(2, 2), netns=cli)
        _ip("-6", "route", "add", "default", "via", topo._v6(2, 2), netns=cli)
        # Connections that are never accepted sit in the listen queue (no fd on the server side).
        _sysctl(srv, "net.core.somaxconn", "65535")
        _sysctl(srv, "net.ipv4.tcp_max_syn_backlog", "65535")
    except BaseException:
        teardown(topo)
        raise


def extra_namespace(topo: Topology, index: int) -> str:
    """The name of the ``index``-th namespace of a scale with many (``PREFIX-nNNN``)."""
    return f"{topo.prefix}-n{index:03d}"


def _listed_extras(topo: Topology) -> List[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    prefix = f"{topo.prefix}-n"
    return [
        name
        for name in (line.split(" ")[0] for line in listed.stdout.splitlines())
        if name.startswith(prefix) and name[len(prefix) :].isdigit()
    ]


def build_extras(topo: Topology, count: int) -> List[str]:
    """``count`` more namespaces, each with its loopback up and every server address on it
    (a client there reaches a server of its own namespace: no link, no route); their names.
    One ``ip -batch`` per namespace."""
    names = [extra_namespace(topo, index) for index in range(count)]
    try:
        for name in names:
            _ip("netns", "add", name)
            lines = ["link set lo up"] + [
                f"addr add {_host_route(address)} dev lo" + (" nodad" if ":" in address else "")
                for address in topo.server_addresses()
            ]
            done = subprocess.run(
                ["ip", "-n", name, "-batch", "-"],
                input="\n".join(lines) + "\n",
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise TopologyError(f"ip -n {name} -batch: {done.stderr.strip()}")
    except BaseException:
        teardown(topo)
        raise
    return names


def teardown(topo: Topology) -> List[str]:
    """Delete the host link and the namespaces by name (the extra ones too); returns what was
    removed."""
    removed = []
    for argv in (
        ["link", "del", topo.host_link],
        *(["netns", "del", ns] for ns in (*topo.namespaces, *_listed_extras(topo))),
    ):
        done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            removed.append(argv[-1])
    return removed


def leftovers(topo: Topology) -> List[str]:
    """This topology's namespaces and host link that still exist (empty after a teardown)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    found = [ns for ns in topo.namespaces if ns in listed.stdout.split()] + _listed_extras(topo)
    link = subprocess.run(
        ["ip", "link", "show", topo.host_link], capture_output=True, text=True, check=False
    )
    if link.returncode == 0:
        found.append(topo.host_link)
    return found
