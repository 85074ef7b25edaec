"""The recorder's C core (tracemark._speedups): built where it can be, chosen as documented,
and recording exactly what the pure-Python core records.

The differential tests switch cores per recording in this one process (``TRACEMARK_CORE`` is
read when a recording binds its markers). The suite as a whole runs under either core
(``TRACEMARK_CORE=python pytest``, as CI's second pass does); the tests here that need the C
core ask for it, and fail (never skip) where a compiler exists and it was not built.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark import env
from tracemark.ctf import read_trace
from tracemark.markers.fields import ReprText


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "gcc").split()[0]
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("cc")


CAN_BUILD = (
    sys.platform.startswith("linux")
    and not env.PYBEHAVIOR.free_threaded
    and _compiler() is not None
)


def test_the_c_core_is_built_wherever_it_can_be():
    """Not a skip: where a compiler exists the extension must have been built (``pip install
    -e .`` or ``python setup.py build_ext --inplace``), else every C-core test below would
    be testing nothing."""
    if not CAN_BUILD:
        assert env.core()[0] == "python"
        return
    try:
        from tracemark import _speedups
    except ImportError as exc:
        pytest.fail(
            f"a compiler exists ({_compiler()}) but tracemark._speedups is not built ({exc}): "
            "run `python setup.py build_ext --inplace` or `pip install -e .`"
        )
    assert callable(_speedups.record)


@pytest.fixture
def core(monkeypatch, request):
    """Run the test's recordings with the core named by the parameter ("c" or "python")."""
    name = request.param
    if name == "python":
        monkeypatch.setenv(env.CORE_VARIABLE, "python")
    else:
        monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
        if not CAN_BUILD:
            pytest.fail("this test needs the C core, which cannot be built here")
    assert env.core()[0] == name
    return name


def test_the_default_core_is_c_when_built_and_the_variable_forces_python(monkeypatch):
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    if CAN_BUILD:
        assert env.core() == ("c", "C core built")
    monkeypatch.setenv(env.CORE_VARIABLE, "python")
    assert env.core()[0] == "python"
    if CAN_BUILD:
        assert env.core()[1] == "TRACEMARK_CORE=python (C core built)"
    out = subprocess.run(
        [sys.executable, "-m", "tracemark", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, env.CORE_VARIABLE: "python"},
    ).stdout
    assert "recording core: python" in out


_names = itertools.count()


def _counting(monkeypatch) -> list[int]:
    """Count the events the C core records for the markers bound from now on (each test's
    markers have field names of their own, so their paths are compiled afresh): calls of
    record() (calls[0]) plus the events of the C firing path (tracemark/_speedups_fire.c,
    which calls no Python function), read as ``recorded(calls)``."""
    from tracemark import _speedups

    calls = [0, _speedups.fast_events()]
    real = _speedups.record

    def record(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(_speedups, "record", record)
    return calls


def recorded(calls: list[int]) -> int:
    """How many events the C core recorded since ``_counting`` (see there)."""
    from tracemark import _speedups

    return calls[0] + _speedups.fast_events() - calls[1]


@pytest.mark.parametrize("core", ["c", "python"], indirect=True)
def test_the_chosen_core_is_the_one_that_records(tmp_path, uniq, core, monkeypatch):
    calls = _counting(monkeypatch) if CAN_BUILD else [0]
    field = f"f{next(_names)}"
    m = tracemark.marker(f"{uniq}.m", **{field: int, "s": str})
    with tracemark.record(tmp_path, f"{uniq}.*"):
        for i in range(100):
            m(i, "é" * i)
    assert (recorded(calls) if CAN_BUILD else 0) == (100 if core == "c" else 0)
    got = [(ev.fields[field], ev.fields["s"]) for ev in read_trace(tmp_path).events()]
    assert got == [(i, "é" * i) for i in range(100)]


# --- differential: both cores write traces that decode to the same events -------------------


class Int(int):
    pass


class Text(str):
    pass


# Per field kind: values that fit it, and values the C core must leave to the pure path
# (subclasses, other types, text with surrogates, ints beyond int64), and values that
# neither core can record (counted as discarded by both).
INTS = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.integers(min_value=1 << 63, max_value=1 << 70),
    st.booleans(),
    st.integers(min_value=-5, max_value=5).map(Int),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-9, 9))
TEXTS = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=4),
    st.text(max_size=10).map(Text),
    st.integers(),
)
VALUES = {
    "int": INTS,
    "float": FLOATS,
    "bool": st.one_of(st.booleans(), st.integers(-2, 2), st.none()),
    "str": TEXTS,
    "bytes": st.one_of(st.binary(max_size=60), st.binary(max_size=5).map(bytearray)),
    "any": st.one_of(
        st.none(),
        INTS,
        st.floats(allow_nan=True),
        TEXTS,
        st.binary(max_size=20),
        st.lists(st.integers(), max_size=3),
        st.just(ReprText("'GET'")),
    ),
    "object": st.one_of(st.integers(), st.text(max_size=20), st.just(ReprText("x"))),
}
KIND_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "bytes": bytes}


@st.composite
def scenarios(draw):
    kinds = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=5))
    rows = draw(st.lists(st.tuples(*(VALUES[k] for k in kinds)), min_size=1, max_size=40))
    return kinds, rows


def _comparable(value):
    # NaN != NaN, and -0.0 == 0.0: compare floats by their bits' repr instead.
    if isinstance(value, float):
        return ("float", math.copysign(1, value), repr(value))
    return (type(value).__name__, value)


def _record(path, kinds, rows, core):
    name = f"diff{next(_names)}.m"
    fields = {f"k{i}_{k}": KIND_TYPES.get(k, k) for i, k in enumerate(kinds)}
    m = tracemark.marker(name, **fields)
    saved = os.environ.pop(env.CORE_VARIABLE, None)
    if core == "python":
        os.environ[env.CORE_VARIABLE] = "python"
    try:
        # Small sub-buffers (many switches), enough of them that nothing is discarded for
        # want of room: what either core discards, it discards for a value.
        rec = tracemark.record(path, name, subbuffer_size=4096, subbuffers=512)
    finally:
        os.environ.pop(env.CORE_VARIABLE, None)
        if saved is not None:
            os.environ[env.CORE_VARIABLE] = saved
    with rec:
        for row in rows:
            m(*row)
    evs = [[(k, _comparable(v)) for k, v in ev.fields.items()] for ev in read_trace(path).events()]
    return evs, rec.summary.recorded, rec.summary.discarded


@pytest.mark.filterwarnings("ignore::tracemark.TracemarkWarning")
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(scenario=scenarios())
def test_both_cores_record_the_same_events(tmp_path_factory, scenario):
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    kinds, rows = scenario
    c = _record(tmp_path_factory.mktemp("c"), kinds, rows, "c")
    py = _record(tmp_path_factory.mktemp("py"), kinds, rows, "python")
    assert c == py


# --- nesting, signals, fork, pools -------------------------------------------------------------


@pytest.mark.parametrize("core", ["c", "python"], indirect=True)
@pytest.mark.filterwarnings("ignore:.*fired from inside a probe:tracemark.TracemarkWarning")
def test_signal_handlers_and_finalizers_nest_under_either_core(tmp_path, uniq, core):
    outer = tracemark.marker(f"{uniq}.outer", i=int, s=str, x=float)
    inner = tracemark.marker(f"{uniq}.inner", k=int, s=str)
    fired = []

    class Dying:
        def __del__(self):
            inner(-len(fired), "from __del__")

    def handler(signum, frame):
        fired.append(1)
        inner(len(fired), "signal " * (len(fired) % 4))
        Dying()
        gc.collect(0)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 14, subbuffers=256) as r:
            signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
            i = 0
            while i < 20000 or len(fired) < 20:
                outer(i, "p" * (i % 50), i / 3)  # many sub-buffer switches on the way
                i += 1
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    evs = list(read_trace(tmp_path).events())
    outers = [ev.fields for ev in evs if ev.name == f"{uniq}.outer"]
    assert [(f["i"], f["s"], f["x"]) for f in outers] == [
        (j, "p" * (j % 50), j / 3) for j in range(i)
    ]
    inners = [ev.fields["k"] for ev in evs if ev.name == f"{uniq}.inner"]
    dropped = tracemark.markers(f"{uniq}.inner")[0].dropped_nested
    assert len(inners) == 2 * len(fired) - dropped
    assert r.summary.discarded == 0 and r.summary.lost == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_fork_child_records_with_the_c_core(tmp_path, uniq, monkeypatch):
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    calls = _counting(monkeypatch)
    m = tracemark.marker(f"{uniq}.m", who=str, i=int, **{f"c{next(_names)}": float})
    with tracemark.record(tmp_path, f"{uniq}.*"):
        m("parent", 0, 0.5)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                before = recorded(calls)
                for i in range(1, 1001):
                    m("child", i, i / 2)
                os.write(w, str(recorded(calls) - before).encode())
            finally:
                tracemark.tracers.recording.lifecycle.stop_all()
                os._exit(0)
        os.close(w)
        child_calls = int(os.read(r, 100) or b"-1")
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
    assert child_calls == 1000
    evs = [(ev.fields["who"], ev.fields["i"], ev.pid) for ev in read_trace(tmp_path).events()]
    assert evs == [("parent", 0, os.getpid())] + [("child", i, pid) for i in range(1, 1001)]


