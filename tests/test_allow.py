"""Allow rules against connections: each matcher, their combination, and rule order.

The rules come from YAML through the real configuration parser, as they do in the agent.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.allow import annotate, first_match, matches, remote_addresses
from agent.config import AllowRule, parse_settings, parse_yaml
from agent.records import Connection


def rules(text: str) -> Tuple[AllowRule, ...]:
    return parse_settings(parse_yaml(text, "test.yaml"), "test.yaml").allow


def rule(text: str) -> AllowRule:
    (only,) = rules(f"allow:\n  - {text}\n")
    return only


CURL = dict(
    pid=4242,
    name="curl",
    path="/usr/bin/curl",
    cmdline="curl https://example.test/",
    uid=1000,
    username="alice",
    container_id="",
    systemd_unit="session-3.scope",
    exe_status="packaged",
    sha256="ab" * 32,
    package="curl",
    protocol=6,
    remote_address="2001:db8:100::7",
    remote_port=443,
    direction="outbound",
)


def conn(**changes: Any) -> Connection:
    return Connection(**{**CURL, **changes})


OWNERLESS = Connection(pid=-1, remote_address="192.0.2.9", remote_port=443)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # name: exact or glob, case-sensitive
        ("{name: curl}", True),
        ("{name: Curl}", False),
        ("{name: 'cu*'}", True),
        ("{name: 'c?rl'}", True),
        ("{name: '[bc]url'}", True),
        ("{name: wget}", False),
        ("{name: [wget, curl]}", True),
        # path: glob where * crosses '/'
        ("{path: /usr/bin/curl}", True),
        ("{path: '/usr/*'}", True),
        ("{path: '*/curl'}", True),
        ("{path: /usr/bin/cur}", False),
        # user: name or uid, as number or text
        ("{user: alice}", True),
        ("{user: 1000}", True),
        ("{user: '1000'}", True),
        ("{user: [root, 0]}", False),
        # systemd_unit: glob, .service implied for a bare name
        ("{systemd_unit: session-3.scope}", True),
        ("{systemd_unit: 'session-*.scope'}", True),
        ("{systemd_unit: session-3}", False),
        # ports and ranges
        ("{ports: 443}", True),
        ("{ports: [80, '400-500']}", True),
        ("{ports: '1-442'}", False),
        # destinations
        ("{destinations: '2001:db8::/32'}", True),
        ("{destinations: '2001:db8:100::7'}", True),
        ("{destinations: ['192.0.2.0/24', '2001:db8:200::/48']}", False),
        # narrowing: protocol and direction
        ("{name: curl, protocol: tcp}", True),
        ("{name: curl, protocol: UDP}", False),
        ("{name: curl, direction: outbound}", True),
        ("{name: curl, direction: inbound}", False),
        # every named matcher must match
        ("{name: curl, user: alice, ports: 443, destinations: '2001:db8::/32'}", True),
        ("{name: curl, user: alice, ports: 443, destinations: '2001:db9::/32'}", False),
        ("{name: curl, user: bob}", False),
        # container id: a prefix of the container's id
        ("{container_id: 3f4a}", False),
    ],
)
def test_each_matcher(text: str, expected: bool) -> None:
    assert matches(rule(text), conn()) is expected


def test_a_bare_unit_name_means_its_service() -> None:
    nginx = conn(systemd_unit="nginx.service")
    assert matches(rule("{systemd_unit: nginx}"), nginx)
    assert matches(rule("{systemd_unit: nginx.service}"), nginx)
    assert not matches(rule("{systemd_unit: nginx.socket}"), nginx)
    assert not matches(rule("{systemd_unit: ngin}"), nginx)


FULL_ID = "3f4a9c2b1d0e" + "5" * 52


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("3f4a9c2b1d0e", True), (FULL_ID, True), ("3f4a9c2b1d0f", False), (FULL_ID + "0", False)],
)
def test_container_ids_match_by_prefix(prefix: str, expected: bool) -> None:
    in_container = conn(container_id=FULL_ID)
    assert matches(rule(f"{{container_id: '{prefix}'}}"), in_container) is expected
    assert not matches(rule(f"{{container_id: '{prefix}'}}"), conn())


@pytest.mark.parametrize(
    ("remote", "cidr", "expected"),
    [
        ("192.0.2.7", "192.0.2.0/24", True),
        ("192.0.2.7", "192.0.3.0/24", False),
        ("192.0.2.7", "::ffff:192.0.2.0/120", False),
        # an AF_INET6 socket talking IPv4: the IPv4 rule still applies
        ("::ffff:192.0.2.7", "192.0.2.0/24", True),
        ("::ffff:192.0.2.7", "192.0.2.7", True),
        ("::ffff:192.0.2.7", "192.0.3.0/24", False),
        ("::ffff:192.0.2.7", "::ffff:192.0.2.0/120", True),
        # NAT64 (RFC 6052 well-known prefix) reaches the IPv4 host
        ("64:ff9b::192.0.2.7", "192.0.2.0/24", True),
        ("64:ff9b::192.0.2.7", "64:ff9b::/96", True),
        # 6to4 and Teredo carry a relay's address, not the peer's
        ("2002:c000:207::1", "192.0.2.0/24", False),
        ("2001:0:c000:207::1", "192.0.2.0/24", False),
        ("2001:db8::1", "0.0.0.0/0", False),
        ("2001:db8::1", "::/0", True),
        ("fe80::1%eth0", "fe80::/10", True),
        # an ownerless or unparsable remote end matches no destination
        ("", "0.0.0.0/0", False),
        ("not an address", "::/0", False),
    ],
)
def test_destinations(remote: str, cidr: str, expected: bool) -> None:
    assert matches(rule(f"{{destinations: '{cidr}'}}"), conn(remote_address=remote)) is expected


def test_remote_addresses() -> None:
    assert remote_addresses("::ffff:192.0.2.7") == (
        ipaddress.IPv6Address("::ffff:192.0.2.7"),
        ipaddress.IPv4Address("192.0.2.7"),
    )
    assert remote_addresses("192.0.2.7") == (ipaddress.IPv4Address("192.0.2.7"),)
    assert remote_addresses("") == ()


@pytest.mark.parametrize("text", ["{name: '*'}", "{path: '*'}", "{systemd_unit: '*'}"])
def test_an_unknown_owner_matches_no_pattern(text: str) -> None:
    assert not matches(rule(text), OWNERLESS)


def test_an_unknown_owner_matches_destination_and_port_rules() -> None:
    assert matches(rule("{destinations: 192.0.2.0/24, ports: 443}"), OWNERLESS)


def test_an_unknown_uid_does_not_match_a_uid() -> None:
    assert not matches(rule("{user: 0}"), conn(uid=None, username=""))


def test_the_first_matching_rule_wins() -> None:
    allow = rules(
        """
