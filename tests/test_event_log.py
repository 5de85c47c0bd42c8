"""The buffer behind ``external_connection_events``: attempts settled by their outcome and
their close, bounded by count and age (agent.pipeline.feed.EventLog); and what the event
feed does with a batch of events before it logs them (EventFeed.handle)."""

from __future__ import annotations

import ipaddress
import logging
import time
from types import SimpleNamespace
from typing import List

from dnshost import LateWatch

from agent.collect.dns.cache import NameCache
from agent.collect.events import SocketEvent
from agent.config import parse_settings, parse_yaml
from agent.identity import Identity
from agent.pipeline import Pipeline
from agent.pipeline.domains import DomainNames
from agent.pipeline.feed import EventFeed, EventLog, EventRow
from agent.records import Connection


def attempt(pid: int = 10, **columns: object) -> Connection:
    return Connection(pid=pid, remote_address="9.9.9.9", remote_port=443, **columns)  # type: ignore[arg-type]


def test_an_attempt_takes_its_outcome_local_end_and_close() -> None:
    log = EventLog()
    now = time.time()
    log.add(1, EventRow(now, "pending", attempt(state="SYN_SENT")))
    established = attempt(state="ESTABLISHED", local_address="10.0.0.2", local_port=40000)
    assert log.settle(1, "established", now + 0.01, established)
    (row,) = log.rows()
    record = row.record()
    assert (record["outcome"], record["state"], record["closed_at"]) == (
        "established",
        "ESTABLISHED",
        None,
    )
    assert (record["local_address"], record["local_port"]) == ("10.0.0.2", 40000)
    assert log.settle(1, None, now + 5, attempt(state="CLOSED"))
    record = log.rows()[0].record()
    assert (record["outcome"], record["state"], record["closed_at"]) == (
        "established",
        "CLOSED",
        int(now + 5),
    )
    assert record["time"] == int(now) and row.connection.pid == 10
    assert not log.settle(2, "refused", now, attempt())  # no such attempt held


def test_the_buffer_keeps_the_newest_rows_within_its_bounds() -> None:
    log = EventLog(max_rows=3, expiry=60)
    now = time.time()
    log.add(1, EventRow(now - 120, "established", attempt(1)))  # expired already
    for key in (2, 3, 4, 5):
        log.add(key, EventRow(now, "established", attempt(key)))
    assert [row.connection.pid for row in log.rows()] == [3, 4, 5]
    assert log.dropped == 2 and not log.settle(2, None, now, attempt(2))
    assert [row.connection.pid for row in log.rows(since=now + 1)] == []
    assert len(log.rows(until=now)) == 3


def connect_event(key: int, remote: str, namespace: int = 4026532001) -> SocketEvent:
    return SocketEvent(
        time.time(), "connect", 6, 2, 4, 0, 0, int(ipaddress.IPv4Address(remote)), 443,
        namespace, Identity(pid=100 + key), "outbound", key,
    )  # fmt: skip


def test_a_batch_waits_for_the_dns_watch_once_and_its_rules_see_the_names() -> None:
    cache = NameCache()
    watch = LateWatch(cache, 4026532001, "9.9.9.9", "quad9.net")
    settings = parse_settings(
        parse_yaml("allow:\n  - {comment: resolver, domains: quad9.net}\n", "t.yaml"), "t.yaml"
    )
    pipeline = Pipeline(settings, sampler=None, names=DomainNames(cache, watch))  # type: ignore[arg-type]
    feed = EventFeed(pipeline, SimpleNamespace(name="test"), logging.getLogger("test"))  # type: ignore[arg-type]
    events: List[SocketEvent] = [
        connect_event(1, "9.9.9.9"),
        connect_event(2, "1.1.1.1"),  # no answer for it, ever
        connect_event(3, "9.9.9.9"),
    ]
    handed = feed.handle(events)
    assert watch.catch_ups == 1  # for the whole batch, not per connection
    assert [(c.remote_domain, c.allowlisted) for c in handed] == [
        ("quad9.net", True),
        ("", False),
        ("quad9.net", True),
    ]
