"""A sample waits for the event feed to read what the kernel holds (``EventFeed.catch_up``):
the feed's thread, its rounds and the wait are real; the event source is a stand-in whose
``poll`` blocks until the test lets it go, because a real source's timing (when the kernel
hands it a batch) cannot be held still at will.  And the rule a sample follows with it: wait
once for each connection it cannot tell."""

from __future__ import annotations

import logging
import threading
from typing import List

from fakes import FunctionSampler
from history_fixture import connection

from agent.classify import Classifier
from agent.collect.events import SocketEvent
from agent.collect.sockets.sampler import LinuxSampler
from agent.config import Settings
from agent.pipeline.compose import Pipeline
from agent.pipeline.feed import EventFeed
from agent.records import Connection


class HeldSource:
    """An event source that reads nothing until :attr:`release` is set."""

    name = "tracefs"
    lost = 0

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = False

    def poll(self, timeout: float) -> List[SocketEvent]:
        self.release.wait(timeout)
        return []

    def close(self) -> None:
        self.closed = True


def test_a_catch_up_waits_for_a_whole_round_of_reading() -> None:
    source = HeldSource()
    pipeline = Pipeline(Settings(), LinuxSampler(Classifier()), None)
    feed = EventFeed(pipeline, source, logging.getLogger("test"))
    stop = feed.start()
    try:
        assert not feed.catch_up(0.3)  # the source holds: no round ends
        source.release.set()
        assert feed.catch_up(5.0)
    finally:
        source.release.set()
        stop()
    assert source.closed
    assert not feed.catch_up(0.1)  # a stopped feed says so at once


def test_a_sample_waits_once_for_each_connection_it_cannot_tell() -> None:
    """A TCP connection neither the sample nor the events can tell (an ownerless TIME_WAIT
    older than the events) makes the sample wait once; later samples that still hold it do
    not wait again, and a new one does.  The sampler is a stand-in that returns the rows the
    test gives; the pipeline's rule is what is tested."""
    rows: List[Connection] = []
    pipeline = Pipeline(Settings(), FunctionSampler(lambda pids: list(rows)), None)
    waits: List[float] = []
    pipeline.seen_direction = lambda connection: None
    pipeline.events_catch_up = lambda timeout: waits.append(timeout) is None
    old = connection(pid=-1, direction="unknown", state="TIME_WAIT", local_port=40001)
    rows.append(old)
    pipeline.sample()
    pipeline.sample()
    assert len(waits) == 1
    rows.append(connection(pid=-1, direction="unknown", state="TIME_WAIT", local_port=40002))
    pipeline.sample()
    assert len(waits) == 2
    rows[:] = [connection(direction="outbound", local_port=40003)]  # told by the sample
    pipeline.sample()
    assert len(waits) == 2
