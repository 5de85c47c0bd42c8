"""Learned rules merged into a configuration file a person keeps, and the file written safely.

The text is edited, never parsed and dumped again, so every comment, key order and rule a
person wrote stays as it was.  The learned rules live between two marker lines
(:data:`agent.learn.yamltext.BEGIN` and ``END``): when the file has them, what lies between is
replaced and nothing else; when it has none, the block goes at the end of the ``allow:`` list
(indented like its items), or a new ``allow:`` list is added at the end of the file.  The result
must parse as a configuration (:func:`agent.config.parse_settings`) or nothing is written.

Writing (:func:`write_atomically`): a new file in the same directory, created with ``O_EXCL``
and ``O_NOFOLLOW`` (no link planted there is followed, no file there is reused), given the
original's mode and owner, flushed with ``fsync``, renamed over the original, and the directory
flushed: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import secrets
import stat
from typing import List, Optional, Sequence, Tuple

from agent.config import AllowRule, ConfigError, parse_settings, parse_yaml
from agent.learn.rules import Learned
from agent.learn.yamltext import BEGIN, END, block_lines
from agent.textsafe import one_line, safe_text

_ALLOW_KEY = re.compile(r"allow\s*:(?P<rest>.*)$")
_BEGIN_MARK = BEGIN.split(":", 1)[0]
_END_MARK = END.split(":", 1)[0]


class MergeError(Exception):
    """The file cannot take the learned rules; the message names the file and why."""


def _marks(lines: Sequence[str], path: str) -> Optional[Tuple[int, int]]:
    """The line indexes of the begin and end marks, or None when the file has none."""
    begins = [i for i, line in enumerate(lines) if line.strip().startswith(_BEGIN_MARK)]
    ends = [i for i, line in enumerate(lines) if line.strip().startswith(_END_MARK)]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise MergeError(
            f"{safe_text(path)}: the learned rules' marks are broken ({len(begins)} begin, "
            f"{len(ends)} end mark(s)): keep exactly one '{_BEGIN_MARK}' line before one "
            f"'{_END_MARK}' line, or remove both"
        )
    return begins[0], ends[0]


def hand_written(text: str, path: str) -> str:
    """``text`` without the block of learned rules: what a person wrote."""
    lines = text.splitlines(keepends=True)
    marks = _marks(lines, path)
    if marks is None:
        return text
    return "".join(lines[: marks[0]] + lines[marks[1] + 1 :])


def hand_written_rules(text: str, path: str) -> Tuple[AllowRule, ...]:
    """The allow rules a person wrote in the file (those outside the learned block).

    Raises :class:`agent.config.ConfigError` for a file that is no configuration."""
    return parse_settings(parse_yaml(hand_written(text, path), path), path).allow


def _is_top_level(line: str) -> bool:
    """A line that ends the ``allow:`` list: a key (or document mark) at column 0."""
    return bool(line.strip()) and line[0] not in (" ", "\t", "#", "-")


def merged_text(
    original: str, rules: Sequence[Learned], all_hosts: Sequence[str], path: str
) -> str:
    """``original`` with the learned block replaced or added (see the module docstring).

    Raises :class:`MergeError` when the file's ``allow`` is a flow list (``[...]`` with rules
    in it), or when the result would not be a valid configuration."""
    lines = original.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    marks = _marks(lines, path)
    if marks is not None:
        begin, end = marks
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        block = [line + "\n" for line in block_lines(rules, all_hosts, indent)]
        result = lines[:begin] + block + lines[end + 1 :]
    else:
        result = _add_block(lines, rules, all_hosts, path)
    text = "".join(result)
    try:
        parse_settings(parse_yaml(text, path), path)
    except ConfigError as error:
        raise MergeError(
            f"{safe_text(path)}: the file would not be a valid configuration with the learned "
            f"rules, left as it was: {one_line(str(error))}"
        ) from None
    return text


def _add_block(
    lines: List[str], rules: Sequence[Learned], all_hosts: Sequence[str], path: str
) -> List[str]:
    found = [i for i, line in enumerate(lines) if _ALLOW_KEY.match(line)]
    if not found:
        separator = ["\n"] if lines and lines[-1].strip() else []
        block = [line + "\n" for line in block_lines(rules, all_hosts, "  ")]
        return lines + separator + ["allow:\n"] + block
    start = found[0]
    rest = _ALLOW_KEY.match(lines[start]).group("rest")  # type: ignore[union-attr]
    value = rest.split(" #", 1)[0].strip()
    if value in ("[]", "null", "~"):
        lines[start] = "allow:" + rest.split(value, 1)[1].rstrip() + "\n"
    elif value:
        raise MergeError(
            f"{safe_text(path)}: line {start + 1}: allow is written in flow style ({value[:40]}"
            "...): write it as a block list, one '- ' rule a line, to merge learned rules in"
        )
    end = start + 1
    last = start
    indent: Optional[str] = None
    while end < len(lines) and not _is_top_level(lines[end]):
        stripped = lines[end].strip()
        if stripped and not lines[end].startswith("#"):
            last = end
            if indent is None and stripped.startswith("-"):
                indent = lines[end][: len(lines[end]) - len(lines[end].lstrip())]
        end += 1
    items = "  " if indent is None else indent
    block = [line + "\n" for line in block_lines(rules, all_hosts, items)]
    return lines[: last + 1] + block + lines[last + 1 :]


def unified_diff(before: str, after: str, path: str) -> str:
    """What merging changes, as ``diff -u`` shows it."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=path,
            tofile=f"{path} (learned rules merged)",
        )
    )


def write_atomically(path: str, text: str) -> None:
    """Replace the file at ``path`` (a link: the file it leads to) with ``text``, atomically,
    keeping its mode and owner (a new file: 0644, ours).  Raises OSError."""
    target = os.path.realpath(path)
    try:
        status: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        status = None
    directory = os.path.dirname(target) or "."
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    temporary = os.path.join(
        directory, f".{os.path.basename(target)}.learn-{os.getpid()}-{secrets.token_hex(6)}"
    )
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if status is not None:
                with contextlib.suppress(PermissionError):  # not root: the file stays ours
                    os.fchown(fd, status.st_uid, status.st_gid)
                os.fchmod(fd, stat.S_IMODE(status.st_mode))
            else:
                os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
