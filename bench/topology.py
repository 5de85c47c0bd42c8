"""The test host: a server network namespace on veth links, and a second client namespace.

Layout (``P`` is the prefix, ``eab`` by default)::

    host netns            P-srv netns                    P-cli2 netns
    P-h0 10.213.0.1  <->  P-s0 10.213.0.2
         fd00:eab::1           fd00:eab::2
                              P-s2 10.213.2.2      <->   P-c2 10.213.2.1
                                   fd00:eab:2::2              fd00:eab:2::1
                          lo: the server addresses (internal and global)

The server addresses sit on ``lo`` of ``P-srv``; the host namespace reaches them through
per-prefix routes via ``P-h0`` (the global ones as /32 and /128 host routes only, so no other
traffic of this machine is diverted), the client namespace through its default route.  Nothing
leaves these namespaces: the global addresses exist only inside ``P-srv``.

Teardown deletes the namespaces and the host veth end by name; routes go with the device.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from typing import List, Sequence, Tuple

INTERNAL_V4 = ("10.213.1.1", "10.213.1.2", "10.213.1.3", "10.213.1.4")
INTERNAL_V6 = ("fd00:eab:1::1", "fd00:eab:1::2", "fd00:eab:1::3", "fd00:eab:1::4")
# Global unicast (not in the IANA special-purpose registries): "external" to the classifier.
EXTERNAL_V4 = ("8.8.8.101", "8.8.8.102")
EXTERNAL_V6 = ("2001:4860:ab::1", "2001:4860:ab::2")
SERVER_PORTS = (8000, 8001, 8002, 8003)


class TopologyError(RuntimeError):
    """A namespace, link or address could not be set up (the message names the command)."""


@dataclass(frozen=True)
class Topology:
    """Names of everything this test host creates; all derive from ``prefix``."""

    prefix: str = "eab"

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

    def server_addresses(self) -> List[str]:
        return [*INTERNAL_V4, *INTERNAL_V6, *EXTERNAL_V4, *EXTERNAL_V6]


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


def _host_len(address: str) -> int:
    return ipaddress.ip_address(address).max_prefixlen


def build(topo: Topology) -> None:
    """Create the namespaces, links, addresses and routes; tears down what exists first."""
    teardown(topo)
    srv, cli, p = topo.server_ns, topo.client_ns, topo.prefix
    try:
        for ns in topo.namespaces:
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "add", topo.host_link, "type", "veth", "peer", "name", f"{p}-s0", "netns", srv)
        _ip(
            "link",
            "add",
            f"{p}-c2",
            "netns",
            cli,
            "type",
            "veth",
            "peer",
            "name",
            f"{p}-s2",
            "netns",
            srv,
        )
        _address_link("", topo.host_link, "10.213.0.1/24", "fd00:eab::1/64")
        _address_link(srv, f"{p}-s0", "10.213.0.2/24", "fd00:eab::2/64")
        _address_link(srv, f"{p}-s2", "10.213.2.2/24", "fd00:eab:2::2/64")
        _address_link(cli, f"{p}-c2", "10.213.2.1/24", "fd00:eab:2::1/64")
        for address in topo.server_addresses():
            _ip("addr", "add", f"{address}/{_host_len(address)}", "dev", "lo", "nodad", netns=srv)
        _ip("route", "add", "10.213.1.0/24", "via", "10.213.0.2", "dev", topo.host_link)
        _ip("-6", "route", "add", "fd00:eab:1::/64", "via", "fd00:eab::2", "dev", topo.host_link)
        for address in (*EXTERNAL_V4, *EXTERNAL_V6):
            gateway = "10.213.0.2" if ":" not in address else "fd00:eab::2"
            _ip(
                "route",
                "add",
                f"{address}/{_host_len(address)}",
                "via",
                gateway,
                "dev",
                topo.host_link,
            )
        _ip("route", "add", "default", "via", "10.213.2.2", netns=cli)
        _ip("-6", "route", "add", "default", "via", "fd00:eab:2::2", netns=cli)
        # Connections that are never accepted sit in the listen queue (no fd on the server side).
        _sysctl(srv, "net.core.somaxconn", "65535")
        _sysctl(srv, "net.ipv4.tcp_max_syn_backlog", "65535")
    except BaseException:
        teardown(topo)
        raise


def _address_link(netns: str, dev: str, v4: str, v6: str) -> None:
    _ip("addr", "add", v4, "dev", dev, netns=netns)
    _ip("addr", "add", v6, "dev", dev, "nodad", netns=netns)
    _ip("link", "set", dev, "up", netns=netns)


def teardown(topo: Topology) -> List[str]:
    """Delete the host link and the namespaces by name; returns what was removed."""
    removed = []
    for argv in (
        ["link", "del", topo.host_link],
        *(["netns", "del", ns] for ns in topo.namespaces),
    ):
        done = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
        if done.returncode == 0:
            removed.append(argv[-1])
    return removed


def leftovers(topo: Topology) -> List[str]:
    """Namespaces and links of this prefix that still exist (empty after a clean teardown)."""
    names: Sequence[str] = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout.split()
    found = [n for n in names if n in topo.namespaces]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=False)
    found += [
        line.split()[0].split("@")[0]
        for line in links.stdout.splitlines()
        if line.startswith(f"{topo.prefix}-")
    ]
    return found
