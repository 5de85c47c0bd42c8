"""Client processes for the kernel event tests, run inside a test host's namespace.

``python event_clients.py storm tcp|udp ADDRESS PORT COUNT PARALLEL``: start COUNT short-lived
``bash`` processes, at most PARALLEL at a time, each connecting once to ADDRESS:PORT (bash's
``/dev/tcp`` or ``/dev/udp`` redirections: a ``connect()``, for UDP one datagram) and exiting.
Prints ``PID <pid> <lifetime ms>`` per child, then ``DONE``.  The children are forked from this
long-lived process, as a container's processes are forked from its init.

``python event_clients.py dial ADDRESS PORT LOCAL_PORT``: a TCP connection from LOCAL_PORT,
held until stdin closes (prints ``READY`` first, like :mod:`nethost`'s processes).

``python event_clients.py syn ADDRESS PORT``: a connect with one SYN retry (``TCP_SYNCNT``),
to an address that never answers: prints ``READY`` and then ``TIMEOUT`` when it gives up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

BASH = "/usr/bin/bash"


def storm(proto: str, address: str, port: int, count: int, parallel: int) -> None:
    redirect = (
        f"exec 3<>/dev/tcp/{address}/{port}"
        if proto == "tcp"
        else (f"echo x >/dev/udp/{address}/{port}")
    )
    running: List[Tuple[subprocess.Popen[bytes], float]] = []

    def reap(proc: subprocess.Popen[bytes], started: float) -> None:
        proc.wait()
        print("PID", proc.pid, round((time.monotonic() - started) * 1000, 1), flush=True)

    for _ in range(count):
        started = time.monotonic()
        proc = subprocess.Popen([BASH, "-c", redirect], stderr=subprocess.DEVNULL)
        running.append((proc, started))
        if len(running) >= parallel:
            reap(*running.pop(0))
    for proc, started in running:
        reap(proc, started)
    print("DONE", flush=True)


def dial(address: str, port: int, local_port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local_port))
    sock.connect((address, port))
    print("READY", sock.getsockname()[0], sock.getsockname()[1], flush=True)
    while os.read(sys.stdin.fileno(), 4096):
        pass


def syn(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
    print("READY", flush=True)
    try:
        sock.connect((address, port))
    except OSError as error:
        print("TIMEOUT", error.errno, flush=True)
    while os.read(sys.stdin.fileno(), 4096):
        pass


def main(argv: Sequence[str]) -> int:
    role = argv[0]
    if role == "storm":
        storm(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    elif role == "dial":
        dial(argv[1], int(argv[2]), int(argv[3]))
    elif role == "syn":
        syn(argv[1], int(argv[2]))
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
