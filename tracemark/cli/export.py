"""``tracemark export DIR --format chrome|perfetto [-o FILE] [--counter NAME.FIELD]``: the
trace as a file timeline viewers load (:mod:`tracemark.export`); ``--format parquet [-o OUT/]
[--layout wide|long] [-e GLOB] [--filter EXPR]``: as Parquet tables for query engines
(:mod:`tracemark.export.parquet`, the ``tracemark[parquet]`` extra); ``--format otlp
[--endpoint URL]``: sent to an OpenTelemetry collector over OTLP/HTTP
(:mod:`tracemark.export.otlp`, standard library).

Guarantees
----------
* Errors are one line and an exit code (``tracemark --help``), never a traceback: a bad
  ``--counter`` (unknown marker or field, or a field that is not a number) is a usage error
  (2) before anything is written; a missing trace is 3; a file that cannot be written is 2.
* **A damaged trace exports what reads, and says what did not**: the file is written with
  every event that could be read, then one line per part that could not (file and byte
  offset) goes to stderr, and the exit code is 4 (corrupt), so a script notices.
* What the file cannot show is said too: events discarded or lost while recording (the
  same warnings as ``view`` and ``stats``), spans closed unfinished, ends without a begin,
  counter values left out (not a finite number).
* Progress on stderr when it is a terminal; a one-line summary at the end.
* Parquet: without pyarrow, one line naming ``pip install 'tracemark[parquet]'`` and exit 5
  (the machine's: the trace and the command are fine, the environment lacks a package),
  before anything is read or written. ``-e`` and ``--filter`` choose the rows (as for
  ``view``); they, and ``--layout``, go with parquet only, ``--counter`` and ``--jobs``
  with chrome and perfetto only (usage errors otherwise): a timeline of some events only
  would cut spans in two.
* OTLP: standard library only (no OpenTelemetry package needed).
  ``--endpoint``, ``--timeout`` and ``--retries`` go with otlp only. At the end, one line
  says what was sent (spans, span events, log records, requests), then one line per reason
  something was not sent (with the counts), and the exit code says it too: 7 (the
  collector unreachable, overloaded or too slow after the retries: sending stopped, the
  rest was counted, not sent) or 6 (the collector refused some batches: the others were
  sent). These are the codes ``attach`` and the other control commands use for a target
  unreachable (7) and a request refused (6). A damaged trace (4) is reported as well, but
  a code saying something did not reach the collector wins.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import IO, Any

from ..export import FORMATS, CounterSpec, default_output, export
from ._common import (
    EXIT_CORRUPT,
    EXIT_ENVIRONMENT,
    EXIT_USAGE,
    CliError,
    Progress,
    add_session_args,
    environment_failure,
    human_size,
    open_trace,
    printable,
    total_events,
    warn_unmatched,
)

__all__ = ["add_parser", "run", "run_export"]

EPILOG = """\
what goes in:
  NAME.begin/NAME.end and probe P.entry/P.return pairs become slices NAME on
  their thread's track (an unfinished one: closed at the thread's last event,
  marked "(unfinished)" and unfinished=true); other markers become instant
  events with their fields as args; --counter NAME.FIELD draws that numeric
  field as a counter track of its process.

examples:
  tracemark export DIR -f perfetto -o app.pftrace  # ui.perfetto.dev
  tracemark export DIR -f chrome -o app.json.gz    # chrome://tracing
  tracemark export DIR --format chrome --counter net.rx.len
  tracemark export DIR -f parquet -o out/          # out/MARKER/pid=N/*.parquet
  tracemark export DIR -f parquet --layout long -e 'shop.*' -o out/

parquet (pip install 'tracemark[parquet]'): one table per marker, its fields as
typed columns beside timestamp (ns since the epoch), tid, thread, task_id, task;
or --layout long: one table, the fields as a JSON payload. Partitioned by
process (pid=N/), so DuckDB reads many traces as one dataset:
  duckdb -c "SELECT pid, count(*) FROM
    read_parquet('out/shop.order/**/*.parquet', hive_partitioning=true)
    GROUP BY pid"

otlp (standard library): spans (begin/end pairs) become OTLP spans
with their fields as attributes, nested per thread and asyncio task, one trace
per outermost span; markers become events of the enclosing span, or log
records (/v1/logs) outside any span; an unfinished span is sent ending at its
thread's last event with tracemark.unfinished=true. One resource per process
(service.name from OTEL_SERVICE_NAME or the program's name, process.pid,
host.name, tracemark.schema). --endpoint (a base URL) defaults to
OTEL_EXPORTER_OTLP_ENDPOINT (or the full URLs OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
and ..._LOGS_ENDPOINT), else http://localhost:4318; headers from
OTEL_EXPORTER_OTLP_HEADERS.
Connection errors, timeouts, 429 and 5xx are retried with backoff (Retry-After
respected); if they persist, sending stops. Other 4xx refuse one batch; the
next ones are sent.
  tracemark export DIR -f otlp --endpoint http://collector:4318

