"""The ``domains`` a rule names for the names that were asked: each name as it is, and a
wildcard (``*.parent``) only where several names under one parent were asked.

``a.cdn.example.com`` and ``b.cdn.example.com`` become ``*.cdn.example.com``; ``example.com``
alone stays itself.  A wildcard is never made over a parent of one label (``*.com``) or over a
two-label parent whose top label is a country code and whose first label is one of the usual
second levels (``co.uk``, ``com.au``): those are registries, not an operator's names.  Names
the configuration would refuse (:func:`agent.config.parse_domain`) are no names to learn.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Set

from agent.config import parse_domain

REGISTRY_SECOND_LEVELS = frozenset({"co", "com", "net", "org", "gov", "ac", "edu", "ne", "or"})


def valid_domain(name: str) -> Optional[str]:
    """``name`` as a rule writes it (lower case, no trailing dot), or None when a rule could
    not name it."""
    if not name:
        return None
    try:
        return parse_domain(name, "domain")
    except Exception:  # config's private _Invalid: the name is refused
        return None


def _parent_may_be_wild(parent: str) -> bool:
    labels = parent.split(".")
    if len(labels) < 2:
        return False
    return not (len(labels) == 2 and len(labels[1]) == 2 and labels[0] in REGISTRY_SECOND_LEVELS)


def domain_patterns(names: Iterable[str]) -> Dict[str, str]:
    """Each name -> the pattern a rule names it by (itself, or ``*.parent``)."""
    distinct: Set[str] = set(names)
    children: Dict[str, Set[str]] = {}
    for name in distinct:
        parent = name.partition(".")[2]
        if parent and _parent_may_be_wild(parent):
            children.setdefault(parent, set()).add(name)
    patterns = {}
    for name in distinct:
        parent = name.partition(".")[2]
        wild = len(children.get(parent, ())) >= 2
        patterns[name] = f"*.{parent}" if wild else name
    return patterns
