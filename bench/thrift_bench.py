"""What the reply to a ``generate`` costs to build and encode (issue 16), old path beside new.

``python -m bench.thrift_bench [--rows 1840] [--repeats 15] [--sample] [--no-write]``: no root
needed (``--sample`` reads every namespace's sockets, which wants root to see them all).

The rows are ``external_connections`` rows: 30 columns of :class:`agent.records.Connection`.
By default a deterministic synthetic set shaped like the bench load's records at scale L
(processes of four connections each, forked from one Python, IPv4, IPv6 and IPv4-mapped peers,
2% UDP, a quarter in a second namespace, some with a container id and a systemd unit; about
920 bytes a row on the wire, so 1,840 rows make the 1.7 MB reply issue 16 measured).  With
``--sample``: the external connections of a live sample of this host, repeated round robin
(with distinct local ports) up to ``--rows``.

Cases, each the median of ``--repeats`` rounds (every round runs every case once, in turn):

- today: ``table.string_row`` per record, then osquery-python's generated
  ``call_result.write`` with thrift's pure-Python ``TBinaryProtocol`` and with the extension's
  one-write-per-string protocol (what ``main`` serves with), into a ``TMemoryBuffer``;
- thrift's C codec (``fastbinary``) on the same rows, with the generated specs rewritten into
  the form it accepts (where it is installed: not in the packages);
- new: ``wire.RowEncoder.encode_records`` (rows) and ``wire.call_reply`` (the whole message),
  cold (a fresh encoder: nothing kept) and warm (the rows kept by the previous answer);
- the steps of a cold row, cumulatively, to show where its time goes: reading the 30 values,
  their types, the ``%`` format, ``encode`` + ``split``, lengths and the join.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import operator
import random
import statistics
import struct
import sys
import time
import tracemalloc
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from osquery.extensions import Extension
from osquery.extensions.ttypes import ExtensionResponse, ExtensionStatus
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType, TType
from thrift.transport import TTransport

from agent.osquery import external_connections, table, wire
from agent.osquery.server import _protocol_factory
from agent.records import Connection

COLUMNS = external_connections.SPEC.column_names
ARGUMENTS = (
    "-m bench --scales L --runs 11 --over-time 600 --output /var/tmp/egress-agent-bench/results "
    "--config /etc/egress-agent/bench.yaml"
)
TARGET_MS = 20.0


# -- the rows -------------------------------------------------------------------------------------


def synthetic(count: int, seed: int = 16) -> List[Connection]:
    """``count`` records shaped like the bench load's (see the module docstring)."""
    rng = random.Random(seed)
    interpreter = "/usr/local/lib/python3.11/bin/python3.11"
    records = []
    for i in range(count):
        process, kind = i // 4, i % 3
        second_ns = process % 4 == 3
        remote4 = f"8.8.8.{101 + i % 2}"
        remote6 = f"2001:4860:d5::{1 + i % 2}"
        remote = remote6 if kind == 1 else remote4
        expanded = "2001:4860:00d5:0000:0000:0000:0000:000" + str(1 + i % 2) if kind == 1 else ""
        udp = i % 50 == 49
        containered = process % 5 == 0
        records.append(
            Connection(
                pid=31000 + process,
                name=f"eab-cli-{process}"[:15],
                path=interpreter,
                cmdline=f"{interpreter} {ARGUMENTS}",
                uid=0,
                username="root",
                parent=30999,
                process_start_time=1764400000 + process // 10,
                process_uuid=str(uuid.UUID(int=rng.getrandbits(128), version=5)),
                container_id=f"{rng.getrandbits(256):064x}" if containered else "",
                systemd_unit="bench-load.service" if not containered else "",
                net_namespace=4026532300 if second_ns else 4026531840,
                fd=23 + i % 50,
                socket=913000 + i,
                family=2 if kind == 0 else 10,
                protocol=17 if udp else 6,
                state="" if udp else "ESTABLISHED",
                local_address=["10.213.2.2", "fd00:d5:2::2", "::ffff:10.213.2.2"][kind],
                local_port=32768 + i,
                remote_address=remote,
                remote_port=8000 + i % 4,
                direction="outbound",
                external=True,
                expanded_address=expanded or remote,
                address_int=str(0x20014860_00D50000_00000000_00000001 + i % 2)
                if kind == 1
                else str(0x08080865 + i % 2),
                address_class="global unicast",
                via="ipv4-mapped" if kind == 2 else None,
                embedded_ipv4=remote4 if kind == 2 else None,
                allowlisted=False,
                allow_rule="",
            )
        )
    return records


