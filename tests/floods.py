"""Processes of nobody's, each alone in a network namespace of its own (``unshare -rn``): what
any local user can make, for the flood and capability tests."""

from __future__ import annotations

import os
import subprocess
from typing import List

from conftest import NOBODY
from dnshost import wait_for


def net_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


class Flood:
    """``count`` processes of nobody's, each alone in a network namespace of its own."""

    def __init__(self, count: int) -> None:
        self.procs: List[subprocess.Popen[bytes]] = []
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        for _ in range(count):
            self.procs.append(
                subprocess.Popen(
                    [*as_nobody, "unshare", "-rn", "sleep", "300"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd="/",
                )
            )
        try:
            host = net_inode(os.getpid())
            for proc in self.procs:  # each in its namespace, running sleep
                wait_for(lambda p=proc: self._settled(p.pid, host), f"pid {proc.pid} unshared", 60)
            self.inodes = {net_inode(proc.pid) for proc in self.procs}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _settled(pid: int, host: int) -> bool:
        try:
            with open(f"/proc/{pid}/comm") as comm:
                return comm.read().strip() == "sleep" and net_inode(pid) != host
        except OSError:
            return False

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
