"""Matching connections against the ``allow`` rules of the configuration.

A rule matches a connection when every matcher it names matches; each matcher is a tuple of
alternatives, any one of which may match (see :class:`agent.config.AllowRule`).  The rules
come from the configuration already parsed (networks as ``ipaddress`` objects, ports as
ranges), and what is left per connection is cached: a glob compiles once, an address text
parses once.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

from agent.config import GLOB_CHARACTERS, AllowRule
from agent.inet import ipv4_host
from agent.records import Connection

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


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


def matches(rule: AllowRule, conn: Connection) -> bool:
    """True when every matcher the rule names matches the connection.

    The cheap comparisons come first; the address, the dearest, last.
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
    if rule.name and not _any_glob(rule.name, conn.name):
        return False
    if rule.path and not _any_glob(rule.path, conn.path):
        return False
    if rule.systemd_unit and not _any_glob(rule.systemd_unit, conn.systemd_unit):
        return False
    return not rule.destinations or any(
        address in network
        for address in remote_addresses(conn.remote_address)
        for network in rule.destinations
    )


def first_match(rules: Sequence[AllowRule], conn: Connection) -> Optional[AllowRule]:
    """The first rule, in file order, that matches the connection, or ``None``."""
    for rule in rules:
        if matches(rule, conn):
            return rule
    return None


def annotate(rules: Sequence[AllowRule], connections: Iterable[Connection]) -> None:
    """Set ``allowlisted`` and ``allow_rule`` (the rule's label) on each connection, in place."""
    for conn in connections:
        rule = first_match(rules, conn)
        conn.allowlisted = rule is not None
        conn.allow_rule = "" if rule is None else rule.label
