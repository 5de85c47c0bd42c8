"""Hostile text made safe where it leaves the agent: terminals, logs, tables, JSON, Thrift, SQLite.

Process names, command lines and paths come from processes, and a process can name itself
anything: control characters, ANSI escape sequences, bidirectional overrides, bytes that are not
UTF-8 (which arrive from ``os.fsdecode`` as lone surrogates, PEP 383).  The agent keeps such text
as the kernel gives it and escapes it only on the way out, by one policy:

- :func:`safe_text` for messages and logs: every unprintable code point as a visible escape, so a
  line stays one line and cannot drive a terminal; :func:`one_line` also folds whitespace runs.
- :func:`cell_text` for table and CSV cells: the same, and backslashes doubled, so the escape of
  a process named ``a\\nb`` (backslash, n) differs from that of one named ``a``, newline, ``b``.
- :func:`utf8_safe` for JSON, Thrift and SQLite, which are lossless otherwise: only an undecodable
  byte becomes its escape as text (``\\xff``), since none of them can carry a lone surrogate.
"""

from __future__ import annotations

import unicodedata
from typing import Any, List, Optional, Tuple

ELLIPSIS = "\u2026"

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    """The visible escape of one unprintable character (or of the backslash).

    ``\\xHH`` is an ASCII control or, from 0x80 up, a byte that was not UTF-8; code points
    from U+0080 up are ``\\uHHHH`` or ``\\UHHHHHHHH``, so no two inputs share an escape.
    """
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte under surrogateescape (PEP 383)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: object, limit: Optional[int], reversible: bool) -> str:
    if not isinstance(text, str):
        text = str(text)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1 display column, not {limit}")
        return _cut(text, limit, reversible)
    if text.isprintable() and not (reversible and "\\" in text):
        return text
    return "".join(
        c if c.isprintable() and not (reversible and c == "\\") else _escape(c) for c in text
    )


def safe_text(text: object, limit: Optional[int] = None) -> str:
    """``text`` as one line that is safe on a terminal and in a log (for messages).

    Every character ``str.isprintable`` refuses (C0 and C1 controls, DEL, ESC, line and
    paragraph separators, format characters such as U+202E, surrogates, unassigned code
    points) is shown as an escape, so no text can start a new line or drive the terminal.
    Backslashes stay as they are, so a message that already quotes a value with ``repr``
    reads the same.  With ``limit``, the result is cut to at most that many display columns,
    ending in an ellipsis.
    """
    return _escaped(text, limit, reversible=False)


def cell_text(text: object, limit: Optional[int] = None) -> str:
    """Like :func:`safe_text`, but reversible: backslashes are doubled too, so the text of a
    process named ``a\\nb`` (backslash, n) differs from that of one named ``a``, newline,
    ``b``.  Table and CSV cells are shown this way.
    """
    return _escaped(text, limit, reversible=True)


def _width(char: str) -> int:
    """Display columns of one printable character (East Asian wide: 2, combining: 0)."""
    if char < "\u0300":
        return 1
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Display columns of escaped text (the output of :func:`safe_text`, :func:`cell_text`)."""
    if text.isascii():
        return len(text)
    return sum(_width(c) for c in text)


def _cut(text: str, limit: int, reversible: bool) -> str:
    """Escape ``text`` and cut it to ``limit`` display columns, looking at no more of it than
    that needs (a 100 KB command line costs no more than a short one).  Characters are also
    capped at four per column, so a pile of combining marks cannot make a cell tall.
    """
    pieces: List[Tuple[str, int]] = []
    width = 0
    cut = False
    for count, char in enumerate(text):
        if count >= 4 * limit:
            cut = True
            break
        plain = char.isprintable() and not (reversible and char == "\\")
        piece = char if plain else _escape(char)
        piece_width = _width(piece) if len(piece) == 1 else len(piece)
        if width + piece_width > limit:
            cut = True
            break
        pieces.append((piece, piece_width))
        width += piece_width
    if cut:
        room = max(limit - 1, 0)
        while pieces and width > room:
            width -= pieces.pop()[1]
        return "".join(piece for piece, _ in pieces) + ELLIPSIS
    return "".join(piece for piece, _ in pieces)


def utf8_safe(text: str) -> str:
    """``text`` with each lone surrogate (an undecodable byte, PEP 383) replaced by its escape
    as text (``\\xff``), so that it can be encoded as UTF-8: for JSON, for Thrift (which
    refuses the whole response otherwise) and for SQLite.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape(c) if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def json_safe(document: Any) -> Any:
    """``document`` (dicts, lists, tuples, scalars) with every string, keys too, made
    :func:`utf8_safe`: what ``json.dumps`` can write as lossless ASCII."""
    if isinstance(document, str):
        return utf8_safe(document)
    if isinstance(document, dict):
        return {utf8_safe(str(k)): json_safe(v) for k, v in document.items()}
    if isinstance(document, (list, tuple)):
        return [json_safe(v) for v in document]
    return document


def one_line(text: object, limit: Optional[int] = None) -> str:
    """:func:`safe_text` with every run of whitespace folded into one space: for quoting an
    error message (a YAML problem, an exception) inside a one-line message of ours."""
    return safe_text(" ".join(str(text).split()), limit)


def error_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one bounded line for a log: its type and message."""
    return one_line(f"{type(error).__name__}: {error}", limit)
