"""The DNS watch on real packets in test hosts: our own DNS servers answer our own clients.

Topology (``$NETHOST_PREFIX``-named namespaces; nothing leaves them)::

    cli1 10.53.1.2, fd53:1::2  <-> s1  srv  s2 <->  10.53.2.2 cli2
                                   10.53.1.1, fd53:1::1: a DNS server (zone ONE)
                                   10.53.2.1: another DNS server (zone TWO)
                                   lo: 151.101.2.132, 151.101.66.132, 2a04:4e42::644
                                       (the "internet": one TCP listener on all of them)

The clients send their own queries (``bench.dnsload`` stub: UDP, then TCP when the answer is
truncated) and then connect to the answer.  Assertions look only at our namespaces'
mappings and counters, so the host's own DNS traffic (and other developers') is no matter.
The packet-level edge cases (TCP segments out of order, retransmitted, floods of flows) are
fed to :class:`AnswerTracker` as packets built here, since no socket API makes them on demand.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
from typing import Tuple

import pytest
from conftest import run_as_nobody
from dnshost import FASTLY, ONE, TWO, DnsHost, LateWatch, address, resolve, wait_for

from agent.allow import annotate
from agent.classify import Classifier
from agent.collect.dns.answers import MAX_ANSWERS_TAKEN, AnswerTracker
from agent.collect.dns.cache import NameCache
from agent.collect.dns.filter import PACKET_HOST, PACKET_OUTGOING, dns_filter
from agent.collect.dns.watch import DnsWatch
from agent.collect.sockets.sampler import LinuxSampler as Sampler
from agent.config import parse_settings, parse_yaml
from bench.dnsload import TYPE_A, ipv4_packet, query, response


def test_an_answer_over_udp_names_the_address_the_client_connects_to(dns_host: DnsHost) -> None:
    watch = dns_host.watch()
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    assert resolve(stub, "10.53.1.1", "Deb.Debian.Org") == ("udp", ["151.101.2.132"])
    client = dns_host.net.connect(cli1, "151.101.2.132", dns_host.web_port)
    version, value = address("151.101.2.132")
    wait_for(lambda: watch.cache.lookup(cli1.inode, version, value), "the name is known")
    assert watch.cache.lookup(cli1.inode, version, value) == "deb.debian.org"
    assert watch.cache.names(cli1.inode, version, value) == ("deb.debian.org", FASTLY)
    (entry,) = watch.cache.entries(cli1.inode, version, value)
    assert entry.ttl == 300 and entry.chain == ("deb.debian.org", FASTLY)
    counters = watch.counters(cli1.inode)
    assert counters.queries == 1 and counters.accepted == 1 and counters.answers == 1
    assert counters.unsolicited == 0 and counters.errors == 0

    # the real record of that connection, as the sampler reports it, against a domains rule
    rows = Sampler(Classifier()).sample(pids=[client.pid])
    (row,) = [r for r in rows if r.remote_port == dns_host.web_port]
    assert row.net_namespace == cli1.inode and row.remote_address == "151.101.2.132"
    assert watch.cache.touch(cli1.inode, version, value)
    rules = parse_settings(
        parse_yaml("allow:\n  - {comment: mirrors, domains: '*.debian.org'}\n", "t.yaml"), "t.yaml"
    ).allow
    annotate(rules, [row])
    assert not row.allowlisted  # no names given: unexpected, as `check` would say (exit 1)
    annotate(rules, [row], watch.cache.names)
    assert row.allowlisted and row.allow_rule == "mirrors"  # allowlisted (exit 0)


def test_catch_up_reads_what_the_sockets_hold(dns_host: DnsHost) -> None:
    """An answer the client got is queued on our socket already: after ``catch_up`` it is in
    the cache, with no waiting on the watch's own pace."""
    watch = dns_host.watch()
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    assert resolve(stub, "10.53.1.1", "deb.debian.org")[1] == ["151.101.2.132"]
    assert watch.catch_up(10)
    assert watch.cache.lookup(cli1.inode, *address("151.101.2.132")) == "deb.debian.org"
    watch.stop()
    assert not watch.catch_up(10)  # no thread to catch up with: at once, not after 10 s


