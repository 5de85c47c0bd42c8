"""Table routes, option bits, query contexts (both core formats, and malformed), string rows."""

from __future__ import annotations

import dataclasses
import json
from typing import FrozenSet, List, Optional, Tuple

import pytest
from fakes import FunctionSampler, monitor_of
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect import SampleStats
from agent.history import HISTORY_COLUMNS
from agent.osquery import (
    dispatch,
    egress_agent_info,
    external_connection_history,
    external_connections,
    table,
)
from agent.osquery.context import Constraint, ContextError, Operator, QueryContext, parse_context
from agent.osquery.dispatch import ExtensionTables
from agent.osquery.external_connections import LiveSamples
from agent.osquery.table import AgentInfo, ColumnOptions
from agent.pipeline import Snapshot, Stats
from agent.records import COLUMNS, Connection

# -- routes ------------------------------------------------------------------------------------


def test_live_table_routes_follow_the_record_with_index_bits() -> None:
    routes = external_connections.SPEC.routes()
    assert [(r["name"], r["type"]) for r in routes] == list(COLUMNS)
    ops = {r["name"]: r["op"] for r in routes}
    assert ops.pop("pid") == "9"  # INDEX | OPTIMIZED: IN (...) in one call
    assert ops.pop("remote_address") == "9"
    assert set(ops.values()) == {"0"}  # core's default index makes these indexes too
    history = {r["name"]: r["op"] for r in external_connection_history.SPEC.routes()}
    assert {name: op for name, op in history.items() if op != "0"} == {
        "pid": "9",
        "direction": "9",
        "last_seen": "1",
        "open": "1",
    }
    for route in routes:
        assert route["id"] == "column"
        assert all(isinstance(value, str) for value in route.values())


def test_history_and_info_routes() -> None:
    history = external_connection_history.SPEC.routes()
    assert [(r["name"], r["type"]) for r in history] == list(HISTORY_COLUMNS)
    names = [r["name"] for r in history]
    for column in ("first_seen", "last_seen", "samples", "connections", "open", "process_uuid"):
        assert column in names
    for column in ("fd", "socket", "local_port"):
        assert column not in names
    info = [r["name"] for r in egress_agent_info.SPEC.routes()]
    for column in (
        "version", "pid", "config_path", "sampling_interval", "samples_total", "last_sample_ms",
        "sockets_seen", "namespaces_seen", "history_rows", "history_path", "started_at",
        "tcp_active_opens", "outbound_tcp_seen",
    ):  # fmt: skip
        assert column in info


def test_registry_shape() -> None:
    registry = dispatch.registry()
    assert set(registry) == {"table"}
    assert set(registry["table"]) == {
        "external_connections",
        "external_connection_history",
        "external_connection_events",
        "egress_agent_info",
        "egress_agent_audit",
    }


def test_option_bits_are_osquerys() -> None:
    assert (ColumnOptions.DEFAULT, ColumnOptions.INDEX, ColumnOptions.REQUIRED) == (0, 1, 2)
    assert (ColumnOptions.ADDITIONAL, ColumnOptions.OPTIMIZED, ColumnOptions.HIDDEN) == (4, 8, 16)
    spec = table.make_spec("t", [("a", "TEXT")], {"a": ColumnOptions.INDEX | ColumnOptions.HIDDEN})
    assert spec.routes()[0]["op"] == "17"


def test_make_spec_refuses_unknown_columns_and_types() -> None:
    with pytest.raises(ValueError, match="unknown columns"):
        table.make_spec("t", [("a", "TEXT")], {"b": ColumnOptions.INDEX})
    with pytest.raises(ValueError, match="unknown type"):
        table.make_spec("t", [("a", "VARCHAR")])


# -- contexts ----------------------------------------------------------------------------------


def _context(lists: List[dict]) -> str:
    return json.dumps({"constraints": lists, "colsUsed": ["pid"], "colsUsedBitset": 1})


