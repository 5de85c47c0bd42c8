"""The classifier: every registry boundary, every text form, and properties against ipaddress."""

from __future__ import annotations

import csv
import ipaddress
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.classify import DATA_DIR, AddressError, Classifier, format_ipv6, parse_address

CLASSIFIER = Classifier()
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def registry_rows(version: int) -> List[dict]:
    with (DATA_DIR / f"iana-ipv{version}-special-registry.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_shipped_registries_are_the_reference_files() -> None:
    """The package carries IANA's registries unchanged (when the reference copy is beside us)."""
    for version in (4, 6):
        name = f"iana-ipv{version}-special-registry.csv"
        if (REFERENCE / name).exists():
            assert (DATA_DIR / name).read_bytes() == (REFERENCE / name).read_bytes()


def test_every_registry_entry_has_a_category() -> None:
    with (DATA_DIR / "categories.csv").open(newline="") as handle:
        categories = {row["address_block"]: row["category"] for row in csv.DictReader(handle)}
    for version in (4, 6):
        for row in registry_rows(version):
            assert categories.get(row["address_block"]), row["address_block"]


# --- an independent oracle for rules 6-8: a linear scan with ipaddress ----------------------

ORACLE_ENTRIES = [
    (ipaddress.ip_network(row["address_block"]), row["globally_reachable"].split(" ")[0] == "True")
    for version in (4, 6)
    for row in registry_rows(version)
    if row["termination_date"] in ("", "N/A")
]
RULE_BLOCKS = [
    ipaddress.ip_network(n)
    for n in ("::ffff:0:0/96", "64:ff9b::/96", "2002::/16", "2001::/32", "ff00::/8", "224.0.0.0/4")
]


def oracle(address: ipaddress._BaseAddress) -> Optional[bool]:
    """Rules 6-8 by brute force; None where rules 1-5 decide instead."""
    if any(address in block for block in RULE_BLOCKS if block.version == address.version):
        return None
    matches = [
        (net.prefixlen, flag)
        for net, flag in ORACLE_ENTRIES
        if net.version == address.version and address in net
    ]
    if matches:
        return max(matches)[1]
    return not (address.version == 6 and address not in ipaddress.ip_network("2000::/3"))


def boundary_addresses() -> List[Tuple[str, str]]:
    """First and last address of every entry, and the addresses just outside it."""
    out = []
    for version in (4, 6):
        top = 2**32 - 1 if version == 4 else 2**128 - 1
        for row in registry_rows(version):
            net = ipaddress.ip_network(row["address_block"])
            first, last = int(net.network_address), int(net.broadcast_address)
            for value in (first, last, first - 1, last + 1):
                if 0 <= value <= top:
                    out.append(
                        (
                            row["address_block"],
                            str(
                                ipaddress.ip_address(value)
                                if version == 6
                                else ipaddress.IPv4Address(value)
                            ),
                        )
                    )
    return out


@pytest.mark.parametrize(("entry", "text"), boundary_addresses())
def test_registry_boundaries_match_the_oracle(entry: str, text: str) -> None:
    address = ipaddress.ip_address(text)
    expected = oracle(address)
    verdict = CLASSIFIER.classify(text)
    if expected is not None:
        assert verdict.external is expected, (entry, text, verdict.reason)
    assert verdict.version == address.version
    assert verdict.address_int == str(int(address))


@pytest.mark.parametrize(
    ("text", "external", "category", "via", "embedded"),
    [
        # the classes the seed query gets wrong
        ("fc00::1", False, "unique_local", None, None),
        ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "unique_local", None, None),
        ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "reserved", None, None),
        ("0::1", False, "loopback", None, None),
        ("::0001", False, "loopback", None, None),
        ("0:0:0:0:0:0:0:1", False, "loopback", None, None),
        ("::", False, "unspecified", None, None),
        ("ff02::1", False, "multicast", None, None),
        ("ff05::2", False, "multicast", None, None),
        ("ff08::1", False, "multicast", None, None),
        ("ff0e::101", True, "multicast", None, None),
        ("ff3e::8000:1", True, "multicast", None, None),
        ("ff1f::1", True, "multicast", None, None),
        ("2001:db8::1", False, "documentation", None, None),
        ("3fff:fff:ffff::1", False, "documentation", None, None),
        ("2001:2::1", False, "benchmarking", None, None),
        ("100::1", False, "discard", None, None),
        ("5f00::1", False, "srv6_sid", None, None),
        ("fec0::1", False, "site_local", None, None),
        ("::1.2.3.4", False, "ipv4_compatible", None, None),
        ("4000::1", False, "reserved", None, None),
        ("::ffff:8.8.8.8", True, "global", "ipv4_mapped", "8.8.8.8"),
        ("::FFFF:8.8.8.8", True, "global", "ipv4_mapped", "8.8.8.8"),
        ("::ffff:a00:1", False, "private", "ipv4_mapped", "10.0.0.1"),
        ("::ffff:127.0.0.1", False, "loopback", "ipv4_mapped", "127.0.0.1"),
        ("64:ff9b::8.8.8.8", True, "global", "nat64", "8.8.8.8"),
        ("64:ff9b::c0a8:101", False, "private", "nat64", "192.168.1.1"),
        ("64:ff9b:1::1", False, "nat64_local", None, None),
        ("2002:808:808::1", True, "global", "6to4", "8.8.8.8"),
        ("2002:a00:1::1", False, "private", "6to4", "10.0.0.1"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", True, "teredo", "teredo", "192.0.2.45"),
        ("FE80::1%eth0", False, "link_local", None, None),
        ("2001:1::1", True, "pcp_anycast", None, None),
        ("2001:1::4", False, "ietf_protocol", None, None),
        ("2001:3::1", True, "amt", None, None),
        ("2001:10::1", False, "ietf_protocol", None, None),  # ORCHID terminated: 2001::/23 decides
        ("2001:20::1", True, "orchid_v2", None, None),
        ("2001:200::1", True, "global", None, None),
        ("2620:4f:8000::1", True, "as112", None, None),
        ("2606:4700:4700::1111", True, "global", None, None),
        # IPv4, where the vendor's IPv4 query stops at four blocks
        ("8.8.8.8", True, "global", None, None),
        ("100.64.0.1", False, "shared", None, None),
        ("169.254.169.254", False, "link_local", None, None),
        ("192.0.0.9", True, "pcp_anycast", None, None),
        ("192.0.0.8", False, "dummy", None, None),
        ("192.0.0.100", False, "ietf_protocol", None, None),
        ("192.0.2.1", False, "documentation", None, None),
        ("198.18.0.1", False, "benchmarking", None, None),
        ("198.51.100.7", False, "documentation", None, None),
        ("203.0.113.255", False, "documentation", None, None),
        ("192.88.99.1", True, "global", None, None),  # 6to4 relay anycast terminated
        ("192.88.99.2", False, "6a44_relay", None, None),
        ("240.0.0.1", False, "reserved", None, None),
        ("255.255.255.255", False, "broadcast", None, None),
        ("0.0.0.0", False, "unspecified", None, None),
        ("0.1.2.3", False, "this_network", None, None),
        ("127.255.255.254", False, "loopback", None, None),
        ("224.0.0.251", False, "multicast", None, None),
        ("224.0.1.1", True, "multicast", None, None),
        ("232.1.1.1", True, "multicast", None, None),
        ("233.252.0.9", False, "documentation", None, None),
        ("239.255.255.250", False, "multicast", None, None),
    ],
)
def test_verdicts(
    text: str, external: bool, category: str, via: Optional[str], embedded: Optional[str]
) -> None:
    verdict = CLASSIFIER.classify(text)
    assert (verdict.external, verdict.category, verdict.via, verdict.embedded_ipv4) == (
        external,
        category,
        via,
        embedded,
    ), verdict.reason
    assert verdict.address == text
    assert verdict.reason