def sampled(count: int) -> List[Connection]:
    """The external connections of a live sample of this host, repeated up to ``count``."""
    from agent.classify import Classifier
    from agent.collect import open_sampler

    found = [c for c in open_sampler(Classifier()).sample() if c.external]
    if not found:
        raise SystemExit("bench.thrift_bench --sample: this host has no external connection")
    records = []
    for i, record in enumerate(itertools.islice(itertools.cycle(found), count)):
        copy = Connection(**vars(record))
        copy.local_port = (record.local_port + i // len(found)) % 65536
        records.append(copy)
    return records


# -- the cases ------------------------------------------------------------------------------------


def _response(rows: Any) -> ExtensionResponse:
    return ExtensionResponse(status=ExtensionStatus(code=0, message="OK"), response=rows)


def generated_reply(rows: List[Dict[str, str]], factory: Any) -> bytes:
    """osquery-python's generated processor's reply, written with ``factory``'s protocol."""
    buffer = TTransport.TMemoryBuffer()
    protocol = factory.getProtocol(buffer)
    protocol.writeMessageBegin("call", TMessageType.REPLY, 1)
    Extension.call_result(success=_response(rows)).write(protocol)
    protocol.writeMessageEnd()
    return buffer.getvalue()


def _list_form(spec: Any) -> Any:
    """The generated struct specs with each ``(Class, spec)`` as ``[Class, spec]``: the form
    thrift >= 0.11's C codec reads (``src/ext/types.cpp``, ``parse_struct_args``)."""
    fields = []
    for field in spec:
        if field is not None and field[1] == TType.STRUCT:
            klass = field[3][0]
            field = (*field[:3], [klass, _list_form(klass.thrift_spec)], *field[4:])
        fields.append(field)
    return tuple(fields)


def fastbinary_writer() -> Tuple[Optional[Callable[[List[Dict[str, str]]], bytes]], str]:
    """(a writer through thrift's C codec, or None; what happened with the generated specs)."""
    try:
        from thrift.protocol import fastbinary
    except ImportError as error:
        return None, f"not installed ({error})"
    result = Extension.call_result(success=_response([]))
    try:
        fastbinary.encode_binary(result, [Extension.call_result, Extension.call_result.thrift_spec])
        verdict = "accepts the generated specs"
    except TypeError as error:
        verdict = f"refuses the generated specs: TypeError: {error}"
    spec = [Extension.call_result, _list_form(Extension.call_result.thrift_spec)]
    header = generated_reply([], TBinaryProtocol.TBinaryProtocolFactory())[:16]  # message head

    def write(rows: List[Dict[str, str]]) -> bytes:
        body = fastbinary.encode_binary(Extension.call_result(success=_response(rows)), spec)
        return header + body

    return write, verdict


Case = Tuple[str, Callable[[], Any]]


def cases(records: List[Connection]) -> Tuple[List[Case], Dict[str, Any]]:
    """The cases over ``records``, and facts for the notes (sizes, checks, the C codec)."""
    pure, ours = TBinaryProtocol.TBinaryProtocolFactory(), _protocol_factory()
    old_rows = [table.string_row(c.as_dict(), COLUMNS) for c in records]
    warm = wire.RowEncoder(COLUMNS)
    warm.encode_records(records, remember=True)
    fast, fast_verdict = fastbinary_writer()
    reference = generated_reply(old_rows, pure)

    def today_rows() -> Any:
        return [table.string_row(c.as_dict(), COLUMNS) for c in records]

    def today_total() -> Any:
        return generated_reply(today_rows(), ours)

    def cold_rows() -> Any:
        return wire.RowEncoder(COLUMNS).encode_records(records)

    def cold_total() -> bytes:
        return wire.call_reply(1, _response(cold_rows())).data()

    def warm_rows() -> Any:
        return warm.encode_records(records, remember=True)

    def warm_total() -> bytes:
        return wire.call_reply(1, _response(warm_rows())).data()

    def dict_rows_new() -> bytes:
        return wire.call_reply(1, _response(old_rows)).data()

    listed: List[Case] = [
        ("today: rows (string_row per record)", today_rows),
        ("today: encode, generated + thrift's protocol", lambda: generated_reply(old_rows, pure)),
        ("today: encode, generated + our protocol", lambda: generated_reply(old_rows, ours)),
        ("today: rows + encode (what main serves)", today_total),
    ]
    if fast is not None:
        listed.append(("reference: encode, fastbinary, list-form specs", lambda: fast(old_rows)))
    listed += [
        ("new: wire.call_reply over today's dict rows", dict_rows_new),
        ("new, cold: rows (RowEncoder, nothing kept)", cold_rows),
        ("new, cold: rows + reply", cold_total),
        ("new, warm: rows (kept from the last answer)", warm_rows),
        ("new, warm: rows + reply", warm_total),
    ]
    listed += _steps(records)
    same = cold_total() == reference and warm_total() == reference
    if fast is not None:
        same = same and fast(old_rows) == reference
    facts = {
        "bytes": len(reference),
        "same": same,
        "fastbinary": fast_verdict,
        "kept_mb": _kept_mb(records),
    }
    return listed, facts


def _kept_mb(records: List[Connection]) -> float:
    """What an encoder's kept rows hold (the bytes, the value tuples, the dicts), in MB."""
    gc.collect()
    tracemalloc.start()
    encoder = wire.RowEncoder(COLUMNS)
    before = tracemalloc.get_traced_memory()[0]
    rows = encoder.encode_records(records, remember=True)
    del rows
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / 1e6


def _steps(records: List[Connection]) -> List[Case]:
    """A cold row's steps, each case doing the ones before it too (RowEncoder's own steps,
    spelled out here so that each can be timed)."""
    values_of = operator.attrgetter(*COLUMNS)
    encoder = wire.RowEncoder(COLUMNS)
    encoder.encode_records(records)
    text_format = "\x00".join("%s" for _ in COLUMNS)
    pack = struct.Struct("!i").pack
    template = [b""] * (3 * len(COLUMNS))

    def read() -> Any:
        return [values_of(r) for r in records]

    def types() -> Any:
        return [tuple(map(type, values_of(r))) for r in records]

    def formatted() -> Any:
        out = []
        for r in records:
            values = values_of(r)
            tuple(map(type, values))
            out.append(text_format % values)
        return out

    def split() -> Any:
        out = []
        for r in records:
            values = values_of(r)
            tuple(map(type, values))
            out.append((text_format % values).encode("utf-8").split(b"\x00"))
        return out

    def joined() -> Any:
        out = []
        for r in records:
            values = values_of(r)
            tuple(map(type, values))
            parts = (text_format % values).encode("utf-8").split(b"\x00")
            chunks = template[:]
            chunks[1::3] = map(pack, map(len, parts))
            chunks[2::3] = parts
            out.append(b"".join(chunks))
        return out

    return [
        ("step 1: read the 30 values (attrgetter)", read),
        ("step 2: + their types", types),
        ("step 3: + one % format per row", formatted),
        ("step 4: + encode and split", split),
        ("step 5: + lengths, interleave, join", joined),
    ]


def measure(listed: List[Case], repeats: int) -> Dict[str, List[float]]:
    """Milliseconds per case: one untimed round, then ``repeats`` rounds of every case."""
    times: Dict[str, List[float]] = {label: [] for label, _ in listed}
    for round_number in range(repeats + 1):
        for label, run in listed:
            gc.collect()
            started = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - started) * 1000
            if round_number:
                times[label].append(elapsed)
    return times


