"""``@q`` on a function: a span fired by the dynamic-probe machinery, free while inactive."""

from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest

import tracemark
from tracemark import probes as P
from tracemark.analysis import End, Pairing
from tracemark.ctf import read_trace

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism

BODY = """\
import asyncio
import tracemark

q = tracemark.span("{u}.q", table=str)
inner = tracemark.span("{u}.inner")
mark = tracemark.marker("{u}.mark", n=int)

@q
def plain(table, depth=0):
    if depth:
        return plain(table, depth - 1)
    return len(table)

@q
def raises(table):
    raise KeyError(table)

@q
def gen(table):
    try:
        yield 1
        yield 2
    finally:
        pass

@q
async def coro(table):
    await asyncio.sleep(0)
    return table

class C:
    @q
    def method(self, table):
        return table

    @staticmethod
    @q
    def static_inside(table):
        return table

    @q
    @staticmethod
    def static_outside(table):
        return table

    @q
    @classmethod
    def cls_outside(cls, table):
        return cls.__name__ + table

@q
@inner
def both(table):
    return table

@q
def with_statements(table, n):
    mark(n)
    inner.begin()
    inner.end()
    return n
"""


@pytest.fixture
def mod(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"decomod_{uniq}.py"
    src.write_text(BODY.format(u=uniq))
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(src.stem)


def _serving(mech, func) -> int:
    if mech.name == "sys.monitoring":
        return mech.serves(func.__code__)
    return mech.serves(P.patcher.original_code(func))


def test_the_decorator_returns_what_it_was_given(mod):
    assert mod.C.__dict__["static_inside"].__func__.__name__ == "static_inside"
    assert isinstance(mod.C.__dict__["static_outside"], staticmethod)
    assert isinstance(mod.C.__dict__["cls_outside"], classmethod)
    assert type(mod.plain) is type(lambda: 0) and mod.plain.__qualname__ == "plain"
    assert mod.plain("ab", 3) == 2  # runs, inactive


def test_begin_on_entry_end_on_return_raise_and_close(mod, rec, uniq):
    q = f"{uniq}.q"
    with tracemark.connect(f"{uniq}.q.*", rec):
        assert mod.plain("ab", 1) == 2  # recursion: nested pairs
        with pytest.raises(KeyError):
            mod.raises("x")
        assert list(mod.gen("g")) == [1, 2]
        it = mod.gen("closed")
        next(it)
        it.close()  # the end fires when the generator is closed early
        assert asyncio.run(mod.coro("co")) == "co"
        c = mod.C()
        assert c.method("m") == "m" and mod.C.static_inside("si") == "si"
        assert mod.C.static_outside("so") == "so" and mod.C.cls_outside("co2") == "Cco2"
    b, e = (f"{q}.begin", ("ab",)), (f"{q}.end", ())
    expected = [b, b, e, e]
    for table in ["x", "g", "closed", "co", "m", "si", "so", "co2"]:
        expected += [(f"{q}.begin", (table,)), e]
    assert rec.events == expected


def test_two_spans_on_one_function_nest(mod, rec, uniq):
    with tracemark.connect(f"{uniq}.*", rec):
        assert mod.both("t") == "t"
    assert [n for n, _ in rec.events] == [
        f"{uniq}.q.begin",
        f"{uniq}.inner.begin",
        f"{uniq}.inner.end",
        f"{uniq}.q.end",
    ]


def test_inactive_costs_nothing_and_disconnect_restores_the_code(mod, mech, rec, uniq):
    original = mod.plain.__code__
    assert _serving(mech, mod.plain) == 0
    conn = tracemark.connect(f"{uniq}.q.end", rec)  # either marker switches the span on
    assert _serving(mech, mod.plain)
    mod.plain("a")
    assert rec.events == [(f"{uniq}.q.end", ())]
    tracemark.disconnect(conn)
    assert mod.plain.__code__ is original and _serving(mech, mod.plain) == 0
    mod.plain("a")
    assert len(rec.events) == 1
    assert P.decorated.enabled() == []
    if mech.name == "sys.monitoring" and not P.probes():
        assert mech.tool is None  # the tool id is given back
        assert all(sys.monitoring.get_tool(i) != "tracemark" for i in range(6))


def test_a_function_with_marker_statements_is_patched_again_after(mod, rec, uniq):
    f = mod.with_statements
    original = f.__code__
    assert f("t", 1) == 1 and f("t", 2) == 2
    patched = f.__code__
    assert patched is not original  # the patcher jumps over mark(n) and inner.begin/end
    with tracemark.connect(f"{uniq}.q.*", rec):
        assert f.__code__ is not patched  # suspended: the original (plus probe) runs
        assert f("t", 3) == 3
    assert rec.events == [(f"{uniq}.q.begin", ("t",)), (f"{uniq}.q.end", ())]
    assert f("t", 4) == 4
    assert f.__code__ is patched  # the variant is back
    with tracemark.connect(f"{uniq}.*", rec):
        f("u", 5)
    assert [n for n, _ in rec.events[2:]] == [
        f"{uniq}.q.begin",
        f"{uniq}.mark",
        f"{uniq}.inner.begin",
        f"{uniq}.inner.end",
        f"{uniq}.q.end",
    ]


def test_a_field_without_an_argument_is_a_value_error_naming_it(uniq):
    q = tracemark.span(f"{uniq}.q", table=str, rows=int)
    with pytest.raises(ValueError, match=r"field 'rows' .* no argument of that name"):

        @q
        def f(table):
            pass

    with pytest.raises(TypeError, match="decorates a Python function"):
        q(staticmethod(len))  # no Python code to probe
    assert q(len).__enter__() is None  # not a function: an ordinary ``with q(...)``
    req = contextvars.ContextVar(f"{uniq}_req")
    c = tracemark.span(f"{uniq}.c", table=str, req=tracemark.context(req, int))

    @c  # a context field needs no argument
    def g(table):
        return table

    assert g("x") == "x"


def test_values_are_passed_as_they_are_and_checked_by_the_marker(uniq, rec, mod):
    with tracemark.connect(f"{uniq}.q.*", rec), pytest.warns(tracemark.TracemarkWarning):
        mod.plain(["a", "list"])  # a list for a str field: a bad-arguments fault
    (info,) = tracemark.markers(f"{uniq}.q.begin")
    assert info.bad_arguments == 1
    assert rec.events == [(f"{uniq}.q.end", ())]


def test_markers_lists_the_decorated_functions_as_sites(mod, uniq):
    (info,) = tracemark.markers(f"{uniq}.q.begin")
    shown = [s for s in info.sites if isinstance(s, str) and "plain" in s]
    assert len(shown) == 1 and "events off" in shown[0] and shown[0].startswith(f"@{uniq}.q on")
    with tracemark.connect(f"{uniq}.q.begin", lambda m, a: None):
        (info,) = tracemark.markers(f"{uniq}.q.end")
        assert any("plain" in s and s.endswith("enabled") for s in info.sites)


def test_recorded_decorated_calls_pair_with_durations(mod, tmp_path, uniq):
    with tracemark.record(tmp_path / "rec", f"{uniq}.*"):
        mod.plain("abc", 2)
        with pytest.raises(KeyError):
            mod.raises("k")
    events = list(read_trace(tmp_path / "rec").events())
    p = Pairing()
    ends = [i for i in p.pair(events) if isinstance(i, End)]
    assert p.unmatched == p.unfinished == 0
    assert [e.depth for e in ends] == [2, 1, 0, 0]
    assert [e.begin.fields["table"] for e in ends] == ["abc", "abc", "abc", "k"]
    assert all(e.duration >= 0 for e in ends)


def test_with_q_still_takes_functions_given_otherwise(uniq, rec):
    q = tracemark.span(f"{uniq}.q", fn=object, n=int)

    def f():
        pass

    with tracemark.connect(f"{uniq}.q.*", rec):
        with q(f, 1):  # a function with more arguments: the with form
            pass
        with q(fn=f, n=2):
            pass
        with q(print, 3):  # a builtin is not decorated either
            pass
    assert [a for _, a in rec.events] == [(f, 1), (), (f, 2), (), (print, 3), ()]
