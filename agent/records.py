"""The one record every output shares: a socket, its verdict and the process behind it.

The osquery tables, the JSON/CSV/ECS output and the history store all derive their columns
from :class:`Connection`, so a new column is added here and nowhere else.  Each field carries
its osquery column type (``osquery/core/sql/column.h``: TEXT, INTEGER, BIGINT, ...).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

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
    net_namespace: Optional[int] = _col("BIGINT")
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
