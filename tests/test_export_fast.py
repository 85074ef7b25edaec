"""The export fast path (tracemark.export.fast) against the walker it replaces: on a varied
recording (spans, nested and recursive spans, unfinished spans, ends without a begin, an end
that skips an inner span, a begin and an end sharing a field name, instants with every field
type and extreme values, counters with values that are not finite, renamed threads, a fork
child) and on a damaged copy of it, both formats must show the same timeline: the same
tracks, slices (names, times, args), instants and counter values, decoded with Perfetto's
published schema (interned names resolved) and with ``json``, and the same counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from test_export import decode, interned_events, perfetto_slices

from tracemark.ctf import read_trace
from tracemark.export import export
from tracemark.export import fast as fast_mod
from tracemark.export.fast import applies
from tracemark.export.walker import open_streams

ROOT = Path(__file__).resolve().parents[1]

VARIED = textwrap.dedent(
    """
    import os, sys, threading, tracemark
    req = tracemark.span("req", path=str)
    db = tracemark.span("db", table=str)
    tx_b = tracemark.marker("tx.begin", id=int)
    tx_e = tracemark.marker("tx.end", id=int, ok=bool)      # id on both: end.id
    inner = tracemark.span("inner")
    rec = tracemark.span("rec", depth=int)
    every = tracemark.marker(
        "all.types", i=int, f=float, b=bool, s=str, raw=bytes, o=object, a="any"
    )
    gauge = tracemark.marker("q.depth", n=int, load=float)
    stray = tracemark.marker("db.end")

    def recurse(d):
        rec.begin(d)
        if d < 3:
            recurse(d + 1)
        rec.end()

    VALUES = [
        (0, 0.0, False, "", b"", None),
        (-5, -1.5, True, 'quote " back \\\\ nl \\n tab \\t é 漢 \\u2028',
         bytes(range(8)), [1, "x"]),
        (1 << 40, float("nan"), True, "x" * 300, b"\\xff" * 300, {"k": 1.5}),
        (-(1 << 63), float("inf"), False, "\\x00\\x01", b"\\x00", 3.25),
        ((1 << 63) - 1, float("-inf"), True, "last", b"z", "s"),
        (127, 1e300, False, "a", b"a", 0), (128, 5e-324, True, "b", b"b", 1),
        (16383, 2.0, False, "c", b"c", 2), (16384, 3.0, True, "d", b"d", 3),
        ((1 << 28) - 1, 4.0, False, "e", b"e", 4), (1 << 28, 5.0, True, "f", b"f", 5),
    ]

    # An any field: every kind it records (None, bool, int, float, str, bytes, a repr).
    ANY = [None, True, False, 7, -(1 << 63), 1 << 70, 2.5, float("nan"), float("-inf"),
           "GET", "", 'q " \\\\ é', b"\\x00\\xff", [1, "x"], {"k": None}, ValueError("e")]

    def worker(w):
        threading.current_thread().name = f"w{w}"
        for i in range(40):
            req.begin(f"/w{w}/{i % 3}")
            gauge(i * w, i / (w + 1) if i % 5 else float("nan"))
            db.begin("users")
            every(*VALUES[i % len(VALUES)], ANY[i % len(ANY)])
            db.end()
            if i % 7 == 0:
                inner.begin()      # never ended: req.end skips it
            if i % 11 == 0:
                stray()            # db.end without a db.begin open
            tx_b(i); tx_e(i, i % 2 == 0)
            recurse(0)
            req.end()
            if i == 20:
                threading.current_thread().name = f"w{w}-renamed"
        if w == 1:
            req.begin("/left-open")   # the thread ends with it open

    with tracemark.record(sys.argv[1]):
        ts = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in ts: t.start()
        for t in ts: t.join()
        pid = os.fork()
        if pid == 0:
            try:
                worker(9)
            finally:
                tracemark.tracers.recording.lifecycle.stop_all()
                os._exit(0)
        os.waitpid(pid, 0)
        worker(7)
    """
)

COUNTERS = ["q.depth.n", "q.depth.load", "tx.end.ok"]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    trace = tmp_path_factory.mktemp("fast") / "varied"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", VARIED, str(trace)], check=True, env=env, timeout=120)
    return trace


def perfetto_view(path: Path):
    """What a viewer sees in a Perfetto file: per track (described by its kind, pid, tid
    and name, not by its uuid, which is numbering), the slices, instants and counters."""
    trace = decode(path)
    tracks, slices, instants, counters = perfetto_slices(trace)

    def describe(uuid):
        t = tracks[uuid]
        if t.HasField("thread"):
            return ("thread", t.thread.pid, t.thread.tid, t.thread.thread_name)
        if t.HasField("process"):
            return ("process", t.process.pid, t.process.process_name)
        parent = describe(t.parent_uuid) if t.parent_uuid else None
        return ("track", t.name, parent)

    def norm(v):  # nan != nan: compare its text
        return repr(v) if isinstance(v, float) else v

    def rows(items):
        return sorted(
            repr(tuple(norm(x) for x in i[:-1]) + (sorted(i[-1].items()),)) for i in items
        )

    view = {}
    for uuid in tracks:
        view[describe(uuid)] = (
            rows(slices.get(uuid, [])),
            rows(instants.get(uuid, [])),
            sorted(repr(c) for c in counters.get(uuid, [])),
        )
    # Track descriptors as sent: processes and threads (renames included) as many times as
    # the walker sends them; a counter's at least once (each process of the fast path that
    # writes its values describes it).
    sent = Counter(
        describe(p.track_descriptor.uuid)
        for p in trace.packet
        if p.HasField("track_descriptor") and not p.track_descriptor.HasField("counter")
    )
    counter_tracks = {
        describe(p.track_descriptor.uuid)
        for p in trace.packet
        if p.HasField("track_descriptor") and p.track_descriptor.HasField("counter")
    }
    return view, sent, counter_tracks, len(interned_events(trace))


def chrome_view(path: Path):
    doc = json.loads(path.read_text())
    events = Counter(json.dumps(e, sort_keys=True) for e in doc["traceEvents"])
    # Each worker of the fast path names its threads' process once more.
    events = {e: 1 if '"process_name"' in e else n for e, n in events.items()}
    return events, doc["otherData"], doc["displayTimeUnit"]


def both(trace: Path, tmp: Path, fmt: str, jobs: int = 1):
    suffix = ".pftrace" if fmt == "perfetto" else ".json"
    fast, slow = tmp / f"fast{suffix}", tmp / f"slow{suffix}"
    r_fast = export(trace, fast, fmt, counters=COUNTERS, jobs=jobs)
    assert not [p for p in tmp.iterdir() if "part" in p.name]  # the workers' files gone
    r_slow = export(trace, slow, fmt, counters=COUNTERS, fast=False)
    return (fast, r_fast), (slow, r_slow)


def _fork_here(monkeypatch):
    """The parts run in forked children even here: pytest-xdist's worker runs an I/O thread
    of its own, which would (rightly) keep export from forking (test below)."""
    monkeypatch.setattr(fast_mod, "_one_thread", lambda: True)


def test_an_export_never_forks_beside_a_thread_threading_does_not_know(varied, tmp_path):
    """Forking beside another thread can leave a lock held forever in the child. The count
    is the kernel's: a thread started by C code or by _thread is one too."""
    import _thread

    started, release = _thread.allocate_lock(), _thread.allocate_lock()
    started.acquire()
    release.acquire()

    def wait():
        started.release()
        release.acquire()

    _thread.start_new_thread(wait, ())
    started.acquire()
    real_fork = os.fork
    try:
        assert not fast_mod._one_thread()
        os.fork = lambda: pytest.fail("export forked beside another thread")
        r = export(varied, tmp_path / "one.json", "chrome", counters=COUNTERS, jobs=2)
    finally:
        os.fork = real_fork
        release.release()
    assert r.events == sum(s.events for s in read_trace(varied).streams)


