"""The ``egress-agent`` command: subcommands, exit codes and wiring, nothing else.

Exit status everywhere: 0 all is well, 1 a finding (an unexpected external connection),
2 a usage, input or configuration error (argparse's own convention); ``audit`` adds 3, the
evidence is incomplete, and 4, the history was tampered with (:mod:`agent.audit`).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, TextIO, Tuple

from agent import __version__
from agent.audit import EXIT_INCOMPLETE, EXIT_TAMPERED, render_json, render_text, statement_of
from agent.classify import AddressError, Classifier
from agent.collect import BACKENDS, SamplerError
from agent.config import ConfigError, load_settings
from agent.evidence import Evidence, HistoryReader, Window, evidence_of, live_window, read_evidence
from agent.history import open_store
from agent.inet import CLOSING_STATES, INBOUND, OUTBOUND, UNKNOWN
from agent.limits import raise_open_files
from agent.osquery.options import add_arguments as add_extension_arguments
from agent.osquery.options import core_argv
from agent.pipeline import Pipeline, RunningAgent, Snapshot
from agent.pipeline.recorded import recorded_directions
from agent.records import Connection, Value
from agent.render import (
    HISTORY_TABLE_COLUMNS,
    TABLE_COLUMNS,
    format_choices,
    render,
    table_view,
)
from agent.report import html_report, text_report
from agent.report.write import write_private
from agent.scope import Scope, ScopeError, host_namespace, named_namespaces
from agent.textsafe import safe_text

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


DIRECTION_CHOICES = ("outbound", "inbound", "any")


def in_direction(connections: Sequence[Connection], direction: str) -> List[Connection]:
    """The connections a ``--direction`` shows: ``outbound`` includes those whose direction is
    unknown (they may have gone out: hiding them could hide egress)."""
    wanted = {"outbound": (OUTBOUND, UNKNOWN), "inbound": (INBOUND,)}.get(direction)
    return [c for c in connections if wanted is None or c.direction in wanted]


def is_unexpected(connection: Connection) -> bool:
    return connection.external and not connection.allowlisted


def owner_gone(connection: Connection) -> bool:
    """A connection seen after its process let go of it: no owner (TIME_WAIT and orphaned
    sockets have none), or a TCP state past the close.  When not root, "no owner" may also be
    another user's live socket: the summary says which it counts."""
    return connection.pid < 0 or connection.state in CLOSING_STATES


def _scope(args: argparse.Namespace) -> Scope:
    try:
        return Scope.of(args.netns, args.container, args.unit, args.pid)
    except ScopeError as error:
        raise ConfigError(f"egress-agent {args.command}: {error}") from None


def _table_rows(records: Iterable[Mapping[str, Value]]) -> List[Dict[str, Value]]:
    return table_view(records, named_namespaces(), host_namespace())


def _default_format(stream: TextIO) -> str:
    return "table" if stream.isatty() else "json"