POOL = textwrap.dedent(
    """
    import multiprocessing as mp, sys, tracemark
    from tracemark import _speedups, env
    calls = [0]
    real = _speedups.record
    def counting(*args):
        calls[0] += 1
        return real(*args)
    _speedups.record = counting  # before the marker is declared (and bound): in workers too
    fast0 = _speedups.fast_events()  # and the events of the C firing path
    m = tracemark.marker("cpool.ev", chunk=int, s=str)

    def work(chunk):
        for k in range(100):
            m(chunk, "w" * k)
        return env.core()[0], calls[0] + _speedups.fast_events() - fast0

    if __name__ == "__main__":  # run under `tracemark record`, which records the workers
        with mp.get_context(sys.argv[1]).Pool(2) as pool:
            print(pool.map(work, range(4)))
            pool.close()
            pool.join()
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_record_with_the_c_core(tmp_path, method):
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    script = tmp_path / "app.py"
    script.write_text(POOL)
    environ = {k: v for k, v in os.environ.items() if k != env.CORE_VARIABLE}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracemark",
            "record",
            "-o",
            str(tmp_path / "trace"),
            "-e",
            "cpool.*",
        ]
        + ["--", sys.executable, str(script), method],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=True,
    ).stdout
    results = eval(out)  # [(core, C calls so far in that worker), ...]
    assert all(core == "c" and n >= 100 for core, n in results), results
    evs = [(ev.fields["chunk"], ev.fields["s"]) for ev in read_trace(tmp_path / "trace").events()]
    assert sorted(evs) == sorted((c, "w" * k) for c in range(4) for k in range(100))


# --- no leak ----------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.serial
def test_a_million_events_leak_nothing(tmp_path, uniq, monkeypatch):
    """Every kind the C core packs, text that is encoded into a temporary (non-ASCII), and
    sub-buffer switches: Python-allocated memory (tracemalloc) and RSS stay flat."""
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    m = tracemark.marker(f"{uniq}.m", i=int, x=float, b=bool, s=str, y=bytes, a="any")
    texts = ["ascii", "non-ascii é", "€" * 20]
    values = [None, 7, 2.5, "any é", b"raw", True]

    def fire(n):
        for i in range(n):
            m(i, i * 0.5, i & 1 == 0, texts[i % 3], b"xy", values[i % 6])

    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 16, subbuffers=4) as rec:
        fire(200_000)  # every sub-buffer allocated, every struct and int cache warm
        gc.collect()
        tracemalloc.start()
        try:
            base_py, base_rss = tracemalloc.get_traced_memory()[0], _rss()
            fire(1_000_000)
            gc.collect()
            grown_py = tracemalloc.get_traced_memory()[0] - base_py
            grown_rss = _rss() - base_rss
        finally:
            tracemalloc.stop()
    total = rec.summary.recorded + rec.summary.discarded + rec.summary.lost
    assert total == 1_200_000
    assert grown_py < 256 * 1024, grown_py
    assert grown_rss < 8 * 1024 * 1024, grown_rss
