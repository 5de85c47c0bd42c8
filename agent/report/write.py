"""A page written to a path a person chose, safely even in a shared directory such as ``/tmp``.

:func:`write_private` makes a new file of its own in the target's directory
(``O_CREAT|O_EXCL|O_NOFOLLOW``, a random name, mode 0600, owned by the caller), writes and syncs
it, then renames it over the target.  So nothing planted there by another user is ever opened:

- a symlink at the target (or anywhere in the directory) is never followed: ``rename(2)``
  replaces the link itself, and the new file's name was never there before (``O_EXCL``);
- a file someone created at the target beforehand (mode 0666, their owner) is replaced whole,
  not written into: the result has our owner and mode 0600, never theirs;
- a reader sees the old file or the whole new page, never half of one.

Where the caller may not replace the target (a sticky directory, another user's file, and the
caller is not root), the rename fails and nothing is left behind: the error says so.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Tuple

MODE = 0o600
_ATTEMPTS = 16


def _create(dir_fd: int) -> Tuple[int, str]:
    """A new file of ours in the directory: (descriptor, name).

    Raises:
        OSError: the directory refuses a new file (read-only, not ours, full).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(_ATTEMPTS):
        name = f".egress-agent-{secrets.token_hex(8)}.tmp"
        try:
            return os.open(name, flags, MODE, dir_fd=dir_fd), name
        except FileExistsError:
            if attempt == _ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def write_private(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as a new file, mode 0600, owned by the caller,
    replacing atomically whatever was there and following no link (see the module).

    Raises:
        OSError: the directory cannot be opened or written, or the target cannot be replaced
            (a directory; another user's file in a sticky directory, for a caller who is not
            root).  Nothing is left behind.
    """
    directory, name = os.path.split(path)
    if not name:
        raise IsADirectoryError(21, "Is a directory", path)
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd, temporary = _create(dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                os.fchmod(fd, MODE)  # the umask can only take away; say the mode outright
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
