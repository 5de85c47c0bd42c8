"""DNS traffic for test hosts: a wire encoder, a small authoritative server and clients.

The DNS observer's tests and ``bench.dns_bench`` need real DNS packets between network
namespaces, never a packet to a real resolver; this module is both ends.  Run as a program
inside a namespace (``ip netns exec NS python -m bench.dnsload ROLE ...``)::

    serve ADDRESS ZONE_JSON [PORT]   answer on ADDRESS port 53 (or PORT), UDP and TCP, from the zone
    stub                      a client taking commands on stdin (see :func:`_stub`)
    flood SERVER RATE SECONDS query SERVER at RATE per second for SECONDS, unique names,
                              once a line (``go``) comes on stdin

Each prints one ``READY`` line when its sockets are open and ends when its stdin closes (the
test host's processes all do), so nothing outlives the test that started it.

The zone maps a name to ``{"cnames": [...], "a": [...], "aaaa": [...], "ttl": N, "tc": bool}``:
the answer is the chain question -> cnames[0] -> ... -> the last, which owns the addresses;
``tc`` answers UDP with the truncation bit and no records, so the client retries over TCP
(RFC 7766).  A name under ``flood.test`` that the zone lacks gets a synthetic answer: a CNAME
to ``edge.cdn.test`` and one A record derived from the name's number, so that a flood of
unique names gives a flood of unique addresses.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1
DNS_PORT = 53

Zone = Dict[str, Dict[str, object]]


# --- the wire encoder ------------------------------------------------------------------------


class Encoder:
    """A message under construction, with RFC 1035 section 4.1.4 name compression."""

    def __init__(self) -> None:
        self.data = bytearray(12)
        self._suffixes: Dict[str, int] = {}

    def name(self, name: str) -> None:
        labels = [label for label in name.rstrip(".").split(".") if label]
        for index in range(len(labels)):
            suffix = ".".join(labels[index:]).lower()
            known = self._suffixes.get(suffix)
            if known is not None:
                self.data += struct.pack("!H", 0xC000 | known)
                return
            if len(self.data) < 0x3FFF:
                self._suffixes[suffix] = len(self.data)
            raw = labels[index].encode("ascii")
            self.data += bytes([len(raw)]) + raw
        self.data += b"\0"

    def record(self, owner: str, rtype: int, ttl: int, rdata: bytes) -> None:
        self.name(owner)
        self.data += struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata

    def cname(self, owner: str, ttl: int, target: str) -> None:
        self.name(owner)
        start = len(self.data)
        self.data += struct.pack("!HHIH", TYPE_CNAME, CLASS_IN, ttl, 0)
        self.name(target)
        struct.pack_into("!H", self.data, start + 8, len(self.data) - start - 10)


def query(ident: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A recursive query (RD set) for ``name``."""
    message = Encoder()
    struct.pack_into("!HHHHHH", message.data, 0, ident, 0x0100, 1, 0, 0, 0)
    message.name(name)
    message.data += struct.pack("!HH", qtype, CLASS_IN)
    return bytes(message.data)


def response(
    ident: int,
    name: str,
    qtype: int,
    cnames: Sequence[str] = (),
    addresses: Sequence[str] = (),
    ttl: int = 300,
    truncated: bool = False,
) -> bytes:
    """An answer to ``name``: the CNAME chain, then every address (A or AAAA by its form,
    whatever ``qtype`` asked) owned by the chain's last name."""
    message = Encoder()
    flags = 0x8180 | (0x0200 if truncated else 0)  # QR, RD, RA
    records = 0 if truncated else len(cnames) + len(addresses)
    struct.pack_into("!HHHHHH", message.data, 0, ident, flags, 1, records, 0, 0)
    message.name(name)
    message.data += struct.pack("!HH", qtype, CLASS_IN)
    if truncated:
        return bytes(message.data)
    owner = name
    for target in cnames:
        message.cname(owner, ttl, target)
        owner = target
    for address in addresses:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        message.record(owner, TYPE_AAAA if len(packed) == 16 else TYPE_A, ttl, packed)
    return bytes(message.data)


