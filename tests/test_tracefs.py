"""The tracing instance of our own: lifecycle, stale removal, a reset by "another tool", hygiene.

Every instance made here is named ``egress-agent-$NETHOST_PREFIX-*`` (removed by name after
each test), so runs of other developers on this machine are never touched.  The top-level
tracing files and a stand-in for another tool's instance are read byte for byte before and
after, and must not change.  Mounting tracefs where none is mounted is tried in a private
mount namespace (``unshare -m``), never by unmounting the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from conftest import needs_root, run_as_nobody

from agent.collect.kernel import tracefs
from agent.collect.kernel.reader import EVENT_SPECS, TCP_FILTER, EventReader, choose_events
from agent.collect.kernel.tracefs import (
    EventSetting,
    EventsUnavailable,
    Instance,
    InstanceSettings,
    find_tracefs,
    lockdown_mode,
    remove_stale_instances,
)

PREFIX = "egress-agent-" + os.environ.get("NETHOST_PREFIX", "eat")
ROOT = "/sys/kernel/tracing"
REPO = Path(__file__).resolve().parent.parent

TOP_LEVEL = [
    "tracing_on",
    "trace_clock",
    "buffer_size_kb",
    "buffer_percent",
    "buffer_subbuf_size_kb",
    "current_tracer",
    "set_event",
    "set_event_pid",
    "tracing_cpumask",
    "trace_options",
    "events/enable",
]


def _top_level_files(root: str) -> List[str]:
    files = [name for name in TOP_LEVEL if os.path.exists(os.path.join(root, name))]
    files += [f"options/{name}" for name in sorted(os.listdir(os.path.join(root, "options")))]
    for spec in EVENT_SPECS:
        base = f"events/{spec.system}/{spec.name}"
        if os.path.isdir(os.path.join(root, base)):
            files += [f"{base}/enable", f"{base}/filter"]
    return files


def snapshot(directory: str, files: List[str]) -> Dict[str, bytes]:
    contents = {}
    for name in files:
        with open(os.path.join(directory, name), "rb") as handle:
            contents[name] = handle.read()
    return contents


def _remove_ours() -> None:
    instances = os.path.join(ROOT, "instances")
    if not os.path.isdir(instances):
        return
    for name in os.listdir(instances):
        if name.startswith(PREFIX + "-"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(instances, name))


@pytest.fixture
def root() -> Iterator[str]:
    """The host's tracefs; our instances are removed by name afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs")
    if not os.path.isdir(os.path.join(ROOT, "instances")):
        pytest.skip(f"no tracefs at {ROOT}")
    _remove_ours()
    yield ROOT
    _remove_ours()


SETTINGS = InstanceSettings(
    (
        EventSetting("sock", "inet_sock_set_state", (TCP_FILTER, "")),
        EventSetting("sched", "sched_process_exit"),
        EventSetting("nosuch", "event"),
    ),
    buffer_size_kb=256,
)


def test_an_instance_is_made_configured_and_removed(root: str) -> None:
    instance = Instance.create(root, PREFIX)
    assert instance.name == f"{PREFIX}-{os.getpid()}"
    assert os.path.isdir(instance.path)
    instance.apply(SETTINGS)
    assert instance.read("tracing_on").strip() == "1"
    assert instance.clock == "boot" and "[boot]" in instance.read("trace_clock")
    assert 256 <= int(instance.read("buffer_size_kb").split()[0]) < 264  # whole pages
    if instance.has("buffer_percent"):
        assert instance.read("buffer_percent").strip() == "0"
    assert instance.read("events/sock/inet_sock_set_state/enable").strip() == "1"
    assert instance.read("events/sock/inet_sock_set_state/filter").strip() == TCP_FILTER
    assert instance.missing == [("nosuch", "event")]
    assert instance.verify() == []
    assert instance.close()
    assert not os.path.exists(instance.path)


def test_a_second_instance_of_the_same_pid_replaces_a_leftover(root: str) -> None:
    first = Instance.create(root, PREFIX)
    second = Instance.create(root, PREFIX)  # the first was never closed: ours, stale
    assert second.path == first.path and os.path.isdir(second.path)
    assert second.close()


