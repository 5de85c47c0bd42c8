"""The strongest identity of a row that an allow rule can name, or why it cannot hold.

Tried in this order, each only where the row carries it and the configuration has a matcher of
that name (:data:`agent.config.RULE_KEYS`), so that learned rules are always rules the file
accepts, before and after a new matcher appears:

1. ``package``: the owning package, when the executable is the package's own file
   (``exe_status`` ``packaged``: the package manager's digest checked);
2. ``sha256``: the executable's digest;
3. ``systemd_unit``: a unit of the system manager (not a session's or a user manager's
   ``.scope``, not ``user@UID.service``: a user can name those);
4. ``container_image``, then ``container_name``;
5. ``path``: an absolute path of an executable that was not deleted, proved the host's file
   at that path (``exe_status`` ``packaged``, ``modified``, ``unpackaged`` or ``pending``: a
   ``path`` rule matches nothing else, ``agent.allow``) (and, when learning from this host's
   own store, that this host has);
6. ``name``.

A row cannot hold an identity when its owner was not found (pid -1), or when its executable was
deleted, lives only in memory or is not the file at its path (``exe_status`` ``deleted``,
``memory``, ``mismatch``).  Glob characters in a name, path or unit are escaped (``[*]``), so
that a learned rule matches that text only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Union

from agent.config import GLOB_CHARACTERS, RULE_KEYS
from agent.evidence import number, text
from agent.exe_check import HOST_FILE_STATUSES

UNHELD_STATUS = frozenset({"deleted", "memory", "mismatch"})
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_USER_MANAGER = re.compile(r"user@\d+\.service\Z")


@dataclass(frozen=True, order=True)
class Identity:
    """What a rule names a program by: a matcher key of the configuration and its value."""

    key: str
    value: str

    @property
    def strength(self) -> int:
        """0 the strongest (:data:`ORDER`)."""
        return ORDER.index(self.key)


ORDER = ("package", "sha256", "systemd_unit", "container_image", "container_name", "path", "name")

GLOB_KEYS = frozenset({"name", "path", "systemd_unit"})
"""Matchers that read their values as ``fnmatch`` patterns (agent.allow.glob_matcher)."""


def literal(pattern: str) -> str:
    """``text`` as an ``fnmatch`` pattern that matches only itself."""
    if GLOB_CHARACTERS.isdisjoint(pattern):
        return pattern
    return "".join(f"[{c}]" if c in GLOB_CHARACTERS else c for c in pattern)


def identity_of(
    row: Mapping[str, object],
    rule_keys: Collection[str] = RULE_KEYS,
    path_exists: Optional[Callable[[str], bool]] = None,
) -> Union[Identity, str]:
    """The row's strongest :class:`Identity`, or a short reason why it has none that holds.

    ``path_exists`` (given when the rows are this host's) says whether this host has a path.
    """
    if row.get("pid") is not None and number(row, "pid") < 0:
        return "no process: the owner was not found (pid -1)"
    status = text(row, "exe_status")
    if status in UNHELD_STATUS:
        return f"the executable's identity does not hold (exe_status {status})"

    def offered(key: str) -> str:
        return text(row, key) if key in rule_keys else ""

    package = offered("package")
    if package and status == "packaged":
        return Identity("package", package)
    digest = offered("sha256").lower()
    if _SHA256.match(digest):
        return Identity("sha256", digest)
    unit = offered("systemd_unit")
    if unit and not unit.endswith(".scope") and not _USER_MANAGER.match(unit):
        return Identity("systemd_unit", literal(unit))
    for key in ("container_image", "container_name"):
        if offered(key):
            return Identity(key, offered(key))
    path = text(row, "path") if status in HOST_FILE_STATUSES else ""
    if path:
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return f"the executable's path does not hold ({path})"
        in_container = bool(text(row, "container_id"))
        if path_exists is not None and not in_container and not path_exists(path):
            return f"this host has no {path}"
        return Identity("path", literal(path))
    name = text(row, "name")
    if name:
        return Identity("name", literal(name))
    return "no name, path or other identity"
