"""Where a process sits in the cgroup tree, told apart by who could have put it there.

:func:`placement` reads a ``/proc/PID/cgroup`` text (``Documentation/admin-guide/cgroup-v2.rst``,
"Processes"; v1 lines are ``hierarchy-ID:controller-list:cgroup-path``, v2 has ``0::PATH``) and
answers:

- ``systemd_unit``: the unit of the *system* manager: the deepest unit component of the systemd
  hierarchy's path above any user manager (``user@UID.service``) and above any container's own
  cgroup.  A user's systemd delegates its subtree to the user (``systemd-run --user
  --unit=NAME`` makes ``.../user@UID.service/app.slice/NAME.service``, and the user may make
  cgroups of any name there), so a unit below it is only ``user_unit``, and ``systemd_unit``
  says ``user@UID.service``.  Inside a container, the container's own init names its units.
- ``container_id``: only from a path a container runtime owns, as the runtimes lay them out
  (``agent/data/container-cgroups.csv``: docker, containerd and CRI, CRI-O, podman, LXC,
  systemd-nspawn), never from a user's subtree (``user-UID.slice``, ``user@UID.service``):
  there an id-shaped component is ``rootless_container_id`` with its owner ``rootless_uid``,
  which a real rootless container (podman, docker rootless) and a forgery look alike.

Only root can make cgroups outside what systemd delegated, so the answers hold against every
other local user; they are only as good as the agent's cgroup namespace is the host's.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

DATA_FILE = Path(__file__).with_name("data") / "container-cgroups.csv"

_ID = "(?P<id>[0-9a-f]{64})"
_NAME = "(?P<id>[^/]+)"

UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
"""systemd unit types whose cgroups hold processes (``systemd.unit(5)``); slices only nest."""

_USER_MANAGER = re.compile(r"user@(\d+)\.service")
_USER_SLICE = re.compile(r"user-(\d+)\.slice")
_ID_COMPONENT = re.compile(
    r"(?:(?:docker|cri-containerd|containerd|crio|cri-o|libpod|nerdctl)-)?([0-9a-f]{64})"
    r"(?:\.scope)?"
)
"""A component shaped like a container's cgroup; the monitors (``crio-conmon-ID``,
``libpod-conmon-ID``) are outside the container: no match."""


@dataclass(frozen=True)
class Placement:
    """What a cgroup path says, each answer "" (or None) when it says nothing."""

    systemd_unit: str = ""
    user_unit: str = ""
    container_id: str = ""
    rootless_container_id: str = ""
    rootless_uid: Optional[int] = None


NOWHERE = Placement()


@functools.lru_cache(maxsize=None)
def runtime_patterns() -> Tuple[Tuple[str, re.Pattern[str]], ...]:
    """(runtime, compiled pattern) for each row of the data file; a pattern matches a path from
    its start up to the container's own cgroup, which may have cgroups of its own below."""
    with DATA_FILE.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return tuple(
        (
            row["runtime"],
            re.compile(row["pattern"].replace("{ID}", _ID).replace("{NAME}", _NAME) + "(?=/|$)"),
        )
        for row in rows
    )


def cgroup_paths(text: str) -> List[Tuple[str, str]]:
    """(controllers, path) for each well-formed line of a ``/proc/PID/cgroup`` file."""
    entries = []
    for line in text.split("\n"):
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2].startswith("/"):
            entries.append((parts[1], parts[2]))
    return entries


def systemd_path(entries: List[Tuple[str, str]]) -> str:
    """The path in systemd's hierarchy: the ``name=systemd`` line on cgroup v1 (legacy and
    hybrid), else the unified ``0::`` line; "" when neither."""
    for wanted in ("name=systemd", ""):
        for controllers, path in entries:
            if controllers == wanted:
                return path
    return ""


def _user_owner(path: str) -> Optional[int]:
    """The uid when ``path`` runs through a user's own slice or manager, else None."""
    for component in path.split("/"):
        for pattern in (_USER_MANAGER, _USER_SLICE):
            match = pattern.fullmatch(component)
            if match:
                return int(match.group(1))
    return None


def _runtime_match(path: str) -> Tuple[str, int]:
    """(container id, length of the container's own cgroup path) when a runtime owns ``path``."""
    for _, pattern in runtime_patterns():
        match = pattern.match(path)
        if match:
            return match.group("id"), match.end()
    return "", -1


def _deepest_unit(components: List[str]) -> str:
    for component in reversed(components):
        if component.endswith(UNIT_SUFFIXES):
            return component
    return ""


def placement(text: str) -> Placement:
    """The units and container a ``/proc/PID/cgroup`` text tells (see the module's docstring).

    Never raises: a line that is not ``ID:CONTROLLERS:/PATH`` is skipped.
    """
    entries = cgroup_paths(text)
    container_id = rootless_id = ""
    rootless_uid: Optional[int] = None
    for path in dict.fromkeys(p for _, p in entries if p != "/"):  # v1 repeats paths
        owned = _runtime_match(path)[0]
        if owned:
            container_id = container_id or owned
            continue
        uid = _user_owner(path)
        if uid is not None and not rootless_id:
            rootless_id = _rootless_id(path)
            rootless_uid = uid if rootless_id else None
    systemd_unit = user_unit = ""
    path = systemd_path(entries)
    if path:
        end = _runtime_match(path)[1] if path != "/" else -1
        components = (path[:end] if end >= 0 else path).split("/")
        manager = next(
            (i for i, c in enumerate(components) if _USER_MANAGER.fullmatch(c) is not None), -1
        )
        if manager >= 0:
            systemd_unit = components[manager]
            user_unit = _deepest_unit(components[manager + 1 :])
        else:
            systemd_unit = _deepest_unit(components)
    return Placement(
        systemd_unit=systemd_unit,
        user_unit=user_unit,
        container_id=container_id,
        rootless_container_id=rootless_id,
        rootless_uid=rootless_uid,
    )


def _rootless_id(path: str) -> str:
    """The deepest id-shaped component of a path in a user's subtree."""
    for component in reversed(path.split("/")):
        match = _ID_COMPONENT.fullmatch(component)
        if match:
            return match.group(1)
    return ""
