"""Outputs a local user aims at (issue 23): a CSV cell as a live formula, the report page written
through a link or into someone else's file.

- CSV: a real process names itself ``=HYPERLINK("http://x")`` (``prctl(PR_SET_NAME)``, which
  keeps 15 bytes) and another is exec'd through a link named ``@SUM(1+1)*cmd``; each holds a
  connection out of a test host, and ``egress-agent check --format csv`` must give their rows
  with the formula neutralised as OWASP says (one ``'`` in front), so no cell of theirs begins
  with ``=``, ``+``, ``-``, ``@``, tab or CR.
- ``report --html`` into a shared directory: ``nobody`` makes a sticky 1777 directory, plants a
  symlink to a file of root's at the page's name and at the temporary name the report used to
  write first (``PAGE.tmp-PID``, PID known here because root's report runs in a child forked
  for it), or a file of its own, mode 0666, at the page's name.  Root's report must follow no
  link (the victim is unchanged) and leave a page of its own: root's, mode 0600, a new inode.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import stat
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import run_as_nobody
from history_fixture import connection, run, write_history
from nethost import NetHost, Proc

from agent import cli
from agent.render import csv_cell, render

PREFIX = os.environ.get("NETHOST_PREFIX", "eat") + "o"
SRV6, CLI6 = "2a0e:4a00:23::1", "2a0e:4a00:23::2"
HELPER = str(Path(__file__).with_name("hostile_procs.py"))
INTERPRETER = os.path.realpath(sys.executable)
FORMULA = '=HYPERLINK("http://x")'
AT_NAME = "@SUM(1+1)*cmd"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
WINDOW = ["--since", str(T0), "--until", str(T0 + 3600)]


def _history(directory: str) -> str:
    """A history of one external connection in the window, from the real store."""
    path = os.path.join(directory, "history.db")
    return write_history(path, [(T0 + 60, [connection()])], [run(T0 - 60, T0 + 3700)])


# ---------------------------------------------------------------------------------------------
# the rule itself


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("@SUM(1+1)*cmd", "'@SUM(1+1)*cmd"),
        ("\tleading tab", "'\tleading tab"),
        ("\rleading CR", "'\rleading CR"),
        ("-1", "'-1"),
        ("'=already quoted", "''=already quoted"),
        ("curl", "curl"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_a_cell_that_starts_a_formula_gets_one_quote(value: str, cell: str) -> None:
    assert csv_cell(value) == cell
    back = cell[1:] if cell.startswith("'") else cell  # read back: drop one leading '
    assert back == value


def test_numbers_and_names_in_a_csv_row() -> None:
    """A pid of -1 (an ownerless socket) is written ``'-1`` like any cell that begins with
    ``-``; tabs and CRs never begin a cell at all, since the cell text escapes them."""
    text = render([{"pid": -1, "name": "\tx", "fd": 3, "cmd": "=1+1"}], None, "csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["pid", "name", "fd", "cmd"], ["'-1", "\\tx", "3", "'=1+1"]]


# ---------------------------------------------------------------------------------------------
# a real process named as a formula, through `check --format csv`


@pytest.fixture(scope="module")
def formula_host() -> Iterator[Tuple[NetHost, Dict[str, Proc]]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and veth pairs")
    scratch = Path(tempfile.mkdtemp(prefix="egress-agent-formula-"))
    try:
        with NetHost(PREFIX) as net:
            srv, cli_ns = net.namespace("srv"), net.namespace("cli")
            net.veth(srv, "s0", cli_ns, "c0")
            srv.add_address(f"{PREFIX}-s0", SRV6 + "/64")
            cli_ns.add_address(f"{PREFIX}-c0", CLI6 + "/64")
            port = str(net.listen(srv, "::").port)
            link = scratch / AT_NAME
            os.symlink(INTERPRETER, link)
            comm = FORMULA.encode().hex()
            procs = {
                "prctl": net.spawn(
                    cli_ns, [INTERPRETER, HELPER, "hold", SRV6, port, "--comm", comm], ready=True
                ),
                "link": net.spawn(cli_ns, [str(link), HELPER, "hold", SRV6, port], ready=True),
            }
            yield net, procs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_process_named_as_a_formula_reaches_csv_as_text(
    formula_host: Tuple[NetHost, Dict[str, Proc]],
) -> None:
    from commands import egress_agent

    net, procs = formula_host
    result = egress_agent("check", "--format", "csv", "--netns", net.name("cli"))
    assert result.returncode == 1, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    by_port = {row["local_port"]: row for row in rows}
    prctl = by_port[str(procs["prctl"].ready[1])]
    link = by_port[str(procs["link"].ready[1])]
    assert prctl["name"] == "'" + FORMULA[:15]  # the kernel keeps 15 bytes of a comm
    assert link["name"] == "'" + AT_NAME
    assert prctl["pid"] == str(procs["prctl"].pid)
    for row in (prctl, link):
        starts = {k: v for k, v in row.items() if v.startswith(FORMULA_STARTS)}
        assert starts == {}, starts


# ---------------------------------------------------------------------------------------------
# report --html into a shared directory


def _shared_directory() -> str:
    """A sticky directory everyone may write, made by nobody (so nobody owns it, and the
    kernel's protected_symlinks/protected_regular cannot save a careless writer)."""

    def make() -> str:
        path = tempfile.mkdtemp(prefix=f"{PREFIX}-shared-", dir="/tmp")
        os.chmod(path, 0o1777)  # noqa: S103 - the shared directory under attack
        return path

    path: str = run_as_nobody(make)
    return path


def _plant(directory: str, plants: Dict[str, str]) -> None:
    """As nobody: name -> "link:TARGET" (a symlink) or "file" (a 0666 file of nobody's)."""

    def plant() -> None:
        os.umask(0)
        for name, what in plants.items():
            path = os.path.join(directory, name)
            if what.startswith("link:"):
                os.symlink(what[5:], path)
            else:
                with open(path, "w") as handle:
                    handle.write("nobody's file\n")
                os.chmod(path, 0o666)  # noqa: S103 - the attacker's file

    run_as_nobody(plant)


def _report_in_child(args: List[str], plant: Callable[[int], None]) -> Tuple[int, str]:
    """``egress-agent report ARGS`` as root in a forked child, after ``plant(child's pid)``
    ran here: (status, stderr)."""
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 99
        try:
            os.close(go_w)
            os.close(err_r)
            os.read(go_r, 1)
            os.dup2(err_w, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.environ["EGRESS_AGENT_CONFIG"] = os.devnull
            status = cli.main(["report", *args])
            sys.stderr.flush()
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(go_r)
    os.close(err_w)
    try:
        plant(child)
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
    with os.fdopen(err_r) as err:
        stderr = err.read()
    _, wait_status = os.waitpid(child, 0)
    assert os.WIFEXITED(wait_status), wait_status
    return os.WEXITSTATUS(wait_status), stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: to become nobody and be root")
@pytest.mark.parametrize("planted", ["symlink", "foreign-file"])
def test_report_html_in_a_shared_directory_follows_no_link_and_keeps_no_foreign_file(
    tmp_path: Path, planted: str
) -> None:
    history = _history(str(tmp_path))
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    victim.chmod(0o644)
    victim_before = (victim.read_text(), os.stat(victim).st_ino)
    shared = _shared_directory()
    page = os.path.join(shared, "report.html")
    try:

        def plant(pid: int) -> None:
            plants = {f"report.html.tmp-{pid}": f"link:{victim}"}  # the old temporary name
            plants["report.html"] = f"link:{victim}" if planted == "symlink" else "file"
            _plant(shared, plants)

        status, stderr = _report_in_child([*WINDOW, "--history", history, "--html", page], plant)
        assert status == 0, stderr
        assert "Traceback" not in stderr
        assert (victim.read_text(), os.stat(victim).st_ino) == victim_before
        assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
        written = os.lstat(page)
        assert stat.S_ISREG(written.st_mode)
        assert (written.st_uid, written.st_gid) == (0, 0)
        assert stat.S_IMODE(written.st_mode) == 0o600
        assert Path(page).read_text().startswith("<!DOCTYPE html>")
        leftovers = sorted(n for n in os.listdir(shared) if n != "report.html")
        assert [n for n in leftovers if not n.startswith("report.html.tmp-")] == []

        def read() -> str:
            try:
                with open(page):
                    return "read"
            except PermissionError:
                return "EACCES"

        assert run_as_nobody(read) == "EACCES"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: to become nobody")
def test_report_html_that_cannot_replace_a_foreign_file_says_so(tmp_path: Path) -> None:
    """The other side: an ordinary user may not replace another's file in a sticky directory,
    so the report fails with a one-line error and leaves nothing behind."""
    shared = tempfile.mkdtemp(prefix=f"{PREFIX}-sticky-", dir="/tmp")
    readable = tempfile.mkdtemp(prefix=f"{PREFIX}-history-", dir="/tmp")
    try:
        os.chmod(readable, 0o755)  # noqa: S103 - for nobody to read
        history = _history(readable)
        os.chmod(history, 0o644)
        os.chmod(shared, 0o1777)  # noqa: S103 - a shared directory
        theirs = Path(shared, "report.html")
        theirs.write_text("root's page\n")
        theirs.chmod(0o666)
        args = ["report", *WINDOW, "--history", history, "--html", str(theirs)]
        import agent.report.write  # noqa: F401 (imported before becoming nobody)

        def report() -> Tuple[int, str]:
            err = io.StringIO()
            saved, sys.stderr = sys.stderr, err
            try:
                os.environ["EGRESS_AGENT_CONFIG"] = os.devnull
                return cli.main(args), err.getvalue()
            finally:
                sys.stderr = saved

        status, stderr = run_as_nobody(report)
        assert status == 2, stderr
        assert stderr == (
            f"egress-agent report: cannot write {theirs}: Operation not permitted\n"
        ), stderr
        assert theirs.read_text() == "root's page\n"
        assert os.listdir(shared) == ["report.html"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(readable, ignore_errors=True)
