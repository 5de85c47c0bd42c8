"""``domains:`` in allow rules: what the configuration accepts and refuses, and the matching.

Names come from a real :class:`NameCache` filled as the DNS watch fills it; the packets that
fill it in a test host are in ``tests/test_dnswatch.py``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Dict, Tuple

import pytest

from agent.allow import annotate, domain_matcher, first_match, matches
from agent.collect.dns.cache import NameCache
from agent.config import AllowRule, ConfigError, parse_settings, parse_yaml
from agent.records import Connection

SOURCE = "/etc/egress-agent/config.yaml"
SHIPPED = Path(__file__).resolve().parent.parent / "config" / "egress-agent.yaml"
NS = 4026533001


def rules(text: str) -> Tuple[AllowRule, ...]:
    return parse_settings(parse_yaml(text, SOURCE), SOURCE).allow


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        rules(text)
    message = str(caught.value)
    assert "\n" not in message and message.isprintable()
    return message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ('"api.github.com"', ("api.github.com",)),
        ('"API.GitHub.com."', ("api.github.com",)),
        ('["*.debian.org", deb.debian.org]', ("*.debian.org", "deb.debian.org")),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example",)),
        ("_dmarc.example.com", ("_dmarc.example.com",)),
        ('"*.org"', ("*.org",)),
        ("localhost", ("localhost",)),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, (".".join(["a" * 63] * 3) + "." + "b" * 61,)),
    ],
)
def test_accepted_domains(given: str, expected: Tuple[str, ...]) -> None:
    (rule,) = rules(f"allow:\n  - domains: {given}\n")
    assert rule.domains == expected


def test_domains_alone_make_a_rule_and_join_other_matchers() -> None:
    (alone, joined) = rules(
        "allow:\n  - {domains: api.github.com}\n  - {name: curl, domains: [a.test], ports: 443}\n"
    )
    assert alone.domains == ("api.github.com",)
    assert joined.name == ("curl",) and joined.domains == ("a.test",)


def test_the_shipped_example_names_a_domain() -> None:
    text = SHIPPED.read_text()
    assert '#       domains: ["*.debian.org"]' in text


W = "allow[0].domains"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("[]", f"{W}: an empty list matches nothing: leave the key out instead (got [])"),
        ('""', f"{W}: must be a domain name such as api.github.com or *.debian.org, not empty"),
        ("443", f"{W}: must be a domain name such as api.github.com or *.debian.org, not a number"),
        (
            "yes",
            f"{W}: must be a domain name such as api.github.com or *.debian.org, not a boolean",
        ),
        (
            '"a..b.test"',
            f"{W}: an empty label (a leading dot, or two dots in a row) (got 'a..b.test')",
        ),
        ('".a.test"', f"{W}: an empty label (a leading dot, or two dots in a row) (got '.a.test')"),
        (
            '"a.test.."',
            f"{W}: an empty label (a leading dot, or two dots in a row) (got 'a.test..')",
        ),
        ('"."', f"{W}: the root ('.') is no name to match (got '.')"),
        (f'"{"x" * 64}.test"', f"{W}: a label longer than 63 characters (64) (got 'xxxxx"),
        (
            '"' + ".".join(["a" * 63] * 4) + '"',
            f"{W}: a name longer than 253 characters (RFC 1035 section 2.3.4) (got 'aaaa",
        ),
        ('"exa mple.com"', f"{W}: a name holds only letters, digits, '-', '_' and dots (got 'exa"),
        ('"a!.test"', f"{W}: a name holds only letters, digits, '-', '_' and dots (got 'a!.test')"),
        ('"-a.test"', f"{W}: a label cannot start or end with '-' (RFC 1123) (got '-a.test')"),
        ('"a-.test"', f"{W}: a label cannot start or end with '-' (RFC 1123) (got 'a-.test')"),
        ('"*"', f"{W}: '*' alone would match every name; name a domain (got '*')"),
        (
            '"a.*.test"',
            f"{W}: '*' may only be the whole first label (*.example.com) (got 'a.*.test')",
        ),
        (
            '"*a.test"',
            f"{W}: '*' may only be the whole first label (*.example.com) (got '*a.test')",
        ),
        (
            '"**.test"',
            f"{W}: '*' may only be the whole first label (*.example.com) (got '**.test')",
        ),
        ('"a.test.*"', f"{W}: '*' may only be the whole first label (*.example.com) (got 'a.tes"),
        ('"*.*.test"', f"{W}: '*' may only be the whole first label (*.example.com) (got '*.*.t"),
        ('"bücher.example"', f"{W}: not ASCII: write an internationalised name as its A-labels"),
        ('" a.test"', f"{W}: surrounding whitespace in a domain name (got ' a.test')"),
        ('"192.0.2.1"', f"{W}: an address, not a name: addresses belong in destinations"),
        ('"2001:db8::1"', f"{W}: an address or network: those belong in destinations"),
        ('"10.0.0.0/8"', f"{W}: an address or network: those belong in destinations"),
        ('"https://a.test/"', f"{W}: an address or network: those belong in destinations"),
        (
            "{name: a.test}",
            f"{W}: must be a domain name such as api.github.com or *.debian.org, not a mapping",
        ),
    ],
)
def test_malformed_domains_are_refused_with_one_line(given: str, message: str) -> None:
    assert refusal(f"allow:\n  - domains: {given}\n").startswith(f"{SOURCE}: {message}")


def test_the_bad_one_of_a_list_is_named() -> None:
    message = refusal('allow:\n  - {name: a}\n  - domains: [a.test, "b..test"]\n')
    assert message.startswith(f"{SOURCE}: allow[1].domains[1]: an empty label")


# --- matching ---------------------------------------------------------------------------------

CDN = "151.101.2.132"
CDN_INT = int(ipaddress.IPv4Address(CDN))


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.debian.org", "deb.debian.org", True),
        ("*.debian.org", "a.b.debian.org", True),
        ("*.debian.org", "debian.org", False),
        ("*.debian.org", "notdebian.org", False),
        ("*.debian.org", "deb.debian.org.evil.test", False),
        ("deb.debian.org", "deb.debian.org", True),
        ("deb.debian.org", "a.deb.debian.org", False),
    ],
)
def test_domain_patterns(pattern: str, name: str, expected: bool) -> None:
    assert domain_matcher(pattern)(name) is expected


def filled_cache() -> NameCache:
    cache = NameCache()
    cache.add(NS, 4, CDN_INT, ("deb.debian.org", "debian.map.fastly.net"), 300)
    cache.add(NS, 4, CDN_INT, ("pypi.org",), 300)  # the same CDN address, another name
    return cache


def conn(**changes: object) -> Connection:
    fields = dict(pid=42, name="apt", net_namespace=NS, remote_address=CDN, remote_port=443)
    fields.update(changes)
    return Connection(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("domains", "changes", "expected"),
    [
        ('"*.debian.org"', {}, True),
        ("deb.debian.org", {}, True),
        ("pypi.org", {}, True),  # not the newest answer's name, but answered for the address
        ('"*.fastly.net"', {}, True),  # a CNAME of the chain
        ("debian.org", {}, False),
        ("deb.debian.org", {"net_namespace": NS + 1}, False),  # another namespace's answers
        ("deb.debian.org", {"net_namespace": None}, False),  # namespace unknown (psutil)
        ("deb.debian.org", {"remote_address": "151.101.2.133"}, False),
        ("deb.debian.org", {"remote_address": "::ffff:151.101.2.132"}, True),  # dual-stack
        ("deb.debian.org", {"remote_address": "64:ff9b::151.101.2.132"}, True),  # NAT64
        ("deb.debian.org", {"remote_address": ""}, False),
    ],
)
def test_a_connection_matches_by_the_names_of_its_address(
    domains: str, changes: Dict[str, object], expected: bool
) -> None:
    (rule,) = rules(f"allow:\n  - domains: {domains}\n")
    assert matches(rule, conn(**changes), filled_cache().names) is expected


def test_without_a_lookup_no_domains_rule_matches() -> None:
    (rule,) = rules("allow:\n  - domains: deb.debian.org\n")
    assert not matches(rule, conn())
    assert first_match([rule], conn()) is None


def test_every_matcher_must_match() -> None:
    (rule,) = rules("allow:\n  - {name: apt, domains: deb.debian.org, ports: 80}\n")
    names = filled_cache().names
    assert not matches(rule, conn(), names)  # port 443
    assert matches(rule, conn(remote_port=80), names)
    assert not matches(rule, conn(remote_port=80, name="curl"), names)


def test_annotate_takes_the_lookup() -> None:
    allowed = rules(
        "allow:\n  - {comment: ssh, ports: 22}\n"
        "  - {comment: debian mirrors, domains: '*.debian.org'}\n"
    )
    connections = [conn(), conn(remote_address="151.101.2.133")]
    annotate(allowed, connections, filled_cache().names)
    assert [(c.allowlisted, c.allow_rule) for c in connections] == [
        (True, "debian mirrors"),
        (False, ""),
    ]
    annotate(allowed, connections)
    assert not connections[0].allowlisted
