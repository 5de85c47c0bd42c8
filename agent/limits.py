"""Process limits the long-running agent (``watch``, the extension) sets for itself at start.

:func:`raise_open_files` lifts the soft ``RLIMIT_NOFILE`` to the hard limit (``getrlimit(2)``):
systemd and most shells hand a service a soft limit of 1,024 and a far higher hard one
(systemd 240 and later: 524,288), and the soft one is meant to be raised by the programs that
need it.  The agent's own descriptors are bounded anyway (one packet socket per watched
namespace, at most :data:`agent.collect.dns.watch.MAX_WATCHED`; sock_diag sockets one at a
time): the room is for bursts a local user may cause, so they never cost the agent
``/proc`` itself ("Too many open files").
"""

from __future__ import annotations

import resource
from typing import Tuple


def raise_open_files() -> Tuple[int, int]:
    """Raise the soft limit on open files to the hard limit: (soft before, soft now).

    Never raises: where the limit cannot be changed (a sandbox refusing ``setrlimit``), it is
    left as it was and the pair says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard
