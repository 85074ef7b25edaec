"""The C firing path (tracemark/_speedups_fire.c): a recorded marker's common event in one C
call, every other event on the Python path, and every dispatch guarantee kept.

Each test states one guarantee of tracemark/_speedups_fire.c's header and runs on the C
core (they fail, never skip, where the C core could be built and was not). Which path an
event took is read from ``_speedups.fast_events()`` (the events the C path recorded).
"""

from __future__ import annotations

import contextvars
import gc
import inspect
import os
import signal
import sys
import threading
import time
import types

import pytest
from test_speedups import CAN_BUILD

import tracemark
from tracemark import env, faults
from tracemark.ctf import read_trace
from tracemark.markers import dispatch, registry

HOOKED = sys.version_info >= (3, 12)  # the function's own calls are routed to C (else prologue)


@pytest.fixture(autouse=True)
def c_core(monkeypatch):
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    if not CAN_BUILD:
        pytest.fail("these tests need the C core, which cannot be built here")
    assert env.core()[0] == "c"


def fast() -> int:
    from tracemark import _speedups

    return _speedups.fast_events()


def installed(m) -> bool:
    from tracemark import _speedups

    return _speedups.installed(m)


def is_fire(obj) -> bool:
    from tracemark import _speedups

    return type(obj) is _speedups.Fire


def events(path, name=None):
    return [
        (ev.name, tuple(ev.fields.values()))
        for ev in read_trace(path).events()
        if name is None or ev.name == name
    ]


def test_the_common_event_is_recorded_by_one_c_call(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, s=str, x=float)
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m(0, "first", 0.0)  # makes this thread's channel: the Python path
        assert is_fire(m.__globals__["_fast"])
        assert installed(m) is HOOKED
        assert ("_fast" in m.__code__.co_names) is not HOOKED  # 3.11: the prologue
        before = fast()
        for i in range(1, 1000):
            m(i, "é" * (i % 7), i / 2)
        assert fast() - before == 999
    # Stopped: nothing of the C path is left.
    assert m.__globals__["_fast"] is dispatch._no_fast and not installed(m)
    before = fast()
    m(5, "after", 1.0)
    assert fast() == before
    assert events(tmp_path) == [(f"{uniq}.m", (0, "first", 0.0))] + [
        (f"{uniq}.m", (i, "é" * (i % 7), i / 2)) for i in range(1, 1000)
    ]


def test_no_python_frame_runs_for_the_common_event(tmp_path, uniq):
    """3.12+: the common event runs no Python frame (the function's vectorcall is hooked);
    3.11 runs the firing function's frame, whose prologue calls the C path (one frame)."""
    m = tracemark.marker(f"{uniq}.m", n=int, s=str)
    frames: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(dispatch.FIRE_FILENAME):
            frames.append(event)

    with tracemark.record(tmp_path, f"{uniq}.*"):
        m(0, "a")
        sys.setprofile(profile)
        try:
            before = fast()
            m(1, "b")
            through_c = fast() - before
            m(2, s="keyword")  # declined: the Python path, in its frame
        finally:
            sys.setprofile(None)
    assert through_c == 1
    assert frames == (["call"] if HOOKED else ["call", "call"])
    assert [f for _, f in events(tmp_path)] == [(0, "a"), (1, "b"), (2, "keyword")]


def _looks(m) -> tuple:
    info = tracemark.markers(m.name)[0]
    return (
        type(m),
        repr(m).split(" at ")[0],
        m.__name__,
        m.__qualname__,
        m.__doc__,
        m.name,
        m.fields,
        m.fmt,
        m.where,
        m.doc,
        str(inspect.signature(m)),
        info.bad_arguments,
        info.dropped_nested,
        info.probe_errors,
        isinstance(m, registry.Marker),
        registry.core_of(m).name,
    )


def test_the_marker_object_looks_the_same_with_the_c_path(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, s=str, doc="what it means")
    before = _looks(m)
    assert type(m) is types.FunctionType
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m(1, "a")
        assert installed(m) is HOOKED and is_fire(m.__globals__["_fast"])
        assert _looks(m) == before
        info = tracemark.markers(m.name)[0]
        assert info.active and len(info.probes) == 1
    assert _looks(m) == before
    assert not tracemark.markers(m.name)[0].active


class Int(int):
    pass


class Text(str):
    pass


# Calls the C path declines: each is recorded (or dropped and counted) by the Python path.
UNUSUAL = [
    ((1, "kw"), {"x": 1.0}),  # keyword
    ((), {"n": 2, "s": "all kw", "x": 2.0}),
    ((3, "few"), {}),  # wrong arity: bad arguments, counted
    ((4, "many", 4.0, 5), {}),
    ((Int(5), "int subclass", 5.0), {}),
    ((True, "bool for int", 6.0), {}),
    ((7, Text("str subclass"), 7.0), {}),
    ((8, "surrogate \udc80", 8.0), {}),  # repaired as U+FFFD by the pure path
    ((1 << 70, "too big", 9.0), {}),  # a bad value: counted
    ((10, "int for float", 10), {}),
    ((None, "none", 11.0), {}),
    ((12, "plain", 12.0), {}),  # the common event
]


def _run_unusual(path, name):
    m = tracemark.marker(name, n=int, s=str, x=float)
    rec = tracemark.record(path, name)
    try:
        m(0, "first", 0.0)
        before = fast()
        for args, kwargs in UNUSUAL:
            m(*args, **kwargs)
        took = fast() - before
    finally:
        summary = rec.stop()
    info = tracemark.markers(name)[0]
    return events(path), info.bad_arguments, summary.discarded, took


@pytest.mark.filterwarnings("ignore::tracemark.TracemarkWarning")
def test_unusual_calls_take_the_python_path_and_record_what_the_pure_core_does(
    tmp_path, uniq, monkeypatch
):
    c = _run_unusual(tmp_path / "c", f"{uniq}.c")
    monkeypatch.setenv(env.CORE_VARIABLE, "python")
    p = _run_unusual(tmp_path / "p", f"{uniq}.p")
    assert [f for _, f in c[0]] == [f for _, f in p[0]]
    assert c[1:3] == p[1:3] and c[1] >= 3
    assert c[3] == 1 and p[3] == 0  # only the plain call took the C path


def test_an_event_fired_inside_a_probe_is_nested_not_written_to_level_0(tmp_path, uniq):
    outer = tracemark.marker(f"{uniq}.outer", n=int)
    inner = tracemark.marker(f"{uniq}.inner", k=int, s=str)

    def probe(marker, args):
        inner(args[0], "from a probe")  # depth 1: declined by C, nested by Python

    with tracemark.record(tmp_path, f"{uniq}.inner"):
        inner(0, "direct")
        tracemark.connect(f"{uniq}.outer", probe)
        before = fast()
        for i in range(1, 50):
            outer(i)
        assert fast() == before  # none of them at depth 0
        inner(50, "direct")
        assert fast() == before + 1
    got = events(tmp_path, f"{uniq}.inner")
    assert sorted(f[0] for _, f in got) == list(range(51))


def test_the_grace_period_holds_while_the_python_path_switches_sub_buffers(
    tmp_path, uniq, monkeypatch
):
    """The one call back into Python, Channel.switch (a full sub-buffer), is never made by
    the C path: it declines and the Python path makes it, inside the firing function's frame,
    which synchronize() waits for."""
    from tracemark.tracers.recording.channel import Channel

    m = tracemark.marker(f"{uniq}.m", n=int, s=str)
    entered, release = threading.Event(), threading.Event()
    real = Channel.switch

    switches = []

    def switch(self, size):  # the worker's second switch (its first opens its channel)
        if threading.current_thread() is not threading.main_thread():
            switches.append(size)
            if len(switches) == 2:
                entered.set()
                release.wait(10)
        return real(self, size)

    monkeypatch.setattr(Channel, "switch", switch)
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 12, subbuffers=64):

        def work():
            for i in range(400):  # ~30 events per sub-buffer: switches on the way
                m(i, "x" * 100)

        t = threading.Thread(target=work)
        before = fast()
        t.start()
        try:
            assert entered.wait(10)
            assert fast() - before > 20  # the events before it took the C path
            assert tracemark.synchronize(timeout=0.2) is False  # inside a firing frame
        finally:
            release.set()
            t.join()
        assert tracemark.synchronize(timeout=10)
    assert [f[0] for _, f in events(tmp_path)] == list(range(400))


