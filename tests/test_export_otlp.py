"""tracemark export --format otlp (issue 15): a recorded trace sent to a collector over
OTLP/HTTP. The test collector (tests/otlp_collector.py) decodes every request with the
official opentelemetry-proto messages; what arrives is compared with what
``tracemark.ctf.read_trace`` and ``tracemark.analysis.Pairing`` say the program did: span
names, start and end times, attributes, parent/child ids, trace ids, span events, log
records and their trace context, one resource per process (a fork child too), over
threads, asyncio tasks, an unfinished span and an end without a begin. Then the faults: the
collector down, 503 twice, 400, Retry-After, too slow, hanging up; values OpenTelemetry
cannot carry; the missing extra (exit 5); the core never imports OpenTelemetry."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.proto", reason="pip install '.[test]' (opentelemetry-proto)")

from otlp_collector import Collector

from tracemark.analysis import Begin, Instant, Pairing
from tracemark.cli import main
from tracemark.ctf import SCHEMA_VERSION, read_trace
from tracemark.export.otel_attributes import attributes as otel
from tracemark.export.otlp import export_otlp
from tracemark.export.otlp_http import Poster, parse_headers, retry_after
from tracemark.export.walker import _events, end_args, open_streams

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, sys, threading, tracemark
    req = tracemark.span("req", id=int)
    db = tracemark.span("db.query", sql=str)
    note = tracemark.marker("note", n=int)
    odd = tracemark.marker("odd", a="any", raw=bytes, f=float, s=str)
    load_b = tracemark.marker("load.begin", key=str)
    load_e = tracemark.marker("load.end", key=str, status=int)

    def handle(i):
        with req(i):
            note(i)
            with db("select %d" % i):
                note(100 + i)
            load_b("k%d" % i)
            load_e("k%d" % i, 200 + i)

    def crash():
        req.begin(-1)
        db.begin("never ends")
        note(-1)  # the thread ends with both spans open

    async def task(i):
        with req(1000 + i):
            note(1000 + i)
            await asyncio.sleep(0)
            with db("task %d" % i):
                await asyncio.sleep(0)
                note(2000 + i)

    async def main():
        await asyncio.gather(task(1), task(2))

    def parse(x):
        if x < 0:
            raise ValueError("negative")
        return x * 2

    for at in ("entry", "return", "raise"):
        tracemark.probe("__main__:parse", at=at)

    with tracemark.record(sys.argv[1]):
        note(0)  # outside any span: a log record
        odd(1 << 80, b"\\x01\\xff", float("nan"), "a\\udcffb")
        handle(1)
        t = threading.Thread(target=handle, args=(2,), name="worker-1")
        t.start(); t.join()
        t = threading.Thread(target=crash, name="crasher")
        t.start(); t.join()
        asyncio.run(main())
        with req(7):
            for k in range(5):
                note(k)
        pid = os.fork()
        if pid == 0:
            try:
                handle(3)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        parse(21)
        try:
            parse(-1)
        except ValueError:
            pass
        db.end()  # an end without a begin
    """
)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    d = tmp_path_factory.mktemp("otlp")
    prog = d / "prog.py"
    prog.write_text(PROGRAM)
    trace = d / "trace"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(prog), str(trace)], check=True, env=env, timeout=120)
    return trace


# -- what the program did, by the reader and Pairing -----------------------------------------


def expected(trace_dir, limit=128):
    """Spans, span events and log records the export must send, computed from the reader's
    events and Pairing (independently of the walker): spans keyed by (pid, tid, task id,
    name, start)."""
    trace = read_trace(trace_dir)
    declared = {name for sub in trace.subtraces for name, _ in sub.meta.events.values()}
    events = list(trace.events())
    spans, logs = {}, []
    stacks: dict[tuple, list] = {}

    def key_of(ev, name):
        return (ev.pid, ev.tid, ev.task.id if ev.task else None, name, ev.timestamp)

    def marker(ev, name, fields):
        stack = stacks.get((ev.pid, ev.tid, ev.task or None), [])
        if stack and len(spans[stack[-1]]["events"]) < limit:
            spans[stack[-1]]["events"].append((ev.timestamp, name, otel(fields)))
            return
        context = stack[-1] if stack else None
        logs.append((ev.pid, ev.tid, ev.timestamp, name, otel(fields), context))

    for item in Pairing(declared).pair(events):
        if isinstance(item, Begin):
            ev = item.event
            stack = stacks.setdefault((ev.pid, ev.tid, ev.task or None), [])
            key = key_of(ev, item.span)
            spans[key] = {
                "parent": stack[-1] if stack else None,
                "begin": ev,
                "events": [],
            }
            stack.append(key)
        elif isinstance(item, Instant):
            marker(item.event, item.event.name, item.event.fields)
        elif item.begin is None:
            ev = item.event
            marker(ev, f"{ev.name} (end without begin)", {**ev.fields, "unmatched": True})
        else:
            ev = item.begin
            stack = stacks[(ev.pid, ev.tid, ev.task or None)]
            key = stack.pop()
            assert key == key_of(ev, item.span)
            span = spans[key]
            end_fields = item.event.fields if item.event is not None else {}
            span["end"] = item.timestamp
            span["unfinished"] = item.unfinished
            span["attrs"] = otel({**ev.fields, **end_args(ev.fields, end_fields)})
    assert all("end" in s for s in spans.values())
    return events, spans, logs


