"""The OpenTelemetry bridge: tracemark spans and markers, live, as OpenTelemetry telemetry.

::

    import tracemark
    with tracemark.tracers.otel.bridge("shop.*", endpoint="http://collector:4318") as b:
        serve()
    print(b.stats())          # spans made / sent / failed / dropped

It is a probe like the printer (:mod:`tracemark.tracers.printer`), connected to the markers
matching ``pattern``. Needs the extra ``tracemark[otel]`` (``opentelemetry-api``, ``-sdk``,
``-exporter-otlp-proto-http``); ``import tracemark`` never imports OpenTelemetry.

What becomes what
-----------------
* **Spans.** ``NAME.begin`` / ``NAME.end`` (:func:`tracemark.span`: ``q.begin()``, ``with
  q(...)``, ``@q``), and a dynamic probe's ``P.entry`` / ``P.return`` / ``P.raise``, pair as
  :mod:`tracemark.analysis.pairing` pairs them (a begin whose partner is not declared is a
  plain marker). A pair is one OpenTelemetry span named ``NAME``, kind INTERNAL, started and
  ended at the times the two markers fired (``time.time_ns()``), with the begin's fields as
  attributes and the end's fields added at the end, every value converted by the one rule of
  :mod:`tracemark.export.otel_attributes` (never an exception).
* **Nesting.** A span's parent is the OpenTelemetry span current when it begins (the
  program's own instrumentation, or an enclosing tracemark span). While it is open the
  tracemark span *is* the current OpenTelemetry span (``opentelemetry.context.attach``), so
  spans the program opens inside it nest under it. OpenTelemetry's context lives in a
  ContextVar, so this holds per thread and per asyncio task: a task started inside a span
  is that span's child's track, and its own spans are parented to the span it started in.
  Begin and end pair per *track* (thread, asyncio task): an end whose begin is on another
  track (a task ending what its parent task began) is counted as ``unmatched``, never paired
  wrongly; an end that skips spans still open inside it ends those first, with the
  attribute ``tracemark.unfinished = true`` (as the pairing does).
* **Errors.** A span ended by an exception has status ERROR and the attributes
  ``exception.type`` / ``exception.message``: ``with q(...)`` or ``@q`` left by an exception
  (both probe mechanisms note it: :func:`tracemark.markers.span.ending_exception`), and a
  probe's ``P.raise`` (its ``exc_type`` and ``message``). ``GeneratorExit`` (a generator
  closed) is not an error.
* **Plain markers**, by ``markers=``: ``"events"`` (default): a span event on the current
  span, named after the marker, with its fields as attributes and its time. With no
  recording span current, the marker becomes a span of its own, zero long, attribute
  ``tracemark.instant = true`` (counted as ``orphan_markers``): nothing is lost. ``"logs"``:
  a log record (the OpenTelemetry logs SDK: severity INFO, ``event_name`` and body the
  marker's name, the fields as attributes) with the current trace context (trace and span
  id) when there is one.
* **Resource**: ``Resource.create()`` (so ``OTEL_SERVICE_NAME`` and
  ``OTEL_RESOURCE_ATTRIBUTES`` win) over tracemark's defaults: ``process.pid``,
  ``process.executable.name``, ``process.runtime.name`` / ``.version``, ``host.name``; a
  ``service_name=`` argument wins over everything; without any, the program's name (its
  script, or ``python -m``'s module: what a recorded trace's metadata calls it, so the live
  spans and ``export --format otlp`` of the trace name the same service). A bridge given
  ``tracer_provider=`` uses that provider's own resource.

Never blocks, never breaks, nothing lost silently
-------------------------------------------------
* Export happens in the SDK's ``BatchSpanProcessor`` (and ``BatchLogRecordProcessor``):
  ending a span appends it to a bounded queue (``max_queue_size``, default 2048 spans) in
  O(1), without waiting; a worker thread sends batches. A collector that is down, slow,
  answers 4xx/5xx or hangs up costs the program nothing but that worker's CPU: when the
  queue is full, spans are dropped, not waited for. Each export attempt is bounded by
  ``export_timeout`` (retries included, the exporter's own deadline).
* **Accounting** (a provider the bridge made): every span handed to the SDK is ``sent``
  (the collector said yes), ``failed`` (the exporter gave up on its batch) or ``dropped``
  (a full queue, or still queued when :meth:`Bridge.stop` ran out of time): ``made == sent
  + failed + dropped`` once stopped. The same for log records. :meth:`Bridge.stats` says it
  at any time (``pending`` until the end); :meth:`Bridge.stop` (also at interpreter exit, and
  in a ``multiprocessing`` fork child) waits at most ``stop_timeout`` seconds and warns
  (``TracemarkWarning``) when anything was not sent. With the user's ``tracer_provider``,
  export is that provider's business: only what the bridge made is counted.
* A fault inside the bridge (an SDK error) is counted (``errors``) and reported once
  (:mod:`tracemark.faults`), never raised into the program (except in strict mode).
* **Fork**: a bridge with its own provider makes a new one in a fork child (its own
  resource ``process.pid``, queue, worker and HTTP connections); spans the parent had open
  are the parent's: the child's ends of them only restore the context. A ``multiprocessing``
  fork worker (which skips atexit) is stopped by a multiprocessing finalizer.
"""

