"""Is this remote address on the public internet?  Exact verdicts for IPv6 and IPv4.

The decision follows the IANA IPv6 and IPv4 Special-Purpose Address Registries (RFC 6890),
shipped as data in ``agent/data/``, plus the rules those registries leave to the reader:

1. ``::ffff:0:0/96`` IPv4-mapped (RFC 4291 section 2.5.5.2): the embedded IPv4 address decides.
2. ``64:ff9b::/96`` NAT64 well-known prefix (RFC 6052): the embedded IPv4 address decides.
3. ``2002::/16`` 6to4 (RFC 3056): the IPv4 address in bits 16-47 decides.
4. ``2001::/32`` Teredo (RFC 4380): external, it tunnels over the IPv4 internet.
5. Multicast: IPv6 ``ff00::/8`` by its scope (RFC 4291 section 2.7, RFC 7346); IPv4
   ``224.0.0.0/4`` by block (RFC 5771, RFC 2365, RFC 6676).
6. The most specific registry entry without a termination date decides by its Globally
   Reachable flag.
7. IPv6 outside ``2000::/3`` (RFC 4291 section 2.4) that nothing above matched is not external.
8. Everything else is global unicast: external.

Addresses inside the configured ``internal_networks`` (or whose embedded IPv4 address is) are
``internal``, never external.  Text is parsed strictly (RFC 4291 section 2.2 for IPv6, RFC 4007
for zones, the dotted-decimal form of RFC 6943 section 3.1.1 for IPv4); the kernel's integers
are classified without going through text.
"""

from __future__ import annotations

import csv
import functools
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Dict,
    Generic,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from agent.inet import IPV4_BITS, IPV4_MAPPED, IPV6_BITS, NAT64_WELL_KNOWN, in_block

DATA_DIR = Path(__file__).with_name("data")

SIX_TO_FOUR = (0x2002 << 112, 16)  # 2002::/16
TEREDO = (0x20010000 << 96, 32)  # 2001::/32
GLOBAL_UNICAST = (0x2000 << 112, 3)  # 2000::/3
IPV6_MULTICAST = (0xFF << 120, 8)  # ff00::/8

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class AddressError(ValueError):
    """An address given as text that is not one strict IPv4 or IPv6 address."""


class Judgement(NamedTuple):
    """What decides: the verdict without its text forms (the sampler's filter needs no more)."""

    external: bool
    category: str
    reason: str
    via: Optional[str]
    embedded_ipv4: Optional[int]


class Verdict(NamedTuple):
    """The classification of one address; ``external`` is the answer, the rest explains it.

    A named tuple rather than a dataclass: the sampler builds one per distinct peer, and a
    tuple is several times cheaper to make.
    """

    address: str
    version: int
    normalized: str
    expanded: str
    address_int: str
    external: bool
    category: str
    via: Optional[str]
    embedded_ipv4: Optional[str]
    zone: Optional[str]
    reason: str


@dataclass(frozen=True)
class Block:
    """One address block with what it means: a registry entry or a rule's block."""

    prefix: str
    name: str
    rfc: str
    external: bool
    category: str

    @property
    def reason(self) -> str:
        return f"{self.name} ({self.rfc})"


T = TypeVar("T")


class PrefixTable(Generic[T]):
    """Longest-prefix match over integer addresses of one family.

    One dict per prefix length, probed from the longest: a registry has about ten distinct
    lengths, so a lookup is a handful of shifts and dict probes.
    """

    def __init__(self, bits: int, entries: Iterable[Tuple[int, int, T]]) -> None:
        self.bits = bits
        by_length: Dict[int, Dict[int, T]] = {}
        for network, length, value in entries:
            by_length.setdefault(length, {})[network >> (bits - length)] = value
        self._levels: List[Tuple[int, Dict[int, T]]] = [
            (bits - length, by_length[length]) for length in sorted(by_length, reverse=True)
        ]

    def lookup(self, value: int) -> Optional[T]:
        for shift, table in self._levels:
            found = table.get(value >> shift)
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class Registries:
    """The data files of ``agent/data``, parsed once per process (see :func:`load_registries`)."""

    special_v4: PrefixTable[Block]
    special_v6: PrefixTable[Block]
    multicast_v4: PrefixTable[Block]
    multicast_v6_scopes: Dict[int, Block]
    outside_global_v6: PrefixTable[Block]


