"""The configuration file: strict YAML into frozen, typed settings.

Looked up in this order: an explicit ``--config FILE``, ``$EGRESS_AGENT_CONFIG``,
``/etc/egress-agent/config.yaml`` (only if it exists), then the built-in defaults.  The file is
parsed with ``yaml.safe_load`` semantics (no Python objects) and checked completely before
anything is returned: an unknown key, a wrong type, a bad CIDR or port raises
:class:`ConfigError` with one line that names the file, the key path and the problem, quoting
the offending value.  Nothing half-read ever reaches the caller.

``config/egress-agent.yaml`` is the shipped file; it documents every key and holds exactly the
defaults below.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple, TypeVar, Union

import yaml

from agent.inet import PROTOCOL_NUMBERS
from agent.textsafe import one_line, safe_text

DEFAULT_PATH = "/etc/egress-agent/config.yaml"
ENVIRONMENT_VARIABLE = "EGRESS_AGENT_CONFIG"
DEFAULT_HISTORY_PATH = "/var/lib/egress-agent/history.db"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DIRECTIONS = ("outbound", "inbound")
# systemd.unit(5): the unit types; a unit name without one of these suffixes means ".service",
# as systemctl reads it (unit_name_mangle() in systemd's src/basic/unit-name.c).
SYSTEMD_UNIT_TYPES = (
    ".service",
    ".socket",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".target",
    ".path",
    ".timer",
    ".slice",
    ".scope",
)
GLOB_CHARACTERS = frozenset("*?[")


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line, ready for stderr."""


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of ports; a single port is ``PortRange(443, 443)``."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class AllowRule:
    """One ``allow`` entry: a connection matches when every matcher the rule names matches.

    Each matcher is a tuple of alternatives (any one may match); an empty tuple means the rule
    does not name that matcher.  ``name``, ``path``, ``systemd_unit`` and ``user_unit`` hold
    glob patterns (``fnmatch``, case-sensitive), ``user`` user names or decimal uids,
    ``container_id`` id prefixes, ``container_name``, ``container_image`` and ``pod_namespace``
    globs matched against what the container runtime's own files say (:mod:`agent.containers`),
    ``protocol`` IP protocol numbers (6, 17, 1, 58, 132, 255), ``direction``
    ``outbound``/``inbound``, ``domains`` DNS names in lower case without the trailing dot,
    each exact or ``*.`` and a name (any name below it, :func:`parse_domain`), ``sha256``
    digests (64 lower-case hex digits), ``package`` package names.
    """

    index: int
    comment: str = ""
    name: Tuple[str, ...] = ()
    path: Tuple[str, ...] = ()
    user: Tuple[str, ...] = ()
    systemd_unit: Tuple[str, ...] = ()
    container_id: Tuple[str, ...] = ()
    container_name: Tuple[str, ...] = ()
    container_image: Tuple[str, ...] = ()
    pod_namespace: Tuple[str, ...] = ()
    destinations: Tuple[Network, ...] = ()
    ports: Tuple[PortRange, ...] = ()
    protocol: Tuple[int, ...] = ()
    direction: Tuple[str, ...] = ()
    domains: Tuple[str, ...] = ()
    user_unit: Tuple[str, ...] = ()
    sha256: Tuple[str, ...] = ()
    package: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How reports name the rule: its comment, else its place in the file (``allow[2]``)."""
        return self.comment or f"allow[{self.index}]"


@dataclass(frozen=True)
class Settings:
    """Everything the configuration file can set, with the built-in defaults.

    ``source`` is the file the settings were read from (``None``: the built-in defaults).  It
    says where they came from, not what they do, so it takes no part in equality.
    """

    internal_networks: Tuple[Network, ...] = ()
    sampling_interval: float = 5.0
    sampling_full_read_every: float = 30.0
    """Seconds: the longest a network namespace's TCP connections are taken from an earlier
    dump because none of its counters moved (``agent/collect/sockets/changes.py``); 0 reads every
    namespace in full every time."""
    history_enabled: bool = True
    history_path: str = DEFAULT_HISTORY_PATH
    history_retention_days: float = 30.0
    history_max_rows: int = 100000
    history_key_file: Optional[str] = None
    """The operator's host key: the history's chain is signed with it (HMAC-SHA256)."""
    events_enabled: bool = True
    """Watch kernel events (tracefs) where the kernel allows it: every connection, not samples."""
    events_max_rows: int = 20000
    events_expiry: float = 3600.0
    allow: Tuple[AllowRule, ...] = ()
    source: Optional[str] = field(default=None, compare=False)


# --- quoting values safely in messages ------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
QUOTE_LIMIT = 80


def quote(value: object) -> str:
    """``repr`` of a value for a one-line message: bounded in size and free of control characters.

    ``reprlib`` bounds the work for huge or self-referencing YAML structures (aliases can make
    a small file expand into a very large object); ``repr`` escapes control characters, lone
    surrogates and other unprintable code points.
    """
    text = _REPR.repr(value)
    if len(text) > QUOTE_LIMIT:
        text = text[: QUOTE_LIMIT - 3] + "..."
    return safe_text(text)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def _key_part(key: object) -> str:
    """A mapping key as part of a key path: plain names as they are, anything else quoted."""
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return key
    return f"[{quote(key)}]"


# --- validation primitives ------------------------------------------------------------------


class _Invalid(Exception):
    """A problem at one key path; turned into a :class:`ConfigError` naming the file."""

    def __init__(self, where: str, problem: str, value: object = None, show_value: bool = True):
        super().__init__(where, problem)
        self.where = where
        self.problem = problem
        self.value = value
        self.show_value = show_value

    def message(self, source: str) -> str:
        text = f"{safe_text(source)}: {self.where}: {self.problem}"
        if self.show_value:
            text += f" (got {quote(self.value)})"
        return text


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _mapping(value: object, where: str, known: Tuple[str, ...]) -> Dict[str, Any]:
    """A YAML mapping with only ``known`` keys; ``null`` (an empty section) counts as ``{}``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(where, f"must be a mapping, not {_type_name(value)}", value)
    for key in value:
        if key not in known:
            inside = f"{where}." if where != "top level" else ""
            raise _Invalid(
                f"{inside}{_key_part(key)}",
                f"unknown key (known here: {', '.join(known)})",
                show_value=False,
            )
    return value