def _print_notices(pipeline: Pipeline) -> None:
    for notice in pipeline.notices:
        print(f"egress-agent: {notice}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    scope = _scope(args)
    pipeline = Pipeline.open(settings, args.backend, names="recorded")
    pipeline.seen_direction = recorded_directions(settings)  # what a running agent's events saw
    _print_notices(pipeline)
    narrowed = scope.pids if scope.pids else None
    snapshot = pipeline.sample(narrowed, want_all=args.all)
    connections = [
        c for c in in_direction(snapshot.connections, args.direction) if scope.matches(c.as_dict())
    ]
    unexpected = [c for c in connections if is_unexpected(c)]
    gone = [c for c in unexpected if owner_gone(c)]
    counted = len(unexpected) - (len(gone) if args.ignore_closed else 0)
    shown = [c for c in connections if args.all or args.allowlisted or not c.allowlisted]
    fmt = args.format or _default_format(sys.stdout)
    records = [c.as_dict() for c in shown]
    if fmt == "table":
        columns: Optional[Sequence[str]] = (
            (*TABLE_COLUMNS, "external") if args.all else TABLE_COLUMNS
        )
        sys.stdout.write(render(_table_rows(records), columns, fmt))
    else:
        sys.stdout.write(render(records, None, fmt))
    if sys.stderr.isatty() or args.summary:
        stats = snapshot.stats
        print(
            f"egress-agent: {len(unexpected)} unexpected external connection(s)"
            f"{_gone_note(len(gone), pipeline.sampler.limited, args.ignore_closed)}; looked at "
            f"{stats.sockets} sockets in {stats.namespaces} network namespace(s), "
            f"{stats.processes} process(es), {stats.fds_scanned} fds, "
            f"in {stats.duration_ms:.0f} ms",
            file=sys.stderr,
        )
    return EXIT_FINDING if counted else EXIT_OK


def _gone_note(gone: int, limited: bool, ignored: bool) -> str:
    if not gone:
        return ""
    what = "without a known owner" if limited else "recently closed, owner gone"
    return f" ({gone} {what}{', not counted' if ignored else ''})"


class _NewConnections:
    """What ``watch`` prints: each connection once, when kernel events report it (as it
    happens) or when a sample first shows it (those not in the previous sample, or, with
    ``once_per_run``, never seen before in this run); and once more when a connection printed
    without a name shows one later (its DNS answer was read after the connection was).  Called
    from the sampling loop and from the event feed's thread."""

    def __init__(self, args: argparse.Namespace, scope: Scope) -> None:
        self._args = args
        self._scope = scope
        self._seen: Set[Tuple[object, ...]] = set()
        self._by_events: Set[Tuple[object, ...]] = set()
        """Printed from events since the last sample (which may not have seen them yet)."""
        self._nameless: Set[Tuple[object, ...]] = set()
        """Printed without a ``remote_domain``: printed again once one is known."""
        self._lock = threading.Lock()

    def _wanted(self, connections: Sequence[Connection]) -> List[Connection]:
        return [
            c
            for c in in_direction(connections, self._args.direction)
            if self._scope.matches(c.as_dict())
        ]

    def __call__(self, snapshot: Snapshot) -> None:
        from agent.history import history_key

        with self._lock:
            current = {history_key(c): c for c in self._wanted(snapshot.connections)}
            new = [
                (key, c)
                for key, c in current.items()
                if key not in self._seen or (key in self._nameless and c.remote_domain)
            ]
            kept = self._seen if self._args.once_per_run else self._by_events
            self._seen = set(current) | kept
            self._by_events = set()
            self._nameless &= set(current)
            self._print(new)

    def event(self, connection: Connection) -> None:
        from agent.history import history_key

        with self._lock:
            wanted = self._wanted([connection])
            key = history_key(connection)
            named_now = key in self._nameless and bool(connection.remote_domain)
            if not wanted or (key in self._seen and not named_now):
                return
            self._seen.add(key)
            self._by_events.add(key)
            self._print([(key, connection)])

    def _print(self, connections: List[Tuple[Tuple[object, ...], Connection]]) -> None:
        """Print ``connections`` (each with its history key), noting those without a name."""
        for key, connection in connections:
            if connection.remote_domain:
                self._nameless.discard(key)
            elif connection.external:
                self._nameless.add(key)
        shown = [c for _, c in connections if self._args.allowlisted or not c.allowlisted]
        if shown:
            sys.stdout.write(render([c.as_dict() for c in shown], None, self._args.format))
            sys.stdout.flush()


def cmd_watch(args: argparse.Namespace) -> int:
    raise_open_files()
    settings = load_settings(args.config)
    scope = _scope(args)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    printer = _NewConnections(args, scope)
    samples = 0

    def on_sample(snapshot: Snapshot) -> None:
        nonlocal samples
        printer(snapshot)
        samples += 1
        if args.count and samples >= args.count:
            stop.set()

    agent = RunningAgent.open(
        settings,
        "watch",
        logging.getLogger("egress_agent.watch"),
        interval=args.interval,
        backend=args.backend,
        history=not args.no_history,
        on_sample=on_sample,
        on_connection=printer.event,
        on_head=_head_logger() if args.log_head or os.environ.get("JOURNAL_STREAM") else None,
    )
    _print_notices(agent.pipeline)
    with agent:
        try:
            agent.monitor.run(stop, fatal=(SamplerError,))
        except SamplerError as error:
            print(f"egress-agent watch: {safe_text(str(error))}", file=sys.stderr)
            return EXIT_USAGE
    return EXIT_OK


def _head_logger() -> Callable[[str], None]:
    """The chain head after each heartbeat, one line on stderr: under systemd
    (``$JOURNAL_STREAM``) it is a journal entry, shipped off the host with the journal, for
    ``audit --expect-head``."""

    def log_head(head: str) -> None:
        print(f"egress-agent watch: history head {head}", file=sys.stderr, flush=True)

    return log_head


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


def _moment(text: str) -> float:
    """``--since``/``--until`` -> unix seconds: unix seconds (``1767225600``), ISO-8601 with
    ``Z`` or an offset (``2026-11-01T10:00:00Z``, ``...+01:00``), or a duration ago (``2h``,
    ``7d``: :func:`_duration`'s units; a bare number is unix seconds here)."""
    if text[-1:] in _DURATION_UNITS and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - _duration(text)
    try:
        return float(text)
    except ValueError:
        pass
    iso_text = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        moment = datetime.datetime.fromisoformat(iso_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use unix seconds, ISO-8601 such as 2026-11-01T10:00:00Z, "
            "or a duration ago such as 2h or 7d)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z or an offset")
    return moment.timestamp()


def _read_window(
    args: argparse.Namespace,
    default_since: float,
    reader: Callable[[HistoryReader, Window], Evidence] = read_evidence,
) -> Evidence:
    """The evidence for ``--since``..``--until`` from ``--history FILE`` or the configured
    store, read from a private copy (``HistoryStore(read_only=True)``).  Raises
    :class:`agent.history.HistoryUnavailable`."""
    from agent.history import HistoryUnavailable

    settings = load_settings(args.config)
    until = time.time() if args.until is None else args.until
    since = default_since if args.since is None else args.since
    if until <= since:
        raise HistoryUnavailable(f"--until ({until:.0f}) must be later than --since ({since:.0f})")
    store = open_store(settings, path=args.history, read_only=True)
    try:
        window = (
            Window(since, until) if args.until is not None else live_window(store, since, until)
        )
        check = None
        if args.command == "audit":
            check = store.verify_chain(args.expect_head, _read_key(args.key))
        evidence = reader(store, window)
        # with the losses and the chain's check, whichever reader took the rows
        losses = store.losses(since=window.since, until=window.until)
        return evidence_of(evidence.rows, evidence.coverage.runs, window, losses, check)
    finally:
        store.close()


def _read_key(path: Optional[str]) -> Optional[bytes]:
    """The operator's host key (``--key FILE``): its bytes, surrounding whitespace removed.
    Raises :class:`agent.history.HistoryUnavailable` naming the file when it cannot be read."""
    from agent.history import HistoryUnavailable

    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            key = handle.read().strip()
    except OSError as error:
        raise HistoryUnavailable(f"cannot read the key file {path}: {error.strerror}") from None
    if not key:
        raise HistoryUnavailable(f"the key file {path} is empty")
    return key


def cmd_report(args: argparse.Namespace) -> int:
    from agent.history import HistoryUnavailable

    try:
        evidence = _read_window(args, time.time() - 86400)
    except HistoryUnavailable as error:
        print(f"egress-agent report: {safe_text(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    if args.html is None:
        sys.stdout.write(text_report(evidence))
        return EXIT_OK
    page = html_report(evidence)
    try:  # a new file of ours, renamed over: never through a link, never half a page
        write_private(args.html, page)
    except OSError as error:
        print(
            f"egress-agent report: cannot write {safe_text(args.html)}: {error.strerror}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(
        f"egress-agent report: wrote {safe_text(args.html)}: {evidence.connections} external "
        f"connection(s), {evidence.unexpected_connections} unexpected",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from agent.history import HistoryUnavailable
    from agent.trial import read_every_column

    try:  # rules tried read every column of the rows: a rule may match any of them
        evidence = _read_window(
            args, args.since, read_every_column if args.rules else read_evidence
        )
    except HistoryUnavailable as error:
        print(f"egress-agent audit: {safe_text(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    if args.rules is not None:
        return _audit_with_rules(args, evidence)
    statement = statement_of(evidence)
    sys.stdout.write(render_json(statement) if args.format == "json" else render_text(statement))
    return statement.exit_code


def _audit_with_rules(args: argparse.Namespace, evidence: Evidence) -> int:
    """``audit --rules FILE``: the verdict the window would have had with FILE's allow rules."""
    from agent.config import read_settings
    from agent.trial import render_trial_json, render_trial_text, try_rules

    trial = try_rules(evidence, read_settings(args.rules).allow)
    render = render_trial_json if args.format == "json" else render_trial_text
    sys.stdout.write(render(trial, args.rules))
    return trial.statement.exit_code


def cmd_learn(args: argparse.Namespace) -> int:
    from agent.learn.command import run

    return run(args)


def cmd_history(args: argparse.Namespace) -> int:
    from agent.history import HistoryUnavailable

    settings = load_settings(args.config)
    scope = _scope(args)
    path = settings.history_path
    if not os.path.exists(path):
        print(f"egress-agent history: no history at {path} yet", file=sys.stderr)
        rows: List[Dict[str, Value]] = []
    else:
        store = open_store(settings, read_only=True)  # a private copy: never the writers' lock
        since = None if args.since is None else time.time() - args.since
        try:
            rows = [row for row in store.rows(since) if scope.matches(row)]
        except HistoryUnavailable as error:
            print(f"egress-agent history: {safe_text(str(error))}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            store.close()
    fmt = args.format or _default_format(sys.stdout)
    if fmt == "table":
        sys.stdout.write(render(_table_rows(rows), HISTORY_TABLE_COLUMNS, fmt))
    else:
        sys.stdout.write(render(rows, None, fmt))
    return EXIT_OK


def _pid(text: str) -> int:
    if not (text.isdigit() and text.isascii()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return int(text)


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
    classify.add_argument("--format", choices=format_choices(connections=False), default="table")
    classify.add_argument(
        "--config", metavar="FILE", help="configuration file (for internal_networks)"
    )

    def scope_options(sub: argparse.ArgumentParser) -> None:
        limits = sub.add_argument_group(
            "limits", "show only these (each may be given more than once; all kinds must match)"
        )
        limits.add_argument(
            "--netns",
            action="append",
            default=[],
            metavar="NAME|INODE",
            help="a network namespace: its ip netns name or its inode",
        )
        limits.add_argument(
            "--container", action="append", default=[], metavar="ID", help="a container id prefix"
        )
        limits.add_argument(
            "--unit",
            action="append",
            default=[],
            metavar="UNIT",
            help="a systemd unit or glob (nginx means nginx.service)",
        )
        limits.add_argument(
            "--pid", action="append", default=[], type=_pid, metavar="PID", help="a process"
        )

    def sampling_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="configuration file (default: $EGRESS_AGENT_CONFIG, then "
            "/etc/egress-agent/config.yaml, then the built-in defaults)",
        )
        sub.add_argument(
            "--direction",
            choices=DIRECTION_CHOICES,
            default="outbound",
            help="outbound (default) also shows connections whose direction is unknown",
        )
        scope_options(sub)
        sub.add_argument(
            "--allowlisted",
            action="store_true",
            help="also show the connections an allow rule expects (marked allowlisted)",
        )
        sub.add_argument(
            "--backend",
            choices=BACKENDS,
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
        choices=format_choices(),
        help="default: table on a terminal, json otherwise",
    )
    check.add_argument("--all", action="store_true", help="every inet socket, with its verdict")
    check.add_argument(
        "--summary",
        action="store_true",
        help="print the summary line on stderr even when it is not a terminal",
    )
    check.add_argument(
        "--ignore-closed",
        action="store_true",
        help="exit 0 when the only unexpected connections are closed ones whose process is "
        "gone (TIME_WAIT, orphans); by default they count, since they did go out",
    )

    watch = command(
        "watch", cmd_watch, "sample every interval; print each newly seen external connection once"
    )
    sampling_options(watch)
    watch.add_argument("--format", choices=format_choices(stream=True), default="jsonl")
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
        "--log-head",
        action="store_true",
        help="log the history chain's head on stderr after each heartbeat (the default under "
        "systemd, where stderr is the journal), for audit --expect-head",
    )
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
    history.add_argument("--format", choices=format_choices())
    scope_options(history)

    def window_options(sub: argparse.ArgumentParser, since_help: str, required: bool) -> None:
        sub.add_argument("--since", type=_moment, metavar="T", required=required, help=since_help)
        sub.add_argument(
            "--until",
            type=_moment,
            metavar="T",
            help="default: now, or the latest heartbeat of an agent running now (what it vouches "
            "for so far)",
        )
        sub.add_argument(
            "--history",
            metavar="FILE",
            help="a history file (a copy collected from a host, say): read, never written",
        )
        sub.add_argument("--config", metavar="FILE", help="configuration file (history.path)")

    report = command(
        "report", cmd_report, "the window's external connections: an HTML page or a summary"
    )
    window_options(report, "unix seconds, ISO-8601 (Z or offset) or 2h, 7d ago; default 24h", False)
    report.add_argument(
        "--html", metavar="FILE", help="write one self-contained page (mode 0600) to FILE"
    )
    audit = command(
        "audit",
        cmd_audit,
        "the statement for a window: exit 0 nothing unexpected and fully seen, 1 unexpected "
        f"egress, {EXIT_INCOMPLETE} incomplete evidence, {EXIT_TAMPERED} tampered history, "
        "2 usage error",
    )
    window_options(audit, "unix seconds, ISO-8601 (Z or offset) or 2h, 7d ago", True)
    audit.add_argument("--format", choices=["text", "json"], default="text")
    audit.add_argument(
        "--expect-head",
        metavar="HEAD",
        help="a chain head recorded off the host (egress_agent_info.history_head, or the "
        "watch log line): the history must hold it, or it was rewritten (exit "
        f"{EXIT_TAMPERED})",
    )
    audit.add_argument(
        "--key",
        metavar="FILE",
        help="the host key the agent signs its chain with (history.key_file): every link's "
        "MAC must match",
    )
    audit.add_argument(
        "--rules",
        metavar="FILE",
        help="judge the window by FILE's allow rules instead of those recorded: what each "
        "rule allowed, what stays unexpected",
    )

    learn = command(
        "learn",
        cmd_learn,
        "allow rules learned from what the history saw, printed as YAML or merged into a file",
    )
    learn.add_argument("--since", type=_moment, metavar="T", help="default: 7d ago")
    learn.add_argument("--until", type=_moment, metavar="T", help="default: now")
    learn.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="FILE",
        help="a history file or an osquery results export (JSON or CSV of "
        "external_connection_history); several make one rule set for a role",
    )
    learn.add_argument(
        "--config", metavar="FILE", help="configuration file (history.path, your allow rules)"
    )
    learn.add_argument(
        "--widen", action="store_true", help="networks up to /16 (IPv6 /32) instead of /24 (/48)"
    )
    learn.add_argument(
        "--merge",
        metavar="CONFIG",
        help="merge the learned rules into CONFIG (replacing those learned before) and show "
        "the diff",
    )
    learn.add_argument(
        "--test",
        action="store_true",
        help="also judge the window with the rules (on stderr); exit with the verdict's status",
    )

    extension = command(
        "extension",
        extension_command,
        "serve the osquery tables (osqueryd's autoloader runs this)",
    )
    add_extension_arguments(extension)
    return parser


def extension_command(args: argparse.Namespace) -> int:
    """The ``extension`` subcommand's handler: imports the Thrift stack only now."""
    from agent.osquery.server import extension_main

    return extension_main(args)


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
