"""A process's user after a setuid-family call, as the events tell it (issue 22,
agent/collect/kernel/users.py): the rule for the real uid, and the events enabled on this
kernel.  The end-to-end case (200 short-lived processes that drop to nobody with setpriv and
connect) is in tests/test_who_events.py."""

from __future__ import annotations

import os

import pytest

from agent.collect.kernel.users import USER_SPECS, real_uid_after


@pytest.mark.parametrize(
    ("syscall", "asked", "current", "after"),
    [
        ("setresuid", 65534, 0, 65534),
        ("setresuid", None, 0, None),  # -1: the real uid stays
        ("setreuid", 1000, 0, 1000),
        ("setreuid", None, 1000, None),
        ("setuid", 65534, 0, 65534),  # privileged: every uid
        ("setuid", 1000, 1000, None),  # asking for what it is: nothing changes
    ],
)
def test_the_real_uid_after_a_granted_call(
    syscall: str, asked: int, current: int, after: int
) -> None:
    assert real_uid_after(syscall, asked, current) == after


def test_the_source_enables_the_user_events() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs")
    from agent.collect.kernel.source import open_event_source

    prefix = f"egress-agent-{os.environ.get('NETHOST_PREFIX', 'eat')}-users"
    source = open_event_source(prefix=prefix, exec_args=False)
    try:
        names = {f"{spec.system}:{spec.name}" for spec in USER_SPECS}
        enabled = {f"{system}:{name}" for system, name in source.instance.enabled}
        missing = names - enabled
        assert missing <= set(source.unavailable), missing
        if os.path.isdir("/sys/kernel/tracing/events/syscalls"):
            assert names <= enabled
    finally:
        source.close()