def test_the_fast_path_runs_on_the_varied_trace(varied):
    subs, errors = open_streams(varied)
    assert not errors and len(subs) == 2  # the parent and the fork child
    assert applies(subs, "perfetto") and applies(subs, "chrome")


@pytest.mark.parametrize("fmt", ["perfetto", "chrome"])
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("sample", [fast_mod.SAMPLE, 3])
def test_fast_path_shows_what_the_walker_shows(varied, tmp_path, fmt, jobs, sample, monkeypatch):
    # sample 3: each class decides at once between its payload cache and none, and both
    # kinds of handler run (at 256 the small trace stays in the sampling one).
    monkeypatch.setattr(fast_mod, "SAMPLE", sample)
    _fork_here(monkeypatch)
    if sample == 3:  # and only the classes the index says were fired are compiled
        monkeypatch.setattr(fast_mod, "_COMPILE_ALL", 0)
    (fast, r_fast), (slow, r_slow) = both(varied, tmp_path, fmt, jobs)
    assert r_fast == r_slow
    assert r_fast.unfinished >= 3 * 6 and r_fast.unmatched >= 3 * 4
    assert r_fast.skipped_values["q.depth.load"] > 0 and r_fast.counters > 0
    total = sum(s.events for s in read_trace(varied).streams)
    assert r_fast.events == total
    if fmt == "perfetto":
        sequences = {p.trusted_packet_sequence_id for p in decode(fast).packet}
        assert sequences == set(range(1, jobs + 1))  # one per process: the parts ran
        view, sent, counter_tracks, n = perfetto_view(fast)
        assert (view, sent, counter_tracks, n) == perfetto_view(slow)
        names = {i for _, (sl, ins, _) in view.items() for i in sl + ins}
        assert any("end.id" in i for i in names)  # the clash renamed, the begin's kept
        assert any("(unfinished)" in i for i in names)
        assert any("end without begin" in i for i in names)
    else:
        assert chrome_view(fast) == chrome_view(slow)