def test_a_nameless_connection_is_looked_up_again_after_catching_up() -> None:
    from agent.pipeline.domains import DomainNames
    from agent.records import Connection

    cache = NameCache()
    _, value = address("151.101.2.132")
    late = LateWatch(cache, 4026532001, "151.101.2.132", "deb.debian.org")
    names = DomainNames(cache, late)  # type: ignore[arg-type]
    connection = Connection(
        remote_address="151.101.2.132", address_int=str(value), net_namespace=4026532001
    )
    names.annotate([connection])
    assert connection.remote_domain == "deb.debian.org" and late.catch_ups == 1
    again = Connection(
        remote_address="151.101.2.132", address_int=str(value), net_namespace=4026532001
    )
    names.annotate([again])
    assert again.remote_domain == "deb.debian.org" and late.catch_ups == 1  # named: no wait


def test_a_truncated_answer_retried_over_tcp(dns_host: DnsHost) -> None:
    watch = dns_host.watch()
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    assert resolve(stub, "10.53.1.1", "big.test") == ("tcp", ["151.101.66.132"])
    version, value = address("151.101.66.132")
    wait_for(lambda: watch.cache.lookup(cli1.inode, version, value), "the TCP answer's name")
    assert watch.cache.names(cli1.inode, version, value) == ("big.test", "large.cdn.test")
    counters = watch.counters(cli1.inode)
    assert counters.tcp_messages == 2  # the query and the answer, each reassembled
    assert counters.accepted == 2  # the truncated UDP answer and the TCP one
    assert counters.tcp_dropped == 0


def test_aaaa_over_ipv6(dns_host: DnsHost) -> None:
    watch = dns_host.watch()
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    assert resolve(stub, "fd53:1::1", "deb.debian.org", "aaaa") == ("udp", ["2a04:4e42::644"])
    version, value = address("2a04:4e42::644")
    wait_for(lambda: watch.cache.lookup(cli1.inode, version, value), "the AAAA answer's name")
    assert watch.cache.lookup(cli1.inode, version, value) == "deb.debian.org"


def test_two_namespaces_keep_their_answers_apart(dns_host: DnsHost) -> None:
    watch = dns_host.watch()
    (cli1, cli2), (stub1, stub2) = dns_host.clients, dns_host.stubs
    assert resolve(stub1, "10.53.1.1", "deb.debian.org")[1] == ["151.101.2.132"]
    assert resolve(stub2, "10.53.2.1", "deb.debian.org")[1] == ["151.101.66.132"]
    one, two = address("151.101.2.132"), address("151.101.66.132")
    wait_for(lambda: watch.cache.lookup(cli2.inode, *two), "cli2's answer")
    wait_for(lambda: watch.cache.lookup(cli1.inode, *one), "cli1's answer")
    assert watch.cache.lookup(cli1.inode, *two) is None
    assert watch.cache.lookup(cli2.inode, *one) is None
    assert watch.cache.lookup(dns_host.srv.inode, *one) is None  # the server asked nothing


def test_a_namespace_made_later_is_watched_and_one_gone_is_closed(dns_host: DnsHost) -> None:
    watch = dns_host.watch(rescan_interval=0.2)  # finds new namespaces by itself
    cli3, stub3 = dns_host.add_client("cli3", 3)
    dns_host.serve(dns_host.srv, "10.53.3.1", TWO)
    wait_for(lambda: cli3.inode in watch.watched(), "the new namespace watched")
    assert resolve(stub3, "10.53.3.1", "deb.debian.org")[1] == ["151.101.66.132"]
    wait_for(lambda: watch.cache.lookup(cli3.inode, *address("151.101.66.132")), "its answer")

    explicit = dns_host.watch(rescan_interval=0)  # only when asked
    cli4, _ = dns_host.add_client("cli4", 4)
    time.sleep(0.3)
    assert cli4.inode not in explicit.watched()
    explicit.rescan()
    wait_for(lambda: cli4.inode in explicit.watched(), "the namespace watched once asked")

    dns_host.net.kill(stub3)  # the only process of cli3
    dns_host.net.namespaces.remove(cli3)
    inode = cli3.inode
    dns_host.net.links.remove(dns_host.net.name("s3"))
    subprocess.run(["ip", "netns", "del", cli3.name], check=True, capture_output=True)
    wait_for(lambda: inode not in watch.watched(), "the gone namespace closed")
    assert watch.cache.lookup(inode, *address("151.101.66.132")) is None


