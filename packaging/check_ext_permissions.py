"""Check an osquery extension file the way osqueryd does before it autoloads it.

osquery/filesystem/filesystem.cpp ``safePermissions(dir, path, executable)``, called from
osquery/extensions/extensions.cpp with ``dir`` = the parent of the path as written in
extensions.load: ``lstat(path)``, ``stat(path)`` (symlinks resolved) and ``stat(dir)`` must succeed;
``dir`` must not have the sticky bit; the file must not be a directory, must be owned by root (or
by osqueryd's own user, root here) and executable by its owner. The autoloader also wants the name
to end in ``.ext``. Stricter than osquery, as the packaging notes ask: a regular file, not writable
by group or others. Runs on any Python 3.6+ (it is copied into the test chroot).

Usage: python3 check_ext_permissions.py PATH...   (exit 0 when every PATH passes, 1 otherwise)
"""

from __future__ import annotations

import os
import stat
import sys
from typing import List


def problems(path: str) -> List[str]:
    """What osqueryd (or the stricter packaging rule) would object to in ``path``; empty if none."""
    found: List[str] = []
    if not path.endswith(".ext"):
        found.append("the name does not end in .ext")
    directory = os.path.dirname(path) or "."
    try:
        os.lstat(path)
        target = os.stat(path)
        parent = os.stat(directory)
    except OSError as error:
        return [*found, f"cannot stat: {error}"]
    if parent.st_mode & stat.S_ISVTX:
        found.append(f"its directory {directory} has the sticky bit")
    if stat.S_ISDIR(target.st_mode):
        found.append("it is a directory")
    elif not stat.S_ISREG(target.st_mode):
        found.append("it is not a regular file")
    if target.st_uid != 0:
        found.append(f"it is owned by uid {target.st_uid}, not root")
    if not target.st_mode & stat.S_IXUSR:
        found.append("its owner cannot execute it")
    if target.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        found.append(f"it is writable by group or others (mode {stat.S_IMODE(target.st_mode):o})")
    return found


def main(paths: List[str]) -> int:
    failed = False
    for path in paths:
        for problem in problems(path):
            print(f"{path}: {problem}")
            failed = True
    return 1 if failed or not paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
