"""TEMPORARY stand-in for the configuration module (issue 3), so the extension can run meanwhile.

It has the interface the config helper is writing (``load_settings(path=None) -> Settings``)
and reads just the keys the extension uses.  It is replaced whole by the real module at merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, List, Optional, Union

import yaml

DEFAULT_PATH = "/etc/egress-agent/config.yaml"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


@dataclass
class HistorySettings:
    path: str = "/var/lib/egress-agent/history.db"
    retention_days: float = 30
    max_rows: int = 100_000


@dataclass
class Settings:
    internal_networks: List[Union[IPv4Network, IPv6Network]] = field(default_factory=list)
    sampling_interval: float = 5.0
    history: HistorySettings = field(default_factory=HistorySettings)
    allow: List[Any] = field(default_factory=list)
    source: str = "defaults"


def load_settings(path: Optional[str] = None) -> Settings:
    path = path or os.environ.get("EGRESS_AGENT_CONFIG") or None
    if path is None and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    settings = Settings()
    if path is None:
        return settings
    try:
        with open(path, encoding="utf-8") as stream:
            document = yaml.safe_load(stream) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {error}") from None
    sampling = document.get("sampling") or {}
    history = document.get("history") or {}
    settings.sampling_interval = float(sampling.get("interval", settings.sampling_interval))
    settings.history.path = str(history.get("path", settings.history.path))
    settings.history.retention_days = float(
        history.get("retention_days", settings.history.retention_days)
    )
    settings.history.max_rows = int(history.get("max_rows", settings.history.max_rows))
    settings.source = path
    return settings