def _read_csv(name: str) -> List[Dict[str, str]]:
    with (DATA_DIR / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _flag(text: str) -> Optional[bool]:
    """IANA's flag cells: ``True``, ``False``, ``False [1]`` (footnoted), ``N/A [2]``."""
    word = text.split(" ", 1)[0]
    return {"True": True, "False": False}.get(word)


def _network(prefix: str) -> Tuple[int, int, int]:
    net = ipaddress.ip_network(prefix)
    return int(net.network_address), net.prefixlen, net.version


def _table(bits: int, blocks: Iterable[Block]) -> PrefixTable[Block]:
    rows = []
    for block in blocks:
        network, length, _ = _network(block.prefix)
        rows.append((network, length, block))
    return PrefixTable(bits, rows)


@functools.lru_cache(maxsize=None)
def load_registries() -> Registries:
    """Parse the shipped registries.  Entries with a termination date no longer apply
    (their addresses fall back to the enclosing entry or the general rule)."""
    categories = {row["address_block"]: row["category"] for row in _read_csv("categories.csv")}

    def special(name: str) -> List[Block]:
        blocks = []
        for row in _read_csv(name):
            if row["termination_date"] not in ("", "N/A"):
                continue
            blocks.append(
                Block(
                    prefix=row["address_block"],
                    name=row["name"],
                    rfc=row["rfc"],
                    external=bool(_flag(row["globally_reachable"])),
                    category=categories[row["address_block"]],
                )
            )
        return blocks

    def plain(name: str, default_category: str = "") -> List[Block]:
        return [
            Block(
                prefix=row.get("address_block") or row["scope"],
                name=row["name"],
                rfc=row["rfc"],
                external=_flag(row.get("globally_reachable", "False")) is True,
                category=row.get("category") or default_category,
            )
            for row in _read_csv(name)
        ]

    return Registries(
        special_v4=_table(IPV4_BITS, special("iana-ipv4-special-registry.csv")),
        special_v6=_table(IPV6_BITS, special("iana-ipv6-special-registry.csv")),
        multicast_v4=_table(IPV4_BITS, plain("ipv4-multicast.csv")),
        multicast_v6_scopes={
            int(block.prefix, 16): block
            for block in plain("ipv6-multicast-scopes.csv", "multicast")
        },
        outside_global_v6=_table(IPV6_BITS, plain("ipv6-outside-global-unicast.csv")),
    )


# --- text forms ---------------------------------------------------------------------------

_DEC_OCTET = re.compile(r"[0-9]{1,3}\Z")
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}\Z")
_ZONE = re.compile(r"[!-~]{1,64}\Z")  # printable ASCII, no space; an interface name or index


