"""The history of every external connection the agent has seen: :mod:`agent.history.store`
keeps it in one SQLite file, :mod:`agent.history.schema` says what the file holds and brings a
file of any version up to date; :func:`open_store` opens the store the settings name."""

from __future__ import annotations

import logging
from typing import Optional

from agent.config import ConfigError, Settings
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
    "open_store",
]


def open_store(
    settings: Settings,
    path: Optional[str] = None,
    read_only: bool = False,
    logger: Optional[logging.Logger] = None,
) -> HistoryStore:
    """The history store the settings name (or the file at ``path``: a copy, read only); a
    writer signs the chain with ``history.key_file``.  Raises ConfigError when that file
    cannot be read."""
    key = None
    if settings.history_key_file and not read_only:
        try:
            with open(settings.history_key_file, "rb") as handle:
                key = handle.read().strip()
        except OSError as error:
            raise ConfigError(
                f"history.key_file {settings.history_key_file}: {error.strerror}"
            ) from None
        if not key:
            raise ConfigError(f"history.key_file {settings.history_key_file} is empty")
    return HistoryStore(
        path or settings.history_path,
        retention_days=settings.history_retention_days,
        max_rows=settings.history_max_rows,
        logger=logger,
        read_only=read_only,
        key=key,
    )
