"""The ``egress-agent`` command: subcommands, exit codes and wiring, nothing else.

Exit status everywhere: 0 all is well, 1 a finding (an unexpected external connection),
2 a usage, input or configuration error (argparse's own convention).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, TextIO

from agent import __version__
from agent.allow import annotate
from agent.classify import AddressError, Classifier
from agent.config import ConfigError, Settings, load_settings
from agent.history import HistoryStore, HistoryUnavailable, Key, history_key
from agent.osquery.server import add_arguments as add_extension_arguments
from agent.osquery.server import core_argv, extension_main
from agent.output import HISTORY_TABLE_COLUMNS, TABLE_COLUMNS, render, safe_text
from agent.records import Connection, Value
from agent.sampler import UNPRIVILEGED_NOTICE, SamplerError, SocketSampler, open_sampler

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


def make_sampler(backend: str, settings: Settings) -> SocketSampler:
    return open_sampler(Classifier(settings.internal_networks), backend)


def in_direction(connections: Sequence[Connection], direction: str) -> List[Connection]:
    return [c for c in connections if direction == "any" or c.direction == direction]


def is_unexpected(connection: Connection) -> bool:
    return connection.external and not connection.allowlisted


def _default_format(stream: TextIO) -> str:
    return "table" if stream.isatty() else "json"


def cmd_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    sampler = make_sampler(args.backend, settings)
    if sampler.limited:
        print(UNPRIVILEGED_NOTICE, file=sys.stderr)
    connections = in_direction(sampler.sample(want_all=args.all), args.direction)
    annotate(settings.allow, connections)
    unexpected = sum(1 for c in connections if is_unexpected(c))
    shown = [c for c in connections if args.all or args.allowlisted or not c.allowlisted]
    fmt = args.format or _default_format(sys.stdout)
    columns = (
        ((*TABLE_COLUMNS, "external") if args.all else TABLE_COLUMNS) if fmt == "table" else None
    )
    sys.stdout.write(render([c.as_dict() for c in shown], columns, fmt))
    if sys.stderr.isatty() or args.summary:
        stats = sampler.last
        print(
            f"egress-agent: {unexpected} unexpected external connection(s); looked at "
            f"{stats.sockets} sockets in {stats.namespaces} network namespace(s), "
            f"{stats.processes} process(es), {stats.fds_scanned} fds, "
            f"in {stats.duration_ms:.0f} ms",
            file=sys.stderr,
        )
    return EXIT_FINDING if unexpected else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    sampler = make_sampler(args.backend, settings)
    if sampler.limited:
        print(UNPRIVILEGED_NOTICE, file=sys.stderr)
    interval = args.interval if args.interval is not None else settings.sampling_interval
    store = open_history(settings) if settings.history_enabled and not args.no_history else None
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    seen: Set[Key] = set()
    samples = 0
    while not stop.is_set():
        try:
            sample = sampler.sample()
        except SamplerError as error:
            print(f"egress-agent watch: {safe_text(str(error))}", file=sys.stderr)
            return EXIT_USAGE
        annotate(settings.allow, sample)
        if store is not None:
            store.record(sample)  # both directions, as the extension records them
        connections = in_direction(sample, args.direction)
        current = {history_key(c): c for c in connections}
        new = [c for key, c in current.items() if key not in seen]
        seen = set(current) | (seen if args.once_per_run else set())
        shown = [c for c in new if args.allowlisted or not c.allowlisted]
        if shown:
            sys.stdout.write(render([c.as_dict() for c in shown], None, args.format))
            sys.stdout.flush()
        samples += 1
        if args.count and samples >= args.count:
            break
        stop.wait(interval)
    if store is not None:
        store.close()
    return EXIT_OK


def open_history(settings: Settings) -> HistoryStore:
    return HistoryStore(
        settings.history_path,
        retention_days=settings.history_retention_days,
        max_rows=settings.history_max_rows,
    )


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w`` (or plain seconds) -> seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use a number with s, m, h, d or w, e.g. 2h)"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r}")
    return value * _DURATION_UNITS[unit]


def cmd_history(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    path = settings.history_path
    if not os.path.exists(path):
        print(f"egress-agent history: no history at {path} yet", file=sys.stderr)
        rows: List[Dict[str, Value]] = []
    else:
        store = open_history(settings)
        since = None if args.since is None else time.time() - args.since
        try:
            rows = store.rows(since)
        except HistoryUnavailable as error:
            print(f"egress-agent history: {safe_text(str(error))}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            store.close()
    fmt = args.format or _default_format(sys.stdout)
    columns = HISTORY_TABLE_COLUMNS if fmt == "table" else None
    sys.stdout.write(render(rows, columns, fmt))
    return EXIT_OK


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


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

    def sampling_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="configuration file (default: $EGRESS_AGENT_CONFIG, then "
            "/etc/egress-agent/config.yaml, then the built-in defaults)",
        )
        sub.add_argument("--direction", choices=["outbound", "inbound", "any"], default="outbound")
        sub.add_argument(
            "--allowlisted",
            action="store_true",
            help="also show the connections an allow rule expects (marked allowlisted)",
        )
        sub.add_argument(
            "--backend",
            choices=["auto", "proc", "psutil"],
            default="auto",
            help="socket source: /proc in every network namespace (Linux), or psutil "
            "(this network namespace only)",
        )

    check = command(
        "check",
        cmd_check,
        "one live sample: external connections and their processes; exit 1 if any is unexpected",
    )
    sampling_options(check)
    check.add_argument(
        "--format",
        choices=["table", "json", "jsonl", "csv", "ecs"],
        help="default: table on a terminal, json otherwise",
    )
    check.add_argument("--all", action="store_true", help="every inet socket, with its verdict")
    check.add_argument(
        "--summary",
        action="store_true",
        help="print the summary line on stderr even when it is not a terminal",
    )

    watch = command(
        "watch", cmd_watch, "sample every interval; print each newly seen external connection once"
    )
    sampling_options(watch)
    watch.add_argument("--format", choices=["jsonl", "ecs"], default="jsonl")
    watch.add_argument(
        "--interval",
        type=_positive_float,
        metavar="SECONDS",
        help="default: sampling.interval from the configuration",
    )
    watch.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N samples (default: never)"
    )
    watch.add_argument("--no-history", action="store_true", help="do not write the history store")
    watch.add_argument(
        "--once-per-run",
        action="store_true",
        help="print a connection once per run, even when it closes and opens again",
    )

    history = command("history", cmd_history, "the external connections the samplers have recorded")
    history.add_argument("--config", metavar="FILE", help="configuration file (history.path)")
    history.add_argument(
        "--since", type=_duration, metavar="DURATION", help="only rows seen in the last 2h, 7d..."
    )
    history.add_argument("--format", choices=["table", "json", "jsonl", "csv", "ecs"])

    extension = command(
        "extension", extension_main, "serve the osquery tables (osqueryd's autoloader runs this)"
    )
    add_extension_arguments(extension)
    return parser


def _tolerant_streams() -> None:
    """Let no byte stop the command.  Under a strict UTF-8 locale (``en_US.UTF-8``) Python
    decodes stdin strictly and encodes stdout with the locale's codec: an undecodable input
    line or a process name outside a narrow terminal encoding (Latin-1, ASCII) would end in a
    traceback.  Undecodable input bytes become lone surrogates instead (PEP 383), which the
    address parser refuses by name; unencodable output characters become escapes."""
    for stream, errors in (
        (sys.stdin, "surrogateescape"),
        (sys.stdout, "backslashreplace"),
        (sys.stderr, "backslashreplace"),
    ):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=errors)


def main(argv: Optional[List[str]] = None) -> int:
    _tolerant_streams()
    logging.basicConfig(format="egress-agent: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(core_argv(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.handler(args))
    except (ConfigError, SamplerError) as error:
        print(f"egress-agent: {safe_text(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