def test_a_reset_by_another_tool_is_noticed_and_undone(root: str) -> None:
    instance = Instance.create(root, PREFIX)
    try:
        instance.apply(SETTINGS)
        # what `trace-cmd reset -a` does to every instance, done to ours only
        instance.write("tracing_on", "0")
        instance.write("events/sock/inet_sock_set_state/enable", "0")
        instance.write("events/sock/inet_sock_set_state/filter", "0")
        instance.write("trace_clock", "local")
        instance.write("buffer_size_kb", "64")
        if instance.has("buffer_percent"):
            instance.write("buffer_percent", "50")
        instance.write("options/overwrite", "0")
        changed = instance.verify()
        assert {
            "tracing_on",
            "sock:inet_sock_set_state",
            "trace_clock",
            "buffer_size_kb",
            "options/overwrite",
        } <= set(changed)
        assert instance.read("tracing_on").strip() == "1"
        assert instance.read("events/sock/inet_sock_set_state/enable").strip() == "1"
        assert instance.read("events/sock/inet_sock_set_state/filter").strip() == TCP_FILTER
        assert "[boot]" in instance.read("trace_clock")
        assert 256 <= int(instance.read("buffer_size_kb").split()[0]) < 264
        assert instance.read("options/overwrite").strip() == "1"
        instance.write("events/sock/inet_sock_set_state/filter", "newstate == 1")
        assert instance.verify() == ["sock:inet_sock_set_state filter"]
        assert instance.verify() == []
    finally:
        instance.close()


