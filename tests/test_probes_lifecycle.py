"""Dynamic probes over a long life: removal leaves nothing that fires or grows, and probing
stays cheap (issue 16). A fork child and the probe locks: tests/test_fork_locks.py."""

import os
import time
import types

import probe_shapes as shapes
import pytest

import tracemark

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism


# --- copies of an instrumented function after unprobe (issue 16) ---


def _line_of(text):
    with open(shapes.__file__) as f:
        return next(n for n, line in enumerate(f, 1) if text in line)


def _call_fails(f):
    with pytest.raises(ValueError):
        f(1)


@pytest.mark.parametrize(
    "target, kw, call",
    [
        ("probe_shapes:plain", {}, lambda f: f(1, 2)),
        ("probe_shapes:plain", {"capture": []}, lambda f: f(1, 2)),
        ("probe_shapes:plain", {"capture": ["total", "key"]}, lambda f: f(1, 2)),
        ("probe_shapes:plain", {"at": "return"}, lambda f: f(1, 2)),
        ("probe_shapes:fails", {"at": "raise"}, _call_fails),
        (f"probe_shapes:{_line_of('acc += i  # line probe')}", {}, lambda f: f(3)),
    ],
    ids=["entry-args", "entry-bare", "entry-locals", "return", "raise", "line"],
)
def test_a_copy_made_while_probed_never_fires_after_unprobe(mech, target, kw, call):
    got = []
    conn = tracemark.connect("probe.*", lambda m, a: got.append(m.name))
    h = tracemark.probe(target, **kw)
    func = h.target.owner
    copy = types.FunctionType(func.__code__, func.__globals__, "copy", func.__defaults__)
    copy.__kwdefaults__ = func.__kwdefaults__
    call(copy)
    assert got and set(got) == {h.name}  # the copy fires while the probe is installed
    assert tracemark.unprobe(h)
    got.clear()
    call(copy)
    call(func)
    assert got == []
    again = tracemark.probe(target, **kw)  # a new probe, maybe of the same marker name
    call(copy)
    if mech.name == "recompile":
        assert got == []  # the old copy serves neither the removed probe nor the new one
    else:
        assert set(got) == {again.name}  # events belong to the code: the copy is probed too
    got.clear()
    call(func)
    assert got and set(got) == {again.name}
    tracemark.unprobe(again)
    tracemark.disconnect(conn)


# --- a probe's marker goes with it (issue 16) ---


@pytest.fixture
def many(tmp_path, monkeypatch):
    """A module of 3,400 distinct functions to probe."""
    name = f"many_{os.getpid()}_{time.monotonic_ns()}"
    body = "".join(f"def f{i}(a, b):\n    return a + b\n\n\n" for i in range(3400))
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.serial
def test_removed_probes_leave_no_marker_and_no_memory_behind(mech, many):
    import gc
    import importlib
    import tracemalloc

    module = importlib.import_module(many)
    conn = tracemark.connect("probe.*", lambda m, a: None)  # binds every probe's marker

    def cycles(start, stop):
        for i in range(start, stop):
            h = tracemark.probe(f"{many}:f{i}")
            assert getattr(module, f"f{i}")(i, 1) == i + 1
            tracemark.unprobe(h)

    cycles(0, 400)  # warm-up: caches of layouts, emitter code, interned names
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cycles(400, 3400)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        tracemark.disconnect(conn)
    assert grown < 1_000_000, f"{grown:,} bytes kept by 3,000 probe/unprobe cycles"
    assert tracemark.markers(f"probe.{many}.*") == []


def test_unprobe_forgets_the_marker_and_a_glob_binds_the_next_probe(mech):
    got = []
    conn = tracemark.connect("probe.probe_shapes.*", lambda m, a: got.append((m.name, a)))
    h = tracemark.probe("probe_shapes:with_doc")
    assert [i.name for i in tracemark.markers("probe.probe_shapes.with_doc.*")] == [h.name]
    tracemark.unprobe(h)
    assert tracemark.markers("probe.probe_shapes.with_doc.*") == []
    h.marker(1)  # a stale firing function does nothing
    assert got == []
    h2 = tracemark.probe("probe_shapes:with_doc", capture=[])  # same name, other fields
    assert h2.name == h.name
    shapes.with_doc(5)
    assert got == [(h.name, ())]
    tracemark.unprobe(h2)
    tracemark.disconnect(conn)


def test_a_marker_declared_by_code_stays_after_the_probe_that_reused_it(mech, uniq):
    name = f"{uniq}.entry"
    m = tracemark.marker(name, a="any")  # a probe's captures are of type any
    h = tracemark.probe("probe_shapes:with_doc", name=name)
    assert h.marker is m
    tracemark.unprobe(h)
    assert [i.name for i in tracemark.markers(name)] == [name]


def test_a_recording_across_removed_probes_stays_readable(mech, tmp_path):
    from tracemark.ctf import read_trace

    rec = tracemark.record(str(tmp_path / "t"), "probe.*")
    h = tracemark.probe("probe_shapes:plain")
    shapes.plain(1, 2)
    tracemark.unprobe(h)
    h2 = tracemark.probe("probe_shapes:plain", capture=["a", "total"])  # same name, new fields
    shapes.plain(3, 4)
    tracemark.unprobe(h2)
    h3 = tracemark.probe("probe_shapes:plain")  # the first fields again
    shapes.plain(5, 6)
    tracemark.unprobe(h3)
    rec.stop()
    events = [(e.name, dict(e.fields)) for e in read_trace(str(tmp_path / "t")).events()]
    assert h.name == h2.name == h3.name
    assert [f for _, f in events] == [
        {"a": 1, "b": 2, "rest": "()", "key": None, "extra": "{}"},  # typed, else reprs
        {"a": 3, "total": "<unbound: total>"},  # entry: before it is bound
        {"a": 5, "b": 6, "rest": "()", "key": None, "extra": "{}"},
    ]
