"""How many remote addresses per second the classifier judges (issue 2), beside ``ipaddress``.

``python -m bench.classify_bench [--count N] [--repeats 5] [--no-write]``: no root needed.

The input is what the sampler hands ``Classifier.classify_int``: the integer of a remote
address decoded from a ``/proc/net/{tcp,udp}`` row (version 4) or a ``tcp6``/``udp6`` row
(version 6, IPv4-mapped ``::ffff:a.b.c.d`` included, as a dual-stack socket shows it), mixed
40% IPv4, 40% IPv6, 20% mapped, about half global and half private.

Measured, each as the median of ``--repeats`` passes over the same list:

- ``classify_int`` cached: a pool of 512 peers seen again and again (a host's steady state);
- ``classify_int`` uncached: every address distinct, a fresh ``Classifier`` per pass;
- ``classify`` on the text form (the CLI's and osquery constraint's path), distinct addresses;
- the reference: ``ipaddress.ip_address(text)`` parsing alone, ``ip_address(int)`` building an
  address object alone, and ``ip_address(int).is_global`` (the stdlib's own answer).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

from agent.classify import Classifier

Address = Tuple[int, int]  # (value, version) as classify_int takes it

MAPPED_PREFIX = 0xFFFF << 32


def _ipv4(rng: random.Random, external: bool) -> int:
    if external:
        # 8.0.0.0/7 and 64.0.0.0/2: public unicast, clear of the special-purpose registry
        return rng.choice((0x08000000 + rng.getrandbits(25), 0x40000000 + rng.getrandbits(30)))
    return rng.choice((0x0A000000 + rng.getrandbits(24), 0xC0A80000 + rng.getrandbits(16)))


def _ipv6(rng: random.Random, external: bool) -> int:
    if external:  # 2600::/12-ish: global unicast
        return (0x2600 << 112) | rng.getrandbits(108)
    return (0xFD << 120) | rng.getrandbits(120)  # fd00::/8 unique local


def addresses(count: int, seed: int = 6) -> List[Address]:
    """``count`` distinct (value, version) pairs in the mix described above."""
    rng = random.Random(seed)
    seen = set()
    out: List[Address] = []
    while len(out) < count:
        kind = rng.random()
        external = rng.random() < 0.5
        if kind < 0.4:
            item = (_ipv4(rng, external), 4)
        elif kind < 0.8:
            item = (_ipv6(rng, external), 6)
        else:
            item = (MAPPED_PREFIX | _ipv4(rng, external), 6)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def as_text(address: Address) -> str:
    value, version = address
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _best_rate(run: Callable[[], int], repeats: int) -> Tuple[float, float]:
    """Median and best addresses/second over ``repeats`` passes."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates), max(rates)


def measure(count: int, repeats: int) -> List[Tuple[str, float, float]]:
    distinct = addresses(count)
    texts = [as_text(a) for a in distinct]
    pool = addresses(512, seed=7)
    steady = [pool[i % len(pool)] for i in range(count)]
    warm = Classifier()
    for value, version in pool:
        warm.classify_int(value, version)

    def cached() -> int:
        classify_int = warm.classify_int
        for value, version in steady:
            classify_int(value, version)
        return len(steady)

    def uncached() -> int:
        classify_int = Classifier().classify_int
        for value, version in distinct:
            classify_int(value, version)
        return len(distinct)

    def from_text() -> int:
        classify = Classifier().classify
        for text in texts:
            classify(text)
        return len(texts)

    def parse_text() -> int:
        ip_address = ipaddress.ip_address
        for text in texts:
            ip_address(text)
        return len(texts)

    def build_from_int() -> int:
        v4, v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
        for value, version in distinct:
            v4(value) if version == 4 else v6(value)
        return len(distinct)

    def stdlib_is_global() -> int:
        v4, v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
        verdicts = [(v4(v) if version == 4 else v6(v)).is_global for v, version in distinct]
        return len(verdicts)

    cases = [
        ("classify_int, cached (512 peers)", cached),
        ("classify_int, uncached (distinct)", uncached),
        ("classify(text), uncached (distinct)", from_text),
        ("reference: ipaddress.ip_address(text) parse only", parse_text),
        ("reference: IPv4Address/IPv6Address(int) only", build_from_int),
        ("reference: IPv4Address/IPv6Address(int).is_global", stdlib_is_global),
    ]
    return [(label, *_best_rate(run, repeats)) for label, run in cases]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classify_bench", description=__doc__)
    parser.add_argument("--count", type=int, default=50000, help="addresses per pass (50000)")
    parser.add_argument("--repeats", type=int, default=5, help="passes per case (5)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeats < 1:
        parser.error("--count and --repeats must be at least 1")
    from bench.report import machine, markdown_table, text_table, write_section

    results = measure(args.count, args.repeats)
    header = ["case", "addresses/s (median)", "best", "us/address"]
    rows = [
        [label, f"{med:,.0f}", f"{best:,.0f}", f"{1e6 / med:.2f}"] for label, med, best in results
    ]
    print(text_table(header, rows))
    if not args.no_write:
        info = machine()
        body = "\n".join(
            [
                "## Classifier micro-benchmark (issue 2)",
                "",
                f"Run: `python -m bench.classify_bench {' '.join(argv or sys.argv[1:])}`; "
                f"{args.count} addresses per pass (40% IPv4, 40% IPv6, 20% IPv4-mapped, about "
                f"half global), median of {args.repeats} passes; {info['python']}, "
                f"{info['cpu']}, load average {info['load average']}.",
                "",
                markdown_table(header, rows),
            ]
        )
        write_section("classify", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
