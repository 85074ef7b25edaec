"""The ``tracemark`` command: record a program's markers, then look at the trace.

One module per subcommand: :mod:`.record`, :mod:`.view`, :mod:`.stats`, :mod:`.spans`,
:mod:`.export`, :mod:`.listing` (not ``list``: a submodule is an attribute of this
package, and would shadow the builtin here) and :mod:`.control` (``ps``, ``list PID``,
``attach``, ``detach``, ``snapshot``: running processes); :mod:`.filter` is the
``--filter`` language and :mod:`._common` what they share (exit codes, errors, colour,
progress). Standard library only (argparse).

Guarantees: every user error is one line on stderr (``tracemark view: error: ...``) and a
documented exit code (``tracemark --help``), never a traceback; a broken pipe
(``tracemark view DIR | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from ._common import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    CliError,
    Progress,
    Style,
    add_session_args,
    environment_failure,
    field_names,
    field_types,
    guarded,
    open_trace,
    printable,
    select,
    total_events,
    wants_colour,
    width_of,
)

__all__ = ["main"]

_EXAMPLES = """\
examples:
  tracemark record -- python app.py --port 8080   # record all markers of app.py
  tracemark view tracemark-traces/20260101-120000-app --filter 'len > 1500'
  tracemark stats tracemark-traces/20260101-120000-app -e 'net.*'
  tracemark spans tracemark-traces/20260101-120000-app --by endpoint
  tracemark export tracemark-traces/20260101-120000-app --format perfetto
  tracemark list src/                             # markers in the code, checked
  tracemark ps                                    # who has TRACEMARK_CONTROL=1
  tracemark attach 4711 -e 'net.*' --live         # trace a running process"""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line and help laid out for 80 columns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        width = min(80, shutil.get_terminal_size((80, 24)).columns)
        kwargs.setdefault(
            "formatter_class",
            lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=width),
        )
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)", EXIT_USAGE, prog=self.prog)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tracemark",
        description="Record the markers of a Python program into a CTF trace, and read it.",
        epilog=f"{_EXAMPLES}\n\n{EXIT_CODES_HELP}",
    )
    from .. import __version__
    from ..env import core, reader

    version = "tracemark {} (recording core: {}, {}; reader: {})".format(
        __version__, *core(), "c" if reader()[0] is not None else f"python, {reader()[1]}"
    )
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", parser_class=_Parser)

    rec = sub.add_parser(
        "record",
        help="run a Python program and record its markers",
        description=(
            "Run a Python program with a recording of its markers (all by default). Python\n"
            "processes it starts (subprocess, multiprocessing fork and spawn) are recorded\n"
            "into the same trace directory. Returns the program's exit code."
        ),
        epilog="""\
examples:
  tracemark record -- python app.py ARGS
  tracemark record -o out/trace -e 'net.*' -e 'db.*' app.py ARGS
  tracemark record --mode overwrite --buffer 4M -m mypackage.server --port 80
  tracemark record --export perfetto -o out/trace app.py  # + out/trace.pftrace
  tracemark record --otel http://otelcol:4318 app.py  # + live to OpenTelemetry

exit code: the program's own (128+N if killed by signal N); 127 if it cannot be
started; 2 for a usage error, or a --probe that cannot exist (unless
--probe-optional); 5 when the machine refuses (too many open files, disk full,
no permission) before the program starts, or --otel without OpenTelemetry.""",
    )
    rec.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="trace directory (new or empty; default: a new one under ./tracemark-traces/)",
    )
    rec.add_argument(
        "-e",
        "--events",
        metavar="GLOB",
        action="append",
        help="record the markers matching GLOB (repeatable; default: all)",
    )
    rec.add_argument(
        "--probe",
        metavar="SPEC",
        action="append",
        default=[],
        help="install a dynamic probe (repeatable): 'json:loads', '__main__:main' (the script's "
        "own function), 'app.py:42{rows}', 'pkg.mod:Class.method%%return'; a module not "
        "imported yet is probed when it is. Checked before the program starts: one that "
        "cannot exist is exit code 2",
    )
    rec.add_argument(
        "--probe-optional",
        action="store_true",
        help="a --probe that fails that check is a warning, and the program runs",
    )
    rec.add_argument(
        "--mode",
        choices=("discard", "overwrite"),
        default="discard",
        help="when buffers are full: drop new events and count them (discard, the default) "
        "or reuse the oldest packets (overwrite, a flight recorder)",
    )
    rec.add_argument(
        "--buffer", metavar="SIZE", help="buffer per thread, e.g. 256K or 4M (default: recorder's)"
    )
    rec.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="markers in the summary (10)"
    )
    rec.add_argument(
        "--export",
        choices=("chrome", "perfetto"),
        help="at the end, also write the trace as Chrome JSON or a Perfetto trace "
        "(see tracemark export)",
    )
    rec.add_argument(
        "--otel",
        metavar="ENDPOINT",
        nargs="?",
        const="",
        help="also send the markers live to an OpenTelemetry collector (OTLP/HTTP): spans "
        "as spans, other markers as span events (default endpoint: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318; give it as "
        "--otel=URL or --otel URL); needs pip install 'tracemark[otel]'",
    )
    rec.add_argument(
        "--export-output",
        metavar="FILE",
        help="the file --export writes (default: DIR.json or DIR.pftrace, beside DIR)",
    )
    rec.add_argument("-m", dest="module", metavar="MODULE", help="run library module as a script")
    rec.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM ARGS",
        help="python SCRIPT ARGS, or SCRIPT ARGS, or ARGS after -m MODULE",
    )

    view = sub.add_parser(
        "view",
        help="list the events of a trace in time order",
        description=(
            "List the events of a trace in time order: time, delta to the previous line,\n"
            "[pid thread] (or [pid thread task] inside an asyncio task), event name and\n"
            "fields."
        ),
        epilog="""\
filter expressions:
  comparisons (== != < <= > >= in, chained), and / or / not, + - * / // %,
  literals, field names, the event's name pid tid thread timestamp, task (the
  asyncio task's name, None outside one) and task_id,
  fields["name"] for a field called like one of those, the string methods
  .startswith() .endswith() .contains() .matches(GLOB) .lower() .upper()
  .strip(), and len() abs() str(). A field an event lacks matches nothing.

examples:
  tracemark view DIR --limit 20
  tracemark view DIR -e 'shop.*' --filter 'total > 100 and worker == "worker-1"'
  tracemark view DIR --filter 'name.startswith("net.") or pid != 4711' --json
  tracemark view DIR --filter 'task == "Task-7"'

exit codes: 0 ok, 2 usage or bad filter, 3 not a trace, 4 corrupt trace,
5 environment (too many open files, disk full, permission denied).""",
    )
    _trace_args(view)
    view.add_argument("--filter", metavar="EXPR", help="show only events where EXPR is true")
    view.add_argument("--limit", type=_positive, metavar="N", help="stop after N events")
    view.add_argument(
        "--wide",
        action="store_true",
        help="on a terminal, show every field whole (lines are cut to its width otherwise;"
        " output to a file or a pipe is never cut)",
    )
    view.add_argument("--json", action="store_true", help="one JSON object per line")

    stats = sub.add_parser(
        "stats",
        help="count events per marker, with field statistics and histograms",
        description=(
            "Per marker: count and rate; per numeric field min, mean, max, p50, p99\n"
            "and a log2 histogram; per other field the most frequent values."
        ),
        epilog="""\
examples:
  tracemark stats DIR
  tracemark stats DIR -e 'shop.order.*' --filter 'total > 50' --json
  tracemark stats DIR -e 'db.*' --by table     # per table

exit codes: 0 ok, 2 usage or bad filter, 3 not a trace, 4 corrupt trace,
5 environment (too many open files, disk full, permission denied).""",
    )
    _trace_args(stats)
    stats.add_argument("--filter", metavar="EXPR", help="count only events where EXPR is true")
    stats.add_argument(
        "--by",
        metavar="FIELD",
        help="figures per value of FIELD (markers without it are not grouped)",
    )
    stats.add_argument("--json", action="store_true", help="one JSON document")

    spans = sub.add_parser(
        "spans",
        help="the slowest spans, with what happened under each, and span durations",
        description=(
            "Pair NAME.begin/NAME.end (and probe .entry/.return) events into spans, per\n"
            "thread and asyncio task. Show the slowest spans, each with the spans and\n"
            "markers under it as a waterfall (offset from its start, duration, name and\n"
            "fields, indented by depth), then per span name: count, unfinished, p50,\n"
            "p99 and max duration. Listed are the outermost spans, or with --filter the\n"
            "spans that pass it and are not inside one that does. A span left open is\n"
            "closed at its thread's last event and marked unfinished; ends without a\n"
            "begin are counted."
        ),
        epilog="""\
a span filter sees:
  name (the span's, e.g. db.query), pid tid thread task task_id, timestamp (its start),
  duration (ms, float), unfinished (bool), and its fields: those of its begin
  event, plus those of its end event the begin has not (fields["x"] for a field
  called like one of the names above). The language is view's (see its help).

examples:
  tracemark spans DIR                           # the slowest requests, and where
  tracemark spans DIR --by endpoint --top 3
  tracemark spans DIR --filter 'name == "db.query" and duration > 5'
  tracemark spans DIR --json | jq '.slowest[0]'

exit codes: 0 ok, 2 usage or bad filter, 3 not a trace, 4 corrupt trace (what
was read before the damage is reported first), 5 environment (too many open files,
disk full, permission denied).""",
    )
    _trace_args(spans)
    spans.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="slowest spans listed (10)"
    )
    spans.add_argument(
        "--by", metavar="FIELD", help="durations per value of FIELD of the spans (per name)"
    )
    spans.add_argument("--filter", metavar="EXPR", help="only spans where EXPR is true")
    spans.add_argument("--json", action="store_true", help="one JSON document")
    from .export import add_parser as add_export

    add_export(sub)

    rcv = sub.add_parser(
        "recover",
        help="recover the events of processes that died while recording",
        description=(
            "A recording keeps its buffers in ring files (DIR/<pid>-<n>/.ring/) until it\n"
            "stops. A process that died first (SIGKILL, a crash, os._exit()) leaves them:\n"
            "this writes their events into the trace (tracemark record does it by itself).\n"
            "Processes still alive are left alone."
        ),
        epilog="exit codes: 0 ok (also when nothing was to be done), 3 not a directory,\n"
        "4 a ring file could not be read (it is left in place).",
    )
    rcv.add_argument("trace", metavar="DIR", help="a trace directory")

    lst = sub.add_parser(
        "list",
        help="find the markers declared in source code, and check their call sites",
        description=(
            "Find marker declarations and call sites by reading source (nothing is\n"
            "imported) and report call sites whose arguments do not fit the declaration.\n"
            "list PID: the markers live in a running process that listens (see ps)."
        ),
        epilog="""\
examples:
  tracemark list                 # the current directory
  tracemark list src/ tests/helpers.py
  tracemark list --markdown mylib/ > docs/markers.md   # a catalog for the docs
  tracemark list tracemark.demo  # a module or package, found on sys.path
  tracemark list 4711            # the markers live in process 4711 (see ps)

exit codes: 0 no errors, 1 errors found (printed as FILE:LINE:COL: error: ...),
2 usage error (e.g. no such file or module).""",
    )
    lst.add_argument(
        "targets", nargs="*", metavar="PATH|MODULE", help="files, directories or module names"
    )
    lst.add_argument(
        "--markdown",
        action="store_true",
        help="write the markers as a Markdown table (name, fields, doc, place): a catalog",
    )
    lst.add_argument("--json", action="store_true", help="list PID: one JSON document")
    from .control import add_parsers as add_control

    add_control(sub, _positive)
    return parser


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="DIR", help="a trace directory written by tracemark record")
    p.add_argument(
        "-e",
        "--events",
        metavar="GLOB",
        action="append",
        help="only the markers matching GLOB (repeatable)",
    )
    add_session_args(p)


