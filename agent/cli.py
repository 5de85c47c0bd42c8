"""The ``egress-agent`` command: subcommands, exit codes and wiring, nothing else.

Exit status everywhere: 0 all is well, 1 a finding (an unexpected external connection),
2 a usage, input or configuration error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, List, Optional, Sequence, TextIO

from agent import __version__
from agent.classify import AddressError, Classifier
from agent.config import ConfigError, load_settings
from agent.output import render, safe_text

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2

CLASSIFY_TABLE_COLUMNS = [
    "address",
    "external",
    "category",
    "via",
    "embedded_ipv4",
    "normalized",
    "reason",
]


def _addresses(arguments: Sequence[str], stdin: TextIO) -> Iterable[str]:
    """The addresses named on the command line; ``-`` reads one a line from standard input."""
    for argument in arguments:
        if argument == "-":
            for line in stdin:
                line = line.rstrip("\r\n")
                if line:
                    yield line
        else:
            yield argument


def cmd_classify(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    classifier = Classifier(settings.internal_networks)
    records, failed = [], False
    for text in _addresses(args.address, sys.stdin):
        try:
            records.append(classifier.classify(text)._asdict())
        except AddressError as error:
            print(f"egress-agent classify: {safe_text(str(error))}", file=sys.stderr)
            failed = True
    columns = CLASSIFY_TABLE_COLUMNS if args.format == "table" else None
    sys.stdout.write(render(records, columns, args.format, cell_limit=120))
    return EXIT_USAGE if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-agent",
        description="Which processes on this host talk to the internet, and where to.",
    )
    parser.add_argument("--version", action="version", version=f"egress-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    classify = command(
        "classify", cmd_classify, "classify addresses: is each one on the public internet?"
    )
    classify.add_argument(
        "address",
        nargs="+",
        metavar="ADDRESS",
        help="an IPv4 or IPv6 address, or - to read one a line from stdin",
    )
    classify.add_argument("--format", choices=["table", "json", "csv"], default="table")
    classify.add_argument(
        "--config", metavar="FILE", help="configuration file (for internal_networks)"
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"egress-agent: {safe_text(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