def test_verdict_fields_for_an_ipv6_address_with_zone() -> None:
    verdict = CLASSIFIER.classify("FE80::0A:1%eth0")
    assert verdict.version == 6
    assert verdict.normalized == "fe80::a:1"
    assert verdict.expanded == "fe80:0000:0000:0000:0000:0000:000a:0001"
    assert verdict.address_int == str(int(ipaddress.IPv6Address("fe80::a:1")))
    assert verdict.zone == "eth0"
    assert verdict.reason == "Link-Local Unicast (RFC4291)"


def test_verdict_fields_for_ipv4() -> None:
    verdict = CLASSIFIER.classify("10.1.2.3")
    assert (verdict.version, verdict.normalized, verdict.expanded, verdict.address_int) == (
        4,
        "10.1.2.3",
        "10.1.2.3",
        str(0x0A010203),
    )
    assert verdict.reason == "Private-Use (RFC1918)"
    assert verdict.zone is None and verdict.via is None


def test_zone_does_not_change_the_verdict() -> None:
    plain, zoned = CLASSIFIER.classify("2001:4860::1"), CLASSIFIER.classify("2001:4860::1%7")
    assert (plain.external, plain.category) == (zoned.external, zoned.category)
    assert zoned.zone == "7"


def test_internal_networks() -> None:
    classifier = Classifier(
        [ipaddress.ip_network("8.8.8.0/24"), ipaddress.ip_network("2001:4860::/32")]
    )
    for text, via in [
        ("8.8.8.8", None),
        ("::ffff:8.8.8.8", "ipv4_mapped"),
        ("64:ff9b::808:808", "nat64"),
        ("2002:808:808::1", "6to4"),
        ("2001:4860::8888", None),
    ]:
        verdict = classifier.classify(text)
        assert (verdict.external, verdict.category, verdict.via) == (False, "internal", via), text
        assert "internal_networks" in verdict.reason
    assert classifier.classify("8.8.4.4").external is True
    assert classifier.classify("2001:4861::1").external is True


