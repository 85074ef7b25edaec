"""OTLP: a recorded trace sent to an OpenTelemetry collector (OTLP/HTTP, protobuf).

::

    result = export_otlp("tracemark-traces/app", endpoint="http://collector:4318")
    result.complete      # False when anything was not (confirmed) sent: see result.not_sent

Needs the ``tracemark[otel]`` extra (``opentelemetry-proto``, which the OTLP/HTTP exporter
brings): the messages are encoded with the official ``opentelemetry.proto`` classes,
imported here only; without them :func:`export_otlp` raises :class:`MissingOtel`. The
HTTP transport is :mod:`.otlp_http` (standard library).

What is sent
------------
The trace is walked as for the timeline formats (:mod:`.walker`: events in time order,
spans paired per thread and per asyncio task by :class:`tracemark.analysis.Pairing`).

* **Spans.** Each ``NAME.begin``/``NAME.end`` (or probe ``P.entry``/``P.return|raise``) pair
  is one OTLP span named ``NAME``, kind INTERNAL, start and end the two events' times (ns
  since the Unix epoch: the reader's timestamps, which every export uses). Its attributes:
  the begin's fields, then the end's (a name the begin has too is ``end.NAME``), each
  converted by :mod:`.otel_attributes` (the one rule: huge ints, bytes, NaN, lone surrogates
  become strings), then ``thread.id``, ``thread.name`` and, inside an asyncio task,
  ``tracemark.task.id`` and ``tracemark.task.name``.
* **Nesting.** A span begun while another is open *on the same track* (thread, or asyncio
  task) is its child (``parent_span_id``) and shares its trace id. A span with no open span
  on its track is a root: **one trace id per root span** (a request handled, a job run: what
  a tracing backend shows as one trace). Tracks are not linked to each other: a task's or
  a thread's outermost span is a root even if another track had a span open (the recording
  does not say which span started a thread or a task).
* **Ids are deterministic**: derived (BLAKE2b) from the trace's uuid and the span's order in
  the trace, so exporting a trace twice gives the same ids (a backend can tell the copy).
* **Markers** inside a span become events of the innermost open span of their track (name,
  time, fields as attributes), up to :data:`SPAN_EVENT_LIMIT` per span
  (``OTEL_SPAN_EVENT_COUNT_LIMIT`` when set, as for the SDK); a marker outside any span, and
  the markers beyond that limit, become **log records** (``/v1/logs``): body and
  ``event_name`` the marker's name, its fields and thread as attributes, and the trace and
  span id of the enclosing span when there is one. (So memory per open span is bounded and
  nothing is dropped.) An end without a begin is a marker ``NAME.end (end without begin)``
  with the attribute ``unmatched = true``.
* **Errors.** A probe's call left by an exception (its ``P.raise`` end event) is a span of
  status ERROR, its message ``exc_type: message``; other spans' status stays unset.
* **Unfinished spans** (the program crashed, a thread ended, an exception skipped an end)
  are sent ending at their track's last event, with the attribute ``tracemark.unfinished =
  true``; their status stays unset (the recording does not say why).
* **Resource per process** (one per pid; a fork child is its own process): ``service.name``
  (``OTEL_SERVICE_NAME``, else the traced program's name from the trace's metadata, else
  ``unknown_service``), ``process.pid``, ``process.command_line``,
  ``process.runtime.name``/``.version``, ``host.name``, ``tracemark.schema`` (the trace's
  schema version, :mod:`tracemark.ctf.schema`), ``tracemark.trace.uuid``; then the
  entries of ``OTEL_RESOURCE_ATTRIBUTES`` (which win). Instrumentation scope ``tracemark``.

Guarantees
----------
* **Streaming, bounded memory**: spans are sent in batches of at most ``batch_spans`` spans
  and log records in batches of ``batch_logs``; what is held meanwhile is the open spans
  (per track, with at most :data:`SPAN_EVENT_LIMIT` events each) and one batch of each.
* **Retries** (:mod:`.otlp_http`): connection failures, timeouts, 429 and 5xx are retried
  with backoff (``Retry-After`` respected); other 4xx are not.
* **Stop or go on**: a batch *refused* (4xx) is counted and the export goes on with the
  next (a bad batch says nothing of the others). A batch that still fails after its
  retries (the collector unreachable, overloaded or too slow) **stops the sending**: the
  rest of the trace is still read, to count what was not sent, but no more requests are
  made (every one would wait out the same retries).
* **Nothing half-sent silently**: :class:`OtlpResult` counts spans and log records sent
  (accepted by the collector, less those its ``partial_success`` says it rejected), batches
  failed, and what was not sent with the reason; ``complete`` is False when anything was
  not. A batch whose request timed out may have been received anyway: it is counted as not
  confirmed, and ``maybe_received`` says so. Interrupted (Ctrl-C), it raises
  :class:`Interrupted` (a KeyboardInterrupt) carrying the result so far: the batches not
  yet sent counted as not sent, and ``interrupted`` set (the rest was not read).
* **A damaged trace sends what reads**; :attr:`OtlpResult.errors` says what did not.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .otel_attributes import attribute_value
from .otel_attributes import attributes as convert_attributes
from .otlp_http import Outcome, Poster, parse_headers
from .walker import Track, _events, end_args, open_streams, walk

__all__ = [
    "DEFAULT_ENDPOINT",
    "INSTALL",
    "SPAN_EVENT_LIMIT",
    "Interrupted",
    "MissingOtel",
    "OtlpResult",
    "endpoints",
    "export_otlp",
    "resource_attributes",
]

#: Where a collector listens for OTLP/HTTP by default (OTLP specification, "OTLP/HTTP").
DEFAULT_ENDPOINT = "http://localhost:4318"
#: Span events kept on one span (the OpenTelemetry SDK's default span event count limit);
#: markers beyond it are sent as log records with the span's context.
SPAN_EVENT_LIMIT = 128
#: Spans, log records per request.
BATCH_SPANS = 512
BATCH_LOGS = 1024
INSTALL = "pip install 'tracemark[otel]'"
#: KeyValues of repeated field values kept for reuse, at most.
_CACHED = 4096


class MissingOtel(ImportError):
    """The OpenTelemetry protobuf messages are not installed: the message says how."""


def _proto() -> Any:
    """The opentelemetry.proto modules, as one namespace."""
    try:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.logs.v1 import logs_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2
    except ImportError as exc:
        raise MissingOtel(f"the otlp format needs OpenTelemetry: {INSTALL} ({exc})") from None

    class P:
        pass

    p = P()
    p.common, p.resource, p.trace, p.logs = common_pb2, resource_pb2, trace_pb2, logs_pb2
    p.trace_service, p.logs_service = trace_service_pb2, logs_service_pb2
    return p


class Interrupted(KeyboardInterrupt):
    """The export was interrupted (Ctrl-C); ``result`` says what was sent until then."""

    def __init__(self, result: OtlpResult) -> None:
        super().__init__("interrupted")
        self.result = result


@dataclass
class OtlpResult:
    """What an export sent, and what it did not."""

    traces_url: str = ""
    logs_url: str = ""
    events: int = 0
    spans: int = 0  # sent and accepted
    span_events: int = 0  # markers sent as events of those spans
    logs: int = 0  # log records sent and accepted
    requests: int = 0
    failed_batches: int = 0
    spans_not_sent: int = 0
    logs_not_sent: int = 0
    #: reason -> [spans, log records] not sent for it.
    not_sent: dict[str, list[int]] = field(default_factory=dict)
    #: Why sending stopped (None: it did not).
    stopped: str | None = None
    #: A request timed out: what it held is counted as not sent, but may have arrived.
    maybe_received: bool = False
    #: Interrupted (Ctrl-C): the rest of the trace was neither read nor sent.
    interrupted: bool = False
    unfinished: int = 0
    unmatched: int = 0
    #: One line per part of the trace that could not be read (file, offset, reason).
    errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Everything was read, sent and accepted."""
        return not (self.spans_not_sent or self.logs_not_sent or self.interrupted)


