"""Internal IPv4 traffic dropped in the kernel (issue 20): the filter expressions, and the
event source with real connections in test hosts.

The expressions are checked against the classifier by evaluating them as the kernel does
(``&&``, ``||``, ``!``, ``&`` and ``==`` mean the same in Python once spelt ``and``, ``or``,
``not``), on addresses at every block's edges and at random.  Then, as root, a real event source
watches a test host make loopback, private and global connections: the internal ones leave
nothing in Python but their connect (counted against ActiveOpens, never tracked), the global
ones arrive whole.  A kernel that refuses the expression (planted here: a field the event lacks,
which the kernel rejects for real) leaves the source on its plain filter, seeing everything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import time
from typing import Dict, Iterator, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nethost import NetHost

from agent.classify import Classifier
from agent.collect.events import EventKind, SocketEvent
from agent.collect.kernel import kfilter
from agent.collect.kernel import source as source_module
from agent.collect.kernel.reader import TCP_FILTER
from agent.collect.kernel.records import TcpStateChange
from agent.collect.kernel.source import KernelEventSource, open_event_source
from agent.inet import AF_INET, AF_INET6

PREFIX = os.environ.get("NETHOST_PREFIX", "eat")
INSTANCE_PREFIX = f"egress-agent-{PREFIX}k"
BLOCKS = Classifier().never_external()
TCP_CLOSE, TCP_SYN_SENT, TCP_ESTABLISHED, TCP_SYN_RECV, TCP_LISTEN = 7, 2, 1, 3, 10


def evaluate(expression: str, **fields: int) -> bool:
    """``expression`` as the kernel's filter would decide it for an event with ``fields``."""
    python = expression.replace("&&", " and ").replace("||", " or ")
    python = re.sub(r"!(?!=)", " not ", python)
    return bool(eval(python, {"__builtins__": {}}, dict(fields)))  # noqa: S307 (our own text)


def daddr_field(text: str) -> int:
    return kfilter.host_order(int(ipaddress.ip_address(text)))


NETWORKS = [ipaddress.ip_network((network, length)) for v, network, length in BLOCKS if v == 4]


def internal(text: str) -> bool:
    """In a block the classifier never calls external (by :mod:`ipaddress`, not our code)."""
    return any(ipaddress.ip_address(text) in network for network in NETWORKS)


EDGES = (
    [
        str(ipaddress.ip_network((network, length))[index])
        for version, network, length in BLOCKS
        if version == 4
        for index in (0, -1)
    ]
    + [
        str(ipaddress.ip_network((network, length))[0] - 1)
        for version, network, length in BLOCKS
        if version == 4 and network
    ]
    + [
        str(ipaddress.ip_network((network, length))[-1] + 1)
        for version, network, length in BLOCKS
        if version == 4
    ]
)


@pytest.mark.parametrize("address", [*EDGES, "9.9.9.9", "1.1.1.1", "172.15.255.255"])
def test_the_expression_drops_exactly_the_never_external_blocks(address: str) -> None:
    test = kfilter.internal_test("daddr", BLOCKS)
    assert test is not None
    assert evaluate(test, daddr=daddr_field(address)) == internal(address)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_the_expression_agrees_with_the_classifier_anywhere(value: int) -> None:
    test = kfilter.internal_test("daddr", BLOCKS)
    assert test is not None
    address = str(ipaddress.IPv4Address(value))
    assert evaluate(test, daddr=kfilter.host_order(value)) == internal(address)
    assert kfilter.dropped_after_connect(BLOCKS)(AF_INET, value.to_bytes(4, "big")) == internal(
        address
    )


def test_configured_internal_networks_join_the_blocks() -> None:
    blocks = Classifier([ipaddress.ip_network("9.9.0.0/16")]).never_external()
    test = kfilter.internal_test("dst", blocks)
    assert test is not None
    assert evaluate(test, dst=daddr_field("9.9.9.9"))
    assert not evaluate(test, dst=daddr_field("9.8.9.9"))


def state_filter() -> str:
    dropping = kfilter.drop_internal("sock", "inet_sock_set_state", TCP_FILTER, BLOCKS)
    assert dropping is not None
    return dropping


