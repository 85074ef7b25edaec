"""Dynamic probes: what tracemark.probe() promises, on every mechanism this Python has."""

import asyncio
import inspect
import json
import pathlib
import sys
import threading
import time
import traceback
import warnings

import probe_shapes as shapes
import pytest

import tracemark
from tracemark import probes as P
from tracemark.ctf import read_trace
from tracemark.env import PYBEHAVIOR
from tracemark.markers import registry
from tracemark.markers.fields import ReprText
from tracemark.probes import events as probe_events

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism
SHAPES = shapes.__file__


def line_of(text, path=SHAPES):
    """The line of ``path`` holding ``text`` (so no test hard-codes a line number)."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if text in line:
                return n
    raise AssertionError(text)


@pytest.fixture
def events():
    got = []
    conn = tracemark.connect("probe.*", lambda m, a: got.append((m.name, a)))
    yield got
    tracemark.disconnect(conn)


def names(events):
    return [n for n, _ in events]


# --- what each kind of probe records ---


def test_entry_records_the_arguments_as_a_marker(events):
    h = tracemark.probe("probe_shapes:plain")
    assert h.name == "probe.probe_shapes.plain.entry"
    assert [f.name for f in h.marker.fields] == ["a", "b", "rest", "key", "extra"]
    assert shapes.plain(1, 2, 3, key="ab", z=[1]) == 8
    assert events == [(h.name, (1, 2, "(3,)", "ab", "{'z': [1]}"))]
    info = tracemark.markers(h.name)[0]
    assert info.active and info.where == f"{SHAPES}:{shapes.plain.__code__.co_firstlineno}"
    (site,) = info.sites  # which mechanism serves it, and why
    assert site.startswith("entry probe on probe_shapes:plain") and P.core.REASON in site


def test_return_records_value_and_duration(events):
    h = tracemark.probe("probe_shapes:recursive", at="return")
    assert [f.name for f in h.marker.fields] == ["value", "duration_ns"]
    assert shapes.recursive(4) == 24
    assert [a[0] for _, a in events] == [1, 2, 6, 24]  # innermost returns first
    durations = [a[1] for _, a in events]
    assert all(d > 0 for d in durations)
    assert durations == sorted(durations)  # each level lasts longer than the one it called


def test_raise_records_the_exception_leaving_the_function(events):
    h = tracemark.probe("probe_shapes:fails", at="raise", capture=["x"])
    with pytest.raises(ValueError, match="bad 6"):
        shapes.fails(3)
    assert events == [(h.name, ("ValueError", "bad 6", 6))]
    assert shapes.catches(1) == "bad 2"  # caught by the caller: still left fails()
    assert len(events) == 2


def test_raise_probe_ignores_exceptions_handled_inside(events):
    tracemark.probe("probe_shapes:catches", at="raise")
    assert shapes.catches(2) == "bad 4"
    assert events == []


def test_line_probe_captures_locals_at_that_line(events):
    line = line_of("line probe with locals")
    h = tracemark.probe(f"{SHAPES}:{line}", capture=["rows", "sql", "count"])
    assert h.name == f"probe.probe_shapes.handle.line{line}"
    assert shapes.handle(shapes.Request("u"), "q") == 3
    assert events == [(h.name, ("['q', 'q']", "q", "<unbound: count>"))]


def test_line_probe_by_module_name_fires_on_every_pass(events):
    line = line_of("line probe here: once per iteration")
    tracemark.probe(f"probe_shapes:{line}", capture=["i", "acc"])
    assert shapes.loop(3) == 3
    assert [a for _, a in events] == [(0, 0), (1, 0), (2, 1)]


def test_capture_attribute_paths_and_long_reprs(events):
    tracemark.probe("probe_shapes:handle", capture=["req.url", "req", "req.missing"])
    shapes.handle(shapes.Request("http://x"), "q")
    ((_, (url, req, missing)),) = events
    assert url == "http://x"
    assert req.startswith("Request('http://x')xxx") and req.endswith("...")
    assert len(req) == probe_events.MAX_REPR == 200
    assert missing == "<AttributeError: req.missing>"


def test_two_probes_on_one_target_both_fire(events):
    a = tracemark.probe("probe_shapes:with_doc")
    b = tracemark.probe("probe_shapes:with_doc", capture=["a"])
    c = tracemark.probe("probe_shapes:with_doc", at="return")
    assert len({a.name, b.name, c.name}) == 3
    assert shapes.with_doc(5) == 5
    assert sorted(names(events)) == sorted([a.name, b.name, c.name])
    assert shapes.with_doc.__doc__ == "A docstring that must stay the docstring."


def test_given_name_is_the_marker_name(rec):
    h = tracemark.probe("json:loads", name="app.json_in", capture=["s"])
    tracemark.connect("app.*", rec)
    json.loads("[1]")
    assert rec.events == [("app.json_in", ("[1]",))]
    with pytest.raises(P.ProbeError, match="already used"):
        tracemark.probe("json:dumps", name="app.json_in")
    tracemark.unprobe(h)


# --- shapes of functions ---


def test_generator_entry_once_return_once_at_the_end(events):
    tracemark.probe("probe_shapes:gen")
    tracemark.probe("probe_shapes:gen", at="return")
    g = shapes.gen(3)
    assert list(g) == [0, 1, 2]
    assert [(n.rsplit(".", 1)[1], a[:1]) for n, a in events] == [("entry", (3,)), ("return", (3,))]


def test_coroutines_and_async_generators(events):
    for target in ("probe_shapes:coro", "probe_shapes:agen", "probe_shapes:awaits"):
        tracemark.probe(target)
        tracemark.probe(target, at="return")

    async def main():
        got = [i async for i in shapes.agen(2)]
        return got, await shapes.awaits(5)

    assert asyncio.run(main()) == ([0, 1], 12)
    seen = [(n.split(".")[2], n.rsplit(".", 1)[1], a[0]) for n, a in events]
    assert seen == [
        ("agen", "entry", 2),
        ("agen", "return", None),
        ("awaits", "entry", 5),
        ("coro", "entry", 5),
        ("coro", "return", 10),
        ("coro", "entry", 1),
        ("coro", "return", 2),
        ("awaits", "return", 12),
    ]


def test_methods_static_class_properties_and_super(events):
    for t in ("method", "static", "klass", "prop", "uses_super"):
        tracemark.probe(f"probe_shapes:Shapes.{t}")
    tracemark.probe("probe_shapes:Sub.method")
    s = shapes.Sub(10)
    assert (s.method(2), s.static(1), s.klass(2), s.prop, s.uses_super()) == (17, 0, 6, 20, "<")
    assert names(events) == [
        "probe.probe_shapes.Sub.method.entry",
        "probe.probe_shapes.Shapes.method.entry",
        "probe.probe_shapes.Shapes.static.entry",
        "probe.probe_shapes.Shapes.klass.entry",
        "probe.probe_shapes.Shapes.prop.entry",
        "probe.probe_shapes.Shapes.uses_super.entry",
    ]
    assert events[3][1] == ("<class 'probe_shapes.Sub'>", 2)


def test_nested_function_and_decorated_function(events):
    h = tracemark.probe("probe_shapes:outer.<locals>.inner", capture=["v", "k"])
    assert h.name == "probe.probe_shapes.outer.locals.inner.entry"
    assert shapes.outer(1)(2) == 3
    wrapped = shapes.decorated.__wrapped__.__code__
    d = tracemark.probe("probe_shapes:decorated")
    assert d.target.code is wrapped
    assert shapes.decorated(3, y=2) == 6
    assert events == [(h.name, (2, 1)), (d.name, (3, 2))]


# --- differential: every shape behaves the same with and without probes ---


def _run_all():
    """Call every shape; return what each returned or raised, and traceback line numbers."""
    out = []

    def attempt(fn, *args, **kw):
        try:
            out.append(("ok", fn(*args, **kw)))
        except Exception as exc:
            tb = [(f.name, f.lineno) for f in traceback.extract_tb(exc.__traceback__)][1:]
            out.append(("raised", type(exc), exc.args, tb))

    s = shapes.Sub(4)
    attempt(shapes.plain, 1, 2, 3, key="k", z=1)
    attempt(shapes.fails, 2)
    attempt(shapes.calls_fails, 3)
    attempt(shapes.with_doc, "d")
    attempt(shapes.no_return, [])
    attempt(shapes.recursive, 6)
    attempt(shapes.loop, 5)
    for n in (-1, 3, 30):
        attempt(shapes.early, n)
    attempt(s.method, 1)
    attempt(s.static, 1)
    attempt(shapes.Sub.klass, 2)
    attempt(lambda: s.prop)
    attempt(s.uses_super)
    attempt(lambda: shapes.outer(5)(6))
    attempt(lambda: list(shapes.gen(4)))
    g = shapes.gen(3)
    next(g)
    attempt(g.throw, KeyError("k"))
    attempt(lambda: asyncio.run(shapes.awaits(2)))

    async def agen_all():
        return [i async for i in shapes.agen(3)]

    attempt(lambda: asyncio.run(agen_all()))
    attempt(shapes.decorated, 4, y=5)
    attempt(shapes.catches, 7)
    attempt(shapes.handle, shapes.Request("r"), "s")
    attempt(shapes.plain)  # a TypeError at the call itself
    return out


DIFF_TARGETS = [
    "plain",
    "fails",
    "calls_fails",
    "with_doc",
    "no_return",
    "recursive",
    "loop",
    "early",
    "Shapes.method",
    "Shapes.static",
    "Shapes.klass",
    "Shapes.prop",
    "Shapes.uses_super",
    "Sub.method",
    "outer.<locals>.inner",
    "outer",
    "gen",
    "coro",
    "agen",
    "awaits",
    "decorated",
    "catches",
    "handle",
]


def test_every_shape_returns_and_raises_the_same_with_all_probes(events):
    before = _run_all()
    codes = {t: _code_of(t) for t in DIFF_TARGETS}
    for t in DIFF_TARGETS:
        for at in ("entry", "return", "raise"):
            tracemark.probe(f"probe_shapes:{t}", at=at)
    for text in ("line probe here", "line probe with locals", "the line a traceback"):
        tracemark.probe(f"probe_shapes:{line_of(text)}")
    during = _run_all()
    assert during == before
    assert len(events) > 60
    for p in P.probes():
        tracemark.unprobe(p)
    assert _run_all() == before
    assert {t: _code_of(t) for t in DIFF_TARGETS} == codes


def _code_of(target):
    return P.targets.resolve(f"probe_shapes:{target}").code


def test_traceback_names_the_original_lines(events):
    tracemark.probe("probe_shapes:fails", at="raise")
    tracemark.probe("probe_shapes:calls_fails", at="return")
    with pytest.raises(ValueError) as info:
        shapes.calls_fails(1)
    tb = traceback.extract_tb(info.value.__traceback__)
    assert [(f.name, f.lineno) for f in tb[1:]] == [
        ("calls_fails", line_of("return fails(n) + 1")),
        ("fails", line_of("the line a traceback must name")),
    ]
    assert len(events) == 1  # raise of fails; calls_fails did not return


def test_inspect_sees_the_function_as_written():
    before = (inspect.signature(shapes.plain), inspect.getsource(shapes.plain))
    tracemark.probe("probe_shapes:plain", at="return")
    with tracemark.connect("probe.*", lambda m, a: None):
        assert (inspect.signature(shapes.plain), inspect.getsource(shapes.plain)) == before
        assert shapes.plain.__code__.co_varnames == shapes.plain.__code__.co_varnames


# --- the standard library ---


def test_probing_json_loads_and_pathlib_read_text(events, tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"k": [1, 2]}')
    tracemark.probe("json:loads", capture=["s"])
    tracemark.probe("json.decoder:JSONDecoder.decode", at="return")
    tracemark.probe("pathlib:Path.read_text", capture=["self", "encoding"])
    assert json.loads(pathlib.Path(f).read_text(encoding="utf-8")) == {"k": [1, 2]}
    assert events == [
        ("probe.pathlib.Path.read_text.entry", (repr(f), "utf-8")),
        ("probe.json.loads.entry", ('{"k": [1, 2]}',)),
        ("probe.json.decoder.JSONDecoder.decode.return", ("{'k': [1, 2]}", events[2][1][1])),
    ]


# --- activity, removal ---


def _instrumented(mech, target):
    """True while the mechanism has events / a copy in place for ``target``'s code."""
    return mech.serves(target.code) != 0


