"""OTLP: a recorded trace sent to an OpenTelemetry collector (OTLP/HTTP, protobuf).

::

    result = export_otlp("tracemark-traces/app", endpoint="http://collector:4318")
    result.complete      # False when anything was not (confirmed) sent: see result.not_sent

Standard library only: the protobuf messages are written by :mod:`.otlp_wire` (the tests
decode every request with the official ``opentelemetry-proto`` messages and compare them with
what those classes build), the HTTP transport is :mod:`.otlp_http`.

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
  (per track, with at most :data:`SPAN_EVENT_LIMIT` events each), one batch of each being
  filled, and the batches in flight: at most ``in_flight`` (:data:`IN_FLIGHT`) requests at
  once, each on its own connection and thread, in no particular order (OTLP asks for
  none); one at a time until the collector has answered once.
* **Too large** (413): a batch the collector refuses as too large is split in halves and
  each half sent on its own, down to a single span or log record; one still refused alone
  is counted as refused, with the collector's reason.
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
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import otlp_wire as wire
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
#: Requests in flight at once, at most (each on its own connection).
IN_FLIGHT = 3
INSTALL = "pip install 'tracemark[otel]'"
#: KeyValues of repeated field values kept for reuse, at most.
_CACHED = 4096


class MissingOtel(ImportError):
    """Kept for callers that catch it: the export no longer needs OpenTelemetry (the
    messages are encoded by :mod:`.otlp_wire`), so it is not raised."""


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
        self.events: list[bytes | None] = []


class _Batch:
    """Encoded spans or log records on their way: (pid, message, span events) each."""

    __slots__ = ("items", "logs")

    def __init__(self, logs: bool, items: list[tuple[int, bytes, int]]) -> None:
        self.logs = logs
        self.items = items


class _Sender:
    """The walker's sink: spans and log records encoded (:mod:`.otlp_wire`) into batches,
    batches to the collector through a :class:`_Pipeline`."""

    def __init__(
        self,
        result: OtlpResult,
        make_poster: Callable[[], Poster],
        subs: list[Any],
        schema: int,
        environ: Mapping[str, str],
        batch_spans: int,
        batch_logs: int,
        event_limit: int,
        in_flight: int = 1,
    ) -> None:
        from .. import __version__

        self.result = result
        self.batch_spans = batch_spans
        self.batch_logs = batch_logs
        self.event_limit = event_limit
        self.scope = wire.scope("tracemark", __version__)
        self.resources: dict[int, bytes] = {}
        for sub in subs:
            if sub.pid not in self.resources:
                self.resources[sub.pid] = wire.resource(resource_attributes(sub, schema, environ))
        token = min(subs, key=lambda s: str(s.path)).meta.uuid if subs else b"\0" * 16
        self._key = hashlib.blake2b(token, digest_size=32).digest()
        self._keyed = {size: hashlib.blake2b(digest_size=size, key=self._key) for size in (8, 16)}
        self._serial = 0
        #: The event the walker is handling (set by export_otlp's event stream).
        self.current: Any = None
        self._kv_cache: dict[tuple, bytes] = {}
        self._keys: dict[str, bytes] = {}  # field name -> KeyValue.key, encoded
        self.stacks: dict[int, list[_Open]] = {}  # track uid -> open spans, innermost last
        self.thread_attrs: dict[int, list[bytes]] = {}  # track uid -> KeyValues
        self.spans: list[tuple[int, bytes, int]] = []  # the batch: (pid, Span, events)
        self.records: list[tuple[int, bytes, int]] = []  # (pid, LogRecord, 0)
        self.pipeline = _Pipeline(make_poster, in_flight, self._done, self._admit)

    # -- values ----------------------------------------------------------------------
    def fields(self, fields: Mapping[str, Any]) -> list[bytes]:
        """A marker's fields as KeyValue messages, each with its length prefix (the field's
        tag is the caller's). An int64 is written at once; string values repeat (a path, a
        device): the bytes of a (name, str) are made once and reused, from a cache of at
        most :data:`_CACHED` entries. Floats are not cached: 0.0 == -0.0 would give one the
        other's sign."""
        if not fields:
            return []
        cache = self._kv_cache
        keys = self._keys
        out = []
        for k, v in fields.items():
            t = type(v)
            if t is int and _INT64_MIN <= v <= _INT64_MAX:
                # The common case, by hand and not cached (counters, sizes, ids: ints vary
                # more than strings): KeyValue{key, value: AnyValue{int_value}}.
                prefix = keys.get(k)
                if prefix is None:
                    prefix = keys[k] = _key_prefix(k)
                value = _SMALL[v] if 0 <= v < 128 else wire.varint(v & 0xFFFFFFFFFFFFFFFF)
                n = len(value)
                body = prefix + _INT_VALUE[n] + value
                out.append(_SMALL[len(body)] + body if len(body) < 128 else _prefixed(body))
            elif t is str or t is int:
                key = (k, v)
                kv = cache.get(key)
                if kv is None:
                    if len(cache) >= _CACHED:
                        cache.clear()
                    kv = cache[key] = _prefixed(wire.key_value(k, attribute_value(v)))
                out.append(kv)
            else:
                out.append(_prefixed(wire.key_value(k, attribute_value(v))))
        return out

    def _id(self, size: int) -> bytes:
        # BLAKE2b keyed with the trace's token, of the serial number: a copy of the keyed
        # state then the serial is the same digest as keying anew, for less.
        keyed = self._keyed[size]
        while True:
            self._serial += 1
            h = keyed.copy()
            h.update(self._serial.to_bytes(8, "little"))
            digest = h.digest()
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
        self.thread_attrs[track.uid] = [
            _prefixed(wire.key_value(k, v)) for k, v in convert_attributes(attrs).items()
        ]
        self.stacks.setdefault(track.uid, [])

    def _thread_kvs(self, track: Track) -> list[bytes]:
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
        if end_fields:
            args = dict(begin_fields)
            args.update(end_args(begin_fields, end_fields))
        else:
            args = begin_fields
        attrs = self.fields(args)
        attrs.extend(self._thread_kvs(track))
        status = None
        if unfinished:
            attrs.append(_UNFINISHED)
        elif self.current is not None and self.current.name.endswith(".raise"):
            # A probe's call left by an exception: an error, as OpenTelemetry records one
            # (its exc_type and message are attributes too).
            f = end_fields or {}
            text = ": ".join(str(f[k]) for k in ("exc_type", "message") if f.get(k))
            status = (wire.STATUS_CODE_ERROR, attribute_text(text))
        message = wire.span(
            span.trace_id,
            span.span_id,
            stack[-1].span_id if stack else b"",
            name,
            begin_ts,
            ts,
            b"\x4a" + b"\x4a".join(attrs) if attrs else b"",
            span.events,
            status,
        )
        self.spans.append((track.pid, message, len(span.events)))
        if len(self.spans) >= self.batch_spans:
            self.flush_spans()

    def instant(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        stack = self.stacks.get(track.uid)
        inside = stack[-1] if stack else None
        if inside is not None and len(inside.events) < self.event_limit:
            if self.result.stopped is None:
                attrs = self.fields(fields)
                inside.events.append(
                    wire.event(ts, name, b"\x1a" + b"\x1a".join(attrs) if attrs else b"")
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
        # The enclosing span's context; flags 1: sampled (W3C trace-flags), as the span is.
        context = (inside.trace_id, inside.span_id, 1) if inside is not None else (b"", b"", 0)
        record = wire.log_record(ts, name, b"\x32" + b"\x32".join(attrs), name, *context)
        self.records.append((track.pid, record, 0))
        if len(self.records) >= self.batch_logs:
            self.flush_logs()

    def counter(self, track: Track, ts: int, value: int | float) -> None:  # not asked for
        pass

    # -- batches -----------------------------------------------------------------------
    def _not_sent(self, reason: str, spans: int, logs: int) -> None:
        counts = self.result.not_sent.setdefault(reason, [0, 0])
        counts[0] += spans
        counts[1] += logs

    def _count_not_sent(self, batch: _Batch, reason: str) -> None:
        n = len(batch.items)
        if batch.logs:
            self.result.logs_not_sent += n
            self._not_sent(reason, 0, n)
        else:
            self.result.spans_not_sent += n
            self._not_sent(reason, n, 0)

    def flush_spans(self) -> None:
        if self.spans:
            self._submit(_Batch(False, self.spans))

    def flush_logs(self) -> None:
        if self.records:
            self._submit(_Batch(True, self.records))

    def _submit(self, batch: _Batch) -> None:
        # The batch stays in self.spans / self.records (where an interrupt counts it) until
        # it is in the pipeline (where abort() counts it), or counted as not sent.
        self.pipeline.poll()  # answers arrived meanwhile: sending may have stopped
        if self._admit(batch):
            url = self.result.logs_url if batch.logs else self.result.traces_url
            self.pipeline.enqueue(batch, url, self._body(batch))
        if batch.logs:
            self.records = []
        else:
            self.spans = []
        self.pipeline.pump()

    def _admit(self, batch: _Batch) -> bool:
        """May ``batch`` still be sent? If not, it is counted as not sent."""
        if self.result.stopped is not None:  # sending stopped while this batch filled
            self._count_not_sent(batch, self.result.stopped)
            return False
        return True

    def _body(self, batch: _Batch) -> bytes:
        by_pid: dict[int, list[bytes]] = {}
        for pid, message, _ in batch.items:
            group = by_pid.get(pid)
            if group is None:
                group = by_pid[pid] = []
            group.append(message)
        groups = [
            (self.resources.get(pid, b""), self.scope, messages) for pid, messages in by_pid.items()
        ]
        return wire.logs_request(groups) if batch.logs else wire.traces_request(groups)

    def _done(self, batch: _Batch, outcome: Outcome) -> None:
        """An answer (on the exporting thread): count it."""
        result = self.result
        result.requests += outcome.attempts
        if outcome.ok:
            n = len(batch.items)
            rejected, message = _rejected(outcome)
            if batch.logs:
                result.logs += n - rejected
            else:
                result.spans += n - rejected
                # of the spans sent (a rejection: unknown which)
                result.span_events += sum(item[2] for item in batch.items)
            if rejected:
                reason = "rejected by the collector" + (
                    f": {message}" if message else " (partial success)"
                )
                if batch.logs:
                    result.logs_not_sent += rejected
                    self._not_sent(reason, 0, rejected)
                else:
                    result.spans_not_sent += rejected
                    self._not_sent(reason, rejected, 0)
            return
        if outcome.status == 413 and len(batch.items) > 1 and result.stopped is None:
            # Too large for this collector: each half on its own, down to one item (a
            # single span or record still refused is refused, with the reason).
            half = len(batch.items) // 2
            for part in (batch.items[:half], batch.items[half:]):
                piece = _Batch(batch.logs, part)
                url = result.logs_url if batch.logs else result.traces_url
                self.pipeline.submit(piece, url, self._body(piece))
            return
        result.failed_batches += 1
        if outcome.maybe_received:
            result.maybe_received = True
        if outcome.retryable and result.stopped is None:
            result.stopped = outcome.reason
        self._count_not_sent(batch, outcome.reason)

    def drop(self, reason: str) -> None:
        """Count what the batches hold as not sent, for ``reason``, and empty them."""
        for batch in (_Batch(False, self.spans), _Batch(True, self.records)):
            if batch.items:
                self._count_not_sent(batch, reason)
        self.spans, self.records = [], []

    def finish(self) -> None:
        self.flush_spans()
        self.flush_logs()
        self.pipeline.drain()

    def abort(self) -> None:
        """Interrupted: the batches waiting are not sent; those in flight are waited for
        (their retries cut short) and counted as answered. Interrupted again meanwhile:
        those still in flight are counted as not sent, and as maybe received."""
        reason = "interrupted before it was sent"
        try:
            for batch in self.pipeline.abort():
                self._count_not_sent(batch, reason)
        except KeyboardInterrupt:
            for batch in self.pipeline.ready_and_flying():
                self._count_not_sent(batch, "interrupted while it was being sent")
                self.result.maybe_received = True


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_SMALL = [bytes([i]) for i in range(128)]
#: AnyValue as a KeyValue's value field, for an int_value varint of n bytes: its start.
_INT_VALUE = [b""] + [b"\x12" + bytes([n + 1]) + b"\x18" for n in range(1, 11)]


def _key_prefix(key: str) -> bytes:
    """KeyValue's ``key`` field, encoded (empty: not written, as proto3 says)."""
    k = key.encode("utf-8")
    return b"\x0a" + wire.varint(len(k)) + k if k else b""


def _prefixed(message: bytes) -> bytes:
    """``message`` with its length in front (a repeated field's entry, less its tag)."""
    return wire.varint(len(message)) + message


def _rejected(outcome: Outcome) -> tuple[int, str]:
    try:
        return wire.partial_success(outcome.body)
    except ValueError:  # an answer that is not the message: OTLP says 2xx is accepted
        return 0, ""


_UNFINISHED = _prefixed(wire.key_value("tracemark.unfinished", True))


class _Pipeline:
    """Encoded batches to the collector, at most ``limit`` requests in flight, each on a
    worker thread with its own :class:`Poster` (its own kept-alive connection); OTLP does
    not ask for an order. Answers are handed to ``done(batch, outcome)`` on the exporting
    thread (so the counts need no lock), as they come; ``admit(batch)`` says, just before
    a batch starts, whether it may still be sent (False: it has been counted otherwise).

    Until the collector has answered once, one request at a time: a collector that is down
    or refuses everything sees one request (retried), not ``limit``."""

    def __init__(
        self,
        make_poster: Callable[[], Poster],
        limit: int,
        done: Callable[[Any, Outcome], None],
        admit: Callable[[Any], bool],
    ) -> None:
        self.make_poster = make_poster
        self.limit = max(1, limit)
        self.done = done
        self.admit = admit
        self.cancel = threading.Event()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        self.ready: deque[tuple[Any, str, bytes]] = deque()
        self.flying: dict[int, Any] = {}  # id(batch) -> batch, sent and not answered
        self.answered = False
        self._busy = False

    def _room(self) -> bool:
        return len(self.flying) < (self.limit if self.answered else 1)

    def submit(self, batch: Any, url: str, body: bytes) -> None:
        """Send ``batch`` (encoded: ``body``) to ``url``: returns once it is in flight (or
        counted as not to be sent), having waited for answers while there was no room."""
        self.enqueue(batch, url, body)
        self.pump()

    def enqueue(self, batch: Any, url: str, body: bytes) -> None:
        """``batch`` waits for its place (:meth:`pump` sends it)."""
        self.ready.append((batch, url, body))

    def pump(self) -> None:
        """Start what waits, waiting for answers while there is no room."""
        if not self._busy:  # (a 413's halves are submitted from done(): the loop runs)
            self._pump(wait=True)

    def poll(self) -> None:
        """Hand over the answers that have arrived, start what now has room."""
        self._pump(wait=False)

    def drain(self) -> None:
        """Wait until everything submitted is answered."""
        self._pump(wait=True)
        while self.flying:
            self._answer(self.answers.get())
            self._pump(wait=True)

    def _pump(self, wait: bool) -> None:
        self._busy = True
        try:
            while True:
                while True:  # answers already there
                    try:
                        answer = self.answers.get_nowait()
                    except queue.Empty:
                        break
                    self._answer(answer)
                while self.ready and self._room():
                    self._start(*self.ready.popleft())
                if not self.ready or not wait:
                    return
                self._answer(self.answers.get())  # no room: wait for one
        finally:
            self._busy = False

    def _start(self, batch: Any, url: str, body: bytes) -> None:
        if not self.admit(batch):
            return
        if len(self.workers) < self.limit and len(self.workers) <= len(self.flying):
            worker = threading.Thread(target=self._work, name="tracemark-otlp-sender", daemon=True)
            worker.start()
            self.workers.append(worker)
        self.flying[id(batch)] = batch
        self.jobs.put((batch, url, body))

    def _answer(self, answer: tuple[Any, Outcome]) -> None:
        batch, outcome = answer
        del self.flying[id(batch)]
        if outcome.status:
            self.answered = True
        self.done(batch, outcome)

    def _work(self) -> None:
        poster = self.make_poster()
        poster.cancel = self.cancel
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                batch, url, body = job
                try:
                    outcome = poster.post(url, body)
                except BaseException as exc:  # post() never raises; this is a bug's report
                    outcome = Outcome(False, 0, reason=f"{type(exc).__name__}: {exc}")
                self.answers.put((batch, outcome))
        finally:
            poster.close()

    def abort(self) -> list[Any]:
        """Interrupted: no retry starts any more, nothing waiting starts; wait for the
        requests in flight (each within its timeout) and hand over their answers. Returns
        the batches that were waiting (not sent). A second interrupt while waiting leaves
        the rest in ``flying``."""
        self.cancel.set()
        waiting = [batch for batch, _, _ in self.ready]
        self.ready.clear()
        self._busy = True  # halves of a 413 answered now go to ready, not to the wire
        while self.flying:
            self._answer(self.answers.get())
            waiting.extend(batch for batch, _, _ in self.ready)
            self.ready.clear()
        return waiting

    def ready_and_flying(self) -> list[Any]:
        """What was not answered (an interrupted :meth:`abort`): forgotten here."""
        batches = [batch for batch, _, _ in self.ready] + list(self.flying.values())
        self.ready.clear()
        self.flying.clear()
        return batches

    def close(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=1.0)
        self.workers.clear()


def attribute_text(text: str) -> str:
    """``text`` as OpenTelemetry carries a string (lone surrogates escaped)."""
    value = attribute_value(text)
    return value if isinstance(value, str) else str(value)


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
    in_flight: int = IN_FLIGHT,
) -> OtlpResult:
    """Send the trace in ``trace_dir`` to the collector (see the module). ``endpoint``: a
    base URL (see :func:`endpoints`); ``headers``: added to every request (default:
    ``OTEL_EXPORTER_OTLP_HEADERS``); ``only``: these sub-trace directories;
    ``timeout``: seconds per request (default ``OTEL_EXPORTER_OTLP_TIMEOUT``, in ms, else
    10); ``progress(events so far)`` now and then; ``wrap``: applied to the event stream (as
    for :func:`tracemark.export.export`); ``retries``, ``backoff``, ``max_backoff``: per
    request (:class:`.otlp_http.Poster`); ``in_flight``: requests sent at once, at most
    (one until the collector has answered once). Never raises for the collector (the
    result says what was not sent)."""
    env = os.environ if environ is None else environ
    traces_url, logs_url = endpoints(endpoint, env)
    if headers is None:
        headers = parse_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    compression = env.get("OTEL_EXPORTER_OTLP_COMPRESSION", "none").strip().lower()
    if timeout is None:
        timeout = _timeout(env)

    def make_poster() -> Poster:
        return Poster(
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
        result,
        make_poster,
        subs,
        exported_schema(subs),
        env,
        batch_spans,
        batch_logs,
        limit,
        in_flight,
    )
    events: Iterable[Any] = _events(subs, result.errors)
    if wrap is not None:
        events = wrap(events)
    read = [0]

    def counted(events: Iterable[Any]) -> Iterable[Any]:
        # The walker handles each event before it asks for the next: the sink's end() sees
        # its end event here (how the span ended: a probe's %raise is an error). Progress
        # is said here too (one generator for both: this runs once per event).
        for read[0], ev in enumerate(events, 1):
            sender.current = ev
            if not read[0] & 0x3FFF and progress is not None:
                progress(read[0])
            yield ev
        if progress is not None:
            progress(read[0])

    try:
        walked = walk(subs, sender, errors=result.errors, events=counted(events))
        sender.finish()
    except KeyboardInterrupt:
        # What the batches held is not sent; what the requests already answered is. Said,
        # not lost in a traceback: the caller gets the counts (the CLI prints them).
        result.events = read[0]
        result.interrupted = True
        sender.drop("interrupted before it was sent")
        sender.abort()
        raise Interrupted(result) from None
    finally:
        sender.pipeline.close()
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