def test_answers_nobody_asked_for_are_dropped(dns_host: DnsHost) -> None:
    """Anyone who can reach the host can send a packet from port 53; only answers to queries
    seen leaving the namespace count (RFC 5452 section 3)."""
    watch = dns_host.watch()
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    server = dns_host.servers[0]
    assert server.popen.stdin is not None
    server.popen.stdin.write("spoof 10.53.1.2 40000 evil.test 151.101.2.132\n")
    server.popen.stdin.flush()
    assert server.line(30) == "SPOOFED"
    assert resolve(stub, "10.53.1.1", "deb.debian.org")[1] == ["151.101.2.132"]
    one = address("151.101.2.132")
    wait_for(lambda: watch.cache.lookup(cli1.inode, *one), "the real answer")  # after the spoof
    assert watch.cache.names(cli1.inode, *one) == ("deb.debian.org", FASTLY)
    counters = watch.counters(cli1.inode)
    assert counters.unsolicited == 1 and counters.accepted == 1


def test_loopback_answers_count_once(dns_host: DnsHost) -> None:
    """A resolver on the namespace's own loopback (systemd-resolved's 127.0.0.53): loopback
    shows each packet sent and received; the query counts once, and its answer once."""
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    dns_host.serve(cli1, "127.0.0.53", ONE)
    watch = dns_host.watch()
    assert resolve(stub, "127.0.0.53", "deb.debian.org")[1] == ["151.101.2.132"]
    wait_for(lambda: watch.cache.lookup(cli1.inode, *address("151.101.2.132")), "the answer")
    counters = watch.counters(cli1.inode)
    assert counters.packets == 2  # the query sent, the answer received; the copies dropped
    assert counters.queries == 1 and counters.responses == 1 and counters.accepted == 1


def test_an_unsolicited_answer_on_loopback_is_not_taken(dns_host: DnsHost) -> None:
    """Any process of a namespace can send to its loopback (issue 23): an answer from port 53
    to a loopback port that asked nothing is dropped like one from the network."""
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    local = dns_host.serve(cli1, "127.0.0.53", ONE)
    watch = dns_host.watch()
    assert local.popen.stdin is not None
    local.popen.stdin.write("spoof 127.0.0.1 40000 evil.test 151.101.66.132\n")
    local.popen.stdin.flush()
    assert local.line(30) == "SPOOFED"
    assert resolve(stub, "127.0.0.53", "deb.debian.org")[1] == ["151.101.2.132"]
    one, spoofed = address("151.101.2.132"), address("151.101.66.132")
    wait_for(lambda: watch.cache.lookup(cli1.inode, *one), "the real answer")  # after the spoof
    assert watch.cache.lookup(cli1.inode, *spoofed) is None
    counters = watch.counters(cli1.inode)
    assert counters.unsolicited == 1 and counters.accepted == 1


def _iptables(namespace: str, *rule: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace, "iptables", "-w", "-t", "nat", "-A", *rule],
        check=True,
        capture_output=True,
    )


def test_a_loopback_server_behind_nat_is_matched_by_its_address(dns_host: DnsHost) -> None:
    """Docker's embedded server: the client asks 127.0.0.11:53, NAT rules send the query to
    the port the server really has and the answer back from port 53 (the rules Docker writes
    in each container's namespace, here with iptables in a client namespace)."""
    if shutil.which("iptables") is None:
        pytest.skip("needs iptables (Debian's iptables package) for the NAT rules")
    cli1, stub = dns_host.clients[0], dns_host.stubs[0]
    dns_host.serve(cli1, "127.0.0.11", ONE, port=5353)
    _iptables(
        cli1.name,
        "OUTPUT",
        "-d",
        "127.0.0.11",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "DNAT",
        "--to-destination",
        "127.0.0.11:5353",
    )
    _iptables(
        cli1.name,
        "POSTROUTING",
        "-s",
        "127.0.0.11",
        "-p",
        "udp",
        "--sport",
        "5353",
        "-j",
        "SNAT",
        "--to-source",
        ":53",
    )
    watch = dns_host.watch()
    assert resolve(stub, "127.0.0.11", "deb.debian.org")[1] == ["151.101.2.132"]
    wait_for(lambda: watch.cache.lookup(cli1.inode, *address("151.101.2.132")), "the answer")
    counters = watch.counters(cli1.inode)
    assert counters.queries == 1 and counters.accepted == 1 and counters.unsolicited == 0


