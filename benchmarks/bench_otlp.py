"""Issue 15: ``tracemark export --format otlp`` of a 1,000,000-event trace to a collector on
loopback, against ``babeltrace2`` printing the same trace as text and ``tracemark export
--format perfetto`` writing it to a file, in the same run; with events/s and the export's
peak memory for 1M events and a fifth of that (bounded: it must not grow with the trace).

Run: ``python -m benchmarks.run otlp``. The collector is a separate process (so its work
and memory are not the export's): an HTTP/1.1 server that decodes every request with the
official ``opentelemetry-proto`` messages, counts the spans, and discards them; the suite
checks that every span arrived. Each command runs as a user runs it (a new process), best of
``REPEAT`` wall-clock timings, interleaved; peak memory is ``ru_maxrss`` of the export's
process (RUSAGE_CHILDREN of a fresh process around it). The trace has the export suite's
shape (4 threads; a span begin, a marker, a span end: 1/3 each), so it makes 333K spans,
each with one span event. ``TRACEMARK_BENCH_OTLP_EVENTS`` changes the size (1,000,000).
Needs the ``otel`` extra (opentelemetry-proto); without it the suite says so.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .bench_export import _MAKE_TRACE, _peak_kib
from .harness import child_env, make_trace, time_command

EVENTS = int(os.environ.get("TRACEMARK_BENCH_OTLP_EVENTS", 1_000_000))
SMALL = EVENTS // 5
REPEAT = int(os.environ.get("TRACEMARK_BENCH_OTLP_REPEAT", 3))
TITLE = f"export --format otlp: a {EVENTS:,}-event trace to a collector on loopback"
BASELINE = "babeltrace2 DIR (text, to /dev/null)"
OTLP = "tracemark export --format otlp (loopback collector)"
PERFETTO = "tracemark export --format perfetto --jobs 1"

# The collector: decodes each request (as a collector must), counts spans, answers 200.
_COLLECTOR = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    count = {"/v1/traces": 0, "/v1/logs": 0}
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args):
            pass
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                r = ExportTraceServiceRequest()
                r.ParseFromString(body)
                count[self.path] += sum(
                    len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans
                )
            else:
                r = ExportLogsServiceRequest()
                r.ParseFromString(body)
                count[self.path] += sum(
                    len(sl.log_records) for rl in r.resource_logs for sl in rl.scope_logs
                )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def do_GET(self):  # the count so far, for the suite's check
            text = f"{count['/v1/traces']} {count['/v1/logs']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


def _counts(port: int) -> tuple[int, int]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    spans, logs = map(int, conn.getresponse().read().split())
    conn.close()
    return spans, logs


def report() -> str:
    if importlib.util.find_spec("opentelemetry.proto") is None:
        return f"### {TITLE}\n\nnot run: pip install 'tracemark[otel]'\n"
    tm = [sys.executable, "-m", "tracemark"]
    collector = subprocess.Popen(
        [sys.executable, "-c", _COLLECTOR], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        port = int(collector.stdout.readline())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        endpoint = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            big, small = str(Path(tmp, "big")), str(Path(tmp, "small"))
            recorded, lost = make_trace(_MAKE_TRACE, big, EVENTS)
            small_recorded, _ = make_trace(_MAKE_TRACE, small, SMALL)
            out = str(Path(tmp, "out"))
            otlp = [*tm, "export", big, "-f", "otlp", "--endpoint", endpoint]
            cases = {
                BASELINE: ["babeltrace2", big],
                PERFETTO: [*tm, "export", big, "-f", "perfetto", "--jobs", "1", "-o", out],
                OTLP: otlp,
            }
            if shutil.which("babeltrace2") is None:
                del cases[BASELINE]
            best = dict.fromkeys(cases, float("inf"))
            before = _counts(port)[0]
            for _ in range(REPEAT):
                for name, argv in cases.items():
                    best[name] = min(best[name], time_command(argv))
            spans_each = (_counts(port)[0] - before) / REPEAT
            peaks = {}
            for label, trace in ((f"{small_recorded:,}", small), (f"{recorded:,}", big)):
                argv = [*tm, "export", trace, "-f", "otlp", "--endpoint", endpoint]
                peaks[label] = min(_peak_kib(argv) for _ in range(2))
    finally:
        collector.terminate()
        collector.wait()
    if spans_each != recorded // 3:
        want = recorded // 3
        raise RuntimeError(f"the collector received {spans_each} spans per run, not {want}")
    ref = best.get(BASELINE)
    lines = [
        f"### {TITLE}",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({sys.implementation.name}, {platform.machine()}); baseline: {BASELINE}; "
        f"best of {REPEAT} wall-clock runs each, interleaved, on a shared machine with "
        f"{os.cpu_count()} CPUs (the collector, decoding every request, runs on the same "
        f"machine); trace: {recorded:,} events recorded, {lost:,} discarded or lost; "
        f"{int(spans_each):,} spans arrived per otlp run (checked)",
        "",
        "| command | seconds | events/s | ratio to baseline |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in best.items():
        ratio = f"{seconds / ref:.2f}x" if ref else "n/a (babeltrace2 not installed)"
        lines.append(f"| {name} | {seconds:.2f} | {recorded / seconds:,.0f} | {ratio} |")
    lines += [
        "",
        "Peak memory of the otlp export (ru_maxrss of the process, best of 2), for 5x the "
        "events: what the sending holds is bounded (batches, 3 requests in flight); the "
        "reader's own share grows a few MiB with the trace (a walk with no sink does too).",
        "",
        "| events | peak RSS |",
        "| ---: | ---: |",
    ]
    for label, kib in peaks.items():
        lines.append(f"| {label} | {kib / 1024:,.1f} MiB |")
    return "\n".join(lines) + "\n"