from __future__ import annotations

import atexit
import contextvars
import os
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import trace as _trace
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "the OpenTelemetry bridge needs the OpenTelemetry packages: pip install 'tracemark[otel]'"
    ) from exc

from .. import faults
from ..analysis.pairing import span_kind
from ..export.otel_attributes import attribute_value
from ..faults import TracemarkWarning
from ..markers import registry
from ..markers import span as _span_module
from ..markers.dispatch import synchronize

__all__ = ["Bridge", "BridgeStats", "bridge"]

DEFAULT_ENDPOINT = "http://localhost:4318"
#: The SDK's defaults, stated here because they are the bridge's documented limits.
DEFAULT_QUEUE = 2048
DEFAULT_BATCH = 512

_time_ns = time.time_ns
_get_current = _otel_context.get_current
_INSTANT = 0
_BEGIN = 1
_END = 2
_RAISE = 3  # a probe's P.raise: an end with an error


def default_endpoint(environ: Any = None) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT``, else ``http://localhost:4318`` (OTLP/HTTP's port)."""
    env = os.environ if environ is None else environ
    return (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def make_resource(service_name: str | None = None) -> Any:
    """The resource of a bridge-made provider (see the module docstring)."""
    from opentelemetry.sdk.resources import Resource

    ours: dict[str, Any] = {
        "process.pid": os.getpid(),
        "process.executable.name": os.path.basename(sys.executable or "python"),
        "process.runtime.name": sys.implementation.name,
        "process.runtime.version": ".".join(map(str, sys.version_info[:3])),
    }
    try:
        ours["host.name"] = socket.gethostname()
    except OSError:
        pass
    env = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME, telemetry.sdk.*
    resource = Resource(ours).merge(env)
    if service_name:
        resource = resource.merge(Resource({"service.name": service_name}))
    elif str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        # The program's name, as the recorder writes it in a trace's metadata (procname),
        # so that the live spans and `export --format otlp` of the trace name one service.
        from .recording.session import _procname

        resource = resource.merge(Resource({"service.name": _procname()}))
    return resource


class _Counting:
    """An exporter around the real one that counts what it sent and what failed."""

    def __init__(self, make: Callable[[], Any], success: Any) -> None:
        self._make = make
        self.inner = make()
        self._success = success
        self.sent = 0
        self.failed = 0
        self._lock = threading.Lock()

    def export(self, batch: Any) -> Any:
        n = len(batch)
        try:
            result = self.inner.export(batch)
        except Exception:  # the SDK would log it; we count it as well
            result = None
        with self._lock:
            if result == self._success:
                self.sent += n
            else:
                self.failed += n
        return result

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self.inner, "force_flush", None)
        return True if flush is None else flush(timeout_millis)


