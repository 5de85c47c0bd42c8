"""The audit statement: did anything unexpected go out in a window, and did the agent see it all?

:func:`statement_of` turns the :class:`agent.evidence.Evidence` of a window into one verdict
with its exit status and a one-line reason:

- **0** (``clean``): no unexpected outbound external connection, and the window is fully
  covered (:attr:`agent.evidence.Coverage.complete`: the agent ran all the time, no event was
  lost, kernel events saw every connect);
- **1** (``unexpected``): an unexpected outbound external connection went out (whatever the
  coverage: what was seen went out; the reason says when the evidence is incomplete too);
- **3** (``incomplete``): nothing unexpected was seen, but the evidence cannot say nothing
  went out (each reason is a :class:`agent.evidence.Shortfall`, with its spans);
- **4** (``tampered``): the history's chain is broken (:mod:`agent.history.chain`): a row,
  run, loss or link was edited, deleted or added outside the agent, or the chain does not
  hold the head recorded off the host (``--expect-head``).  It comes first: what an edited
  file says, unexpected connections included, cannot be taken as the host's record.

(2 stays the command line's usage and configuration errors.)  Inbound connections are not
egress and are not part of the statement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from agent.evidence import Evidence, Row, Span, number, process_key, text
from agent.textsafe import json_safe, safe_text
from agent.timetext import duration_text, iso

EXIT_CLEAN, EXIT_UNEXPECTED, EXIT_INCOMPLETE, EXIT_TAMPERED = 0, 1, 3, 4
TEXT_LIST_LIMIT = 20
"""Unexpected connections listed one a line in the text statement (json lists all)."""


@dataclass(frozen=True)
class Statement:
    evidence: Evidence
    outcome: str
    """``clean``, ``unexpected``, ``incomplete`` or ``tampered``."""
    exit_code: int
    reason: str
    """Why, in one line."""


def statement_of(evidence: Evidence) -> Statement:
    """The verdict on ``evidence`` (see the module docstring for the rules)."""
    coverage = evidence.coverage
    unexpected = evidence.unexpected
    chain = evidence.chain
    if chain is not None and evidence.tampered:
        reason = f"the history was tampered with: {chain.broken or 'the chain is broken'}"
        if unexpected:
            reason += (
                f"; it still shows {evidence.unexpected_connections} unexpected external "
                "connection(s)"
            )
        return Statement(evidence, "tampered", EXIT_TAMPERED, reason)
    if unexpected:
        reason = (
            f"{evidence.unexpected_connections} unexpected external connection(s) to "
            f"{len({text(row, 'remote_address') for row in unexpected})} destination(s) by "
            f"{evidence.unexpected_processes} process(es) went out"
        )
        if not coverage.complete:
            reason += f"; the evidence is also incomplete: {coverage.shortfalls[0]}"
        return Statement(evidence, "unexpected", EXIT_UNEXPECTED, reason)
    if not coverage.complete:
        return Statement(
            evidence,
            "incomplete",
            EXIT_INCOMPLETE,
            f"nothing unexpected was seen, but the evidence is incomplete: "
            f"{'; '.join(coverage.shortfalls)}",
        )
    return Statement(
        evidence,
        "clean",
        EXIT_CLEAN,
        f"nothing unexpected went out ({evidence.connections} expected external "
        f"connection(s)), and the agent saw the whole window: running all of it, tracefs "
        "events, no event lost, every kernel TCP connect seen, nothing lost or evicted, no "
        "clock jump, the chain intact",
    )


def _connection_line(row: Row) -> str:
    where = text(row, "remote_address")
    domain = text(row, "remote_domain")
    protocol = {6: "tcp", 17: "udp"}.get(int(number(row, "protocol")), text(row, "protocol"))
    return (
        f"  {text(row, 'name') or '?'} (pid {text(row, 'pid')}, user "
        f"{text(row, 'username') or '-'}, {text(row, 'path') or 'no path'}) -> "
        f"{domain + ' ' if domain else ''}{where} port {text(row, 'remote_port')}/{protocol}, "
        f"{iso(number(row, 'first_seen'))} to {iso(number(row, 'last_seen'))}, "
        f"{int(number(row, 'connections'))} connection(s)"
    )


def render_text(statement: Statement) -> str:
    """The statement for a person: one fact a line, every process-given text escaped
    (:func:`agent.textsafe.safe_text`), the verdict last."""
    evidence = statement.evidence
    coverage = evidence.coverage
    window = evidence.window
    hosts = ", ".join(
        f"{host.hostname or '?'} (machine id {host.machine_id or '?'})" for host in evidence.hosts
    )
    lines = [
        f"host: {hosts or 'unknown (no agent run recorded in the window)'}",
        f"window: {iso(window.since)} to {iso(window.until)} ({duration_text(window.seconds)})",
        f"external connections: {evidence.connections} to {evidence.destinations} "
        f"destination(s) by {evidence.processes} process(es); unexpected: "
        f"{evidence.unexpected_connections} by {evidence.unexpected_processes} process(es)",
    ]
    unexpected = evidence.unexpected
    lines.extend(_connection_line(row) for row in unexpected[:TEXT_LIST_LIMIT])
    if len(unexpected) > TEXT_LIST_LIMIT:
        lines.append(f"  ... and {len(unexpected) - TEXT_LIST_LIMIT} more (--format json: all)")
    gaps = f"{len(coverage.gaps)} gap(s)" if coverage.gaps else "no gap"
    lines += [
        f"agent running: {coverage.share:.1%} of the window ({len(coverage.runs)} run(s), {gaps})",
        *(f"  not running: {iso(gap.start)} to {iso(gap.end)}" for gap in coverage.gaps[:10]),
        f"source: {', '.join(coverage.sources) or 'none'}; events lost: {coverage.events_lost}",
        f"outbound TCP connects: {coverage.outbound_tcp_seen} seen of "
        f"{coverage.tcp_active_opens} the kernel counted"
        + ("" if coverage.tcp_seen_share is None else f" ({coverage.tcp_seen_share:.1%})"),
        *_reason_lines(evidence),
        _chain_line(evidence),
        f"verdict: {statement.outcome} (exit {statement.exit_code}): {statement.reason}",
    ]
    return "".join(safe_text(line) + "\n" for line in lines)


def _reason_lines(evidence: Evidence) -> List[str]:
    lines = []
    for shortfall in evidence.coverage.reasons:
        spans = ", ".join(f"{iso(span.start)} to {iso(span.end)}" for span in shortfall.spans[:5])
        more = f" and {len(shortfall.spans) - 5} more" if len(shortfall.spans) > 5 else ""
        lines.append(
            f"incomplete ({shortfall.reason}): {shortfall.text}"
            + (f" [{spans}{more}]" if spans else "")
        )
    return lines


def _chain_line(evidence: Evidence) -> str:
    chain = evidence.chain
    if chain is None:
        return "chain: not checked"
    if not chain.chained:
        return "chain: none (the file has no tamper-evident chain)"
    state = "intact" if chain.intact else f"BROKEN: {chain.broken}"
    head = f"; head {chain.head}" if chain.head else ""
    expected = ""
    if chain.expected_head is not None:
        expected = "; the expected head is in it" if chain.expected_found else ""
    return f"chain: {state} ({chain.links} link(s){head}{expected})"


def _span_document(span: Span) -> Dict[str, Any]:
    return {
        "start": span.start,
        "end": span.end,
        "start_iso": iso(span.start),
        "end_iso": iso(span.end),
    }


def statement_document(statement: Statement) -> Dict[str, Any]:
    """The statement as a JSON-ready dict (``--format json``)."""
    evidence = statement.evidence
    coverage = evidence.coverage
    window = evidence.window
    unexpected: List[Dict[str, Any]] = [
        {**dict(row), "process": process_key(row)} for row in evidence.unexpected
    ]
    document: Dict[str, Any] = json_safe(
        {
            "outcome": statement.outcome,
            "exit_code": statement.exit_code,
            "reason": statement.reason,
            "hosts": [{"hostname": h.hostname, "machine_id": h.machine_id} for h in evidence.hosts],
            "window": {
                "since": window.since,
                "until": window.until,
                "since_iso": iso(window.since),
                "until_iso": iso(window.until),
            },
            "external_connections": evidence.connections,
            "destinations": evidence.destinations,
            "processes": evidence.processes,
            "unexpected_connections": evidence.unexpected_connections,
            "unexpected_processes": evidence.unexpected_processes,
            "unexpected": unexpected,
            "coverage": {
                "complete": coverage.complete,
                "shortfalls": list(coverage.shortfalls),
                "running_share": round(coverage.share, 6),
                "running_seconds": coverage.running_seconds,
                "gaps": [{"start": g.start, "end": g.end} for g in coverage.gaps],
                "runs": [dict(run) for run in coverage.runs],
                "sources": list(coverage.sources),
                "events_lost": coverage.events_lost,
                "tcp_active_opens": coverage.tcp_active_opens,
                "outbound_tcp_seen": coverage.outbound_tcp_seen,
                "reasons": [
                    {
                        "reason": shortfall.reason,
                        "text": shortfall.text,
                        "spans": [_span_document(span) for span in shortfall.spans],
                    }
                    for shortfall in coverage.reasons
                ],
                "losses": [dict(loss) for loss in coverage.losses],
            },
            "chain": _chain_document(evidence),
        }
    )
    return document


def _chain_document(evidence: Evidence) -> Optional[Dict[str, Any]]:
    chain = evidence.chain
    if chain is None:
        return None
    return {
        "chained": chain.chained,
        "intact": chain.intact,
        "broken": chain.broken,
        "head": chain.head,
        "links": chain.links,
        "expected_head": chain.expected_head,
        "expected_head_found": chain.expected_found,
    }


def render_json(statement: Statement) -> str:
    return json.dumps(statement_document(statement), ensure_ascii=True, indent=2) + "\n"
