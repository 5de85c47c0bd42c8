"""Capture real ring-buffer pages from this kernel into ``tests/data/trace/`` (root).

``python tests/trace_capture.py`` makes an instance of its own (``egress-agent-capture-PID``),
limits it to this process and its children (the instance's ``set_event_pid`` with
``options/event-fork``), enables the events the source uses with its filters, runs a known
workload and saves, byte for byte:

- ``header_page``, ``header_event`` and each event's ``format`` (so that the pages decode the
  same on any machine the tests run on);
- ``pages.bin``: every page read, each ``page_size`` bytes long;
- ``lost.bin``: pages read after flooding a one-page buffer, the first carrying the lost flag;
- ``meta.json``: what the workload did (pids, ports, the long executable path), what the
  tests assert against.

Run it again only to refresh the fixtures (for example on a new kernel); commit the result.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from agent.collect.kernel.reader import EVENT_SPECS, choose_events  # noqa: E402
from agent.collect.kernel.ringbuffer import subbuffer_size  # noqa: E402
from agent.collect.kernel.tracefs import Instance, InstanceSettings, find_tracefs  # noqa: E402

OUT = os.path.join(HERE, "data", "trace")


def _drain(instance: Instance, page_size: int) -> List[bytes]:
    pages = []
    for cpu in instance.cpus():
        fd = os.open(instance.file(f"per_cpu/cpu{cpu}/trace_pipe_raw"), os.O_RDONLY | os.O_NONBLOCK)
        try:
            while True:
                try:
                    page = os.read(fd, page_size)
                except BlockingIOError:
                    break
                if not page:
                    break
                pages.append(page.ljust(page_size, b"\0"))
        finally:
            os.close(fd)
    return pages


def _workload(meta: Dict[str, object]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    meta["tcp_port"] = port
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    meta["tcp_client_port"] = client.getsockname()[1]
    client.close()
    accepted.close()
    listener.close()
    try:
        socket.create_connection(("127.0.0.1", port))
    except ConnectionRefusedError:
        meta["refused_port"] = port
    listener6 = socket.socket(socket.AF_INET6)
    listener6.bind(("::1", 0))
    listener6.listen()
    port6 = listener6.getsockname()[1]
    meta["tcp6_port"] = port6
    client6 = socket.create_connection(("::1", port6))
    client6.close()
    listener6.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.sendto(b"x", ("127.0.0.1", 9))
    udp.close()
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.sendto(b"x", ("::1", 9))
    udp6.close()
    meta["udp_port"] = 9
    # an exec whose filename makes the record longer than 112 bytes (type_len 0)
    directory = tempfile.mkdtemp(prefix="egress-agent-capture-")
    long_path = os.path.join(directory, "x" * 120)
    os.symlink(shutil.which("true") or "/bin/true", long_path)
    child = subprocess.Popen([long_path])
    child.wait()
    meta["long_exec"] = long_path
    meta["long_exec_pid"] = child.pid
    shutil.rmtree(directory)
    # a thread that renames itself, and a child that moves to a new network namespace
    done = threading.Event()

    def named() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as handle:
            handle.write("capture-thread")
        done.set()

    thread = threading.Thread(target=named)
    thread.start()
    thread.join()
    unshare = subprocess.run(["unshare", "-n", "true"], check=False)
    meta["unshare_rc"] = unshare.returncode


def main() -> int:
    if os.geteuid() != 0:
        print("trace_capture: needs root", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(OUT, "formats"), exist_ok=True)
    root = find_tracefs()
    instance = Instance.create(root, "egress-agent-capture")
    try:
        chosen = choose_events(instance.read_format)
        instance.apply(InstanceSettings(chosen.settings, 256))
        instance.write("options/event-fork", "1")
        instance.write("set_event_pid", str(os.getpid()))
        for name in ("header_page", "header_event"):
            with open(os.path.join(OUT, name), "w") as handle:
                handle.write(instance.read(f"events/{name}"))
        for spec in EVENT_SPECS:
            try:
                text = instance.read_format(spec.system, spec.name)
            except OSError:
                continue
            with open(os.path.join(OUT, "formats", f"{spec.system}:{spec.name}"), "w") as handle:
                handle.write(text)
        page_size = subbuffer_size(instance.read)
        meta: Dict[str, object] = {"pid": os.getpid(), "page_size": page_size}
        meta["kernel"] = os.uname().release
        _drain(instance, page_size)
        _workload(meta)
        time.sleep(0.2)
        pages = _drain(instance, page_size)
        with open(os.path.join(OUT, "pages.bin"), "wb") as handle:
            handle.write(b"".join(pages))
        # a loss: a buffer of one page per CPU, flooded before anything is read
        instance.write("tracing_on", "0")
        instance.write("buffer_size_kb", "4")
        instance.write("tracing_on", "1")
        _drain(instance, page_size)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        flood_port = listener.getsockname()[1]
        for _ in range(300):
            socket.create_connection(("127.0.0.1", flood_port)).close()
            listener.accept()[0].close()
        listener.close()
        meta["flood_connects"] = 300
        lost = _drain(instance, page_size)
        with open(os.path.join(OUT, "lost.bin"), "wb") as handle:
            handle.write(b"".join(lost))
        stats = {cpu: instance.cpu_stats(cpu) for cpu in instance.cpus()}
        meta["lost_stats"] = {str(cpu): value for cpu, value in stats.items()}
        with open(os.path.join(OUT, "meta.json"), "w") as handle:
            json.dump(meta, handle, indent=1, sort_keys=True)
            handle.write("\n")
        print(f"trace_capture: {len(pages)} pages, {len(lost)} after the flood -> {OUT}")
    finally:
        instance.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
