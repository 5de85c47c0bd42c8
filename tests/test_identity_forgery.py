"""No local user can pass for allowed software (issue 23): each way a user could dress a process
as another, played for real against ``egress-agent check`` and its allow rules.

The attacker is ``nobody`` (``setpriv``), with what any user has: a user manager's delegated
cgroups (made here by the test, as systemd would make them, under the systemd hierarchy and
removed by name), ``unshare -rm`` and a bind mount in a private mount namespace, a copy of a
program, ``memfd_create``.  Each connects out to a test host (tests/nethost.py) and each test
shows the rule that the attack aimed at does not match, beside a rule that does, so that the
test can fail.  What ``nobody`` runs lives in a temporary directory of mode 0755, never in the
checkout (which may sit under a 0700 /root).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
from commands import egress_agent
from nethost import Namespace, NetHost, Proc

from agent.cgroups import Placement, placement
from agent.exe_check import ExeChecker
from agent.identity import CMDLINE_CUT_MARK, CMDLINE_MAX_BYTES, IdentityCache
from agent.packages import DpkgDatabase, RpmDatabase

SERVER, CLIENT = "2001:4860:4869::1", "2001:4860:4869::2"
NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
CURL = "/usr/bin/curl"
SYSTEM_PYTHON = "/usr/bin/python3"
ID = "3f4b7a9c2d1e8f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"

pytestmark = pytest.mark.skipif(
    not os.path.isfile(CURL) or shutil.which("setpriv") is None or shutil.which("unshare") is None,
    reason="needs curl, setpriv and unshare (Debian: curl, util-linux)",
)


# --- what a cgroup path says (no process needed) ------------------------------------------------

USER = "/user.slice/user-1000.slice"
MANAGER = USER + "/user@1000.service"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            f"0::{MANAGER}/app.slice/datadog-agent.service\n",
            Placement(systemd_unit="user@1000.service", user_unit="datadog-agent.service"),
            id="a-user-unit-is-not-the-systems",
        ),
        pytest.param(
            f"1:name=systemd:{MANAGER}/app.slice/nginx.service\n0::{MANAGER}/app.slice/x.service\n",
            Placement(systemd_unit="user@1000.service", user_unit="nginx.service"),
            id="hybrid-reads-name-systemd",
        ),
        pytest.param(
            f"0::{MANAGER}/user.slice/docker-{ID}.scope\n",
            Placement(
                systemd_unit="user@1000.service",
                user_unit=f"docker-{ID}.scope",
                rootless_container_id=ID,
                rootless_uid=1000,
            ),
            id="docker-named-in-a-user-subtree",
        ),
        pytest.param(
            f"0::{USER}/{ID}\n",
            Placement(rootless_container_id=ID, rootless_uid=1000),
            id="an-id-in-a-users-own-slice",
        ),
        pytest.param(
            f"0::/eat-box/docker-{ID}.scope\n",
            Placement(systemd_unit=f"docker-{ID}.scope"),
            id="an-id-where-no-runtime-puts-one",
        ),
        pytest.param(
            f"0::/system.slice/docker-{ID}.scope/system.slice/nginx.service\n",
            Placement(systemd_unit=f"docker-{ID}.scope", container_id=ID),
            id="units-inside-a-container-are-the-containers",
        ),
        pytest.param(
            f"0::/docker/{ID}/user.slice/user-0.slice/user@0.service/x.service\n",
            Placement(container_id=ID),
            id="a-user-slice-inside-a-container",
        ),
        pytest.param(
            f"4:memory:/libpod_parent/libpod-{ID}\n1:name=systemd:/libpod_parent/libpod-{ID}\n",
            Placement(container_id=ID),
            id="podman-cgroupfs",
        ),
        pytest.param(
            "0::/lxc.payload.web1/init.scope\n",
            Placement(container_id="web1"),
            id="lxc",
        ),
        pytest.param(
            "0::/machine.slice/systemd-nspawn@deb12.service/payload/system.slice/cron.service\n",
            Placement(systemd_unit="systemd-nspawn@deb12.service", container_id="deb12"),
            id="systemd-nspawn",
        ),
        pytest.param(
            f"0::{USER}/session-3.scope\n",
            Placement(systemd_unit="session-3.scope"),
            id="a-session-is-the-systems",
        ),
    ],
)
def test_what_a_cgroup_path_says(text: str, expected: Placement) -> None:
    assert placement(text) == expected


# --- helpers ------------------------------------------------------------------------------------


def systemd_hierarchies() -> List[str]:
    """The cgroup hierarchies systemd keeps its tree in: the unified one alone (cgroup v2), or
    ``name=systemd`` plus the unified one of a hybrid system, where both hold the same paths."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["/sys/fs/cgroup"]
    roots = []
    for root in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"):
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            roots.append(root)
    return roots


