"""Lines from a child process's pipe, with a timeout, that never miss a line.

``select()`` on a text stream and then ``readline()`` loses lines: the first ``readline()``
pulls every line the child wrote into Python's buffer, and ``select()`` then waits for the
pipe, which is empty, while the lines sit unread.  A child that prints several lines in one
write (``watch`` printing a sample, a storm printing its results) stalls such a loop until it
writes again, or for ever.  :class:`Lines` reads the file descriptor itself and keeps the
partial line, so a line is returned as soon as it is complete.

Use one :class:`Lines` per pipe and nothing else on that pipe.
"""

from __future__ import annotations

import os
import select
import time
from typing import IO, Any, List, Optional


class Lines:
    """The complete lines of ``stream`` (a child's stdout or stderr), one at a time."""

    def __init__(self, stream: Optional[IO[Any]]) -> None:
        assert stream is not None, "the pipe was not opened (stdout=subprocess.PIPE)"
        self._fd = stream.fileno()
        self._pending = b""
        self._ready: List[str] = []
        self.ended = False
        """True once the child closed the pipe (and every line before that was returned)."""

    def next(self, timeout: float) -> Optional[str]:
        """The next line without its newline, or None when none came within ``timeout`` seconds
        or the pipe ended."""
        deadline = time.monotonic() + timeout
        while not self._ready and not self.ended:
            left = max(0.0, deadline - time.monotonic())
            if not select.select([self._fd], [], [], left)[0]:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self.ended = True
                chunk = b"\n" if self._pending else b""
            *complete, self._pending = (self._pending + chunk).split(b"\n")
            self._ready += [line.decode("utf-8", "replace") for line in complete]
        return self._ready.pop(0) if self._ready else None
