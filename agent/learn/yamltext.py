"""Learned rules as YAML text that the configuration accepts as it is, each rule commented.

Written as text, not through a YAML library, so that every rule carries its comment lines
(what it was learned from) and the text can be merged into a file a person keeps
(:mod:`agent.learn.merge`).  Every value is a double-quoted scalar written by ``json.dumps``
(YAML's double-quoted style is a superset of JSON strings), so no name, path or unit, whatever
its characters, can end the scalar or start another key; comment text is escaped
(:func:`agent.textsafe.safe_text`) and kept to one line.

The learned rules stand between two marker lines (:data:`BEGIN`, :data:`END`); learning again
replaces what is between them and nothing else.
"""

from __future__ import annotations

import json
from typing import List, Sequence

from agent.inet import PROTOCOL_NAMES
from agent.learn.rules import Learned
from agent.textsafe import safe_text
from agent.timetext import iso

BEGIN = "# >>> egress-agent learn: rules down to the end mark are rewritten by `learn --merge`"
END = "# <<< egress-agent learn: end of the learned rules; rules of your own go above or below"
SEEN_LISTED = 6
"""Names or addresses listed in a rule's comment at most."""


def quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=True)


def _comment(text: str) -> str:
    return "# " + safe_text(text)


def hosts_text(rule: Learned, all_hosts: Sequence[str]) -> str:
    names = sorted(rule.hosts)
    shown = ", ".join(names[:SEEN_LISTED]) + (", ..." if len(names) > SEEN_LISTED else "")
    if len(all_hosts) <= 1:
        return f"on {shown}"
    return f"on {len(names)} of {len(all_hosts)} hosts ({shown})"


def rule_lines(rule: Learned, all_hosts: Sequence[str], indent: str = "  ") -> List[str]:
    """One rule as a list item at ``indent``, its comment lines first."""
    seen = sorted(rule.seen)
    listed = ", ".join(seen[:SEEN_LISTED])
    if len(seen) > SEEN_LISTED:
        listed += f", ... ({len(seen)} in all)"
    protocol = PROTOCOL_NAMES.get(rule.protocol)
    ports = ", ".join(str(port) for port in rule.ports)
    more = len(rule.targets) - 1
    first = rule.targets[0] + (f" and {more} more" if more else "")
    label = f"learned: {rule.identity.key} {rule.identity.value} to {first}"
    lines = [
        _comment(
            f"learned from {rule.connections} connection(s) {hosts_text(rule, all_hosts)}, "
            f"first seen {iso(rule.first_seen)}, last seen {iso(rule.last_seen)}"
        ),
        _comment(f"seen: {listed}"),
        f"- comment: {quoted(label)}",
        f"  {rule.identity.key}: {quoted(rule.identity.value)}",
        f"  {rule.kind}: [{', '.join(quoted(target) for target in rule.targets)}]",
    ]
    if protocol is not None:
        lines.append(f"  protocol: {protocol}")
    if ports:
        lines.append(f"  ports: [{ports}]")
    return [indent + line for line in lines]


def block_lines(
    rules: Sequence[Learned], all_hosts: Sequence[str], indent: str = "  "
) -> List[str]:
    """The marked block of learned rules (the markers at ``indent`` too)."""
    lines = [indent + BEGIN]
    for rule in rules:
        lines.extend(rule_lines(rule, all_hosts, indent))
    if not rules:
        lines.append(indent + "# (nothing to learn in the window)")
    lines.append(indent + END)
    return lines


def rules_text(rules: Sequence[Learned], all_hosts: Sequence[str]) -> str:
    """A whole configuration holding the learned rules only (what ``learn`` prints)."""
    body = block_lines(rules, all_hosts)
    if not rules:
        return "allow: []\n" + "".join(line.strip() + "\n" for line in body)
    return "allow:\n" + "".join(line + "\n" for line in body)
