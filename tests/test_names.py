"""The name cache: newest first, per namespace, TTLs and touches, its bounds, export and load.

Time is the cache's own ``clock`` argument set to a list's last value: the cache reads the
time only through it, so these tests need no sleeping and no timing.
"""

from __future__ import annotations

import ipaddress
import threading
import tracemalloc
from typing import List, Tuple

import pytest

from agent.collect.dns.cache import NameCache

NS, OTHER_NS = 4026532001, 4026532002
CDN = int(ipaddress.IPv4Address("151.101.2.132"))
CDN6 = int(ipaddress.IPv6Address("2a04:4e42::644"))
MAPPED = int(ipaddress.IPv6Address("::ffff:151.101.2.132"))
DEB = ("deb.debian.org", "debian.map.fastly.net")
PYPI = ("pypi.org", "dualstack.python.map.fastly.net")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = [now]

    def __call__(self) -> float:
        return self.now[-1]

    def advance(self, seconds: float) -> None:
        self.now.append(self.now[-1] + seconds)


def cache_with_clock(**bounds: int) -> Tuple[NameCache, Clock]:
    """A cache whose home namespace (the largest budget) is ``NS``."""
    clock = Clock()
    bounds.setdefault("home", NS)
    return NameCache(clock=clock, **bounds), clock  # type: ignore[arg-type]


def test_newest_answer_first_and_every_name() -> None:
    cache, clock = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 300)
    clock.advance(1)
    cache.add(NS, 4, CDN, PYPI, 300)
    assert cache.lookup(NS, 4, CDN) == "pypi.org"
    assert cache.names(NS, 4, CDN) == (*PYPI, *DEB)
    assert [entry.asked for entry in cache.entries(NS, 4, CDN)] == ["pypi.org", "deb.debian.org"]
    clock.advance(1)
    cache.add(NS, 4, CDN, DEB, 60)  # the same name again replaces its older answer
    assert cache.names(NS, 4, CDN) == (*DEB, *PYPI)
    assert len(cache) == 2
    assert cache.lookup(NS, 4, CDN + 1) is None and cache.names(NS, 6, CDN6) == ()


def test_namespaces_are_apart_and_mapped_addresses_are_their_ipv4() -> None:
    cache, _ = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 300)
    cache.add(OTHER_NS, 6, CDN6, PYPI, 300)
    assert cache.lookup(OTHER_NS, 4, CDN) is None
    assert cache.lookup(NS, 6, CDN6) is None
    assert cache.lookup(NS, 6, MAPPED) == "deb.debian.org"
    assert cache.lookup(OTHER_NS, 6, CDN6) == "pypi.org"
    cache.forget_namespace(NS)
    assert cache.lookup(NS, 4, CDN) is None and len(cache) == 1
    assert cache.namespaces() == {OTHER_NS}
    cache.add(NS, 4, CDN, DEB, 300)
    cache.retain_namespaces({NS})
    assert cache.namespaces() == {NS} and len(cache) == 1


def test_answers_live_for_their_ttl_but_at_least_the_minimum() -> None:
    cache, clock = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 0)  # TTL 0: still there for the next sample
    cache.add(NS, 4, CDN + 1, PYPI, 3600)
    clock.advance(cache.min_retention - 1)
    assert cache.lookup(NS, 4, CDN) == "deb.debian.org"
    clock.advance(2)
    assert cache.lookup(NS, 4, CDN) is None
    assert cache.lookup(NS, 4, CDN + 1) == "pypi.org"
    clock.advance(3600)
    assert cache.sweep() == 1 and len(cache) == 0


def test_a_live_connection_holds_its_names_past_the_ttl() -> None:
    cache, clock = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 30)
    cache.add(NS, 4, CDN + 1, PYPI, 30)
    for _ in range(100):  # a connection sampled every 5 s for 500 s
        clock.advance(5)
        assert cache.touch(NS, 4, CDN)
    assert cache.lookup(NS, 4, CDN) == "deb.debian.org"
    assert cache.lookup(NS, 4, CDN + 1) is None  # no connection: gone after its TTL
    assert not cache.touch(NS, 4, CDN + 1)
    clock.advance(cache.hold + 1)  # the connection closed: the hold runs out
    assert cache.lookup(NS, 4, CDN) is None


