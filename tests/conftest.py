"""Shared test fixtures: a test host built from network namespaces (see tests/nethost.py)."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from nethost import NetHost

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: network namespaces, veth pairs and every /proc/PID/fd"
)


@pytest.fixture
def nethost() -> Iterator[NetHost]:
    """An empty :class:`NetHost`; everything made through it is removed after the test.

    Names are ``$NETHOST_PREFIX-*`` (default ``eat``): set NETHOST_PREFIX when two test runs
    share the machine, so that they do not remove each other's namespaces.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and veth pairs")
    with NetHost(os.environ.get("NETHOST_PREFIX", "eat")) as host:
        yield host
