"""Privilege (issue 7): what an ordinary user gets, and that no input ever reaches a shell.

``egress-agent check`` run as ``nobody`` (a forked child that drops to uid 65534, after the
parent has imported everything: the interpreter's own files may be unreadable to nobody) in
a test host with three client connections: one held by a ``nobody`` process and one by a
root process in the same namespace, and one by a root process alone in a second namespace.
nobody must get the first with its owner, the second without one (pid -1), not the third (it
cannot learn that namespace exists), exit normally, and be told exactly that on stderr.
Root, as a control, gets all three with their owners.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import NOBODY, needs_root, run_as_nobody
from nethost import NetHost, Proc
from readable import NETHOST_FILES, readable_copies

from agent import cli
from agent.collect import UNPRIVILEGED_NOTICE

PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "p"
SRV6, CLI6, LONE6 = "2a0e:4a00:b::1", "2a0e:4a00:b::2", "2a0e:4a00:c::2"
SRV_LONE = "2a0e:4a00:c::1"
AGENT = Path(__file__).resolve().parent.parent / "agent"


def _system_python() -> str:
    """An interpreter nobody may run (a pyenv under /root is closed to it)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("python3")
    if found is None:
        pytest.skip("no python3 that nobody can run")
    return found


class Host:
    def __init__(self, net: NetHost, scripts: Path) -> None:
        srv, cli_ns, lone = net.namespace("srv"), net.namespace("cli"), net.namespace("lone")
        net.veth(srv, "s0", cli_ns, "c0")
        net.veth(srv, "s1", lone, "l0")
        srv.add_address(f"{PREFIX}-s0", SRV6 + "/64")
        srv.add_address(f"{PREFIX}-s1", SRV_LONE + "/64")
        cli_ns.add_address(f"{PREFIX}-c0", CLI6 + "/64")
        lone.add_address(f"{PREFIX}-l0", LONE6 + "/64")
        server = net.listen(srv, "::")
        self.port = server.port
        self.cli, self.lone = cli_ns, lone
        dial = [str(scripts / "nethost.py"), "connect", "tcp", SRV6, str(self.port)]
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        self.nobody = net.spawn(cli_ns, [*as_nobody, _system_python(), *dial], ready=True)
        self.root = net.connect(cli_ns, SRV6, self.port)
        self.alone = net.connect(lone, SRV_LONE, self.port)

    def clients(self) -> Dict[int, Tuple[int, Proc]]:
        """local port -> (namespace inode, client)"""
        return {
            self.nobody.local_port: (self.cli.inode, self.nobody),
            self.root.local_port: (self.cli.inode, self.root),
            self.alone.local_port: (self.lone.inode, self.alone),
        }

    def ours(self, rows: List[Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
        namespaces = {self.cli.inode, self.lone.inode}
        return {
            r["local_port"]: r
            for r in rows
            if r["net_namespace"] in namespaces and r["remote_port"] == self.port
        }


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs, and to become nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to start a process as nobody")
    with readable_copies(*NETHOST_FILES) as scripts, NetHost(PREFIX) as net:
        yield Host(net, scripts)


def check_as(uid: int, *args: str) -> Tuple[int, str, str]:
    """Run ``egress-agent check ARGS`` in a forked child as ``uid``: (status, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 99
        try:
            os.close(out_r)
            os.close(err_r)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.environ["EGRESS_AGENT_CONFIG"] = os.devnull
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            import sys

            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            status = cli.main(["check", *args])
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout = out.read()
        stderr = err.read()
    _, wait_status = os.waitpid(child, 0)
    assert os.WIFEXITED(wait_status), wait_status
    return os.WEXITSTATUS(wait_status), stdout, stderr


def test_root_sees_every_connection_with_its_owner(host: Host) -> None:
    status, stdout, stderr = check_as(0, "--format", "json")
    assert status == 1, stderr
    rows = host.ours(json.loads(stdout))
    assert {port: row["pid"] for port, row in rows.items()} == {
        port: proc.pid for port, (_, proc) in host.clients().items()
    }
    assert UNPRIVILEGED_NOTICE not in stderr


def test_nobody_gets_partial_results_and_is_told_what_is_missing(host: Host) -> None:
    status, stdout, stderr = check_as(NOBODY, "--format", "json")
    assert status == 1, stderr
    assert "Traceback" not in stderr
    rows = host.ours(json.loads(stdout))
    assert set(rows) == {host.nobody.local_port, host.root.local_port}  # not host.alone's
    mine, roots = rows[host.nobody.local_port], rows[host.root.local_port]
    assert (mine["pid"], mine["username"], mine["uid"]) == (host.nobody.pid, "nobody", NOBODY)
    assert (roots["pid"], roots["name"], roots["fd"]) == (-1, "", -1)
    assert f"egress-agent: {UNPRIVILEGED_NOTICE}" in stderr.split("\n")
    assert "without an owner (pid -1)" in UNPRIVILEGED_NOTICE
    assert "not seen at all" in UNPRIVILEGED_NOTICE


# ---------------------------------------------------------------------------------------------
# no input is ever passed to a shell

SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("os", "execlp"),
    ("os", "execlpe"),
    ("os", "execvp"),
    ("os", "execvpe"),
    ("os", "spawnlp"),
    ("os", "spawnvp"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("pty", "spawn"),
}
"""Calls that run a shell or search $PATH for what to run."""
CODE_FROM_DATA = {"eval", "exec", "compile", "__import__"}


def _describe(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return repr(node.value)
    if isinstance(node, ast.Name):
        return node.id
    return type(node).__name__


def _problems(path: Path, base: Path) -> List[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            where = f"{path.relative_to(base)}:{node.lineno}"
            if (
                isinstance(function, ast.Attribute)
                and isinstance(function.value, ast.Name)
                and (function.value.id, function.attr) in SHELL_CALLS
            ):
                found.append(f"{where}: {function.value.id}.{function.attr}()")
            if isinstance(function, ast.Name) and function.id in CODE_FROM_DATA:
                found.append(f"{where}: {function.id}()")
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{where}: shell={_describe(keyword.value)}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names]
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module == "os" and {"system", "popen"} & set(names):
                found.append(f"{path.name}:{node.lineno}: from os import {names}")
            if "commands" in names or module == "commands":
                found.append(f"{path.name}:{node.lineno}: the commands module")
    return found


def test_no_input_is_ever_passed_to_a_shell() -> None:
    """Every module of the agent: no shell, no $PATH search, no code built from data."""
    modules = sorted(AGENT.rglob("*.py"))
    assert len(modules) >= 10
    problems = [problem for module in modules for problem in _problems(module, AGENT.parent)]
    assert problems == []


def test_the_shell_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scan itself: each forbidden form in a sample file is reported."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, subprocess\n"
        "os.system('ls ' + name)\n"
        "subprocess.run(command, shell=True)\n"
        "subprocess.Popen(command, shell=flag)\n"
        "subprocess.run(['ls'], shell=False)\n"
        "eval(text)\n"
    )
    found = _problems(sample, tmp_path)
    assert [problem.split(": ", 1)[1] for problem in found] == [
        "os.system()",
        "shell=True",
        "shell=flag",
        "eval()",
    ]


# ---------------------------------------------------------------------------------------------
# the extension's socket and history store are its own


def _as_nobody(attempts: Dict[str, Callable[[], object]]) -> Dict[str, str]:
    """Run each attempt as nobody: name -> "ok" or the errno name."""

    def attempt_all() -> Dict[str, str]:
        outcome = {}
        for name, attempt in attempts.items():
            try:
                attempt()
                outcome[name] = "ok"
            except OSError as error:
                outcome[name] = errno.errorcode.get(error.errno or 0, str(error))
        return outcome

    result: Dict[str, str] = run_as_nobody(attempt_all)
    return result


def _connect(path: str) -> Callable[[], object]:
    def attempt() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)

    return attempt


def _read(path: str) -> Callable[[], object]:
    def attempt() -> None:
        with open(path, "rb") as handle:
            handle.read(1)

    return attempt


@needs_root
@pytest.mark.parametrize("state_dir_exists", [False, True])
def test_socket_and_history_are_closed_to_other_users(
    tmp_path: Path, state_dir_exists: bool
) -> None:
    """Launched with umask 0 (the worst an init system could hand it), next to a core whose
    directory everyone may enter; with the history directory created by the extension, or
    already there and open to all (0755, as a careless package might leave it)."""
    from osquery_core import CoreStandIn, default_extension_command

    base = Path(tempfile.mkdtemp(prefix="eah-priv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        state = base / "state"
        if state_dir_exists:
            state.mkdir()
            state.chmod(0o755)
        history = state / "history.db"
        config = base / "config.yaml"
        config.write_text(f"sampling:\n  interval: 0.2\nhistory:\n  path: {history}\n")
        config.chmod(0o644)
        core_dir = base / "osquery"
        core_dir.mkdir(mode=0o755)
        with CoreStandIn(str(core_dir)) as core:
            old_umask = os.umask(0)
            try:
                process = core.launch(
                    default_extension_command(),
                    timeout=10,
                    interval=1,
                    env={"EGRESS_AGENT_CONFIG": str(config)},
                )
            finally:
                os.umask(old_umask)
            registration = core.wait_for_registration(process=process)
            extension_socket = core.extension_socket(registration)
            deadline = time.monotonic() + 30
            files = [str(history) + suffix for suffix in ("", "-wal", "-shm")]
            while not all(os.path.exists(f) for f in files):
                assert time.monotonic() < deadline, os.listdir(state)
                time.sleep(0.1)
            modes = {f: stat.S_IMODE(os.stat(f).st_mode) for f in [extension_socket, *files]}
            assert all(mode & 0o077 == 0 for mode in modes.values()), modes
            if not state_dir_exists:
                assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
            attempts: Dict[str, Callable[[], object]] = {
                "socket": _connect(extension_socket),
                "core socket dir": lambda: os.listdir(core_dir),
            }
            for path in files:
                attempts[os.path.basename(path)] = _read(path)
            outcome = _as_nobody(attempts)
            process.terminate()
            assert process.wait(10) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert outcome.pop("core socket dir") == "ok"  # nobody could get there ...
    assert outcome == {  # ... and is refused by the socket and the files themselves
        "socket": "EACCES",
        "history.db": "EACCES",
        "history.db-wal": "EACCES",
        "history.db-shm": "EACCES",
    }


# ---------------------------------------------------------------------------------------------
# code a test runs as another user is where that user can read it


def _run_as_nobody(directory: Path) -> subprocess.CompletedProcess[str]:
    """``python3 DIRECTORY/nethost.py`` run as nobody, with a role it refuses once it has
    loaded (and imported what it imports): exit 2 and "unknown role" when it could."""
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    script = str(directory / "nethost.py")
    return subprocess.run(
        [*as_nobody, _system_python(), script, "none", "tcp", "::1", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


@needs_root
def test_scripts_run_as_nobody_are_copied_where_nobody_can_read_them() -> None:
    """A clone in a 0700 directory (as under /root): nobody cannot run tests/nethost.py from
    there, and can run the copies :func:`readable_copies` makes of it and its imports."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to start a process as nobody")
    closed = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-clone-"))  # 0700, like /root
    try:
        for name in NETHOST_FILES:
            shutil.copyfile(Path(__file__).with_name(name), closed / name)
        refused = _run_as_nobody(closed)
        assert "Permission denied" in refused.stderr, refused
        with readable_copies(*NETHOST_FILES, source=closed) as scripts:
            assert stat.S_IMODE(scripts.stat().st_mode) == 0o755
            loaded = _run_as_nobody(scripts)
            assert loaded.stderr == "unknown role 'none'\n", loaded
        assert not scripts.exists()
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def _runs_tests_code_as_another_user(path: Path) -> bool:
    """Whether a test module starts one of the tests' own scripts as another user without
    :func:`readable_copies`: it names ``setpriv`` (or ``--reuid``) and a ``.py`` file of
    ``tests/`` (a script a test writes into a directory of its own is no such file)."""
    strings = [
        node.value
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    other_user = any(s == "setpriv" or s.startswith("--reuid") for s in strings)
    own = {p.name for p in path.parent.glob("*.py")}
    scripts = any(s.endswith(".py") and Path(s).name in own for s in strings)
    return other_user and scripts and "readable_copies" not in path.read_text()


def test_no_test_runs_its_own_code_as_another_user_from_the_clone() -> None:
    tests = Path(__file__).resolve().parent
    found = [p.name for p in sorted(tests.glob("*.py")) if _runs_tests_code_as_another_user(p)]
    assert found == []
    sample = tests / "test_privilege.py"
    assert "setpriv" in sample.read_text() and not _runs_tests_code_as_another_user(sample)