def py(value):
    """An OTLP AnyValue as Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [py(v) for v in value.array_value.values]
    return getattr(value, kind)


def attrs_of(message) -> dict:
    return {kv.key: py(kv.value) for kv in message.attributes}


def received(c: Collector):
    """Spans (keyed as :func:`expected` keys them), log records, and resources by pid."""
    spans, by_id, logs, resources = {}, {}, [], {}
    for request in c.traces():
        for rs in request.resource_spans:
            res = attrs_of(rs.resource)
            pid = res["process.pid"]
            resources[pid] = res
            for ss in rs.scope_spans:
                assert ss.scope.name == "tracemark"
                for s in ss.spans:
                    a = attrs_of(s)
                    key = (
                        pid,
                        a["thread.id"],
                        a.get("tracemark.task.id"),
                        s.name,
                        s.start_time_unix_nano,
                    )
                    assert key not in spans, f"sent twice: {key}"
                    spans[key] = s
                    assert s.span_id not in by_id
                    by_id[s.span_id] = key
    for request in c.logs():
        for rl in request.resource_logs:
            pid = attrs_of(rl.resource)["process.pid"]
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    logs.append((pid, r))
    return spans, by_id, logs, resources


THREAD_KEYS = {"thread.id", "thread.name", "tracemark.task.id", "tracemark.task.name"}


def check_everything_arrived(trace_dir, c: Collector, limit=128):
    """Everything the program did arrived once, as the module says it is sent."""
    events, want, want_logs = expected(trace_dir, limit)
    got, by_id, logs, resources = received(c)
    # Names, starts, tracks: the same (received() refuses a span sent twice).
    assert got.keys() == want.keys() and len(got) == len(want)
    trace_ids = {}
    for key, w in want.items():
        s = got[key]
        begin = w["begin"]
        assert s.end_time_unix_nano == w["end"], key
        a = attrs_of(s)
        fields = {k: v for k, v in a.items() if k not in THREAD_KEYS}
        unfinished = fields.pop("tracemark.unfinished", False)
        assert unfinished == w["unfinished"], key
        assert fields == w["attrs"], key
        assert a["thread.name"] == begin.thread
        if begin.task is not None:
            assert a["tracemark.task.name"] == str(begin.task)
        else:
            assert "tracemark.task.id" not in a
        # Nesting: the parent is the span open on the same track, and shares its trace.
        if w["parent"] is None:
            assert s.parent_span_id == b""
            assert s.trace_id not in trace_ids.values(), "one trace id per root span"
        else:
            assert by_id[s.parent_span_id] == w["parent"], key
            assert s.trace_id == got[w["parent"]].trace_id
        trace_ids[key] = s.trace_id
        assert len(s.trace_id) == 16 and any(s.trace_id) and len(s.span_id) == 8
        assert [(e.time_unix_nano, e.name, attrs_of(e)) for e in s.events] == w["events"], key
    # Log records: the markers outside spans (and beyond the event limit), in time order
    # per process, with their span's context when they have one.
    got_logs = []
    for pid, r in logs:
        a = attrs_of(r)
        context = by_id[r.span_id] if r.span_id else None
        if context is not None:
            assert r.trace_id == got[context].trace_id
        else:
            assert r.trace_id == b""
        assert r.event_name == r.body.string_value
        got_logs.append(
            (
                pid,
                a["thread.id"],
                r.time_unix_nano,
                r.body.string_value,
                {k: v for k, v in a.items() if k not in THREAD_KEYS},
                context,
            )
        )
    assert sorted(got_logs, key=repr) == sorted(want_logs, key=repr)
    # One resource per process, named after the program.
    pids = {ev.pid for ev in events}
    assert set(resources) == pids and len(pids) == 2  # the fork child
    for res in resources.values():
        assert res["service.name"] == "prog.py"
        assert res["tracemark.schema"] == SCHEMA_VERSION
        assert res["host.name"] == socket.gethostname()
    return want, want_logs


# -- what arrives equals what the program did ------------------------------------------------


def test_spans_markers_and_processes_arrive_as_the_program_made_them(traced):
    with Collector() as c:
        result = export_otlp(traced, endpoint=c.endpoint, environ={})
        spans, logs = check_everything_arrived(traced, c)
    assert result.complete and not result.errors and result.stopped is None
    assert result.spans == len(spans) and result.logs == len(logs)
    assert result.span_events == sum(len(s["events"]) for s in spans.values())
    assert result.events == sum(1 for _ in read_trace(traced).events())
    # The program's shape, stated plainly as well: the crasher thread's two spans are
    # unfinished, the stray db.end arrives as a marker, the tasks' spans nest in their task.
    assert result.unfinished == 2 and result.unmatched == 1
    assert sum(s["unfinished"] for s in spans.values()) == 2
    stray = [log for log in logs if log[3] == "db.query.end (end without begin)"]
    assert len(stray) == 1 and stray[0][4] == {"unmatched": True}
    # A probe's call: a span; left by an exception: status ERROR with the exception.
    with Collector() as c:
        export_otlp(traced, endpoint=c.endpoint, environ={})
        calls = {s.start_time_unix_nano: s for s in c.spans() if s.name == "probe.__main__.parse"}
    ok, failed = (calls[t] for t in sorted(calls))
    assert attrs_of(ok)["value"] == 42 and ok.status.code == ok.status.STATUS_CODE_UNSET
    assert failed.status.code == failed.status.STATUS_CODE_ERROR
    assert failed.status.message == "ValueError: negative"
    task_spans = [k for k in spans if k[2] is not None and k[3] == "db.query"]
    assert len(task_spans) == 2 and all(spans[k]["parent"][3] == "req" for k in task_spans)


def test_small_batches_and_the_span_event_limit(traced):
    """Batches hold at most the given numbers; markers beyond the event limit are log
    records carrying their span's context (OTEL_SPAN_EVENT_COUNT_LIMIT)."""
    env = {"OTEL_SPAN_EVENT_COUNT_LIMIT": "2"}
    with Collector() as c:
        result = export_otlp(traced, endpoint=c.endpoint, batch_spans=3, batch_logs=2, environ=env)
        spans, logs = check_everything_arrived(traced, c, limit=2)
        sizes = [
            sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
            for r in c.traces()
        ]
        log_sizes = [
            sum(len(sl.log_records) for rl in r.resource_logs for sl in rl.scope_logs)
            for r in c.logs()
        ]
    assert max(sizes) <= 3 and len(sizes) == -(-len(spans) // 3)
    assert max(log_sizes) <= 2 and sum(log_sizes) == len(logs)
    assert sum(1 for log in logs if log[5] is not None) >= 3  # req(7)'s 5 notes: 2 events, 3 logs
    assert result.complete and result.requests == len(sizes) + len(log_sizes)


def test_ids_are_the_same_on_a_second_export(traced):
    with Collector() as c:
        export_otlp(traced, endpoint=c.endpoint, environ={})
        export_otlp(traced, endpoint=c.endpoint, environ={})
        spans = c.spans()
    half = len(spans) // 2
    first = sorted((s.trace_id, s.span_id) for s in spans[:half])
    assert first == sorted((s.trace_id, s.span_id) for s in spans[half:])


def test_values_otel_cannot_carry_follow_the_documented_rule(traced):
    """Huge ints as digits, bytes as hex, NaN as "nan", lone surrogates escaped (the
    recorder itself stores a lone surrogate as U+FFFD; one is put back into the event
    stream to reach the exporter as a reader of another trace could give it)."""

    def surrogate(events):
        for ev in events:
            if ev.name == "odd":
                ev = ev._replace(fields={**ev.fields, "lone": "x\udcffy", "big": -(1 << 70)})
            yield ev

    with Collector() as c:
        result = export_otlp(traced, endpoint=c.endpoint, environ={}, wrap=surrogate)
        records = [r for r in c.log_records() if r.body.string_value == "odd"]
    assert result.complete and len(records) == 1
    a = attrs_of(records[0])
    assert a["a"] == str(1 << 80)
    assert a["raw"] == "01ff"
    assert a["f"] == "nan"
    assert a["s"] == "a\ufffdb"  # as recorded
    assert a["lone"] == "x\\udcffy"
    assert a["big"] == str(-(1 << 70))


def test_resource_and_endpoint_follow_the_otel_environment(traced):
    with Collector() as c:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": c.endpoint,
            "OTEL_SERVICE_NAME": "shop",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=a%20b",
        }
        result = export_otlp(traced, environ=env)
        _, _, _, resources = received(c)
    assert result.complete and result.traces_url == f"{c.endpoint}/v1/traces"
    for res in resources.values():
        assert res["service.name"] == "shop" and res["team"] == "a b"
        assert res["deployment.environment"] == "test"


