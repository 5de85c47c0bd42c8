"""Which installed package owns a file, and the digest the package manager recorded for it.

dpkg (Debian, Ubuntu): each package's file list is ``/var/lib/dpkg/info/PKG.list`` (or
``PKG:ARCH.list`` for a multi-arch package) and its MD5 digests ``PKG.md5sums``, lines of
``HEX  path/without/leading/slash`` (``dpkg(1)``, ``deb-md5sums(5)``).  rpm keeps SHA-256 file
digests in its database (``rpm -qf --qf '[%{FILENAMES} %{FILEDIGESTS}\\n]'``); that reader is
not written: no rpm database can be made and tested on this project's machines, so on an rpm
host every executable reads ``unpackaged`` and ``package`` rules match nothing (said in the
README).

Finding an owner reads every ``.list`` file (about 7 MB on a desktop): the caller charges
:attr:`DpkgDatabase.scan_bytes` to its reading budget, and answers are cached per path until
dpkg changes its info directory.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

DPKG_ADMINDIR = "/var/lib/dpkg"

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
        self.scan_bytes = 0
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
        lists ``path``; whether the answer needed a scan of every list)."""
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
        self.scan_bytes = total
        return found

    def digest(self, stem: str, path: str) -> str:
        """The MD5 (hex) package ``stem`` recorded for ``path``, or "" when it recorded none."""
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
        return digests.get(path, "")


def package_name(stem: str) -> str:
    """A package's name without its architecture (``libc6:amd64`` -> ``libc6``)."""
    return stem.partition(":")[0]