def _predicate(
    trace: Any, args: argparse.Namespace, metadata: Sequence[str] | None = None
) -> Callable[[Any], bool] | None:
    """The compiled ``--filter`` (``metadata``: the names read as attributes, not fields)."""
    if not args.filter:
        return None
    from .filter import METADATA, FilterError, compile_filter

    known = field_names(trace, args.events) if getattr(trace, "markers", None) else None
    types = field_types(trace, args.events) if known is not None else None
    try:
        return compile_filter(args.filter, known, metadata=metadata or METADATA, field_types=types)
    except FilterError as exc:
        raise CliError(
            f"bad --filter at column {exc.column + 1}: {exc.message}", EXIT_USAGE, exc.pointer()
        ) from None


def _view(args: argparse.Namespace, out: IO[str]) -> int:
    from .view import write_json, write_text

    trace = open_trace(args.trace, session=args.session, merge=args.all)
    events = select(trace, args.events, _predicate(trace, args))
    _warn_losses(args.trace)
    tty = out.isatty()
    if not tty:  # progress only when it cannot mix with the listing
        events = Progress("reading", total_events(trace)).wrap(events)
    if args.json:
        from ..ctf.schema import exported_schema

        schema = exported_schema(getattr(trace, "subtraces", ()))
        write_json(events, out, limit=args.limit, schema=schema)
    elif tty:  # cut to the terminal's width unless --wide, coloured unless NO_COLOR
        style = Style(wants_colour(out))
        width = None if args.wide else width_of(out)
        write_text(events, out, limit=args.limit, width=width, style=style)
    else:
        write_text(events, out, limit=args.limit)
    return 0