def test_least_recently_used_addresses_go_first() -> None:
    cache, _ = cache_with_clock(max_entries=3)
    for offset in range(3):
        cache.add(NS, 4, CDN + offset, (f"n{offset}.test",), 300)
    cache.touch(NS, 4, CDN)  # in use: now the most recent
    cache.add(NS, 4, CDN + 3, ("n3.test",), 300)
    assert cache.lookup(NS, 4, CDN) == "n0.test"
    assert cache.lookup(NS, 4, CDN + 1) is None
    assert len(cache) == 3 and cache.evicted == 1


def test_one_address_keeps_a_bounded_number_of_names() -> None:
    cache, clock = cache_with_clock(max_names_per_address=4)
    for index in range(10):
        clock.advance(1)
        cache.add(NS, 4, CDN, (f"site{index}.test",), 300)
    assert cache.names(NS, 4, CDN) == tuple(f"site{i}.test" for i in (9, 8, 7, 6))


def test_export_and_load_across_a_restart() -> None:
    cache, clock = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 300)
    clock.advance(1)
    cache.add(NS, 6, CDN6, PYPI, 300)
    clock.advance(1)
    cache.add(NS, 4, CDN, PYPI, 300)
    rows = cache.export()
    assert rows[0] == (
        NS,
        "151.101.2.132",
        "deb.debian.org debian.map.fastly.net",
        clock.now[0],
        300,
    )
    assert rows[1][1] == "2a04:4e42::644"
    assert all(isinstance(value, (int, float, str)) for row in rows for value in row)
    restarted = NameCache(clock=clock)
    assert restarted.load(rows) == 3
    assert restarted.names(NS, 4, CDN) == cache.names(NS, 4, CDN)
    assert restarted.entries(NS, 6, CDN6) == cache.entries(NS, 6, CDN6)
    clock.advance(400)
    assert NameCache(clock=clock).load(rows) == 0  # expired meanwhile


@pytest.mark.parametrize(
    "row",
    [
        (NS, "151.101.2.300", "a.test", 100.0, 300),
        (NS, CDN, "a.test", 100.0, 300),
        ("ns", "151.101.2.132", "a.test", 100.0, 300),
        (NS, "151.101.2.132", "", 100.0, 300),
        (NS, "151.101.2.132", "a..b", 100.0, 300),
        (NS, "151.101.2.132", "a.test\n", 100.0, 300),
        (NS, "151.101.2.132", "a.test", "yesterday", 300),
        (NS, "151.101.2.132", "a.test", 100.0, -1),
        (NS, "151.101.2.132", None, 100.0, 300),
        (NS, "151.101.2.132", "a.test"),
        "not a row",
    ],
)
def test_load_skips_what_it_cannot_trust(row: object) -> None:
    clock = Clock(now=100.0)
    cache = NameCache(clock=clock)
    assert cache.load([row]) == 0  # type: ignore[list-item]
    assert len(cache) == 0
    assert cache.load([(NS, "151.101.2.132", "a.test", 100.0, 300)]) == 1  # the sound one