class BridgeStats(dict):
    """What the bridge did (a dict, printable). Keys:

    ``spans_made`` spans the bridge ended and handed to the SDK (pairs, orphan markers and
    unfinished spans), ``spans_sent`` / ``spans_failed`` / ``spans_dropped`` / ``spans_pending``
    their fate (bridge-made provider only: None otherwise), ``events`` span events added,
    ``orphan_markers`` markers made spans of their own, ``logs_made`` / ``logs_sent`` /
    ``logs_failed`` / ``logs_dropped`` / ``logs_pending`` the same for log records,
    ``unmatched`` ends without a begin on their track, ``unfinished`` spans ended because
    an outer one ended or the bridge stopped, ``suppressed`` markers fired by the SDK's own
    export (not sent: they would feed the exporter its own work), ``errors`` faults inside
    the bridge."""

    def lost(self) -> int:
        """Spans and log records not confirmed sent (failed or dropped)."""
        keys = ("spans_failed", "spans_dropped", "logs_failed", "logs_dropped")
        return sum(self.get(k) or 0 for k in keys)

    def summary(self) -> str:
        parts = [f"{self['spans_made']} spans made"]
        if self.get("spans_sent") is not None:
            parts.append(
                f"{self['spans_sent']} sent, {self['spans_failed']} failed, "
                f"{self['spans_dropped']} dropped"
                + (f", {self['spans_pending']} pending" if self["spans_pending"] else "")
            )
        if self["logs_made"]:
            parts.append(f"{self['logs_made']} log records made")
            if self.get("logs_sent") is not None:
                parts.append(
                    f"{self['logs_sent']} sent, {self['logs_failed']} failed, "
                    f"{self['logs_dropped']} dropped"
                )
        for key in ("events", "orphan_markers", "unmatched", "unfinished", "suppressed", "errors"):
            if self[key]:
                parts.append(f"{self[key]} {key.replace('_', ' ')}")
        return "; ".join(parts)


class _Open:
    """One open span on a track: an immutable link of the per-context stack (a child task
    copies its parent's context, so the stack must never be mutated in place)."""

    __slots__ = ("name", "parent", "pid", "span", "token", "track")

    def __init__(self, name: str, span: Any, token: Any, track: Any, pid: int, parent: Any):
        self.name, self.span, self.token = name, span, token
        self.track, self.pid, self.parent = track, pid, parent


def _track() -> Any:
    """The current asyncio task, else the thread's ident: where begin and end pair."""
    aio = sys.modules.get("asyncio")
    if aio is not None:
        loop = aio._get_running_loop()
        if loop is not None:
            task = aio.current_task(loop)
            if task is not None:
                return task
    return threading.get_ident()