@pytest.mark.parametrize(
    ("old", "new", "family", "address", "kept"),
    [
        (TCP_CLOSE, TCP_SYN_SENT, AF_INET, "127.0.0.1", True),  # the connect: counted
        (TCP_SYN_SENT, TCP_ESTABLISHED, AF_INET, "127.0.0.1", False),
        (TCP_ESTABLISHED, TCP_CLOSE, AF_INET, "10.1.2.3", False),
        (TCP_LISTEN, TCP_SYN_RECV, AF_INET, "192.168.1.1", False),  # accepted from inside
        (TCP_LISTEN, TCP_SYN_RECV, AF_INET, "9.9.9.9", True),  # accepted from outside
        (TCP_CLOSE, TCP_LISTEN, AF_INET, "0.0.0.0", True),  # a listener's own transitions
        (TCP_LISTEN, TCP_CLOSE, AF_INET, "0.0.0.0", True),
        (TCP_SYN_SENT, TCP_ESTABLISHED, AF_INET, "9.9.9.9", True),
        (TCP_SYN_SENT, TCP_ESTABLISHED, AF_INET6, "127.0.0.6", True),  # every native IPv6
        (TCP_SYN_SENT, TCP_ESTABLISHED, AF_INET6, "0.0.0.0", True),  # ... where left unset (6.18)
        (TCP_SYN_SENT, TCP_ESTABLISHED, AF_INET6, "127.0.0.1", False),  # ::ffff:127.0.0.1
    ],
)
def test_which_transitions_the_state_filter_keeps(
    old: int, new: int, family: int, address: str, kept: bool
) -> None:
    fields = dict(protocol=6, oldstate=old, newstate=new, family=family, daddr=daddr_field(address))
    assert evaluate(state_filter(), **fields) == kept


def test_events_without_an_address_keep_their_filters() -> None:
    filters = ("iif == 1", "")
    assert kfilter.with_internal_dropped("sched", "sched_process_exec", filters, BLOCKS) == filters
    assert kfilter.with_internal_dropped("fib", "fib_table_lookup", filters, ()) == filters
    dropping = kfilter.with_internal_dropped("fib", "fib_table_lookup", filters, BLOCKS)
    assert dropping[1:] == ("iif == 1", dropping[2], "")
    assert dropping[0].startswith("(iif == 1) && !(")


# -- the kernel ----------------------------------------------------------------------------------

SERVER, CLIENT = "9.9.9.9", "9.9.9.2"
SERVER6, CLIENT6 = "2001:4860:4863::9", "2001:4860:4863::2"
PRIVATE_SERVER, PRIVATE_CLIENT = "10.77.0.1", "10.77.0.2"
COUNT = 200


@pytest.fixture
def rooted() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: tracefs and network namespaces")


def open_source(**options: object) -> KernelEventSource:
    return open_event_source(prefix=INSTANCE_PREFIX, udp=False, **options)  # type: ignore[arg-type]


