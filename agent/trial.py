"""Rules tried before they are trusted: the verdict a window would have had with other rules.

:func:`try_rules` takes the :class:`agent.evidence.Evidence` of a window and a list of allow
rules, decides again for every row which rule (if any) allows it, exactly as the agent decides
for a live connection (:func:`agent.allow.first_match`, the first rule in file order), and gives
the :class:`agent.audit.Statement` the window would have had, with what each rule allowed.  The
coverage of the window does not change: rules decide what is expected, not what was seen.

A history row keeps the name that was asked for its address (``remote_domain``), so a
``domains`` rule matches a row by that name (the live agent also knows the names of a CNAME
chain, which the history does not keep).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from agent.allow import first_match
from agent.audit import Statement, render_text, statement_document, statement_of
from agent.config import AllowRule
from agent.evidence import (
    EGRESS_DIRECTIONS,
    Evidence,
    HistoryReader,
    Row,
    Window,
    evidence_of,
    number,
    process_key,
    text,
)
from agent.records import Connection
from agent.textsafe import json_safe, safe_text

_FIELDS = {field.name: field for field in dataclasses.fields(Connection)}


def row_connection(row: Mapping[str, Any]) -> Connection:
    """A history (or exported) row as the record the allow rules read: the columns the record
    has, each that is set."""
    values = {name: row[name] for name in _FIELDS if row.get(name) is not None}
    if values.get("net_namespace") is None:
        values["net_namespace"] = 0  # a namespace, so that the row's name is looked up
    for name in ("pid", "protocol", "remote_port", "uid"):
        if name in values and not isinstance(values[name], int):
            values[name] = int(number(values, name))
    return Connection(**values)


def rule_for(rules: Sequence[AllowRule], row: Mapping[str, Any]) -> Optional[AllowRule]:
    """The first of ``rules`` that allows ``row``, or None."""
    domain = text(row, "remote_domain").lower().rstrip(".")
    names: Tuple[str, ...] = (domain,) if domain else ()
    return first_match(rules, row_connection(row), lambda namespace, version, value: names)


@dataclass(frozen=True)
class RuleUse:
    """What one rule allowed in the window."""

    rule: AllowRule
    rows: Tuple[Row, ...]

    @property
    def connections(self) -> int:
        return sum(int(number(row, "connections")) or 1 for row in self.rows)

    @property
    def destinations(self) -> int:
        return len({text(row, "remote_address") for row in self.rows})

    @property
    def processes(self) -> int:
        return len({process_key(row) for row in self.rows})


@dataclass(frozen=True)
class Trial:
    """The statement with the rules tried, and each rule's part in it (in file order)."""

    statement: Statement
    uses: Tuple[RuleUse, ...]


def try_rules(evidence: Evidence, rules: Sequence[AllowRule]) -> Trial:
    """The window of ``evidence`` judged by ``rules`` alone."""
    judged: List[Row] = []
    allowed: Dict[int, List[Row]] = {rule.index: [] for rule in rules}
    for row in evidence.rows:
        rule = rule_for(rules, row)
        judged.append(
            dict(row, allowlisted=rule is not None, allow_rule=rule.label if rule else "")
        )
        if rule is not None:
            allowed[rule.index].append(row)
    statement = statement_of(dataclasses.replace(evidence, rows=tuple(judged)))
    uses = tuple(RuleUse(rule, tuple(allowed[rule.index])) for rule in rules)
    return Trial(statement, uses)


def read_every_column(store: HistoryReader, window: Window) -> Evidence:
    """:func:`agent.evidence.read_evidence` with every column of the rows (the rules tried may
    name any of them), not only those the statement reads."""
    rows = store.query(since=window.since, until=window.until, directions=EGRESS_DIRECTIONS)
    runs = store.runs(since=window.since, until=window.until)
    return evidence_of(rows, runs, window)


def _use_line(use: RuleUse) -> str:
    name = f"allow[{use.rule.index}]" + (f" {use.rule.comment}" if use.rule.comment else "")
    if not use.rows:
        return f"  {name}: allowed nothing"
    return (
        f"  {name}: allowed {use.connections} connection(s) to {use.destinations} "
        f"destination(s) by {use.processes} process(es)"
    )


def render_trial_text(trial: Trial, rules_source: str) -> str:
    """Each rule's part, one a line, then the statement (which lists what stays unexpected)."""
    lines = [f"rules tried: {len(trial.uses)} from {rules_source}"]
    lines.extend(_use_line(use) for use in trial.uses)
    head = "".join(safe_text(line) + "\n" for line in lines)
    return head + render_text(trial.statement)


def trial_document(trial: Trial, rules_source: str) -> Dict[str, Any]:
    """The trial as JSON-ready data: the statement's document with ``rules`` added."""
    document = statement_document(trial.statement)
    document["rules_source"] = rules_source
    document["rules"] = [
        {
            "index": use.rule.index,
            "comment": use.rule.comment,
            "connections": use.connections,
            "destinations": use.destinations,
            "processes": use.processes,
        }
        for use in trial.uses
    ]
    result: Dict[str, Any] = json_safe(document)
    return result


def render_trial_json(trial: Trial, rules_source: str) -> str:
    return json.dumps(trial_document(trial, rules_source), ensure_ascii=True, indent=2) + "\n"


def worst_exit(codes: Iterable[int]) -> int:
    """One exit status for several statements: unexpected (1) over incomplete (3) over clean."""
    found = set(codes)
    for code in (1, 3):
        if code in found:
            return code
    return 0
