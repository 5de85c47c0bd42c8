"""A sample waits for the event feed to read what the kernel holds (``EventFeed.catch_up``):
the feed's thread, its rounds and the wait are real; the event source is a stand-in whose
``poll`` blocks until the test lets it go, because a real source's timing (when the kernel
hands it a batch) cannot be held still at will."""

from __future__ import annotations

import logging
import threading
from typing import List

from agent.classify import Classifier
from agent.collect.events import SocketEvent
from agent.collect.sockets.sampler import LinuxSampler
from agent.config import Settings
from agent.pipeline.compose import Pipeline
from agent.pipeline.feed import EventFeed


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
