"""The C reader (tracemark/_reader.c, ``tracemark._creader``) gives what the Python reader
gives: the same events, the same TraceError (message and byte offset) after the same events,
on every trace of the corpus, whole or damaged; mutated packets never crash it, hang it or
make it allocate what a length field claims; and it runs clean under AddressSanitizer."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from pathlib import Path

import creader_fuzz as fz
import pytest

import tracemark
import tracemark.cli
from tracemark import env
from tracemark.ctf import TraceError, read_trace
from tracemark.ctf import reader as R
from tracemark.ctf import writer as W

try:
    from tracemark import _creader as creader
except ImportError:  # not built: nothing to compare (the first test says whether it may be)
    creader = None
needs_c = pytest.mark.skipif(creader is None, reason="the C reader is not built")


def test_the_c_reader_is_built_wherever_it_can_be():
    """Not a skip: where a compiler exists the C reader must have been built, else the
    tests below would test nothing (test_speedups.CAN_BUILD: Linux, a GIL, a compiler)."""
    from test_speedups import CAN_BUILD

    assert creader is not None or not CAN_BUILD, (
        "a compiler exists but tracemark._creader is not built: run "
        "`python setup.py build_ext --inplace` or `pip install -e .`"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("creader") / "t"
    fz.make_corpus(str(path))
    return path


def _events(trace_path, use_c, monkeypatch, names=None):
    """Per stream and merged: (events as text, error text) by one reader."""
    if use_c:
        monkeypatch.delenv("TRACEMARK_CORE", raising=False)
    else:
        monkeypatch.setenv("TRACEMARK_CORE", "python")
    out = []
    try:
        trace = read_trace(trace_path)
    except TraceError as exc:
        return [("open", str(exc))]
    assert all((s.sub.c_layout is not None) == use_c for s in trace.streams)

    def run(iterable):
        got, error = [], None
        try:
            for ev in iterable:
                got.append(repr(ev) + repr([type(v) for v in ev.fields.values()]))
        except TraceError as exc:
            error = (str(exc), exc.offset)
        return got, error

    for s in trace.streams:
        out.append(run(s.iter_events()))
        wanted = s.sub.ids_matching(lambda n: n.endswith(".any"))
        out.append(run(s.iter_matching(wanted)))
    out.append(run(trace.events()))
    out.append(run(trace.events(names=lambda n: n != "fz.empty")))
    return out


def _same(path, monkeypatch):
    c = _events(path, True, monkeypatch)
    py = _events(path, False, monkeypatch)
    assert c == py
    return c


@needs_c
def test_the_c_reader_is_on_and_gives_the_python_readers_events(corpus, monkeypatch):
    got = _same(corpus, monkeypatch)
    merged, error = got[-2]
    assert error is None and len(merged) == 704
    assert any("Task(id=" in line for line in merged)  # events in tasks: task events read
    assert any("ReprText" in line for line in merged)  # the any tag for a repr


@needs_c
def test_trace_core_python_turns_the_c_reader_off(monkeypatch):
    monkeypatch.setenv("TRACEMARK_CORE", "python")
    assert env.reader() == (None, "TRACEMARK_CORE=python (C reader built)")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit):
        tracemark.cli.main(["--version"])
    assert "reader: python, TRACEMARK_CORE=python" in out.getvalue()
    monkeypatch.delenv("TRACEMARK_CORE")
    assert env.reader() == (creader, "C reader built")


@pytest.fixture(autouse=True)
def _c_reader_on(monkeypatch):
    """Every test here starts with the C reader on (the suite's pure-core run sets
    TRACEMARK_CORE=python; these tests switch between the two readers themselves)."""
    monkeypatch.delenv("TRACEMARK_CORE", raising=False)


def _damaged_copies(src: Path, root: Path, n: int, seed: int):
    """``n`` copies of the trace, each with one file damaged (truncated, bit-flipped,
    overwritten with garbage, an extreme number put in a packet context or an event)."""
    rng = random.Random(seed)
    for i in range(n):
        dst = root / f"d{i}"
        shutil.copytree(src, dst)
        sub = next(p for p in dst.iterdir() if (p / "metadata").exists())
        victim = rng.choice(sorted(sub.glob("stream_*")))
        blob = bytearray(victim.read_bytes())
        how = rng.choice(["cut", "flip", "garbage", "context", "u32"])
        if how == "cut":
            del blob[rng.randrange(len(blob)) :]
        elif how == "flip":
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif how == "garbage":
            at = rng.randrange(len(blob))
            blob[at : at + 32] = os.urandom(32)[: len(blob) - at]
        elif how == "context":
            at = W.HEADER.size + 8 * rng.randrange(9)
            blob[at : at + 8] = rng.choice(fz.EXTREMES).to_bytes(8, "little")
        else:
            at = rng.randrange(W.PACKET_FIXED_SIZE, len(blob) - 4)
            blob[at : at + 4] = (rng.choice(fz.EXTREMES) % 2**32).to_bytes(4, "little")
        victim.write_bytes(bytes(blob))
        yield dst


@needs_c
def test_damaged_traces_give_the_same_events_then_the_same_error(corpus, tmp_path, monkeypatch):
    errors = set()
    for path in _damaged_copies(corpus, tmp_path, 120, seed=14):
        got = _same(path, monkeypatch)
        errors.update(e[1][0].split(": ", 2)[-1] for e in got if len(e) == 2 and e[1])
        shutil.rmtree(path)
    # the damage reached the decoder, not only the packet index
    assert "event runs past the packet content or is damaged" in errors


@needs_c
def test_the_ctf_reader_tests_trace_is_read_alike(tmp_path, monkeypatch):
    """test_ctf_reader's trace (two threads, every plain field kind), and cut anywhere."""
    m = tracemark.marker("creader.m", i=int, s=str, f=float, b=bytes, t=bool, o=object)
    with tracemark.record(tmp_path / "t", "creader.*", subbuffer_size=4096, subbuffers=64):
        for i in range(400):
            m(i, f"s{i}", i / 2, bytes([i % 256]), bool(i % 2), None)
    _same(tmp_path / "t", monkeypatch)
    sub = next(p for p in (tmp_path / "t").iterdir() if (p / "metadata").exists())
    (stream,) = sub.glob("stream_*")
    whole = stream.read_bytes()
    for cut in range(W.PACKET_FIXED_SIZE, len(whole), 97):
        stream.write_bytes(whole[:cut])
        R.cut_partial_packet(stream)  # what recovery does first
        _same(tmp_path / "t", monkeypatch)


