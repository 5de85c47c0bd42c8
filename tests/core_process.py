"""osquery core as a process of its own, so that a test can kill it (``SIGKILL``) like a crash.

Runs :class:`osquery_core.CoreStandIn` in DIRECTORY, launches ``egress-agent extension`` from
it as osqueryd's autoloader does (the environment passes through, so the test sets
``EGRESS_AGENT_CONFIG``), waits for the registration and prints one line::

    READY <uuid> <extension pid> <extension socket> <extension stderr file>

then behaves as MODE asks until its stdin closes (or it is killed)::

    python core_process.py DIRECTORY INTERVAL serve
    python core_process.py DIRECTORY INTERVAL generate N   # N threads generate without pause
    python core_process.py DIRECTORY INTERVAL deaf         # answers no ping any more

``generate`` keeps N connections each calling ``generate external_connections`` back to back
(and prints ``GENERATING`` once the first has returned), so whenever the test kills this
process after that line, generates are in flight.  ``deaf`` makes core's
``ping`` block forever once the extension is registered (a hung core).  On a clean end (stdin
closed) the stand-in stops and the extension is killed; after a ``SIGKILL`` nothing of that
happens, as with a real crash: the extension is orphaned and core's socket file stays.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from osquery_core import CoreStandIn, default_extension_command


def _generate_forever(core: CoreStandIn, path: str, first: threading.Event) -> None:
    try:
        with core.connect(path, timeout=60) as extension:
            while True:
                extension.generate("external_connections")
                if not first.is_set():
                    first.set()
                    print("GENERATING", flush=True)
    except Exception:  # noqa: S110 - the test ends the extension or core; so ends this loop
        pass


def main(argv: list) -> int:  # type: ignore[type-arg]
    directory, interval, mode = argv[0], float(argv[1]), argv[2]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, "osquery.em"))  # left by a crashed core, as osqueryd
    core = CoreStandIn(directory).start()
    try:
        process = core.launch(default_extension_command(), timeout=10, interval=interval)
        registration = core.wait_for_registration(process=process, timeout=60)
        path = core.extension_socket(registration)
        stderr_file = core._stderr_files[process.pid]
        print("READY", registration.uuid, process.pid, path, stderr_file, flush=True)
        if mode == "generate":
            first = threading.Event()
            for _ in range(int(argv[3])):
                loop = threading.Thread(target=_generate_forever, args=(core, path, first))
                loop.daemon = True
                loop.start()
        elif mode == "deaf":
            hang = threading.Event()
            core.manager.ping = lambda: hang.wait()  # type: ignore[method-assign]
        while os.read(sys.stdin.fileno(), 4096):
            pass
    finally:
        core.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
