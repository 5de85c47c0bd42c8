"""The exec probe's parts (issue 22, agent/collect/kernel/execargs.py): the loader's entry
offset, the probe line, splitting captured bytes into arguments, stale probes; and the probe
itself defined in the kernel, with a real exec captured, and removed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.collect.kernel.execargs import (
    EVENT_NAME,
    LAYOUTS,
    SCALAR,
    ExecProbe,
    decode_exec_args,
    elf_entry_offset,
    find_loader,
    group_name,
    probe_definition,
    remove_stale_probes,
    split_arguments,
)
from agent.collect.kernel.records import CUT_MARK
from agent.collect.kernel.ringbuffer import PageParser, parse_event_format
from agent.collect.kernel.tracefs import Instance, find_tracefs

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")


def test_split_keeps_argc_arguments_and_drops_what_follows() -> None:
    data = b"curl\0-s\0http://x/a.sh\0SECRET=env\0PATH=/bin\0"
    args = split_arguments(1, 42, 3, data)
    assert (args.argv, args.cut, args.cmdline) == (
        ("curl", "-s", "http://x/a.sh"),
        False,
        "curl -s http://x/a.sh",
    )
    cut = split_arguments(1, 42, 3, b"curl\0-s\0http://x/very-lo")
    assert cut.argv == ("curl", "-s", "http://x/very-lo") and cut.cut
    assert cut.cmdline.endswith(CUT_MARK)
    assert split_arguments(1, 42, 0, b"SECRET=1\0").argv == ()
    assert split_arguments(1, 42, 2, b"a\0\0rest").argv == ("a", "")
    assert split_arguments(1, 42, 1 << 40, b"a\0b").cut  # a garbage argc: no hang, cut
    assert split_arguments(1, 42, 1, b"\xff\xfe\0").argv == (os.fsdecode(b"\xff\xfe"),)


def test_entry_offset_of_the_host_loader_and_refusals(tmp_path: Path) -> None:
    found = find_loader()
    if found is None:
        pytest.skip("no 64-bit glibc loader on this machine")
    path, offset = found
    assert offset > 0 and os.path.isabs(path)
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\n" * 10)
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf_entry_offset(str(junk))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(Path(path).read_bytes()[:64])
    with pytest.raises(ValueError):
        elf_entry_offset(str(truncated))
    assert find_loader([str(junk), str(tmp_path / "missing")]) is None


def test_probe_line_without_arrays() -> None:
    line = probe_definition("g", "/lib/ld.so", 0x10, (SCALAR, SCALAR))
    assert line.endswith("argc=$stack0:u64 a0=+0($stack1):u64 a1=+8($stack1):u64")


def test_probe_line_and_group() -> None:
    assert group_name("egress-agent-hwh-1234") == "egress_agent_hwh_1234"
    line = probe_definition("egress_agent_x_1", "/lib/ld.so", 0x1AB70, (64, 32))
    assert line == (
        "p:egress_agent_x_1/exec_argv /lib/ld.so:0x1ab70 argc=$stack0:u64"
        " a0=+0($stack1):u64[64] a1=+512($stack1):u64[32]"
    )


@pytest.fixture
def tracefs() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs")
    root = find_tracefs()
    if not os.path.exists(os.path.join(root, "uprobe_events")):
        pytest.skip("this kernel has no uprobe events (CONFIG_UPROBE_EVENTS)")
    return root


@pytest.mark.parametrize("layout", [LAYOUTS[0], (SCALAR,) * 96], ids=["arrays", "scalars"])
def test_the_probe_captures_an_exec_and_leaves_nothing(tracefs: str, layout: tuple) -> None:
    with open(os.path.join(tracefs, "uprobe_events")) as handle:
        before = handle.read()
    instance = Instance.create(tracefs, f"egress-agent-{PREFIX}-probe")
    try:
        probe = ExecProbe.define(tracefs, instance.name, layouts=[layout])
    except BaseException:
        instance.close()
        raise
    try:
        assert probe.capacity >= 512
        fmt = parse_event_format(instance.read_format(probe.system, EVENT_NAME), probe.system)
        decode = decode_exec_args(fmt)
        base = instance.event_dir(probe.system, EVENT_NAME)
        instance.write("tracing_on", "1")
        instance.write(base + "/enable", "1")
        marker = f"who-{os.getpid()}-{time.monotonic_ns()}"
        secret = {"PATH": "/usr/bin", "EGRESS_TEST_SECRET": f"s3cr3t-{marker}"}
        subprocess.run(["/usr/bin/true", marker, "two words"], check=True, env=secret)
        # the attack on the bound: an argument far longer than the probe holds
        subprocess.run(["/usr/bin/true", marker + "-long", "A" * 10000], check=True, env=secret)
        instance.write(base + "/enable", "0")
        from agent.collect.kernel.ringbuffer import parse_header_event, parse_header_page

        parser = PageParser(
            parse_header_page(instance.read("events/header_page")),
            parse_header_event(instance.read("events/header_event")),
            fmt.require("common_type").offset,
            fmt.require("common_type").size,
        )
        found = []
        for cpu in instance.cpus():
            fd = os.open(
                instance.file(f"per_cpu/cpu{cpu}/trace_pipe_raw"), os.O_RDONLY | os.O_NONBLOCK
            )
            try:
                while True:
                    try:
                        page = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        break
                    if not page:
                        break
                    events: list = []
                    parser.parse(page, {fmt.id: decode}, events)
                    found += [e for e in events if e.argv[1:2] and e.argv[1].startswith(marker)]
            finally:
                os.close(fd)
        short, long = sorted(found, key=lambda e: e.argv[1])
        assert (short.argv, short.cut) == (("/usr/bin/true", marker, "two words"), False)
        assert long.cut and long.cmdline.endswith(CUT_MARK)
        assert long.argv[:2] == ("/usr/bin/true", marker + "-long")
        assert set(long.argv[2]) == {"A"} and len(" ".join(long.argv)) <= probe.capacity
        assert not any("s3cr3t" in arg for e in found for arg in e.argv)  # never the environment
    finally:
        instance.close()
        assert probe.remove()
    with open(os.path.join(tracefs, "uprobe_events")) as handle:
        assert handle.read() == before


def test_a_probe_another_tool_removed_is_said_once_and_done_without(tracefs: str) -> None:
    from agent.collect.kernel.source import open_event_source

    source = open_event_source(prefix=f"egress-agent-{PREFIX}-gone")
    try:
        probe = source.exec_probe
        if probe is None:
            pytest.skip(f"no exec probe: {source.unavailable.get('uprobe:exec_argv')}")
        # what `trace-cmd reset -a` does: disable the event everywhere, then clear probes
        source.instance.write(source.instance.event_dir(probe.group, EVENT_NAME) + "/enable", "0")
        fd = os.open(os.path.join(tracefs, "uprobe_events"), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"-:{probe.group}/{EVENT_NAME}\n".encode())
        finally:
            os.close(fd)
        assert source.instance.verify() == [f"{probe.group}:{EVENT_NAME} removed"]
        assert source.instance.verify() == []
        source.poll(0.1)
    finally:
        source.close()
    assert source.exec_probe is not None and source.exec_probe.removed
    assert not os.path.exists(source.instance.path)


def test_stale_probes_of_ours_go_and_nobody_elses(tracefs: str) -> None:
    """A probe left by a killed agent (its instance gone) is removed at the next start; a
    live agent's probe and another tool's probe stay."""
    found = find_loader()
    if found is None:
        pytest.skip("no 64-bit glibc loader on this machine")
    path, offset = found
    events = os.path.join(tracefs, "uprobe_events")
    stale = group_name(f"egress-agent-{PREFIX}-stale-{os.getpid()}")
    other = f"{PREFIX}other{os.getpid()}"

    def append(line: str) -> None:
        fd = os.open(events, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    instance = Instance.create(tracefs, f"egress-agent-{PREFIX}-live")
    try:
        live = ExecProbe.define(tracefs, instance.name, layouts=[(8,)])
    except BaseException:
        instance.close()
        raise
    try:
        append(probe_definition(stale, path, offset, (8,)))
        append(probe_definition(other, path, offset, (8,)))
        assert stale in remove_stale_probes(tracefs)
        with open(events) as handle:
            text = handle.read()
        assert f"{stale}/" not in text
        assert f"{live.group}/" in text and f"{other}/" in text
    finally:
        append(f"-:{other}/{EVENT_NAME}")
        instance.close()
        live.remove()
