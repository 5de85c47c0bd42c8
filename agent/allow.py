"""Matching connections against the ``allow`` rules of the configuration.

A rule matches a connection when every matcher it names matches; each matcher is a tuple of
alternatives, any one of which may match (see :class:`agent.config.AllowRule`).  The rules
come from the configuration already parsed (networks as ``ipaddress`` objects, ports as
ranges), and what is left per connection is cached: a glob compiles once, an address text
parses once.

``domains`` match the names DNS answered for the remote address in the connection's network
namespace; those come from the caller as a :data:`NameLookup` (the DNS watch's
``NameCache.names``), so this module keeps no state of its own.  Without one, or for a
connection whose namespace is unknown, no ``domains`` rule matches.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

from agent.config import GLOB_CHARACTERS, AllowRule
from agent.exe_check import HOST_FILE_STATUSES, PACKAGED
from agent.inet import ipv4_host
from agent.records import Connection

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

NameLookup = Callable[[int, int, int], Iterable[str]]
"""(network namespace inode, IP version, address as an integer) -> every name DNS answered
for that address there (``agent.collect.dns.cache.NameCache.names``)."""


@functools.lru_cache(maxsize=4096)
def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate for one ``fnmatch`` pattern (case-sensitive; ``*`` also matches ``/``)."""
    if GLOB_CHARACTERS.isdisjoint(pattern):
        return pattern.__eq__
    match = re.compile(fnmatch.translate(pattern)).match
    return lambda text: match(text) is not None


@functools.lru_cache(maxsize=4096)
def remote_addresses(text: str) -> Tuple[Address, ...]:
    """The addresses a remote end stands for: itself and, for an IPv4-mapped or NAT64
    address, the IPv4 host it reaches (:func:`agent.inet.ipv4_host`).  Text that is no
    address (an ownerless row's empty field) stands for none.  A zone index
    (``fe80::1%eth0``) is dropped.
    """
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return ()
    host = ipv4_host(int(address), address.version)
    if host is not None:
        return (address, ipaddress.IPv4Address(host))
    return (address,)


def _any_glob(patterns: Tuple[str, ...], value: str) -> bool:
    """Whether a pattern matches; an unknown (empty) value matches none, not even ``*``."""
    return value != "" and any(glob_matcher(pattern)(value) for pattern in patterns)


@functools.lru_cache(maxsize=4096)
def domain_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate for one ``domains`` pattern as :func:`agent.config.parse_domain` gives it:
    ``*.example.com`` matches any name ending in ``.example.com``, any other pattern itself."""
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return lambda name: name.endswith(suffix)
    return pattern.__eq__


def answered_names(conn: Connection, names: Optional[NameLookup]) -> Iterable[str]:
    """The names answered for the connection's remote address (and for the IPv4 address an
    IPv4-mapped or NAT64 address reaches) in its namespace."""
    if names is None or conn.net_namespace is None:
        return
    for address in remote_addresses(conn.remote_address):
        yield from names(conn.net_namespace, address.version, int(address))


def _any_domain(patterns: Tuple[str, ...], conn: Connection, names: Optional[NameLookup]) -> bool:
    return any(
        domain_matcher(pattern)(name)
        for name in answered_names(conn, names)
        for pattern in patterns
    )


def _in_runtime_container(conn: Connection) -> bool:
    """Whether the connection's process is in a container a runtime made and named: a
    container id from the cgroup and a runtime that the runtime's own files (or the cgroup
    prefix) name.  Only then do ``container_name``, ``container_image`` and ``pod_namespace``
    rules apply: the names come from root's runtime state, keyed by that id."""
    return bool(conn.container_id) and bool(conn.container_runtime)


def matches(rule: AllowRule, conn: Connection, names: Optional[NameLookup] = None) -> bool:
    """True when every matcher the rule names matches the connection; ``names`` tells the
    names answered for an address (without it no ``domains`` matcher matches).

    What a local user could forge matches nothing (``docs/DESIGN.md``, "Identity"): ``path``
    only when ``exe_status`` says the executable is the host's file at that path,
    ``package`` only a ``packaged`` (verified) executable, ``systemd_unit`` only the system
    manager's units (a user's are ``user_unit``), ``container_id`` only a runtime's containers.
    The cheap comparisons come first; the address and the names, the dearest, last.
    """
    if rule.ports and not any(conn.remote_port in ports for ports in rule.ports):
        return False
    if rule.protocol and conn.protocol not in rule.protocol:
        return False
    if rule.direction and conn.direction not in rule.direction:
        return False
    if rule.user and not (
        conn.username in rule.user or (conn.uid is not None and str(conn.uid) in rule.user)
    ):
        return False
    if rule.container_id and not (
        conn.container_id and conn.container_id.startswith(rule.container_id)
    ):
        return False
    if (rule.container_name or rule.container_image or rule.pod_namespace) and not (
        _in_runtime_container(conn)
        and (not rule.container_name or _any_glob(rule.container_name, conn.container_name))
        and (not rule.container_image or _any_glob(rule.container_image, conn.container_image))
        and (not rule.pod_namespace or _any_glob(rule.pod_namespace, conn.pod_namespace))
    ):
        return False
    if rule.name and not _any_glob(rule.name, conn.name):
        return False
    if rule.path and not (
        conn.exe_status in HOST_FILE_STATUSES and _any_glob(rule.path, conn.path)
    ):
        return False
    if rule.systemd_unit and not _any_glob(rule.systemd_unit, conn.systemd_unit):
        return False
    if rule.user_unit and not _any_glob(rule.user_unit, conn.user_unit):
        return False
    if rule.sha256 and conn.sha256 not in rule.sha256:
        return False
    if rule.package and not (conn.exe_status == PACKAGED and conn.package in rule.package):
        return False
    if rule.destinations and not any(
        address in network
        for address in remote_addresses(conn.remote_address)
        for network in rule.destinations
    ):
        return False
    return not rule.domains or _any_domain(rule.domains, conn, names)


def first_match(
    rules: Sequence[AllowRule], conn: Connection, names: Optional[NameLookup] = None
) -> Optional[AllowRule]:
    """The first rule, in file order, that matches the connection, or ``None``."""
    for rule in rules:
        if matches(rule, conn, names):
            return rule
    return None


def annotate(
    rules: Sequence[AllowRule],
    connections: Iterable[Connection],
    names: Optional[NameLookup] = None,
) -> None:
    """Set ``allowlisted`` and ``allow_rule`` (the rule's label) on each connection, in place;
    ``names`` as for :func:`matches`."""
    for conn in connections:
        rule = first_match(rules, conn, names)
        conn.allowlisted = rule is not None
        conn.allow_rule = "" if rule is None else rule.label
