"""The configuration file: lookup order, defaults, the shipped file, and every refusal."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator

import pytest
import yaml
from conftest import run_as_nobody
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    DEFAULT_PATH,
    ENVIRONMENT_VARIABLE,
    RULE_KEYS,
    RULE_MATCHERS,
    TOP_KEYS,
    AllowRule,
    ConfigError,
    PortRange,
    Settings,
    load_settings,
    parse_settings,
    parse_yaml,
    quote,
    read_settings,
)
from agent.textsafe import safe_text

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "egress-agent.yaml"
SOURCE = "/etc/egress-agent/config.yaml"


def settings_from(text: str) -> Settings:
    return parse_settings(parse_yaml(text, SOURCE), SOURCE)


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from(text)
    message = str(caught.value)
    assert "\n" not in message and message.isprintable()
    assert safe_text(message) == message  # what the CLI prints is the message as it is
    return message


# --- defaults and the shipped file ----------------------------------------------------------


def test_defaults() -> None:
    defaults = Settings()
    assert defaults.internal_networks == ()
    assert defaults.sampling_interval == 5
    assert defaults.sampling_full_read_every == 30
    assert defaults.history_enabled is True
    assert defaults.history_path == "/var/lib/egress-agent/history.db"
    assert defaults.history_retention_days == 30
    assert defaults.history_max_rows == 100000
    assert defaults.allow == ()
    assert defaults.source is None


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n", "{}", "null", "---\n"])
def test_an_empty_file_means_all_defaults(text: str) -> None:
    result = settings_from(text)
    assert result == Settings()
    assert result.source == SOURCE


@pytest.mark.parametrize("section", ["classification", "sampling", "history"])
def test_an_empty_section_means_its_defaults(section: str) -> None:
    assert settings_from(f"{section}:\n") == Settings()
    assert settings_from(f"{section}: {{}}\n") == Settings()


def test_the_shipped_file_is_the_defaults() -> None:
    assert parse_settings(yaml.safe_load(SHIPPED.read_text()), str(SHIPPED)) == Settings()
    result = read_settings(str(SHIPPED))
    assert result == Settings()
    assert result.source == str(SHIPPED)


def test_the_shipped_file_names_every_key() -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    assert tuple(data) == TOP_KEYS
    assert set(data["classification"]) == {"internal_networks"}
    assert set(data["sampling"]) == {"interval", "full_read_every"}
    assert set(data["history"]) == {"enabled", "path", "retention_days", "max_rows"}
    assert set(data["events"]) == {"enabled", "max_rows", "expiry"}
    documented = set(re.findall(r"^#\s+(\w+):\s{2,}", SHIPPED.read_text(), re.MULTILINE))
    assert documented == set(RULE_KEYS)


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (2.5, 2.5), (60, 60.0)])
def test_full_read_every_takes_zero_or_more_seconds(value: float, expected: float) -> None:
    assert settings_from(f"sampling:\n  full_read_every: {value}\n").sampling_full_read_every == (
        expected
    )


@pytest.mark.parametrize("value", ["-1", "true", "'10'", ".nan", ".inf"])
def test_full_read_every_refuses_what_is_no_time(value: str) -> None:
    with pytest.raises(ConfigError, match=r"sampling\.full_read_every"):
        settings_from(f"sampling:\n  full_read_every: {value}\n")


def test_the_shipped_example_rules_are_valid() -> None:
    """The commented example in the shipped file, uncommented, is a valid configuration."""
    text = SHIPPED.read_text()
    example = text[text.index("# Example:\n#   allow:") + len("# Example:\n") :]
    lines = []
    for line in example.splitlines():
        if not line.startswith("#   "):
            break
        lines.append(line[4:])
    result = settings_from("\n".join(lines))
    assert len(result.allow) == 3
    packages, shipper, web = result.allow
    assert packages.name == ("apt", "apt-get", "http")
    assert packages.ports == (PortRange(80, 80), PortRange(443, 443))
    assert shipper.ports == (PortRange(9000, 9100),)
    assert shipper.protocol == (6,)
    assert web.systemd_unit == ("nginx.service",)
    assert web.label == "public web server answering clients"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().sampling_interval = 1  # type: ignore[misc]


def test_source_takes_no_part_in_equality() -> None:
    assert Settings(source="/a") == Settings(source=None)


# --- the lookup order -----------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path: Path) -> Dict[str, str]:
    paths = {}
    for name, interval in (("explicit", 1), ("environment", 2), ("default", 3)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"sampling:\n  interval: {interval}\n")
        paths[name] = str(path)
    return paths


def test_lookup_order(files: Dict[str, str], tmp_path: Path) -> None:
    environ = {ENVIRONMENT_VARIABLE: files["environment"]}
    explicit = load_settings(files["explicit"], environ, files["default"])
    assert (explicit.sampling_interval, explicit.source) == (1, files["explicit"])
    from_environment = load_settings(None, environ, files["default"])
    assert (from_environment.sampling_interval, from_environment.source) == (
        2,
        files["environment"],
    )
    from_default = load_settings(None, {}, files["default"])
    assert (from_default.sampling_interval, from_default.source) == (3, files["default"])
    absent = str(tmp_path / "absent.yaml")
    assert load_settings(None, {}, absent) == Settings()
    assert load_settings(None, {}, absent).source is None


def test_an_empty_environment_variable_is_not_set(files: Dict[str, str]) -> None:
    result = load_settings(None, {ENVIRONMENT_VARIABLE: ""}, files["default"])
    assert result.source == files["default"]


def test_the_default_path_is_the_etc_file() -> None:
    assert DEFAULT_PATH == "/etc/egress-agent/config.yaml"


def test_an_absent_default_path_under_a_file_means_defaults(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert load_settings(None, {}, str(tmp_path / "file" / "config.yaml")) == Settings()


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"^.*/absent\.yaml: cannot read: No such file"):
        load_settings(absent, {})
    with pytest.raises(ConfigError, match=r"^.*/absent\.yaml: cannot read: No such file"):
        load_settings(None, {ENVIRONMENT_VARIABLE: absent})


def test_an_unreadable_default_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    directory = tmp_path / "config.yaml"
    directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {}, str(directory))
    assert str(caught.value) == f"{directory}: cannot read: Is a directory"


def _load_as_nobody(path: str) -> str:
    """``load_settings(path)``'s error as ``nobody`` when we are root (root reads any file
    whatever its mode, so the refusal needs another user)."""
    b"".decode("utf-8-sig")  # the codec's module may be unreadable to nobody: load it here

    def load() -> str:
        try:
            load_settings(path, {})
        except ConfigError as error:
            return str(error)
        return "no error"

    result: str = run_as_nobody(load)
    return result


@pytest.fixture()
def open_directory() -> Iterator[Path]:
    """A temp dir every user can enter (pytest's own are 0700 under a 0700 parent)."""
    directory = Path(tempfile.mkdtemp(prefix="egress-agent-config-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def test_a_file_without_read_permission(open_directory: Path) -> None:
    path = open_directory / "config.yaml"
    path.write_text("{}")
    path.chmod(0o644)
    assert _load_as_nobody(str(path)) == "no error"
    path.chmod(0)
    assert _load_as_nobody(str(path)) == f"{path}: cannot read: Permission denied"


def test_a_file_name_with_control_characters_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "evil\nname\x1b.yaml"
    path.write_text("sampling: {interval: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), {})
    assert str(caught.value) == (
        f"{tmp_path}/evil\\nname\\x1b.yaml: sampling.interval: must be a number greater than 0"
        " (got 0)"
    )


# --- reading the file -----------------------------------------------------------------------


def test_yaml_syntax_errors_name_file_and_line() -> None:
    assert refusal("sampling:\n  interval: [5\n") == (
        f"{SOURCE}: line 3, column 1: expected ',' or ']', but got '<stream end>'"
    )
    assert refusal("sampling: interval: 5\n") == (
        f"{SOURCE}: line 1, column 19: mapping values are not allowed here"
    )
    assert refusal("allow:\n\t- name: x\n").startswith(f"{SOURCE}: line 2, column 1: ")


def test_a_duplicate_key_is_refused() -> None:
    assert refusal("sampling:\n  interval: 5\n  interval: 6\n") == (
        f"{SOURCE}: line 3, column 3: duplicate key 'interval'"
    )
    assert refusal("history: {}\nhistory: {}\n") == (
        f"{SOURCE}: line 2, column 1: duplicate key 'history'"
    )


def test_a_merge_key_may_be_overridden() -> None:
    text = "allow:\n  - &web {name: nginx, ports: [80, 443]}\n  - <<: *web\n    name: caddy\n"
    first, second = settings_from(text).allow
    assert (first.name, second.name) == (("nginx",), ("caddy",))
    assert second.ports == first.ports


def test_a_control_character_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("sampling:\n  interval: 5\x1b\n")
    with pytest.raises(ConfigError) as caught:
        read_settings(str(path))
    assert str(caught.value) == f"{path}: line 2: character U+001B is not allowed in YAML"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"allow:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        read_settings(str(path))
    assert str(caught.value) == f"{path}: line 2: not UTF-8 text (byte 0xe9)"


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbfsampling: {interval: 2}\n")
    assert read_settings(str(path)).sampling_interval == 2


def test_exponential_aliases_are_refused_quickly() -> None:
    """A "billion laughs" file: refused at the first wrong type, its value quoted in bounds."""
    text = "allow:\n  - name: &a [x, x, x, x, x, x, x, x, x]\n"
    for name, previous in zip("bcdefghijklmnop", "abcdefghijklmno"):
        text += f"  - name: &{name} [*{previous}, *{previous}, *{previous}, *{previous}]\n"
    assert refusal(text) == (
        f"{SOURCE}: allow[1].name[0]: must be a string, not a list"
        " (got ['x', 'x', 'x', 'x', 'x', 'x', ...])"
    )
    assert refusal("allow:\n  - name: &n [a, b]\n    path: *n\n") == (
        f"{SOURCE}: allow[0].path[0]: must be an absolute path (or start with '*') (got 'a')"
    )


def test_a_self_referencing_structure() -> None:
    assert refusal("allow: &a [*a]\n") == (
        f"{SOURCE}: allow[0]: must be a mapping, not a list (got [[[[...]]]])"
    )


# --- refusals: one line, the key path, the problem, the value -------------------------------

REFUSALS = [
    # the shape
    ("- 1\n", "top level: must be a mapping, not a list (got [1])"),
    ("just text\n", "top level: must be a mapping, not a string (got 'just text')"),
    (
        "samplin: {}\n",
        "samplin: unknown key (known here: classification, sampling, history, events, allow)",
    ),
    ("1: x\n", "[1]: unknown key (known here: classification, sampling, history, events, allow)"),
    (
        '"a\\nb\\e": 1\n',
        "['a\\nb\\x1b']: unknown key "
        "(known here: classification, sampling, history, events, allow)",
    ),
    (
        "sampling: {intervall: 5}\n",
        "sampling.intervall: unknown key (known here: interval, full_read_every)",
    ),
    ("sampling: 5\n", "sampling: must be a mapping, not a number (got 5)"),
    ("history: [path]\n", "history: must be a mapping, not a list (got ['path'])"),
    # classification
    (
        "classification: {internal_networks: 10.0.0.0/8}\n",
        "classification.internal_networks: must be a list, not a string (got '10.0.0.0/8')",
    ),
    (
        "classification: {internal_networks: [10.1.0.0/8]}\n",
        "classification.internal_networks[0]: host bits are set: did you mean '10.0.0.0/8'?"
        " (got '10.1.0.0/8')",
    ),
    (
        "classification: {internal_networks: ['10.0.0.0/8', '2001:db8::1/32']}\n",
        "classification.internal_networks[1]: host bits are set: did you mean '2001:db8::/32'?"
        " (got '2001:db8::1/32')",
    ),
    (
        "classification: {internal_networks: [10.0.0.0/33]}\n",
        "classification.internal_networks[0]: not a CIDR: '33' is not a valid netmask"
        " (got '10.0.0.0/33')",
    ),
    (
        "classification: {internal_networks: [256.0.0.0/8]}\n",
        "classification.internal_networks[0]: not a CIDR: Octet 256 (> 255) not permitted in"
        " '256.0.0.0' (got '256.0.0.0/8')",
    ),
    (
        "classification: {internal_networks: [010.0.0.0/8]}\n",
        "classification.internal_networks[0]: leading zeros in an IPv4 address are ambiguous"
        " (octal?) (got '010.0.0.0/8')",
    ),
    (
        "classification: {internal_networks: ['fe80::%eth0/64']}\n",
        "classification.internal_networks[0]: a zone index ('%...') has no place in a network"
        " (got 'fe80::%eth0/64')",
    ),
    (
        "classification: {internal_networks: [' 10.0.0.0/8']}\n",
        "classification.internal_networks[0]: surrounding whitespace in a CIDR (got ' 10.0.0.0/8')",
    ),
    (
        "classification: {internal_networks: [167772160]}\n",
        "classification.internal_networks[0]: must be a CIDR such as 192.0.2.0/24 or"
        " 2001:db8::/32, not a number (got 167772160)",
    ),
    (
        "classification: {internal_networks: ['']}\n",
        "classification.internal_networks[0]: must be a CIDR such as 192.0.2.0/24 or"
        " 2001:db8::/32, not empty (got '')",
    ),
    # sampling
    ("sampling: {interval: 0}\n", "sampling.interval: must be a number greater than 0 (got 0)"),
    (
        "sampling: {interval: -1.5}\n",
        "sampling.interval: must be a number greater than 0 (got -1.5)",
    ),
    (
        "sampling: {interval: true}\n",
        "sampling.interval: must be a number greater than 0, not a boolean (got True)",
    ),
    (
        "sampling: {interval: 5s}\n",
        "sampling.interval: must be a number greater than 0, not a string (got '5s')",
    ),
    (
        "sampling: {interval: .nan}\n",
        "sampling.interval: must be a number greater than 0 (got nan)",
    ),
    ("sampling: {interval: .inf}\n", "sampling.interval: must be a finite number (got inf)"),
    (
        "sampling: {interval: null}\n",
        "sampling.interval: must be a number greater than 0, not null (got None)",
    ),
    # history
    ("history: {enabled: 1}\n", "history.enabled: must be true or false, not a number (got 1)"),
    (
        "history: {enabled: 'no'}\n",
        "history.enabled: must be true or false, not a string (got 'no')",
    ),
    ("history: {path: history.db}\n", "history.path: must be an absolute path (got 'history.db')"),
    ("history: {path: ''}\n", "history.path: must be an absolute path, not empty (got '')"),
    (
        'history: {path: "/var/\\0x"}\n',
        "history.path: must not contain a NUL character (got '/var/\\x00x')",
    ),
    (
        "history: {retention_days: 0}\n",
        "history.retention_days: must be a number greater than 0 (got 0)",
    ),
    ("history: {max_rows: 0}\n", "history.max_rows: must be a whole number of at least 1 (got 0)"),
    (
        "history: {max_rows: 1.5}\n",
        "history.max_rows: must be a whole number of at least 1 (got 1.5)",
    ),
    (
        "history: {max_rows: false}\n",
        "history.max_rows: must be a whole number of at least 1, not a boolean (got False)",
    ),
    (
        "history: {max_rows: '100'}\n",
        "history.max_rows: must be a whole number of at least 1, not a string (got '100')",
    ),
    # allow
    ("allow: {name: x}\n", "allow: must be a list of rules, not a mapping (got {'name': 'x'})"),
    ("allow: [nginx]\n", "allow[0]: must be a mapping, not a string (got 'nginx')"),
    (
        "allow: [{comment: everything}]\n",
        "allow[0]: a rule must name at least one of name, path, user, systemd_unit, container_id,"
        " container_name, container_image, pod_namespace, destinations, ports, domains, user_unit,"
        " sha256, package: without one it would allow every connection",
    ),
    (
        "allow: [{}]\n",
        "allow[0]: a rule must name at least one of name, path, user, systemd_unit, container_id,"
        " container_name, container_image, pod_namespace, destinations, ports, domains, user_unit,"
        " sha256, package: without one it would allow every connection",
    ),
    (
        "allow: [{protocol: tcp, direction: outbound}]\n",
        "allow[0]: a rule must name at least one of name, path, user, systemd_unit, container_id,"
        " container_name, container_image, pod_namespace, destinations, ports, domains, user_unit,"
        " sha256, package: without one it would allow every connection",
    ),
    (
        "allow: [{name: a}, {name: b, porst: [1]}]\n",
        "allow[1].porst: unknown key (known here: name, path, user, systemd_unit, container_id,"
        " container_name, container_image, pod_namespace, destinations, ports, domains, user_unit,"
        " sha256, package, protocol, direction, comment)",
    ),
    ("allow: [{ports: [443, 70000]}]\n", "allow[0].ports[1]: port must be 1-65535 (got 70000)"),
    ("allow: [{ports: 0}]\n", "allow[0].ports: port must be 1-65535 (got 0)"),
    (
        "allow: [{ports: ['10-5']}]\n",
        "allow[0].ports[0]: a port range must run from low to high (got '10-5')",
    ),
    ("allow: [{ports: ['1-70000']}]\n", "allow[0].ports[0]: port must be 1-65535 (got '1-70000')"),
    (
        "allow: [{ports: ['https']}]\n",
        "allow[0].ports[0]: a port must be a number 1-65535 or a range such as 8000-8080"
        " (got 'https')",
    ),
    (
        "allow: [{ports: ['1-2-3']}]\n",
        "allow[0].ports[0]: a port must be a number 1-65535 or a range such as 8000-8080"
        " (got '1-2-3')",
    ),
    (
        "allow: [{ports: ['\u0664\u0664\u0663']}]\n",
        "allow[0].ports[0]: a port must be a number 1-65535 or a range such as 8000-8080"
        " (got '\u0664\u0664\u0663')",
    ),
    (
        "allow: [{ports: [true]}]\n",
        "allow[0].ports[0]: a port must be a number or a range text, not a boolean (got True)",
    ),
    (
        "allow: [{ports: [44.3]}]\n",
        "allow[0].ports[0]: a port must be a number or a range text, not a number (got 44.3)",
    ),
    (
        "allow: [{ports: []}]\n",
        "allow[0].ports: an empty list matches nothing: leave the key out instead (got [])",
    ),
    (
        "allow: [{name: yes}]\n",
        "allow[0].name: must be a string, not a boolean (quote it: YAML reads"
        " yes/no/on/off/true/false unquoted as booleans) (got True)",
    ),
    ("allow: [{name: ''}]\n", "allow[0].name: must be a string, not empty (got '')"),
    ("allow: [{name: [curl, 7]}]\n", "allow[0].name[1]: must be a string, not a number (got 7)"),
    (
        "allow: [{name: {a: b}}]\n",
        "allow[0].name: must be a string, not a mapping (got {'a': 'b'})",
    ),
    (
        "allow: [{path: bin/curl}]\n",
        "allow[0].path: must be an absolute path (or start with '*') (got 'bin/curl')",
    ),
    ("allow: [{user: -1}]\n", "allow[0].user: a uid must not be negative (got -1)"),
    ("allow: [{user: 1.5}]\n", "allow[0].user: must be a user name or uid, not a number (got 1.5)"),
    (
        "allow: [{container_id: ' abc'}]\n",
        "allow[0].container_id: surrounding whitespace in a container id (got ' abc')",
    ),
    (
        "allow: [{destinations: [192.0.2.1/24]}]\n",
        "allow[0].destinations[0]: host bits are set: did you mean '192.0.2.0/24'?"
        " (got '192.0.2.1/24')",
    ),
    (
        "allow: [{name: a, protocol: gre}]\n",
        "allow[0].protocol: must be one of icmp, tcp, udp, icmp6, sctp, raw (got 'gre')",
    ),
    (
        "allow: [{name: a, direction: [outbound, out]}]\n",
        "allow[0].direction[1]: must be outbound or inbound (got 'out')",
    ),
    (
        "allow: [{name: a, comment: 5}]\n",
        "allow[0].comment: must be a string, not a number (got 5)",
    ),
    (
        "allow: [{name: a, comment: 2024-01-01}]\n",
        "allow[0].comment: must be a string, not a date (got datetime.date(2024, 1, 1))",
    ),
]


@pytest.mark.parametrize(("text", "problem"), REFUSALS)
def test_refusals(text: str, problem: str) -> None:
    assert refusal(text) == f"{SOURCE}: {problem}"


def test_the_first_problem_is_reported_and_nothing_half_read_is_returned() -> None:
    text = "sampling: {interval: 2}\nhistory: {max_rows: 0}\nallow: [{ports: [0]}]\n"
    assert (
        refusal(text) == f"{SOURCE}: history.max_rows: must be a whole number of at least 1 (got 0)"
    )


def test_a_huge_value_is_quoted_in_bounds() -> None:
    message = refusal(f"sampling: {{interval: '{'x' * 100_000}'}}\n")
    assert len(message) < 250
    assert "..." in message


def test_quote_escapes_and_bounds() -> None:
    assert quote("a\nb\x1b[31m") == "'a\\nb\\x1b[31m'"
    assert quote("\u202e") == "'\\u202e'"
    assert quote("x\udcff") == "'x\\udcff'"
    assert quote(70000) == "70000"
    assert len(quote("y" * 10_000)) <= 80
    assert len(quote(list(range(10_000)))) <= 80


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_settings_or_one_clear_line(text: str) -> None:
    try:
        result = parse_settings(parse_yaml(text, SOURCE), SOURCE)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{SOURCE}: ")
        assert "\n" not in message and message.isprintable()
    else:
        assert isinstance(result, Settings)


yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.0/8", "2001:db8::/32", "443", "1-2", "nginx", "/usr/bin/*"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from([*TOP_KEYS, *RULE_KEYS, "interval", "path", "max_rows", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(TOP_KEYS),
        yaml_values
        | st.lists(
            st.dictionaries(st.sampled_from(RULE_KEYS), yaml_values, max_size=4), max_size=3
        ),
        max_size=4,
    )
)
def test_any_structure_is_settings_or_one_clear_line(data: object) -> None:
    try:
        result = parse_settings(data, SOURCE)
    except ConfigError as error:
        assert "\n" not in str(error) and str(error).isprintable()
    else:
        for rule in result.allow:
            assert isinstance(rule, AllowRule)
            assert any(getattr(rule, key) for key in RULE_MATCHERS)


# --- what a valid file gives ----------------------------------------------------------------


def test_a_full_configuration() -> None:
    text = """
classification:
  internal_networks: [192.0.2.0/24, "2001:db8::/32", 198.51.100.7]
sampling:
  interval: 0.5
history:
  enabled: false
  path: /tmp/h.db
  retention_days: 1.5
  max_rows: 10
allow:
  - comment: updates
    name: [apt, "apt-*"]
    path: /usr/lib/apt/methods/*
    user: [_apt, 0, "1000"]
    ports: [80, "443", "8000 - 8080"]
    protocol: TCP
  - systemd_unit: [nginx, "docker-*.scope", ssh.socket, "foo.bar"]
    container_id: 3f4a9c2b1d0e
    destinations: "2001:db8:100::/48"
    direction: inbound
"""
    result = settings_from(text)
    assert result.internal_networks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )
    assert result.sampling_interval == 0.5
    assert result.history_enabled is False
    assert result.history_path == "/tmp/h.db"
    assert result.history_retention_days == 1.5
    assert result.history_max_rows == 10
    updates, web = result.allow
    assert updates == AllowRule(
        index=0,
        comment="updates",
        name=("apt", "apt-*"),
        path=("/usr/lib/apt/methods/*",),
        user=("_apt", "0", "1000"),
        ports=(PortRange(80, 80), PortRange(443, 443), PortRange(8000, 8080)),
        protocol=(6,),
    )
    assert web.systemd_unit == ("nginx.service", "docker-*.scope", "ssh.socket", "foo.bar.service")
    assert web.container_id == ("3f4a9c2b1d0e",)
    assert web.destinations == (ipaddress.ip_network("2001:db8:100::/48"),)
    assert web.direction == ("inbound",)
    assert (updates.label, web.label) == ("updates", "allow[1]")


def test_port_ranges() -> None:
    assert 443 in PortRange(443, 443)
    assert 442 not in PortRange(443, 443)
    assert 8080 in PortRange(8000, 8080)
    assert "8000" not in PortRange(8000, 8080)
    assert (str(PortRange(1, 1)), str(PortRange(1, 2))) == ("1", "1-2")