def _number(value: object, where: str) -> float:
    """A finite number greater than zero; booleans are not numbers here, whatever Python says."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(where, f"must be a number greater than 0, not {_type_name(value)}", value)
    if math.isnan(value) or value <= 0:
        raise _Invalid(where, "must be a number greater than 0", value)
    if math.isinf(value):
        raise _Invalid(where, "must be a finite number", value)
    return float(value)


def _number_or_zero(value: object, where: str) -> float:
    """A finite number of at least 0."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return _number(value, where)
    except _Invalid:
        raise _Invalid(where, "must be a number of at least 0", value) from None


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(
            where, f"must be a whole number of at least 1, not {_type_name(value)}", value
        )
    if not isinstance(value, int) or value < 1:
        raise _Invalid(where, "must be a whole number of at least 1", value)
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(where, f"must be true or false, not {_type_name(value)}", value)
    return value


def _text(value: object, where: str, what: str = "a string") -> str:
    if isinstance(value, bool):
        hint = " (quote it: YAML reads yes/no/on/off/true/false unquoted as booleans)"
        raise _Invalid(where, f"must be {what}, not a boolean{hint}", value)
    if not isinstance(value, str):
        raise _Invalid(where, f"must be {what}, not {_type_name(value)}", value)
    if value == "":
        raise _Invalid(where, f"must be {what}, not empty", value)
    if "\0" in value:
        raise _Invalid(where, "must not contain a NUL character", value)
    return value


T = TypeVar("T")


def _one_or_list(value: object, where: str, item: Callable[[object, str], T]) -> Tuple[T, ...]:
    """A matcher given as one value or a list of alternatives, each checked by ``item``."""
    if not isinstance(value, list):
        return (item(value, where),)
    if not value:
        raise _Invalid(where, "an empty list matches nothing: leave the key out instead", value)
    return tuple(item(element, f"{where}[{i}]") for i, element in enumerate(value))