exit codes: 0 ok, 2 usage error, 3 not a trace, 4 corrupt trace (what could be
read is exported; the rest is listed on stderr), 5 the machine's (too many open
files, disk full, permission denied: never called a corrupt trace; a missing
package), otlp: 6 the collector refused some batches, 7 the collector could not
be reached (after the retries): what was not sent is listed."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write a trace as Chrome JSON or a Perfetto trace (timeline viewers), or Parquet",
        description=(
            "Write the trace as a timeline: Chrome Trace Event JSON (chrome://tracing,\n"
            "Perfetto UI, speedscope; gzip-compressed when FILE ends in .gz) or Perfetto's\n"
            "protobuf format (Perfetto UI), or as Parquet tables (DuckDB, Spark, any Arrow\n"
            "engine). Streams: memory does not grow with the trace."
        ),
        epilog=EPILOG,
    )
    p.add_argument("trace", metavar="DIR", help="a trace directory written by tracemark record")
    p.add_argument(
        "--format",
        "-f",
        required=True,
        choices=(*FORMATS, "parquet", "otlp"),
        help="the file format (otlp: sent to an OpenTelemetry collector)",
    )
    p.add_argument(
        "--endpoint",
        metavar="URL",
        help="otlp: the collector's base URL (default: OTEL_EXPORTER_OTLP_ENDPOINT, else "
        "http://localhost:4318)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="otlp: seconds to wait for the collector's answer to a request (default: "
        "OTEL_EXPORTER_OTLP_TIMEOUT ms, else 10)",
    )
    p.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="otlp: retries of a request that failed for a reason that may pass (5)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="the file to write (default: DIR.json or DIR.pftrace, beside DIR); parquet: "
        "the directory (default: DIR.parquet, beside DIR)",
    )
    p.add_argument(
        "--layout",
        choices=("wide", "long"),
        help="parquet: a table per marker (wide, the default) or one with a JSON payload",
    )
    p.add_argument(
        "-e",
        "--events",
        metavar="GLOB",
        action="append",
        help="parquet: only the markers matching GLOB (repeatable)",
    )
    p.add_argument("--filter", metavar="EXPR", help="parquet: only events where EXPR is true")
    p.add_argument(
        "--counter",
        metavar="NAME.FIELD",
        action="append",
        default=[],
        help="draw the numeric field FIELD of marker NAME as a counter (repeatable)",
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        metavar="N",
        help="processes to use (default: 2 where there are 2 CPUs and the trace is large)",
    )
    add_session_args(p)
    return p


def _counters(trace: Any, texts: list[str]) -> list[CounterSpec]:
    specs = []
    markers = getattr(trace, "markers", {})
    for text in texts:
        try:
            spec = CounterSpec.parse(text)
        except ValueError as exc:
            raise CliError(f"--counter {exc}", EXIT_USAGE) from None
        fields = markers.get(spec.marker)
        if fields is None:
            raise CliError(
                f"--counter {printable(text)}: the trace has no marker {printable(spec.marker)}",
                EXIT_USAGE,
            )
        types = dict(fields)
        if spec.field not in types:
            have = ", ".join(types) or "none"
            raise CliError(
                f"--counter {printable(text)}: marker {printable(spec.marker)} has no field "
                f"{printable(spec.field)} (its fields: {printable(have)})",
                EXIT_USAGE,
            )
        if types[spec.field] not in ("int", "float"):
            raise CliError(
                f"--counter {printable(text)}: field {printable(spec.field)} is "
                f"{types[spec.field]}, not a number",
                EXIT_USAGE,
            )
        specs.append(spec)
    return specs