class Cgroups:
    """Cgroups this test makes (and only those it made are removed, by name, deepest first;
    the processes it put in them go back to the root)."""

    def __init__(self) -> None:
        self.made: List[str] = []
        self.roots = systemd_hierarchies()

    def make(self, relative: str) -> str:
        for root in self.roots:
            path = root
            for component in relative.strip("/").split("/"):
                path = os.path.join(path, component)
                if not os.path.isdir(path):
                    os.mkdir(path)
                    self.made.append(path)
        return relative

    def add(self, relative: str, pid: int) -> None:
        for root in self.roots:
            with open(os.path.join(root, relative.strip("/"), "cgroup.procs"), "w") as handle:
                handle.write(str(pid))

    def remove(self) -> None:
        for path in sorted(self.made, key=len, reverse=True):
            root = next(r for r in self.roots if path.startswith(r + "/"))
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as h:
                for pid in h.read().split():
                    with contextlib.suppress(OSError), open(
                        os.path.join(root, "cgroup.procs"), "w"
                    ) as handle:
                        handle.write(pid)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self.made.clear()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    made = Cgroups()
    if not made.roots:
        pytest.skip("no cgroup hierarchy of systemd's layout here")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary directory that ``nobody`` can read and run from (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix="egress-agent-identity-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hosts(nethost: NetHost) -> Tuple[Namespace, int]:
    """A client test host and the port of a server (that accepts and holds) in another."""
    srv, cli = nethost.namespace("srv"), nethost.namespace("cli")
    nethost.veth(srv, "s0", cli, "c0")
    srv.add_address(nethost.name("s0"), SERVER + "/64")
    cli.add_address(nethost.name("c0"), CLIENT + "/64")
    return cli, nethost.listen(srv, SERVER).port


def connected(nethost: NetHost, cli: Namespace, argv: Sequence[str], port: int) -> Proc:
    """``argv`` started in the client host; returned once a process of it holds a connection
    to the server's ``port`` (the process at the end of the ``exec`` chain: ``argv``'s pid)."""
    proc = nethost.spawn(cli, argv, ready=False)
    deadline = time.monotonic() + 30
    while f"pid={proc.pid}," not in cli.run(["ss", "-tnpH", "dst", f"[{SERVER}]:{port}"]):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            error = proc.popen.stderr.read() if proc.popen.stderr else ""
            nethost.kill(proc)
            raise AssertionError(f"{argv} did not connect: {error}")
        time.sleep(0.05)
    return proc


def curl_to(port: int) -> List[str]:
    return ["--silent", "--max-time", "300", f"http://[{SERVER}]:{port}/"]


def row_of(pid: int, tmp: Path, *rules: str) -> Dict[str, Any]:
    """``check``'s JSON row for ``pid``, with the allow rules given (YAML flow mappings)."""
    config = tmp / f"rules-{uuid.uuid4().hex}.yaml"
    config.write_text("allow:\n" + "".join(f"  - {rule}\n" for rule in rules))
    result = egress_agent(
        "check", "--format", "json", "--allowlisted", "--pid", str(pid), config=config
    )
    assert "Traceback" not in result.stderr, result.stderr
    rows = [row for row in json.loads(result.stdout or "[]") if row["remote_address"] == SERVER]
    assert len(rows) == 1, (rows, result.stderr)
    return rows[0]


def allowed(pid: int, tmp: Path, rule: str) -> bool:
    return bool(row_of(pid, tmp, rule)["allowlisted"])


def sha256_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


# --- systemd_unit -------------------------------------------------------------------------------


def test_a_users_own_unit_does_not_pass_for_a_system_service(
    nethost: NetHost, hosts: Tuple[Namespace, int], cgroups: Cgroups, tmp_path: Path
) -> None:
    """``systemd-run --user --unit=datadog-agent curl ...`` as a user manager lays it out."""
    cli, port = hosts
    unit = cgroups.make(
        f"user.slice/user-{NOBODY}.slice/user@{NOBODY}.service/app.slice/datadog-agent.service"
    )
    connected_curl = connected(nethost, cli, [*AS_NOBODY, CURL, *curl_to(port)], port)
    cgroups.add(unit, connected_curl.pid)
    row = row_of(connected_curl.pid, tmp_path, "{systemd_unit: datadog-agent}")
    assert (row["systemd_unit"], row["user_unit"]) == (
        f"user@{NOBODY}.service",
        "datadog-agent.service",
    )
    assert row["uid"] == NOBODY and not row["allowlisted"]
    assert allowed(connected_curl.pid, tmp_path, "{user_unit: datadog-agent, user: nobody}")
    assert allowed(connected_curl.pid, tmp_path, f"{{systemd_unit: 'user@{NOBODY}.service'}}")


# --- container_id -------------------------------------------------------------------------------


def test_a_container_named_in_a_users_subtree_is_no_container(
    nethost: NetHost, hosts: Tuple[Namespace, int], cgroups: Cgroups, tmp_path: Path
) -> None:
    cli, port = hosts
    forged, real = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    fake = cgroups.make(
        f"user.slice/user-{NOBODY}.slice/user@{NOBODY}.service/user.slice/docker-{forged}.scope"
    )
    runtime = cgroups.make(f"docker/{real}")  # where docker's cgroupfs driver puts one
    attacker = connected(nethost, cli, [*AS_NOBODY, CURL, *curl_to(port)], port)
    cgroups.add(fake, attacker.pid)
    boxed = connected(nethost, cli, [CURL, *curl_to(port)], port)
    cgroups.add(runtime, boxed.pid)

    row = row_of(attacker.pid, tmp_path, f"{{container_id: {forged[:12]}}}")
    assert row["container_id"] == "" and not row["allowlisted"]
    assert (row["rootless_container_id"], row["rootless_uid"]) == (forged, NOBODY)
    assert row["systemd_unit"] == f"user@{NOBODY}.service"
    box = row_of(boxed.pid, tmp_path, f"{{container_id: {real[:12]}}}")
    assert (box["container_id"], box["rootless_container_id"], box["allowlisted"]) == (
        real,
        "",
        True,
    )
    table = egress_agent("check", "--format", "table", "--pid", str(attacker.pid)).stdout
    assert f"rootless {forged[:12]} uid {NOBODY}" in table


# --- path, sha256, package ----------------------------------------------------------------------


def in_private_mount_ns(mounts: Sequence[Tuple[str, str]], argv: Sequence[str]) -> List[str]:
    """``argv`` as ``nobody`` in a user and mount namespace of its own, after bind mounts of
    (source, target) there: what any local user can do (``unshare -rm``)."""
    script = " && ".join(f'mount --bind "{s}" "{t}"' for s, t in mounts)
    command = " ".join(f"'{a}'" for a in argv)
    return [*AS_NOBODY, "unshare", "-rm", "sh", "-c", f"{script} && exec {command}"]


def test_a_bind_mount_over_a_path_is_not_the_hosts_file(
    nethost: NetHost, hosts: Tuple[Namespace, int], tmp_path: Path
) -> None:
    cli, port = hosts
    target = "/usr/bin/apt-get"
    assert os.path.isfile(target)
    attacker = connected(
        nethost, cli, in_private_mount_ns([(CURL, target)], [target, *curl_to(port)]), port
    )
    row = row_of(attacker.pid, tmp_path, f"{{path: {target}}}")
    assert row["path"] == target  # what /proc/PID/exe reads in its namespace
    assert (row["exe_status"], row["package"]) == ("mismatch", "")
    assert row["sha256"] == sha256_of(CURL)  # what it really runs, read through /proc/PID/exe
    assert not row["allowlisted"]
    assert not allowed(attacker.pid, tmp_path, "{package: apt}")
    assert allowed(attacker.pid, tmp_path, f"{{sha256: {sha256_of(CURL)}}}")
    # The host's view is taken through host_root (/proc/1/root where the agent may read it):
    # through the attacker's own root, its bind mount is "the host's" file, a modified apt-get.
    link = os.readlink(f"/proc/{attacker.pid}/exe")
    assert ExeChecker(host_root="").inspect(attacker.pid, link).status == "mismatch"
    seen_from_inside = ExeChecker(host_root=f"/proc/{attacker.pid}/root")
    assert seen_from_inside.inspect(attacker.pid, link).status == "modified"


def test_packaged_copied_and_swapped_executables(
    nethost: NetHost, hosts: Tuple[Namespace, int], shared_dir: Path, tmp_path: Path
) -> None:
    cli, port = hosts
    digest = sha256_of(CURL)
    copy = shared_dir / "curl"
    shutil.copy2(CURL, copy)
    modified = shared_dir / "curl-modified"
    shutil.copy2(CURL, modified)
    with modified.open("ab") as handle:
        handle.write(b"\0")  # past the ELF's segments: runs the same, digests differ

    packaged = connected(nethost, cli, [*AS_NOBODY, CURL, *curl_to(port)], port)
    row = row_of(packaged.pid, tmp_path, "{package: curl}")
    assert (row["exe_status"], row["package"], row["sha256"]) == ("packaged", "curl", digest)
    assert row["allowlisted"]

    copied = connected(nethost, cli, [*AS_NOBODY, str(copy), *curl_to(port)], port)
    row = row_of(copied.pid, tmp_path, "{package: curl}")
    assert (row["exe_status"], row["package"], row["sha256"]) == ("unpackaged", "", digest)
    assert not row["allowlisted"]
    assert allowed(copied.pid, tmp_path, f"{{sha256: {digest}}}")
    assert allowed(copied.pid, tmp_path, f"{{path: '{copy}'}}")  # the host's own file there

    swapped = connected(
        nethost, cli, in_private_mount_ns([(str(modified), CURL)], [CURL, *curl_to(port)]), port
    )
    row = row_of(swapped.pid, tmp_path, "{package: curl}")
    assert (row["path"], row["exe_status"], row["package"]) == (CURL, "mismatch", "")
    assert row["sha256"] == sha256_of(str(modified)) != digest
    assert not row["allowlisted"]
    assert not allowed(swapped.pid, tmp_path, f"{{path: {CURL}}}")
    assert not allowed(swapped.pid, tmp_path, f"{{sha256: {digest}}}")


MEMFD_RUNNER = """
import os, sys
fd = os.memfd_create("curl", 0)
with open(sys.argv[1], "rb") as handle:
    os.write(fd, handle.read())
os.execv("/proc/self/fd/%d" % fd, ["curl"] + sys.argv[2:])
"""


@pytest.mark.skipif(not os.path.isfile(SYSTEM_PYTHON), reason="needs Debian's python3")
def test_deleted_and_memory_only_executables_are_said_so(
    nethost: NetHost, hosts: Tuple[Namespace, int], shared_dir: Path, tmp_path: Path
) -> None:
    cli, port = hosts
    doomed = shared_dir / "curl-doomed"
    shutil.copy2(CURL, doomed)
    deleted = connected(nethost, cli, [*AS_NOBODY, str(doomed), *curl_to(port)], port)
    doomed.unlink()
    row = row_of(deleted.pid, tmp_path, f"{{path: '{doomed}'}}")
    assert (row["exe_status"], row["sha256"]) == ("deleted", sha256_of(CURL))
    assert not row["allowlisted"]

    runner = shared_dir / "memfd.py"
    runner.write_text(MEMFD_RUNNER)
    argv = [*AS_NOBODY, SYSTEM_PYTHON, str(runner), CURL, *curl_to(port)]
    in_memory = connected(nethost, cli, argv, port)
    row = row_of(in_memory.pid, tmp_path, "{path: '/memfd:*'}")
    assert row["path"].startswith("/memfd:curl")
    assert (row["exe_status"], row["sha256"]) == ("memory", sha256_of(CURL))
    assert not row["allowlisted"]
    assert allowed(in_memory.pid, tmp_path, f"{{sha256: {sha256_of(CURL)}}}")


def test_a_package_digest_that_differs_reads_modified(shared_dir: Path) -> None:
    """dpkg's own files, in a database of this test's (a real dpkg layout under a temporary
    admin directory): the package lists the path; its MD5 matches or not."""
    program = shared_dir / "sleeper"
    shutil.copy2("/usr/bin/sleep", program)
    info = shared_dir / "dpkg" / "info"
    info.mkdir(parents=True)
    (info / "sleeper.list").write_text(f"/.\n{shared_dir}\n{program}\n")
    proc = subprocess.Popen([str(program), "300"])
    try:
        link = os.readlink(f"/proc/{proc.pid}/exe")
        real_md5 = hashlib.md5(program.read_bytes()).hexdigest()  # noqa: S324 - dpkg's digest
        verdicts = []
        for recorded in (real_md5, "0" * 32):
            (info / "sleeper.md5sums").write_text(f"{recorded}  {str(program)[1:]}\n")
            os.utime(info, None)  # dpkg changed its database
            checker = ExeChecker(packages=[DpkgDatabase(str(shared_dir / "dpkg"))])
            facts = checker.inspect(proc.pid, link)
            verdicts.append((facts.status, facts.package))
        assert verdicts == [("packaged", "sleeper"), ("modified", "sleeper")]
    finally:
        proc.kill()
        proc.wait()


RPM_SPEC = """
Name: {name}
Version: 1
Release: 1
Summary: a program for egress-agent's tests
License: MIT
%define debug_package %{{nil}}
%define __os_install_post %{{nil}}
%global _build_id_links none
%description
A copy of sleep, installed where only this test looks.
%install
mkdir -p %{{buildroot}}{directory}
cp /usr/bin/sleep %{{buildroot}}{directory}/sleeper
%files
{directory}/sleeper
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("rpmbuild") is None,
    reason="needs root and rpm's rpmbuild (make test-programs installs Debian's rpm)",
)
def test_an_rpm_package_vouches_with_its_sha256(shared_dir: Path) -> None:
    """A real rpm: built by rpmbuild, installed by rpm into a database of this test's own
    (``--dbpath``) with its file at a path of this test's own; the file's SHA-256 matches
    what rpm recorded, then it is changed in place: ``modified``."""
    prefix = os.environ.get("NETHOST_PREFIX", "eat")
    name = f"egress-agent-test-{prefix}"
    directory = f"/opt/egress-agent-{prefix}-rpm/bin"
    top, database = shared_dir / "rpmbuild", shared_dir / "rpmdb"
    (shared_dir / "t.spec").write_text(RPM_SPEC.format(name=name, directory=directory))
    rpm = ["rpm", "--dbpath", str(database)]
    built = subprocess.run(
        ["rpmbuild", "-bb", "--define", f"_topdir {top}", str(shared_dir / "t.spec")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (package,) = top.glob("RPMS/*/*.rpm")
    subprocess.run([*rpm, "--initdb"], check=True)
    installed = subprocess.run(
        [*rpm, "-i", "--nodeps", str(package)], capture_output=True, text=True, check=False
    )
    procs: List[subprocess.Popen[bytes]] = []
    try:
        assert installed.returncode == 0, installed.stderr
        program = f"{directory}/sleeper"
        verdicts = []
        for change in (b"", b"\0"):
            for proc in procs:  # a running program's file cannot be written (ETXTBSY)
                proc.kill()
                proc.wait()
            with open(program, "ab") as handle:
                handle.write(change)
            procs.append(subprocess.Popen([program, "300"]))
            checker = ExeChecker(packages=[RpmDatabase(str(database))])
            facts = checker.inspect(procs[-1].pid, os.readlink(f"/proc/{procs[-1].pid}/exe"))
            verdicts.append((facts.status, facts.package, facts.sha256 == sha256_of(program)))
        assert verdicts == [("packaged", name, True), ("modified", name, True)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        subprocess.run([*rpm, "-e", "--nodeps", name], capture_output=True, check=False)
        shutil.rmtree(os.path.dirname(directory), ignore_errors=True)


def test_hashing_keeps_to_its_budget(shared_dir: Path) -> None:
    """Digests are read at most ``rate`` bytes per second of the clock (a stand-in clock here:
    the budget is what is tested, not the speed); rows read ``pending`` meanwhile, and a later
    look-up completes them."""
    program = shared_dir / "sleeper"
    shutil.copy2("/usr/bin/sleep", program)
    size = program.stat().st_size
    now = [0.0]
    checker = ExeChecker(rate=4096, burst=4096, clock=lambda: now[0])
    proc = subprocess.Popen([str(program), "300"])
    try:
        cache = IdentityCache(exe=checker)
        first = cache.lookup(proc.pid)
        assert (first.exe_status, first.sha256) == ("pending", "")
        assert checker.bytes_read == 4096
        steps = 0
        identity = first
        while identity.exe_status == "pending":
            now[0] += 1.0
            before = checker.bytes_read
            identity = cache.lookup(proc.pid)
            assert checker.bytes_read - before <= 4096 + sum(d.cost for d in checker.packages)
            steps += 1
            assert steps <= size // 4096 + 3
        assert identity.sha256 == sha256_of(str(program))
        assert identity.exe_status == "unpackaged"
        assert cache.lookup(proc.pid) is identity  # settled once, cached
    finally:
        proc.kill()
        proc.wait()


# --- command lines ------------------------------------------------------------------------------

HOLDER = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sys.stdin.read()
"""


def test_a_huge_command_line_is_kept_bounded_and_marked(
    nethost: NetHost, hosts: Tuple[Namespace, int], tmp_path: Path
) -> None:
    cli, port = hosts
    padding = ["x" * 100_000] * 19  # 1.9 MB; one argument may hold 128 KiB (MAX_ARG_STRLEN)
    holder = connected(
        nethost, cli, [sys.executable, "-c", HOLDER, SERVER, str(port), *padding], port
    )
    with open(f"/proc/{holder.pid}/cmdline", "rb") as handle:
        assert len(handle.read()) > 1_900_000
    row = row_of(holder.pid, tmp_path, "{ports: 1}")
    assert row["cmdline"].endswith(CMDLINE_CUT_MARK)
    assert len(row["cmdline"].encode()) <= CMDLINE_MAX_BYTES + len(CMDLINE_CUT_MARK)
    assert row["cmdline"].startswith(f"{sys.executable} -c ")
    identity = IdentityCache().lookup(holder.pid)
    assert identity.cmdline == row["cmdline"]


# --- every output -------------------------------------------------------------------------------

NEW_COLUMNS = (
    "user_unit",
    "rootless_container_id",
    "rootless_uid",
    "exe_status",
    "sha256",
    "package",
)


def test_the_proof_reaches_every_output(
    nethost: NetHost, hosts: Tuple[Namespace, int], tmp_path: Path
) -> None:
    """JSON, CSV, ECS (``process.hash.sha256``, ``package.name``) and the table; the osquery
    tables and the history derive their columns from the record."""
    from agent.history.schema import HISTORY_COLUMNS
    from agent.osquery import (
        external_connection_events,
        external_connection_history,
        external_connections,
    )

    cli, port = hosts
    curl = connected(nethost, cli, [CURL, *curl_to(port)], port)
    digest = sha256_of(CURL)
    pid = ["--pid", str(curl.pid)]

    (row,) = json.loads(egress_agent("check", "--format", "json", *pid).stdout)
    assert [c for c in NEW_COLUMNS if c in row] == list(NEW_COLUMNS)
    assert (row["exe_status"], row["package"], row["sha256"]) == ("packaged", "curl", digest)

    csv_text = egress_agent("check", "--format", "csv", *pid).stdout
    header, line = csv_text.splitlines()[:2]
    record = dict(zip(header.split(","), line.split(",")))
    assert (record["exe_status"], record["package"], record["sha256"]) == (
        "packaged",
        "curl",
        digest,
    )

    (document,) = [
        json.loads(x) for x in egress_agent("check", "--format", "ecs", *pid).stdout.splitlines()
    ]
    assert document["process"]["hash"]["sha256"] == digest
    assert document["package"]["name"] == "curl"
    assert document["egress_agent"]["exe_status"] == "packaged"

    table = egress_agent("check", "--format", "table", *pid).stdout
    assert table.splitlines()[0].split()[-1] == "exe_status" and "packaged" in table

    for table in (external_connections, external_connection_history, external_connection_events):
        assert set(NEW_COLUMNS) <= set(table.SPEC.column_names), table.__name__
    assert set(NEW_COLUMNS) <= {name for name, _ in HISTORY_COLUMNS}


# --- the same through kernel events -------------------------------------------------------------


def test_kernel_events_carry_the_same_proof(
    nethost: NetHost, hosts: Tuple[Namespace, int], tmp_path: Path
) -> None:
    """``watch`` and the extension build identity from kernel events (the tracker reads
    ``/proc`` at each exec through the same cache): the bind-mount attack reads ``mismatch``
    there too, and a ``path`` rule does not match its connect."""
    from agent.allow import matches
    from agent.collect.kernel.source import open_event_source
    from agent.config import parse_settings, parse_yaml
    from agent.records import SocketColumns, connection_of

    cli, port = hosts
    prefix = os.environ.get("NETHOST_PREFIX", "eat")
    target = "/usr/bin/apt-get"
    (rule,) = parse_settings(
        parse_yaml(f"allow:\n  - {{path: {target}}}\n", "t.yaml"), "t.yaml"
    ).allow
    with open_event_source(prefix=f"egress-agent-{prefix}") as source:
        source.poll(0.1)
        attacker = connected(
            nethost, cli, in_private_mount_ns([(CURL, target)], [target, *curl_to(port)]), port
        )
        plain = connected(nethost, cli, [*AS_NOBODY, CURL, *curl_to(port)], port)
        seen: Dict[int, Any] = {}
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            for event in source.poll(0.2):
                if event.kind == "connect" and event.identity.pid in (attacker.pid, plain.pid):
                    seen[event.identity.pid] = event.identity
    assert set(seen) == {attacker.pid, plain.pid}
    forged, real = seen[attacker.pid], seen[plain.pid]
    assert (forged.path, forged.exe_status) == (target, "mismatch")
    assert forged.sha256 in ("", sha256_of(CURL))
    assert (real.path, real.exe_status, real.package) == (CURL, "packaged", "curl")
    columns = SocketColumns(None, None, None, 10, 6, "", "", 0, port, "outbound")
    assert not matches(rule, connection_of(forged, None, columns))
    (curl_rule,) = parse_settings(
        parse_yaml(f"allow:\n  - {{path: {CURL}}}\n", "t.yaml"), "t.yaml"
    ).allow
    assert matches(curl_rule, connection_of(real, None, columns))


def test_a_huge_executable_delays_no_other(shared_dir: Path) -> None:
    """Queued files are read a chunk each in turn: a small program queued behind a big one is
    proved first."""
    big, small = shared_dir / "big", shared_dir / "small"
    shutil.copy2("/usr/bin/sleep", big)
    with big.open("ab") as handle:
        handle.write(b"\0" * (8 << 20))  # 8 MiB past the ELF's segments: still runs
    shutil.copy2("/usr/bin/sleep", small)
    now = [0.0]
    checker = ExeChecker(rate=1 << 20, burst=1 << 20, clock=lambda: now[0])
    procs = [subprocess.Popen([str(path), "300"]) for path in (big, small)]
    try:
        # the big one takes the whole burst at once; the small one waits behind it
        first = [checker.inspect(p.pid, os.readlink(f"/proc/{p.pid}/exe")) for p in procs]
        assert [f.status for f in first] == ["pending", "pending"]
        now[0] += 1.0  # one second's budget: a chunk of each in turn
        checker.advance()
        settled = [checker.settle(f, str(path)) for f, path in zip(first, (big, small))]
        assert settled[0].sha256 == "" and settled[1].sha256 == sha256_of(str(small))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
