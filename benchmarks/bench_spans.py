"""Issue 11: what a span costs, inactive and recorded, beside its peers.

Run: ``python -m benchmarks.run spans``.

Table 1 (inactive): small functions that differ only in how a span wraps their body: none,
``q.begin(...)``/``q.end()`` statements (patched: two jumps), ``@q`` on the function (the
function itself: nothing to pay), ``with q(...)`` while inactive, and ``with
contextlib.nullcontext()`` for scale; ratios to the function without a span.
Table 2 (recorded): the same function with its span recorded by ``tracemark.record()``
(statements, ``@q``, ``with``; and the statements of a span with one more field read from a
ContextVar, on begin and end: the difference to the row above it is that field's cost),
beside two recorded markers, an OpenTelemetry SDK span (a ``TracerProvider`` with a
``SimpleSpanProcessor`` to an in-memory exporter: the cheapest span the SDK records), and a
call traced by viztracer (its per-call cost); ratios to two recorded markers.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import tempfile

import tracemark

from .harness import Case, measure, table

q = tracemark.span("bench.span.q", table=str)
pair_begin = tracemark.marker("bench.span.m.begin", table=str)
pair_end = tracemark.marker("bench.span.m.end")
_null = contextlib.nullcontext()
REQUEST_ID = contextvars.ContextVar("request_id", default=27)
qc = tracemark.span("bench.span.qc", table=str, request_id=tracemark.context(REQUEST_ID, int))


def without(table):
    n = len(table)
    return n


def statements(table):
    q.begin(table)
    n = len(table)
    q.end()
    return n


@q
def decorated(table):
    n = len(table)
    return n


def statements_context(table):
    qc.begin(table)
    n = len(table)
    qc.end()
    return n


def with_span(table):
    with q(table):
        n = len(table)
    return n


def with_null(table):
    with _null:
        n = len(table)
    return n


def two_markers(table):
    pair_begin(table)
    n = len(table)
    pair_end()
    return n


def _inactive_cases() -> list[Case]:
    for f in (statements, statements_context):
        (site, _) = tracemark.patch(f)
        assert site.patched, site
    ns = {"t": "users", "without": without, "statements": statements, "decorated": decorated}
    ns.update(with_span=with_span, with_null=with_null)
    return [
        Case("function without a span", "without(t)", ns),
        Case("`q.begin(...)` ... `q.end()`, inactive", "statements(t)", ns, "target: within 5%"),
        Case("`@q` on the function, inactive", "decorated(t)", ns, "target: within 5%"),
        Case("`with q(...)`, inactive", "with_span(t)", ns),
        Case("`with nullcontext()`", "with_null(t)", ns, "for scale"),
        _otel_inactive_case(),
    ]


def _otel_inactive_case() -> Case:
    """The peer's inactive span: OpenTelemetry's API with no SDK configured (its no-op
    tracer), the cost a library instrumented with OpenTelemetry pays when nobody traces."""
    try:
        from opentelemetry import trace
    except ImportError:
        return Case("OpenTelemetry API span, no SDK", "pass", {}, "opentelemetry not installed")
    tracer = trace.get_tracer("bench")  # no provider set: the API's proxy to its no-op tracer

    def otel_noop(table):
        with tracer.start_as_current_span("db.query", attributes={"table": table}):
            n = len(table)
        return n

    return Case(
        "OpenTelemetry API span, no SDK (no-op tracer)",
        "otel_noop(t)",
        {"otel_noop": otel_noop, "t": "users"},
        "the peer, inactive",
    )


def _otel_case() -> Case:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
    except ImportError:
        return Case("OpenTelemetry SDK span", "pass", {}, "opentelemetry-sdk not installed")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")

    def otel(table):
        with tracer.start_as_current_span("db.query", attributes={"table": table}):
            n = len(table)
        if len(exporter._finished_spans) > 10_000:  # keep memory flat
            exporter.clear()
        return n

    return Case(
        "OpenTelemetry SDK span (in-memory exporter)", "otel(t)", {"otel": otel, "t": "users"}
    )


def report() -> str:
    cases = _inactive_cases()
    first = table("Spans: inactive", cases, measure(cases), "function without a span")
    directory = tempfile.mkdtemp(prefix="tracemark-bench-spans-")
    ns = {"t": "users", "statements": statements, "two_markers": two_markers}
    recorded = [
        Case("two recorded markers (begin, end)", "two_markers(t)", ns),
        Case("recorded span, `q.begin` ... `q.end()`", "statements(t)", ns),
        Case("recorded span, `@q` on the function", "decorated(t)", {**ns, "decorated": decorated}),
        Case("recorded span, `with q(...)`", "with_span(t)", {**ns, "with_span": with_span}),
        Case(
            "recorded span + a ContextVar field, `q.begin` ... `q.end()`",
            "statements_context(t)",
            {**ns, "statements_context": statements_context},
            "the field on begin and end: its cost is the difference to the statements row",
        ),
        _otel_case(),
    ]
    try:
        with tracemark.record(
            directory, "bench.span.*", subbuffer_size=4 << 20, subbuffers=12
        ) as rec:
            results = measure(recorded, number=100_000)
        assert rec.summary.recorded > 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    viz = _viztracer_per_call()
    if viz is not None:
        recorded.append(Case("viztracer, one traced call", "", {}, "its per-call cost"))
        results["viztracer, one traced call"] = viz
    second = table("Spans: recorded", recorded, results, "two recorded markers (begin, end)")
    return first + "\n" + second


def _viztracer_per_call() -> float | None:
    """ns that viztracer adds to one call of ``without`` (traced minus untraced)."""
    try:
        from viztracer import VizTracer
    except ImportError:
        return None
    import threading

    ns = {"t": "users", "without": without}
    plain = measure([Case("plain", "without(t)", ns)], number=100_000)["plain"]
    viz = VizTracer(verbose=0, tracer_entries=2_000_000, ignore_c_function=True)
    viz.start()
    try:
        traced = measure([Case("traced", "without(t)", ns)], number=100_000)["traced"]
    finally:
        viz.stop()
        viz.clear()
        threading.setprofile(None)  # what viztracer's stop() leaves set
    return traced - plain