def run_export(
    trace_dir: str,
    fmt: str,
    output: str | None,
    counters: list[str],
    err: IO[str],
    prog: str,
    jobs: int | None = None,
    session: str | None = None,
    merge: bool = True,
) -> int:
    """Export, say what happened on ``err``; the exit code. ``session``, ``merge``: as for
    :func:`._common.open_trace` (which sub-traces of a directory of several sessions)."""
    # A missing or unreadable trace: one line, exit 3 or 4.
    trace = open_trace(trace_dir, session=session, merge=merge)
    only = [sub.path for sub in trace.subtraces]
    specs = _counters(trace, counters)
    out = Path(output) if output else default_output(trace_dir, fmt)
    progress = Progress("exporting", total_events(trace), stream=err)
    try:
        result = export(
            trace_dir, out, fmt, counters=specs, progress=progress.update, jobs=jobs, only=only
        )
    except OSError as exc:
        if failure := environment_failure(exc, out):
            raise failure from None
        raise CliError(f"{printable(str(out))}: cannot write: {exc.strerror or exc}") from None
    finally:
        progress.done()
    size = out.stat().st_size
    err.write(
        f"{prog}: wrote {printable(str(out))} ({human_size(size)}): {result.events:,} events, "
        f"{result.slices:,} slices, {result.instants:,} instants"
        + (f", {result.counters:,} counter values" if specs else "")
        + "\n"
    )
    if result.unfinished:
        err.write(
            f"{prog}: {result.unfinished:,} span(s) never ended (exception, thread or process "
            "ended): closed at their thread's last event, marked unfinished\n"
        )
    if result.unmatched:
        err.write(
            f"{prog}: {result.unmatched:,} end(s) without a begin: shown as instants "
            "'NAME.end (end without begin)'\n"
        )
    for name, n in result.skipped_values.items():
        err.write(
            f"{prog}: --counter {printable(name)}: {n:,} value(s) not a finite number, left out\n"
        )
    return _tail(trace, trace_dir, result.errors, err, prog)


def run_parquet(args: argparse.Namespace, err: IO[str], prog: str) -> int:
    """``--format parquet``: export, say what happened on ``err``; the exit code."""
    if args.counter or args.jobs is not None:
        what = "--counter" if args.counter else "--jobs"
        raise CliError(f"{what} goes with --format chrome or perfetto, not parquet", EXIT_USAGE)
    for given, name, fmt in _otlp_only(args):
        if given:
            raise CliError(f"{name} goes with --format {fmt}", EXIT_USAGE)
    from ..export import parquet

    try:
        parquet._pyarrow()
    except parquet.MissingPyarrow as exc:
        raise CliError(str(exc).partition(" (")[0], EXIT_ENVIRONMENT) from None
    trace = open_trace(args.trace, session=args.session, merge=args.all)
    only = [sub.path for sub in trace.subtraces]
    from . import _predicate
    from ._common import name_matcher

    predicate = _predicate(trace, args)
    warn_unmatched(trace, args.events, err)
    match = name_matcher(args.events)
    select = None
    if predicate is not None:  # -e is the reader's (names=): decoded only what passes

        def select(events: Any) -> Any:
            return (ev for ev in events if predicate(ev))

    out = Path(args.output) if args.output else default_output(args.trace, "parquet")
    if out.exists() and not out.is_dir():
        raise CliError(f"{printable(str(out))}: not a directory (parquet writes one)", EXIT_USAGE)
    progress = Progress("exporting", total_events(trace), stream=err)
    # The export holds up to BUFFERED_ROWS events (tuples and dicts: GC-tracked) and makes
    # no cycles: the collector's passes over them cost ~40% of a big export. This process
    # is the command's own, and does nothing else meanwhile.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        result = parquet.export_parquet(
            args.trace,
            out,
            layout=args.layout or "wide",
            only=only,
            select=select,
            names=match if args.events else None,
            progress=progress.update,
        )
    except OSError as exc:
        if failure := environment_failure(exc, out):
            raise failure from None
        raise CliError(f"{printable(str(out))}: cannot write: {exc.strerror or exc}") from None
    finally:
        if gc_was:
            gc.enable()
        progress.done()
    n, files, pids = len(result.tables), len(result.files), len(result.pids)
    err.write(
        f"{prog}: wrote {printable(str(out))} ({human_size(result.bytes)}): "
        f"{result.events:,} events, {n:,} table{'s' if n != 1 else ''}, "
        f"{files:,} file{'s' if files != 1 else ''}, {pids:,} process{'es' if pids != 1 else ''}\n"
    )
    return _tail(trace, args.trace, result.errors, err, prog)


def _otlp_only(args: argparse.Namespace) -> list[tuple[Any, str, str]]:
    return [
        (args.endpoint, "--endpoint", "otlp"),
        (args.timeout is not None, "--timeout", "otlp"),
        (args.retries is not None, "--retries", "otlp"),
    ]


