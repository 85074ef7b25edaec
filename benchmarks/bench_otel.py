"""Issue 15: what the live OpenTelemetry bridge costs, beside the OpenTelemetry SDK itself.

Run: ``python -m benchmarks.run otel``.

Every OpenTelemetry case runs the same SDK pipeline: a ``TracerProvider`` with a
``BatchSpanProcessor`` (queue large enough that nothing is dropped: checked) and an exporter
that accepts every batch and does nothing (no network in the numbers). The baseline is a span
made with the SDK directly (``with tracer.start_as_current_span(...)``, one attribute);
beside it, the same span made by a tracemark span through the bridge (``with q(1):``, the
begin's field as the attribute), a marker turned into a span event on the current span
(beside ``span.add_event`` with the SDK directly), a marker turned into a log record
(``markers="logs"``), and, for scale, the same tracemark span while nothing listens and an
OpenTelemetry API span without an SDK (the no-op tracer).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import tracemark
from tracemark.tracers import otel

from .harness import Case, measure, table

BASELINE = "OpenTelemetry SDK directly: start_as_current_span"
NUMBER = 20_000
QUEUE = 200_000  # more than one timing makes before the worker drains it: nothing dropped


class _Accept(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


class _AcceptLogs(LogRecordExporter):
    def export(self, batch):
        return LogRecordExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True


def report() -> str:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Accept(), max_queue_size=QUEUE))
    tracer = provider.get_tracer("bench")
    noop = trace.NoOpTracerProvider().get_tracer("bench")
    q = tracemark.span("bench.otel.op", n=int)
    tick = tracemark.marker("bench.otel.tick", n=int)
    said = tracemark.marker("bench.otel.said", n=int)
    idle = tracemark.span("bench.otel.idle", n=int)
    events = otel.bridge(
        ["bench.otel.op.*", "bench.otel.tick"], exporter=_Accept(), max_queue_size=QUEUE
    )
    logs = otel.bridge(
        "bench.otel.said", markers="logs", log_exporter=_AcceptLogs(), max_queue_size=QUEUE
    )
    holder = tracer.start_span("holder")  # the current span the events go to
    cases = [
        Case(BASELINE, 'with start("bench.op", attributes={"n": 1}): pass',
             {"start": tracer.start_as_current_span}),
        Case("tracemark span through the bridge: with q(1)", "with q(1): pass", {"q": q}),
        Case("OpenTelemetry SDK directly: span.add_event", 'add("bench.tick", {"n": 1})',
             {"add": holder.add_event}),
        Case("marker -> span event through the bridge", "tick(1)", {"tick": tick}),
        Case("marker -> log record through the bridge", "said(1)", {"said": said}),
        Case("OpenTelemetry API without SDK (no-op span)", 'with start("bench.op"): pass',
             {"start": noop.start_as_current_span}),
        Case("tracemark span, inactive: with q(1)", "with q(1): pass", {"q": idle}),
    ]  # fmt: skip
    token = trace.use_span(holder)
    token.__enter__()
    try:
        results = measure(cases, number=NUMBER, repeat=5)
    finally:
        token.__exit__(None, None, None)
        holder.end()
        st, lst = events.stop(timeout=30), logs.stop(timeout=30)
        provider.shutdown()
    assert st["spans_dropped"] == st["spans_failed"] == 0, st
    assert lst["logs_dropped"] == lst["logs_failed"] == 0, lst
    return table("OpenTelemetry bridge: one span or marker per call", cases, results, BASELINE)
