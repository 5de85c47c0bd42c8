"""What the agent does with each capability, tried once on another user's process (the tests
run it with some capabilities left out, see tests/test_watch_unit.py).

    python capability_probe.py PID TRACE_PREFIX

prints one JSON object: for each need, "ok" or the error (``errno`` name).  ``PID`` is a
process of another user in a network namespace of its own; ``TRACE_PREFIX`` names the tracefs
instance made and removed.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Callable, Dict


def _outcome(attempt: Callable[[], object]) -> str:
    try:
        attempt()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))
    except Exception as error:  # the agent's own wrappers (EventsUnavailable)
        return f"{type(error).__name__}: {error}"
    return "ok"


def main(pid: int, prefix: str) -> Dict[str, str]:
    from agent.collect.dns.filter import open_packet_socket
    from agent.collect.kernel.tracefs import Instance, find_tracefs
    from agent.collect.netns import open_in_namespace
    from agent.collect.sockets.sockdiag import NETLINK_SOCK_DIAG

    def fd_list() -> None:
        os.listdir(f"/proc/{pid}/fd")

    def fd_link() -> None:
        os.readlink(f"/proc/{pid}/fd/0")

    def exe() -> None:
        os.readlink(f"/proc/{pid}/exe")

    def setns() -> None:
        diag = lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)  # noqa: E731
        open_in_namespace(pid, diag).close()

    def packet() -> None:
        open_packet_socket().close()

    def tracefs() -> None:
        instance = Instance.create(find_tracefs(mount=False), prefix=prefix)
        try:
            if instance.has_event("sock", "inet_sock_set_state"):
                instance.write("events/sock/inet_sock_set_state/enable", "1")
                instance.write("events/sock/inet_sock_set_state/enable", "0")
        finally:
            instance.close()

    needs = {"fd_list": fd_list, "fd_link": fd_link, "exe": exe, "setns": setns}
    needs.update(packet=packet, tracefs=tracefs)
    return {name: _outcome(attempt) for name, attempt in needs.items()}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2])))