# -- a recording server, for what the test collector does not show -------------------------


class Scripted:
    """A loopback server answering each POST from a script of (status, headers) or
    (status, headers, body(path)); it keeps each request's path and headers."""

    def __init__(self, script):
        self.script = list(script)
        self.seen = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append((self.path, dict(self.headers)))
                status, headers, *body = server.script.pop(0) if server.script else (200, {})
                answer = body[0](self.path) if body else b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_retry_after_is_respected_and_headers_are_sent():
    s = Scripted([(429, {"Retry-After": "3"}), (503, {}), (200, {})])
    waits = []
    try:
        poster = Poster(
            headers=parse_headers("api-key=s%3Dcret, x-team = shop "),
            backoff=0.25,
            sleep=waits.append,
        )
        outcome = poster.post(s.url + "/v1/traces", b"\x00")
        poster.close()
    finally:
        s.close()
    assert outcome.ok and outcome.attempts == 3
    assert waits[0] == 3  # Retry-After, not the backoff
    assert 0.25 <= waits[1] <= 0.25 * 1.2  # then the backoff
    assert [path for path, _ in s.seen] == ["/v1/traces"] * 3
    headers = s.seen[0][1]
    assert headers["api-key"] == "s=cret" and headers["x-team"] == "shop"
    assert headers["Content-Type"] == "application/x-protobuf"


