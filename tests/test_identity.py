"""Process identity: cgroup layouts of the container runtimes, and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import needs_root, run_as_nobody

from agent.cgroups import placement
from agent.identity import (
    CMDLINE_CUT_MARK,
    CMDLINE_MAX_BYTES,
    NO_OWNER,
    Identity,
    IdentityCache,
    bounded_cmdline,
    process_uuid,
)

ID = "3f4b7a9c2d1e8f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"
POD = "pod8b1e0e2c-5d2a-4c2f-9d8e-1a2b3c4d5e6f"

# (what the file says, container id, systemd unit)
CGROUPS = [
    pytest.param(
        "12:memory:/docker/ID\n11:cpu,cpuacct:/docker/ID\n1:name=systemd:/docker/ID\n",
        ID,
        "",
        id="docker-cgroupfs-v1",
    ),
    pytest.param(
        "0::/system.slice/docker-ID.scope\n", ID, "docker-ID.scope", id="docker-systemd-v2"
    ),
    pytest.param("0::/docker/ID\n", ID, "", id="docker-cgroupfs-v2"),
    pytest.param(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-POD.slice/"
        "cri-containerd-ID.scope\n",
        ID,
        "cri-containerd-ID.scope",
        id="kubepods-containerd-systemd-v2",
    ),
    pytest.param(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-POD.slice/crio-ID.scope\n",
        ID,
        "crio-ID.scope",
        id="kubepods-crio-systemd-v2",
    ),
    pytest.param(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-POD.slice/"
        "crio-conmon-ID.scope\n",
        "",
        "crio-conmon-ID.scope",
        id="crio-conmon-is-not-the-container",
    ),
    pytest.param(
        "11:cpu,cpuacct:/kubepods/burstable/POD/ID\n10:memory:/kubepods/burstable/POD/ID\n"
        "1:name=systemd:/kubepods/burstable/POD/ID\n",
        ID,
        "",
        id="kubepods-cgroupfs-v1",
    ),
    pytest.param("0::/kubepods/besteffort/POD/crio-ID\n", ID, "", id="kubepods-crio-cgroupfs"),
    pytest.param(
        "0::/system.slice/containerd.service/k8s.io/ID\n",
        ID,
        "containerd.service",
        id="containerd-namespace",
    ),
    pytest.param("0::/machine.slice/libpod-ID.scope\n", ID, "libpod-ID.scope", id="podman-root"),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-ID.scope/container\n",
        "",
        "user@1000.service",
        id="podman-rootless",
    ),
    pytest.param(
        "0::/machine.slice/libpod-conmon-ID.scope\n",
        "",
        "libpod-conmon-ID.scope",
        id="podman-conmon",
    ),
    pytest.param("0::/system.slice/nerdctl-ID.scope\n", ID, "nerdctl-ID.scope", id="nerdctl"),
    pytest.param("0::/system.slice/nginx.service\n", "", "nginx.service", id="service-v2"),
    pytest.param(
        "0::/user.slice/user-1000.slice/session-3.scope\n", "", "session-3.scope", id="session"
    ),
    pytest.param(
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service\n",
        "",
        "user@1000.service",
        id="user-unit",
    ),
    pytest.param("0::/init.scope\n", "", "init.scope", id="pid1"),
    pytest.param(
        "12:cpu:/\n1:name=systemd:/system.slice/cron.service\n0::/system.slice/cron.service\n",
        "",
        "cron.service",
        id="hybrid",
    ),
    pytest.param(
        "3:cpuset:/\n2:cpu:/system.slice\n1:name=systemd:/system.slice/ssh.service\n",
        "",
        "ssh.service",
        id="legacy-v1",
    ),
    pytest.param(
        "4:memory:/process_api/f564719c63edfa63267f2a56b5bb8e81\n0::/\n", "", "", id="sandbox"
    ),
    pytest.param("0::/\n", "", "", id="root-cgroup"),
    pytest.param("0::/system.slice\n", "", "", id="slice-only"),
    pytest.param("", "", "", id="empty"),
    pytest.param("garbage\n:::\n0::relative/docker-ID.scope\n\x00\x01", "", "", id="garbage"),
    pytest.param("0::/docker/" + ID[:-1] + "\n", "", "", id="short-id"),
    pytest.param("0::/docker/" + ID.upper() + "\n", "", "", id="upper-case-is-not-an-id"),
]


@pytest.mark.parametrize("text, container, unit", CGROUPS)
def test_cgroup_layouts(text: str, container: str, unit: str) -> None:
    text = text.replace("ID", ID).replace("POD", POD)
    assert placement(text).container_id == container
    assert placement(text).systemd_unit == unit.replace("ID", ID)


def test_process_uuid_names_one_instance_on_one_boot() -> None:
    first = process_uuid("boot-a", 100, "5000")
    assert uuid.UUID(first).version == 5
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "urn:egress-agent:process")
    assert first == str(uuid.uuid5(namespace, "boot-a/100/5000"))  # the same as ever
    assert process_uuid("b\u00f6ot", 7, "1") == str(uuid.uuid5(namespace, "b\u00f6ot/7/1"))
    assert first == process_uuid("boot-a", 100, "5000")
    assert first != process_uuid("boot-b", 100, "5000")
    assert first != process_uuid("boot-a", 101, "5000")
    assert first != process_uuid("boot-a", 100, "5001")


def test_this_process() -> None:
    cache = IdentityCache()
    me = cache.lookup(os.getpid())
    real = psutil.Process()
    assert me.pid == os.getpid()
    assert me.name == real.name()
    assert me.path == real.exe() == os.path.realpath(sys.executable)
    assert me.cmdline == " ".join(real.cmdline())
    assert me.uid == os.getuid()
    assert me.username == real.username()
    assert me.parent == os.getppid()
    assert me.process_start_time == int(real.create_time())
    assert abs(me.process_start_time - time.time()) < 24 * 3600
    assert uuid.UUID(me.process_uuid)
    assert me.container_id == placement(Path("/proc/self/cgroup").read_text()).container_id
    assert cache.lookup(os.getpid()) is me
    assert (cache.hits, cache.misses) == (1, 1)
    assert IdentityCache().lookup(os.getpid()).process_uuid == me.process_uuid


def test_cmdline_keeps_arguments_as_they_are() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stdin.read()", "two words", "", "--x=\t1"]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        # With vfork (Python 3.13) Popen returns while the kernel is still in the child's exec,
        # before its arguments are in place: wait until /proc shows them.
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{child.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        identity = IdentityCache().lookup(child.pid)
        assert identity.cmdline == " ".join(argv)
        assert identity.parent == os.getpid()
    finally:
        child.communicate(b"")


def test_a_vanished_process_has_an_empty_identity() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert IdentityCache().lookup(child.pid) == Identity(pid=child.pid)
    assert IdentityCache().lookup(-1) is NO_OWNER
    assert IdentityCache().lookup(0) is NO_OWNER


def test_the_cache_key_is_pid_and_start_time(tmp_path: Path) -> None:
    """A recycled pid (same pid, new start time) is another process: looked up anew, another
    UUID.  The start time and name come from a stat file we write."""
    pid = os.getpid()
    (tmp_path / str(pid)).mkdir()
    stat = tmp_path / str(pid) / "stat"
    fields = ["S"] + ["0"] * 18 + ["1000", "0"]
    stat.write_text(f"{pid} (odd ) name) " + " ".join(fields))
    cache = IdentityCache(str(tmp_path), boot_id="boot")
    first = cache.lookup(pid)
    stat.write_text(f"{pid} (odd ) name) " + " ".join([*fields[:19], "2000", "0"]))
    second = cache.lookup(pid)
    assert cache.misses == 2 and first.process_uuid != second.process_uuid
    assert first.process_uuid == process_uuid("boot", pid, "1000")
    assert first.name == second.name == "odd ) name"  # the last ")" ends the name
    stat.write_text("truncated")
    assert cache.lookup(pid) == Identity(pid=pid)
    stat.unlink()
    assert cache.lookup(pid) == Identity(pid=pid)  # a /proc without the pid: gone


def test_the_cache_is_bounded_and_drops_dead_processes() -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        for _ in range(3)
    ]
    try:
        cache = IdentityCache(max_entries=2)
        for child in children:
            assert cache.lookup(child.pid).pid == child.pid
            assert len(cache) <= 2
        children[-1].communicate(b"")
        assert cache.prune() >= 1
        assert cache.prune(live_pids=[]) >= 1
        assert len(cache) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.communicate(b"")


@needs_root
def test_another_users_process_yields_what_can_be_read() -> None:
    """As an ordinary user, root's executable path is hidden; the lookup must not raise.
    A forked child drops to nobody and looks at us (after a first lookup here, so the child
    needs no module it has not got: the interpreter's files may be unreadable to nobody)."""
    me = os.getpid()
    IdentityCache().lookup(me)

    def look() -> list:  # type: ignore[type-arg]
        found = IdentityCache().lookup(me)
        return [found.pid, found.name, found.path, found.uid]

    pid, name, path, uid = run_as_nobody(look)
    assert pid == me and name == psutil.Process().name()
    assert path == ""  # /proc/PID/exe of another user's process: EACCES
    assert uid == os.getuid()


def _psutil_identity(pid: int) -> tuple:  # type: ignore[type-arg]
    process = psutil.Process(pid)
    with process.oneshot():
        try:
            path = process.exe()
        except psutil.AccessDenied:
            path = ""
        return (
            process.name(),
            path,
            bounded_cmdline(" ".join(process.cmdline())),  # the documented bound
            process.uids().real,
            process.username(),
            process.ppid(),
            int(process.create_time()),
        )


def test_linux_identity_is_what_psutil_says_for_every_process_here() -> None:
    """The /proc reader against psutil on every live process (ours, kernel threads, daemons);
    a process that changes or exits between the two looks is skipped."""
    cache = IdentityCache()
    compared = 0
    for pid in psutil.pids():
        try:
            before = _psutil_identity(pid)
            mine = cache.lookup(pid)
            after = _psutil_identity(pid)
        except psutil.Error:
            continue
        if before != after or mine == Identity(pid=pid):
            continue
        got = (
            mine.name,
            mine.path,
            mine.cmdline,
            mine.uid,
            mine.username,
            mine.parent,
            mine.process_start_time,
        )
        assert got == before, pid
        compared += 1
    assert compared >= 5


@pytest.mark.parametrize("extra", [-1, 0, 1, 2, 5000])
def test_a_command_line_at_the_bound_is_whole_and_one_byte_over_is_cut(extra: int) -> None:
    """The bound counts the arguments joined by spaces, without the closing NUL: a command line
    of exactly :data:`CMDLINE_MAX_BYTES` is kept whole and unmarked, one byte more is cut and
    marked, and the /proc reader agrees with :func:`bounded_cmdline` on psutil's arguments."""
    head = [sys.executable, "-c", "import time; time.sleep(30)"]
    used = len(" ".join(head).encode()) + 1  # the space before the padding argument
    padding = "x" * (CMDLINE_MAX_BYTES - used + extra)
    child = subprocess.Popen([*head, padding])  # returns once the exec has happened
    try:
        joined = " ".join([*head, padding])
        mine = IdentityCache().lookup(child.pid).cmdline
        assert mine == bounded_cmdline(joined)
        if extra <= 0:
            assert mine == joined
        else:
            assert mine == joined[:CMDLINE_MAX_BYTES] + CMDLINE_CUT_MARK
    finally:
        child.kill()
        child.wait()


def test_a_long_name_and_a_rewritten_command_line_read_as_psutil_reads_them(
    tmp_path: Path,
) -> None:
    long_name = tmp_path / "a-rather-long-program-name"
    os.symlink(sys.executable, long_name)
    script = (
        "import sys\n"
        "with open('/proc/self/comm', 'w') as f: f.write('a-rather-long-program-name')\n"
        "sys.stdout.write('ok\\n'); sys.stdout.flush(); sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [str(long_name), "-c", script, "two words"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        mine = IdentityCache().lookup(child.pid)
        assert mine.name == psutil.Process(child.pid).name() == "a-rather-long-program-name"
        assert mine.cmdline == " ".join(psutil.Process(child.pid).cmdline())
    finally:
        child.communicate(b"")
