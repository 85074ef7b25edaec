"""The test collector itself (tests/otlp_collector.py): the official OTLP/HTTP exporter's
requests arrive decoded, and its failure modes are what the OTLP tests rely on."""

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from otlp_collector import Collector


def spans_through(endpoint, names, timeout=2):
    exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=timeout)
    results = []

    class Recorder(SimpleSpanProcessor):
        def on_end(self, span):
            results.append(exporter.export([span]))

    provider = TracerProvider()
    provider.add_span_processor(Recorder(exporter))
    tracer = provider.get_tracer("t")
    for name in names:
        with tracer.start_as_current_span(name) as s:
            s.set_attribute("n", 7)
    provider.shutdown()
    return results


def test_requests_arrive_decoded():
    with Collector() as c:
        results = spans_through(c.endpoint, ["a", "b"])
    assert results == [SpanExportResult.SUCCESS] * 2
    assert [s.name for s in c.spans()] == ["a", "b"]
    assert c.spans()[0].attributes[0].key == "n" and c.spans()[0].attributes[0].value.int_value == 7


def test_a_refusing_collector_is_a_failure_and_keeps_nothing():
    with Collector() as c:
        c.fail(400)
        results = spans_through(c.endpoint, ["a"])
    assert results == [SpanExportResult.FAILURE] and c.spans() == [] and c.attempts >= 1