def _list(value: object, where: str, item: Callable[[object, str], T]) -> Tuple[T, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid(where, f"must be a list, not {_type_name(value)}", value)
    return tuple(item(element, f"{where}[{i}]") for i, element in enumerate(value))


# --- networks and ports ---------------------------------------------------------------------

_IPV4_LEADING_ZERO = re.compile(r"(?:^|\.)0\d")


def parse_network(value: object, where: str) -> Network:
    """One CIDR (``10.0.0.0/8``, ``2001:db8::/32``; a bare address is a /32 or /128).

    Host bits must be clear (``ipaddress`` with ``strict=True``): ``10.1.2.3/8`` is refused
    with the network it probably means, since silently widening or narrowing an allow rule is
    worse than an error.  IPv4 octets with leading zeros are refused (octal or decimal? RFC 6943
    section 3.1.1), as are zone indexes, which have no place in a network.
    """
    text = _text(value, where, "a CIDR such as 192.0.2.0/24 or 2001:db8::/32")
    if text != text.strip():
        raise _Invalid(where, "surrounding whitespace in a CIDR", value)
    address = text.partition("/")[0]
    if "%" in address:
        raise _Invalid(where, "a zone index ('%...') has no place in a network", value)
    if ":" not in address and _IPV4_LEADING_ZERO.search(address):
        raise _Invalid(where, "leading zeros in an IPv4 address are ambiguous (octal?)", value)
    network_class = ipaddress.IPv6Network if ":" in address else ipaddress.IPv4Network
    try:
        return network_class(text, strict=True)
    except ValueError as error:
        try:
            loose = network_class(text, strict=False)
        except ValueError:
            raise _Invalid(where, f"not a CIDR: {one_line(str(error))}", value) from None
        raise _Invalid(where, f"host bits are set: did you mean {str(loose)!r}?", value) from None


def _port_number(text: str, value: object, where: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _Invalid(where, "a port must be a number 1-65535 or a range such as 8000-8080", value)
    port = int(text)
    if not 1 <= port <= 65535:
        raise _Invalid(where, "port must be 1-65535", value)
    return port


def parse_ports(value: object, where: str) -> PortRange:
    """One port (``443``) or an inclusive range given as text (``"8000-8080"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(
            where, f"a port must be a number or a range text, not {_type_name(value)}", value
        )
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise _Invalid(where, "port must be 1-65535", value)
        return PortRange(value, value)
    low_text, dash, high_text = value.partition("-")
    low = _port_number(low_text.strip(), value, where)
    high = _port_number(high_text.strip(), value, where) if dash else low
    if low > high:
        raise _Invalid(where, "a port range must run from low to high", value)
    return PortRange(low, high)


# --- the allow rules ------------------------------------------------------------------------

RULE_MATCHERS = (
    "name",
    "path",
    "user",
    "systemd_unit",
    "container_id",
    "container_name",
    "container_image",
    "pod_namespace",
    "destinations",
    "ports",
    "domains",
    "user_unit",
    "sha256",
    "package",
)
RULE_NARROWERS = ("protocol", "direction")
RULE_KEYS = (*RULE_MATCHERS, *RULE_NARROWERS, "comment")


def _pattern(value: object, where: str) -> str:
    return _text(value, where)


def _path_pattern(value: object, where: str) -> str:
    text = _text(value, where, "an absolute path or glob")
    if not text.startswith(("/", "*")):
        raise _Invalid(where, "must be an absolute path (or start with '*')", value)
    return text


def _user(value: object, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Invalid(where, "a uid must not be negative", value)
        return str(value)
    return _text(value, where, "a user name or uid")


def unit_pattern(text: str) -> str:
    """A unit name or glob as systemctl reads it: a plain name without a unit type suffix
    means ``NAME.service``."""
    if GLOB_CHARACTERS.isdisjoint(text) and not text.endswith(SYSTEMD_UNIT_TYPES):
        return text + ".service"
    return text


def _systemd_unit(value: object, where: str) -> str:
    """A unit name or glob (:func:`unit_pattern`)."""
    return unit_pattern(_text(value, where, "a systemd unit name or glob"))


def _container_id(value: object, where: str) -> str:
    text = _text(value, where, "a container id or id prefix")
    if text != text.strip():
        raise _Invalid(where, "surrounding whitespace in a container id", value)
    return text


_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.~_-]*\Z")


def _sha256(value: object, where: str) -> str:
    """A SHA-256 digest as ``sha256sum`` prints it (upper case is taken and lowered)."""
    text = _text(value, where, "a SHA-256 digest (64 hex digits)").lower()
    if not _SHA256.match(text):
        raise _Invalid(where, "a SHA-256 digest is 64 hex digits", value)
    return text


def _package(value: object, where: str) -> str:
    """A package name as dpkg and rpm spell them (``deb-control(5)``: lower case letters,
    digits, ``+ - . ~ _``), without an architecture."""
    text = _text(value, where, "a package name")
    if not _PACKAGE.match(text):
        raise _Invalid(
            where, "a package name holds lower-case letters, digits and + - . ~ _ only", value
        )
    return text


_DOMAIN_LABEL = re.compile(r"[a-z0-9_-]+\Z")


def parse_domain(value: object, where: str) -> str:
    """A DNS name to match (``api.github.com``) or ``*.`` and a name (``*.debian.org``: any
    name below debian.org, at any depth, not debian.org itself, as Envoy's and nginx's
    wildcard server names read).  Returned in lower case without the trailing dot, as
    :mod:`agent.collect.dns.parse` writes the names it sees.

    Refused: what no DNS answer can carry (RFC 1035 section 2.3.4: labels of 1 to 63
    characters, names of at most 253), characters outside letters, digits, ``-`` and ``_``,
    a label starting or ending with ``-`` (RFC 1123 section 2.1), a ``*`` anywhere but as the
    whole first label, a ``*`` alone, an all-numeric last label (an address, RFC 3696
    section 2), and non-ASCII text: DNS carries internationalised names as A-labels
    (``xn--...``, RFC 5890), and that form is the one to write.
    """
    text = _text(value, where, "a domain name such as api.github.com or *.debian.org")
    if text != text.strip():
        raise _Invalid(where, "surrounding whitespace in a domain name", value)
    if not text.isascii():
        raise _Invalid(
            where, "not ASCII: write an internationalised name as its A-labels (xn--...)", value
        )
    if ":" in text or "/" in text:
        raise _Invalid(where, "an address or network: those belong in destinations", value)
    name = text.lower()[:-1] if text.endswith(".") else text.lower()
    if not name:
        raise _Invalid(where, "the root ('.') is no name to match", value)
    if len(name) > 253:
        raise _Invalid(where, "a name longer than 253 characters (RFC 1035 section 2.3.4)", value)
    labels = name.split(".")
    for index, label in enumerate(labels):
        if not label:
            raise _Invalid(where, "an empty label (a leading dot, or two dots in a row)", value)
        if label == "*" and index == 0:
            if len(labels) == 1:
                raise _Invalid(where, "'*' alone would match every name; name a domain", value)
            continue
        if "*" in label:
            raise _Invalid(where, "'*' may only be the whole first label (*.example.com)", value)
        if len(label) > 63:
            raise _Invalid(where, f"a label longer than 63 characters ({len(label)})", value)
        if not _DOMAIN_LABEL.match(label):
            raise _Invalid(where, "a name holds only letters, digits, '-', '_' and dots", value)
        if label.startswith("-") or label.endswith("-"):
            raise _Invalid(where, "a label cannot start or end with '-' (RFC 1123)", value)
    if labels[-1].isdigit():
        raise _Invalid(where, "an address, not a name: addresses belong in destinations", value)
    return name


def _protocol(value: object, where: str) -> int:
    if not isinstance(value, str) or value.lower() not in PROTOCOL_NUMBERS:
        raise _Invalid(where, "must be one of " + ", ".join(PROTOCOL_NUMBERS), value)
    return PROTOCOL_NUMBERS[value.lower()]


def _direction(value: object, where: str) -> str:
    if value not in DIRECTIONS:
        raise _Invalid(where, "must be outbound or inbound", value)
    return str(value)


def _comment(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(where, f"must be a string, not {_type_name(value)}", value)
    return value


def parse_rule(value: object, index: int) -> AllowRule:
    where = f"allow[{index}]"
    rule = _mapping(value, where, RULE_KEYS)
    if not any(key in rule for key in RULE_MATCHERS):
        raise _Invalid(
            where,
            "a rule must name at least one of "
            f"{', '.join(RULE_MATCHERS)}: without one it would allow every connection",
            show_value=False,
        )
    parsers: Dict[str, Callable[[object, str], Any]] = {
        "name": _pattern,
        "path": _path_pattern,
        "user": _user,
        "systemd_unit": _systemd_unit,
        "container_id": _container_id,
        "container_name": _pattern,
        "container_image": _pattern,
        "pod_namespace": _pattern,
        "destinations": parse_network,
        "ports": parse_ports,
        "domains": parse_domain,
        "user_unit": _systemd_unit,
        "sha256": _sha256,
        "package": _package,
        "protocol": _protocol,
        "direction": _direction,
    }
    fields: Dict[str, Any] = {
        key: _one_or_list(rule[key], f"{where}.{key}", parse)
        for key, parse in parsers.items()
        if key in rule
    }
    comment = _comment(rule["comment"], f"{where}.comment") if "comment" in rule else ""
    return AllowRule(index=index, comment=comment, **fields)


# --- the whole file -------------------------------------------------------------------------

TOP_KEYS = ("classification", "sampling", "history", "events", "allow")


def _history_path(value: object, where: str) -> str:
    text = _text(value, where, "an absolute path")
    if not os.path.isabs(text):
        raise _Invalid(where, "must be an absolute path", value)
    return text


def _settings(data: object, source: Optional[str]) -> Settings:
    top = _mapping(data, "top level", TOP_KEYS)
    defaults = Settings()
    classification = _mapping(top.get("classification"), "classification", ("internal_networks",))
    sampling = _mapping(top.get("sampling"), "sampling", ("interval", "full_read_every"))
    history = _mapping(
        top.get("history"),
        "history",
        ("enabled", "path", "retention_days", "max_rows", "key_file"),
    )
    events = _mapping(top.get("events"), "events", ("enabled", "max_rows", "expiry"))

    def setting(
        section: Dict[str, Any], name: str, where: str, parse: Callable[[Any, str], T], default: T
    ) -> T:
        return parse(section[name], where) if name in section else default

    return Settings(
        internal_networks=_list(
            classification.get("internal_networks"),
            "classification.internal_networks",
            parse_network,
        ),
        sampling_interval=setting(
            sampling, "interval", "sampling.interval", _number, defaults.sampling_interval
        ),
        sampling_full_read_every=setting(
            sampling,
            "full_read_every",
            "sampling.full_read_every",
            _number_or_zero,
            defaults.sampling_full_read_every,
        ),
        history_enabled=setting(
            history, "enabled", "history.enabled", _bool, defaults.history_enabled
        ),
        history_path=setting(history, "path", "history.path", _history_path, defaults.history_path),
        history_retention_days=setting(
            history,
            "retention_days",
            "history.retention_days",
            _number,
            defaults.history_retention_days,
        ),
        history_max_rows=setting(
            history, "max_rows", "history.max_rows", _positive_int, defaults.history_max_rows
        ),
        history_key_file=setting(
            history, "key_file", "history.key_file", _history_path, defaults.history_key_file
        ),
        events_enabled=setting(events, "enabled", "events.enabled", _bool, defaults.events_enabled),
        events_max_rows=setting(
            events, "max_rows", "events.max_rows", _positive_int, defaults.events_max_rows
        ),
        events_expiry=setting(events, "expiry", "events.expiry", _number, defaults.events_expiry),
        allow=_list_of_rules(top.get("allow")),
        source=source,
    )


def _list_of_rules(value: object) -> Tuple[AllowRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid("allow", f"must be a list of rules, not {_type_name(value)}", value)
    return tuple(parse_rule(rule, index) for index, rule in enumerate(value))


def parse_settings(data: object, source: str) -> Settings:
    """Settings from already-parsed YAML (``None``, an empty file, means all defaults).

    ``source`` names the file in error messages and becomes ``Settings.source``.
    """
    try:
        return _settings(data, source)
    except _Invalid as problem:
        raise ConfigError(problem.message(source)) from None


# --- reading YAML -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last of duplicate keys silently; in a policy file that hides a
    mistake (two ``ports:`` in one rule), so it is an error here.  Keys brought in by a
    ``<<`` merge may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it with a message
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> object:
    """Parse YAML text; a syntax error becomes one line naming the file, line and column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{safe_text(source)}: {where}{one_line(problem)}") from None
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        character = f"U+{code:04X}"
        raise ConfigError(
            f"{safe_text(source)}: line {line}: character {character} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{safe_text(source)}: invalid YAML: {one_line(str(error))}") from None
    except RecursionError:
        raise ConfigError(f"{safe_text(source)}: YAML nested too deeply") from None


def _read(path: str) -> str:
    with open(path, "rb") as stream:
        data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{safe_text(path)}: line {line}: not UTF-8 text (byte {data[error.start]:#04x})"
        ) from None


def read_settings(path: str) -> Settings:
    """Settings from one file; any problem (missing, unreadable, invalid) is a ConfigError."""
    try:
        text = _read(path)
    except OSError as error:
        raise ConfigError(f"{safe_text(path)}: cannot read: {error.strerror or error}") from None
    return parse_settings(parse_yaml(text, path), path)


def load_settings(
    path: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
    default_path: str = DEFAULT_PATH,
) -> Settings:
    """The settings in effect: ``path`` (``--config``), else ``$EGRESS_AGENT_CONFIG``, else
    ``default_path`` if it exists, else the built-in defaults.

    A file named explicitly (argument or environment) must exist.  The default path counts as
    absent only when it does not exist; if it exists but cannot be read, that is an error, not
    a silent fallback to the defaults (which would drop the operator's allow rules).
    """
    if path is None:
        path = environ.get(ENVIRONMENT_VARIABLE) or None
    if path is not None:
        return read_settings(path)
    try:
        text = _read(default_path)
    except (FileNotFoundError, NotADirectoryError):
        return Settings()
    except OSError as error:
        raise ConfigError(
            f"{safe_text(default_path)}: cannot read: {error.strerror or error}"
        ) from None
    return parse_settings(parse_yaml(text, default_path), default_path)
