"""Which installed package owns a file, and the digest the package manager recorded for it.

- dpkg (Debian, Ubuntu): each package's file list is ``/var/lib/dpkg/info/PKG.list`` (or
  ``PKG:ARCH.list`` for a multi-arch package) and its MD5 digests ``PKG.md5sums``, lines of
  ``HEX  path/without/leading/slash`` (``dpkg(1)``, ``deb-md5sums(5)``).  Finding an owner
  reads every ``.list`` file (about 7 MB on a desktop).
- rpm (RHEL, Fedora, SUSE): the database answers ``rpm -qf --qf`` with each file's digest and
  the package's digest algorithm (``FILEDIGESTALGO``: 8 is SHA-256, the default since rpm 4.6;
  1 is MD5), one query per path.

Both databases answer the same three questions (:meth:`DpkgDatabase.known`, ``owner``,
``digest``) and say what an answer cost (``cost``, in bytes of reading budget: the lists read,
or a fixed price for a query), which :class:`agent.exe_check.ExeChecker` charges to its budget.
Answers are cached per path until the database changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List, Optional, Protocol, Tuple

DPKG_ADMINDIR = "/var/lib/dpkg"
RPM_DBPATHS = ("/usr/lib/sysimage/rpm", "/var/lib/rpm")
"""Where rpm keeps its database (rpm 4.17+ moved it to /usr/lib/sysimage; older ones, and
distributions that link it, /var/lib/rpm)."""
RPM_DATABASE_FILES = ("rpmdb.sqlite", "Packages.db", "Packages")
RPM_QUERY_COST = 1 << 20
"""The budget one ``rpm -qf`` is charged (a few milliseconds of a process, about what hashing
1 MiB costs)."""
MD5 = "md5"
SHA256 = "sha256"
_RPM_ALGORITHMS = {"1": MD5, "8": SHA256}
"""``FILEDIGESTALGO`` values (RFC 4880 section 9.4's hash numbers) this checker computes."""

_MERGED_DIRS = ("/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/libx32/")
"""Directories that merged-/usr systems link into ``/usr`` (Debian 12): dpkg may list a file
under either name."""


def merged_usr_alias(path: str) -> str:
    """The other name of ``path`` on a merged-/usr system (``/usr/bin/ls`` <-> ``/bin/ls``),
    or "" when it has none."""
    if path.startswith("/usr/") and path[4:].startswith(_MERGED_DIRS):
        return path[4:]
    if path.startswith(_MERGED_DIRS):
        return "/usr" + path
    return ""


class DpkgDatabase:
    """Look-ups in dpkg's database under ``admindir``; a missing database owns nothing."""

    def __init__(self, admindir: str = DPKG_ADMINDIR, max_entries: int = 1024) -> None:
        self.info = os.path.join(admindir, "info")
        self.max_entries = max(1, max_entries)
        self.cost = 0
        """Bytes the last scan of the file lists read."""
        self._stamp: Optional[Tuple[int, int]] = None
        self._owners: Dict[str, str] = {}
        self._digests: Dict[str, Dict[str, str]] = {}

    def _fresh(self) -> None:
        """Forget every answer when dpkg changed its info directory (an install or removal)."""
        try:
            status = os.stat(self.info)
            stamp: Optional[Tuple[int, int]] = (status.st_ino, status.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._owners.clear()
            self._digests.clear()

    def known(self, path: str) -> bool:
        """Whether :meth:`owner` would answer ``path`` without a scan."""
        self._fresh()
        return path in self._owners

    def owner(self, path: str) -> Tuple[str, bool]:
        """(the ``.list`` file's stem, e.g. ``curl`` or ``libc6:amd64``, or "" when no package
        lists ``path``; whether the answer needed a scan of every list, costing ``cost``)."""
        self._fresh()
        found = self._owners.get(path)
        if found is not None:
            return found, False
        stem = self._scan(path)
        if len(self._owners) >= self.max_entries:
            self._owners.clear()
        self._owners[path] = stem
        return stem, True

    def _scan(self, path: str) -> str:
        needle = b"\n" + os.fsencode(path) + b"\n"
        total = 0
        found = ""
        try:
            names = sorted(os.listdir(self.info))
        except OSError:
            names = []
        for name in names:
            if not name.endswith(".list"):
                continue
            try:
                with open(os.path.join(self.info, name), "rb") as handle:
                    data = b"\n" + handle.read()
            except OSError:
                continue
            total += len(data)
            if not found and needle in data:
                found = name[: -len(".list")]
        self.cost = total
        return found

    def digest(self, stem: str, path: str) -> Tuple[str, str]:
        """(``md5``, the hex digest package ``stem`` recorded for ``path``), or (``md5``, "")
        when it recorded none."""
        self._fresh()
        digests = self._digests.get(stem)
        if digests is None:
            digests = {}
            try:
                with open(os.path.join(self.info, stem + ".md5sums"), "rb") as handle:
                    for line in handle.read().split(b"\n"):
                        hexdigest, _, name = line.partition(b"  ")
                        if name:
                            digests["/" + os.fsdecode(name)] = hexdigest.decode("ascii", "replace")
            except OSError:
                pass
            if len(self._digests) >= 64:
                self._digests.clear()
            self._digests[stem] = digests
        return MD5, digests.get(path, "")


def package_name(stem: str) -> str:
    """A package's name without its architecture (``libc6:amd64`` -> ``libc6``)."""
    return stem.partition(":")[0]


class RpmDatabase:
    """Look-ups through ``rpm -qf`` in the database at ``dbpath`` (rpm's own when None)."""

    def __init__(
        self, dbpath: Optional[str] = None, rpm: str = "rpm", max_entries: int = 1024
    ) -> None:
        self.dbpath = dbpath
        self.rpm = rpm
        self.max_entries = max(1, max_entries)
        self.cost = RPM_QUERY_COST
        self._stamp: Optional[Tuple[int, int]] = None
        self._answers: Dict[str, Tuple[str, str, str]] = {}

    def _fresh(self) -> None:
        """Forget every answer when the database directory changed (an install or removal)."""
        stamp: Optional[Tuple[int, int]] = None
        directories = (self.dbpath,) if self.dbpath is not None else RPM_DBPATHS
        for directory in directories:
            for name in RPM_DATABASE_FILES:
                try:
                    status = os.stat(os.path.join(directory, name))
                except OSError:
                    continue
                stamp = stamp or (status.st_ino, status.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp = stamp
            self._answers.clear()

    def known(self, path: str) -> bool:
        self._fresh()
        return path in self._answers

    def owner(self, path: str) -> Tuple[str, bool]:
        """(the package's name, or "" when none owns ``path``; whether rpm was asked)."""
        self._fresh()
        found = self._answers.get(path)
        if found is not None:
            return found[0], False
        answer = self._query(path)
        if len(self._answers) >= self.max_entries:
            self._answers.clear()
        self._answers[path] = answer
        return answer[0], True

    def digest(self, stem: str, path: str) -> Tuple[str, str]:
        """(algorithm, hex digest) the package recorded for ``path``; ("", "") when it recorded
        none this checker computes."""
        found = self._answers.get(path)
        if found is None or found[0] != stem:
            return "", ""
        return found[1], found[2]

    def _query(self, path: str) -> Tuple[str, str, str]:
        """(package, algorithm, digest) of ``path`` from ``rpm -qf``; empty when no package
        owns it, rpm is missing or fails."""
        argv = [self.rpm, "-qf"]
        if self.dbpath is not None:
            argv += ["--dbpath", self.dbpath]
        argv += [
            "--qf",
            "%{NAME}\\n[%{FILENAMES}\\t%{FILEDIGESTALGO}\\t%{FILEDIGESTS}\\n]",
            "--",
            path,
        ]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                timeout=10,
                check=False,
                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        except (OSError, subprocess.SubprocessError):
            return "", "", ""
        if result.returncode != 0:
            return "", "", ""
        lines = result.stdout.split(b"\n")
        name = lines[0].decode("utf-8", "replace")
        wanted = os.fsencode(path)
        for line in lines[1:]:
            fields = line.split(b"\t")
            if len(fields) == 3 and fields[0] == wanted:
                algorithm = _RPM_ALGORITHMS.get(fields[1].decode("ascii", "replace"), "")
                return name, algorithm, fields[2].decode("ascii", "replace").lower()
        return "", "", ""


class PackageDatabase(Protocol):
    """What :class:`agent.exe_check.ExeChecker` asks a package database."""

    cost: int
    """The budget the last answer that needed work cost."""

    def known(self, path: str) -> bool:
        """Whether ``owner(path)`` is answered without work."""

    def owner(self, path: str) -> Tuple[str, bool]:
        """(the owning package's key, "" for none; whether the answer needed work)."""

    def digest(self, stem: str, path: str) -> Tuple[str, str]:
        """(algorithm, hex digest) that package recorded for ``path``."""


def default_databases() -> List[PackageDatabase]:
    """The package databases of this host: dpkg's when it has one, rpm's when ``rpm`` is
    installed and its database holds packages."""
    found: List[PackageDatabase] = []
    if os.path.isdir(os.path.join(DPKG_ADMINDIR, "info")):
        found.append(DpkgDatabase())
    if shutil.which("rpm") is not None and any(
        os.path.exists(os.path.join(directory, name))
        for directory in RPM_DBPATHS
        for name in RPM_DATABASE_FILES
    ):
        found.append(RpmDatabase())
    return found
