"""tests/lines.py: every line a child writes is returned, even when several come in one write
and nothing follows them (what ``select()`` then ``readline()`` misses)."""

from __future__ import annotations

import subprocess
import sys

from lines import Lines

WRITER = (
    "import sys, time\n"
    "sys.stdout.write('one\\ntwo\\nthree\\npart')\n"
    "sys.stdout.flush()\n"
    "time.sleep(0.3)\n"
    "sys.stdout.write('ial\\n')\n"
    "sys.stdout.flush()\n"
    "sys.stdin.read()\n"
    "sys.stdout.write('last, no newline')\n"
)


def test_lines_of_one_write_then_a_split_line_then_the_end() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        lines = Lines(child.stdout)
        assert [lines.next(10) for _ in range(3)] == ["one", "two", "three"]
        assert lines.next(10) == "partial"
        assert lines.next(0.2) is None and not lines.ended  # nothing more yet
        assert child.stdin is not None
        child.stdin.close()
        assert lines.next(10) == "last, no newline"
        assert lines.next(10) is None and lines.ended
    finally:
        child.kill()
        child.wait()
