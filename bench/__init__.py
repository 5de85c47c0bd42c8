"""The benchmark of issue 6: egress-agent's sampler against ``ss`` and psutil, on a load it builds.

Run it with ``make bench`` (``python -m bench --help``); it needs root (network namespaces).
The load lives in network namespaces named with a prefix (``bench.topology``) and in processes
forked by the benchmark itself (``bench.load``); both are torn down by name and by pid.
"""

from __future__ import annotations