def test_stopping_a_recording_while_threads_fire_through_c(tmp_path, uniq):
    """Disconnect (stop) while other threads fire flat out, again and again: the stop's
    grace period sees no thread inside the C path (none can be while the stopping thread
    runs), the ring files are closed under no writer, every trace reads whole."""
    m = tracemark.marker(f"{uniq}.m", n=int, s=str, x=float)
    stop = threading.Event()

    def work(k):
        i = 0
        while not stop.is_set():
            m(i, "t" * (k + 1), 0.5)
            i += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    recorded = []
    try:
        for round_ in range(8):
            path = tmp_path / str(round_)
            rec = tracemark.record(path, f"{uniq}.*", subbuffer_size=1 << 12, subbuffers=8)
            time.sleep(0.03)
            recorded.append((path, rec.stop().recorded))
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Read once the firing threads are gone: the reader gives the GIL away on each packet's
    # read, and three threads firing flat out made every read wait for it (minutes).
    for path, count in recorded:
        got = events(path)
        assert len(got) == count
        assert all(f[2] == 0.5 and f[1] in ("t", "tt", "ttt") for _, f in got)


def test_threads_each_record_their_own_events_in_order(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", k=int, i=int)
    n = 5000

    def work(k):
        for i in range(n):
            m(k, i)

    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 16, subbuffers=64) as r:
        before = fast()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = fast() - before
    assert r.summary.discarded == 0 and r.summary.lost == 0
    assert took > 4 * n * 0.9  # a thread's first event, and the switches, are Python's
    got = events(tmp_path)
    for k in range(4):
        assert [f[1] for _, f in got if f[0] == k] == list(range(n))