class Bridge:
    """The probe that turns markers into OpenTelemetry telemetry; see the module docstring.

    Made by :func:`bridge` (connected and running); a context manager that stops on exit."""

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        tracer_provider: Any = None,
        logger_provider: Any = None,
        markers: Literal["events", "logs"] = "events",
        exporter: Any = None,
        log_exporter: Any = None,
        service_name: str | None = None,
        max_queue_size: int = DEFAULT_QUEUE,
        max_export_batch_size: int = DEFAULT_BATCH,
        schedule_delay: float = 0.5,
        export_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if markers not in ("events", "logs"):
            raise ValueError(f"markers= is 'events' or 'logs', not {markers!r}")
        self.markers = markers
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        self.stop_timeout = stop_timeout
        self._settings = dict(
            service_name=service_name,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
            schedule_delay_millis=schedule_delay * 1000,
            export_timeout=export_timeout,
        )
        self._exporter_given = exporter
        self._log_exporter_given = log_exporter
        self._user_tracer_provider = tracer_provider
        self._user_logger_provider = logger_provider
        self._kinds: dict[Any, tuple[int, str, tuple[str, ...]]] = {}
        self._open: contextvars.ContextVar[_Open | None] = contextvars.ContextVar(
            "tracemark_otel_open", default=None
        )
        self._live: set[_Open] = set()
        self._connections: list[Any] = []
        #: Called with the final stats when the bridge stops (tracemark record's summary).
        self.on_stop: Callable[[BridgeStats], object] | None = None
        self._stopped = False
        self._pid = os.getpid()
        self._zero_counts()
        self._build()
        # A fork child gets its own provider (see the module docstring); held weakly, so a
        # bridge dropped by the program is not kept alive by the hook.
        me = weakref.ref(self)

        def after_fork_in_child() -> None:
            b = me()
            if b is not None:
                b._after_fork_in_child()

        os.register_at_fork(after_in_child=after_fork_in_child)

    # --- the SDK pipeline -------------------------------------------------------------------

    def _count(self, *names: str) -> None:
        # Under a lock: ``x += 1`` on an attribute is three bytecodes, and a thread switch in
        # between would lose a count (the accounting must add up exactly).
        with self._lock:
            for name in names:
                setattr(self, name, getattr(self, name) + 1)

    def _zero_counts(self) -> None:
        self._lock = threading.Lock()  # new in a fork child: the parent's may be held
        self.spans_made = self.events = self.orphan_markers = 0
        self.logs_made = self.unmatched = self.unfinished = self.errors = 0
        self.suppressed = 0

    def _build(self) -> None:
        self._span_exporter: _Counting | None = None
        self._log_exporter: _Counting | None = None
        self._owned: list[Any] = []  # providers the bridge made
        self._processors: list[Any] = []  # their batch processors, shut down on stop
        if self._user_tracer_provider is not None:
            provider = self._user_tracer_provider
        else:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

            given = self._exporter_given
            self._span_exporter = _Counting(
                (lambda: given) if given is not None else self._otlp_span_exporter,
                SpanExportResult.SUCCESS,
            )
            provider = self._own(TracerProvider, BatchSpanProcessor, self._span_exporter)
        self._provider = provider
        self._tracer = provider.get_tracer("tracemark")
        self._logger: Any = None
        if self.markers == "logs":
            if self._user_logger_provider is not None:
                lp = self._user_logger_provider
            else:
                from opentelemetry.sdk._logs import LoggerProvider
                from opentelemetry.sdk._logs.export import (
                    BatchLogRecordProcessor,
                    LogRecordExportResult,
                )

                given_logs = self._log_exporter_given
                self._log_exporter = _Counting(
                    (lambda: given_logs) if given_logs is not None else self._otlp_log_exporter,
                    LogRecordExportResult.SUCCESS,
                )
                lp = self._own(LoggerProvider, BatchLogRecordProcessor, self._log_exporter)
            self._logger = lp.get_logger("tracemark")

    def _own(self, provider_type: Any, processor_type: Any, exporter: Any) -> Any:
        """A provider the bridge makes and owns, exporting through a batch processor."""
        s = self._settings
        # shutdown_on_exit=False: the SDK's own atexit shutdown has no time limit; ours
        # (stop) has one.
        provider = provider_type(resource=make_resource(s["service_name"]), shutdown_on_exit=False)
        processor = processor_type(
            exporter,
            max_queue_size=s["max_queue_size"],
            max_export_batch_size=s["max_export_batch_size"],
            schedule_delay_millis=s["schedule_delay_millis"],
        )
        # TracerProvider.add_span_processor, LoggerProvider.add_log_record_processor
        add = getattr(provider, "add_span_processor", None) or provider.add_log_record_processor
        add(processor)
        self._processors.append(processor)
        self._owned.append(provider)
        return provider

    def _otlp_span_exporter(self) -> Any:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(
            endpoint=f"{self.endpoint}/v1/traces", timeout=self._settings["export_timeout"]
        )

    def _otlp_log_exporter(self) -> Any:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

        return OTLPLogExporter(
            endpoint=f"{self.endpoint}/v1/logs", timeout=self._settings["export_timeout"]
        )

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        self._live = set()  # the parent's open spans are the parent's
        self._zero_counts()
        if self._stopped:
            return
        if self._owned:
            # Spans the parent queued are the parent's; the child starts afresh, with its
            # own pid in the resource, its own queue, worker and HTTP connections.
            self._build()
        util = sys.modules.get("multiprocessing.util")
        if util is not None:  # a fork worker ends by os._exit(): stop from a finalizer
            me = weakref.ref(self)

            def register(_: object) -> None:
                util.Finalize(None, _stop_ref, args=(me,), exitpriority=-(2**31))

            util.register_after_fork(self, register)

    # --- connecting ---------------------------------------------------------------------------

    def connect(self, pattern: str | Sequence[str] = "*") -> Bridge:
        """Connect to the markers matching ``pattern`` (a glob, or several: a marker that
        several match is sent once), now and declared later."""
        globs = [pattern] if isinstance(pattern, str) else list(pattern)
        for i, glob in enumerate(globs):
            probe = self if i == 0 else _Unless(self, globs[:i])
            self._connections.append(registry.connect(glob, probe))
        _running.add(self)
        return self

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the probe ----------------------------------------------------------------------------

    def _kind_of(self, marker: Any) -> tuple[int, str, tuple[str, ...]]:
        name = marker.name
        names = tuple(f.name for f in marker.fields)
        found = span_kind(name, registry._markers)
        if found is None:
            kind = (_INSTANT, name, names)
        elif found[0] == "begin":
            kind = (_BEGIN, found[1], names)
        else:
            kind = (_RAISE if name.endswith(".raise") else _END, found[1], names)
        self._kinds[marker] = kind
        return kind

    def __call__(self, marker: Any, args: tuple) -> None:
        now = _time_ns()
        try:
            ctx = _get_current()  # one read of the context, for both uses
            if ctx.get(_SUPPRESS):
                # Fired by the SDK's own export (a probe on http.client, say): sending it
                # would feed the exporter its own work, for ever.
                self._count("suppressed")
                return
            kind = self._kinds.get(marker) or self._kind_of(marker)
            what, name, names = kind
            if what == _BEGIN:
                self._begin(name, names, args, now)
            elif what == _INSTANT:
                self._instant(name, names, args, now, ctx)
            else:
                self._end(name, names, args, now, what == _RAISE)
        except Exception as exc:
            self._count("errors")
            if faults.report("otel-bridge", type(exc).__name__, f"OpenTelemetry bridge: {exc!r}"):
                raise

    def _begin(self, name: str, names: tuple[str, ...], args: tuple, now: int) -> None:
        attrs = {k: attribute_value(v) for k, v in zip(names, args, strict=False)}
        span = self._tracer.start_span(name, start_time=now, attributes=attrs)
        token = _otel_context.attach(_trace.set_span_in_context(span))
        node = _Open(name, span, token, _track(), self._pid, self._open.get())
        self._open.set(node)
        self._live.add(node)

    def _end(self, name: str, names: tuple[str, ...], args: tuple, now: int, raised: bool) -> None:
        top = self._open.get()
        track = _track()
        node = top
        while node is not None and node.track == track and node.name != name:
            node = node.parent
        if node is None or node.track != track:
            self._count("unmatched")
            return
        # Spans begun inside this one and never ended: ended first, as the pairing does.
        inner = top
        while inner is not node:
            assert inner is not None
            self._finish(inner, now, {"tracemark.unfinished": True}, None)
            self._count("unfinished")
            inner = inner.parent
        attrs = {k: attribute_value(v) for k, v in zip(names, args, strict=False)}
        error: Any = None
        if raised:
            error = attrs.get("exc_type") or "exception"
            attrs["exception.type"] = error
            if "message" in attrs:
                attrs["exception.message"] = attrs["message"]
        else:
            exc = _span_module.ending_exception()
            if exc is not None and not isinstance(exc, GeneratorExit):
                error = _qualname(type(exc))
                attrs["exception.type"] = error
                attrs["exception.message"] = attribute_value(_message(exc))
        self._open.set(node.parent)
        try:
            _otel_context.detach(node.token)
        finally:
            self._finish(node, now, attrs, error)

    def _finish(self, node: _Open, now: int, attrs: dict, error: Any) -> None:
        self._live.discard(node)
        if node.pid != self._pid:
            return  # begun by the parent process: the parent ends it
        span = node.span
        if attrs:
            span.set_attributes(attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end(end_time=now)
        with self._lock:
            self.spans_made += 1

    def _instant(self, name: str, names: tuple[str, ...], args: tuple, now: int, ctx: Any) -> None:
        attrs = {k: attribute_value(v) for k, v in zip(names, args, strict=False)}
        if self._logger is not None:
            self._logger.emit(
                timestamp=now,
                observed_timestamp=now,
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body=name,
                attributes=attrs,
                event_name=name,
            )
            with self._lock:
                self.logs_made += 1
            return
        current = _trace.get_current_span(ctx)
        if current.is_recording():
            current.add_event(name, attrs, timestamp=now)
            with self._lock:
                self.events += 1
            return
        attrs["tracemark.instant"] = True
        self._tracer.start_span(name, start_time=now, attributes=attrs).end(end_time=now)
        self._count("orphan_markers", "spans_made")

    # --- the end ------------------------------------------------------------------------------

    def stats(self) -> BridgeStats:
        """What the bridge did so far (see :class:`BridgeStats`)."""
        out = BridgeStats(
            spans_made=self.spans_made,
            events=self.events,
            orphan_markers=self.orphan_markers,
            logs_made=self.logs_made,
            unmatched=self.unmatched,
            unfinished=self.unfinished,
            errors=self.errors,
            suppressed=self.suppressed,
        )
        for prefix, made, exporter in (
            ("spans", self.spans_made, self._span_exporter),
            ("logs", self.logs_made, self._log_exporter),
        ):
            if exporter is None:
                fates = ("sent", "failed", "dropped", "pending")
                out.update({f"{prefix}_{k}": None for k in fates})
                continue
            settled = exporter.sent + exporter.failed
            rest = max(made - settled, 0)
            out[f"{prefix}_sent"] = exporter.sent
            out[f"{prefix}_failed"] = exporter.failed
            # Until stopped, what is not settled may still be queued: pending, not dropped.
            out[f"{prefix}_dropped"] = rest if self._stopped else 0
            out[f"{prefix}_pending"] = 0 if self._stopped else rest
        return out

    def stop(self, timeout: float | None = None) -> BridgeStats:
        """Disconnect, end the spans still open (``tracemark.unfinished``), send what is
        queued within ``timeout`` seconds (default ``stop_timeout``), shut the bridge's own
        providers down, and warn if anything was not sent. Idempotent; never raises."""
        if self._stopped:
            return self.stats()
        timeout = self.stop_timeout if timeout is None else timeout
        for conn in self._connections:
            registry.disconnect(conn)
        if self._connections:
            synchronize()
        _running.discard(self)
        now = _time_ns()
        # The calling thread's (task's) context is given back as it was before its first
        # span still open; other threads' contexts are theirs to leave (their OpenTelemetry
        # context then names a span that has ended: harmless, its children are orphans).
        oldest, node, track = None, self._open.get(), _track()
        while node is not None and node.pid == self._pid and node.track == track:
            oldest, node = node, node.parent
        if oldest is not None:
            self._open.set(oldest.parent)
            try:
                _otel_context.detach(oldest.token)
            except Exception:
                self.errors += 1
        for node in list(self._live):
            try:
                self._finish(node, now, {"tracemark.unfinished": True}, None)
                self.unfinished += 1
            except Exception:
                self.errors += 1
        self._stopped = True
        deadline = time.monotonic() + timeout
        for processor in self._processors:
            # The SDK's own shutdown waits up to 30 s for the export in flight; its batch
            # processor takes a bound, which is ours. (Not in a thread of ours: none can be
            # started at interpreter exit, when this runs most often.)
            remaining = max(deadline - time.monotonic(), 0.0)
            inner = getattr(processor, "_batch_processor", None)
            try:
                if inner is not None:
                    inner.shutdown(timeout_millis=remaining * 1000)
                else:
                    processor.shutdown()
            except Exception:
                self.errors += 1
        result = self.stats()
        if self.on_stop is not None:
            try:
                self.on_stop(result)
            except Exception:
                self.errors += 1
        if result.lost():
            warnings.warn(
                f"tracemark: the OpenTelemetry bridge lost data: {result.summary()}",
                TracemarkWarning,
                stacklevel=2,
            )
        return result

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        to = "the given provider" if not self._owned else self.endpoint
        return f"<tracemark OpenTelemetry bridge to {to} ({state})>"


class _Unless:
    """The bridge, for a glob after the first: skips the markers an earlier glob matches
    (they reach the bridge through that one)."""

    def __init__(self, bridge: Bridge, earlier: list[str]) -> None:
        import fnmatch
        import re

        self.bridge = bridge
        self._earlier = re.compile("|".join(fnmatch.translate(g) for g in earlier)).match
        self._skip: dict[Any, bool] = {}

    def __call__(self, marker: Any, args: tuple) -> None:
        skip = self._skip.get(marker)
        if skip is None:
            skip = self._skip[marker] = self._earlier(marker.name) is not None
        if not skip:
            self.bridge(marker, args)


def _qualname(cls: type) -> str:
    mod = cls.__module__
    return cls.__qualname__ if mod == "builtins" else f"{mod}.{cls.__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:
        return f"<str failed: {type(err).__name__}>"


#: Bridges connected now, stopped at interpreter exit (held weakly: a bridge the program
#: drops without stopping is not kept alive, and its provider is not shut down for it).
_running: weakref.WeakSet[Bridge] = weakref.WeakSet()


def _stop_ref(ref: Any) -> None:
    b = ref()
    if b is not None:
        b.stop()


@atexit.register
def _stop_all() -> None:
    for b in list(_running):
        try:
            b.stop()
        except Exception:  # at exit: never raise
            pass


def bridge(
    pattern: str | Sequence[str] = "*",
    *,
    endpoint: str | None = None,
    tracer_provider: Any = None,
    logger_provider: Any = None,
    markers: Literal["events", "logs"] = "events",
    exporter: Any = None,
    log_exporter: Any = None,
    service_name: str | None = None,
    max_queue_size: int = DEFAULT_QUEUE,
    max_export_batch_size: int = DEFAULT_BATCH,
    schedule_delay: float = 0.5,
    export_timeout: float = 10.0,
    stop_timeout: float = 5.0,
) -> Bridge:
    """Send the markers matching ``pattern`` to OpenTelemetry, live; see the module docstring.

    The spans go to ``tracer_provider`` if given (the program's own: its processors and
    exporters), else to a provider the bridge makes: a ``BatchSpanProcessor`` (queue of
    ``max_queue_size`` spans, batches of ``max_export_batch_size`` every ``schedule_delay``
    seconds) sending OTLP/HTTP protobuf to ``endpoint`` (default
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, else ``http://localhost:4318``; ``/v1/traces`` is
    appended), or to ``exporter`` (any ``SpanExporter``: an ``InMemorySpanExporter`` in
    tests). ``markers="logs"`` makes plain markers log records, through ``logger_provider``
    or one made the same way (``/v1/logs``, or ``log_exporter``). The bridge-made
    providers are not made global: the program's own ``set_tracer_provider`` stays its
    choice. Returns the running :class:`Bridge`; ``with bridge(...):`` stops it at the end.
    """
    b = Bridge(
        endpoint=endpoint,
        tracer_provider=tracer_provider,
        logger_provider=logger_provider,
        markers=markers,
        exporter=exporter,
        log_exporter=log_exporter,
        service_name=service_name,
        max_queue_size=max_queue_size,
        max_export_batch_size=max_export_batch_size,
        schedule_delay=schedule_delay,
        export_timeout=export_timeout,
        stop_timeout=stop_timeout,
    )
    return b.connect(pattern)