def test_classify_int_matches_text() -> None:
    for text in ("8.8.8.8", "10.0.0.1", "::ffff:8.8.8.8", "2001:db8::1", "2606:4700::1"):
        address = ipaddress.ip_address(text)
        by_int = CLASSIFIER.classify_int(int(address), address.version)
        by_text = CLASSIFIER.classify(text)
        assert (by_int.external, by_int.category, by_int.normalized, by_int.via) == (
            by_text.external,
            by_text.category,
            by_text.normalized,
            by_text.via,
        )


@pytest.mark.parametrize(("value", "version"), [(-1, 4), (2**32, 4), (2**128, 6), (1, 5)])
def test_classify_int_refuses_out_of_range(value: int, version: int) -> None:
    with pytest.raises(AddressError):
        CLASSIFIER.classify_int(value, version)


# --- text forms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),  # RFC 5952 4.2.3: the first of equal runs
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # 4.2.2: one zero group stays
        ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),  # 4.2.3: the longest run
        ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
        ("::ffff:102:304", "::ffff:1.2.3.4"),  # RFC 5952 section 5
        ("0:0:0:0:0:ffff:0102:0304", "::ffff:1.2.3.4"),
        ("64:ff9b::8.8.8.8", "64:ff9b::8.8.8.8"),
        ("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"),
        ("::2:3:4:5:6:7:8", "0:2:3:4:5:6:7:8"),
        ("fe80::1:2.3.4.5", "fe80::1:203:405"),
        ("1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:102:304"),
        ("::", "::"),
        ("::1", "::1"),
        ("1::", "1::"),
        ("255.255.255.255", "255.255.255.255"),
        ("0.0.0.0", "0.0.0.0"),
    ],
)
def test_accepted_forms(text: str, normalized: str) -> None:
    assert CLASSIFIER.classify(text).normalized == normalized


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("01.2.3.4", "leading zero"),
        ("1.2.3.010", "leading zero"),
        ("::ffff:1.2.3.04", "in the dotted tail has a leading zero"),
        ("10.0.0.0/8", "prefix length"),
        ("2001:db8::/32", "prefix length"),
        ("[::1]", "brackets"),
        ("[2001:db8::1]:443", "brackets"),
        ("3232235777", "integer forms"),
        ("0x7f000001", "integer forms"),
        ("127.1", "2 dotted parts"),
        ("10.1.2", "3 dotted parts"),
        ("1.2.3.4.5", "5 dotted parts"),
        ("0x7f.0.0.1", "not a decimal number"),
        ("1.2.3.256", "greater than 255"),
        (" 8.8.8.8", "whitespace"),
        ("8.8.8.8\n", "whitespace"),
        ("::1 ", "whitespace"),
        ("fe80::1%", "empty zone"),
        ("fe80::1%eth 0", "zone"),
        ("1::2::3", "more than once"),
        ("12345::1", "more than 4 hex digits"),
        ("g::1", "not hexadecimal"),
        ("1:2:3:4:5:6:7", "7 groups"),
        ("1:2:3:4:5:6:7:8:9", "9 groups"),
        ("1:2:3:4:5:6:7:8::", "too many groups"),
        (":1:2:3:4:5:6:7", "empty group"),
        ("1:2:3:4:5:6:7:", "empty group"),
        ("::1.2.3.4:5", "dotted quad may only end"),
        ("", "empty"),
        ("\u0661.\u0662.\u0663.\u0664", "not a decimal number"),  # Arabic-Indic digits
        ("localhost", "integer forms"),
    ],
)
def test_refused_forms(text: str, why: str) -> None:
    with pytest.raises(AddressError) as caught:
        CLASSIFIER.classify(text)
    message = str(caught.value)
    assert repr(text) in message and why in message