@needs_c
def test_view_and_stats_print_the_same_with_either_reader(corpus, monkeypatch, capsys):
    from tracemark.cli import main

    outputs = []
    for core in ("", "python"):
        monkeypatch.setenv("TRACEMARK_CORE", core)
        for argv in (["view"], ["view", "--json"], ["stats", "--json"], ["view", "-e", "fz.any"]):
            assert main([*argv, str(corpus)]) == 0
            outputs.append(capsys.readouterr().out)
    assert outputs[:4] == outputs[4:]
    assert outputs[0].count("\n") == 704


@needs_c
def test_ten_thousand_mutated_packets_agree_and_never_crash_or_hang(corpus):
    t0 = time.monotonic()
    damaged = fz.fuzz(str(corpus), 10_000, seed=1)
    assert 1_000 < damaged < 10_000  # damage of every kind, and some packets still whole
    assert time.monotonic() - t0 < 60


@pytest.mark.serial
@needs_c
def test_a_huge_length_is_refused_without_allocating_it(corpus):
    stream, p, data = fz.packets(str(corpus))[0]
    blob = bytearray(data)
    # The first event is a fz.m (i, s, ...): its str length is after the header and the int.
    at = p.start + 12 + 8
    for n in (2**32 - 1, 2**31, len(blob)):
        blob[at : at + 4] = n.to_bytes(4, "little")
        tracemalloc.start()
        try:
            _, error = fz.outcome(stream, p, bytes(blob), None, True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert error and "event runs past the packet content" in error
        assert peak < 1 << 20


@needs_c
def test_a_packet_is_decoded_a_chunk_at_a_time(corpus):
    stream, p, data = fz.packets(str(corpus))[0]
    args = (stream.sub.c_layout, data, p.start, p.content_end, p.ts_begin, p.ts_end)
    rest = (p.pid, p.tid, p.thread, None, None)
    events, pos, _last, n, _task, error = creader.decode(*args, *rest, 5)
    assert len(events) == 5 and n >= 5 and p.start < pos < p.content_end and error is None
    everything = creader.decode(*args, *rest, 1 << 30)
    assert everything[0][:5] == events and everything[1] == p.content_end


@needs_c
def test_what_the_c_reader_declines_python_reads(corpus):
    meta = read_trace(corpus).subtraces[0].meta
    args = (R.Event, R.Task, R.ReprText)
    assert creader.make_layout(meta.events, -1, 0, 10**9, *args) is not None
    assert creader.make_layout(meta.events, -1, 0, 10**6, *args) is None  # a 1 MHz clock
    assert creader.make_layout(meta.events, -1, 2**70, 10**9, *args) is None
    assert creader.make_layout({1 << 20: ("x", ())}, -1, 0, 10**9, *args) is None
    assert creader.make_layout({1: ("x", (("a", "complex"),))}, -1, 0, 10**9, *args) is None


def _asan_runtime() -> str | None:
    cc = sysconfig.get_config_var("CC") or "cc"
    compiler = cc.split()[0]
    if shutil.which(compiler) is None:
        return None
    try:
        found = subprocess.run(
            [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


@needs_c
def test_the_fuzz_corpus_runs_clean_under_address_sanitizer(corpus, tmp_path):
    libasan = _asan_runtime()
    if libasan is None:
        pytest.skip("no compiler with AddressSanitizer (libasan.so) here")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    build = tmp_path / "build" / "tracemark"
    build.mkdir(parents=True)
    so = build / ("_creader" + sysconfig.get_config_var("EXT_SUFFIX"))
    sources = [str(Path(R.__file__).parents[1] / n) for n in ("_reader.c", "_reader_json.c")]
    made = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
         f"-I{sysconfig.get_paths()['include']}", *sources, "-o", str(so)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=address: {made.stderr[-500:]}")
    # The instrumented module is put in place of the built one before tracemark imports it.
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tracemark._creader', {str(so)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "sys.modules['tracemark._creader'] = mod\n"
        "import tracemark.env\n"
        "assert tracemark.env.reader()[0] is mod\n"
        "import creader_fuzz\n"
        f"print(creader_fuzz.fuzz({str(corpus)!r}, 2000, 7), 'damaged')\n"
        # view --json's C lines (tracemark/_reader_json.c), on the corpus and odd values
        "import io, test_view_json_c as vj, tracemark.ctf as ctf, tracemark.cli.view as v\n"
        f"v.write_json(ctf.read_trace({str(corpus)!r}).events(), io.StringIO())\n"
        "v.write_json(vj._events()[:-1] * 40, io.StringIO())\n"
    )
    here = Path(__file__).parent
    root = Path(R.__file__).parents[2]
    environ = {
        **os.environ,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
        "PYTHONPATH": os.pathsep.join([str(root), str(here)]),
        "PYTHONMALLOC": "malloc",  # every allocation through ASan's malloc, checked
    }
    environ.pop("TRACEMARK_CORE", None)
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environ,
        timeout=600,
        cwd=tempfile.gettempdir(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert run.stdout.endswith(" damaged\n")


def _random_events(rng, n):
    from tracemark.markers.fields import ReprText

    floats = [0.0, -0.0, 1.5, 1e300, -1e-300, 5e-324, 123456789.0, float("inf"), -float("inf")]
    floats += [float("nan"), -float("nan"), 0.1 + 0.2, 1 / 3]
    texts = ["plain", "a b", "é٣²", "x\u0301", "\ud800", "50%", "a\nb", "", "-:/@+._", "\x1b"]
    values = [*floats, *texts, 0, -1, 2**63 - 1, -(2**63), 2**64, -(2**90), True, False]
    values += [None, b"\x00'", ReprText("<R \n>"), bytearray(b"x"), 3j, ("t",)]
    tasks = [None, R.Task(1, "req-1"), R.Task(2, "50%\nodd"), R.Task(3, "")]
    ts = rng.choice([0, 1_700_000_000 * 10**9, -5 * 10**9 + 3])
    events = []
    for _ in range(n):
        ts += rng.choice([0, 1, 999, 10**9 + 7, 2**40]) if rng.random() < 0.999 else 2**62
        keys = rng.sample(["f", "g%", "é", "a\tb", "x"], rng.randint(0, 3))
        fields = {k: rng.choice(values) for k in keys}
        thread = rng.choice(["MainThread", "", "100% busy", "t\u2028"])
        name = rng.choice(["a.b", "c%d", "é.x"])
        ev = R.Event(ts, name, fields, rng.choice([7, 2**70]), 9, thread, rng.choice(tasks))
        events.append(ev)
    return events


@needs_c
def test_view_text_lines_made_in_c_are_the_python_ones(monkeypatch):
    from tracemark.cli.view import write_text

    rng = random.Random(3)
    for _ in range(20):
        events = _random_events(rng, rng.randint(1, 1500))
        texts = []
        for core in ("", "python"):
            monkeypatch.setenv("TRACEMARK_CORE", core)
            out = io.StringIO()
            assert write_text(iter(events), out) == len(events)
            texts.append(out.getvalue())
        assert texts[0] == texts[1]
    assert "+?.??????" in texts[0]


@needs_c
def test_view_text_in_c_writes_every_line_before_a_failure(monkeypatch):
    from tracemark.cli.view import write_text

    events = _random_events(random.Random(5), 1300)

    def failing():
        yield from events[:1100]
        raise TraceError("x", 5, "damaged")

    texts = []
    for core in ("", "python"):
        monkeypatch.setenv("TRACEMARK_CORE", core)
        out = io.StringIO()
        with pytest.raises(TraceError):
            write_text(failing(), out)
        texts.append(out.getvalue())
        out = io.StringIO()
        assert write_text(iter(events), out, limit=700) == 700
        texts.append(out.getvalue())
    assert texts[0] == texts[2] and texts[0].count("\n") == 1100
    assert texts[1] == texts[3] and texts[1].count("\n") == 700


@needs_c
def test_stats_figures_from_c_grouping_are_the_python_ones(monkeypatch):
    from types import SimpleNamespace

    from tracemark.cli import stats

    rng = random.Random(11)
    # more than one chunk (stats._BATCH); no -inf beside inf (stats' own fsum refuses them)
    events = [
        ev._replace(fields={k: 0.0 if v == -float("inf") else v for k, v in ev.fields.items()})
        for ev in _random_events(rng, 40_000)
    ]
    # one that is not an Event tuple: its chunk is grouped in Python
    odd = SimpleNamespace(**events[20_000]._asdict())
    for evs in (events, [*events[:20_000], odd, *events[20_001:]]):
        rendered = []
        for core in ("", "python"):
            monkeypatch.setenv("TRACEMARK_CORE", core)
            got = stats.collect(iter(evs))
            info = dict(path="x", start=0, end=1, discarded=0, processes=1, threads=1)
            rendered.append(stats.render_json(got, **info))
            rendered.append(stats.render_text(got, style=stats.Style(False), **info))
        assert rendered[:2] == rendered[2:]
    doc = __import__("json").loads(rendered[0])
    markers = doc["markers"]
    assert (
        sum(m["count"] for m in (markers.values() if isinstance(markers, dict) else markers))
        == 40_000
    )


@pytest.mark.serial
@needs_c
def test_decoding_formatting_and_grouping_leak_nothing(corpus, monkeypatch):
    from tracemark.cli import stats
    from tracemark.cli.view import write_text

    events = _random_events(random.Random(2), 3000)

    def work():
        fz.fuzz(str(corpus), 300, seed=4, c_only=True)  # damaged packets: the error paths
        for _ in range(3):
            list(read_trace(corpus).events())
            write_text(iter(events), io.StringIO())
            stats.collect(iter(read_trace(corpus).events()))

    work()  # caches, interned names, lazily made objects
    tracemalloc.start()
    try:
        work()
        sizes = [tracemalloc.get_traced_memory()[0]]
        for _ in range(2):
            work()
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # A leak grows every round (an event's worth: 2,100 events a round); something else
    # the process caches meanwhile grows once.
    grown = min(sizes[1] - sizes[0], sizes[2] - sizes[1])
    assert grown < 100_000, sizes


@needs_c
def test_each_event_is_decoded_once_even_with_the_bounds(corpus, monkeypatch):
    """test_ctf_reader's test of the same name, for the C reader: the bounds decode one
    event per stream, not a chunk."""
    built = []

    def counting(*args):
        result = creader.decode(*args)
        built.append(len(result[0]))
        return result

    monkeypatch.setattr(R, "_creader_decode", counting)
    trace = read_trace(corpus)
    evs = list(trace.events())
    assert sum(built) == len(evs) == 704
    assert (trace.start, trace.end) == (evs[0].timestamp, evs[-1].timestamp)
    assert sum(built) == 704 + len(trace.streams)


def test_stats_bulk_folding_counts_what_adding_one_at_a_time_counts():
    """stats.FieldStats.extend (the column scans at C speed) against add() per value,
    including an int beyond 64 bits after others (array.extend keeps what it took before
    its OverflowError: those are not counted twice)."""
    from tracemark.cli.stats import FieldStats, MarkerStats

    rng = random.Random(8)
    pool = [1, -2, 2**70, 0.5, float("nan"), float("inf"), "a", b"b", True, None, [1], 3]
    for _ in range(300):
        kinds = rng.sample(pool, rng.randint(1, 3))
        values = [rng.choice(kinds) for _ in range(rng.randint(0, 80))]
        bulk, one = FieldStats(), FieldStats()
        bulk.extend(values)
        for v in values:
            one.add(v)
        assert repr(bulk) == repr(one)
    m, rows = MarkerStats("m"), [{"a": i, "b": str(i % 3)} for i in range(100)]
    m.pending = [*rows, {"b": "x", "c": 1.5}, *rows]  # rows of different fields
    m.fold()
    assert list(m.fields) == ["a", "b", "c"] and len(m.fields["a"].ints) == 200
    m.pending = rows * 2  # the same fields in every row: the quick path
    m.fold()
    assert len(m.fields["a"].ints) == 400 and m.fields["b"].others["1"] == 4 * 33


@needs_c
def test_view_text_in_c_takes_only_the_readers_events(monkeypatch):
    """Another named tuple (its fields in another order) is formatted by attribute, the
    Python way, never read by position."""
    from collections import namedtuple

    from tracemark.cli.view import write_text

    Other = namedtuple("Other", "timestamp name fields tid pid thread task")  # pid, tid swapped
    events = [
        Other(ev.timestamp, ev.name, ev.fields, 1000 + ev.tid, ev.pid, ev.thread, ev.task)
        for ev in _random_events(random.Random(6), 50)
    ]
    texts = []
    for core in ("", "python"):
        monkeypatch.setenv("TRACEMARK_CORE", core)
        out = io.StringIO()
        write_text(iter(events), out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1]


@needs_c
def test_events_of_plain_values_are_left_out_of_the_cyclic_gc(corpus):
    """As CPython untracks exact tuples of untracked items: an Event of plain values is not
    tracked; one in an asyncio task (a Task, tracked) is."""
    import gc

    evs = list(read_trace(corpus).events())
    # a dict of plain values is untracked (a ReprText value, a heap type, is tracked)
    plain = [ev for ev in evs if ev.task is None and not gc.is_tracked(ev.fields)]
    in_task = [ev for ev in evs if ev.task is not None]
    assert len(plain) > 500 and in_task
    assert not any(gc.is_tracked(ev) for ev in plain)
    assert all(gc.is_tracked(ev) for ev in in_task)