def _stats(args: argparse.Namespace, out: IO[str]) -> int:
    from . import stats

    trace = open_trace(args.trace, session=args.session, merge=args.all)
    events = select(trace, args.events, _predicate(trace, args))
    progress = Progress("reading", total_events(trace))
    collected = stats.collect(progress.wrap(events), by=args.by, shapes=stats.shapes_of(trace))
    streams = list(getattr(trace, "streams", ()))
    start, end = next(guarded((trace.start, trace.end) for _ in (0,)))  # may decode, may fail
    info = {
        "path": args.trace,
        "start": start,
        "end": end,
        "discarded": trace.discarded,
        "processes": len({s.pid for s in streams}),
        "threads": len({(s.pid, tid) for s in streams for tid in s.tids}),
    }
    _warn_losses(args.trace)
    if args.json:
        out.write(stats.render_json(collected, by=args.by, **info))
    else:
        style = Style(wants_colour(out))
        out.write(stats.render_text(collected, style=style, by=args.by, **info))
    return 0


def _spans(args: argparse.Namespace, out: IO[str]) -> int:
    from . import spans

    trace = open_trace(args.trace, session=args.session, merge=args.all)
    predicate = _predicate(trace, args, spans.FILTER_NAMES)
    events = select(trace, args.events)
    progress = Progress("reading", total_events(trace))
    failed: list = []
    report = spans.collect(
        progress.wrap(events),
        top=args.top,
        by=args.by,
        predicate=predicate,
        on_error=failed,
        declared=set(getattr(trace, "markers", ())) or None,
    )
    report.filter = args.filter
    _warn_losses(args.trace)
    complete = not failed
    if args.json:
        out.write(spans.render_json(report, path=args.trace, complete=complete))
    else:
        width = width_of(out) if out.isatty() else None
        style = Style(wants_colour(out))
        text = spans.render_text(
            report, path=args.trace, width=width, style=style, complete=complete
        )
        out.write(text)
    if failed:
        out.flush()
        raise failed[0]  # a CliError from reading: one line, exit code 4
    return 0


