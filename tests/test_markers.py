"""The marker core, as the README and DESIGN.md promise it."""

import gc
import sys
import warnings

import pytest

import tracemark
from tracemark import TracemarkWarning


def test_a_marker_is_active_exactly_while_a_probe_is_connected(uniq, rec):
    rx = tracemark.marker(f"{uniq}.rx", "len=%d dev=%s")
    rx(1, "a")
    (info,) = tracemark.markers(f"{uniq}.*")
    assert not info.active and rec.events == []
    h = tracemark.connect(f"{uniq}.*", rec)
    assert tracemark.markers(f"{uniq}.rx")[0].active
    rx(2, "b")
    rx(length := 3, "c")
    tracemark.disconnect(h)
    rx(4, "d")
    assert not tracemark.markers(f"{uniq}.rx")[0].active
    assert rec.events == [(f"{uniq}.rx", (2, "b")), (f"{uniq}.rx", (length, "c"))]


def test_fire_by_position_or_by_field_name(uniq, rec):
    tx = tracemark.marker(f"{uniq}.tx", length=int, dev=str)
    tracemark.connect(f"{uniq}.tx", rec)
    tx(5, "lo")
    tx(length=6, dev="eth1")
    tx(7, dev="x")
    assert [a for _, a in rec.events] == [(5, "lo"), (6, "eth1"), (7, "x")]


def test_a_marker_carries_its_declaration(uniq):
    line = sys._getframe().f_lineno + 1
    rx = tracemark.marker(f"{uniq}.rx", "len=%d")
    assert isinstance(rx, tracemark.Marker)
    assert rx.name == f"{uniq}.rx"
    assert rx.fields == (tracemark.Field("len", int),)
    assert rx.fmt == "len=%d"
    assert rx.where == f"{__file__}:{line}"


