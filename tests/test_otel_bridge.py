"""The live OpenTelemetry bridge (tracemark.tracers.otel): what the module docstring promises.

Unit tests read what the SDK made (InMemorySpanExporter / InMemoryLogRecordExporter, through
the bridge's own batch processor, so the accounting is the real one); end-to-end tests send
OTLP/HTTP to the loopback collector of tests/otlp_collector.py, which decodes every request
with opentelemetry-proto, healthy and failing in each of the ways a real one fails.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
from opentelemetry import trace
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from otlp_collector import Collector

import tracemark
from tracemark.export.otel_attributes import attribute_value
from tracemark.tracers import otel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finished(exporter):
    return list(exporter.get_finished_spans())


def by_name(spans):
    out = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


# --- spans: names, attributes, times, nesting ----------------------------------------------


def test_a_span_pair_becomes_one_span_with_fields_times_and_events(uniq):
    q = tracemark.span(f"{uniq}.query", table=str, rows=int)
    note = tracemark.marker(f"{uniq}.note", step=str)
    exp = InMemorySpanExporter()
    with otel.bridge(f"{uniq}.*", exporter=exp) as b:
        before = time.time_ns()
        with q("users", 3):
            note("parsed")
            note("planned")
        after = time.time_ns()
    stats = b.stats()
    [s] = finished(exp)
    assert s.name == f"{uniq}.query"
    assert dict(s.attributes) == {"table": "users", "rows": 3}
    assert before <= s.start_time <= s.end_time <= after
    assert [e.name for e in s.events] == [f"{uniq}.note"] * 2
    assert [dict(e.attributes) for e in s.events] == [{"step": "parsed"}, {"step": "planned"}]
    assert s.start_time <= s.events[0].timestamp <= s.events[1].timestamp <= s.end_time
    assert s.parent is None and s.status.status_code is StatusCode.UNSET
    assert stats["spans_made"] == stats["spans_sent"] == 1 and stats["events"] == 2
    assert stats["spans_dropped"] == stats["spans_failed"] == stats["spans_pending"] == 0


def test_begin_and_end_statements_and_end_fields(uniq):
    import contextvars

    rid = contextvars.ContextVar(f"{uniq}_rid")
    q = tracemark.span(f"{uniq}.req", path=str, request_id=tracemark.context(rid, int))
    exp = InMemorySpanExporter()
    with otel.bridge(f"{uniq}.*", exporter=exp):
        rid.set(27)
        q.begin("/a")
        rid.set(28)  # the end marker reads its context field again: the end's value is added
        q.end()
    [s] = finished(exp)
    assert dict(s.attributes) == {"path": "/a", "request_id": 28}


def test_nesting_inside_the_programs_span_and_the_programs_span_inside_ours(uniq):
    provider = TracerProvider()
    exp = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    app = provider.get_tracer("app")
    q = tracemark.span(f"{uniq}.step", n=int)
    with otel.bridge(f"{uniq}.*", tracer_provider=provider) as b:
        with app.start_as_current_span("request") as request:
            with q(1), app.start_as_current_span("db") as db, q(2):
                pass
            assert trace.get_current_span() is request  # the context is restored
        assert not trace.get_current_span().is_recording()
    spans = by_name(finished(exp))
    outer, inner = sorted(spans[f"{uniq}.step"], key=lambda s: s.attributes["n"])
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in finished(exp)} == {trace_id}
    assert outer.parent.span_id == request.get_span_context().span_id
    assert spans["db"][0].parent.span_id == outer.context.span_id
    assert inner.parent.span_id == db.get_span_context().span_id
    st = b.stats()
    # The program's provider exports: the bridge counts what it made, not the fates.
    assert st["spans_made"] == 2 and st["spans_sent"] is None


def test_decorated_span_and_error_status(uniq):
    q = tracemark.span(f"{uniq}.work", x=int)

    @q
    def work(x):
        if x < 0:
            raise ValueError(f"negative {x}")
        return x

    exp = InMemorySpanExporter()
    with otel.bridge(f"{uniq}.*", exporter=exp):
        assert work(1) == 1
        with pytest.raises(ValueError):
            work(-1)
        with pytest.raises(KeyError), q(-2):
            raise KeyError("k")
        try:
            raise OSError("handled")
        except OSError:
            with q(3):  # ends normally inside an except block: not an error
                pass
    spans = {s.attributes["x"]: s for s in finished(exp)}
    assert set(spans) == {1, -1, -2, 3}
    assert spans[1].status.status_code is StatusCode.UNSET
    assert spans[3].status.status_code is StatusCode.UNSET
    assert spans[-2].status.status_code is StatusCode.ERROR
    assert spans[-2].attributes["exception.type"] == "KeyError"
    # @q left by an exception: both mechanisms (sys.monitoring, recompile) tell the end.
    assert spans[-1].status.status_code is StatusCode.ERROR
    assert spans[-1].attributes["exception.message"] == "negative -1"


def test_probe_entry_and_raise_pair_into_a_failed_span(uniq, tmp_path, monkeypatch):
    # A module with a source file: the recompile mechanism (3.11) needs one.
    (tmp_path / f"{uniq}_mod.py").write_text(
        "def f(a):\n    if a:\n        raise RuntimeError('boom')\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module(f"{uniq}_mod")
    try:
        handles = [
            tracemark.probe(f"{mod.__name__}:f", capture=["a"]),
            tracemark.probe(f"{mod.__name__}:f", at="raise", capture=["a"]),
            tracemark.probe(f"{mod.__name__}:f", at="return", capture=["a"]),
        ]
        exp = InMemorySpanExporter()
        with otel.bridge("probe.*", exporter=exp):
            mod.f(0)
            with pytest.raises(RuntimeError):
                mod.f(1)
        for h in handles:
            tracemark.unprobe(h)
    finally:
        del sys.modules[mod.__name__]
    spans = sorted(finished(exp), key=lambda s: s.attributes["a"])
    assert [s.name for s in spans] == [f"probe.{mod.__name__}.f"] * 2
    assert spans[0].status.status_code is StatusCode.UNSET and "duration_ns" in spans[0].attributes
    assert spans[1].status.status_code is StatusCode.ERROR
    assert spans[1].attributes["exception.type"] == "RuntimeError"
    assert spans[1].attributes["exception.message"] == "boom"


def test_an_end_that_skips_open_spans_ends_them_unfinished_and_stray_ends_are_counted(uniq):
    a = tracemark.span(f"{uniq}.a")
    b_ = tracemark.span(f"{uniq}.b")
    exp = InMemorySpanExporter()
    with otel.bridge(f"{uniq}.*", exporter=exp) as br:
        b_.end()  # no begin
        a.begin()
        b_.begin()
        a.end()  # b is still open inside a
        assert not trace.get_current_span().is_recording()
        a.begin()  # left open: ended by stop
    assert not trace.get_current_span().is_recording()  # stop restored this context
    spans = by_name(finished(exp))
    assert spans[f"{uniq}.b"][0].attributes["tracemark.unfinished"] is True
    assert spans[f"{uniq}.b"][0].parent.span_id == spans[f"{uniq}.a"][0].context.span_id
    assert len(spans[f"{uniq}.a"]) == 2
    st = br.stats()
    assert st["unmatched"] == 1 and st["unfinished"] == 2 and st["spans_made"] == 3


def test_a_marker_with_no_current_span_becomes_a_span_of_its_own(uniq):
    m = tracemark.marker(f"{uniq}.alone", n=int)
    exp = InMemorySpanExporter()
    with otel.bridge(f"{uniq}.*", exporter=exp) as b:
        m(5)
    [s] = finished(exp)
    assert s.name == f"{uniq}.alone" and s.start_time == s.end_time
    assert dict(s.attributes) == {"n": 5, "tracemark.instant": True}
    assert b.stats()["orphan_markers"] == 1


def test_logs_mode_makes_log_records_with_trace_context(uniq):
    q = tracemark.span(f"{uniq}.op")
    m = tracemark.marker(f"{uniq}.said", text=str)
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    with otel.bridge(f"{uniq}.*", markers="logs", exporter=spans, log_exporter=logs) as b:
        with q():
            m("inside")
        m("outside")
    [s] = finished(spans)
    records = [r.log_record for r in logs.get_finished_logs()]
    assert [r.body for r in records] == [f"{uniq}.said"] * 2
    assert [dict(r.attributes) for r in records] == [{"text": "inside"}, {"text": "outside"}]
    assert records[0].trace_id == s.context.trace_id and records[0].span_id == s.context.span_id
    assert not records[1].trace_id
    assert not s.events
    st = b.stats()
    assert st["logs_made"] == st["logs_sent"] == 2 and st["logs_dropped"] == 0


def test_values_opentelemetry_cannot_carry_arrive_by_the_rule(uniq):
    m = tracemark.marker(f"{uniq}.odd", big=object, raw=bytes, x=float, s=str)
    q = tracemark.span(f"{uniq}.wrap")
    exp = InMemorySpanExporter()
    values = (2**70, b"\x00\xff", math.nan, "a\udcffb")
    with otel.bridge(f"{uniq}.*", exporter=exp) as b, q():
        m(*values)
    [s] = finished(exp)
    got = dict(s.events[0].attributes)
    want = {k: attribute_value(v) for k, v in zip(("big", "raw", "x", "s"), values, strict=True)}
    assert got["raw"] == "00ff" and got["x"] == "nan" and got["s"] == "a\\udcffb"
    assert got == {**want, "big": attribute_value(repr(2**70))}
    assert b.stats()["errors"] == 0


# --- threads and asyncio --------------------------------------------------------------------


def test_threads_each_nest_their_own_spans(uniq):
    outer = tracemark.span(f"{uniq}.outer", t=int)
    inner = tracemark.span(f"{uniq}.inner", t=int, i=int)
    exp = InMemorySpanExporter()
    N, T = 50, 4

    def work(t):
        for i in range(N):
            with outer(t), inner(t, i):
                pass

    with otel.bridge(f"{uniq}.*", exporter=exp, max_queue_size=10_000) as b:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(T)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    spans = by_name(finished(exp))
    outers = {s.context.span_id: s for s in spans[f"{uniq}.outer"]}
    assert len(outers) == N * T and len(spans[f"{uniq}.inner"]) == N * T
    for s in spans[f"{uniq}.inner"]:
        parent = outers[s.parent.span_id]
        assert parent.attributes["t"] == s.attributes["t"]
        assert parent.start_time <= s.start_time <= s.end_time <= parent.end_time
    assert all(s.parent is None for s in outers.values())
    assert b.stats()["spans_made"] == b.stats()["spans_sent"] == 2 * N * T


def test_asyncio_tasks_each_parent_their_spans_correctly(uniq):
    top = tracemark.span(f"{uniq}.gather")
    req = tracemark.span(f"{uniq}.req", n=int)
    sub = tracemark.span(f"{uniq}.sub", n=int)
    said = tracemark.marker(f"{uniq}.said", n=int)
    exp = InMemorySpanExporter()
    N = 100

    async def one(n):
        with req(n):
            await asyncio.sleep(0)
            with sub(n):
                await asyncio.sleep(0.001 * (n % 3))
                said(n)
            await asyncio.sleep(0)

    async def main():
        with top():
            await asyncio.gather(*(one(n) for n in range(N)))

    with otel.bridge(f"{uniq}.*", exporter=exp, max_queue_size=10_000) as b:
        asyncio.run(main())
    spans = by_name(finished(exp))
    [g] = spans[f"{uniq}.gather"]
    reqs = {s.attributes["n"]: s for s in spans[f"{uniq}.req"]}
    subs = {s.attributes["n"]: s for s in spans[f"{uniq}.sub"]}
    assert sorted(reqs) == sorted(subs) == list(range(N))
    for n in range(N):
        assert reqs[n].parent.span_id == g.context.span_id
        assert subs[n].parent.span_id == reqs[n].context.span_id
        assert [dict(e.attributes) for e in subs[n].events] == [{"n": n}]
    st = b.stats()
    assert st["spans_made"] == 2 * N + 1 and st["unmatched"] == st["unfinished"] == 0


def test_a_task_ending_its_parents_span_is_unmatched_not_paired(uniq):
    q = tracemark.span(f"{uniq}.s")
    exp = InMemorySpanExporter()

    async def child():
        q.end()  # the parent task's span: another track

    async def main():
        q.begin()
        await asyncio.create_task(child())
        q.end()

    with otel.bridge(f"{uniq}.*", exporter=exp) as b:
        asyncio.run(main())
    [s] = finished(exp)
    assert "tracemark.unfinished" not in s.attributes
    assert b.stats()["unmatched"] == 1


# --- resource, import, API -------------------------------------------------------------------


def test_resource_follows_the_otel_environment(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shop")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,host.name=h1")
    r = otel.make_resource().attributes
    assert r["service.name"] == "shop" and r["deployment.environment"] == "test"
    assert r["host.name"] == "h1"  # the environment wins over tracemark's default
    assert r["process.pid"] == os.getpid() and r["process.runtime.name"] == "cpython"
    assert otel.make_resource("given").attributes["service.name"] == "given"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    r = otel.make_resource().attributes
    from tracemark.tracers.recording.session import _procname

    assert r["service.name"] == _procname() and r["host.name"]


def test_import_tracemark_imports_no_opentelemetry_and_the_root_reexports_lazily():
    code = (
        "import sys, tracemark\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "from tracemark.tracers.otel import bridge\n"
        "assert tracemark.otel_bridge is bridge\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_env())


def test_missing_opentelemetry_is_an_import_error_naming_the_extra():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'opentelemetry':
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import tracemark
        try:
            tracemark.otel_bridge
        except ImportError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env()
    )
    assert "pip install 'tracemark[otel]'" in out.stdout, out.stderr


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + os.path.join(ROOT, "tests")
    env.update(extra)
    return env


# --- end to end, and the collector's failures -----------------------------------------------


def test_end_to_end_through_otlp_http(uniq):
    q = tracemark.span(f"{uniq}.job", n=int, blob=bytes)
    inner = tracemark.span(f"{uniq}.part", n=int)
    m = tracemark.marker(f"{uniq}.tick", n=int)
    with Collector() as c:
        with otel.bridge(f"{uniq}.*", endpoint=c.endpoint, service_name="e2e") as b:
            for n in range(20):
                with q(n, b"\x01\x02"), inner(n):
                    m(n)
        received = c.spans()
        [rs] = c.traces()[0].resource_spans[:1]
    st = b.stats()
    assert st["spans_made"] == st["spans_sent"] == len(received) == 40
    jobs = {s.span_id: s for s in received if s.name == f"{uniq}.job"}
    parts = [s for s in received if s.name == f"{uniq}.part"]
    assert len(jobs) == 20 and len(parts) == 20
    for p in parts:
        parent = jobs[p.parent_span_id]
        n = {a.key: a.value.int_value for a in p.attributes}["n"]
        assert {a.key: a.value for a in parent.attributes}["n"].int_value == n
        assert {a.key: a.value for a in parent.attributes}["blob"].string_value == "0102"
        assert [e.name for e in p.events] == [f"{uniq}.tick"]
        assert parent.start_time_unix_nano <= p.start_time_unix_nano
        assert p.end_time_unix_nano <= parent.end_time_unix_nano
    res = {a.key: a.value for a in rs.resource.attributes}
    assert res["service.name"].string_value == "e2e"
    assert res["process.pid"].int_value == os.getpid()


def _flood(uniq, endpoint, n, **kw):
    """Make ``n`` spans as fast as the program can; return (seconds, bridge stats)."""
    q = tracemark.span(f"{uniq}.flood", i=int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = otel.bridge(f"{uniq}.*", endpoint=endpoint, **kw)
        t0 = time.perf_counter()
        for i in range(n):
            with q(i):
                pass
        elapsed = time.perf_counter() - t0
        t1 = time.perf_counter()
        stats = b.stop()
        stopping = time.perf_counter() - t1
    return elapsed, stopping, stats, caught


FAILURES = {
    "down": lambda c: c.stop(),
    "slow": lambda c: setattr(c, "delay", 0.4),
    "503": lambda c: c.fail(503),
    "400": lambda c: c.fail(400),
    "hang-up": lambda c: setattr(c, "hang_up", 10**6),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failing_collector_never_slows_the_program_and_every_span_is_counted(uniq, failure):
    n = 3000
    kw = dict(max_queue_size=256, max_export_batch_size=128, export_timeout=1.0, stop_timeout=1.5)
    with Collector() as healthy:
        baseline, _, st0, _ = _flood(uniq, healthy.endpoint, n, **kw)
    with Collector() as c:
        FAILURES[failure](c)
        elapsed, stopping, st, caught = _flood(uniq, c.endpoint, n, **kw)
        time.sleep(0.2)
        received = len(c.spans()) if failure != "down" else 0
    # Never blocked: the loop costs what it costs against a healthy collector (bounded by the
    # queue: a full queue drops, it does not wait), and stop keeps to its timeout.
    assert elapsed < 3 * baseline + 0.5, (elapsed, baseline)
    assert stopping < kw["stop_timeout"] + 1.0
    # Nothing lost silently: every span made is sent (and received) or counted.
    assert st["spans_made"] == n and st0["spans_made"] == n
    assert st["spans_sent"] + st["spans_failed"] + st["spans_dropped"] == n
    assert st["spans_sent"] <= received <= st["spans_sent"] + st["spans_failed"]
    if failure != "slow":
        assert st["spans_sent"] == 0 and received == 0
        assert st["spans_failed"] + st["spans_dropped"] == n
    else:
        assert st["spans_dropped"] > 0 and received > 0  # a slow one: the queue overflows
    assert any("lost data" in str(w.message) for w in caught)


def test_fork_pool_workers_each_send_with_their_own_bridge(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp, os, sys, json
            import tracemark
            from tracemark.tracers import otel
            q = tracemark.span("pool.task", n=int)

            def task(n):
                with q(n):
                    pass
                return os.getpid()

            if __name__ == "__main__":
                b = otel.bridge("pool.*", endpoint=sys.argv[1])
                with q(-1):
                    pass
                pool = mp.get_context("fork").Pool(2)
                pids = set(pool.map(task, range(20), chunksize=1))
                pool.close()
                pool.join()
                st = b.stop()
                print(json.dumps({"parent": os.getpid(), "workers": sorted(pids),
                                  "made": st["spans_made"]}))
            """
        )
    )
    import json

    with Collector() as c:
        out = subprocess.run(
            [sys.executable, "-W", "ignore::DeprecationWarning", str(script), c.endpoint],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        by_pid: dict[int, list] = {}
        for request in c.traces():
            for rs in request.resource_spans:
                pid = {a.key: a.value for a in rs.resource.attributes}["process.pid"].int_value
                for ss in rs.scope_spans:
                    by_pid.setdefault(pid, []).extend(
                        {a.key: a.value for a in s.attributes}["n"].int_value for s in ss.spans
                    )
    assert info["made"] == 1 and by_pid[info["parent"]] == [-1]
    workers = {p: ns for p, ns in by_pid.items() if p != info["parent"]}
    assert set(workers) == set(info["workers"])  # each worker sent as itself
    assert sorted(n for ns in workers.values() for n in ns) == list(range(20))


def test_a_failing_sdk_never_raises_into_the_program_and_is_counted(uniq):
    class Broken:
        def get_tracer(self, *args, **kwargs):
            return self

        def start_span(self, *args, **kwargs):
            raise RuntimeError("the SDK broke")

    q = tracemark.span(f"{uniq}.s")
    m = tracemark.marker(f"{uniq}.m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fault's report, once
        with otel.bridge(f"{uniq}.*", tracer_provider=Broken()) as b:
            for _ in range(3):
                with q():
                    m()  # no current span: an orphan span, which fails too
    st = b.stats()
    assert st["errors"] == 6 and st["spans_made"] == 0
    assert st["unmatched"] == 3  # the ends of spans that could not begin