def test_a_partial_success_is_counted_as_not_sent(traced, capsys):
    """The collector accepts the request but says it rejected some spans (OTLP
    "partial success"): they are not counted as sent, and the command says so (exit 6)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts

    def answer(path):
        if path != "/v1/traces":
            return ExportLogsServiceResponse().SerializeToString()
        partial = ts.ExportTracePartialSuccess(rejected_spans=2, error_message="too old")
        return ts.ExportTraceServiceResponse(partial_success=partial).SerializeToString()

    _, spans, logs = expected(traced)
    s = Scripted([(200, {}, answer)] * 4)
    try:
        result = export_otlp(traced, endpoint=s.url, environ={})
        code = main(["export", str(traced), "-f", "otlp", "--endpoint", s.url])
    finally:
        s.close()
    assert not result.complete and result.spans == len(spans) - 2 and result.logs == len(logs)
    assert result.not_sent == {"rejected by the collector: too old": [2, 0]}
    assert result.failed_batches == 0 and result.stopped is None
    err = capsys.readouterr().err
    assert (
        code == 6 and "not sent: 2 spans, 0 log records: rejected by the collector: too old" in err
    )


def test_a_kept_alive_connection_closed_while_idle_is_reopened_at_once():
    """A server that answers (HTTP/1.1, keep-alive) and then closes the connection: the
    next request finds it closed and is sent again on a new one, with no wait."""
    listener = socket.create_server(("127.0.0.1", 0))
    served = []

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                served.append(data.split(b" ")[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            # closed: as a server closes an idle kept-alive connection

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"
    waits = []
    poster = Poster(sleep=waits.append, timeout=5)
    first = poster.post(url, b"\x00")
    time.sleep(0.2)  # the server has closed it by now
    second = poster.post(url, b"\x00")
    poster.close()
    thread.join(5)
    listener.close()
    assert first.ok and second.ok and second.attempts == 1 and waits == []
    assert served == [b"/v1/traces"] * 2


def test_retry_after_forms():
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


# -- faults ---------------------------------------------------------------------------------


def test_503_twice_then_ok_everything_arrives_once(traced):
    with Collector() as c:
        c.fail(503, times=2)
        result = export_otlp(traced, endpoint=c.endpoint, backoff=0.01, environ={})
        check_everything_arrived(traced, c)  # and none twice
        attempts = c.attempts
    assert result.complete and result.failed_batches == 0
    assert attempts == result.requests == len(c.traces()) + len(c.logs()) + 2


def test_400_is_not_retried_and_the_rest_goes_on(traced, capsys):
    _, spans, logs = expected(traced)
    with Collector() as c:
        c.fail(400, times=1)  # the first batch of spans is refused, not retried
        result = export_otlp(traced, endpoint=c.endpoint, batch_spans=4, backoff=0.01, environ={})
        arrived = len(c.spans())
        attempts = c.attempts
        accepted = len(c.traces()) + len(c.logs())
    assert attempts == accepted + 1  # one refusal, no retry
    assert result.failed_batches == 1 and result.stopped is None
    assert result.spans_not_sent == 4 and arrived == len(spans) - 4 == result.spans
    assert result.logs == len(logs)
    (reason,) = result.not_sent
    assert "HTTP 400" in reason and "not retried" in reason
    # The command: the refusal listed, exit 6.
    with Collector() as c:
        c.fail(400)
        code = main(["export", str(traced), "-f", "otlp", "--endpoint", c.endpoint])
    err = capsys.readouterr().err
    assert code == 6 and "Traceback" not in err
    assert f"NOT SENT: {len(spans):,} spans, {len(logs):,} log records" in err
    assert "HTTP 400" in err


def test_requests_in_flight_at_once_are_bounded(traced):
    """A slow collector: the export keeps several requests in flight (never more than
    in_flight), everything arrives once, and the counts are exact."""
    _, spans, logs = expected(traced)
    with Collector() as c:
        c.delay = 0.2
        result = export_otlp(traced, endpoint=c.endpoint, batch_spans=2, in_flight=3, environ={})
        check_everything_arrived(traced, c)
        peak = c.peak_in_flight
        attempts = c.attempts
    assert 2 <= peak <= 3
    assert result.complete and result.spans == len(spans) and result.logs == len(logs)
    assert result.requests == attempts == -(-len(spans) // 2) + 1


def test_one_request_at_a_time_until_the_collector_has_answered(traced):
    """Down (503 every time): one batch is tried, with its retries, not one per place."""
    with Collector() as c:
        c.delay = 0.1
        c.fail(503)
        result = export_otlp(
            traced, endpoint=c.endpoint, batch_spans=2, retries=2, backoff=0.01, environ={}
        )
        peak, attempts = c.peak_in_flight, c.attempts
    assert peak == 1 and attempts == 3 == result.requests and result.failed_batches == 1
    assert result.stopped is not None and "HTTP 503" in result.stopped


def test_413_too_large_batches_are_split_in_halves_down_to_one(traced):
    """A collector that refuses bodies over a size (413): a refused batch is sent again as
    two halves, and so on down to a single span or record; one refused alone is counted as
    refused with the collector's reason."""
    _, spans, logs = expected(traced)
    with Collector() as c:  # each span and record alone: the largest request there is
        export_otlp(traced, endpoint=c.endpoint, batch_spans=1, batch_logs=1, environ={})
        alone = c.sizes
    assert len(alone) == len(spans) + len(logs)
    # Every one fits alone: all arrive, after splits.
    with Collector() as c:
        c.max_body = max(alone)
        result = export_otlp(traced, endpoint=c.endpoint, environ={})
        check_everything_arrived(traced, c)
        too_large = c.refused_too_large
    assert result.complete and result.failed_batches == 0 and too_large >= 2
    assert result.requests == len(c.traces()) + len(c.logs()) + too_large
    # None fits: each is refused alone, after the halving (a batch of n: 2n - 1 requests).
    with Collector() as c:
        c.max_body = min(alone) - 1
        result = export_otlp(traced, endpoint=c.endpoint, environ={})
        assert c.requests == []
    assert result.spans == result.logs == 0 and result.stopped is None
    assert result.spans_not_sent == len(spans) and result.logs_not_sent == len(logs)
    assert result.failed_batches == len(spans) + len(logs)
    assert result.requests == 2 * len(spans) - 1 + 2 * len(logs) - 1  # one batch of each
    (reason,) = result.not_sent
    assert "HTTP 413" in reason and "not retried" in reason
    assert result.not_sent[reason] == [len(spans), len(logs)]