def test_inactive_marker_does_not_look_at_its_arguments(uniq):
    rx = tracemark.marker(f"{uniq}.rx", "len=%d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rx("not an int", "and one too many")  # nobody listens: nothing checked, nothing counted
    assert tracemark.markers(f"{uniq}.rx")[0].bad_arguments == 0


@pytest.mark.parametrize(
    "bad", ["", " ", "net rx", "net.*", "net.[ab]", "a..b", ".a", "a.", "1a", None, 3]
)
def test_invalid_names_say_what_a_name_is(bad):
    with pytest.raises(ValueError, match="one or more identifiers joined by dots"):
        tracemark.marker(bad)


def test_same_declaration_twice_gives_the_same_marker(uniq):
    a = tracemark.marker(f"{uniq}.x", "n=%d")
    b = tracemark.marker(f"{uniq}.x", n=int)  # same fields, other spelling
    assert a is b


def test_conflicting_declaration_names_both_places(uniq):
    a = tracemark.marker(f"{uniq}.x", "n=%d")
    with pytest.warns(tracemark.TracemarkWarning) as caught:
        b = tracemark.marker(f"{uniq}.x", "n=%s")
    text = str(caught[0].message)
    assert text.count("test_markers.py:") == 2 and "n: int" in text and "n: str" in text
    assert a.name == f"{uniq}.x" and b.name == f"test_markers.{uniq}.x"  # never mixed
    tracemark.faults.set_strict(True)  # the conftest fixture turns it off again
    with pytest.raises(ValueError, match="declared at"):
        tracemark.marker(f"{uniq}.x", "n=%f")
    assert [m.name for m in tracemark.markers(f"*{uniq}.x")] == [a.name, b.name]


def test_format_and_keywords_together_is_an_error(uniq):
    with pytest.raises(ValueError, match="not both"):
        tracemark.marker(f"{uniq}.x", "n=%d", n=int)


def test_probes_are_called_in_connection_order(uniq):
    calls = []
    m = tracemark.marker(f"{uniq}.m")
    for i in range(5):
        tracemark.connect(f"{uniq}.*", lambda mk, a, i=i: calls.append(i))
    m()
    assert calls == [0, 1, 2, 3, 4]


def test_glob_binds_markers_declared_later(uniq, rec):
    tracemark.connect(f"{uniq}.net.*", rec)
    late = tracemark.marker(f"{uniq}.net.late", "v=%d")
    other = tracemark.marker(f"{uniq}.disk.io", "v=%d")
    late(1)
    other(2)
    assert rec.events == [(f"{uniq}.net.late", (1,))]


def test_connection_is_a_context_manager(uniq, rec):
    m = tracemark.marker(f"{uniq}.m")
    with tracemark.connect(f"{uniq}.m", rec) as h:
        m()
    m()
    assert len(rec.events) == 1 and not h.connected
    assert tracemark.disconnect(h) is False  # already disconnected: harmless


def test_connect_rejects_what_cannot_work(uniq):
    with pytest.raises(TypeError, match="callable"):
        tracemark.connect(f"{uniq}.*", "not callable")
    with pytest.raises(ValueError, match="glob"):
        tracemark.connect("", print)
    with pytest.raises(TypeError, match="what connect"):
        tracemark.disconnect("nope")


def test_fields_mismatch_is_reported_and_not_connected(uniq, rec):
    tracemark.marker(f"{uniq}.a", "len=%d dev=%s")
    good = tracemark.marker(f"{uniq}.b", "len=%d dev=%s")
    bad = tracemark.marker(f"{uniq}.c", "size=%d")
    with pytest.warns(TracemarkWarning, match="expects fields"):
        h = tracemark.connect(f"{uniq}.*", rec, fields=("len", "dev"))
    assert h.mismatched == [f"{uniq}.c"]
    good(1, "x")
    bad(2)
    assert rec.events == [(f"{uniq}.b", (1, "x"))]
    assert not tracemark.markers(f"{uniq}.c")[0].active


def test_fields_can_be_checked_with_types(uniq, rec):
    tracemark.marker(f"{uniq}.a", "len=%d")
    with pytest.warns(TracemarkWarning):
        h = tracemark.connect(f"{uniq}.a", rec, fields={"len": str})
    assert h.mismatched == [f"{uniq}.a"]
    h2 = tracemark.connect(f"{uniq}.a", rec, fields="len=%d")
    assert h2.mismatched == []


def test_markers_reports_declaration_probes_and_counts(uniq, rec):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    h = tracemark.connect(f"{uniq}.m", rec)
    (info,) = tracemark.markers(f"{uniq}.m")
    assert info.name == f"{uniq}.m" and info.fmt == "n=%d" and info.probes == (h,)
    assert "test_markers.py:" in info.where
    assert (info.bad_arguments, info.dropped_nested, info.probe_errors) == (0, 0, 0)
    assert m.fields == info.fields


# --- mark(): inline --------------------------------------------------------------------------


def test_mark_declares_on_first_use_and_fires(uniq, rec):
    tracemark.connect(f"{uniq}.*", rec)
    for i in range(3):
        tracemark.mark(f"{uniq}.drop", "reason=%s n=%d", "full", i)
    tracemark.mark(f"{uniq}.start")
    assert rec.events == [(f"{uniq}.drop", ("full", i)) for i in range(3)] + [(f"{uniq}.start", ())]
    (info,) = tracemark.markers(f"{uniq}.drop")
    assert "test_markers.py:" in info.where


def test_mark_with_a_conflicting_format_is_a_counted_fault_and_never_mixed(uniq, rec):
    tracemark.connect(f"{uniq}.*", rec)
    tracemark.mark(f"{uniq}.x", "n=%d", 1)
    with pytest.warns(TracemarkWarning, match="declared at"):
        tracemark.mark(f"{uniq}.x", "n=%s", "one")  # another place: its own marker
    assert rec.events == [(f"{uniq}.x", (1,))]
    assert [m.name for m in tracemark.markers(f"*{uniq}.x")] == [
        f"{uniq}.x",
        f"test_markers.{uniq}.x",
    ]
    tracemark.faults.set_strict(True)
    with pytest.raises(ValueError):
        tracemark.mark(f"{uniq}.x", "n=%f", 1.0)


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1,), {}), ((1, "a", 3), {}), ((1,), {"dev": "a", "extra": 2}), (("1", "a"), {})]
    + [((1, b"a"), {}), ((1.5, "a"), {}), ((1,), {"len": 2})],
)
def test_wrong_arguments_are_dropped_counted_and_reported_once(uniq, rec, args, kwargs):
    rx = tracemark.marker(f"{uniq}.rx", "len=%d dev=%s")
    tracemark.connect(f"{uniq}.rx", rec)
    with pytest.warns(TracemarkWarning, match="does not fit its fields") as seen:
        rx(*args, **kwargs)
        rx(*args, **kwargs)
    assert len(seen) == 1
    assert rec.events == []
    assert tracemark.markers(f"{uniq}.rx")[0].bad_arguments == 2
    rx(1, "ok")
    assert rec.events == [(f"{uniq}.rx", (1, "ok"))]


