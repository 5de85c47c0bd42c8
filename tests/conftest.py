"""Shared test fixtures: a test host built from network namespaces (see tests/nethost.py)."""

from __future__ import annotations

import json
import os
import traceback
from typing import Any, Callable, Iterator

import pytest
from dnshost import dns_host  # noqa: F401 (offered to every test)
from nethost import NetHost
from truthhost import truth, watch  # noqa: F401 (the issue-24 tests' test host and agent)


@pytest.fixture(scope="session", autouse=True)
def foreign_connections() -> Iterator[None]:
    """External connections that are not the tests' own, for the whole run (tests/foreign.py):
    every test must pass beside them, as on any real machine.  As root only (it builds test
    hosts); ``EGRESS_AGENT_TESTS_ALONE=1`` leaves them out, for a run that wants a quiet host."""
    if os.geteuid() != 0 or os.environ.get("EGRESS_AGENT_TESTS_ALONE") == "1":
        yield
        return
    from foreign import ForeignConnections

    foreign = ForeignConnections()
    try:
        yield
    finally:
        foreign.close()


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


NOBODY = 65534


def run_as_nobody(work: Callable[[], Any]) -> Any:
    """``work()``'s result (anything JSON can carry), computed in a forked child that became
    ``nobody`` (uid and gid 65534, no groups) when we are root.

    How the tests see what an ordinary user sees.  Import and warm up what ``work`` needs
    before calling: the interpreter's files may be unreadable to nobody.  A failure in the
    child fails the test with the child's traceback.
    """
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(reader)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            os.write(writer, json.dumps({"result": work()}).encode())
            status = 0
        except BaseException:
            os.write(writer, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, output
    return json.loads(output)["result"]
