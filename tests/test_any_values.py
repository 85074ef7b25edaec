"""Captured values keep their type: the field type ``any`` (what dynamic probes capture)
round-trips through record -> read_trace with its type, and the CLI compares and shows it
by each event's own value (``self_command == "GET"``, ``n > 5``, JSON null for None)."""

from __future__ import annotations

import json
import math
import re

import probe_shapes as shapes
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.cli import main
from tracemark.ctf import read_trace
from tracemark.markers.fields import MAX_REPR, ReprText


class Odd:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Odd({self.text})"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def expected(value: object) -> object:
    """What reading back an ``any`` value gives (the table in tracemark.probes.events)."""
    t = type(value)
    if value is None or t in (bool, float, bytes):
        return value
    if t is int and -(1 << 63) <= value < 1 << 63:
        return value
    if t is str:
        return re.sub("[\ud800-\udfff]", "\ufffd", value)
    if t is ReprText:  # a repr already (a probe made it): kept as it is
        return value
    text = repr(value)
    return ReprText(text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "...")


def same(got: object, want: object) -> bool:
    if type(got) is not type(want):
        return False
    if isinstance(want, float) and math.isnan(want):
        return math.isnan(got)  # type: ignore[arg-type]
    return got == want


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.integers(min_value=1 << 63, max_value=1 << 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=5),  # surrogates
    st.binary(max_size=40),
    st.text(max_size=300).map(Odd),  # a repr, cut at MAX_REPR
    st.lists(st.integers(), max_size=5),
    st.sampled_from([ReprText("<unbound: x>"), ReprText("'GET'")]),  # a probe's reprs
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(VALUES, min_size=1, max_size=12))
def test_any_values_round_trip_with_their_type(tmp_path_factory, values):
    out = tmp_path_factory.mktemp("any")
    m = tracemark.marker("anyrt.value", v="any", i=int)
    with tracemark.record(out, "anyrt.*"):
        for i, v in enumerate(values):
            m(v, i)
    got = [ev.fields for ev in read_trace(out).events()]
    assert [f["i"] for f in got] == list(range(len(values)))
    for f, v in zip(got, values, strict=True):
        want = expected(v)
        assert same(f["v"], want), (v, f["v"], want)


def test_a_repr_that_fails_is_recorded_as_saying_so(tmp_path):
    m = tracemark.marker("anyrt.bad", v="any")
    with tracemark.record(tmp_path / "t", "anyrt.*"):
        m(BadRepr())
    (ev,) = read_trace(tmp_path / "t").events()
    assert ev.fields["v"] == "<repr failed: RuntimeError>"
    assert type(ev.fields["v"]) is ReprText


@pytest.fixture
def probed_trace(tmp_path):
    """A trace of entry probes on probe_shapes.plain: a str, ints, None and an object."""
    h = tracemark.probe("probe_shapes:plain", capture=["a", "key"], name="anyv.plain")
    ret = tracemark.probe("probe_shapes:plain", at="return", name="anyv.ret")
    try:
        with tracemark.record(tmp_path / "t", "anyv.*"):
            shapes.plain(1, key="GET")
            shapes.plain(9, key="POST")
            shapes.plain(7)  # key None
            shapes.plain(3, key=("x",))  # a repr
    finally:
        tracemark.unprobe(h)
        tracemark.unprobe(ret)
    return tmp_path / "t"


def test_the_reader_gives_captured_values_typed(probed_trace):
    got = [ev.fields for ev in read_trace(probed_trace).events() if ev.name == "anyv.plain"]
    assert got == [
        {"a": 1, "key": "GET"},
        {"a": 9, "key": "POST"},
        {"a": 7, "key": None},
        {"a": 3, "key": "('x',)"},
    ]
    assert type(got[0]["key"]) is str and type(got[3]["key"]) is ReprText
    rets = [ev.fields["value"] for ev in read_trace(probed_trace).events() if ev.name == "anyv.ret"]
    assert rets == [6, 15, 9, 6]


def view(capsys, *args: str) -> list[str]:
    assert main(["view", *map(str, args)]) == 0
    return capsys.readouterr().out.splitlines()


def test_filter_compares_a_captured_value_by_its_own_type(probed_trace, capsys):
    lines = view(capsys, probed_trace, "-e", "anyv.plain", "--filter", 'key == "GET"')
    assert len(lines) == 1 and "a=1 key=GET" in lines[0]
    assert view(capsys, probed_trace, "-e", "anyv.plain", "--filter", "key == \"'GET'\"") == []
    lines = view(capsys, probed_trace, "-e", "anyv.plain", "--filter", "a > 5")
    assert [re.search(r"a=(\d+)", line)[1] for line in lines] == ["9", "7"]
    # A value of another kind in some events: those events do not match, nothing fails.
    lines = view(capsys, probed_trace, "-e", "anyv.plain", "--filter", "key > 5 or a == 3")
    assert len(lines) == 1 and "a=3 key=('x',)" in lines[0]  # a repr is shown as it is
    lines = view(capsys, probed_trace, "-e", "anyv.plain", "--filter", "key == None")
    assert len(lines) == 1 and "a=7 key=None" in lines[0]


def test_json_shows_the_typed_value(probed_trace, capsys):
    lines = view(capsys, probed_trace, "-e", "anyv.plain", "--json")
    fields = [json.loads(line)["fields"] for line in lines]
    assert fields == [
        {"a": 1, "key": "GET"},
        {"a": 9, "key": "POST"},
        {"a": 7, "key": None},
        {"a": 3, "key": "('x',)"},
    ]


def test_a_marker_object_field_keeps_its_repr_meaning(tmp_path):
    m = tracemark.marker("anyrt.obj", o=object)
    f = tracemark.marker("anyrt.fmt", "p=%r")
    with tracemark.record(tmp_path / "t", "anyrt.*"):
        m("GET")
        f(5)
    got = [ev.fields for ev in read_trace(tmp_path / "t").events()]
    assert got == [{"o": "'GET'"}, {"p": "5"}]