@pytest.mark.filterwarnings("ignore:.*fired from inside a probe:tracemark.TracemarkWarning")
def test_a_signal_handler_firing_the_same_marker_meets_no_half_written_event(tmp_path, uniq):
    """A handler runs between two C calls (never inside one): its event is depth 0 and takes
    the C path too; the main loop's events are all there, in order, none torn."""
    m = tracemark.marker(f"{uniq}.m", who=str, i=int)
    fired = []

    def handler(signum, frame):
        fired.append(1)
        m("handler", len(fired))

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 14, subbuffers=256) as r:
            signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
            i = 0
            while i < 20000 or len(fired) < 20:
                m("main", i)
                i += 1
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    got = events(tmp_path)
    assert [f[1] for f in (f for _, f in got) if f[0] == "main"] == list(range(i))
    # A handler interrupted by the next signal nests; past MAX_NESTING it is dropped and
    # counted, as on the pure core.
    handled = sorted(f[1] for _, f in got if f[0] == "handler")
    dropped = tracemark.markers(m.name)[0].dropped_nested
    assert len(handled) == len(set(handled)) == len(fired) - dropped
    assert set(handled) <= set(range(1, len(fired) + 1))
    assert r.summary.discarded == 0 and r.summary.lost == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_fork_child_takes_the_c_path_once_it_has_its_channel(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", who=str, i=int)
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m("parent", 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                before = fast()
                m("child", 1)  # the parent's channel is not the child's: Python path
                first = fast() - before
                for i in range(2, 101):
                    m("child", i)
                os.write(w, f"{first},{fast() - before}".encode())
            finally:
                tracemark.tracers.recording.lifecycle.stop_all()
                os._exit(0)
        os.close(w)
        out = os.read(r, 100).decode()
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
        m("parent", 101)
    assert out == "0,99"
    got = sorted(f[1] for _, f in events(tmp_path))
    assert got == list(range(102))


@pytest.mark.filterwarnings("ignore::tracemark.TracemarkWarning")
def test_strict_mode_raises_from_the_python_path_and_the_c_path_records(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, s=str)
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m(0, "a")
        previous = faults.set_strict(True)
        try:
            before = fast()
            m(1, "b")
            assert fast() == before + 1
            with pytest.raises(faults.MarkerArgumentError):
                m("not an int", "c")
            m(2, "d")
        finally:
            faults.set_strict(previous)
    assert [f for _, f in events(tmp_path)] == [(0, "a"), (1, "b"), (2, "d")]
    assert tracemark.markers(m.name)[0].bad_arguments == 1


def test_another_probe_turns_the_c_path_off_and_its_disconnect_back_on(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int)
    seen = []
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m(0)
        conn = tracemark.connect(f"{uniq}.m", lambda marker, args: seen.append(args))
        assert m.__globals__["_fast"] is dispatch._no_fast and not installed(m)
        before = fast()
        m(1)
        assert fast() == before and seen == [(1,)]
        tracemark.disconnect(conn)
        tracemark.synchronize()
        assert is_fire(m.__globals__["_fast"]) and installed(m) is HOOKED
        m(2)
        assert fast() == before + 1 and seen == [(1,)]
    assert [f for _, f in events(tmp_path)] == [(0,), (1,), (2,)]


REQ = contextvars.ContextVar("fire_req", default=7)


def test_a_marker_with_a_context_field_keeps_the_python_path(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, req=tracemark.context(REQ, int))
    with tracemark.record(tmp_path, f"{uniq}.*"):
        before = fast()
        m(1)
        m(2)
        assert fast() == before and not installed(m)
    assert [f for _, f in events(tmp_path)] == [(1, 7), (2, 7)]


PATCHED = tracemark.marker("fire_patched.m", n=int, s=str)


def _fires_patched(n):
    for i in range(n):
        PATCHED(i, "patched")


def test_a_patched_marker_statement_takes_the_c_path(tmp_path):
    sites = tracemark.patch(_fires_patched)
    assert sites
    with tracemark.record(tmp_path, "fire_patched.*"):
        _fires_patched(1)
        before = fast()
        _fires_patched(100)
        assert fast() - before == 100
    assert [f for _, f in events(tmp_path)] == [(0, "patched")] + [
        (i, "patched") for i in range(100)
    ]


def test_the_pure_core_publishes_no_c_path(tmp_path, uniq, monkeypatch):
    monkeypatch.setenv(env.CORE_VARIABLE, "python")
    m = tracemark.marker(f"{uniq}.m", n=int)
    with tracemark.record(tmp_path, f"{uniq}.*"):
        before = fast()
        for i in range(10):
            m(i)
        assert fast() == before
        assert m.__globals__["_fast"] is dispatch._no_fast and not installed(m)
    assert len(events(tmp_path)) == 10


@pytest.mark.serial
def test_the_c_path_keeps_no_reference_and_leaks_nothing(tmp_path, uniq):
    import tracemalloc

    m = tracemark.marker(f"{uniq}.m", n=int, s=str, x=float)
    # 16 MiB of buffers hold all 220,000 events (~7 MB) even if the consumer never ran (a
    # loaded machine): none is discarded, an event the Python path would take.
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 20, subbuffers=16):
        for i in range(20000):
            m(i, "warm é", 0.5)
        gc.collect()
        tracemalloc.start()
        try:
            snap = tracemalloc.take_snapshot()
            before = fast()
            for i in range(200_000):
                m(i, "é" * (i % 3), 0.5)
            assert fast() - before > 190_000
            gc.collect()
            grown = sum(
                s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap, "filename")
            )
        finally:
            tracemalloc.stop()
    assert grown < 64 * 1024


def test_the_position_and_count_a_reader_holds_never_change_under_it(tmp_path, uniq):
    """The C core stores a new position and count in the channel's own int objects only when
    nothing else refers to them (_speedups.c, int_reusable): an int someone holds is never
    changed, and what the channel says is right either way."""
    m = tracemark.marker(f"{uniq}.m", n=int, s=str)
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 16, subbuffers=8):
        m(0, "a" * 300)  # the channel, and a position beyond the small ints
        ch = dispatch._tls.state.cache
        pos, count = ch.pos, ch.count
        copies = int(str(pos)), int(str(count))
        before = fast()
        m(1, "b")
        assert fast() == before + 1
        assert (pos, count) == copies and (hash(pos), hash(count)) == (
            hash(copies[0]),
            hash(copies[1]),
        )
        assert ch.pos == copies[0] + 12 + 8 + 4 + 1 and ch.count == copies[1] + 1
        del pos, count
        for i in range(2, 100):
            m(i, "c")
        assert ch.count == copies[1] + 99
        assert ch.pos == copies[0] + 25 + 98 * 25
    assert [f[0] for _, f in events(tmp_path)] == list(range(100))