def _recover(args: argparse.Namespace, err: IO[str]) -> int:
    from pathlib import Path

    from ._common import EXIT_CORRUPT, EXIT_NOT_TRACE, report_recovered

    if not Path(args.trace).is_dir():
        raise CliError(f"{args.trace}: no such trace directory", EXIT_NOT_TRACE)
    results = report_recovered(args.trace, err, "tracemark recover")
    if not results:
        err.write("tracemark recover: nothing to recover (no ring files left)\n")
    return EXIT_CORRUPT if any(r.error for r in results) else 0


def _warn_losses(trace_dir: str) -> None:
    """What the trace cannot show (events lost uncounted), on stderr: see :mod:`._losses`."""
    from ._losses import loss_warnings

    err = sys.stderr
    style = Style(wants_colour(err))
    for line in loss_warnings(trace_dir):
        err.write(style(f"tracemark: {line}", "bold", "red") + "\n")


def _list(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from .listing import run

    targets = args.targets
    if len(targets) == 1 and targets[0].isdigit() and not os.path.exists(targets[0]):
        from .control import list_pid  # list PID: the markers live in a running process

        return list_pid(int(targets[0]), args.json, out)
    if args.json:
        raise CliError("--json goes with list PID (a running process)", EXIT_USAGE)

    style = Style(wants_colour(out))
    return run(args.targets, out, err, width=width_of(out), style=style, markdown=args.markdown)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tracemark ARGS``; return the exit code."""
    out, err = sys.stdout, sys.stderr
    parser = build_parser()
    prog = "tracemark"
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        program: list[str] | None = None
        if argv[:1] == ["record"]:
            from .record import split_argv

            own, program = split_argv(argv[1:])
            argv = ["record", *own]
        args, extra = parser.parse_known_args(argv)
        if program is not None:
            args.program = program
        if args.subcommand is None:
            parser.print_help(out)
            return EXIT_USAGE
        prog = f"tracemark {args.subcommand}"
        if extra:
            raise CliError(f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
        if args.subcommand == "record":
            from .record import run as record

            return record(args, err, Style(wants_colour(err)))
        if args.subcommand == "view":
            return _view(args, out)
        if args.subcommand == "stats":
            return _stats(args, out)
        if args.subcommand == "spans":
            return _spans(args, out)
        if args.subcommand == "recover":
            return _recover(args, err)
        if args.subcommand == "export":
            from .export import run as export

            return export(args, err)
        if args.subcommand in ("ps", "attach", "detach", "snapshot"):
            from .control import main_for

            return main_for(args, out, err)
        return _list(args, out, err)
    except CliError as exc:
        err.write(f"{exc.prog or prog}: error: {printable(exc.message)}\n")
        if exc.detail:
            err.write("\n".join(map(printable, exc.detail.split("\n"))) + "\n")
        return exc.code
    except KeyboardInterrupt:
        err.write(f"{prog}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (| head): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not complain a second time.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:  # the machine's (too many open files, disk full), said as such
        if (failure := environment_failure(exc)) is None:
            raise
        err.write(f"{prog}: error: {printable(failure.message)}\n")
        return failure.code
