"""The options of ``egress-agent extension``, as osqueryd's autoloader passes them.

Kept apart from :mod:`agent.osquery.server` so that the command line can offer the subcommand
without importing Thrift and osquery's bindings, which only the extension itself needs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DEFAULT_SOCKET = "/var/osquery/osquery.em"


@dataclass
class Options:
    socket: str = DEFAULT_SOCKET
    timeout: float = 3.0
    interval: float = 3.0
    verbose: bool = False


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``egress-agent extension``: osqueryd's (and ``--config``)."""
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help="osquery core's extensions socket (%(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=3.0,
        help="seconds to wait for core's socket to appear (%(default)s)",
    )
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=3.0,
        help="seconds between pings of core (%(default)s)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log each registration and call to stderr"
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="configuration file (default: $EGRESS_AGENT_CONFIG, /etc/egress-agent/config.yaml)",
    )


def extension_command(args: argparse.Namespace) -> int:
    """The ``extension`` subcommand's handler: imports the Thrift stack only now."""
    from agent.osquery.server import extension_main

    return extension_main(args)
