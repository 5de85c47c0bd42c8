"""Drop internal IPv4 traffic in the kernel: tracefs filter expressions built from the blocks
that are never external.

A connection to 127.0.0.1 or 10.1.2.3 can never be an external one, yet without a filter each
of its state changes is copied into the ring buffer, read, decoded, tracked and judged in
Python, only to be thrown away: 115-126 us of the agent's CPU per connection (issue 20).  The
kernel's event filter (``Documentation/trace/events.rst``, "Event filtering") runs on every
event before it is written, so an event it rejects costs nothing after that.

The filter language has no array indexing, but a 4-byte field such as
``inet_sock_set_state.daddr`` (``__u8[4]``) is compared as one 32-bit integer in host order
(``select_comparison_fn`` in ``kernel/trace/trace_events_filter.c`` picks by field size), and
``field & MASK`` is true when any bit of ``MASK`` is set.  A prefix ``P/len`` is then the
conjunction of one test per set bit (``daddr & BIT``) and one test for all its clear bits
(``!(daddr & ZEROS)``): 127.0.0.0/8 is eight tests, 192.168.0.0/16 eight.

What it cannot drop, and leaves to the Python path (which judges every address anyway):
- IPv6: ``daddr_v6`` is 16 bytes, which the filter cannot compare (``::1``, ``fd00::/8``,
  ``fe80::/10`` still reach Python; an eBPF program could, see ``docs/EVENTS.md``);
- a native IPv6 socket carries ``daddr`` = 127.0.0.6 (``LOOPBACK4_IPV6``, set by
  ``tcp_v6_connect``), so 127.0.0.6 on an ``AF_INET6`` socket is never dropped, lest every
  IPv6 connection go with it; IPv4-mapped connections carry their real IPv4 ``daddr``;
- a listener's own transitions (to and from ``LISTEN``: ``daddr`` 0.0.0.0), which the tracker
  needs to know its listeners;
- the connect itself (CLOSE -> SYN_SENT): one event per internal connection still arrives, so
  that every connect is counted against the kernel's ``ActiveOpens`` (the audit's coverage);
  the tracker counts it and keeps no state for it (:func:`dropped_after_connect`), since
  nothing more of that socket will come.  Every other transition of an internal IPv4
  connection (established, closed, and the whole of an accepted one) is dropped.

Kernel needs: ``!`` in filters (4.17 and later accept it; RHEL 8's 4.18 does).  A kernel that
refuses the expression gets the next filter of the event's list, without the drop, and the
agent says so (``KernelEventSource.kernel_filter``).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

Prefix = Tuple[int, int, int]
"""(IP version, network address as an integer, prefix length)"""

AF_INET6 = 10
LOOPBACK4_IPV6 = 0x7F000006
"""127.0.0.6: the ``inet_daddr`` of every native IPv6 socket (``include/net/inet_sock.h``)."""
TCP_SYN_SENT = 2
TCP_CLOSE = 7
TCP_LISTEN = 10

ADDRESS_FIELDS = {
    ("sock", "inet_sock_set_state"): "daddr",
    ("fib", "fib_table_lookup"): "dst",
}
"""The events whose IPv4 destination a filter can test, and the field that holds it."""


def _host_bit(bit: int) -> int:
    """The bit of the field, read as a host-order u32, that holds bit ``bit`` of the address
    (0 = the most significant bit of the first octet)."""
    if sys.byteorder == "little":
        return 8 * (bit // 8) + 7 - bit % 8
    return 31 - bit


def host_order(address: int) -> int:
    """The value a 4-byte address field reads as (``address`` in network order as an int)."""
    return int.from_bytes(address.to_bytes(4, "big"), sys.byteorder)


def prefix_test(field: str, network: int, length: int) -> Optional[str]:
    """The filter expression true for the addresses of ``network/length`` in ``field``; None for
    a zero-length prefix (every address: no test to write)."""
    if length <= 0:
        return None
    zeros = 0
    tests: List[str] = []
    for bit in range(min(length, 32)):
        mask = 1 << _host_bit(bit)
        if network >> (31 - bit) & 1:
            tests.append(f"{field} & {mask:#x}")
        else:
            zeros |= mask
    if zeros:
        tests.insert(0, f"!({field} & {zeros:#x})")
    return "(" + " && ".join(tests) + ")"


def internal_test(field: str, blocks: Iterable[Prefix]) -> Optional[str]:
    """True for an IPv4 address in ``field`` that lies in any IPv4 block of ``blocks``."""
    tests = []
    for version, network, length in blocks:
        if version != 4:
            continue
        test = prefix_test(field, network, length)
        if test is None:
            return None  # 0.0.0.0/0 internal: nothing IPv4 is external; keep the plain path
        tests.append(test)
    if not tests:
        return None
    return "(" + " || ".join(tests) + ")"


def drop_internal(system: str, name: str, base: str, blocks: Sequence[Prefix]) -> Optional[str]:
    """``base`` (the event's own filter, "" for none) with the events of internal IPv4
    destinations dropped, or None when this event has no destination to test."""
    field = ADDRESS_FIELDS.get((system, name))
    if field is None:
        return None
    internal = internal_test(field, blocks)
    if internal is None:
        return None
    if system == "sock":
        keep_listener = (
            f"newstate == {TCP_LISTEN} || (oldstate == {TCP_LISTEN} && newstate == {TCP_CLOSE})"
            f" || (oldstate == {TCP_CLOSE} && newstate == {TCP_SYN_SENT})"
        )
        ipv6_socket = f"(family == {AF_INET6} && {field} == {host_order(LOOPBACK4_IPV6):#x})"
        drop = f"{internal} && !({keep_listener}) && !{ipv6_socket}"
    else:
        drop = internal
    return f"({base}) && !({drop})" if base else f"!({drop})"


def dropped_after_connect(blocks: Sequence[Prefix]) -> Callable[[int, bytes], bool]:
    """Whether the kernel drops the events after the connect of a socket of ``family`` whose
    ``daddr`` (the 4-byte IPv4 field) is the given one: the filter of :func:`drop_internal`,
    in Python, for the tracker."""
    networks = [
        (network >> (32 - length), 32 - length)
        for version, network, length in blocks
        if version == 4 and length > 0
    ]
    ipv6_placeholder = LOOPBACK4_IPV6.to_bytes(4, "big")

    def dropped(family: int, daddr: bytes) -> bool:
        if family == AF_INET6 and daddr == ipv6_placeholder:
            return False
        address = int.from_bytes(daddr, "big")
        return any(address >> shift == top for top, shift in networks)

    return dropped


def with_internal_dropped(
    system: str, name: str, filters: Sequence[str], blocks: Sequence[Prefix]
) -> Tuple[str, ...]:
    """An event's filters, best first, with a dropping variant before each that has one: a
    kernel that refuses the longer expression falls back to the event's own."""
    if not blocks:
        return tuple(filters)
    candidates: List[str] = []
    for base in filters:
        dropping = drop_internal(system, name, base, blocks)
        if dropping is not None and dropping not in candidates:
            candidates.append(dropping)
        if base not in candidates:
            candidates.append(base)
    return tuple(candidates)
