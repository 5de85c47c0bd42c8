"""Rows grouped into allow rules: by identity, then destination, then protocol and ports.

Each row gets its identity (:func:`agent.learn.identity.identity_of`) and its destination: the
name that was asked for its address when there is one a rule can name (a ``domains`` rule,
:mod:`agent.learn.domains`), else its address (a ``destinations`` rule over the narrowest
networks, :mod:`agent.learn.networks`).  A row without both is left out, with the reason.
Destinations of one identity, one kind and one protocol that were reached on the same ports
make one rule; each rule keeps what it was learned from (connections, first and last seen,
hosts, the names or addresses seen).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Mapping, Optional, Set, Tuple

from agent.config import RULE_KEYS, Network
from agent.evidence import number, text
from agent.learn.domains import domain_patterns, valid_domain
from agent.learn.identity import Identity, identity_of
from agent.learn.networks import covering_networks, rule_address

Row = Mapping[str, object]


@dataclass
class Learned:
    """One rule and what it was learned from."""

    identity: Identity
    kind: str
    """``domains`` or ``destinations``."""
    targets: Tuple[str, ...]
    """The domain patterns or CIDRs."""
    protocol: int
    ports: Tuple[int, ...]
    connections: int = 0
    first_seen: float = float("inf")
    last_seen: float = 0.0
    hosts: Set[str] = field(default_factory=set)
    seen: Set[str] = field(default_factory=set)
    """The names asked, or the addresses reached."""

    def take(self, row: Row) -> None:
        self.connections += int(number(row, "connections")) or 1
        first = number(row, "first_seen") or number(row, "last_seen")
        self.first_seen = min(self.first_seen, first)
        self.last_seen = max(self.last_seen, number(row, "last_seen") or first)
        self.hosts.add(text(row, "host"))

    def sort_key(self) -> Tuple[object, ...]:
        return (
            self.identity.strength,
            self.identity.value,
            self.kind,
            self.protocol,
            self.ports,
            self.targets,
        )


@dataclass(frozen=True)
class Refused:
    """A row no rule was learned from, and why."""

    row: Row
    reason: str


def describe(row: Row) -> str:
    """One row in a line of text, for the list of refused rows (the caller escapes it)."""
    return (
        f"{text(row, 'name') or '?'} (pid {text(row, 'pid') or '?'}, "
        f"{text(row, 'path') or 'no path'}) on {text(row, 'host') or '?'} -> "
        f"{text(row, 'remote_domain') + ' ' if text(row, 'remote_domain') else ''}"
        f"{text(row, 'remote_address') or '?'} port {text(row, 'remote_port') or '?'}"
    )


def learn_rules(
    rows: Collection[Row],
    widen: bool = False,
    rule_keys: Collection[str] = RULE_KEYS,
    path_exists: Optional[Callable[[str], bool]] = None,
) -> Tuple[List[Learned], List[Refused]]:
    """The rules that cover ``rows`` and the rows left out, both in a stable order.

    ``widen``: networks up to a /16 (IPv6 /32) instead of a /24 (/48); ``path_exists``: whether
    this host has a path (only when the rows are this host's).
    """
    refused: List[Refused] = []
    by_identity: Dict[Identity, List[Tuple[Row, Optional[str], str]]] = {}
    for row in rows:
        identity = identity_of(row, rule_keys, path_exists)
        if not isinstance(identity, Identity):
            refused.append(Refused(row, identity))
            continue
        domain = valid_domain(text(row, "remote_domain"))
        address = text(row, "remote_address")
        if domain is None and rule_address(address) is None:
            refused.append(Refused(row, "no destination: neither a name nor an address"))
            continue
        by_identity.setdefault(identity, []).append((row, domain, address))

    rules: Dict[Tuple[object, ...], Learned] = {}
    for identity, entries in by_identity.items():
        patterns = domain_patterns(domain for _, domain, _ in entries if domain is not None)
        networks = covering_networks(address for _, domain, address in entries if domain is None)
        # each destination (a pattern or a network) with its protocol -> ports, rows
        units: Dict[Tuple[str, str, int], Tuple[Set[int], List[Row], Set[str]]] = {}
        for row, domain, address in entries:
            if domain is not None:
                unit = ("domains", patterns[domain], int(number(row, "protocol")))
                seen = domain
            else:
                network = _network_of(address, networks)
                unit = ("destinations", network, int(number(row, "protocol")))
                seen = address
            ports, unit_rows, unit_seen = units.setdefault(unit, (set(), [], set()))
            port = int(number(row, "remote_port"))
            if 1 <= port <= 65535:
                ports.add(port)
            unit_rows.append(row)
            unit_seen.add(seen)
        for (kind, target, protocol), (ports, unit_rows, unit_seen) in units.items():
            key = (identity, kind, protocol, tuple(sorted(ports)))
            rule = rules.get(key)
            if rule is None:
                rule = rules[key] = Learned(identity, kind, (), protocol, tuple(sorted(ports)))
            rule.targets = tuple(sorted({*rule.targets, target}))
            rule.seen |= unit_seen
            for row in unit_rows:
                rule.take(row)
    ordered = sorted(rules.values(), key=Learned.sort_key)
    refused.sort(key=lambda entry: (entry.reason, describe(entry.row)))
    return ordered, refused


def _network_of(address: str, networks: Collection[Network]) -> str:
    found = rule_address(address)
    if found is None:  # rows without an address were refused before
        raise ValueError(f"no address: {address!r}")
    version, value = found
    host = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
    for network in networks:
        if network.version == version and host in network:
            return str(network)
    raise AssertionError(f"no learned network holds {address}")  # covering_networks covers all