def format_ipv4(value: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def expand_ipv6(value: int) -> str:
    """Eight four-digit lower-case groups: ``2001:0db8:0000:...``."""
    text = f"{value:032x}"
    return ":".join(text[i : i + 4] for i in range(0, 32, 4))


def format_ipv6(value: int) -> str:
    """RFC 5952 canonical text.

    Section 4: lower case, no leading zeros, the longest run of two or more zero groups
    replaced by ``::`` (the first on a tie).  Section 5: IPv4-mapped and (RFC 6052 section 2.4)
    NAT64 well-known-prefix addresses end in a dotted quad.
    """
    dotted = in_block(value, IPV4_MAPPED) or in_block(value, NAT64_WELL_KNOWN)
    groups = [(value >> (112 - 16 * i)) & 0xFFFF for i in range(6 if dotted else 8)]
    best_start, best_len, run_start = -1, 1, -1
    for i, group in enumerate([*groups, 1]):
        if group == 0 and run_start < 0:
            run_start = i
        elif group != 0 and run_start >= 0:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = -1
    words = [f"{g:x}" for g in groups]
    tail = [format_ipv4(value & 0xFFFFFFFF)] if dotted else []
    if best_start < 0:
        return ":".join(words + tail)
    head = ":".join(words[:best_start])
    rest = ":".join(words[best_start + best_len :] + tail)
    return f"{head}::{rest}"


def _parse_ipv4(text: str, original: str, where: str = "") -> int:
    parts = text.split(".")
    if len(parts) != 4:
        raise AddressError(
            f"{original!r}: IPv4 address{where} has {len(parts)} dotted parts, expected 4 "
            "(shorthand inet_aton forms are not accepted)"
        )
    value = 0
    for part in parts:
        if not _DEC_OCTET.match(part):
            raise AddressError(
                f"{original!r}: IPv4 part {part!r}{where} is not a decimal number of 1-3 digits"
            )
        if len(part) > 1 and part[0] == "0":
            raise AddressError(
                f"{original!r}: IPv4 part {part!r}{where} has a leading zero "
                "(ambiguous: inet_aton reads it as octal)"
            )
        octet = int(part)
        if octet > 255:
            raise AddressError(f"{original!r}: IPv4 part {part!r}{where} is greater than 255")
        value = value << 8 | octet
    return value


def _parse_groups(text: str, original: str) -> List[int]:
    if text == "":
        return []
    groups = []
    for group in text.split(":"):
        if group == "":
            raise AddressError(
                f"{original!r}: empty group (a lone ':' where '::' or a group belongs)"
            )
        if not _HEX_GROUP.match(group):
            problem = "more than 4 hex digits" if len(group) > 4 else "not hexadecimal"
            raise AddressError(f"{original!r}: group {group!r} has {problem}")
        groups.append(int(group, 16))
    return groups


def _parse_ipv6(text: str, original: str) -> int:
    tail: List[int] = []
    last_colon = text.rfind(":")
    if "." in text[last_colon + 1 :]:
        v4 = _parse_ipv4(text[last_colon + 1 :], original, " in the dotted tail")
        tail = [v4 >> 16, v4 & 0xFFFF]
        text = text[: last_colon + 1]
        if not text.endswith("::"):
            text = text[:-1]  # drop the ':' before the dotted quad, keep a '::'

    if "." in text:
        raise AddressError(f"{original!r}: a dotted quad may only end an IPv6 address")
    halves = text.split("::")
    if len(halves) > 2:
        raise AddressError(f"{original!r}: '::' appears more than once")
    if len(halves) == 2:
        head = _parse_groups(halves[0], original)
        rest = _parse_groups(halves[1], original) + tail
        if len(head) + len(rest) > 7:
            raise AddressError(f"{original!r}: too many groups for '::' to stand for any")
        groups = head + [0] * (8 - len(head) - len(rest)) + rest
    else:
        groups = _parse_groups(text, original) + tail
        if len(groups) != 8:
            raise AddressError(f"{original!r}: {len(groups)} groups, expected 8 (or a '::')")
    value = 0
    for group in groups:
        value = value << 16 | group
    return value


MAX_ADDRESS_LENGTH = 110
"""The longest text that can be an address: 45 characters of IPv6 with a dotted tail
(``ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255``), ``%`` and a 64-character zone."""


def _bounded(value: object, limit: int = 60) -> str:
    """``repr`` of a value for a message, cut to ``limit`` characters: a 100 KB input must not
    make a 100 KB error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_address(text: str) -> Tuple[int, int, Optional[str]]:
    """Parse strict address text into ``(version, integer value, zone)``.

    Raises :class:`AddressError` naming the input and the reason: prefix lengths, brackets,
    surrounding whitespace, integer and ``inet_aton`` shorthand forms, IPv4 leading zeros,
    empty zones, a second ``::`` and five-digit groups are all refused.
    """
    if not isinstance(text, str):
        raise AddressError(f"{_bounded(text)}: an address must be text")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"{_bounded(text)} ({len(text)} characters): longer than any address")
    if text == "":
        raise AddressError("'': empty address")
    if text != text.strip():
        raise AddressError(f"{text!r}: surrounding whitespace")
    if "/" in text:
        raise AddressError(f"{text!r}: a prefix length is not an address (give one address)")
    if text[0] == "[" or text[-1] == "]":
        raise AddressError(f"{text!r}: brackets belong to URLs, not to addresses")
    if ":" not in text:
        if "." not in text:
            raise AddressError(f"{text!r}: not an address (integer forms are not accepted)")
        return 4, _parse_ipv4(text, text), None
    address, percent, zone = text.partition("%")
    if percent and not zone:
        raise AddressError(f"{text!r}: empty zone after '%'")
    if percent and not _ZONE.match(zone):
        raise AddressError(f"{text!r}: zone {zone!r} must be 1-64 printable characters")
    return 6, _parse_ipv6(address, text), (zone if percent else None)


# --- the verdict ----------------------------------------------------------------------------


def _embedded_ipv4(value: int) -> Optional[Tuple[str, int]]:
    """Rules 1-4: the IPv6 transition mechanism carrying an IPv4 address, and that address."""
    if in_block(value, IPV4_MAPPED):
        return "ipv4_mapped", value & 0xFFFFFFFF
    if in_block(value, NAT64_WELL_KNOWN):
        return "nat64", value & 0xFFFFFFFF
    if in_block(value, SIX_TO_FOUR):
        return "6to4", (value >> 80) & 0xFFFFFFFF
    if in_block(value, TEREDO):
        # RFC 4380 section 4: the client's public IPv4 address, bits inverted, in the last 32.
        return "teredo", ~value & 0xFFFFFFFF
    return None


VIA_NAMES = {
    "ipv4_mapped": "IPv4-mapped (RFC4291)",
    "nat64": "NAT64 well-known prefix (RFC6052)",
    "6to4": "6to4 (RFC3056)",
    "teredo": "Teredo (RFC4380)",
}


NEVER_EXTERNAL: Tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
"""Special-purpose blocks not globally reachable in which no more specific entry is (RFC 6890
registries: this network, private use RFC 1918, shared RFC 6598, loopback, link local,
unspecified, unique local RFC 4193), so no address inside them is ever external.  These are
where a host's internal connections live; the sampler lets the kernel drop them unseen."""


class Classifier:
    """Verdicts for addresses, given the organisation's own ``internal_networks``.

    ``classify_int`` is the sampler's hot path: the kernel's integers go in, verdicts come out,
    cached per address (a host talks to the same peers again and again).
    """

    CACHE_LIMIT = 65536

    def __init__(self, internal_networks: Sequence[Network] = ()) -> None:
        self._registries = load_registries()
        self._internal = {
            version: PrefixTable(
                bits,
                [
                    (int(n.network_address), n.prefixlen, n)
                    for n in internal_networks
                    if n.version == version
                ],
            )
            for version, bits in ((4, IPV4_BITS), (6, IPV6_BITS))
        }
        self._has_internal = bool(internal_networks)
        self._internal_networks = tuple(internal_networks)
        self._verdicts: Dict[Tuple[int, int], Verdict] = {}
        self._judgements: Dict[Tuple[int, int], Judgement] = {}

    def never_external(self) -> List[Tuple[int, int, int]]:
        """(version, network, prefix length) of blocks no address of which is external here:
        :data:`NEVER_EXTERNAL` and the configured ``internal_networks``.  An IPv4 block also
        covers the IPv4-mapped IPv6 addresses of its addresses (rule 1 above)."""
        blocks = []
        for prefix in NEVER_EXTERNAL:
            network, length, version = _network(prefix)
            blocks.append((version, network, length))
        for version in (4, 6):
            blocks.extend(
                (version, int(n.network_address), n.prefixlen)
                for n in self._internal_networks
                if n.version == version
            )
        return blocks

    def classify(self, text: str) -> Verdict:
        """Classify address text (raises :class:`AddressError` for anything not strict)."""
        version, value, zone = parse_address(text)
        return self.classify_int(value, version)._replace(address=text, zone=zone)

    def classify_int(self, value: int, version: int) -> Verdict:
        """Classify the integer value of an address (as ``/proc/net/*`` gives it, decoded)."""
        key = (version, value)
        verdict = self._verdicts.get(key)
        if verdict is None:
            judgement = self.judge(value, version)
            if version == 4:
                normalized = expanded = format_ipv4(value)
            else:
                normalized, expanded = format_ipv6(value), expand_ipv6(value)
            embedded = judgement.embedded_ipv4
            verdict = Verdict(
                address=normalized,
                version=version,
                normalized=normalized,
                expanded=expanded,
                address_int=str(value),
                external=judgement.external,
                category=judgement.category,
                via=judgement.via,
                embedded_ipv4=None if embedded is None else format_ipv4(embedded),
                zone=None,
                reason=judgement.reason,
            )
            if len(self._verdicts) >= self.CACHE_LIMIT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def judge(self, value: int, version: int) -> Judgement:
        """Decide without building text: what the sampler asks of every socket's peer."""
        key = (version, value)
        judgement = self._judgements.get(key)
        if judgement is None:
            judgement = self._decide(value, version)
            if len(self._judgements) >= self.CACHE_LIMIT:
                self._judgements.clear()
            self._judgements[key] = judgement
        return judgement

    def _decide(self, value: int, version: int) -> Judgement:
        if version == 4:
            if not 0 <= value < 1 << IPV4_BITS:
                raise AddressError(f"{value}: out of range for IPv4")
            via, embedded = None, None
            external, category, reason = self._decide_ipv4(value)
        elif version == 6:
            if not 0 <= value < 1 << IPV6_BITS:
                raise AddressError(f"{value}: out of range for IPv6")
            carried = _embedded_ipv4(value)
            via, embedded = carried if carried else (None, None)
            external, category, reason = self._decide_ipv6(value, via, embedded)
        else:
            raise AddressError(f"IP version {version!r}: expected 4 or 6")
        internal = self._internal_network(value, version, embedded)
        if internal is not None:
            external, category = False, "internal"
            reason = f"inside internal_networks entry {internal} (configuration)"
        return Judgement(external, category, reason, via, embedded)

    def _internal_network(
        self, value: int, version: int, embedded: Optional[int]
    ) -> Optional[Network]:
        if not self._has_internal:
            return None
        found = self._internal[version].lookup(value)
        if found is None and embedded is not None:
            found = self._internal[4].lookup(embedded)
        return found

    def _decide_ipv4(self, value: int) -> Tuple[bool, str, str]:
        registries = self._registries
        if value >> 28 == 0xE:  # 224.0.0.0/4
            block = registries.multicast_v4.lookup(value)
        else:
            block = registries.special_v4.lookup(value)
        if block is None:
            return True, "global", "global unicast: no special-purpose entry applies (RFC6890)"
        return block.external, block.category, block.reason

    def _decide_ipv6(
        self, value: int, via: Optional[str], embedded: Optional[int]
    ) -> Tuple[bool, str, str]:
        registries = self._registries
        if via == "teredo":
            return True, "teredo", f"{VIA_NAMES[via]}: tunnels over the IPv4 internet"
        if via is not None and embedded is not None:
            external, category, reason = self._decide_ipv4(embedded)
            return external, category, f"{VIA_NAMES[via]} {format_ipv4(embedded)}: {reason}"
        if in_block(value, IPV6_MULTICAST):
            block = registries.multicast_v6_scopes[(value >> 112) & 0xF]
            return block.external, block.category, f"Multicast, {block.reason}"
        special = registries.special_v6.lookup(value)
        if special is not None:
            return special.external, special.category, special.reason
        global_unicast = in_block(value, GLOBAL_UNICAST)
        outside = None if global_unicast else registries.outside_global_v6.lookup(value)
        if outside is not None:  # the table holds ::/0, so every address outside 2000::/3
            return False, outside.category, outside.reason
        return True, "global", "global unicast: no special-purpose entry applies (RFC6890)"