def test_new_format_equals_and_in() -> None:
    context = parse_context(
        _context(
            [
                {"name": "pid", "list": [{"op": 2, "expr": "1234"}], "affinity": "INTEGER"},
                {
                    "name": "remote_address",
                    "list": [{"op": 3, "expr": "2001:db8::1"}, {"op": 2, "expr": "192.0.2.1"}],
                    "affinity": "TEXT",
                },
                {"name": "remote_port", "list": [{"op": 4, "expr": "1000"}], "affinity": "INTEGER"},
                {"name": "name", "list": [], "affinity": "TEXT"},
            ]
        )
    )
    assert context.equal_integers("pid") == frozenset({1234})
    assert context.equal_values("remote_address") == frozenset({"2001:db8::1", "192.0.2.1"})
    assert context.equal_values("remote_port") is None  # GREATER_THAN is left to core
    assert context.equal_values("name") is None
    assert context.equal_values("not_a_column") is None
    assert context.columns_used == ["pid"]


def test_old_format_string_ops_and_empty_lists() -> None:
    context = parse_context(
        json.dumps(
            {
                "constraints": [
                    {"name": "pid", "list": [{"op": "2", "expr": "42"}], "affinity": "INTEGER"},
                    {"name": "remote_address", "list": "", "affinity": "TEXT"},
                ]
            }
        )
    )
    assert context.equal_integers("pid") == frozenset({42})
    assert context.equal_values("remote_address") is None


def test_several_equals_form_a_union_and_integers_read_like_sqlite() -> None:
    context = parse_context(
        _context(
            [
                {
                    "name": "pid",
                    "list": [
                        {"op": 2, "expr": "1"},
                        {"op": 2, "expr": " 2 "},
                        {"op": 2, "expr": "3.0"},
                        {"op": 2, "expr": "abc"},
                        {"op": 2, "expr": "4.5"},
                    ],
                }
            ]
        )
    )
    assert context.equal_integers("pid") == frozenset({1, 2, 3})


def test_unconstrained_contexts() -> None:
    assert parse_context(None).constraints == {}
    assert parse_context("{}").equal_values("pid") is None
    assert parse_context('{"constraints": []}').equal_values("pid") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("not json", "not valid JSON"),
        ("[]", "must be a JSON object, not a list"),
        ('"x"', "must be a JSON object, not a string"),
        ('{"constraints": {}}', "constraints must be a list"),
        ('{"constraints": [1]}', r"constraints\[0\] must be an object"),
        ('{"constraints": [{"list": []}]}', r"constraints\[0\]\.name must be a string"),
        ('{"constraints": [{"name": "pid", "list": 7}]}', r"constraints\[0\]\.list must be a list"),
        ('{"constraints": [{"name": "pid", "list": [5]}]}', r"list\[0\] must be an object"),
        ('{"constraints": [{"name": "pid", "list": [{"expr": "1"}]}]}', r"\.op must be"),
        ('{"constraints": [{"name": "pid", "list": [{"op": true, "expr": "1"}]}]}', "boolean"),
        ('{"constraints": [{"name": "pid", "list": [{"op": "eq", "expr": "1"}]}]}', "'eq'"),
        ('{"constraints": [{"name": "pid", "list": [{"op": 2}]}]}', r"\.expr must be a string"),
        ('{"constraints": [{"name": "pid", "list": [{"op": 2, "expr": {}}]}]}', "not an object"),
        ('{"colsUsed": "pid"}', "colsUsed must be a list"),
        ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ],
)
def test_malformed_contexts_get_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ContextError, match=message):
        parse_context(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["constraints", "name", "list", "op", "expr", "colsUsed", "x"]),
        children, max_size=4),
    max_leaves=20,
).map(json.dumps)))  # fmt: skip
def test_any_context_parses_or_gets_a_context_error(text: str) -> None:
    try:
        context = parse_context(text)
    except ContextError as error:
        assert str(error)
        return
    for name in context.constraints:
        context.equal_values(name)
        context.equal_integers(name)


def test_operator_numbers_are_osquerys() -> None:
    assert Operator.EQUALS == 2 and Operator.IN == 3 and Operator.GLOB == 66


# -- rows --------------------------------------------------------------------------------------


def test_cells_are_strings_and_missing_is_empty() -> None:
    assert table.cell(None) == ""
    assert table.cell(True) == "1" and table.cell(False) == "0"
    assert table.cell(-1) == "-1"
    assert table.cell(2.5) == "2.5"
    assert table.cell("x") == "x"
    row = table.string_row(Connection(pid=7).as_dict(), external_connections.SPEC.column_names)
    assert set(row) == set(external_connections.SPEC.column_names)
    assert all(isinstance(value, str) for value in row.values())
    assert row["via"] == "" and row["fd"] == "" and row["pid"] == "7"
    assert "None" not in row.values()
    assert table.string_row({}, ["a"]) == {"a": ""}


