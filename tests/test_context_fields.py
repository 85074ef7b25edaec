"""Context fields: a marker's field read from a ContextVar when it fires (tracemark.context)."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import math
import threading

import pytest

import tracemark
from tracemark.cli import main
from tracemark.ctf import read_trace

REQ = contextvars.ContextVar("request_id")
USER = contextvars.ContextVar("user", default="anonymous")
OTHER = contextvars.ContextVar("other")


def test_read_when_fired_with_a_default_when_unset(uniq, rec):
    m = tracemark.marker(f"{uniq}.m", n=int, request_id=tracemark.context(REQ, int))
    assert [str(f) for f in m.fields] == ["n: int", "request_id: int = context(request_id)"]
    u = tracemark.marker(f"{uniq}.u", user=tracemark.context(USER, str))
    d = tracemark.marker(f"{uniq}.d", r=tracemark.context(REQ, float, default=0.5))
    f = tracemark.marker(f"{uniq}.f", r=tracemark.context(REQ, float))
    with tracemark.connect(f"{uniq}.*", rec):
        ctx = contextvars.Context()  # REQ unset in here
        ctx.run(m, 1)
        ctx.run(u)
        ctx.run(d)
        ctx.run(f)

        def inside():
            REQ.set(27)
            USER.set("ann")
            m(2)
            m(n=3)  # keywords take the slow path: the same values
            u()

        contextvars.Context().run(inside)
    assert rec.events[:3] == [
        (f"{uniq}.m", (1, -1)),
        (f"{uniq}.u", ("anonymous",)),
        (f"{uniq}.d", (0.5,)),
    ]
    assert rec.events[3][0] == f"{uniq}.f" and math.isnan(rec.events[3][1][0])
    assert rec.events[4:] == [
        (f"{uniq}.m", (2, 27)),
        (f"{uniq}.m", (3, 27)),
        (f"{uniq}.u", ("ann",)),
    ]


def test_a_value_of_another_type_or_passed_by_the_caller_is_a_counted_fault(uniq, rec):
    m = tracemark.marker(f"{uniq}.m", request_id=tracemark.context(REQ, int))

    def run():
        REQ.set("not an int")
        m()

    with tracemark.connect(f"{uniq}.*", rec), pytest.warns(tracemark.TracemarkWarning):
        contextvars.Context().run(run)
        m(5)  # callers do not pass it: an extra argument
        m(request_id=5)
    (info,) = tracemark.markers(f"{uniq}.m")
    assert info.bad_arguments == 3 and rec.events == []


def test_declarations(uniq):
    field = tracemark.context(REQ, int)
    m = tracemark.marker(f"{uniq}.m", request_id=field)
    assert tracemark.marker(f"{uniq}.m", request_id=tracemark.context(REQ, "int")) is m
    with pytest.warns(tracemark.TracemarkWarning, match="fields"):  # another variable:
        other = tracemark.marker(f"{uniq}.m", request_id=tracemark.context(OTHER, int))
    assert other.name == f"test_context_fields.{uniq}.m"  # another marker
    with pytest.raises(ValueError, match="'anonymous' for ContextVar 'user' is not a int"):
        tracemark.context(USER, int)  # the variable's own default does not fit
    with pytest.raises(ValueError, match=r"tracemark.context\(request_id, TYPE\)"):
        tracemark.marker(f"{uniq}.x", request_id=REQ)
    with pytest.raises(ValueError, match="type"):
        tracemark.context(REQ, list)
    with pytest.raises(ValueError, match="not a int"):
        tracemark.context(REQ, int, default="x")
    with pytest.raises(ValueError, match="ContextVar"):
        tracemark.context("request_id", int)
    q = tracemark.span(f"{uniq}.q", table=str, request_id=field)
    assert [f.name for f in q.end.fields] == ["request_id"]  # ends carry it too


def test_printer_and_patched_statements(uniq, tmp_path, monkeypatch):
    src = tmp_path / f"ctxmod_{uniq}.py"
    src.write_text(
        "import contextvars, tracemark\n"
        "REQ = contextvars.ContextVar('req')\n"
        f"m = tracemark.marker('{uniq}.m', n=int, req=tracemark.context(REQ, int))\n"
        "def f(n):\n"
        "    REQ.set(n * 10)\n"
        "    m(n)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    original = mod.f.__code__
    contextvars.Context().run(mod.f, 1)
    assert mod.f.__code__ is not original  # the marker statement is patched: jumped over
    out = io.StringIO()
    with tracemark.connect(f"{uniq}.*", tracemark.Printer(file=out)):
        contextvars.Context().run(mod.f, 2)
    assert out.getvalue().rstrip().endswith(f"{uniq}.m: n=2 req=20")


def _request(span, db, rid):
    REQ.set(rid)
    with span(f"/users/{rid}"):
        db()


async def _async_request(span, db, rid):
    REQ.set(rid)
    with span(f"/users/{rid}"):
        await asyncio.sleep(0)  # the other task runs here, with its own id
        db()
        await asyncio.sleep(0)


def test_concurrent_requests_each_event_carries_its_own_id(uniq, tmp_path):
    http = tracemark.span(f"{uniq}.http", path=str, request_id=tracemark.context(REQ, int))
    db = tracemark.marker(f"{uniq}.db", request_id=tracemark.context(REQ, int))
    also = []  # a second probe on db: the recorder's unfused path too
    with tracemark.record(tmp_path / "t", f"{uniq}.*"):
        with tracemark.connect(f"{uniq}.db", lambda m, a: also.append(a)):

            async def both():
                await asyncio.gather(*(_async_request(http, db, r) for r in (27, 28)))

            asyncio.run(both())
        barrier = threading.Barrier(2)

        def thread(rid):
            barrier.wait()
            for _ in range(50):
                _request(http, db, rid)

        threads = [threading.Thread(target=thread, args=(r,)) for r in (37, 38)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(also) == [(27,), (28,)]
    events = list(read_trace(tmp_path / "t").events())
    assert len(events) == 2 * 3 + 2 * 50 * 3
    for ev in events:
        rid = ev.fields["request_id"]
        if "path" in ev.fields:
            assert ev.fields["path"] == f"/users/{rid}"
    counts = {r: sum(e.fields["request_id"] == r for e in events) for r in (27, 28, 37, 38)}
    assert counts == {27: 3, 28: 3, 37: 150, 38: 150}
    # ... so "all events of request 27" is one filter
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["view", str(tmp_path / "t"), "--json", "--filter", "request_id == 27"]) == 0
    shown = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert [e["name"] for e in shown] == [f"{uniq}.http.begin", f"{uniq}.db", f"{uniq}.http.end"]


def test_decorated_functions_read_context_fields(uniq, rec):
    q = tracemark.span(f"{uniq}.q", table=str, request_id=tracemark.context(REQ, int))

    @q
    def lookup(table):
        return table

    def run():
        REQ.set(7)
        return lookup("users")

    with tracemark.connect(f"{uniq}.*", rec):
        assert contextvars.Context().run(run) == "users"
    assert rec.events == [(f"{uniq}.q.begin", ("users", 7)), (f"{uniq}.q.end", (7,))]
