"""Who logged in, beside who the process runs as: ``login_user`` and ``login_session`` from the
audit loginuid (issue 22), and the ``ancestors`` of a sampled row, on a real ``curl`` in a test
host.

The test process plays a login: as root it writes ``/proc/self/loginuid`` (what
``pam_loginuid`` does at login), then drops to ``nobody`` with ``setpriv`` (what ``su``
does the other way) and runs ``curl``: the row must say both users.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from typing import Any, Dict, List, Tuple

import pytest
from commands import egress_agent
from nethost import Namespace, NetHost

from agent.who import NO_LOGIN, Ancestor, ancestors_text, read_login

SERVER, CLIENT = "2001:4860:4870::1", "2001:4860:4870::2"
LOGIN_UID = 1  # "daemon" on Debian: any uid with a name that is not nobody's


def _hosts(net: NetHost) -> Tuple[Namespace, Namespace]:
    srv, cli = net.namespace("srv"), net.namespace("cli")
    net.veth(srv, "s0", cli, "c0")
    srv.add_address(net.name("s0"), SERVER + "/64")
    cli.add_address(net.name("c0"), CLIENT + "/64")
    return srv, cli


def _rows(*args: str) -> List[Dict[str, Any]]:
    result = egress_agent("check", "--format", "json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    rows: List[Dict[str, Any]] = json.loads(result.stdout or "[]")
    return rows


def test_login_user_beside_the_effective_user(nethost: NetHost) -> None:
    srv, cli = _hosts(nethost)
    server = nethost.listen(srv, SERVER)
    script = (
        f"echo {LOGIN_UID} > /proc/self/loginuid && exec setpriv --reuid=nobody --regid=nogroup"
        f" --clear-groups curl -s -o /dev/null --max-time 60 http://[{SERVER}]:{server.port}/"
    )
    curl = nethost.spawn(cli, ["sh", "-c", script], ready=False)
    pid = curl.popen.pid
    deadline = time.monotonic() + 30
    mine: List[Dict[str, Any]] = []
    while not mine and time.monotonic() < deadline:
        mine = [r for r in _rows("--netns", cli.name) if r["pid"] == pid]
        if not mine:
            time.sleep(0.2)
    assert mine, "curl's connection never showed"
    row = mine[0]
    assert row["name"] == "curl"
    assert row["username"] == "nobody"
    assert row["login_user"] == pwd.getpwuid(LOGIN_UID).pw_name
    with open(f"/proc/{pid}/sessionid") as handle:
        assert row["login_session"] == int(handle.read())
    ancestors = json.loads(row["ancestors"])
    assert ancestors[0]["pid"] == os.getpid()
    assert ancestors[-1]["pid"] == 1 or len(ancestors) == 16


def test_unset_loginuid_reads_as_no_login(tmp_path: Any) -> None:
    proc = tmp_path / "42"
    proc.mkdir()
    (proc / "loginuid").write_text(str(NO_LOGIN))
    (proc / "sessionid").write_text(str(NO_LOGIN))
    assert read_login(42, str(tmp_path)) == (None, None)
    (proc / "loginuid").write_text("1000")
    (proc / "sessionid").write_text("7")
    assert read_login(42, str(tmp_path)) == (1000, 7)
    (proc / "loginuid").write_text("garbage\n")
    assert read_login(42, str(tmp_path))[0] is None
    assert read_login(43, str(tmp_path)) == (None, None)


def test_ancestors_stop_at_the_container_init() -> None:
    box = "a" * 64
    chain = (
        Ancestor(30, "sh", box),
        Ancestor(20, "conmon", ""),
        Ancestor(1, "init", ""),
    )
    assert json.loads(ancestors_text(chain, box)) == [{"pid": 30, "name": "sh"}]
    assert json.loads(ancestors_text(chain[1:], "")) == [
        {"pid": 20, "name": "conmon"},
        {"pid": 1, "name": "init"},
    ]
    assert ancestors_text((), "") == ""
    assert ancestors_text((Ancestor(2, 'a"b\n', ""),), "") == '[{"pid":2,"name":"a\\"b\\n"}]'


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loginuid is Linux's")