@pytest.mark.parametrize("fmt", ["perfetto", "chrome"])
@pytest.mark.parametrize("jobs", [1, 2])
def test_fast_path_on_a_damaged_trace_matches_the_walker(varied, tmp_path, fmt, jobs, monkeypatch):
    _fork_here(monkeypatch)
    # A packet whose ids the index cannot vouch for makes every class compiled again.
    monkeypatch.setattr(fast_mod, "_COMPILE_ALL", 0)
    damaged = tmp_path / "damaged"
    shutil.copytree(varied, damaged)
    streams = sorted(read_trace(damaged).streams, key=lambda s: -s.events)
    # An unknown event id in the middle of one packet, a length past the content in
    # another stream: each packet keeps what came before its damage.
    for stream, what in ((streams[0], b"\xff\xff\xff\x7f"), (streams[1], None)):
        p = stream.packet_list()[0]
        data = stream.read_packet(p)
        pos, skips = p.start, stream.sub.skips
        for _ in range(p.count // 2):
            eid = int.from_bytes(data[pos : pos + 4], "little")
            pos = skips[eid](data, pos + 12, p.content_end)
        with open(stream.path, "r+b") as f:
            f.seek(p.offset + pos)
            if what is not None:
                f.write(what)
            else:  # the timestamp goes backwards
                f.seek(p.offset + pos + 4)
                f.write(b"\x00" * 8)
    (fast, r_fast), (slow, r_slow) = both(damaged, tmp_path, fmt, jobs)
    # The same errors (listed in stream order by one, in time order by the other).
    assert len(r_fast.errors) == 2 and sorted(r_fast.errors) == sorted(r_slow.errors)
    r_fast.errors.sort()
    r_slow.errors.sort()
    assert r_fast == r_slow
    assert r_fast.events < sum(s.events for s in read_trace(varied).streams)
    if fmt == "perfetto":
        assert perfetto_view(fast) == perfetto_view(slow)
    else:
        assert chrome_view(fast) == chrome_view(slow)


def test_the_walker_runs_where_the_fast_path_would_not_be_exact():
    """A thread whose events are in two streams (the fast path walks streams one after the
    other, so its spans would pair out of order), or a Perfetto timestamp outside the
    9-byte varint range the packet prefixes assume: applies() says no."""
    from types import SimpleNamespace as NS

    def packet(pid, tid, ts):
        return NS(pid=pid, tid=tid, ts_begin=ts, ts_end=ts)

    def sub(*streams):
        meta = NS(freq=1_000_000_000, offset_ns=0)
        streams_ = [NS(packet_list=lambda ps=ps: ps) for ps in streams]
        return NS(meta=meta, streams=streams_, task_event_id=-1)  # no task class: see below

    now = 1_700_000_000_000_000_000
    ok = sub([packet(1, 1, now)], [packet(1, 2, now)])
    assert applies([ok], "perfetto") and applies([ok], "chrome")
    shared = sub([packet(1, 1, now)], [packet(1, 2, now), packet(1, 1, now)])
    assert not applies([shared], "perfetto") and not applies([shared], "chrome")
    early = sub([packet(1, 1, 5)])
    assert not applies([early], "perfetto") and applies([early], "chrome")


def test_traces_with_asyncio_tasks_take_the_walker(tmp_path, uniq):
    # Task events put spans on tracks of their own, which only the walker makes; a trace
    # that recorded none (the task class is always declared) keeps the fast path.
    import asyncio

    import tracemark
    from tracemark.ctf.reader import read_trace

    m = tracemark.marker(f"{uniq}.m", n=int)

    async def work():
        m(1)

    with tracemark.record(tmp_path / "plain", f"{uniq}.*"):
        m(0)
    with tracemark.record(tmp_path / "tasks", f"{uniq}.*"):
        asyncio.run(work())
    plain = read_trace(tmp_path / "plain").subtraces
    tasks = read_trace(tmp_path / "tasks").subtraces
    assert all(s.task_event_id >= 0 for s in plain + tasks)
    assert applies(plain, "perfetto") and applies(plain, "chrome")
    assert not applies(tasks, "perfetto") and not applies(tasks, "chrome")


def test_only_the_fired_classes_are_compiled(tmp_path, uniq, monkeypatch):
    """A program that declares thousands of markers and fires a few: exporting its trace
    compiles handlers for those few (it took 40 s for 5,000 declared markers)."""
    import tracemark
    from tracemark.ctf import reader

    declared = [tracemark.marker(f"{uniq}.m{i}", n=int) for i in range(300)]
    with tracemark.record(tmp_path / "t"):
        declared[7](1)
        declared[200](2)
    compiled = []
    real = reader.compile_handlers

    def spy(sub, *args, **kwargs):
        compiled.append(kwargs.get("only"))
        return real(sub, *args, **kwargs)

    monkeypatch.setattr(fast_mod, "compile_handlers", spy)
    (sub,) = read_trace(tmp_path / "t").subtraces
    wanted = {f"{uniq}.m7", f"{uniq}.m200"}
    fired = {eid for eid, (name, _) in sub.meta.events.items() if name in wanted}
    assert len(sub.meta.events) > 300 and len(fired) == 2
    for fmt in ("perfetto", "chrome"):
        (_, r_fast), (_, r_slow) = both(tmp_path / "t", tmp_path, fmt)
        assert r_fast == r_slow and r_fast.events == 2
    assert compiled == [fired, fired]
