"""Reading a history file without touching it: a private copy of the file and its ``-wal``.

SQLite does not leave a file alone even when asked to only read it: ``mode=ro`` on a WAL
database creates ``-wal`` and ``-shm`` files beside it and leaves them there (seen with SQLite
3.40), and ``immutable=1`` would ignore the ``-wal``, where committed transactions not yet
checkpointed live (https://sqlite.org/wal.html).  An auditor's copy of a host's history is
evidence, and the live store belongs to its writers, so a read-only store copies the file and
its ``-wal`` into a private directory and opens the copy.  When either file changed while it was
copied (a writer committed or checkpointed), the copy is taken again, up to
:data:`COPY_ATTEMPTS` times.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Optional, Tuple


class HistoryUnavailable(RuntimeError):
    """The store cannot be read now; the message says why and names the file."""


COPY_ATTEMPTS = 5
_FileState = Optional[Tuple[int, int, int, int]]


def _state(path: str) -> _FileState:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def private_copy(path: str) -> str:
    """The path of a private copy of the history file ``path`` (and its ``-wal``), in a new
    directory of its own that the caller removes (:func:`remove_copy`).  ``path`` itself is
    only ever read.

    Raises :class:`HistoryUnavailable` when ``path`` is missing, not a regular file,
    unreadable, or kept changing while it was copied.
    """
    try:
        status = os.stat(path)
    except OSError as error:
        raise HistoryUnavailable(f"cannot read history {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise HistoryUnavailable(f"cannot read history {path}: not a regular file")
    directory = tempfile.mkdtemp(prefix="egress-agent-history-")
    copy = os.path.join(directory, "history.db")
    try:
        for _ in range(COPY_ATTEMPTS):
            before = (_state(path), _state(path + "-wal"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy + "-wal")
            try:
                shutil.copyfile(path, copy)
                if before[1] is not None:
                    shutil.copyfile(path + "-wal", copy + "-wal")
            except FileNotFoundError:
                continue  # the -wal went away mid-copy (the last writer closed): again
            except OSError as error:
                raise HistoryUnavailable(
                    f"cannot read history {path}: {error.strerror or error}"
                ) from None
            if (_state(path), _state(path + "-wal")) == before:
                break
        else:
            raise HistoryUnavailable(
                f"cannot read history {path}: it changed every time it was copied "
                f"({COPY_ATTEMPTS} times)"
            )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return copy


def remove_copy(copy: str) -> None:
    """Remove a copy made by :func:`private_copy`, and its directory."""
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