def test_a_flood_in_one_namespace_leaves_another_namespaces_names(dns_host: DnsHost) -> None:
    """A container (here cli1) floods answers of its own: cli2's names stay (issue 23: one
    cache for every namespace let the flood evict them, and ``domains`` rules stopped
    matching)."""
    cache = NameCache(max_entries=200)
    watch = dns_host.watch(cache)
    (cli1, cli2), (_, stub2) = dns_host.clients, dns_host.stubs
    assert resolve(stub2, "10.53.2.1", "deb.debian.org")[1] == ["151.101.66.132"]
    two = address("151.101.66.132")
    wait_for(lambda: cache.lookup(cli2.inode, *two), "cli2's answer")
    argv = [sys.executable, "-m", "bench.dnsload", "flood", "10.53.1.1", "1500", "1"]
    flood = dns_host.net.spawn(cli1, argv, ready=True)
    assert flood.popen.stdin is not None
    flood.popen.stdin.write("go\n")
    flood.popen.stdin.flush()
    line = flood.line(30)
    assert line is not None, "the flood did not finish"
    done = line.split()
    assert done[0] == "DONE" and int(done[2]) > 1000, done
    wait_for(lambda: watch.counters(cli1.inode).answers >= int(done[2]) - 20, "the answers seen")
    assert cache.held(cli1.inode)[0] <= cache.namespace_entries and cache.evicted >= 800
    assert cache.lookup(cli2.inode, *two) == "deb.debian.org"


def test_a_flood_of_real_answers_stays_within_the_bound(dns_host: DnsHost) -> None:
    cache = NameCache(max_entries=200)
    watch = dns_host.watch(cache)
    cli1 = dns_host.clients[0]
    argv = [sys.executable, "-m", "bench.dnsload", "flood", "10.53.1.1", "1500", "1"]
    flood = dns_host.net.spawn(cli1, argv, ready=True)
    assert flood.popen.stdin is not None
    flood.popen.stdin.write("go\n")
    flood.popen.stdin.flush()
    line = flood.line(30)
    assert line is not None, "the flood did not finish"
    done = line.split()
    assert done[0] == "DONE" and int(done[2]) > 1000, done
    wait_for(lambda: watch.counters(cli1.inode).answers >= int(done[2]) - 20, "the answers seen")
    assert len(cache) <= 200 and cache.evicted >= 800
    assert watch.tracker.pending <= 10  # every query got its answer


def test_without_root_the_watch_says_why_and_does_nothing() -> None:
    NameCache()  # imports warmed up before becoming nobody

    def as_nobody() -> Tuple[bool, str, object]:
        cache = NameCache()
        watch = DnsWatch(cache)
        started = watch.start()
        watch.rescan()
        watch.close()
        return started, watch.unavailable, cache.lookup(1, 4, 1)

    started, reason, looked_up = run_as_nobody(as_nobody)
    assert started is False and looked_up is None
    assert reason == "DNS names off: AF_PACKET sockets need CAP_NET_RAW (run as root)"


# --- packet-level edge cases, fed to the tracker ----------------------------------------------

