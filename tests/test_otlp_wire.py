"""tracemark.export.otlp_wire against the official opentelemetry-proto messages
(differential, Hypothesis): the bytes it writes for spans, span events, log records,
attribute values, resources and whole requests decode, with opentelemetry-proto, to messages
equal to the ones built with the opentelemetry-proto classes the way the export built them
before it wrote its bytes itself; and it reads a collector's partial_success answer as
opentelemetry-proto writes it."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("opentelemetry.proto", reason="pip install '.[test]' (opentelemetry-proto)")

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as ls
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.common.v1 import common_pb2 as common
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tracemark.export import otlp_wire as wire
from tracemark.export.otlp import _prefixed

# -- the reference: the opentelemetry-proto objects, as the export built them ------------------


def ref_value(v):
    t = type(v)
    if t is str:
        return common.AnyValue(string_value=v)
    if t is bool:
        return common.AnyValue(bool_value=v)
    if t is int:
        return common.AnyValue(int_value=v)
    if t is float:
        return common.AnyValue(double_value=v)
    return common.AnyValue(array_value=common.ArrayValue(values=[ref_value(x) for x in v]))


def ref_kvs(attrs):
    return [common.KeyValue(key=k, value=ref_value(v)) for k, v in attrs]


# -- values -------------------------------------------------------------------------------

text = st.text()  # any valid Unicode (no lone surrogates: those are converted before)
int64 = st.integers(-(2**63), 2**63 - 1)
double = st.floats(allow_nan=False)
scalar = st.one_of(text, st.booleans(), int64, double)
value = st.one_of(
    scalar,
    st.lists(text, max_size=4),
    st.lists(st.booleans(), max_size=4),
    st.lists(int64, max_size=4),
    st.lists(double, max_size=4),
)
attrs = st.lists(st.tuples(text, value), max_size=5)
u64 = st.integers(0, 2**64 - 1)
ident = st.sampled_from([b""]) | st.binary(min_size=8, max_size=8)
trace_ident = st.sampled_from([b""]) | st.binary(min_size=16, max_size=16)


def encoded_attrs(tag: bytes, pairs) -> bytes:
    return b"".join(tag + _prefixed(wire.key_value(k, v)) for k, v in pairs)


def same_double(a: float, b: float) -> bool:
    return a == b and math.copysign(1, a) == math.copysign(1, b)


@given(value)
def test_any_value_decodes_to_the_same_value(v):
    got = common.AnyValue.FromString(wire.any_value(v))
    assert got == ref_value(v)
    if type(v) is float:  # == does not tell 0.0 from -0.0
        assert same_double(got.double_value, v)


@given(attrs)
def test_resource_decodes_to_the_same_resource(pairs):
    got = resource_pb2.Resource.FromString(wire.resource(dict(pairs)))
    assert got == resource_pb2.Resource(attributes=ref_kvs(dict(pairs).items()))


events = st.lists(st.tuples(u64, text, attrs), max_size=4)
status = st.none() | st.tuples(st.just(wire.STATUS_CODE_ERROR), text)


@settings(max_examples=300)
@given(trace_ident, ident, ident, text, u64, u64, attrs, events, status)
def test_span_decodes_to_the_span_the_objects_made(
    trace_id, span_id, parent, name, start, end, pairs, evs, st_
):
    message = wire.span(
        trace_id,
        span_id,
        parent,
        name,
        start,
        end,
        encoded_attrs(b"\x4a", pairs),
        [wire.event(t, n, encoded_attrs(b"\x1a", a)) for t, n, a in evs],
        st_,
    )
    want = trace_pb2.Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=ref_kvs(pairs),
        events=[
            trace_pb2.Span.Event(time_unix_nano=t, name=n, attributes=ref_kvs(a)) for t, n, a in evs
        ],
        status=None
        if st_ is None
        else trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message=st_[1]),
    )
    assert trace_pb2.Span.FromString(message) == want
    assert st_ is None or trace_pb2.Span.FromString(message).HasField("status")


@given(u64, text, attrs, trace_ident, ident)
def test_log_record_decodes_to_the_record_the_objects_made(time, name, pairs, trace_id, span_id):
    flags = 1 if trace_id else 0
    message = wire.log_record(
        time, name, encoded_attrs(b"\x32", pairs), name, trace_id, span_id, flags
    )
    want = logs_pb2.LogRecord(
        time_unix_nano=time,
        observed_time_unix_nano=time,
        body=common.AnyValue(string_value=name),
        attributes=ref_kvs(pairs),
        event_name=name,
        trace_id=trace_id,
        span_id=span_id,
        flags=flags,
    )
    assert logs_pb2.LogRecord.FromString(message) == want


groups = st.lists(
    st.tuples(attrs, st.lists(st.tuples(text, u64), min_size=1, max_size=3)),
    min_size=1,
    max_size=3,
)


@given(groups, text, text)
def test_requests_decode_to_the_requests_the_objects_made(gs, scope_name, version):
    scope = common.InstrumentationScope(name=scope_name, version=version)
    spans = [[trace_pb2.Span(name=n, start_time_unix_nano=t) for n, t in items] for _, items in gs]
    records = [
        [logs_pb2.LogRecord(time_unix_nano=t, body=common.AnyValue(string_value=n))]
        for n, t in (items[0] for _, items in gs)
    ]
    body = wire.traces_request(
        (
            wire.resource(dict(a)),
            wire.scope(scope_name, version),
            [s.SerializeToString() for s in ss],
        )
        for (a, _), ss in zip(gs, spans, strict=True)
    )
    want = ts.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=ref_kvs(dict(a).items())),
                scope_spans=[trace_pb2.ScopeSpans(scope=scope, spans=ss)],
            )
            for (a, _), ss in zip(gs, spans, strict=True)
        ]
    )
    got = ts.ExportTraceServiceRequest.FromString(body)
    assert got == want
    assert all(
        rs.HasField("resource") and rs.scope_spans[0].HasField("scope") for rs in got.resource_spans
    )
    body = wire.logs_request(
        (
            wire.resource(dict(a)),
            wire.scope(scope_name, version),
            [r.SerializeToString() for r in rr],
        )
        for (a, _), rr in zip(gs, records, strict=True)
    )
    want_logs = ls.ExportLogsServiceRequest(
        resource_logs=[
            logs_pb2.ResourceLogs(
                resource=resource_pb2.Resource(attributes=ref_kvs(dict(a).items())),
                scope_logs=[logs_pb2.ScopeLogs(scope=scope, log_records=rr)],
            )
            for (a, _), rr in zip(gs, records, strict=True)
        ]
    )
    assert ls.ExportLogsServiceRequest.FromString(body) == want_logs


@given(int64, text)
def test_partial_success_reads_what_opentelemetry_proto_writes(rejected, message):
    partial = ts.ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
    answer = ts.ExportTraceServiceResponse(partial_success=partial).SerializeToString()
    assert wire.partial_success(answer) == (rejected, message)
    partial = ls.ExportLogsPartialSuccess(rejected_log_records=rejected, error_message=message)
    answer = ls.ExportLogsServiceResponse(partial_success=partial).SerializeToString()
    assert wire.partial_success(answer) == (rejected, message)


def test_an_answer_that_is_not_the_message_is_refused_not_misread():
    assert wire.partial_success(b"") == (0, "")
    for junk in (b"\x0a\x05\x08", b"\x80", b"\x0f"):
        with pytest.raises(ValueError):
            wire.partial_success(junk)


@given(u64)
def test_varint_is_the_protobuf_varint(n):
    got = common.AnyValue.FromString(b"\x18" + wire.varint(n)).int_value
    assert got == (n - (1 << 64) if n >= 1 << 63 else n)


field_value = st.one_of(
    text, st.booleans(), st.integers(), st.floats(), st.binary(max_size=4), st.none()
)


@settings(max_examples=300)
@given(st.dictionaries(text, field_value, max_size=5))
def test_marker_fields_decode_to_the_key_values_the_objects_made(fields):
    """The export's own fast paths (int64 written at once, strings cached) give the same
    KeyValues as the rule of otel_attributes put into opentelemetry-proto objects, twice
    (the second time from the cache)."""
    from types import SimpleNamespace

    from tracemark.export.otel_attributes import attribute_value
    from tracemark.export.otlp import _Sender

    sender = SimpleNamespace(_kv_cache={}, _keys={})
    want = ref_kvs((k, attribute_value(v)) for k, v in fields.items())
    for _ in range(2):
        kvs = _Sender.fields(sender, fields)
        got = resource_pb2.Resource.FromString(b"".join(b"\x0a" + kv for kv in kvs))
        assert list(got.attributes) == want