def endpoints(
    endpoint: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The traces and logs URLs: ``endpoint`` (a base URL: ``/v1/traces`` and ``/v1/logs``
    are appended), else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._LOGS_ENDPOINT``
    (used as they are), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base), else
    :data:`DEFAULT_ENDPOINT` (OpenTelemetry specification, "OTLP Exporter Configuration")."""
    env = os.environ if environ is None else environ

    def base(url: str, signal: str) -> str:
        return url.rstrip("/") + f"/v1/{signal}"

    if endpoint:
        return base(endpoint, "traces"), base(endpoint, "logs")
    common = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or base(common, "traces")
    logs = env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or base(common, "logs")
    return traces, logs


def resource_attributes(
    sub: Any, schema: int, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The resource attributes of the process whose sub-trace is ``sub`` (see the module)."""
    env = os.environ if environ is None else environ
    meta = sub.env
    attrs: dict[str, Any] = {}
    name = meta.get("procname")
    attrs["service.name"] = name if isinstance(name, str) and name else "unknown_service"
    attrs["process.pid"] = sub.pid
    for key, attr in (
        ("argv", "process.command_line"),
        ("hostname", "host.name"),
        ("python", "process.runtime.version"),
    ):
        value = meta.get(key)
        if isinstance(value, str) and value:
            attrs[attr] = value
    if "python" in meta:
        attrs["process.runtime.name"] = "cpython"
    attrs["tracemark.schema"] = schema
    attrs["tracemark.trace.uuid"] = sub.meta.uuid.hex()
    attrs.update(parse_headers(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service = env.get("OTEL_SERVICE_NAME")
    if service:
        attrs["service.name"] = service
    return convert_attributes(attrs)


class _Open:
    """A span begun and not yet ended."""

    __slots__ = ("events", "span_id", "trace_id")

    def __init__(self, trace_id: bytes, span_id: bytes) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.events: list[Any] = []


class _Sender:
    """The walker's sink: spans and log records into batches, batches to the collector."""

    def __init__(
        self,
        p: Any,
        result: OtlpResult,
        poster: Poster,
        subs: list[Any],
        schema: int,
        environ: Mapping[str, str],
        batch_spans: int,
        batch_logs: int,
        event_limit: int,
    ) -> None:
        from .. import __version__

        self.p = p
        self.result = result
        self.poster = poster
        self.batch_spans = batch_spans
        self.batch_logs = batch_logs
        self.event_limit = event_limit
        self.Span = p.trace.Span
        self.Event = p.trace.Span.Event
        self.KeyValue = p.common.KeyValue
        self.AnyValue = p.common.AnyValue
        self.ArrayValue = p.common.ArrayValue
        self.INTERNAL = p.trace.Span.SPAN_KIND_INTERNAL
        self.scope = p.common.InstrumentationScope(name="tracemark", version=__version__)
        self.resources: dict[int, Any] = {}
        for sub in subs:
            if sub.pid not in self.resources:
                self.resources[sub.pid] = p.resource.Resource(
                    attributes=self.kvs(resource_attributes(sub, schema, environ))
                )
        token = min(subs, key=lambda s: str(s.path)).meta.uuid if subs else b"\0" * 16
        self._key = hashlib.blake2b(token, digest_size=32).digest()
        self._serial = 0
        #: The event the walker is handling (set by export_otlp's event stream).
        self.current: Any = None
        self._kv_cache: dict[tuple, Any] = {}
        self.stacks: dict[int, list[_Open]] = {}  # track uid -> open spans, innermost last
        self.thread_attrs: dict[int, list[Any]] = {}  # track uid -> KeyValues
        self.spans: dict[int, list[Any]] = {}  # pid -> spans of the batch
        self.n_spans = 0
        self.n_span_events = 0
        self.records: dict[int, list[Any]] = {}  # pid -> log records of the batch
        self.n_records = 0
        self._has_event_name = "event_name" in p.logs.LogRecord.DESCRIPTOR.fields_by_name

    # -- values ----------------------------------------------------------------------
    def value(self, v: Any) -> Any:
        t = type(v)
        if t is str:
            return self.AnyValue(string_value=v)
        if t is bool:
            return self.AnyValue(bool_value=v)
        if t is int:
            return self.AnyValue(int_value=v)
        if t is float:
            return self.AnyValue(double_value=v)
        return self.AnyValue(array_value=self.ArrayValue(values=[self.value(x) for x in v]))

    def kvs(self, attrs: Mapping[str, Any]) -> list[Any]:
        """Already converted attribute values as KeyValues."""
        kv, value = self.KeyValue, self.value
        return [kv(key=k, value=value(v)) for k, v in attrs.items()]

    def fields(self, fields: Mapping[str, Any]) -> list[Any]:
        """A marker's fields as KeyValues. Field values repeat (a path, a status, a device):
        the KeyValue of a (name, str or int value) is made once and reused (protobuf copies
        it into each message), from a cache of at most :data:`_CACHED` entries. Floats are
        not cached: 0.0 == -0.0 would give one the other's sign."""
        if not fields:
            return []
        cache = self._kv_cache
        out = []
        for k, v in fields.items():
            t = type(v)
            if t is str or t is int:
                key = (k, t, v)
                kv = cache.get(key)
                if kv is None:
                    if len(cache) >= _CACHED:
                        cache.clear()
                    kv = cache[key] = self.KeyValue(key=k, value=self.value(attribute_value(v)))
                out.append(kv)
            else:
                out.append(self.KeyValue(key=k, value=self.value(attribute_value(v))))
        return out

    def _id(self, size: int) -> bytes:
        while True:
            self._serial += 1
            digest = hashlib.blake2b(
                self._serial.to_bytes(8, "little"), digest_size=size, key=self._key
            ).digest()
            if any(digest):  # an all-zero id is invalid (OTLP: "trace_id", "span_id")
                return digest

    # -- the walker's Sink -------------------------------------------------------------
    def track(self, track: Track) -> None:
        if track.kind not in ("thread", "task"):
            return
        thread = track if track.kind == "thread" else track.parent
        attrs: dict[str, Any] = {"thread.id": track.tid, "thread.name": thread.name}
        if track.task is not None:
            attrs["tracemark.task.id"] = track.task.id
            attrs["tracemark.task.name"] = str(track.task)
        # A thread renamed comes again: later spans carry the new name (a task track keeps
        # the name its thread had when the task was first seen).
        self.thread_attrs[track.uid] = self.kvs(convert_attributes(attrs))
        self.stacks.setdefault(track.uid, [])

    def _thread_kvs(self, track: Track) -> list[Any]:
        kvs = self.thread_attrs.get(track.uid)
        if kvs is None:
            self.track(track)
            kvs = self.thread_attrs[track.uid]
        return kvs

    def begin(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        stack = self.stacks.setdefault(track.uid, [])
        trace_id = stack[-1].trace_id if stack else self._id(16)
        stack.append(_Open(trace_id, self._id(8)))

    def end(
        self,
        track: Track,
        ts: int,
        name: str,
        begin_ts: int,
        begin_fields: dict[str, Any],
        end_fields: dict[str, Any] | None,
        unfinished: bool,
    ) -> None:
        stack = self.stacks[track.uid]
        span = stack.pop()  # the walker ends a track's spans innermost first
        if self.result.stopped is not None:
            self.result.spans_not_sent += 1
            self._not_sent(self.result.stopped, 1, 0)
            return
        args = dict(begin_fields)
        if end_fields:
            args.update(end_args(begin_fields, end_fields))
        attrs = self.fields(args)
        attrs.extend(self._thread_kvs(track))
        status = None
        if unfinished:
            attrs.append(self.KeyValue(key="tracemark.unfinished", value=self.value(True)))
        elif self.current is not None and self.current.name.endswith(".raise"):
            # A probe's call left by an exception: an error, as OpenTelemetry records one
            # (its exc_type and message are attributes too).
            f = end_fields or {}
            text = ": ".join(str(f[k]) for k in ("exc_type", "message") if f.get(k))
            status = self.p.trace.Status(
                code=self.p.trace.Status.STATUS_CODE_ERROR, message=attribute_text(text)
            )
        message = self.Span(
            trace_id=span.trace_id,
            span_id=span.span_id,
            parent_span_id=stack[-1].span_id if stack else b"",
            name=name,
            kind=self.INTERNAL,
            start_time_unix_nano=begin_ts,
            end_time_unix_nano=ts,
            attributes=attrs,
            events=span.events,
            status=status,
        )
        batch = self.spans.get(track.pid)
        if batch is None:
            batch = self.spans[track.pid] = []
        batch.append(message)
        self.n_spans += 1
        self.n_span_events += len(span.events)
        if self.n_spans >= self.batch_spans:
            self.flush_spans()

    def instant(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        stack = self.stacks.get(track.uid)
        inside = stack[-1] if stack else None
        if inside is not None and len(inside.events) < self.event_limit:
            if self.result.stopped is None:
                inside.events.append(
                    self.Event(time_unix_nano=ts, name=name, attributes=self.fields(fields))
                )
            else:
                inside.events.append(None)  # counted with its span, not sent
            return
        if self.result.stopped is not None:
            self.result.logs_not_sent += 1
            self._not_sent(self.result.stopped, 0, 1)
            return
        attrs = self.fields(fields)
        attrs.extend(self._thread_kvs(track))
        record = self.p.logs.LogRecord(
            time_unix_nano=ts,
            observed_time_unix_nano=ts,
            body=self.AnyValue(string_value=name),
            attributes=attrs,
        )
        if self._has_event_name:
            record.event_name = name
        if inside is not None:
            record.trace_id = inside.trace_id
            record.span_id = inside.span_id
            record.flags = 1  # sampled (W3C trace-flags), as the span itself is sent
        batch = self.records.get(track.pid)
        if batch is None:
            batch = self.records[track.pid] = []
        batch.append(record)
        self.n_records += 1
        if self.n_records >= self.batch_logs:
            self.flush_logs()

    def counter(self, track: Track, ts: int, value: int | float) -> None:  # not asked for
        pass

    # -- batches -----------------------------------------------------------------------
    def _not_sent(self, reason: str, spans: int, logs: int) -> None:
        counts = self.result.not_sent.setdefault(reason, [0, 0])
        counts[0] += spans
        counts[1] += logs

    def flush_spans(self) -> None:
        if not self.n_spans:
            return
        p, n = self.p, self.n_spans
        if self.result.stopped is not None:  # sending stopped while this batch filled
            self.spans, self.n_spans, self.n_span_events = {}, 0, 0
            self.result.spans_not_sent += n
            self._not_sent(self.result.stopped, n, 0)
            return
        request = p.trace_service.ExportTraceServiceRequest(
            resource_spans=[
                p.trace.ResourceSpans(
                    resource=self.resources.get(pid) or p.resource.Resource(),
                    scope_spans=[p.trace.ScopeSpans(scope=self.scope, spans=spans)],
                )
                for pid, spans in self.spans.items()
            ]
        )
        events = self.n_span_events
        self.spans, self.n_spans, self.n_span_events = {}, 0, 0
        outcome = self._send(self.result.traces_url, request.SerializeToString())
        if outcome.ok:
            answer = p.trace_service.ExportTraceServiceResponse()
            rejected = self._rejected(answer, outcome, "rejected_spans")
            self.result.spans += n - rejected
            self.result.span_events += events  # of the spans sent (a rejection: unknown)
            if rejected:
                self.result.spans_not_sent += rejected
                self._not_sent(_partial_reason(answer), rejected, 0)
        else:
            self.result.spans_not_sent += n
            self._not_sent(outcome.reason, n, 0)

    def flush_logs(self) -> None:
        if not self.n_records:
            return
        p, n = self.p, self.n_records
        if self.result.stopped is not None:  # sending stopped while this batch filled
            self.records, self.n_records = {}, 0
            self.result.logs_not_sent += n
            self._not_sent(self.result.stopped, 0, n)
            return
        request = p.logs_service.ExportLogsServiceRequest(
            resource_logs=[
                p.logs.ResourceLogs(
                    resource=self.resources.get(pid) or p.resource.Resource(),
                    scope_logs=[p.logs.ScopeLogs(scope=self.scope, log_records=records)],
                )
                for pid, records in self.records.items()
            ]
        )
        self.records, self.n_records = {}, 0
        outcome = self._send(self.result.logs_url, request.SerializeToString())
        if outcome.ok:
            answer = p.logs_service.ExportLogsServiceResponse()
            rejected = self._rejected(answer, outcome, "rejected_log_records")
            self.result.logs += n - rejected
            if rejected:
                self.result.logs_not_sent += rejected
                self._not_sent(_partial_reason(answer), 0, rejected)
        else:
            self.result.logs_not_sent += n
            self._not_sent(outcome.reason, 0, n)

    def _send(self, url: str, body: bytes) -> Outcome:
        outcome = self.poster.post(url, body)
        self.result.requests += outcome.attempts
        if not outcome.ok:
            self.result.failed_batches += 1
            if outcome.maybe_received:
                self.result.maybe_received = True
            if outcome.retryable:
                self.result.stopped = outcome.reason
        return outcome

    @staticmethod
    def _rejected(answer: Any, outcome: Outcome, name: str) -> int:
        try:
            answer.ParseFromString(outcome.body)
        except Exception:  # an answer that is not the message: OTLP says 2xx is accepted
            return 0
        return int(getattr(answer.partial_success, name))

    def drop(self, reason: str) -> None:
        """Count what the batches hold as not sent, for ``reason``, and empty them."""
        self.result.spans_not_sent += self.n_spans
        self.result.logs_not_sent += self.n_records
        if self.n_spans or self.n_records:
            self._not_sent(reason, self.n_spans, self.n_records)
        self.spans, self.n_spans, self.n_span_events = {}, 0, 0
        self.records, self.n_records = {}, 0

    def finish(self) -> None:
        self.flush_spans()
        self.flush_logs()


def attribute_text(text: str) -> str:
    """``text`` as OpenTelemetry carries a string (lone surrogates escaped)."""
    value = attribute_value(text)
    return value if isinstance(value, str) else str(value)


def _partial_reason(answer: Any) -> str:
    text = answer.partial_success.error_message
    return "rejected by the collector" + (f": {text}" if text else " (partial success)")


def export_otlp(
    trace_dir: str | os.PathLike[str],
    *,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    only: Iterable[str | os.PathLike[str]] | None = None,
    progress: Callable[[int], None] | None = None,
    wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    timeout: float | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    max_backoff: float = 30.0,
    batch_spans: int = BATCH_SPANS,
    batch_logs: int = BATCH_LOGS,
    environ: Mapping[str, str] | None = None,
) -> OtlpResult:
    """Send the trace in ``trace_dir`` to the collector (see the module). ``endpoint``: a
    base URL (see :func:`endpoints`); ``headers``: added to every request (default:
    ``OTEL_EXPORTER_OTLP_HEADERS``); ``only``: these sub-trace directories;
    ``timeout``: seconds per request (default ``OTEL_EXPORTER_OTLP_TIMEOUT``, in ms, else
    10); ``progress(events so far)`` now and then; ``wrap``: applied to the event stream (as
    for :func:`tracemark.export.export`); ``retries``, ``backoff``, ``max_backoff``: per
    request (:class:`.otlp_http.Poster`). Raises :class:`MissingOtel`;
    never raises for the collector (the result says what was not sent)."""
    p = _proto()
    env = os.environ if environ is None else environ
    traces_url, logs_url = endpoints(endpoint, env)
    if headers is None:
        headers = parse_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    compression = env.get("OTEL_EXPORTER_OTLP_COMPRESSION", "none").strip().lower()
    if timeout is None:
        timeout = _timeout(env)
    poster = Poster(
        headers=headers,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        max_backoff=max_backoff,
        compression="gzip" if compression == "gzip" else "none",
    )
    subs, errors = open_streams(trace_dir, only)
    from ..ctf.schema import exported_schema

    result = OtlpResult(traces_url=traces_url, logs_url=logs_url, errors=errors)
    limit = _event_limit(env)
    sender = _Sender(
        p, result, poster, subs, exported_schema(subs), env, batch_spans, batch_logs, limit
    )
    events: Iterable[Any] = _events(subs, result.errors)
    if wrap is not None:
        events = wrap(events)
    if progress is not None:
        from . import _counting

        events = _counting(events, progress)
    read = [0]

    def counted(events: Iterable[Any]) -> Iterable[Any]:
        # The walker handles each event before it asks for the next: the sink's end() sees
        # its end event here (how the span ended: a probe's %raise is an error).
        for read[0], ev in enumerate(events, 1):
            sender.current = ev
            yield ev

    try:
        walked = walk(subs, sender, errors=result.errors, events=counted(events))
        sender.finish()
    except KeyboardInterrupt:
        # What the batches held is not sent; what the requests already answered is. Said,
        # not lost in a traceback: the caller gets the counts (the CLI prints them).
        result.events = read[0]
        result.interrupted = True
        sender.drop("interrupted before it was sent")
        raise Interrupted(result) from None
    finally:
        poster.close()
    result.events = walked.events
    result.unfinished = walked.unfinished
    result.unmatched = walked.unmatched
    return result


def _timeout(env: Mapping[str, str]) -> float:
    """``OTEL_EXPORTER_OTLP_TIMEOUT`` (milliseconds, as the exporter configuration
    specifies) in seconds; 10 s when unset or not a positive number."""
    try:
        ms = float(env.get("OTEL_EXPORTER_OTLP_TIMEOUT", ""))
    except ValueError:
        return 10.0
    return ms / 1000 if ms > 0 else 10.0


def _event_limit(env: Mapping[str, str]) -> int:
    text = env.get("OTEL_SPAN_EVENT_COUNT_LIMIT", "")
    try:
        return max(0, int(text)) if text.strip() else SPAN_EVENT_LIMIT
    except ValueError:
        print(
            f"tracemark: OTEL_SPAN_EVENT_COUNT_LIMIT={text!r} is not a number: "
            f"{SPAN_EVENT_LIMIT} used",
            file=sys.stderr,
        )
        return SPAN_EVENT_LIMIT