def test_collector_down_clear_error_exit_7_and_what_was_not_sent(traced, capsys):
    _, spans, logs = expected(traced)
    with Collector() as c:
        endpoint = c.endpoint
        c.stop()  # nothing listens there any more
        start = time.monotonic()
        code = main(["export", str(traced), "-f", "otlp", "--endpoint", endpoint, "--retries", "1"])
        took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 7 and "Traceback" not in err
    assert "connection refused" in err and "is the collector running?" in err
    assert f"NOT SENT: {len(spans):,} spans, {len(logs):,} log records" in err
    assert "sending stopped" in err
    assert "sent to" in err and ": 0 spans" in err
    assert took < 5  # one batch tried (and retried once), not every batch


def test_the_timeout_comes_from_the_otel_environment(traced):
    _, spans, _ = expected(traced)
    with Collector() as c:
        c.delay = 1.0
        start = time.monotonic()
        env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "200"}  # ms
        result = export_otlp(traced, endpoint=c.endpoint, retries=0, environ=env)
        took = time.monotonic() - start
        c.delay = 0
    assert "no answer within 0.2 s" in result.stopped and took < 0.9
    assert result.spans_not_sent == len(spans)


def test_slow_collector_beyond_the_timeout(traced):
    _, spans, logs = expected(traced)
    with Collector() as c:
        c.delay = 1.5
        result = export_otlp(
            traced, endpoint=c.endpoint, timeout=0.3, retries=1, backoff=0.01, environ={}
        )
        c.delay = 0
    assert result.stopped is not None and "no answer within 0.3 s" in result.stopped
    assert result.maybe_received  # said, not claimed lost
    assert result.spans == 0 and result.spans_not_sent == len(spans)
    assert result.logs_not_sent == len(logs) and result.failed_batches == 1