def test_undecodable_text_is_escaped_not_fatal() -> None:
    name = b"evil\xff\xfename".decode("utf-8", "surrogateescape")
    assert table.cell(name) == "evil\\xff\\xfename"
    assert table.cell("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    assert table.cell("ok ünïcode") == "ok ünïcode"


# -- dispatch (an in-process sample function: the real sampler is exercised in test_extension) --


class _Recorder:
    """A sample function that records the pids it was asked for."""

    def __init__(self, connections: List[Connection]) -> None:
        self.connections = connections
        self.asked: List[Optional[FrozenSet[int]]] = []

    def __call__(self, pids: Optional[FrozenSet[int]]) -> List[Connection]:
        self.asked.append(pids)
        return [c for c in self.connections if pids is None or c.pid in pids]


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder(
        [
            Connection(pid=10, remote_address="2001:db8::1", external=True),
            Connection(pid=11, remote_address="192.0.2.7", external=True, direction="inbound"),
            Connection(pid=-1, remote_address="192.0.2.8", external=True),
        ]
    )


def _tables(recorder: _Recorder) -> ExtensionTables:
    monitor = monitor_of(FunctionSampler(recorder), interval=5.0)
    return ExtensionTables(monitor, None, AgentInfo("9.9", "defaults", 5.0, "/nowhere"))


def test_pid_constraint_narrows_the_sample(recorder: _Recorder) -> None:
    tables = _tables(recorder)
    routes = external_connections.SPEC.routes()
    context = {
        "constraints": [
            {"name": r["name"], "list": [{"op": 2, "expr": "11"}] if r["name"] == "pid" else []}
            for r in routes
        ]
    }
    result = tables.call(
        "external_connections", {"action": "generate", "context": json.dumps(context)}
    )
    assert result.code == 0
    assert [row["pid"] for row in result.rows] == ["11"]
    assert recorder.asked == [frozenset({11})]


def test_remote_address_constraint_filters_rows(recorder: _Recorder) -> None:
    tables = _tables(recorder)
    context = _context([{"name": "remote_address", "list": [{"op": 2, "expr": "192.0.2.8"}]}])
    result = tables.call("external_connections", {"action": "generate", "context": context})
    assert [row["pid"] for row in result.rows] == ["-1"]
    assert recorder.asked == [None]


def test_non_integer_pid_matches_nothing_without_sampling(recorder: _Recorder) -> None:
    tables = _tables(recorder)
    context = _context([{"name": "pid", "list": [{"op": 2, "expr": "x"}]}])
    result = tables.call("external_connections", {"action": "generate", "context": context})
    assert result.code == 0 and result.rows == []
    assert recorder.asked == []


def test_both_directions_without_context(recorder: _Recorder) -> None:
    result = _tables(recorder).call("external_connections", {"action": "generate"})
    assert sorted(row["direction"] for row in result.rows) == ["inbound", "outbound", "outbound"]


def test_failures_are_status_1_with_a_message(recorder: _Recorder) -> None:
    tables = _tables(recorder)
    unknown_table = tables.call("processes", {"action": "generate", "context": "{}"})
    assert unknown_table.code == 1 and "unknown table 'processes'" in unknown_table.message
    unknown_action = tables.call("external_connections", {"action": "truncate"})
    assert unknown_action.code == 1 and "unknown action 'truncate'" in unknown_action.message
    for write in ("insert", "update", "delete"):  # osquery's TablePlugin answer
        readonly = tables.call("external_connections", {"action": write, "id": "1"})
        assert (readonly.code, readonly.rows) == (0, [{"status": "readonly"}])
    bad = tables.call("external_connections", {"action": "generate", "context": "{oops"})
    assert bad.code == 1 and "not valid JSON" in bad.message
    no_history = tables.call("external_connection_history", {"action": "generate"})
    assert no_history.code == 1 and "history" in no_history.message


def test_a_failing_sampler_fails_the_query_only() -> None:
    def broken(pids: Optional[FrozenSet[int]]) -> List[Connection]:
        raise RuntimeError("boom")

    monitor = monitor_of(FunctionSampler(broken), interval=5.0)
    tables = ExtensionTables(monitor, None, AgentInfo("9.9", "defaults", 5.0, "/nowhere"))
    result = tables.call("external_connections", {"action": "generate"})
    assert result.code == 1 and "RuntimeError: boom" in result.message
    assert monitor.sample_once() is False
    assert tables.call("egress_agent_info", {"action": "generate"}).code == 0


def test_info_row(recorder: _Recorder) -> None:
    tables = _tables(recorder)
    monitor_result = tables.call("egress_agent_info", {"action": "generate", "context": "{}"})
    (row,) = monitor_result.rows
    assert row["version"] == "9.9" and row["samples_total"] == "0"
    assert row["last_sample_ms"] == "" and row["history_rows"] == ""
    assert all(isinstance(value, str) for value in row.values())


def _constrained(**lists: List[Tuple[int, str]]) -> QueryContext:
    return QueryContext(
        constraints={
            name: [Constraint(op, expr) for op, expr in pairs] for name, pairs in lists.items()
        }
    )


@pytest.mark.parametrize(
    ("pairs", "bounds"),
    [
        ([(4, "10")], (11, None)),  # >
        ([(32, "10")], (10, None)),  # >=
        ([(16, "10")], (None, 9)),  # <
        ([(8, "10")], (None, 10)),  # <=
        ([(2, "10")], (10, 10)),
        ([(4, "10.5"), (16, "20.5")], (11, 20)),
        ([(32, "5"), (32, "7"), (8, "9"), (8, "8")], (7, 8)),  # the tightest of each
        ([(4, "abc"), (65, "1%")], (None, None)),  # text and LIKE are left to core
        ([(4, " 12 ")], (13, None)),
    ],
)
def test_bounds_of_a_column(pairs: List[Tuple[int, str]], bounds: Tuple[object, object]) -> None:
    assert _constrained(last_seen=pairs).bounds("last_seen") == bounds


def test_used_columns_keep_table_order() -> None:
    names = ["a", "b", "c"]
    assert QueryContext().used(names) == names
    assert QueryContext(columns_used=["c", "a"]).used(names) == ["a", "c"]
    assert QueryContext(columns_used=[]).used(names) == []


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_live_samples_serve_a_burst_of_calls_from_one_sample() -> None:
    taken: List[Optional[FrozenSet[int]]] = []

    def sample(pids: Optional[FrozenSet[int]]) -> Snapshot:
        taken.append(pids)
        return Snapshot(connections=[], stats=SampleStats(), at=0.0)

    clock = _Clock()
    samples = LiveSamples(sample)
    samples._clock = clock  # type: ignore[method-assign]
    samples.get(frozenset({1}))  # a first call alone: narrowed
    assert taken == [frozenset({1})]
    for pid in range(2, 50):  # the next rows of a JOIN: one sample of everything serves them
        clock.now += 0.05
        samples.get(frozenset({pid}))
    assert taken == [frozenset({1}), None]
    clock.now += 0.5
    samples.get(None)
    assert len(taken) == 2
    clock.now += 3  # a later query: a sample of its own
    samples.get(frozenset({7}))
    assert taken[-1] == frozenset({7})
    for _ in range(400):  # a burst longer than REUSE_MAX_S takes a fresh sample now and then
        clock.now += 0.5
        samples.get(None)
    assert 3 + 400 * 0.5 / 10 - 1 <= len(taken) <= 3 + 400 * 0.5 / 10 + 1


def test_the_info_columns_are_defined_once_and_each_has_one_source() -> None:
    """``egress_agent_info``'s columns are one list; each value is read by name from exactly
    one of the extension's info, the monitor's figures and the store, and every figure the
    monitor keeps is a column unless it is said not to be."""
    info = {f.name for f in dataclasses.fields(AgentInfo)}
    stats = {f.name for f in dataclasses.fields(Stats)} - egress_agent_info.NOT_SHOWN
    store = set(egress_agent_info.STORE_FIGURES)
    columns = [name for name, _ in egress_agent_info.INFO_COLUMNS]
    assert len(columns) == len(set(columns))
    assert not (info & stats or info & store or stats & store)
    assert set(columns) == info | stats | store