def test_a_busy_instance_is_kept_until_its_files_are_closed(root: str) -> None:
    instance = Instance.create(root, PREFIX)
    pipe = instance.file("per_cpu/cpu0/trace_pipe_raw")
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError):
            os.rmdir(instance.path)  # what another tool's rmdir gets while we read
        assert not instance.close()
        assert os.path.isdir(instance.path)
    finally:
        os.close(fd)
    assert instance.close()
    assert not os.path.exists(instance.path)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_instances_of_ours_go_and_others_stay(root: str, tmp_path: Path) -> None:
    instances = os.path.join(root, "instances")
    dead = f"{PREFIX}-{_dead_pid()}"
    init = f"{PREFIX}-1"  # alive, and started long before the instance was made
    sleeper = subprocess.Popen(["sleep", "30"])
    reused = f"{PREFIX}-{sleeper.pid}"
    other_tool = f"{PREFIX}x-{_dead_pid()}"  # another prefix: not ours to judge
    busy = f"{PREFIX}-{_dead_pid()}"
    for name in (dead, init, reused, other_tool, busy):
        os.mkdir(os.path.join(instances, name))
    # a /proc where the sleeper's pid belongs to a process started after its instance was made
    fake = tmp_path / "proc"
    (fake / str(sleeper.pid)).mkdir(parents=True)
    ticks = os.sysconf("SC_CLK_TCK")
    boot = time.time() - 1000
    fields = ["S"] + ["0"] * 18 + [str(int((time.time() + 60 - boot) * ticks))]
    (fake / str(sleeper.pid) / "stat").write_text(f"{sleeper.pid} (sleep) {' '.join(fields)}\n")
    (fake / "stat").write_text(f"cpu 0 0 0\nbtime {int(boot)}\n")
    (fake / "1").mkdir()
    (fake / "1" / "stat").write_text(f"1 (init) {' '.join(['S'] + ['0'] * 19)}\n")
    fd = os.open(os.path.join(instances, busy, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        removed = remove_stale_instances(root, PREFIX, proc_root=str(fake))
        assert sorted(removed) == sorted([dead, reused])
        left = set(os.listdir(instances))
        assert {init, other_tool, busy} <= left and not {dead, reused} & left
    finally:
        os.close(fd)
        sleeper.kill()
        sleeper.wait()
        for name in (init, other_tool, busy):
            os.rmdir(os.path.join(instances, name))


def test_the_top_level_and_another_tools_instance_stay_byte_identical(root: str) -> None:
    files = _top_level_files(root)
    other = os.path.join(root, "instances", f"{PREFIX}-tool")
    os.mkdir(other)
    try:
        with open(os.path.join(other, "events/sock/inet_sock_set_state/filter"), "w") as handle:
            handle.write("dport == 443")
        with open(os.path.join(other, "buffer_size_kb"), "w") as handle:
            handle.write("128")
        other_files = ["buffer_size_kb", "trace_clock", "tracing_on", "events/enable"]
        other_files += ["events/sock/inet_sock_set_state/filter", "options/overwrite"]
        before, before_other = snapshot(root, files), snapshot(other, other_files)
        chosen = choose_events(
            lambda system, name: Path(f"{root}/events/{system}/{name}/format").read_text()
        )
        instance = Instance.create(root, PREFIX)
        instance.apply(InstanceSettings(chosen.settings, 256))
        reader = EventReader(instance, chosen.decoders, chosen.type_field)
        subprocess.run(["true"], check=True)
        reader.wait(0.5)
        reader.read()
        instance.write("tracing_on", "0")
        instance.verify()
        reader.refresh_stats()
        reader.close()
        assert instance.close()
        assert snapshot(root, files) == before
        assert snapshot(other, other_files) == before_other
    finally:
        os.rmdir(other)


_PRIVATE_MOUNT = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from agent.collect.kernel import tracefs
out = {}
subprocess.run(["umount", "/sys/kernel/tracing"], check=True)
try:
    tracefs.find_tracefs(mount=False)
except tracefs.EventsUnavailable as error:
    out["unmounted"] = error.reason
path = tracefs.find_tracefs(mount=True)
out["mounted_at"] = path
instance = tracefs.Instance.create(path, sys.argv[2])
out["instance"] = os.path.isdir(instance.path)
out["closed"] = instance.close()
subprocess.run(["umount", "/sys/kernel/tracing"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "none", "/sys/kernel/debug"], check=True)
os.mkdir("/sys/kernel/debug/tracing")
subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/debug/tracing"], check=True)
out["old_path"] = tracefs.find_tracefs(mount=False)
print(json.dumps(out))
"""


@needs_root
def test_tracefs_is_found_or_mounted_in_a_private_mount_namespace() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _PRIVATE_MOUNT,
            str(REPO),
            PREFIX,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {
        "unmounted": EventsUnavailable.NO_TRACEFS,
        "mounted_at": "/sys/kernel/tracing",
        "instance": True,
        "closed": True,
        "old_path": "/sys/kernel/debug/tracing",
    }
    assert os.path.isdir("/sys/kernel/tracing/instances")  # the host's mount is untouched


def test_a_failed_mount_says_why(tmp_path: Path) -> None:
    target = tmp_path / "tracing"
    target.mkdir()

    def refuse(path: str) -> None:
        raise PermissionError(1, "Operation not permitted", path)

    if os.geteuid() != 0:
        pytest.skip("needs root: the mount is only tried as root")
    with pytest.raises(EventsUnavailable) as raised:
        find_tracefs([str(target)], mounts_path=str(tmp_path / "mounts"), mounter=refuse)
    assert raised.value.reason in (EventsUnavailable.NO_TRACEFS, EventsUnavailable.LOCKDOWN)
    assert "cannot mount tracefs" in str(raised.value)


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("[none] integrity confidentiality\n", "none"),
        ("none integrity [confidentiality]\n", "confidentiality"),
        ("garbage", ""),
    ],
)
def test_lockdown_mode(tmp_path: Path, text: str, mode: str) -> None:
    path = tmp_path / "lockdown"
    path.write_text(text)
    assert lockdown_mode(str(path)) == mode
    assert lockdown_mode(str(tmp_path / "absent")) == ""


@needs_root
def test_an_ordinary_user_is_told_it_needs_root() -> None:
    from agent.collect.kernel.source import open_event_source

    def attempt() -> List[str]:
        try:
            open_event_source(prefix=PREFIX)
        except EventsUnavailable as error:
            return [error.reason, str(error)]
        return ["opened"]

    reason, message = run_as_nobody(attempt)
    assert reason == EventsUnavailable.NOT_ROOT
    assert "root" in message


def test_a_kernel_without_the_tcp_event_falls_back(root: str) -> None:
    from agent.collect.kernel.source import open_event_source

    with pytest.raises(EventsUnavailable) as raised:
        open_event_source(prefix=PREFIX, exclude=["sock:inet_sock_set_state"])
    assert raised.value.reason == EventsUnavailable.EVENT_MISSING
    assert "inet_sock_set_state" in str(raised.value)
    assert not [n for n in os.listdir(f"{root}/instances") if n.startswith(PREFIX + "-")]


def test_the_error_reasons_are_distinct() -> None:
    reasons = [
        EventsUnavailable.NO_TRACEFS,
        EventsUnavailable.LOCKDOWN,
        EventsUnavailable.NOT_ROOT,
        EventsUnavailable.EVENT_MISSING,
        EventsUnavailable.FAILED,
    ]
    assert len(set(reasons)) == len(reasons)
    error = EventsUnavailable(EventsUnavailable.LOCKDOWN, "tracefs denied")
    assert str(error) == "lockdown: tracefs denied" and error.detail == "tracefs denied"
    assert tracefs.instance_name("egress-agent", 42) == "egress-agent-42"
