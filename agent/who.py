"""Who is behind a process beyond its own uid: the login user, the parents, the container's names.

- ``login_user`` and ``login_session``: ``/proc/PID/loginuid`` and ``/proc/PID/sessionid``
  (the audit login uid and session, set by ``pam_loginuid`` at login and inherited by every
  child: they survive ``sudo`` and ``su``).  A process no login started (a daemon from boot)
  has loginuid 4294967295 (``(uid_t)-1``): its login user is "".  NIST SP 800-53 SC-7(9) asks
  for the user behind a flagged connection; the effective user alone says ``root`` for a
  ``sudo curl``.  What it proves: once set, a loginuid changes only with
  ``CAP_AUDIT_CONTROL`` (or never, with ``loginuid_immutable``); but a process whose loginuid
  is *unset* may set it once, to any uid, without privilege (``audit_set_loginuid_perm`` in
  ``kernel/audit.c``; checked here as ``nobody``).  So it names the person behind a login
  session, and a daemon (started with none) can claim one: it is evidence to show, never a
  matcher of allow rules.
- ``ancestors``: the chain of parents, nearest first, as (pid, name, container id), at most
  :data:`MAX_ANCESTORS` deep; the column shows the chain up to pid 1 or up to the init of the
  process's own container (the first ancestor outside it ends the chain).  Read here from
  ``/proc`` (sampled rows); the kernel event source keeps it in its process table from fork
  events, so it outlives parents that exited.
- the container's name, image and runtime and its Kubernetes pod: :mod:`agent.containers`.

Each read is a few small ``/proc`` files; a file that is gone or unreadable gives nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from agent.cgroups import placement
from agent.containers import NO_CONTAINER, ContainerDirectory, ContainerInfo, runtime_of_cgroup

MAX_ANCESTORS = 16
"""How many parents a row names at most (the nearest ones); a deeper chain is cut there."""

NO_LOGIN = 4294967295
"""``AUDIT_UID_UNSET``: the loginuid (and session id) of a process no login started."""


class Ancestor(NamedTuple):
    pid: int
    name: str
    container_id: str


@dataclass(frozen=True)
class Who:
    """The columns this module adds to a process's identity."""

    login_uid: Optional[int] = None
    login_user: str = ""
    login_session: Optional[int] = None
    ancestors: Tuple[Ancestor, ...] = ()
    container: ContainerInfo = NO_CONTAINER


NO_WHO = Who()


@functools.lru_cache(maxsize=4096)
def ancestors_text(ancestors: Tuple[Ancestor, ...], container_id: str) -> str:
    """The ``ancestors`` column: a JSON array of ``{"pid", "name"}``, the parent first, up to
    pid 1 or the container's init (the chain stops before the first ancestor in another
    container than ``container_id``; "" when there are none).  Remembered for the last few
    thousand chains: every connection of a process has its chain, and the event path builds
    a record for each."""
    chain = []
    for ancestor in ancestors:
        if ancestor.container_id != container_id:
            break
        chain.append({"pid": ancestor.pid, "name": ancestor.name})
    return json.dumps(chain, ensure_ascii=False, separators=(",", ":")) if chain else ""


