"""``egress-agent learn``: the steps in order, with their messages and exit status.

1. the rows of the window from every ``--history`` file (histories and Fleet exports), or from
   the configured store;
2. rows a rule a person wrote already allows are not learned again (the rules of ``--merge``'s
   file outside the learned block, else those of the configuration);
3. rules learned from the rest (:func:`agent.learn.rules.learn_rules`); rows left out are
   listed on stderr with the reason;
4. the rules printed as YAML, or merged into ``--merge``'s file with the diff shown;
5. with ``--test``, the window judged by the rules a person wrote and the learned ones, per
   source (:mod:`agent.trial`), on stderr; the exit status is then the verdict's.

Exit status: 0, 2 for a source or file that cannot be used; with ``--test`` that of the
verdict (1 unexpected, 3 incomplete).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Tuple

from agent.config import AllowRule, ConfigError, load_settings, parse_settings, parse_yaml
from agent.evidence import Window, evidence_of
from agent.learn.merge import (
    MergeError,
    hand_written_rules,
    merged_text,
    unified_diff,
    write_atomically,
)
from agent.learn.rows import Source, SourceError, every_host, read_history, read_source
from agent.learn.rules import describe, learn_rules
from agent.learn.yamltext import rules_text
from agent.textsafe import safe_text
from agent.trial import render_trial_text, rule_for, try_rules, worst_exit

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_SINCE_S = 7 * 86400


def _say(message: str) -> None:
    print(f"egress-agent learn: {safe_text(message)}", file=sys.stderr)


def _sources(args: argparse.Namespace, window: Window) -> Tuple[List[Source], bool]:
    """The sources, and whether they are this host's own store."""
    if args.history:
        return [read_source(path, window) for path in args.history], False
    settings = load_settings(args.config)
    return [read_history(settings.history_path, window)], True


REFUSED_LISTED = 50
"""Rows left out listed one a line at most (a week's history can hold thousands)."""


def _list_refused(lines: List[str]) -> None:
    """Each row left out once a line (the same text once, with a count), then how many more."""
    counts: Dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    for line, count in list(counts.items())[:REFUSED_LISTED]:
        _say(f"left out: {line}" + (f" ({count} rows)" if count > 1 else ""))
    if len(counts) > REFUSED_LISTED:
        rest = sum(list(counts.values())[REFUSED_LISTED:])
        _say(f"left out: ... and {rest} more row(s)")


def _existing_rules(args: argparse.Namespace) -> Tuple[Tuple[AllowRule, ...], str]:
    """The rules a person wrote (see the module docstring), and the merge file's text."""
    if args.merge is None:
        return load_settings(args.config).allow, ""
    try:
        with open(args.merge, encoding="utf-8-sig") as stream:
            original = stream.read()
    except FileNotFoundError:
        original = ""
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{safe_text(args.merge)}: cannot read: {error}") from None
    return hand_written_rules(original, args.merge), original


def run(args: argparse.Namespace) -> int:
    until = time.time() if args.until is None else args.until
    since = until - DEFAULT_SINCE_S if args.since is None else args.since
    if until <= since:
        _say(f"--until ({until:.0f}) must be later than --since ({since:.0f})")
        return EXIT_USAGE
    window = Window(since, until)
    try:
        sources, local = _sources(args, window)
    except SourceError as error:
        _say(str(error))
        return EXIT_USAGE
    try:
        existing, original = _existing_rules(args)
    except MergeError as error:
        _say(str(error))
        return EXIT_USAGE
    rows = [row for source in sources for row in source.rows]
    fresh = [row for row in rows if rule_for(existing, row) is None]
    if len(fresh) < len(rows):
        _say(f"{len(rows) - len(fresh)} row(s) already allowed by the rules you wrote")
    learned, refused = learn_rules(
        fresh, widen=args.widen, path_exists=os.path.exists if local else None
    )
    _list_refused([f"{describe(entry.row)}: {entry.reason}" for entry in refused])
    hosts = every_host(sources)
    text = rules_text(learned, hosts)
    learned_rules = parse_settings(parse_yaml(text, "<learned>"), "<learned>").allow
    if args.merge is None:
        sys.stdout.write(text)
    else:
        try:
            merged = merged_text(original, learned, hosts, args.merge)
        except MergeError as error:
            _say(str(error))
            return EXIT_USAGE
        if merged == original:
            _say(f"{args.merge}: no change")
        else:
            sys.stdout.write(unified_diff(original, merged, args.merge))
            try:
                write_atomically(args.merge, merged)
            except OSError as error:
                _say(f"cannot write {args.merge}: {error.strerror or error}")
                return EXIT_USAGE
    _say(f"{len(learned)} rule(s) from {len(rows)} row(s) of {len(sources)} source(s)")
    if not args.test:
        return EXIT_OK
    return _test(sources, window, _renumbered(existing, learned_rules))


def _renumbered(existing: Tuple[AllowRule, ...], learned: Tuple[AllowRule, ...]) -> List[AllowRule]:
    """The rules a person wrote, then the learned ones, numbered as one file would number them."""
    rules = list(existing) + list(learned)
    return [dataclasses.replace(rule, index=index) for index, rule in enumerate(rules)]


def _test(sources: List[Source], window: Window, rules: List[AllowRule]) -> int:
    codes = []
    for source in sources:
        trial = try_rules(evidence_of(source.rows, source.runs, window), rules)
        sys.stderr.write(f"== {safe_text(source.path)}\n")
        sys.stderr.write(render_trial_text(trial, "your rules and the learned ones"))
        codes.append(trial.statement.exit_code)
    return worst_exit(codes)
