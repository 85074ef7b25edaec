"""The entry probes' C path (tracemark/_speedups_probes.c): the same events as the pure path,
for every program, on every mechanism; taken when it can be; no leak.

The differential tests trace one program twice in this process, once with the pure core
(``TRACEMARK_CORE=python`` when the probe is made and the recording binds: no C anywhere)
and once with the C core, and compare the decoded events (timestamps aside).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import math
import os
import sys
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_speedups import CAN_BUILD

import tracemark
from tracemark import env
from tracemark.ctf import read_trace

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism

HERE = __name__


def target(a, b):
    return a


def one(a, b):
    return b


def later(a):
    x = a  # noqa: F841 (captured by name: unbound at entry)
    return a


def recursive(n, tag):
    return 0 if n <= 0 else 1 + recursive(n - 1, tag)


def gen(a, b):
    yield a
    yield b


async def coro(a, b):
    await asyncio.sleep(0)
    return a


def outer(a):
    def inner():
        return a  # a is a cell variable of outer

    return inner()


class Color(enum.IntEnum):
    RED = 1


class Weird:
    def __repr__(self):
        raise ValueError("no repr")


def _use_the_c_core(monkeypatch) -> None:
    """These tests are about the C path: they ask for the C core whatever the pass runs
    under (TRACEMARK_CORE=python too), and fail, never skip, where it can be built and was
    not (a machine without a compiler has no C path to test)."""
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    if env.core()[0] != "c":
        if CAN_BUILD:
            pytest.fail("the C core can be built here and was not (setup.py build_ext)")
        pytest.skip("no C compiler here: the C core cannot be built")


def _comparable(v):
    if isinstance(v, float) and math.isnan(v):
        return ("float", "nan")
    return (type(v).__name__, repr(v))


def _trace(tmp_path, monkeypatch, core, program, probes, name="t"):
    """Run program() with probes [(target, kwargs)] and a recording of every probe marker;
    the events decoded (name, fields) with the pid/tid/timestamp left out."""
    if core == "python":
        monkeypatch.setenv(env.CORE_VARIABLE, "python")
    else:
        monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    hs = [tracemark.probe(f"{HERE}:{t}", **kw) for t, kw in probes]
    path = tmp_path / f"{name}-{core}"
    rec = tracemark.record(str(path), "probe.*")
    try:
        program()
    finally:
        rec.stop()
        for h in hs:
            tracemark.unprobe(h)
    return [
        (ev.name, [(k, _comparable(v)) for k, v in ev.fields.items()])
        for ev in read_trace(path).events()
    ]


def _differential(tmp_path, monkeypatch, program, probes, name="t", ordered=True):
    _use_the_c_core(monkeypatch)
    pure = _trace(tmp_path, monkeypatch, "python", program, probes, name)
    fast = _trace(tmp_path, monkeypatch, "c", program, probes, name)
    if not ordered:  # threads: the streams' interleaving is the scheduler's
        pure, fast = sorted(pure), sorted(fast)
    assert fast == pure
    return fast


plain = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers()  # beyond int64: the pure path's repr
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()  # surrogates included: declined, the pure path repairs
    | st.binary()
)
anything = plain | st.sampled_from([Color.RED, [1, 2], Weird(), 2.5j, bytearray(b"x")])


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(calls=st.lists(st.tuples(anything, anything), min_size=1, max_size=12))
def test_the_same_events_as_the_pure_path_for_any_values(tmp_path_factory, monkeypatch, calls):
    tmp = tmp_path_factory.mktemp("diff")

    def program():
        for a, b in calls:
            target(a, b)
            one(a, b)

    evs = _differential(tmp, monkeypatch, program, [("target", {}), ("one", {"capture": ["b"]})])
    assert len(evs) == 2 * len(calls)


def test_the_same_events_for_the_shapes_the_c_path_must_decline_or_match(tmp_path, monkeypatch):
    """Unbound locals, cells, recursion, generators (entry once, at the first resume),
    coroutines in asyncio tasks (the task bookkeeping is the pure path's), and a capture of
    an attribute path (no C path) beside plain ones."""

    def program():
        later(1)
        outer("cell")
        recursive(5, "r")
        g = gen("g1", "g2")
        assert list(g) == ["g1", "g2"]
        assert asyncio.run(coro("c", 2)) == "c"
        coro_outside = coro("outside", 1)
        coro_outside.close()  # never started: no entry event on either path
        target("x", b"y")

    probes = [
        ("later", {"capture": ["a", "x"]}),
        ("outer", {}),
        ("outer.<locals>.inner", {"capture": ["a"]}),  # a free variable
        ("recursive", {}),
        ("gen", {}),
        ("coro", {}),
        ("target", {"capture": ["a", "a.__class__"]}),
    ]
    evs = _differential(tmp_path, monkeypatch, program, probes)
    names = [n for n, _ in evs if n.startswith("probe.")]
    assert names.count(f"probe.{HERE}.recursive.entry") == 6
    assert names.count(f"probe.{HERE}.gen.entry") == 1
    assert names.count(f"probe.{HERE}.coro.entry") == 1


def test_many_threads_lose_nothing_and_match(tmp_path, monkeypatch):
    def program():
        def work(t):
            for i in range(2000):
                target(t, i)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    evs = _differential(tmp_path, monkeypatch, program, [("target", {})], ordered=False)
    by_thread: dict[object, list] = {}
    for _, fields in evs:
        by_thread.setdefault(fields[0][1], []).append(fields[1][1])
    assert sorted(by_thread) == sorted(("int", repr(t)) for t in range(4))
    assert all(
        sorted(v) == sorted(("int", repr(i)) for i in range(2000)) for v in by_thread.values()
    )


def test_small_sub_buffers_switch_through_the_pure_path(tmp_path, monkeypatch):
    """An event that does not fit is declined (ch.switch is Python): none is lost."""
    _use_the_c_core(monkeypatch)
    h = tracemark.probe(f"{HERE}:target")
    path = tmp_path / "small"
    rec = tracemark.record(str(path), "probe.*", subbuffer_size=4096, subbuffers=64)
    try:
        for i in range(20_000):
            target(i, "x" * (i % 50))
    finally:
        summary = rec.stop()
        tracemark.unprobe(h)
    evs = [ev.fields["a"] for ev in read_trace(path).events() if ev.name == h.name]
    assert len(evs) + summary.discarded == 20_000  # every event written or counted
    assert evs == sorted(evs) and len(set(evs)) == len(evs)


def _pure_runs(mech, h, func, *args):
    """How many times func(*args) ran the probe's pure path: the generated emitters and
    firing functions (files "<tracemark ...>") seen by sys.setprofile on 3.11's recompiled
    code; on sys.monitoring (whose callbacks no profiler sees) the Python PY_START handler,
    counted by a stand-in in its table."""
    runs = []
    if mech.name == "sys.monitoring":
        code = h.code
        handler = mech._start[code]

        def counting():
            runs.append(1)
            h.emit_frame(sys._getframe(2))  # 0: this, 1: _on_start, 2: the probed frame

        mech._start = {**mech._start, code: counting}
        try:
            func(*args)
        finally:
            mech._start = {**mech._start, code: handler}
        return len(runs)

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith("<tracemark"):
            runs.append(1)

    sys.setprofile(prof)
    try:
        func(*args)
    finally:
        sys.setprofile(None)
    return len(runs)


def test_a_plain_event_runs_no_python_code(tmp_path, mech, monkeypatch):
    """With the C core a plain event runs no Python code of tracemark's; what it declines
    runs the pure path."""
    _use_the_c_core(monkeypatch)
    h = tracemark.probe(f"{HERE}:target")
    assert h.c_entry is not None
    rec = tracemark.record(str(tmp_path / "t"), "probe.*")
    try:
        target(0, 0)  # the first event of a thread makes its channel (the pure path)
        assert _pure_runs(mech, h, target, 1, "two") == 0
        # Declined: a value of no plain type takes the pure path (its repr).
        assert _pure_runs(mech, h, target, [1], "two") >= 1
        # Another consumer of the marker: no fused recorder body, the pure path.
        got = []
        conn = tracemark.connect(h.name, lambda m, a: got.append(a))
        assert _pure_runs(mech, h, target, 3, "four") >= 1
        tracemark.disconnect(conn)
        assert got == [(3, "four")]
        assert _pure_runs(mech, h, target, 5, "six") == 0
    finally:
        rec.stop()
        tracemark.unprobe(h)
    vals = [tuple(ev.fields.values()) for ev in read_trace(tmp_path / "t").events()]
    assert vals == [(0, 0), (1, "two"), ("[1]", "two"), (3, "four"), (5, "six")]


def test_disabled_and_removed_probes_record_nothing_more(tmp_path, monkeypatch):
    _use_the_c_core(monkeypatch)
    h = tracemark.probe(f"{HERE}:target")
    made_while_probed = type(target)(target.__code__, target.__globals__)
    rec = tracemark.record(str(tmp_path / "t"), "probe.*")
    try:
        target(1, 1)
        target(2, 2)
        tracemark.unprobe(h)
        target(3, 3)
        made_while_probed(4, 4)  # 3.11: instrumented code, its probe retired
    finally:
        rec.stop()
    vals = [ev.fields["a"] for ev in read_trace(tmp_path / "t").events()]
    assert vals == [1, 2]


@pytest.mark.serial
def test_a_million_hits_leak_nothing(tmp_path, monkeypatch):
    _use_the_c_core(monkeypatch)
    h = tracemark.probe(f"{HERE}:target")
    rec = tracemark.record(str(tmp_path / "t"), "probe.*", mode="overwrite")
    value = "a captured string"
    try:
        for _ in range(10_000):
            target(value, 7)
        gc.collect()
        refs = sys.getrefcount(value)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        rss0 = _rss()
        for _ in range(1_000_000):
            target(value, 7)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        rss1 = _rss()
        assert sys.getrefcount(value) == refs
    finally:
        rec.stop()
        tracemark.unprobe(h)
    assert grown < 64 * 1024, grown
    assert rss1 - rss0 < 8 * 1024 * 1024, rss1 - rss0


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