def test_events_are_on_only_while_someone_listens(mech):
    h = tracemark.probe("probe_shapes:plain")
    original = shapes.plain.__code__
    assert not _instrumented(mech, h.target)
    assert shapes.plain.__code__ is original
    conn = tracemark.connect("probe.probe_shapes.*", lambda m, a: None)
    assert _instrumented(mech, h.target)
    tracemark.disconnect(conn)
    assert not _instrumented(mech, h.target)
    assert shapes.plain.__code__ is original


def test_probe_after_connect_is_enabled_at_once(events, mech):
    h = tracemark.probe("probe_shapes:plain")
    assert _instrumented(mech, h.target)
    shapes.plain(1)
    assert len(events) == 1


def test_unprobe_restores_the_original_exactly(events, mech):
    original = shapes.Shapes.method.__code__
    hs = [tracemark.probe("probe_shapes:Shapes.method", at=at) for at in ("entry", "return")]
    assert shapes.Shapes(1).method(1) == 4
    assert len(events) == 2
    for h in hs:
        assert tracemark.unprobe(h) is True
        assert tracemark.unprobe(h) is False
    assert shapes.Shapes.method.__code__ is original
    assert not _instrumented(mech, hs[0].target)
    assert shapes.Shapes(1).method(1) == 4
    assert len(events) == 2
    assert P.probes() == []
    if mech.name == "sys.monitoring":
        assert mech.tool is None
        assert all(sys.monitoring.get_tool(i) != "tracemark" for i in range(6))