def test_hang_up_mid_request_is_retried_and_arrives_once(traced):
    with Collector() as c:
        c.hang_up = 1
        result = export_otlp(traced, endpoint=c.endpoint, backoff=0.01, environ={})
        check_everything_arrived(traced, c)
        assert c.attempts == result.requests == len(c.traces()) + len(c.logs()) + 1
    assert result.complete


def test_a_damaged_trace_sends_what_reads_and_exits_4(traced, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(traced, damaged)
    stream = max(read_trace(damaged).streams, key=lambda s: s.events)
    # An unknown event id in the middle of the first packet: what came before it stays.
    p = stream.packet_list()[0]
    data = stream.read_packet(p)
    pos, skips = p.start, stream.sub.skips
    for _ in range(p.count // 2):
        eid = int.from_bytes(data[pos : pos + 4], "little")
        pos = skips[eid](data, pos + 12, p.content_end)
    with open(stream.path, "r+b") as f:
        f.seek(p.offset + pos)
        f.write(b"\xff\xff\xff\x7f")
    subs, errors = open_streams(damaged)
    readable = list(_events(subs, errors))
    assert errors
    with Collector() as c:
        code = main(["export", str(damaged), "-f", "otlp", "--endpoint", c.endpoint])
        spans = c.spans()
    err = capsys.readouterr().err
    assert code == 4 and "not exported: corrupt trace" in err
    assert f"{len(readable):,} events read" in err and spans
    assert 0 < len(readable) < sum(s.events for s in read_trace(traced).streams)


def test_interrupted_says_what_was_sent(traced, capsys, monkeypatch):
    """Ctrl-C in the middle: the requests answered so far count as sent, the batches not
    yet sent as not sent; the command prints that summary and exits 130."""
    from tracemark.export import otlp

    def interrupt_after(n):
        def wrap(events):
            for i, ev in enumerate(events):
                if i == n:
                    raise KeyboardInterrupt
                yield ev

        return wrap

    with Collector() as c:
        with pytest.raises(otlp.Interrupted) as caught:
            export_otlp(
                traced, endpoint=c.endpoint, batch_spans=2, environ={}, wrap=interrupt_after(30)
            )
        arrived = len(c.spans())
    result = caught.value.result
    assert result.interrupted and not result.complete and result.events == 30
    assert result.spans == arrived > 0 and result.spans_not_sent <= 1
    assert isinstance(caught.value, KeyboardInterrupt)
    # The command: the summary, then "interrupted", exit 130.
    real = otlp._events
    monkeypatch.setattr(otlp, "_events", lambda *a: interrupt_after(30)(real(*a)))
    with Collector() as c:
        code = main(["export", str(traced), "-f", "otlp", "--endpoint", c.endpoint])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "; 30 events read" in err and "interrupted after 30 events" in err


def test_interrupted_with_requests_in_flight_waits_for_their_answers(traced):
    """Ctrl-C while requests are in flight to a slow collector: those are answered and
    counted as sent (what the collector has is what the result says), the rest of what was
    read is counted as not sent."""
    from tracemark.export import otlp

    def interrupt_after(n):
        def wrap(events):
            for i, ev in enumerate(events):
                if i == n:
                    raise KeyboardInterrupt
                yield ev

        return wrap

    _, spans, _ = expected(traced)
    with Collector() as c:
        c.delay = 0.3
        with pytest.raises(otlp.Interrupted) as caught:
            export_otlp(
                traced,
                endpoint=c.endpoint,
                batch_spans=1,
                in_flight=3,
                environ={},
                wrap=interrupt_after(30),
            )
        arrived = len(c.spans())
        peak = c.peak_in_flight
    result = caught.value.result
    assert result.interrupted and result.events == 30 and peak >= 2
    assert result.spans == arrived > 0 and result.failed_batches == 0
    assert set(result.not_sent) <= {"interrupted before it was sent"}
    assert result.spans_not_sent == sum(n for n, _ in result.not_sent.values())
    assert result.spans + result.spans_not_sent < len(spans)  # not all of it was read


def test_usage_errors(traced, capsys):
    assert main(["export", str(traced), "-f", "otlp", "-o", "x"]) == 2
    assert main(["export", str(traced), "-f", "otlp", "--counter", "note.n"]) == 2
    assert main(["export", str(traced), "-f", "chrome", "--endpoint", "http://x"]) == 2
    assert main(["export", str(traced), "-f", "parquet", "--retries", "1"]) == 2
    assert main(["export", str(traced), "-f", "otlp", "--timeout", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 5 and "Traceback" not in err


def test_without_opentelemetry_the_export_still_sends_everything(traced, capsys, monkeypatch):
    """The export writes the protobuf bytes itself (tracemark.export.otlp_wire): with no
    OpenTelemetry package importable it sends all of it, and imports none."""
    with Collector() as c:  # (its decoder classes are already imported)
        for mod in [m for m in sys.modules if m.startswith("opentelemetry")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import: ImportError
        code = main(["export", str(traced), "-f", "otlp", "--endpoint", c.endpoint])
        check_everything_arrived(traced, c)
        imported = [m for m in sys.modules if m.startswith("opentelemetry.")]
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and not imported


def test_the_core_never_imports_opentelemetry(traced, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, tracemark, tracemark.cli, tracemark.export, tracemark.ctf
        import tracemark.export.otlp_http
        from tracemark.cli import main
        out = {str(tmp_path / "t.json")!r}
        assert main(["export", {str(traced)!r}, "-f", "chrome", "-o", out]) == 0
        assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_through_a_real_opentelemetry_collector(traced, tmp_path):
    """The real Collector (``otelcol``) between the export and the test collector: what
    passes through it must arrive as sent. Only where the binary is installed."""
    binary = shutil.which("otelcol") or shutil.which("otelcol-contrib")
    if binary is None:
        pytest.skip("NOT RUN: no otelcol binary on PATH; the real Collector was not tested")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Collector() as c:
        config = tmp_path / "otelcol.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                receivers:
                  otlp:
                    protocols:
                      http:
                        endpoint: 127.0.0.1:{port}
                exporters:
                  otlphttp:
                    endpoint: {c.endpoint}
                    compression: none
                service:
                  pipelines:
                    traces: {{receivers: [otlp], exporters: [otlphttp]}}
                    logs: {{receivers: [otlp], exporters: [otlphttp]}}
                """
            )
        )
        proc = subprocess.Popen([binary, "--config", str(config)])
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            result = export_otlp(traced, endpoint=f"http://127.0.0.1:{port}", environ={})
            assert result.complete
            _, spans, logs = expected(traced)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (
                len(c.spans()) < len(spans) or len(c.log_records()) < len(logs)
            ):
                time.sleep(0.2)
            check_everything_arrived(traced, c)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
