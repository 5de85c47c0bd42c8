"""The history of every external connection the agent has seen: :mod:`agent.history.store`
keeps it in one SQLite file, :mod:`agent.history.schema` says what the file holds and brings a
file of any version up to date."""

from agent.history.copy import HistoryUnavailable
from agent.history.schema import HISTORY_COLUMNS, KEY_COLUMNS, RUN_COLUMNS, SCHEMA_VERSION
from agent.history.store import (
    ALIVE,
    CLOSED,
    OPENED,
    HistoryStore,
    Key,
    Observation,
    RunFigures,
    RunStart,
    history_key,
)

__all__ = [
    "ALIVE",
    "CLOSED",
    "HISTORY_COLUMNS",
    "KEY_COLUMNS",
    "OPENED",
    "RUN_COLUMNS",
    "SCHEMA_VERSION",
    "HistoryStore",
    "HistoryUnavailable",
    "Key",
    "Observation",
    "RunFigures",
    "RunStart",
    "history_key",
]
