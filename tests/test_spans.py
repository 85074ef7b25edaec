"""Spans (tracemark.span): a begin/end marker pair, free while inactive, paired by readers."""

from __future__ import annotations

import threading

import pytest

import tracemark
from tracemark.analysis import End, Pairing
from tracemark.ctf import read_trace


def _module(tmp_path, monkeypatch, name, body):
    src = tmp_path / f"{name}.py"
    src.write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name), src


def test_a_span_is_two_markers(uniq):
    q = tracemark.span(f"{uniq}.q", table=str, rows=int)
    assert q.name == f"{uniq}.q"
    (b,) = tracemark.markers(f"{uniq}.q.begin")
    (e,) = tracemark.markers(f"{uniq}.q.end")
    assert [f.name for f in b.fields] == ["table", "rows"] and e.fields == ()
    assert tracemark.span(f"{uniq}.q", table=str, rows=int) == q  # declared again: the same
    with pytest.warns(tracemark.TracemarkWarning, match="fields"):
        other = tracemark.span(f"{uniq}.q", table=int)  # from another line: its own span
    assert other.name == f"test_spans.{uniq}.q" and other != q
    with pytest.raises(AttributeError):
        q.begin = print
    assert tracemark.span(f"{uniq}.p", "n=%d").begin.fields[0].type is int


def test_begin_and_end_statements_are_jumped_over_while_inactive(tmp_path, monkeypatch, uniq, rec):
    mod, src = _module(
        tmp_path,
        monkeypatch,
        f"spanmod_{uniq}",
        "import tracemark\n"
        f"q = tracemark.span('{uniq}.q', n=int)\n"
        "seen = []\n"
        "def f(x):\n"
        "    q.begin(seen.append(x) or x)\n"
        "    y = x + 1\n"
        "    q.end()\n"
        "    return y\n",
    )
    original = mod.f.__code__
    assert mod.f(1) == 2 and mod.seen == [1]  # first run: the plain call path
    assert mod.f.__code__ is not original  # patched now
    assert mod.f(2) == 3 and mod.seen == [1]  # arguments not evaluated
    infos = {i.name: i for i in tracemark.markers(f"{uniq}.q.*")}
    for name, line in [(f"{uniq}.q.begin", 5), (f"{uniq}.q.end", 7)]:
        assert [(s.where, s.patched) for s in infos[name].sites] == [(f"{src}:{line}", True)]
    with tracemark.connect(f"{uniq}.q.*", rec):
        assert mod.f(3) == 4
    assert rec.events == [(f"{uniq}.q.begin", (3,)), (f"{uniq}.q.end", ())]
    assert mod.seen == [1, 3]
    # Rebinding the span's name is noticed, like a rebound marker name.
    mod.q = type(
        "Spy", (), {"begin": staticmethod(mod.seen.append), "end": staticmethod(lambda: None)}
    )()
    assert mod.f(9) == 10 and mod.seen[-1] == 9


def test_with_fires_begin_and_end_also_on_an_exception(uniq, rec):
    q = tracemark.span(f"{uniq}.q", n=int)
    with q(1):  # inactive: nothing
        pass
    with tracemark.connect(f"{uniq}.q.*", rec):
        with q(2):
            pass
        with pytest.raises(KeyError), q(n=3):
            raise KeyError
    assert rec.events == [
        (f"{uniq}.q.begin", (2,)),
        (f"{uniq}.q.end", ()),
        (f"{uniq}.q.begin", (3,)),
        (f"{uniq}.q.end", ()),
    ]


def test_inactive_with_is_one_shared_object(uniq):
    q = tracemark.span(f"{uniq}.q")
    assert q() is q()


def test_recorded_spans_pair_per_thread_with_their_durations(tmp_path, uniq):
    req = tracemark.span(f"{uniq}.req", path=str)
    db = tracemark.span(f"{uniq}.db")
    barrier = threading.Barrier(3)

    def handle(i):
        barrier.wait()
        for _ in range(20):
            with req(f"/users/{i}"), db():
                pass

    with tracemark.record(tmp_path, f"{uniq}.*"):
        threads = [threading.Thread(target=handle, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    events = list(read_trace(tmp_path).events())
    assert len(events) == 3 * 20 * 4
    p = Pairing()
    ends = [i for i in p.pair(events) if isinstance(i, End)]
    assert p.unmatched == p.unfinished == 0 and len(ends) == 120
    for end in ends:
        assert end.begin.tid == end.event.tid and end.duration >= 0
        assert end.depth == (1 if end.span == f"{uniq}.db" else 0)
    paths = {e.begin.fields["path"] for e in ends if e.span == f"{uniq}.req"}
    assert paths == {"/users/0", "/users/1", "/users/2"}