def ipv4_packet(source: bytes, destination: bytes, protocol: int, l4: bytes) -> bytes:
    """An IPv4 packet as a cooked packet socket gives it (from the IP header on), around a
    UDP or TCP header and payload: for feeding the watch's tracker packets no socket makes."""
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 0, 0, 64, protocol, 0)
    return header + source + destination + l4


def question_of(message: bytes) -> Tuple[int, str, int]:
    """(id, name, qtype) of a well-formed query (the server's own, trusting, reading)."""
    (ident,) = struct.unpack_from("!H", message)
    labels, offset = [], 12
    while message[offset]:
        length = message[offset]
        labels.append(message[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    (qtype,) = struct.unpack_from("!H", message, offset + 1)
    return ident, ".".join(labels), qtype


# --- the server ------------------------------------------------------------------------------

FLOOD_SUFFIX = ".flood.test"
FLOOD_TARGET = "edge.cdn.test"


def flood_address(number: int) -> str:
    """The synthetic A record for ``nNUMBER.flood.test``: 100.64.0.0/10 onwards, wrapping."""
    value = 0x64400000 + number % (1 << 22)
    return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))


def answer(zone: Zone, message: bytes, over_tcp: bool) -> Optional[bytes]:
    try:
        ident, name, qtype = question_of(message)
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    entry = zone.get(name.lower())
    if entry is None and name.lower().endswith(FLOOD_SUFFIX):
        number = int("".join(c for c in name if c.isdigit()) or "0")
        entry = {"cnames": [FLOOD_TARGET], "a": [flood_address(number)], "ttl": 60}
    if entry is None:
        return response(ident, name, qtype)
    if entry.get("tc") and not over_tcp:
        return response(ident, name, qtype, truncated=True)
    wanted = entry.get("aaaa" if qtype == TYPE_AAAA else "a", [])
    return response(
        ident,
        name,
        qtype,
        list(entry.get("cnames", [])),  # type: ignore[call-overload]
        list(wanted),  # type: ignore[call-overload]
        int(entry.get("ttl", 300)),  # type: ignore[call-overload]
    )


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _serve(address: str, zone: Zone, port: int = DNS_PORT) -> None:
    udp = socket.socket(_family(address), socket.SOCK_DGRAM)
    udp.bind((address, port))
    tcp = socket.socket(_family(address), socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(64)
    print("READY", port, flush=True)
    streams: Dict[socket.socket, bytes] = {}
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([udp, tcp, stdin, *streams], [], [])
        for ready in readable:
            if ready == stdin:
                line = os.read(stdin, 4096)
                if not line:
                    return
                _command(udp, line.decode())
            elif ready is udp:
                data, peer = udp.recvfrom(65535)
                reply = answer(zone, data, over_tcp=False)
                if reply is not None:
                    udp.sendto(reply, peer)
            elif ready is tcp:
                streams[tcp.accept()[0]] = b""
            else:
                _serve_stream(ready, streams, zone)


def _serve_stream(stream: socket.socket, streams: Dict[socket.socket, bytes], zone: Zone) -> None:
    chunk = stream.recv(65535)
    if not chunk:
        del streams[stream]
        stream.close()
        return
    buffered = streams[stream] + chunk
    while len(buffered) >= 2:
        (length,) = struct.unpack_from("!H", buffered)
        if len(buffered) < 2 + length:
            break
        reply = answer(zone, buffered[2 : 2 + length], over_tcp=True)
        buffered = buffered[2 + length :]
        if reply is not None:
            stream.sendall(struct.pack("!H", len(reply)) + reply)
    streams[stream] = buffered


def _command(udp: socket.socket, text: str) -> None:
    """``spoof ADDRESS PORT NAME IP``: an answer nobody asked for, from port 53."""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 5 and words[0] == "spoof":
            _, address, port, name, ip = words
            udp.sendto(
                response(random.getrandbits(16), name, TYPE_A, (), [ip]), (address, int(port))
            )
            print("SPOOFED", flush=True)


# --- the clients -----------------------------------------------------------------------------


def resolve(server: str, name: str, qtype: int, timeout: float = 5.0) -> Tuple[List[str], str]:
    """Ask ``server`` for ``name`` over UDP, and over TCP when the answer is truncated.

    Returns (addresses, transport).  The reading trusts the server: it is our own."""
    ident = random.getrandbits(16)
    message = query(ident, name, qtype)
    with socket.socket(_family(server), socket.SOCK_DGRAM) as udp:
        udp.settimeout(timeout)
        udp.connect((server, DNS_PORT))
        udp.send(message)
        reply = udp.recv(65535)
    transport = "udp"
    if struct.unpack_from("!H", reply, 2)[0] & 0x0200:
        transport = "tcp"
        with socket.create_connection((server, DNS_PORT), timeout) as tcp:
            tcp.sendall(struct.pack("!H", len(message)) + message)
            buffered = b""
            while len(buffered) < 2 or len(buffered) < 2 + struct.unpack_from("!H", buffered)[0]:
                chunk = tcp.recv(65535)
                if not chunk:
                    raise OSError("the server closed the TCP connection early")
                buffered += chunk
            reply = buffered[2:]
    return _addresses(reply), transport


def _addresses(reply: bytes) -> List[str]:
    _, name, _ = question_of(reply)
    offset = 12 + sum(len(label) + 1 for label in name.split(".") if label) + 1 + 4
    (count,) = struct.unpack_from("!H", reply, 6)
    found = []
    for _ in range(count):
        while True:  # skip the owner name
            length = reply[offset]
            if length >= 0xC0:
                offset += 2
                break
            offset += 1 + length
            if length == 0:
                break
        rtype, _, _, length = struct.unpack_from("!HHIH", reply, offset)
        offset += 10
        if rtype in (TYPE_A, TYPE_AAAA):
            family = socket.AF_INET if rtype == TYPE_A else socket.AF_INET6
            found.append(socket.inet_ntop(family, reply[offset : offset + length]))
        offset += length
    return found


def _stub() -> None:
    """Commands on stdin, one per line, each answered with one line on stdout:
    ``resolve SERVER NAME [a|aaaa]`` -> ``ANSWER TRANSPORT ADDRESS...`` or ``ERROR TEXT``."""
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if len(words) >= 3 and words[0] == "resolve":
            qtype = TYPE_AAAA if words[3:4] == ["aaaa"] else TYPE_A
            try:
                addresses, transport = resolve(words[1], words[2], qtype)
                print("ANSWER", transport, *addresses, flush=True)
            except OSError as error:
                print("ERROR", error, flush=True)


def _flood(server: str, rate: float, seconds: float) -> None:
    """Unique names at ``rate`` queries a second, paced; answers read as they come."""
    sock = socket.socket(_family(server), socket.SOCK_DGRAM)
    sock.connect((server, DNS_PORT))
    sock.setblocking(False)
    print("READY", flush=True)
    sys.stdin.readline()  # "go"
    started = time.monotonic()
    sent = received = 0
    total = int(rate * seconds)
    while sent < total or time.monotonic() < started + seconds:
        due = started + sent / rate
        now = time.monotonic()
        if sent < total and now >= due:
            ident = sent & 0xFFFF
            sock.send(query(ident, f"n{sent}{FLOOD_SUFFIX}"))
            sent += 1
            continue
        wait = max(0.0, min(due - now, 0.05)) if sent < total else 0.05
        if select.select([sock], [], [], wait)[0]:
            while True:
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break
                received += 1
    print("DONE", sent, received, flush=True)
    sys.stdin.read()


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) in (3, 4):
        _serve(argv[1], json.loads(argv[2]), *(int(port) for port in argv[3:]))
    elif argv[:1] == ["stub"]:
        _stub()
    elif argv[:1] == ["flood"] and len(argv) == 4:
        _flood(argv[1], float(argv[2]), float(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