# --- properties against ipaddress ---------------------------------------------------------------

ipv6_values = st.integers(min_value=0, max_value=2**128 - 1)
ipv4_values = st.integers(min_value=0, max_value=2**32 - 1)


def _embeds_dotted(value: int) -> bool:
    return value >> 32 == 0xFFFF or value >> 32 == 0x64FF9B << 64


@given(ipv6_values)
@example(0xFFFF00000000)
@example(0x0064FF9B << 96)
def test_canonical_text_round_trips(value: int) -> None:
    text = format_ipv6(value)
    assert parse_address(text) == (6, value, None)
    assert text == text.lower()
    if not _embeds_dotted(value):
        assert text == ipaddress.IPv6Address(value).compressed


@given(ipv6_values, st.sampled_from(["exploded", "compressed", "upper", "nozero"]))
def test_textual_variants_parse_like_ipaddress(value: int, form: str) -> None:
    address = ipaddress.IPv6Address(value)
    text = {
        "exploded": address.exploded,
        "compressed": address.compressed,
        "upper": address.exploded.upper(),
        "nozero": ":".join(g.lstrip("0") or "0" for g in address.exploded.split(":")),
    }[form]
    verdict = CLASSIFIER.classify(text)
    assert int(verdict.address_int) == value
    assert verdict.expanded == address.exploded


@given(ipv6_values, ipv4_values)
def test_dotted_tail_forms(high: int, low: int) -> None:
    value = (high >> 32 << 32) | low
    groups = ipaddress.IPv6Address(value).exploded.split(":")[:6]
    text = ":".join(groups) + ":" + str(ipaddress.IPv4Address(low))
    assert parse_address(text) == (6, value, None)


@given(ipv4_values)
def test_ipv4_round_trips(value: int) -> None:
    text = str(ipaddress.IPv4Address(value))
    verdict = CLASSIFIER.classify(text)
    assert (verdict.normalized, int(verdict.address_int)) == (text, value)


ADDRESS_ALPHABET = st.sampled_from(
    [*"0123456789abcdefABCDEF:.%/[] xg", "::", "ffff", "1.2.3.4", "%eth0"]
)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=60), st.lists(ADDRESS_ALPHABET, max_size=16).map("".join)))
def test_any_text_is_accepted_exactly_like_ipaddress_or_refused(text: str) -> None:
    """Random text: a clear AddressError, or the same value ipaddress finds."""
    try:
        version, value, zone = parse_address(text)
    except AddressError as error:
        assert repr(text) in str(error)
        return
    plain = text.split("%", 1)[0]
    assert int(ipaddress.ip_address(plain)) == value
    assert ipaddress.ip_address(plain).version == version
    assert (zone is None) == ("%" not in text)


@given(st.binary(max_size=40))
def test_bytes_are_refused_clearly(raw: bytes) -> None:
    with pytest.raises(AddressError):
        parse_address(raw)  # type: ignore[arg-type]