def report(
    times: Dict[str, List[float]], cells: int, anchor: str
) -> Tuple[List[str], List[List[str]]]:
    header = ["case", "median ms", "min", "max", "x today", "ns per cell"]
    base = statistics.median(times[anchor])
    rows = []
    for label, values in times.items():
        median = statistics.median(values)
        rows.append(
            [
                label,
                f"{median:.2f}",
                f"{min(values):.2f}",
                f"{max(values):.2f}",
                f"{median / base:.2f}",
                f"{median * 1e6 / cells:.0f}",
            ]
        )
    return header, rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.thrift_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1840, help="rows per reply (1840)")
    parser.add_argument("--repeats", type=int, default=15, help="measured rounds (15)")
    parser.add_argument("--sample", action="store_true", help="rows from a live sample")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")
    from bench.report import machine, markdown_table, publish

    records = sampled(args.rows) if args.sample else synthetic(args.rows)
    listed, facts = cases(records)
    times = measure(listed, args.repeats)
    anchor = "today: rows + encode (what main serves)"
    header, rows = report(times, len(records) * len(COLUMNS), anchor)
    cold = statistics.median(times["new, cold: rows + reply"])
    info = machine()
    body = "\n".join(
        [
            "## Thrift reply micro-benchmark (issue 16)",
            "",
            f"Run: `python -m bench.thrift_bench {' '.join(argv or sys.argv[1:])}`; "
            f"{len(records)} rows x {len(COLUMNS)} columns "
            f"({'a live sample, repeated' if args.sample else 'synthetic, like the L load'}), "
            f"a {facts['bytes'] / 1e6:.2f} MB reply; median of {args.repeats} rounds, every case "
            f"once a round; {info['python']}, {info['cpu']}, load average {info['load average']}.",
            "",
            markdown_table(header, rows),
            "",
            f"- New replies equal the generated code's byte for byte: {facts['same']}.",
            f"- Target (at most {TARGET_MS:g} ms cold for the reply): {cold:.1f} ms, "
            f"{'met' if cold <= TARGET_MS else 'missed'}.",
            f"- thrift's C codec: {facts['fastbinary']}.",
            f"- Rows kept by the live table's encoder for the next answer: "
            f"{facts['kept_mb']:.1f} MB.",
        ]
    )
    publish("thrift", body, write=not args.no_write)
    return 0 if facts["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