allow:
  - {comment: web, name: nginx}
  - {name: curl, ports: 80}
  - {comment: tls, ports: 443}
  - {comment: curl anywhere, name: curl}
"""
    )
    found = first_match(allow, conn())
    assert found is allow[2]
    assert found is not None and found.label == "tls"
    found = first_match(allow, conn(remote_port=80))
    assert found is allow[1]
    assert found is not None and found.label == "allow[1]"
    assert first_match(allow, conn(remote_port=22)) is allow[3]
    assert first_match(allow, conn(name="wget", remote_port=22)) is None
    assert first_match((), conn()) is None


def test_annotate_marks_connections_in_place() -> None:
    allow = rules("allow:\n  - {comment: tls, ports: 443}\n")
    allowed, unexpected = conn(), conn(remote_port=22, allowlisted=True, allow_rule="stale")
    annotate(allow, [allowed, unexpected])
    assert (allowed.allowlisted, allowed.allow_rule) == (True, "tls")
    assert (unexpected.allowlisted, unexpected.allow_rule) == (False, "")


def test_hostile_names_are_only_text_to_a_glob() -> None:
    hostile = conn(name="cu\nrl\x1b[31m\udcff", path="/tmp/\udcfe/x", exe_status="unpackaged")
    assert matches(rule("{name: 'cu*'}"), hostile)
    assert not matches(rule("{name: curl}"), hostile)
    assert matches(rule("{path: '/tmp/*/x'}"), hostile)


def _network(address: int, prefix: int, version: int) -> Any:
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    bits = 32 if version == 4 else 128
    return cls((address >> (bits - prefix) << (bits - prefix), prefix))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
    st.booleans(),
)
def test_ipv4_rules_agree_with_ipaddress(
    address: int, base: int, prefix: int, mapped: bool
) -> None:
    network = _network(base, prefix, 4)
    ipv4 = ipaddress.IPv4Address(address)
    remote = f"::ffff:{ipv4}" if mapped else str(ipv4)
    found: Optional[AllowRule] = first_match(
        rules(f"allow:\n  - destinations: '{network}'\n"), conn(remote_address=remote)
    )
    assert (found is not None) is (ipv4 in network)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_ipv6_rules_agree_with_ipaddress(address: int, base: int, prefix: int) -> None:
    network = _network(base, prefix, 6)
    ipv6 = ipaddress.IPv6Address(address)
    expected = ipv6 in network
    found = first_match(
        rules(f"allow:\n  - destinations: '{network}'\n"), conn(remote_address=str(ipv6))
    )
    assert (found is not None) is expected


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 65535))
def test_port_ranges_agree_with_arithmetic(port: int, a: int, b: int) -> None:
    low, high = min(a, b), max(a, b)
    found = first_match(rules(f"allow:\n  - ports: '{low}-{high}'\n"), conn(remote_port=port))
    assert (found is not None) is (low <= port <= high)
