"""Code a test runs as another user, put where that user can read it.

A clone may live in a directory only its owner can enter (``/root``, any 0700 home): a script
of ``tests/`` that a test starts as ``nobody`` (``setpriv ... python3 tests/nethost.py``) is
then unreadable to the process that runs it, and the test errors before it tests anything.
:func:`readable_copies` copies such scripts, with the modules of ``tests/`` they import, into a
new directory under ``/tmp`` that every user may enter (0755, files 0644), removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TESTS = Path(__file__).resolve().parent

NETHOST_FILES = ("nethost.py", "lines.py")
"""tests/nethost.py and what it imports: what a process run as another user needs to be a
client or a listener of a test host."""


@contextmanager
def readable_copies(*names: str, source: Path = TESTS) -> Iterator[Path]:
    """A new directory under /tmp, mode 0755, holding copies (mode 0644) of the files ``names``
    of ``source`` (default: ``tests/``); removed with everything in it on exit.

    Raises:
        OSError: a file cannot be read or copied.
    """
    directory = Path(tempfile.mkdtemp(prefix="egress-agent-readable-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        for name in names:
            copy = directory / name
            shutil.copyfile(source / name, copy)
            copy.chmod(0o644)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
