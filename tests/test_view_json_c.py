"""``tracemark view --json`` made by the C reader (tracemark/_reader_json.c): byte for byte
what the Python path writes, on the test corpus (every field kind, ``any`` values, tasks),
a fork child's sub-trace, damaged traces, and events holding every odd value (inf, nan,
huge ints, control characters, non-ASCII and surrogate text, bytes, unknown types)."""

import io
import math
import os
import shutil

import creader_fuzz as fz
import pytest
from test_creader import _damaged_copies

import tracemark
from tracemark import env
from tracemark.cli import main, view
from tracemark.ctf.reader import Event, Task
from tracemark.markers.fields import ReprText


@pytest.fixture(autouse=True)
def _c_reader(monkeypatch):
    monkeypatch.delenv("TRACEMARK_CORE", raising=False)
    if env.reader()[0] is None:
        pytest.fail("the C reader is not built (python setup.py build_ext --inplace)")


def _both(monkeypatch, capsys, argv):
    got = []
    for core in ("", "python"):
        monkeypatch.setenv("TRACEMARK_CORE", core)
        rc = main(argv)
        captured = capsys.readouterr()
        got.append((rc, captured.out, captured.err))
    return got


# Forking while recording is a case tracemark supports (the consumer thread is running; the
# child sets itself up afresh), so Python 3.12+'s warning about fork with threads is expected.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_corpus_and_a_fork_child_give_the_same_json(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t"
    fz.make_corpus(str(path))
    m = tracemark.marker("vj.fork", who=str, x=float)
    with tracemark.record(path, "vj.*"):
        m("parent", math.inf)
        pid = os.fork()
        if pid == 0:
            try:
                m("child", -math.inf)
            finally:
                tracemark.tracers.recording.lifecycle.stop_all()
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        m("parent", math.nan)
    c, py = _both(monkeypatch, capsys, ["view", "--json", str(path)])
    assert c == py
    assert c[0] == 0 and c[1].count("\n") == 704 + 3
    assert '"task":{"id":' in c[1] and '"-inf"' in c[1]
    c, py = _both(monkeypatch, capsys, ["view", "--json", "--limit", "100", str(path)])
    assert c == py and c[1].count("\n") == 100


def test_damaged_traces_give_the_same_json_then_the_same_error(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    fz.make_corpus(str(src))
    failed = 0
    for path in _damaged_copies(src, tmp_path, 40, seed=3):
        c, py = _both(monkeypatch, capsys, ["view", "--json", str(path)])
        assert c == py
        failed += c[0] != 0
        shutil.rmtree(path)
    assert failed  # some damage stopped the reading part-way


ODD = [
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64,
    -(10**40),
    0.0,
    -0.0,
    1.5,
    1e300,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    True,
    False,
    None,
    "",
    "plain",
    'quote " backslash \\ slash /',
    "\x00\x01\x08\x09\x0a\x0c\x0d\x1f\x7f\x80",
    "héllo wörld ✓ 𝄞 \u2028",
    "lone \ud800 surrogate",
    ReprText("<object at 0x1>"),
    ReprText("repr \n with \udcff"),
    b"",
    b"\x00\xff bytes",
    [1, "x"],
    {"a": 1},
    bytearray(b"ab"),
]


def _events():
    evs = []
    task = Task(7, 'task "seven"')
    for i, v in enumerate(ODD):
        evs.append(Event(1_700_000_000_000_000_000 + i, "odd.one", {"v": v}, 42, 43, "Main", None))
        evs.append(Event(i, "odd.two", {"a": v, "b": i}, 42, 43, "worker-ü", task))
    evs.append(Event(1, "odd.none", {}, 42, 43, "Main", None))
    evs.append(Event(2, "odd.keys", {'k"\n': 1, "é": 2.5, "s\ud800": 3}, 42, 43, "Main", None))
    evs.append(Event(3, "odd\ud800name", {"v": 1}, 42, 43, "thr\x01ead", None))
    evs.append(Event(2**70, "odd.bigts", {"v": 1}, 2**65, -5, "Main", None))
    evs.append(Event(4, "odd.pid", {"v": 1}, "not an int", 43, "Main", None))
    evs.append(Event(5, "odd.%s%d", {"%s": "%d"}, 42, 43, "%", Task(1, "%s")))
    evs.append(("a", "tuple", "not an Event"))
    return evs


def _json(monkeypatch, core, events, **kw):
    monkeypatch.setenv("TRACEMARK_CORE", core)
    out = io.StringIO()
    n = view.write_json(events, out, **kw)
    return n, out.getvalue()


def test_odd_values_give_the_same_json(monkeypatch):
    evs = _events()[:-1]
    c = _json(monkeypatch, "", evs)
    assert c == _json(monkeypatch, "python", evs)
    assert c[0] == len(evs)
    assert '"v":"nan"' in c[1] and '"v":"00ff206279746573"' in c[1] and '"v":-0.0' in c[1]
    many = evs * 40  # across the C path's chunks, with its cache of line pieces full
    assert _json(monkeypatch, "", many, limit=900) == _json(monkeypatch, "python", many, limit=900)


def test_an_object_that_is_not_an_event_fails_alike_after_the_lines_before_it(monkeypatch):
    evs = _events()
    got = []
    for core in ("", "python"):
        monkeypatch.setenv("TRACEMARK_CORE", core)
        out = io.StringIO()
        with pytest.raises(AttributeError):
            view.write_json(evs, out)
        got.append(out.getvalue())
    assert got[0] == got[1] and got[0].count("\n") == len(evs) - 1


def test_the_c_path_writes_plain_events_itself():
    """Not a path that declines everything (then the test above would compare Python with
    itself): format_json formats events of plain values whole."""
    fast = env.reader()[0]
    evs = [e for e in _events()[:-1] if e.name in ("odd.one", "odd.two", "odd.none")]
    plain = [
        e for e in evs if type(e.fields.get("v", e.fields.get("a"))) not in (list, dict, bytearray)
    ]
    plain = [
        e
        for e in plain
        if not any("\ud800" in str(v) or "\udcff" in str(v) for v in e.fields.values())
    ]
    text, i = fast.format_json(plain, 0, [], view._json_pieces(3), ReprText, Event)
    assert i == len(plain) and text.count("\n") == len(plain)