def run_otlp(args: argparse.Namespace, err: IO[str], prog: str) -> int:
    """``--format otlp``: send, say what happened on ``err``; the exit code."""
    for given, name in (
        (args.output, "-o"),
        (args.counter, "--counter"),
        (args.jobs is not None, "--jobs"),
        (args.layout, "--layout"),
        (args.events, "-e"),
        (args.filter, "--filter"),
    ):
        if given:
            # A subset would cut spans in two (and orphan their children) at the backend.
            raise CliError(f"{name} does not go with --format otlp", EXIT_USAGE)
    if args.timeout is not None and not args.timeout > 0:
        raise CliError("--timeout must be more than 0 seconds", EXIT_USAGE)
    if args.retries is not None and args.retries < 0:
        raise CliError("--retries must be 0 or more", EXIT_USAGE)
    from ..export import otlp

    trace = open_trace(args.trace, session=args.session, merge=args.all)
    only = [sub.path for sub in trace.subtraces]
    options: dict[str, Any] = {}
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.retries is not None:
        options["retries"] = args.retries
    progress = Progress("sending", total_events(trace), stream=err)
    try:
        result = otlp.export_otlp(
            args.trace, endpoint=args.endpoint, only=only, progress=progress.update, **options
        )
    except otlp.Interrupted as stop:
        progress.done()
        _otlp_summary(stop.result, trace, args.trace, err, prog)
        err.write(
            f"{prog}: interrupted after {stop.result.events:,} events: the rest of the "
            "trace was not sent\n"
        )
        raise KeyboardInterrupt from None
    finally:
        progress.done()
    return _otlp_summary(result, trace, args.trace, err, prog)


def _otlp_summary(result: Any, trace: Any, trace_dir: str, err: IO[str], prog: str) -> int:
    """What ``--format otlp`` says at the end; the exit code."""
    err.write(
        f"{prog}: sent to {printable(result.traces_url)}: {result.spans:,} spans "
        f"({result.span_events:,} span events), {result.logs:,} log records, "
        f"{result.requests:,} requests; {result.events:,} events read\n"
    )
    if result.unfinished:
        err.write(
            f"{prog}: {result.unfinished:,} span(s) never ended (exception, thread or process "
            "ended): closed at their thread's last event, tracemark.unfinished=true\n"
        )
    if result.unmatched:
        err.write(
            f"{prog}: {result.unmatched:,} end(s) without a begin: sent as markers "
            "'NAME.end (end without begin)'\n"
        )
    code = _tail(trace, trace_dir, result.errors, err, prog)
    if result.complete:
        return code
    if result.spans_not_sent or result.logs_not_sent:
        batches = result.failed_batches
        err.write(
            f"{prog}: NOT SENT: {result.spans_not_sent:,} spans, {result.logs_not_sent:,} log "
            f"records ({batches:,} batch{'es' if batches != 1 else ''} failed)\n"
        )
    for reason, (spans, logs) in result.not_sent.items():
        err.write(f"{prog}: not sent: {spans:,} spans, {logs:,} log records: {printable(reason)}\n")
    if result.stopped is not None:
        err.write(
            f"{prog}: sending stopped after the retries (the rest of the trace was read and "
            "counted, not sent)\n"
        )
    if result.maybe_received:
        err.write(
            f"{prog}: a request timed out: the collector may have received it anyway "
            "(counted above as not sent)\n"
        )
    from .control import EXIT_REFUSED, EXIT_UNREACHABLE

    return EXIT_UNREACHABLE if result.stopped is not None else EXIT_REFUSED


def _tail(trace: Any, trace_dir: str, errors: list[str], err: IO[str], prog: str) -> int:
    """What every format says after its summary: losses, damage; the exit code."""
    discarded = trace.discarded
    if discarded:
        err.write(
            f"{prog}: WARNING: {discarded:,} events were discarded while recording (buffers full)\n"
        )
    from ._losses import loss_warnings

    for line in loss_warnings(trace_dir):
        err.write(f"{prog}: {line}\n")
    if errors:
        for line in errors:
            err.write(f"{prog}: not exported: corrupt trace: {printable(line)}\n")
        err.write(f"{prog}: the trace is damaged: everything that could be read was exported\n")
        return EXIT_CORRUPT
    return 0


def run(args: argparse.Namespace, err: IO[str]) -> int:
    if args.format == "parquet":
        return run_parquet(args, err, "tracemark export")
    if args.format == "otlp":
        return run_otlp(args, err, "tracemark export")
    for given, name, fmt in (
        (args.layout, "--layout", "parquet"),
        (args.events, "-e", "parquet"),
        (args.filter, "--filter", "parquet"),
        *_otlp_only(args),
    ):
        if given:
            raise CliError(f"{name} goes with --format {fmt}", EXIT_USAGE)
    if args.jobs is not None and args.jobs < 1:
        raise CliError("--jobs must be 1 or more", EXIT_USAGE)
    return run_export(
        args.trace,
        args.format,
        args.output,
        args.counter,
        err,
        "tracemark export",
        args.jobs,
        session=args.session,
        merge=args.all,
    )
