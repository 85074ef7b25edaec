"""A test OpenTelemetry collector on loopback: it receives OTLP/HTTP protobuf requests
(``POST /v1/traces``, ``/v1/logs``) and decodes every one with the official
``opentelemetry-proto`` messages, so that tests compare what arrived with what the program did.

It can misbehave on demand, the ways a real collector does::

    with Collector() as c:
        c.fail(503, times=2)      # the next two requests get 503, then it recovers
        c.fail(400)               # every request is refused with 400 until c.fail(None)
        c.delay = 2.0             # answer each request 2 s late
        c.hang_up = 1             # close the next request's connection without an answer
        c.max_body = 4096         # refuse a larger body with 413 (c.refused_too_large counts)
        c.stop()                  # nothing listens: connections are refused
        c.endpoint                # "http://127.0.0.1:PORT"
        c.spans()                 # every span received, in order (opentelemetry.proto Span)

(No OpenTelemetry Collector binary is installable here; if ``otelcol`` is on PATH a test
may run it as well.)
"""

from __future__ import annotations

import gzip
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_KINDS = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}


class Collector:
    def __init__(self) -> None:
        self.requests: list[tuple[str, object]] = []  # (path, decoded request), accepted ones
        self.attempts = 0  # every request that reached the handler, answered or not
        self.delay = 0.0
        self.hang_up = 0
        self.max_body: int | None = None
        self.refused_too_large = 0
        self.sizes: list[int] = []  # body size of each accepted request
        self.in_flight = 0  # requests being handled now
        self.peak_in_flight = 0  # the most handled at once
        self.errors: list[BaseException] = []  # the handler's own failures (none expected)
        self._status: int | None = None
        self._times: int | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- life ---------------------------------------------------------------------------
    def __enter__(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                collector._handle(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # A client that hung up while its answer was on the way (an interrupted
                # export; one that gave up on a slow answer) is a case these tests make.
                # socketserver would print its traceback to stderr, later, into whichever
                # test runs then (a test reading its own stderr failed on it under xdist).
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    collector.errors.append(sys.exc_info()[1])

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc[0] is None:
            assert not self.errors, f"the test collector's handler failed: {self.errors!r}"

    def stop(self) -> None:
        """Stop listening: connections to the endpoint are refused from now on."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, status: int | None, times: int | None = None) -> None:
        """Answer the next ``times`` requests (all, if None) with ``status``; None: accept."""
        with self._lock:
            self._status, self._times = status, times

    # -- what arrived ---------------------------------------------------------------------
    def traces(self) -> list:
        return [r for path, r in self.requests if path == "/v1/traces"]

    def logs(self) -> list:
        return [r for path, r in self.requests if path == "/v1/logs"]

    def spans(self) -> list:
        return [
            span
            for request in self.traces()
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def log_records(self) -> list:
        return [
            record
            for request in self.logs()
            for resource_logs in request.resource_logs
            for scope_logs in resource_logs.scope_logs
            for record in scope_logs.log_records
        ]

    # -- the handler ----------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        # A request stops being in flight when its answer (or hang-up) starts, not when this
        # thread gets back here: the client may read the answer and send its next request
        # first, and on a loaded machine it did (a peak of 4 with 3 allowed).
        h._tm_landed = False  # type: ignore[attr-defined]  # (one handler per connection)
        respond = type(h).send_response.__get__(h)

        def send_response(*args: object) -> None:
            self._landed(h)
            respond(*args)

        h.send_response = send_response  # type: ignore[method-assign]
        try:
            self._answer(h)
        finally:
            self._landed(h)

    def _landed(self, h: BaseHTTPRequestHandler) -> None:
        """``h``'s request is no longer in flight (once per request)."""
        if not getattr(h, "_tm_landed", False):
            h._tm_landed = True  # type: ignore[attr-defined]
            with self._lock:
                self.in_flight -= 1

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.attempts += 1
            hang_up = self.hang_up > 0
            if hang_up:
                self.hang_up -= 1
            status = self._status
            if status is not None and self._times is not None:
                self._times -= 1
                if self._times <= 0:
                    self._status = self._times = None
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length)
        if hang_up:
            h.close_connection = True
            self._landed(h)
            h.connection.close()  # mid-request: no status line at all
            return
        if self.delay:
            time.sleep(self.delay)
        kind = _KINDS.get(h.path)
        if status is None and self.max_body is not None and length > self.max_body:
            with self._lock:
                self.refused_too_large += 1
            text = f"request body over the limit of {self.max_body} bytes".encode()
            h.send_response(413)
            h.send_header("Content-Length", str(len(text)))
            h.end_headers()
            h.wfile.write(text)
            return
        if status is not None or kind is None:
            h.send_response(status or 404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        encoding = h.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = kind[0]()
        request.ParseFromString(body)
        with self._lock:
            self.requests.append((h.path, request))
            self.sizes.append(length)
        answer = kind[1]().SerializeToString()
        h.send_response(200)
        h.send_header("Content-Type", "application/x-protobuf")
        h.send_header("Content-Length", str(len(answer)))
        h.end_headers()
        h.wfile.write(answer)