def test_unprobed_code_is_untouched(events, mech):
    tracemark.probe("probe_shapes:plain")
    other = shapes.with_doc.__code__
    assert shapes.with_doc.__code__ is other
    if mech.name == "sys.monitoring":
        assert mech.serves(other) == 0
        assert sys.monitoring.get_events(mech.tool) == 0  # no global event at all


def test_probe_that_raises_does_not_break_the_program():
    tracemark.probe("probe_shapes:plain")

    def broken(marker, args):
        raise RuntimeError("probe bug")

    conn = tracemark.connect("probe.probe_shapes.plain.entry", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tracemark.TracemarkWarning)
        assert shapes.plain(1, 1) == 2
    assert conn.errors == 1


def test_capturing_a_value_whose_repr_raises(events):
    class Bad:
        def __repr__(self):
            raise RuntimeError("no")

    tracemark.probe("probe_shapes:with_doc")
    bad = Bad()
    assert shapes.with_doc(bad) is bad
    assert events[0][1] == ("<repr failed: RuntimeError>",)


# --- bad input: a clear error, nothing installed ---


def _nothing_installed(before):
    assert P.probes() == []
    assert {m.name for m in tracemark.markers("probe.*")} == before


@pytest.mark.parametrize(
    ("target", "kw", "message"),
    [
        ("no_such_module_xyz:f", {}, "there is no module named 'no_such_module_xyz'"),
        ("probe_shapes:plian", {}, r"has no attribute 'plian'; did you mean 'plain'"),
        ("probe_shapes:Shapes.methd", {}, r"did you mean 'Shapes.method'"),
        ("probe_shapes:outer.<locals>.inmer", {}, r"no function 'inmer'; did you mean 'inner'"),
        ("builtins:len", {}, "cannot probe a function without Python bytecode"),
        ("json:JSONDecoder.raw_decode.x", {}, "is a function"),
        ("json", {}, "bad probe target"),
        ("probe_shapes:CONSTANT", {}, "not a function"),
        ("probe_shapes:plain", {"capture": ["nope"]}, r"'nope' is not a local variable"),
        ("probe_shapes:plain", {"capture": ["totl"]}, r"did you mean 'total'"),
        ("probe_shapes:plain", {"at": "exit"}, "at must be one of"),
        ("probe_shapes:plain", {"at": "line"}, "give the line as"),
        ("/no/such/file.py:3", {}, "there is no file"),
    ],
)
def test_bad_input_is_a_clear_error(target, kw, message):
    before = {m.name for m in tracemark.markers("probe.*")}
    with pytest.raises(P.ProbeError, match=message):
        tracemark.probe(target, **kw)
    _nothing_installed(before)


