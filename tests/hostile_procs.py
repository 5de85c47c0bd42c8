"""Processes that make the sampler's life hard, run as scripts inside a test host.

Started through :meth:`nethost.NetHost.spawn`, so each one runs inside a network namespace,
prints one ``READY ...`` line and keeps going until its stdin closes (or the test dies)::

    python hostile_procs.py hold ADDRESS PORT [--comm HEX] [--zombie-leader] [--fork-holder]
                                              [-- anything...]
    python hostile_procs.py churn ADDRESS PORT RATE SECONDS [HOLD_MS]
    python hostile_procs.py sink ADDRESS

``hold`` dials ADDRESS:PORT over TCP and holds the connection.  ``--comm HEX`` first renames
the process (``prctl(PR_SET_NAME)``, ``Documentation/filesystems/proc.rst`` "comm"; the kernel
keeps 15 bytes and takes any byte but NUL).  Everything after ``--`` is ignored, so a test
can give the process any command line it likes; it may also exec this script through a
symlink or a copy of the interpreter with a hostile name.  ``--fork-holder`` hands the
connection to a child and exits, leaving a zombie for as long as its parent (the test) does
not reap it.  ``--zombie-leader`` ends the main thread alone (``SYS_exit``, not
``exit_group``) while another thread holds the connection: the process lives on with a zombie
thread-group leader, whose ``/proc/PID/fd`` is empty (``proc_fd_link`` finds no files of the
exited leader), which is how a process can hide its sockets from ``/proc/PID/fd`` scanners.
READY then names the holder: ``READY LOCAL_ADDRESS LOCAL_PORT PID``.

``churn`` forks RATE short-lived children a second for SECONDS; each dials ADDRESS:PORT,
keeps the connection HOLD_MS milliseconds (default 5), closes it and exits.  The parent reaps
them and prints ``DONE FORKED FAILED`` at the end.  ``sink`` listens on ADDRESS (kernel-chosen
port), accepts and closes at once, for as long as its stdin is open: a listener that can
take thousands of connections without running out of file descriptors.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import sys
import threading
import time
from typing import List

PR_SET_NAME = 15
SYS_EXIT_X86_64 = 60


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _wait_stdin_eof() -> None:
    while os.read(sys.stdin.fileno(), 4096):
        pass


def _set_comm(raw: bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def hold(args: List[str]) -> None:
    address, port = args[0], int(args[1])
    options = args[2 : args.index("--")] if "--" in args else args[2:]
    if "--comm" in options:
        _set_comm(bytes.fromhex(options[options.index("--comm") + 1]))
    conn = socket.socket(_family(address), socket.SOCK_STREAM)
    conn.connect((address, port))
    local = conn.getsockname()
    if "--fork-holder" in options:
        told, tell = os.pipe()
        if os.fork() == 0:
            print("READY", local[0], local[1], os.getpid(), flush=True)
            os.close(tell)
            _wait_stdin_eof()
            os._exit(0)
        os.close(tell)
        os.read(told, 1)  # the child has said READY: exit, a zombie until the test reaps it
        os._exit(0)
    if "--zombie-leader" in options:
        if sys.platform != "linux" or os.uname().machine != "x86_64":
            raise SystemExit("--zombie-leader needs Linux on x86_64 (SYS_exit = 60)")
        holder = threading.Thread(target=_wait_stdin_eof)
        holder.start()
        print("READY", local[0], local[1], os.getpid(), flush=True)
        libc = ctypes.CDLL(None)
        libc.syscall(SYS_EXIT_X86_64, 0)  # ends this thread only; ctypes released the GIL
    print("READY", local[0], local[1], os.getpid(), flush=True)
    _wait_stdin_eof()


def churn(args: List[str]) -> None:
    address, port, rate, seconds = args[0], int(args[1]), float(args[2]), float(args[3])
    hold_s = (float(args[4]) if len(args) > 4 else 5.0) / 1000.0
    family = _family(address)
    print("READY", flush=True)
    forked = failed = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        due = started + forked / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                with socket.socket(family, socket.SOCK_STREAM) as conn:
                    conn.settimeout(2)
                    conn.connect((address, port))
                    time.sleep(hold_s)
            except OSError:
                status = 1
            os._exit(status)
        forked += 1
        failed += _reap(block=False)
    while True:
        try:
            failed += _reap(block=True)
        except ChildProcessError:
            break
    print("DONE", forked, failed, flush=True)
    _wait_stdin_eof()


def _reap(block: bool) -> int:
    """Reap finished children; how many failed.  Raises ChildProcessError when none is left
    and ``block`` is set."""
    failed = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            if block:
                raise
            return failed
        if pid == 0:
            return failed
        failed += not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
        if block:
            return failed


def sink(args: List[str]) -> None:
    address = args[0]
    server = socket.socket(_family(address), socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(1024)
    print("READY", server.getsockname()[1], flush=True)
    while True:
        readable, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
            return
        if server in readable:
            conn, _ = server.accept()
            conn.close()


def main(argv: List[str]) -> int:
    roles = {"hold": hold, "churn": churn, "sink": sink}
    if not argv or argv[0] not in roles:
        print(f"usage: hostile_procs.py {'|'.join(roles)} ...", file=sys.stderr)
        return 2
    roles[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
