"""The picture's model: the window's connections grouped into processes, destinations and the
edges between them, in an order that keeps the graph's edges from crossing.

A *process* in the picture is one program as a person names it: the same name, executable,
user, container and systemd unit.  Fifty runs of ``curl`` from cron are one node with fifty
pids, not fifty nodes; the table beside the picture keeps every pid.  A *destination* is one
remote address, with the names it was reached by (``remote_domain``, where known) and its
ports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

from agent.evidence import Evidence, Row, Span, is_unexpected, number, row_span, text, truthy
from agent.inet import protocol_name

ORDERING_PASSES = 8
"""Barycenter sweeps (Sugiyama et al. 1981, the two-layer crossing heuristic)."""

ProgramKey = Tuple[str, str, str, str, str]


@dataclass
class Program:
    index: int
    name: str
    path: str
    username: str
    container_id: str
    systemd_unit: str
    pids: List[int] = field(default_factory=list)
    cmdlines: List[str] = field(default_factory=list)
    connections: int = 0
    unexpected: bool = False
    container: str = ""
    """Where it runs, as :func:`container_label` says it ("" on the host)."""
    container_image: str = ""
    login_users: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or self.path or "(owner not found)"

    @property
    def detail(self) -> str:
        pids = self.pids
        if len(pids) == 1:
            return f"pid {pids[0]}" if pids[0] >= 0 else "no owner"
        return f"{len(pids)} processes"


@dataclass
class Destination:
    index: int
    address: str
    domains: List[str] = field(default_factory=list)
    ports: List[str] = field(default_factory=list)
    connections: int = 0
    unexpected: bool = False

    @property
    def label(self) -> str:
        return self.domains[0] if self.domains else self.address


@dataclass
class Edge:
    program: int
    destination: int
    connections: int = 0
    unexpected: bool = False
    ports: List[str] = field(default_factory=list)
    rules: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Link:
    """One history row as the picture draws it."""

    program: int
    destination: int
    row: Row
    unexpected: bool
    verdict: str
    """The allow rule that expects it, or ``unexpected``."""
    port: str
    """``443/tcp``."""
    span: Span
    """first_seen..last_seen, inside the window."""
    open_until: float
    """Where an open connection's bar ends: the window's end (equal to ``span.end`` when it
    closed)."""


@dataclass
class Picture:
    evidence: Evidence
    programs: List[Program]
    destinations: List[Destination]
    edges: List[Edge]
    links: List[Link]


def container_label(row: Row) -> str:
    """A row's container as a person names it: ``pod NAMESPACE/POD``, else ``container NAME``,
    else ``container`` and the short id; "" for a host process."""
    container = text(row, "container_id")
    if not container:
        return ""
    namespace, pod = text(row, "pod_namespace"), text(row, "pod_name")
    if namespace and pod:
        return f"pod {namespace}/{pod}"
    name = text(row, "container_name")
    return f"container {name}" if name else f"container {container[:12]}"


def port_text(row: Row) -> str:
    protocol = int(number(row, "protocol"))
    return f"{text(row, 'remote_port')}/{protocol_name(protocol)}"


def _program_key(row: Row) -> ProgramKey:
    return (
        text(row, "name"),
        text(row, "path"),
        text(row, "username"),
        text(row, "container_id"),
        text(row, "systemd_unit"),
    )


def _add(items: List[str], value: str, limit: int = 20) -> None:
    if value and value not in items and len(items) < limit:
        items.append(value)


def _barycenter_order(
    count: int,
    neighbours: Dict[int, List[int]],
    other_position: Dict[int, int],
    previous: List[int],
) -> List[int]:
    """Indexes 0..count-1 sorted by the mean position of their neighbours (ties: as before)."""
    rank = {index: place for place, index in enumerate(previous)}

    def key(index: int) -> Tuple[float, int]:
        near = neighbours.get(index, [])
        mean = sum(other_position[n] for n in near) / len(near) if near else float(rank[index])
        return (mean, rank[index])

    return sorted(range(count), key=key)


def order(picture: Picture) -> Tuple[List[int], List[int]]:
    """Top-to-bottom orders of the programs and the destinations: unexpected first, then
    barycenter sweeps that pull each node towards the nodes it is joined to."""
    programs = sorted(
        range(len(picture.programs)),
        key=lambda i: (not picture.programs[i].unexpected, -picture.programs[i].connections, i),
    )
    by_program: Dict[int, List[int]] = {}
    by_destination: Dict[int, List[int]] = {}
    for edge in picture.edges:
        by_program.setdefault(edge.program, []).append(edge.destination)
        by_destination.setdefault(edge.destination, []).append(edge.program)
    destinations = list(range(len(picture.destinations)))
    for _ in range(ORDERING_PASSES):
        program_at = {index: place for place, index in enumerate(programs)}
        destinations = _barycenter_order(
            len(destinations), by_destination, program_at, destinations
        )
        destination_at = {index: place for place, index in enumerate(destinations)}
        programs = _barycenter_order(len(programs), by_program, destination_at, programs)
    return programs, destinations


def picture_of(evidence: Evidence) -> Picture:
    """Group the window's rows (``evidence.rows``, already outbound and external)."""
    window = evidence.window
    programs: Dict[ProgramKey, Program] = {}
    destinations: Dict[str, Destination] = {}
    edges: Dict[Tuple[int, int], Edge] = {}
    links: List[Link] = []
    seen_pids: Dict[int, Set[Tuple[str, int]]] = {}
    for row in evidence.rows:
        key = _program_key(row)
        program = programs.get(key)
        if program is None:
            program = programs[key] = Program(len(programs), *key)
            program.container = container_label(row)
            program.container_image = text(row, "container_image")
            seen_pids[program.index] = set()
        address = text(row, "remote_address")
        destination = destinations.get(address)
        if destination is None:
            destination = destinations[address] = Destination(len(destinations), address)
        unexpected = is_unexpected(row)
        connections = int(number(row, "connections")) or 1
        port = port_text(row)
        pid_key = (text(row, "process_uuid"), int(number(row, "pid")))
        if pid_key not in seen_pids[program.index]:
            seen_pids[program.index].add(pid_key)
            program.pids.append(int(number(row, "pid")))
        _add(program.cmdlines, text(row, "cmdline"), 5)
        _add(program.login_users, text(row, "login_user"), 5)
        program.connections += connections
        program.unexpected |= unexpected
        _add(destination.domains, text(row, "remote_domain"))
        _add(destination.ports, port)
        destination.connections += connections
        destination.unexpected |= unexpected
        edge = edges.get((program.index, destination.index))
        if edge is None:
            edge = edges[(program.index, destination.index)] = Edge(
                program.index, destination.index
            )
        edge.connections += connections
        edge.unexpected |= unexpected
        _add(edge.ports, port)
        verdict = "unexpected" if unexpected else (text(row, "allow_rule") or "allowed")
        _add(edge.rules, verdict)
        span = row_span(row)
        clipped = Span(max(span.start, window.since), min(max(span.end, span.start), window.until))
        links.append(
            Link(
                program=program.index,
                destination=destination.index,
                row=row,
                unexpected=unexpected,
                verdict=verdict,
                port=port,
                span=clipped,
                open_until=window.until if truthy(row, "open") else clipped.end,
            )
        )
    return Picture(
        evidence, list(programs.values()), list(destinations.values()), list(edges.values()), links
    )