def test_values_that_fit_a_type_without_being_exactly_it(uniq, rec):
    import enum

    class Color(enum.IntEnum):
        RED = 1

    m = tracemark.marker(f"{uniq}.m", i=int, f=float, b=bytes, flag=bool, o=object)
    tracemark.connect(f"{uniq}.m", rec)
    m(Color.RED, 2, bytearray(b"x"), 1, None)  # IntEnum is an int, an int is a real number
    m(True, 2.5, memoryview(b"y"), False, [1])
    assert len(rec.events) == 2
    with pytest.warns(TracemarkWarning):
        m(1, "2.5", b"", True, None)
    assert len(rec.events) == 2


def test_wrong_arguments_raise_in_strict_mode(uniq, rec):
    rx = tracemark.marker(f"{uniq}.rx", "len=%d")
    tracemark.connect(f"{uniq}.rx", rec)
    tracemark.faults.set_strict(True)
    with pytest.raises(tracemark.MarkerArgumentError, match="len: int"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rx("x")


def test_a_probe_that_raises_does_not_break_the_program(uniq, rec):
    def broken(marker, args):
        raise RuntimeError("boom")

    m = tracemark.marker(f"{uniq}.m", "n=%d")
    h_bad = tracemark.connect(f"{uniq}.m", broken)
    tracemark.connect(f"{uniq}.m", rec)
    with pytest.warns(TracemarkWarning, match="RuntimeError: boom") as seen:
        for i in range(3):
            m(i)
    assert len(seen) == 1  # reported once
    assert [a for _, a in rec.events] == [(0,), (1,), (2,)]  # the next probe still runs
    assert h_bad.errors == 3
    assert tracemark.markers(f"{uniq}.m")[0].probe_errors == 3


def test_a_probe_that_raises_raises_in_strict_mode(uniq):
    def broken(marker, args):
        raise RuntimeError("boom")

    m = tracemark.marker(f"{uniq}.m")
    tracemark.connect(f"{uniq}.m", broken)
    tracemark.faults.set_strict(True)
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m()


def test_keyboard_interrupt_in_a_probe_belongs_to_the_program(uniq):
    def interrupted(marker, args):
        raise KeyboardInterrupt

    m = tracemark.marker(f"{uniq}.m")
    tracemark.connect(f"{uniq}.m", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m()


def test_reporting_survives_warnings_as_errors(uniq):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    tracemark.connect(f"{uniq}.m", lambda mk, a: 1 / 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(1)  # the warning cannot be shown; the count is the record
    assert tracemark.markers(f"{uniq}.m")[0].probe_errors == 1
    assert (
        tracemark.faults.counts()[
            ("probe-error", f"{uniq}.m:{id(tracemark.markers(f'{uniq}.m')[0].probes[0].probe)}")
        ]
        == 1
    )


# --- re-entrancy -------------------------------------------------------------------------------


def test_a_probe_firing_a_marker_does_not_recurse(uniq):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    calls = []

    def echo(marker, args):
        calls.append(args)
        m(args[0] + 1)  # fires the marker it is connected to

    tracemark.connect(f"{uniq}.m", echo)
    with pytest.warns(TracemarkWarning, match="fired from inside a probe"):
        m(0)
    assert calls == [(0,)]
    assert tracemark.markers(f"{uniq}.m")[0].dropped_nested == 1


def test_reentrant_probes_nest_a_bounded_number_of_levels(uniq):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    calls = []

    def echo(marker, args):
        calls.append(args[0])
        m(args[0] + 1)

    tracemark.connect(f"{uniq}.m", echo, reentrant=True)
    with pytest.warns(TracemarkWarning):
        m(0)
    assert calls == list(range(tracemark.MAX_NESTING))
    assert tracemark.markers(f"{uniq}.m")[0].dropped_nested == 1


def test_nested_fire_reaches_only_reentrant_probes(uniq):
    outer = tracemark.marker(f"{uniq}.outer")
    inner = tracemark.marker(f"{uniq}.inner")
    plain, nesting = [], []
    tracemark.connect(f"{uniq}.outer", lambda mk, a: inner())
    tracemark.connect(f"{uniq}.inner", lambda mk, a: plain.append(mk.name))
    tracemark.connect(f"{uniq}.inner", lambda mk, a: nesting.append(mk.name), reentrant=True)
    outer()
    inner()
    assert nesting == [f"{uniq}.inner", f"{uniq}.inner"]
    assert plain == [f"{uniq}.inner"]  # only the flat call


def test_del_during_a_probe_is_handled(uniq):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    seen = []

    class Noisy:
        def __del__(self):
            m(99)

    def probe(marker, args):
        seen.append(args[0])
        if args[0] == 0:
            Noisy()  # __del__ runs right here, inside the probe
            gc.collect()

    tracemark.connect(f"{uniq}.m", probe, reentrant=True)
    m(0)
    m(1)
    assert seen == [0, 99, 1]


# --- probes bound per marker -------------------------------------------------------------------


class Binder:
    """A probe that specialises itself per marker, and can be told to fail doing so."""

    def __init__(self, fail_for=(), returns=None):
        self.bound = []
        self.calls = []
        self.fail_for = fail_for
        self.returns = returns

    def __call__(self, marker, args):  # pragma: no cover - the registry always binds
        raise AssertionError("the registry should call what bind_marker() returned")

    def bind_marker(self, marker):
        self.bound.append(marker.name)
        if marker.name in self.fail_for:
            raise RuntimeError("cannot bind")
        if self.returns is not None:
            return self.returns

        def bound(mk, args, name=marker.name):
            self.calls.append((name, mk is marker, args))

        return bound


def test_a_probe_with_bind_is_bound_once_per_marker_even_declared_later(uniq):
    early = tracemark.marker(f"{uniq}.early", "v=%d")
    b = Binder()
    h = tracemark.connect(f"{uniq}.*", b)
    late = tracemark.marker(f"{uniq}.late", "v=%d")
    for v in range(3):
        early(v)
        late(v)
    assert sorted(b.bound) == [f"{uniq}.early", f"{uniq}.late"]  # once each, not per event
    assert b.calls == [(f"{uniq}.{n}", True, (v,)) for v in range(3) for n in ("early", "late")]
    tracemark.disconnect(h)
    early(9)
    assert len(b.calls) == 6 and not tracemark.markers(f"{uniq}.early")[0].active
    # Connecting again binds again (a disconnected binding is forgotten).
    tracemark.connect(f"{uniq}.early", b)
    early(10)
    assert b.bound.count(f"{uniq}.early") == 2 and b.calls[-1] == (f"{uniq}.early", True, (10,))


def test_a_bind_that_fails_is_counted_against_the_connection(uniq):
    good = tracemark.marker(f"{uniq}.good", "v=%d")
    bad = tracemark.marker(f"{uniq}.bad", "v=%d")
    b = Binder(fail_for=(f"{uniq}.bad",))
    with pytest.warns(TracemarkWarning, match="could not bind"):
        h = tracemark.connect(f"{uniq}.*", b)
    good(1)
    bad(2)
    assert h.errors == 1 and [c[0] for c in b.calls] == [f"{uniq}.good"]
    assert not tracemark.markers(f"{uniq}.bad")[0].active  # not connected to it
    with pytest.warns(TracemarkWarning, match="not callable"):
        h2 = tracemark.connect(f"{uniq}.good", Binder(returns=42))
    assert h2.errors == 1


def test_a_bound_callable_that_raises_is_counted_against_its_connection(uniq):
    m = tracemark.marker(f"{uniq}.m", "v=%d")

    def boom(marker, args):
        raise ValueError("boom")

    h = tracemark.connect(f"{uniq}.m", Binder(returns=boom))
    with pytest.warns(TracemarkWarning, match="boom"):
        m(1)
    m(2)
    assert h.errors == 2 and tracemark.markers(f"{uniq}.m")[0].probe_errors == 2


# --- bindings: separate depth-0 and nested callables, fused inline bodies ----------------------


class Fused:
    """A probe that binds a depth-0 function, a nested one and an inline body, each of which
    notes which path ran; the inline body can be made to raise."""

    def __init__(self, fail=False):
        self.events = []
        self.fail = fail

    def __call__(self, marker, args):  # pragma: no cover - the registry always binds
        raise AssertionError("the registry should call what bind_marker() returned")

    def bind_marker(self, marker):
        from tracemark.markers.dispatch import Binding, Inline

        names = ", ".join(f.name for f in marker.fields)
        body = f"_in.note('inline', ({names},))\n"
        if self.fail:
            body = "_in.note('inline', 1 / 0)\n"
        return Binding(
            top=lambda mk, args: self.note("top", args),
            nested=lambda mk, args: self.note("nested", args),
            inline=Inline(body, {}, self),
        )

    def note(self, path, args):
        self.events.append((path, args))


def test_an_inline_body_runs_fused_only_while_it_is_the_only_probe(uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, s=str)
    core = m.__tracemark__
    plain = m.__code__
    p = Fused()
    h = tracemark.connect(f"{uniq}.*", p)
    assert m.__code__ is not plain  # fused
    m(1, "a")
    m(n=2, s="b")  # keywords take the general path: the depth-0 callable
    other = tracemark.connect(f"{uniq}.*", lambda mk, args: None)
    m(3, "c")  # two probes: the loop, which calls the depth-0 callable
    tracemark.disconnect(other)
    m(4, "d")
    assert p.events == [
        ("inline", (1, "a")),
        ("top", (2, "b")),
        ("top", (3, "c")),
        ("inline", (4, "d")),
    ]
    tracemark.disconnect(h)
    assert m.__code__ is plain
    assert all(core.namespace[slot] is None for slot, _ in core.fused.values())
    m(5, "e")
    assert len(p.events) == 4


def test_nested_events_reach_the_nested_callable_of_a_reentrant_binding(uniq):
    m = tracemark.marker(f"{uniq}.m", n=int)
    p = Fused()

    def fires(marker, args):
        if args[0] == 0:
            m(1)  # inside a probe: depth 1

    tracemark.connect(f"{uniq}.m", fires)
    tracemark.connect(f"{uniq}.*", p, reentrant=True)
    m(0)
    assert p.events == [("nested", (1,)), ("top", (0,))]


def test_an_inline_body_that_raises_is_counted_against_its_connection(uniq):
    m = tracemark.marker(f"{uniq}.m", n=int)
    p = Fused(fail=True)
    h = tracemark.connect(f"{uniq}.*", p)
    with pytest.warns(TracemarkWarning, match=r"probe <.*Fused.*ZeroDivisionError"):
        m(1)
    m(2)
    info = tracemark.markers(f"{uniq}.m")[0]
    assert info.probe_errors == 2 and h.errors == 2


# Every name the generated firing code uses: a field may be called any of them.
GENERATED_NAMES = sorted(
    {"state", "depth", "args", "probe", "exc", "int", "str", "float", "bytes", "bool", "len"}
    | {"KeyError", "AttributeError", "Exception", "MAX_NESTING", "marker", "fire", "ch", "pos"}
)


def test_fields_may_be_named_like_anything_the_generated_code_uses(uniq):
    fields = {name: (int if i % 2 else str) for i, name in enumerate(GENERATED_NAMES)}
    m = tracemark.marker(f"{uniq}.m", **fields)
    values = tuple(i if t is int else f"v{i}" for i, t in enumerate(fields.values()))
    got = []
    for probe in (lambda mk, args: got.append(args), Fused()):
        h = tracemark.connect(f"{uniq}.*", probe)
        m(*values)
        m(**dict(zip(fields, values, strict=True)))
        tracemark.disconnect(h)
    assert got == [values, values]
    assert probe.events == [("inline", values), ("top", values)]


def test_a_lone_probe_is_called_straight_from_the_firing_function(uniq):
    """With one probe the loop is compiled away (a direct call); with two it is back; both
    deliver the same events, and a failing lone probe is counted against its connection."""
    m = tracemark.marker(f"{uniq}.m", n=int)
    plain = m.__code__
    seen = []
    h = tracemark.connect(f"{uniq}.m", lambda marker, args: seen.append(("one", args)))
    assert m.__code__ is not plain
    m(1)
    h2 = tracemark.connect(f"{uniq}.m", lambda marker, args: seen.append(("two", args)))
    assert m.__code__ is plain
    m(2)
    tracemark.disconnect(h2)
    m(3)
    assert seen == [("one", (1,)), ("one", (2,)), ("two", (2,)), ("one", (3,))]
    tracemark.disconnect(h)

    def fails(marker, args):
        raise KeyError(args)

    h3 = tracemark.connect(f"{uniq}.m", fails)
    with pytest.warns(TracemarkWarning, match="fails.*KeyError"):
        m(4)
    assert h3.errors == 1 and tracemark.markers(f"{uniq}.m")[0].probe_errors == 1


def test_generated_code_is_compiled_once_per_source(uniq):
    # A thousand markers with the same fields share one compiled firing code: declaring
    # them, and fusing a recording into them (an attach on 1,000 sites), costs one compile.
    import linecache

    a = tracemark.marker(f"{uniq}.a", n=int, s=str)
    b = tracemark.marker(f"{uniq}.b", n=int, s=str)
    c = tracemark.marker(f"{uniq}.c", n=int)
    assert a.__code__ is b.__code__ and a.__code__ is not c.__code__
    got = []
    tracemark.connect(f"{uniq}.*", lambda m, args: got.append((m.name, args)))
    a(1, "x")
    b(2, "y")  # shared code, each marker its own globals: its own name and probes
    assert got == [(f"{uniq}.a", (1, "x")), (f"{uniq}.b", (2, "y"))]
    # A generated source dropped from linecache (clearcache() drops them all; here only this
    # one, so other tests keep theirs) is registered again by the next compile of it.
    filename = a.__code__.co_filename
    assert filename.startswith("<tracemark") and filename in linecache.cache
    del linecache.cache[filename]
    d = tracemark.marker(f"{uniq}.d", n=int, s=str)
    assert d.__code__ is a.__code__ and filename in linecache.cache
