"""The options of ``egress-agent extension``, as osqueryd's autoloader passes them.

Kept apart from :mod:`agent.osquery.server` so that the command line can offer the subcommand
without importing Thrift and osquery's bindings, which only the extension itself needs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Sequence

DEFAULT_SOCKET = "/var/osquery/osquery.em"


@dataclass
class Options:
    socket: str = DEFAULT_SOCKET
    timeout: float = 3.0
    interval: float = 3.0
    verbose: bool = False


MIN_SECONDS = 0.2
"""The least ``--timeout`` and ``--interval`` core uses itself (extensions.cpp: 200 ms)."""
_C_SPACE = " \t\n\v\f\r"


def core_seconds(text: str) -> float:
    """``--timeout``/``--interval`` as osquery core reads its own copy: ``atoi``, at least
    200 ms.  Never raises: core passes its string flags unparsed, whatever they hold.

    ``atoi`` (glibc: ``(int) strtol(text, NULL, 10)``) skips leading blanks, takes a sign and
    digits and ignores the rest: ``"3s"`` is 3, ``" 10"`` 10, ``"1.5"`` 1, ``""`` and
    ``"abc"`` 0; past ``long`` it saturates, then keeps the low 32 bits.  Core's C++ SDK
    turns a negative value into a huge unsigned one (never ping, wait forever); here it is
    the minimum, like zero.
    """
    rest = text.lstrip(_C_SPACE)
    sign = -1 if rest[:1] == "-" else 1
    if rest[:1] in ("-", "+"):
        rest = rest[1:]
    digits = ""
    for char in rest:
        if char not in "0123456789":
            break
        digits += char
    number = sign * int(digits) if digits else 0
    number = max(-(2**63), min(number, 2**63 - 1))  # strtol saturates at LONG_MIN/LONG_MAX
    number = (number + 2**31) % 2**32 - 2**31  # (int): the low 32 bits
    return max(float(number), MIN_SECONDS)


CORE_VALUE_OPTIONS = ("--socket", "--timeout", "--interval")


def core_argv(argv: Sequence[str]) -> List[str]:
    """``argv`` with each ``--socket``/``--timeout``/``--interval VALUE`` written as
    ``--option=VALUE``, so that a value core passes is read as a value whatever it looks
    like (``-1``, ``-x``: argparse would take them for options)."""
    joined: List[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument in CORE_VALUE_OPTIONS and index + 1 < len(argv):
            joined.append(f"{argument}={argv[index + 1]}")
            index += 2
            continue
        joined.append(argument)
        index += 1
    return joined


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``egress-agent extension``: osqueryd's (and ``--config``)."""
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help="osquery core's extensions socket (%(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=core_seconds,
        default=3.0,
        help="seconds to wait for core's socket to appear, read as core reads it (%(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=core_seconds,
        default=3.0,
        help="seconds between pings of core, read as core reads it (%(default)s)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log each registration and call to stderr"
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="configuration file (default: $EGRESS_AGENT_CONFIG, /etc/egress-agent/config.yaml)",
    )