def connect_many(net: NetHost, namespace: object, address: str, port: int, count: int) -> int:
    """``count`` TCP connections from ``namespace`` to ``address`` by one process; its pid."""
    script = (
        "import socket, sys\n"
        f"for _ in range({count}):\n"
        f"    socket.create_connection(({address!r}, {port})).close()\n"
        "print('READY', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = net.spawn(namespace, [sys.executable, "-c", script], ready=True)  # type: ignore[arg-type]
    return proc.pid


def poll_for(source: KernelEventSource, seconds: float) -> List[object]:
    events: List[object] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events.extend(source.poll(0.2))
    return events


def test_internal_connections_stop_in_the_kernel(rooted: None, nethost: NetHost) -> None:
    srv, cli = nethost.namespace("ksrv"), nethost.namespace("kcli")
    nethost.veth(srv, "ks0", cli, "kc0")
    for namespace, device, addresses in (
        (srv, "ks0", (SERVER, PRIVATE_SERVER, SERVER6)),
        (cli, "kc0", (CLIENT, PRIVATE_CLIENT, CLIENT6)),
    ):
        for text in addresses:
            length = 64 if ":" in text else 24
            namespace.add_address(nethost.name(device), f"{text}/{length}")
    loopback = nethost.listen(cli, "127.0.0.1")
    private = nethost.listen(srv, PRIVATE_SERVER)
    public = nethost.listen(srv, SERVER)
    public6 = nethost.listen(srv, SERVER6)
    source = open_source(drop_internal=BLOCKS)
    try:
        assert "sock:inet_sock_set_state" in source.kernel_filter
        raw: List[TcpStateChange] = []
        feed = source.tracker.feed

        def spy(records: List[object]) -> List[SocketEvent]:
            raw.extend(r for r in records if isinstance(r, TcpStateChange))
            return feed(records)  # type: ignore[arg-type]

        source.tracker.feed = spy  # type: ignore[method-assign]
        poll_for(source, 0.5)
        connects_before = source.connects_by_namespace().get(cli.inode, 0)
        inside = [
            connect_many(nethost, cli, "127.0.0.1", loopback.port, COUNT),
            connect_many(nethost, cli, PRIVATE_SERVER, private.port, COUNT),
        ]
        outside = connect_many(nethost, cli, SERVER, public.port, 3)
        outside6 = connect_many(nethost, cli, SERVER6, public6.port, 3)  # a native IPv6 socket
        events = poll_for(source, 3.0)
        assert [e for e in events if e.identity.pid in inside] == [], "internal rows came out"
        for pid in (outside, outside6):
            kinds = [str(e.kind) for e in events if e.identity.pid == pid]
            for kind in (EventKind.CONNECT, EventKind.ESTABLISHED, EventKind.CLOSED):
                assert kinds.count(str(kind)) == 3, kinds
        # every connect is counted (the audit's coverage) ...
        counted = source.connects_by_namespace().get(cli.inode, 0) - connects_before
        assert counted == 2 * COUNT + 6
        # ... and of the internal connections (unfiltered: connect, established, close on the
        # client, accept and close on the server) only the connects reached Python
        ports = {loopback.port, private.port}
        internal_raw = [(r.oldstate, r.newstate) for r in raw if ports & {r.dport, r.sport}]
        assert internal_raw == [(TCP_CLOSE, TCP_SYN_SENT)] * (2 * COUNT)
        assert all(
            s.remote_port in (public.port, public6.port)
            for s in source.tracker.sockets.values()
            if s.netns == cli.inode
        )
    finally:
        source.close()


def test_a_kernel_that_refuses_the_expression_sees_everything(
    rooted: None, nethost: NetHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dropping expression is replaced by one naming a field the event lacks, which the
    kernel refuses: the source falls back to its plain filter and tracks internal ones too."""

    def refused(system: str, name: str, filters: object, blocks: object) -> tuple:
        plain = tuple(filters)  # type: ignore[call-overload]
        if (system, name) == ("sock", "inet_sock_set_state"):
            return ("no_such_field & 0x1", *plain)
        return plain

    monkeypatch.setattr(source_module, "with_internal_dropped", refused)
    cli = nethost.namespace("kfb")
    loopback = nethost.listen(cli, "127.0.0.1")
    source = open_source(drop_internal=BLOCKS)
    try:
        assert source.kernel_filter.startswith("none")
        assert source.tracker.dropped_in_kernel is None
        poll_for(source, 0.5)
        pid = connect_many(nethost, cli, "127.0.0.1", loopback.port, 5)
        events = poll_for(source, 2.0)
        seen: Dict[str, int] = {}
        for event in events:
            if event.identity.pid == pid:  # type: ignore[attr-defined]
                seen[str(event.kind)] = seen.get(str(event.kind), 0) + 1  # type: ignore[attr-defined]
        assert seen.get("connect") == 5 and seen.get("closed") == 5
    finally:
        source.close()


@pytest.fixture(autouse=True)
def _no_leftover_instance() -> Iterator[None]:
    yield
    root = "/sys/kernel/tracing/instances"
    if os.path.isdir(root):
        mine = [n for n in os.listdir(root) if n.startswith(INSTANCE_PREFIX + "-")]
        assert not mine, f"instances left behind: {mine}"