NS = 4026534001
NOW = time.time()  # the cache expires answers against the real clock
CLIENT, SERVER = bytes([10, 53, 9, 2]), bytes([10, 53, 9, 1])


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def test_tcp_segments_out_of_order_and_retransmitted() -> None:
    cache = NameCache()
    tracker = AnswerTracker(cache)

    def out(l4: bytes) -> None:
        tracker.packet(NS, ipv4_packet(CLIENT, SERVER, 6, l4), PACKET_OUTGOING, False, NOW)

    def back(l4: bytes) -> None:
        tracker.packet(NS, ipv4_packet(SERVER, CLIENT, 6, l4), PACKET_HOST, False, NOW)

    asked = framed(query(77, "split.test"))
    out(tcp(41000, 53, 1000, 0x02))
    back(tcp(53, 41000, 5000, 0x12))
    out(tcp(41000, 53, 1001, 0x18, asked[:1]))  # the length split from the message
    out(tcp(41000, 53, 1002, 0x18, asked[1:]))
    answer = framed(response(77, "split.test", TYPE_A, ["cdn.test"], ["151.101.9.9"]))
    third = len(answer) // 3
    back(tcp(53, 41000, 5001 + third, 0x18, answer[third : 2 * third]))  # ahead of a gap
    back(tcp(53, 41000, 5001, 0x18, answer[:third]))  # the gap fills
    back(tcp(53, 41000, 5001, 0x18, answer[: third + 5]))  # a retransmission, overlapping
    back(tcp(53, 41000, 5001 + 2 * third, 0x19, answer[2 * third :]))  # the rest, with FIN
    assert cache.names(NS, *address("151.101.9.9")) == ("split.test", "cdn.test")
    counters = tracker.counters[NS]
    assert counters.tcp_messages == 2 and counters.accepted == 1 and counters.tcp_dropped == 0
    assert tracker.flows == 1 and tracker.buffered == 0  # the client's side is still open


def test_tcp_without_its_syn_is_not_followed_and_flows_are_bounded() -> None:
    cache = NameCache()
    tracker = AnswerTracker(cache, max_flows=8, max_buffered=4096)
    answer = framed(response(5, "mid.test", TYPE_A, [], ["151.101.9.10"]))
    tracker.packet(
        NS, ipv4_packet(SERVER, CLIENT, 6, tcp(53, 42000, 9, 0x18, answer)), 0, False, NOW
    )
    assert tracker.counters[NS].tcp_dropped == 1 and len(cache) == 0
    for port in range(100):  # a flood of flows, each holding a partial message
        tracker.packet(
            NS, ipv4_packet(SERVER, CLIENT, 6, tcp(53, port + 1, 0, 0x12)), 0, False, NOW
        )
        partial = tcp(53, port + 1, 1, 0x18, b"\x04\x00" + b"x" * 900)
        tracker.packet(NS, ipv4_packet(SERVER, CLIENT, 6, partial), 0, False, NOW)
    assert tracker.flows <= 8 and tracker.buffered <= 4096
    tracker.sweep(now=NOW + 1000)
    assert tracker.flows == 0 and tracker.buffered == 0


def test_pending_queries_are_bounded_and_expire() -> None:
    tracker = AnswerTracker(NameCache(), max_pending=50)
    for ident in range(500):
        packet = ipv4_packet(CLIENT, SERVER, 17, udp(40000, 53, query(ident, f"q{ident}.test")))
        tracker.packet(NS, packet, PACKET_OUTGOING, False, NOW)
    assert tracker.pending == 50
    tracker.sweep(now=NOW + 100)
    assert tracker.pending == 0