def test_line_without_code_names_the_nearest_lines_with_code():
    blank = line_of("line probe here") + 2  # the blank line after 'return acc'
    with pytest.raises(P.ProbeError) as info:
        tracemark.probe(f"{SHAPES}:{blank}")
    assert f"line {blank} has no code" in str(info.value)
    assert f"nearest lines with code are {blank - 1} and " in str(info.value)
    with pytest.raises(P.ProbeError, match="module-level code"):
        tracemark.probe(f"{SHAPES}:{line_of('CONSTANT = 1 + 1')}")
    assert P.probes() == []


def test_recompile_refuses_code_rewritten_by_someone_else():
    P._use("recompile")  # the mechanism that owns __code__ (on every Python)
    saved = shapes.with_doc.__code__
    shapes.with_doc.__code__ = saved.replace(co_consts=(*saved.co_consts, "patched"))
    try:
        with pytest.raises(P.ProbeError, match=r"not what its source file .* compiles to"):
            tracemark.probe("probe_shapes:with_doc")
    finally:
        shapes.with_doc.__code__ = saved
    assert P.probes() == []


def test_recompile_leaves_alone_a_function_rewritten_while_probed(events):
    P._use("recompile")
    saved = shapes.with_doc.__code__
    h = tracemark.probe("probe_shapes:with_doc")
    assert shapes.with_doc.__code__ is not saved  # our copy, since events are connected
    theirs = saved.replace(co_consts=(*saved.co_consts, "theirs"))
    shapes.with_doc.__code__ = theirs  # e.g. the marker patcher
    try:
        before = tracemark.faults.counts().get(("probe-code-taken", h.name), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tracemark.TracemarkWarning)
            tracemark.unprobe(h)
        assert tracemark.faults.counts()[("probe-code-taken", h.name)] == before + 1
        assert shapes.with_doc.__code__ is theirs
        with pytest.raises(P.ProbeError, match=r"compiles to"):
            tracemark.probe("probe_shapes:with_doc")
    finally:
        shapes.with_doc.__code__ = saved
    assert P.probes() == []


