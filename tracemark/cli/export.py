"""``tracemark export DIR --format chrome|perfetto [-o FILE] [--counter NAME.FIELD]``: the
trace as a file timeline viewers load (:mod:`tracemark.export`); ``--format parquet [-o OUT/]
[--layout wide|long] [-e GLOB] [--filter EXPR]``: as Parquet tables for query engines
(:mod:`tracemark.export.parquet`, the ``tracemark[parquet]`` extra).

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

exit codes: 0 ok, 2 usage error, 3 not a trace, 4 corrupt trace (what could be
read is exported; the rest is listed on stderr), 5 the machine's (too many open
files, disk full, permission denied: never called a corrupt trace)."""


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
        "--format", "-f", required=True, choices=(*FORMATS, "parquet"), help="the file format"
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
    for given, name in ((args.layout, "--layout"), (args.events, "-e"), (args.filter, "--filter")):
        if given:
            raise CliError(f"{name} goes with --format parquet", EXIT_USAGE)
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