def test_a_flood_of_answers_stays_within_the_bounds() -> None:
    """Unique hostile-sized answers far past the bounds: the entry count and the estimated
    bytes stay under them, the memory really held stays near the estimate, and a second
    flood as large as the first adds nothing."""
    bound = 1 << 20
    cache, _ = cache_with_clock(max_entries=100000, max_bytes=bound)
    long_chain = tuple(f"{'x' * 60}.{'y' * 60}.{'z' * 60}.{i}.test" for i in range(17))

    def flood(start: int) -> None:
        for index in range(start, start + 20000):
            chain = (f"n{index}.flood.test", *long_chain[: index % 17])
            cache.add(NS + index % 7, 4 if index % 2 else 6, index, chain, 300)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flood(0)
        after_one = tracemalloc.get_traced_memory()[0]
        flood(20000)
        after_two = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    whole = bound + 6 * cache.namespace_bytes  # NS is home: the others have budgets of their own
    assert cache.held(NS)[1] <= bound and cache.evicted > 0
    assert all(cache.held(NS + i)[1] <= cache.namespace_bytes for i in range(1, 7))
    assert cache.cost <= whole and len(cache) <= 100000
    assert after_one - before < 1.25 * whole
    assert after_two - after_one < 0.05 * whole


def test_the_estimate_is_at_least_what_python_holds() -> None:
    cache, _ = cache_with_clock(max_entries=10**6, max_bytes=10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(5000):
            cache.add(NS, 4, index, (f"host{index}.example.com", "edge.cdn.test"), 300)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.6 * cache.cost < used < 1.1 * cache.cost


def test_threads_may_add_and_read_at_once() -> None:
    cache, _ = cache_with_clock(max_entries=500)
    errors: List[BaseException] = []

    def writer(base: int) -> None:
        try:
            for index in range(3000):
                cache.add(NS, 4, base + index, (f"w{base}-{index}.test",), 300)
                cache.names(NS, 4, base + index // 2)
                cache.touch(NS, 4, base + index // 3)
        except BaseException as error:  # pragma: no cover - the failure being looked for
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(base,)) for base in (0, 10**6, 2 * 10**6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(cache) == 500
    held = [cache.entries(NS, 4, base + i) for base in (0, 10**6, 2 * 10**6) for i in range(3000)]
    assert sum(len(entries) for entries in held) == 500


# --- what a local user can send (issue 23) ------------------------------------------------------


def test_a_flood_in_one_namespace_never_evicts_another_namespaces_names() -> None:
    cache, _ = cache_with_clock(home=None)
    cache.add(NS, 4, CDN, DEB, 300)
    for index in range(5 * cache.namespace_entries):  # a container floods its own answers
        cache.add(OTHER_NS, 4, index, (f"n{index}.flood.test",), 300)
    assert cache.lookup(NS, 4, CDN) == "deb.debian.org"
    assert cache.held(OTHER_NS)[0] <= cache.namespace_entries
    assert cache.evicted >= 4 * cache.namespace_entries


def test_the_home_namespace_has_the_larger_budget() -> None:
    cache, _ = cache_with_clock(max_entries=1000, namespace_entries=10)
    for index in range(100):
        cache.add(NS, 4, index, (f"n{index}.test",), 300)
        cache.add(OTHER_NS, 4, index, (f"n{index}.test",), 300)
    assert cache.held(NS)[0] == 100 and cache.held(OTHER_NS)[0] == 10


def test_a_ttl_counts_for_an_hour_at_most() -> None:
    cache, clock = cache_with_clock()
    cache.add(NS, 4, CDN, DEB, 0x7FFFFFFF)  # 68 years, as a hostile answer may say
    (entry,) = cache.entries(NS, 4, CDN)
    assert entry.ttl == cache.max_ttl == 3600
    clock.advance(3601)
    assert cache.lookup(NS, 4, CDN) is None


def test_namespaces_past_the_cap_are_refused_until_one_empties() -> None:
    cache, clock = cache_with_clock(max_namespaces=3)
    for namespace in range(3):
        cache.add(NS + namespace, 4, CDN, DEB, 60)
    cache.add(NS + 3, 4, CDN, DEB, 300)
    assert cache.lookup(NS + 3, 4, CDN) is None and cache.refused == 1
    clock.advance(cache.min_retention + 61)
    assert cache.sweep() == 3 and not cache.namespaces()  # an empty namespace frees its place
    cache.add(NS + 3, 4, CDN, DEB, 300)
    assert cache.lookup(NS + 3, 4, CDN) == "deb.debian.org"
