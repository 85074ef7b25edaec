"""The protobuf wire encoding of the few OTLP messages :mod:`.otlp` sends, by hand.

Building ``opentelemetry.proto`` message objects cost about two thirds of an export's time
(each Span, KeyValue and AnyValue an object, then copied again into its ResourceSpans);
the bytes themselves are simple. This module writes them directly: standard library only,
so the export needs no OpenTelemetry package (the tests decode every request with the
official ``opentelemetry-proto`` messages and compare them with what the object-building
code made, :mod:`tests.test_otlp_wire`).

Encoding: Protocol Buffers "Encoding" (protobuf.dev/programming-guides/encoding): a field is
a varint key ``(number << 3) | wire type`` then its value; wire types used here: 0 varint
(bool, enum, int64: a negative int64 is its two's complement, ten bytes), 1 fixed64
(``fixed64`` times, ``double``), 2 length-delimited (string, bytes, sub-message), 5 fixed32
(``flags``). Proto3: a scalar field at its default (0, empty) is not written, except inside
a ``oneof`` (AnyValue's value), where being set is what it says.

Field numbers, from the opentelemetry-proto ``.proto`` files (v1)::

    common/v1/common.proto
      AnyValue      string_value 1, bool_value 2, int_value 3 (int64), double_value 4,
                    array_value 5  (oneof value)
      ArrayValue    values 1
      KeyValue      key 1, value 2
      InstrumentationScope  name 1, version 2
    resource/v1/resource.proto
      Resource      attributes 1
    trace/v1/trace.proto
      ResourceSpans resource 1, scope_spans 2
      ScopeSpans    scope 1, spans 2
      Span          trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6 (enum),
                    start_time_unix_nano 7 (fixed64), end_time_unix_nano 8 (fixed64),
                    attributes 9, events 11, status 15
      Span.Event    time_unix_nano 1 (fixed64), name 2, attributes 3
      Status        message 2, code 3 (enum)
    logs/v1/logs.proto
      ResourceLogs  resource 1, scope_logs 2
      ScopeLogs     scope 1, log_records 2
      LogRecord     time_unix_nano 1 (fixed64), body 5, attributes 6, flags 8 (fixed32),
                    trace_id 9, span_id 10, observed_time_unix_nano 11 (fixed64),
                    event_name 12
    collector/trace/v1/trace_service.proto, collector/logs/v1/logs_service.proto
      Export{Trace,Logs}ServiceRequest   resource_spans / resource_logs 1
      Export{Trace,Logs}ServiceResponse  partial_success 1
      Export{Trace,Logs}PartialSuccess   rejected_spans / rejected_log_records 1 (int64),
                                         error_message 2
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "any_value",
    "event",
    "key_value",
    "log_record",
    "logs_request",
    "partial_success",
    "resource",
    "scope",
    "span",
    "traces_request",
    "varint",
]

_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
_I = struct.Struct("<I").pack

#: Span.kind SPAN_KIND_INTERNAL (trace.proto); Status.code STATUS_CODE_ERROR.
SPAN_KIND_INTERNAL = 1
STATUS_CODE_ERROR = 2

_SMALL = [bytes([i]) for i in range(128)]


def varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a base-128 varint."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, the length, ``payload``."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


def any_value(v: Any) -> bytes:
    """An AnyValue message for an already converted attribute value (str, bool, int64,
    float, or a list of one of those: :mod:`.otel_attributes`)."""
    t = type(v)
    if t is str:
        return _ld(b"\x0a", v.encode("utf-8"))
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if t is int:
        return b"\x18" + varint(v & 0xFFFFFFFFFFFFFFFF)
    if t is float:
        return b"\x21" + _D(v)
    return _ld(b"\x2a", b"".join(_ld(b"\x0a", any_value(x)) for x in v))


def key_value(key: str, v: Any) -> bytes:
    """A KeyValue message (its bytes, without tag or length)."""
    k = key.encode("utf-8")
    return (_ld(b"\x0a", k) if k else b"") + _ld(b"\x12", any_value(v))


def key_values(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    """``attrs`` as repeated KeyValue fields with ``tag``."""
    return b"".join(_ld(tag, key_value(k, v)) for k, v in attrs.items())


def resource(attrs: Mapping[str, Any]) -> bytes:
    """A Resource message."""
    return key_values(b"\x0a", attrs)


def scope(name: str, version: str) -> bytes:
    """An InstrumentationScope message."""
    out = b""
    if name:
        out += _ld(b"\x0a", name.encode("utf-8"))
    if version:
        out += _ld(b"\x12", version.encode("utf-8"))
    return out


def event(time: int, name: str, attributes: bytes) -> bytes:
    """A Span.Event message; ``attributes``: KeyValues each with the length prefix (the tag
    is added here)."""
    out = b"\x09" + _Q(time) if time else b""
    if name:
        out += _ld(b"\x12", name.encode("utf-8"))
    return out + attributes


def span(
    trace_id: bytes,
    span_id: bytes,
    parent_span_id: bytes,
    name: str,
    start: int,
    end: int,
    attributes: bytes,
    events: Sequence[bytes],
    status: tuple[int, str] | None,
) -> bytes:
    """A Span message, kind INTERNAL. ``attributes``: the encoded repeated field (tags
    included); ``events``: Span.Event messages; ``status``: (code, message) or None."""
    # (ids of their usual sizes, 16 and 8 bytes, written without computing a length)
    out = b""
    if len(trace_id) == 16:
        out = b"\x0a\x10" + trace_id
    elif trace_id:
        out = _ld(b"\x0a", trace_id)
    if len(span_id) == 8:
        out += b"\x12\x08" + span_id
    elif span_id:
        out += _ld(b"\x12", span_id)
    if len(parent_span_id) == 8:
        out += b"\x22\x08" + parent_span_id
    elif parent_span_id:
        out += _ld(b"\x22", parent_span_id)
    if name:
        out += _ld(b"\x2a", name.encode("utf-8"))
    out += b"\x30\x01"  # kind = SPAN_KIND_INTERNAL
    if start:
        out += b"\x39" + _Q(start)
    if end:
        out += b"\x41" + _Q(end)
    out += attributes
    for e in events:
        out += _ld(b"\x5a", e)
    if status is not None:
        code, message = status
        body = _ld(b"\x12", message.encode("utf-8")) if message else b""
        if code:
            body += b"\x18" + varint(code)
        out += _ld(b"\x7a", body)
    return out


def log_record(
    time: int,
    body: str,
    attributes: bytes,
    event_name: str,
    trace_id: bytes = b"",
    span_id: bytes = b"",
    flags: int = 0,
) -> bytes:
    """A LogRecord message: its body a string AnyValue, observed time = time."""
    out = b"\x09" + _Q(time) if time else b""
    out += _ld(b"\x2a", _ld(b"\x0a", body.encode("utf-8")))
    out += attributes
    if flags:
        out += b"\x45" + _I(flags)
    if trace_id:
        out += _ld(b"\x4a", trace_id)
    if span_id:
        out += _ld(b"\x52", span_id)
    if time:
        out += b"\x59" + _Q(time)
    if event_name:
        out += _ld(b"\x62", event_name.encode("utf-8"))
    return out


def _request(groups: Iterable[tuple[bytes, bytes, Iterable[bytes]]]) -> bytes:
    # Export*ServiceRequest { Resource* 1 { resource 1, Scope* 2 { scope 1, items 2 } } }
    out = []
    for res, scope_bytes, items in groups:
        inner = _ld(b"\x0a", scope_bytes) + b"".join([_ld(b"\x12", item) for item in items])
        out.append(_ld(b"\x0a", _ld(b"\x0a", res) + _ld(b"\x12", inner)))
    return b"".join(out)


def traces_request(groups: Iterable[tuple[bytes, bytes, Iterable[bytes]]]) -> bytes:
    """An ExportTraceServiceRequest: one ResourceSpans per (resource, scope, spans)."""
    return _request(groups)


def logs_request(groups: Iterable[tuple[bytes, bytes, Iterable[bytes]]]) -> bytes:
    """An ExportLogsServiceRequest: one ResourceLogs per (resource, scope, log records)."""
    return _request(groups)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 128:
            return n, pos
        shift += 7


def _fields(data: bytes) -> Iterable[tuple[int, int, Any]]:
    """(number, wire type, value) of each field of a message; raises ValueError."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def partial_success(answer: bytes) -> tuple[int, str]:
    """(rejected count, error message) of an Export{Trace,Logs}ServiceResponse; raises
    ValueError if ``answer`` is not one."""
    rejected, message = 0, ""
    for number, wire, value in _fields(answer):
        if number == 1 and wire == 2:
            for n, w, v in _fields(value):
                if n == 1 and w == 0:
                    rejected = v - (1 << 64) if v >= 1 << 63 else v
                elif n == 2 and w == 2:
                    message = v.decode("utf-8", "replace")
    return rejected, message