def _read_small(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(4096)
    except OSError:
        return b""


def _number(data: bytes) -> Optional[int]:
    text = data.strip()
    return int(text) if text.isdigit() else None


def read_login(pid: int, proc_root: str = "/proc") -> Tuple[Optional[int], Optional[int]]:
    """(login uid, session id) of ``pid``; None for each that is unset or unreadable."""
    uid = _number(_read_small(f"{proc_root}/{pid}/loginuid"))
    if uid is None or uid == NO_LOGIN:
        return None, None  # no login, no session (the kernel sets both together)
    session = _number(_read_small(f"{proc_root}/{pid}/sessionid"))
    return uid, session if session != NO_LOGIN else None


def _stat_parent(pid: int, proc_root: str) -> Optional[Tuple[str, int]]:
    """(comm, parent pid) from ``/proc/PID/stat``, or None."""
    data = _read_small(f"{proc_root}/{pid}/stat")
    opening, closing = data.find(b"("), data.rfind(b")")
    if opening < 0 or closing < 0:
        return None
    fields = data[closing + 2 :].split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return os.fsdecode(data[opening + 1 : closing]), int(fields[1])


def proc_ancestors(
    pid: int, proc_root: str = "/proc", depth: int = MAX_ANCESTORS
) -> Tuple[Ancestor, ...]:
    """The parents of ``pid`` as ``/proc`` shows them now, nearest first, up to pid 1 (or the
    first one gone), at most ``depth``."""
    chain: List[Ancestor] = []
    own = _stat_parent(pid, proc_root)
    parent = own[1] if own is not None else 0
    while parent > 0 and len(chain) < depth:
        found = _stat_parent(parent, proc_root)
        if found is None:
            break
        cgroup = _read_small(f"{proc_root}/{parent}/cgroup").decode("utf-8", "replace")
        chain.append(Ancestor(parent, found[0], placement(cgroup).container_id))
        if parent == 1:
            break
        parent = found[1]
    return tuple(chain)


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_dirs(cgroup_root: str, controllers: str, path: str) -> List[str]:
    """Where a ``/proc/PID/cgroup`` line's cgroup is mounted: the unified hierarchy at the
    root (v2) or at ``unified`` (hybrid); a v1 hierarchy under its controllers' name
    (``name=systemd`` at ``systemd``)."""
    relative = path.lstrip("/")
    if not controllers:
        return [os.path.join(cgroup_root, relative), os.path.join(cgroup_root, "unified", relative)]
    name = controllers[len("name=") :] if controllers.startswith("name=") else controllers
    return [os.path.join(cgroup_root, name, relative)]


def runtime_owned(cgroup: str, container_id: str, cgroup_root: str = CGROUP_ROOT) -> bool:
    """False when a cgroup directory named after ``container_id`` that the process is in is
    owned by someone other than root (runtimes run as root and make their cgroups as root;
    systemd hands a delegated subtree to its user).  True when every such directory found is
    root's, or none can be looked at (no cgroup file system here: nothing to say against)."""
    for line in cgroup.split("\n"):
        parts = line.split(":", 2)
        if len(parts) != 3 or container_id not in parts[2]:
            continue
        path = parts[2]
        cut = path.index(container_id) + len(container_id)
        end = path.find("/", cut)
        named = path if end < 0 else path[:end]
        for directory in _cgroup_dirs(cgroup_root, parts[1], named):
            try:
                owner = os.stat(directory).st_uid
            except OSError:
                continue
            if owner != 0:
                return False
    return True


class WhoReader:
    """Reads :class:`Who` for a pid; keeps user names and the container directory."""

    def __init__(
        self,
        proc_root: str = "/proc",
        containers: Optional[ContainerDirectory] = None,
        cgroup_root: str = CGROUP_ROOT,
    ) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.with_ancestors = True
        """Walk ``/proc`` for the parents (off while :meth:`without_ancestors`)."""
        self.containers = containers if containers is not None else ContainerDirectory()
        self._users: Dict[int, str] = {}

    def user_name(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            import pwd

            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            self._users[uid] = name
        return name

    def container(self, container_id: str, cgroup: str) -> ContainerInfo:
        """What the runtimes say about the container, when its cgroup is the runtime's: a
        cgroup some user owns (a delegated subtree: ``user@UID.service``, rootless runtimes)
        can be named after any container, and gets no names."""
        if not container_id or not runtime_owned(cgroup, container_id, self.cgroup_root):
            return NO_CONTAINER
        return self.containers.lookup(container_id, runtime_of_cgroup(cgroup))

    @contextlib.contextmanager
    def without_ancestors(self) -> Iterator[None]:
        """Reads without the walk up the parents, for a caller that knows them already (the
        event source's process table, from forks: a third of a read's cost saved)."""
        before = self.with_ancestors
        self.with_ancestors = False
        try:
            yield
        finally:
            self.with_ancestors = before

    def read(self, pid: int, container_id: str, cgroup: str) -> Who:
        """``pid``'s login, parents (from ``/proc``) and container, as far as readable."""
        login_uid, session = read_login(pid, self.proc_root)
        return Who(
            login_uid=login_uid,
            login_user=self.user_name(login_uid) if login_uid is not None else "",
            login_session=session,
            ancestors=proc_ancestors(pid, self.proc_root) if self.with_ancestors else (),
            container=self.container(container_id, cgroup),
        )
