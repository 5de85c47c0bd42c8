"""What a command is limited to: network namespaces, containers, systemd units, processes.

``check``, ``watch`` and ``history`` take ``--netns``, ``--container``, ``--unit`` and ``--pid``
(each may be given several times).  A connection is in scope when it matches every kind of
limit given, and any one value of each kind.  A limit by process, container or unit needs an
owner: rows whose process is unknown (pid -1) are outside it; a limit by namespace keeps them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Sequence, Tuple

from agent.allow import glob_matcher
from agent.collect.netns import parse_namespace_link
from agent.config import unit_pattern
from agent.records import Value

NETNS_DIR = "/run/netns"
"""Where ``ip netns`` keeps the namespaces it names (``ip-netns(8)``)."""


class ScopeError(ValueError):
    """A limit that names nothing that can exist; the message says which and why."""


def named_namespaces(directory: str = NETNS_DIR) -> Dict[int, str]:
    """``{namespace inode: name}`` of the namespaces ``ip netns`` named (none when the
    directory is missing or unreadable)."""
    names: Dict[int, str] = {}
    try:
        entries = os.listdir(directory)
    except OSError:
        return names
    for name in sorted(entries):
        try:
            names.setdefault(os.stat(os.path.join(directory, name)).st_ino, name)
        except OSError:
            continue
    return names


def host_namespace(proc_root: str = "/proc") -> Optional[int]:
    """The network namespace of the host (pid 1's), or ours when pid 1's is not readable."""
    for pid in ("1", "self"):
        try:
            return parse_namespace_link(os.readlink(f"{proc_root}/{pid}/ns/net"))
        except (OSError, ValueError):
            continue
    return None


def resolve_namespace(text: str, directory: str = NETNS_DIR) -> int:
    """A namespace given as its inode (``4026532281``, or ``net:[4026532281]``) or as a name of
    ``ip netns``.  Raises :class:`ScopeError`."""
    if text.isdigit() and text.isascii():
        return int(text)
    try:
        return parse_namespace_link(text)
    except ValueError:
        pass
    if "/" in text or text in ("", ".", ".."):
        raise ScopeError(f"{text!r} is neither a namespace inode nor an ip netns name")
    try:
        return os.stat(os.path.join(directory, text)).st_ino
    except OSError:
        raise ScopeError(
            f"no network namespace named {text!r} (ip netns list shows the names)"
        ) from None


@dataclass(frozen=True)
class Scope:
    """The limits of one command; empty: the whole host."""

    namespaces: FrozenSet[int] = frozenset()
    containers: Tuple[str, ...] = ()
    """Container id prefixes (the 12-character short id, or the full id)."""
    units: Tuple[str, ...] = ()
    """systemd unit globs (``nginx`` means ``nginx.service``)."""
    pids: FrozenSet[int] = frozenset()

    @classmethod
    def of(
        cls,
        namespaces: Sequence[str] = (),
        containers: Sequence[str] = (),
        units: Sequence[str] = (),
        pids: Iterable[int] = (),
    ) -> Scope:
        """The scope the command line gives.  Raises :class:`ScopeError`."""
        for container in containers:
            if not container or not all(c in "0123456789abcdef" for c in container.lower()):
                raise ScopeError(f"{container!r} is not a container id (hexadecimal digits)")
        return cls(
            namespaces=frozenset(resolve_namespace(text) for text in namespaces),
            containers=tuple(c.lower() for c in containers),
            units=tuple(unit_pattern(unit) for unit in units),
            pids=frozenset(pids),
        )

    def matches(self, record: Mapping[str, Value]) -> bool:
        """Whether a row (a record's ``as_dict()``, or a history row) is in scope."""
        if self.namespaces and record.get("net_namespace") not in self.namespaces:
            return False
        if self.pids and record.get("pid") not in self.pids:
            return False
        container = str(record.get("container_id") or "")
        if self.containers and not (
            container and any(container.startswith(prefix) for prefix in self.containers)
        ):
            return False
        unit = str(record.get("systemd_unit") or "")
        return not self.units or bool(
            unit and any(glob_matcher(pattern)(unit) for pattern in self.units)
        )