def test_sysmon_takes_a_free_tool_id_never_0_or_1():
    P._use("sys.monitoring")
    if not PYBEHAVIOR.sys_monitoring:  # 3.11: the choice falls back, and says why
        assert P.mechanism().name == "recompile"
        assert P.core.REASON == "recompile: sys.monitoring isn't available in this version"
        return
    mon = sys.monitoring
    mon.use_tool_id(3, "someone else")
    try:
        tracemark.probe("probe_shapes:plain")
        assert P.mechanism().tool == 4 and mon.get_tool(4) == "tracemark"
    finally:
        for p in P.probes():
            tracemark.unprobe(p)
        mon.free_tool_id(3)
    assert mon.get_tool(4) is None


def test_nothing_is_left_when_the_marker_fields_conflict(mech):
    registry.declare("app.taken", None, {"x": int})
    with pytest.raises(P.ProbeError, match="declared at"):
        tracemark.probe("probe_shapes:plain", name="app.taken")
    assert P.probes() == []
    assert getattr(mech, "tool", None) is None  # sys.monitoring: the tool id was given back


def test_threads_call_while_probes_come_and_go():
    """Installing, enabling and removing probes while threads run the function: every call
    returns the right value, and every event seen is whole."""
    stop = threading.Event()
    errors = []
    seen = []

    def worker():
        n = 0
        while not stop.is_set():
            n += 1
            if shapes.plain(n, 1) != n + 1 or list(shapes.gen(2)) != [0, 1]:
                errors.append(n)

    def probe(marker, args):
        seen.append(args)

    conn = tracemark.connect("probe.probe_shapes.*", probe)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            hs = [tracemark.probe("probe_shapes:plain"), tracemark.probe("probe_shapes:gen")]
            time.sleep(0.001)
            for h in hs:
                tracemark.unprobe(h)
    finally:
        stop.set()
        for t in threads:
            t.join()
    tracemark.disconnect(conn)
    assert errors == []
    assert seen and all(a in {(a[0], 1, "()", None, "{}"), (2,)} for a in seen)
    assert P.probes() == []


def test_the_recorder_records_probe_events_unchanged(tmp_path):
    entry = tracemark.probe("probe_shapes:plain", capture=["a", "key"])
    ret = tracemark.probe("probe_shapes:plain", at="return")
    with tracemark.record(tmp_path / "trace", "probe.*"):
        shapes.plain(4, key="xy")
    trace = read_trace(tmp_path / "trace")
    got = [(e.name, e.fields) for e in trace.events()]
    assert [n for n, _ in got] == [entry.name, ret.name]
    assert got[0][1] == {"a": 4, "key": "xy"}  # captured values keep their type
    assert type(got[0][1]["key"]) is str
    assert got[1][1]["value"] == 8 and got[1][1]["duration_ns"] > 0


def test_a_captured_object_is_recorded_as_its_repr_once(tmp_path):
    """A probe turns an object into its repr; the recorder must not quote that text again."""
    h = tracemark.probe("probe_shapes:plain", capture=["extra", "key"])
    with tracemark.record(tmp_path / "trace", "probe.*"):
        shapes.plain(1, key=("t",), k=[1])
    (ev,) = read_trace(tmp_path / "trace").events()
    assert ev.name == h.name
    assert ev.fields == {"extra": "{'k': [1]}", "key": "('t',)"}
    assert all(type(v) is ReprText for v in ev.fields.values())  # told apart from a str


def test_raise_probes_need_the_global_unwind_event_only_while_enabled(mech):
    h = tracemark.probe("probe_shapes:fails", at="raise")
    conn = tracemark.connect(h.name, lambda m, a: None)
    if mech.name == "sys.monitoring":
        assert sys.monitoring.get_events(mech.tool) == sys.monitoring.events.PY_UNWIND
    with pytest.raises(ValueError):
        shapes.fails(1)
    assert conn.errors == 0 and tracemark.markers(h.name)[0].active
    tracemark.disconnect(conn)
    if mech.name == "sys.monitoring":
        assert sys.monitoring.get_events(mech.tool) == 0  # off again: no cost anywhere
    assert mech.serves(h.target.code) == 0
