"""A process that holds one connected socket and changes it on command, for tests of samples.

``python sockholder.py tcp|udp ADDRESS PORT`` connects (the family follows the address), prints
``READY LOCAL_ADDRESS LOCAL_PORT`` and then takes one command a line on stdin, answering each
with one line:

- ``shutdown``: ``shutdown(SHUT_WR)`` (TCP: our side to FIN_WAIT2, the peer's to CLOSE_WAIT);
  ``OK``;
- ``handoff``: fork a child that keeps the socket, then close it here (the socket lives on,
  same inode, owned by the child alone); ``OK CHILD_PID``.  The child ends when this process
  does (``PR_SET_PDEATHSIG``), or by SIGKILL from the test;
- ``reconnect ADDRESS PORT``: UDP only, ``connect()`` to another peer (nothing is sent); ``OK``;
- ``send``: UDP only, one datagram to the peer; ``OK``;
- ``close``: close the socket; ``OK``.

It exits when its stdin closes.  Used with ``NetHost.spawn(namespace, argv, ready=True)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import List, Optional

PR_SET_PDEATHSIG = 1


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _handoff(sock: socket.socket) -> int:
    child = os.fork()
    if child == 0:  # pragma: no cover - the child holds the socket until it is killed
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.close(0)
        while True:
            signal.pause()
    sock.close()
    return child


def main(argv: List[str]) -> int:
    proto, address, port = argv[0], argv[1], int(argv[2])
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock: Optional[socket.socket] = socket.socket(_family(address), kind)
    assert sock is not None
    sock.connect((address, port))
    local = sock.getsockname()
    print("READY", local[0], local[1], flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "shutdown" and sock is not None:
            sock.shutdown(socket.SHUT_WR)
            print("OK", flush=True)
        elif words[0] == "handoff" and sock is not None:
            print("OK", _handoff(sock), flush=True)
            sock = None
        elif words[0] == "reconnect" and sock is not None:
            sock.connect((words[1], int(words[2])))
            print("OK", flush=True)
        elif words[0] == "send" and sock is not None:
            sock.send(b"x")
            print("OK", flush=True)
        elif words[0] == "close" and sock is not None:
            sock.close()
            sock = None
            print("OK", flush=True)
        else:
            print("ERR", line.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