def test_the_filter_program_is_classic_bpf() -> None:
    program = dns_filter()
    assert len(program) % 8 == 0 and 0 < len(program) // 8 <= 4096
    last_code, _, _, last_k = struct.unpack_from("=HBBI", program, len(program) - 8)
    assert (last_code, last_k) == (0x06, 0)  # ends by dropping
    for index in range(len(program) // 8):  # every jump lands inside the program
        code, true, false, k = struct.unpack_from("=HBBI", program, index * 8)
        if code == 0x05:  # BPF_JA
            assert index + 1 + k < len(program) // 8
        elif code & 0x07 == 0x05:  # a conditional jump
            assert index + 1 + max(true, false) < len(program) // 8


OTHER_NS = NS + 1


def test_a_flood_of_queries_in_one_namespace_leaves_another_namespaces_query_waiting() -> None:
    """Over the bound, the namespace holding the most waiting queries loses its oldest: the
    flood pushes out its own, and the other namespace's answer still counts (issue 23)."""
    cache = NameCache()
    tracker = AnswerTracker(cache, max_pending=50)
    asked = ipv4_packet(CLIENT, SERVER, 17, udp(40002, 53, query(7, "quiet.test")))
    tracker.packet(NS, asked, PACKET_OUTGOING, False, NOW)
    for ident in range(5000):
        flood = ipv4_packet(CLIENT, SERVER, 17, udp(41000, 53, query(ident, f"f{ident}.test")))
        tracker.packet(OTHER_NS, flood, PACKET_OUTGOING, False, NOW)
    assert tracker.pending == 50 and tracker.pending_of(NS) == 1
    message = response(7, "quiet.test", TYPE_A, [], ["151.101.9.7"])
    tracker.packet(
        NS, ipv4_packet(SERVER, CLIENT, 17, udp(53, 40002, message)), PACKET_HOST, False, NOW
    )
    assert tracker.counters[NS].accepted == 1
    assert cache.lookup(NS, *address("151.101.9.7")) == "quiet.test"


def test_a_flood_of_flows_in_one_namespace_leaves_another_namespaces_flow() -> None:
    cache = NameCache()
    tracker = AnswerTracker(cache, max_flows=8)

    def out(namespace: int, l4: bytes) -> None:
        tracker.packet(namespace, ipv4_packet(CLIENT, SERVER, 6, l4), PACKET_OUTGOING, False, NOW)

    def back(namespace: int, l4: bytes) -> None:
        tracker.packet(namespace, ipv4_packet(SERVER, CLIENT, 6, l4), PACKET_HOST, False, NOW)

    asked = framed(query(78, "kept.test"))
    out(NS, tcp(43000, 53, 100, 0x02))
    back(NS, tcp(53, 43000, 900, 0x12))
    out(NS, tcp(43000, 53, 101, 0x18, asked))
    for port in range(100):  # another namespace opens flow after flow
        back(OTHER_NS, tcp(53, 44000 + port, 0, 0x12))
    assert tracker.flows == 8
    answer = framed(response(78, "kept.test", TYPE_A, [], ["151.101.9.8"]))
    back(NS, tcp(53, 43000, 901, 0x19, answer))
    assert cache.lookup(NS, *address("151.101.9.8")) == "kept.test"
    assert tracker.counters[NS].tcp_dropped == 0


def test_one_answer_gives_a_bounded_number_of_addresses() -> None:
    cache = NameCache()
    tracker = AnswerTracker(cache)
    asked = ipv4_packet(CLIENT, SERVER, 17, udp(40001, 53, query(9, "many.test")))
    tracker.packet(NS, asked, PACKET_OUTGOING, False, NOW)
    many = [f"151.101.{i // 250}.{i % 250 + 1}" for i in range(300)]
    answer = ipv4_packet(
        SERVER, CLIENT, 17, udp(53, 40001, response(9, "many.test", TYPE_A, [], many))
    )
    tracker.packet(NS, answer, PACKET_HOST, False, NOW)
    counters = tracker.counters[NS]
    assert counters.accepted == 1
    assert (counters.answers, counters.answers_cut) == (MAX_ANSWERS_TAKEN, 300 - MAX_ANSWERS_TAKEN)
    assert len(cache) == MAX_ANSWERS_TAKEN


def test_hostile_packets_never_raise() -> None:
    tracker = AnswerTracker(NameCache())
    for data in (b"", b"\x45", b"\x60" + b"\0" * 39, b"\x4f" + b"\0" * 30, b"\x45" * 60):
        for packet_type in (PACKET_HOST, PACKET_OUTGOING):
            tracker.packet(NS, data, packet_type, False, NOW)
            tracker.packet(NS, data, packet_type, True, NOW)
    fake = ipv4_packet(SERVER, CLIENT, 17, udp(53, 40000, b"\xff" * 40))
    tracker.packet(NS, fake, PACKET_HOST, True, NOW)
    assert tracker.counters[NS].malformed == 1 and tracker.counters[NS].errors == 0
