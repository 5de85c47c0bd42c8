"""The one record every output shares: a socket, its verdict and the process behind it.

The osquery tables, the JSON/CSV/ECS output and the history store all derive their columns
from :class:`Connection`, so a new column is added here and nowhere else (and filled by the
reader that knows it; the history store adds it to an existing file by itself).  Each field
carries its osquery column type (``osquery/core/sql/column.h``: TEXT, INTEGER, BIGINT, ...).

Readers build records with :func:`connection_of` from three typed parts, so a misspelt column
is an error mypy reports, not a surprise at run time.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple, Union

if TYPE_CHECKING:
    from agent.classify import Verdict
    from agent.identity import Identity

Value = Union[str, int, bool, None]


def _col(sql_type: str, default: Any = None) -> Any:
    return field(default=default, metadata={"sql_type": sql_type})


@dataclass
class Connection:
    """One inet socket of one process, with the classification of its remote end.

    Field names follow osquery's ``process_open_sockets`` and ``processes`` tables where a
    column means the same thing, so a query can JOIN on them.
    """

    # process identity (empty when the owner could not be found: pid -1)
    pid: int = _col("INTEGER", -1)
    name: str = _col("TEXT", "")
    path: str = _col("TEXT", "")
    cmdline: str = _col("TEXT", "")
    uid: Optional[int] = _col("BIGINT")
    username: str = _col("TEXT", "")
    parent: Optional[int] = _col("INTEGER")
    process_start_time: Optional[int] = _col("BIGINT")
    process_uuid: str = _col("TEXT", "")
    container_id: str = _col("TEXT", "")
    systemd_unit: str = _col("TEXT", "")
    """The system manager's unit; ``user@UID.service`` for anything a user's manager runs."""
    user_unit: str = _col("TEXT", "")
    """The unit of a user's own manager (``user@UID.service``'s subtree), which that user names."""
    rootless_container_id: str = _col("TEXT", "")
    """A container id that a cgroup in a user's own subtree claims (a rootless container)."""
    rootless_uid: Optional[int] = _col("BIGINT")
    """The user whose subtree holds ``rootless_container_id``."""
    exe_status: str = _col("TEXT", "")
    """What proves the executable (``agent.exe_check``): packaged, modified, unpackaged,
    deleted, memory, mismatch, pending, or "" when unknown."""
    sha256: str = _col("TEXT", "")
    """SHA-256 of the executable, read through ``/proc/PID/exe``; "" until computed."""
    package: str = _col("TEXT", "")
    """The installed package that lists the executable's path (see ``exe_status``)."""
    net_namespace: Optional[int] = _col("BIGINT")
    # who is behind the process (issue 22, agent.who): the login, the parents, the container
    login_user: str = _col("TEXT", "")
    """Who logged in (``/proc/PID/loginuid``), through sudo or su; "" for daemons."""
    login_session: Optional[int] = _col("BIGINT")
    ancestors: str = _col("TEXT", "")
    """JSON array of ``{"pid", "name"}``, the parent first, up to pid 1 or the container's
    init, at most ``agent.who.MAX_ANCESTORS``."""
    container_name: str = _col("TEXT", "")
    container_image: str = _col("TEXT", "")
    container_runtime: str = _col("TEXT", "")
    pod_namespace: str = _col("TEXT", "")
    pod_name: str = _col("TEXT", "")
    # the socket
    fd: Optional[int] = _col("BIGINT")
    socket: Optional[int] = _col("BIGINT")
    family: int = _col("INTEGER", 2)
    protocol: int = _col("INTEGER", 6)
    state: str = _col("TEXT", "")
    local_address: str = _col("TEXT", "")
    local_port: int = _col("INTEGER", 0)
    remote_address: str = _col("TEXT", "")
    remote_port: int = _col("INTEGER", 0)
    remote_domain: str = _col("TEXT", "")
    """The name that was asked for this address, when a DNS answer was seen (issue 12)."""
    direction: str = _col("TEXT", "outbound")
    # the verdict on the remote address (agent.classify.Verdict)
    external: bool = _col("INTEGER", False)
    expanded_address: str = _col("TEXT", "")
    address_int: str = _col("TEXT", "")
    address_class: str = _col("TEXT", "")
    via: Optional[str] = _col("TEXT")
    embedded_ipv4: Optional[str] = _col("TEXT")
    # policy
    allowlisted: bool = _col("INTEGER", False)
    allow_rule: str = _col("TEXT", "")

    def as_dict(self) -> Dict[str, Value]:
        """The record as a plain dict, in column order (for JSON and the history store).

        Every column is a scalar, so this is ``dataclasses.asdict`` without its deep copy,
        which costs ten times as much for a table of thousands of rows."""
        return dict(zip(COLUMN_NAMES, _column_values(self)))


COLUMNS: Tuple[Tuple[str, str], ...] = tuple(
    (f.name, f.metadata["sql_type"]) for f in dataclasses.fields(Connection)
)
"""(column name, osquery type) in table order."""

COLUMN_NAMES: List[str] = [name for name, _ in COLUMNS]

_column_values = operator.attrgetter(*COLUMN_NAMES)


class SocketColumns(NamedTuple):
    """The columns of a record that the socket reader fills (the rest come from the process
    and the verdict)."""

    net_namespace: Optional[int]
    fd: Optional[int]
    socket: Optional[int]
    family: int
    protocol: int
    state: str
    local_address: str
    local_port: int
    remote_port: int
    direction: str


class WhoColumns(NamedTuple):
    """The columns of ``identity.who`` (:mod:`agent.who`)."""

    login_user: str
    login_session: Optional[int]
    ancestors: str
    container_name: str
    container_image: str
    container_runtime: str
    pod_namespace: str
    pod_name: str


def who_columns(identity: Identity) -> WhoColumns:
    """The columns of ``identity.who`` (:mod:`agent.who`) under their column names."""
    from agent.who import ancestors_text

    who = identity.who
    container = who.container
    return WhoColumns(
        who.login_user,
        who.login_session,
        ancestors_text(who.ancestors, identity.container_id),
        container.name,
        container.image,
        container.runtime,
        container.pod_namespace,
        container.pod_name,
    )


def connection_of(
    identity: Identity, verdict: Optional[Verdict], sock: SocketColumns
) -> Connection:
    """One record from its three parts: the process holding the socket, the socket's own
    columns, and the verdict on its remote address (None when it has none)."""
    return Connection(
        pid=identity.pid,
        name=identity.name,
        path=identity.path,
        cmdline=identity.cmdline,
        uid=identity.uid,
        username=identity.username,
        parent=identity.parent,
        process_start_time=identity.process_start_time,
        process_uuid=identity.process_uuid,
        container_id=identity.container_id,
        systemd_unit=identity.systemd_unit,
        user_unit=identity.user_unit,
        rootless_container_id=identity.rootless_container_id,
        rootless_uid=identity.rootless_uid,
        exe_status=identity.exe_status,
        sha256=identity.sha256,
        package=identity.package,
        **who_columns(identity)._asdict(),
        remote_address=verdict.normalized if verdict is not None else "",
        external=verdict is not None and verdict.external,
        expanded_address=verdict.expanded if verdict is not None else "",
        address_int=verdict.address_int if verdict is not None else "",
        address_class=verdict.category if verdict is not None else "",
        via=verdict.via if verdict is not None else None,
        embedded_ipv4=verdict.embedded_ipv4 if verdict is not None else None,
        **sock._asdict(),
    )
