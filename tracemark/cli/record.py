"""``tracemark record [options] -- python SCRIPT ARGS`` (or ``SCRIPT ARGS``, ``-m MODULE ARGS``):
run a program with a recording of its markers, then say what was recorded.

How the whole process tree is recorded
--------------------------------------
The program runs as a child process whose environment carries the recording settings
(:mod:`._boot`) and whose ``PYTHONPATH`` starts with a directory holding a
``sitecustomize.py``. Python runs that file at start-up in the program and in every Python
process the program starts (``subprocess``, ``multiprocessing`` spawn and forkserver, since
they inherit the environment), and it starts ``tracemark.record(DIR, ...)`` there. A forked
child carries on the recording of its parent into its own sub-trace (the recorder's rule).
Each process writes its own sub-directory of DIR, so the processes never share a file.

Guarantees
----------
* The program's exit code is returned (128+N when a signal N killed it); tracemark's own
  failures never change it, except that a program which cannot be started is exit code 127.
* The trace is written even when the program crashes: an uncaught exception still runs the
  interpreter's exit, which stops and flushes the recording; a process that dies outright
  (SIGKILL, SIGSEGV, ``abort()``, ``os._exit()``) leaves its buffers in ring files, which are
  recovered once the program has ended (:mod:`tracemark.ctf.recovery`; processes it left
  still recording get a few seconds to end first), and the summary says how many events
  were recovered. Killed while the kernel was copying a packet into a file, a process may
  leave part of one: tracemark cuts such torn tails from the streams of processes that are
  gone, and says so (babeltrace2 refuses a whole trace with one).
* Then the trace's packet index is built (:mod:`tracemark.ctf.index`), outside the traced
  program as LTTng's consumer daemon builds its ``index/``: ``tracemark view -e NAME`` reads
  only the packets that hold NAME.
* Ctrl-C goes to the program (it shares the terminal), not to tracemark, which waits for the
  program and then reports. SIGTERM sent to tracemark is passed on to the program.
* Every ``--probe`` is checked before the program starts (:func:`check_probe_specs`): one
  that cannot exist is exit code 2 and nothing runs or is created, unless
  ``--probe-optional``. In the program's processes a probe on a module not imported yet is
  deferred (installed on import); the summary lists the probes no process installed, with
  why.
* The summary goes to stderr, so the program's stdout can still be piped.
* Nothing is lost silently: events that could not be written (disk full) and processes
  that ended without stopping their recording (``os._exit``, a crash, a kill: their
  buffered events are gone) are warned about, from the recorder's status files.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..ctf import TraceError, cut_partial_packets, read_trace
from ..ctf.index import index_trace
from ..ctf.recovery import pid_alive
from ..probes import parse_spec
from . import _boot
from ._common import (
    EXIT_ENVIRONMENT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CliError,
    Progress,
    Style,
    environment_failure,
    human_duration,
    human_size,
    printable,
    report_recovered,
    total_events,
)

SITE_DIR = Path(__file__).with_name("_site")
TRACES = Path("tracemark-traces")
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b)?\Z", re.I)


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``1MiB``, ``4096``: bytes (K = 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise CliError(f"--buffer {text!r}: give a size like 256K, 4M or 65536", EXIT_USAGE)
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[m[2].lower()]


# record's options that take a value: what follows them is not the program yet.
_WITH_VALUE = {
    "-o",
    "--output",
    "-e",
    "--events",
    "--probe",
    "--mode",
    "--buffer",
    "--top",
    "--export",
    "--export-output",
}


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``record``'s own options, and the program's command line (from ``--``, ``-m MODULE``
    or the first word that is not an option). argparse alone would take the program's
    options (``-m pkg --port 80``) for record's own."""
    argv = list(argv)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1 :]
        if word == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if word.startswith("-m") and not word.startswith("--"):  # -mpackage.module
            return argv[: i + 1], argv[i + 1 :]
        if word in _WITH_VALUE:
            i += 2
        elif word == "--otel" and "://" in (argv[i + 1] if i + 1 < len(argv) else ""):
            i += 2  # --otel URL; a bare --otel before the program takes no value
        elif word.startswith("-") and word != "-":
            i += 1
        else:
            return argv[:i], argv[i:]
    return argv, []


def program_argv(module: str | None, command: Sequence[str]) -> list[str]:
    """The argv to run: ``-m MODULE ARGS``, ``SCRIPT.py ARGS`` or any command line."""
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if module:
        return [sys.executable, "-m", module, *command]
    if not command:
        raise CliError("nothing to record: give a program, e.g. -- python app.py", EXIT_USAGE)
    first = command[0]
    if first.endswith(".py") or (os.path.isfile(first) and not os.access(first, os.X_OK)):
        if not os.path.isfile(first):
            raise CliError(f"{first}: no such file", EXIT_NOT_FOUND)
        return [sys.executable, *command]
    if os.sep in first or (os.altsep and os.altsep in first):
        if not (os.path.isfile(first) and os.access(first, os.X_OK)):
            raise CliError(f"{first}: program not found", EXIT_NOT_FOUND)
    elif shutil.which(first) is None:
        raise CliError(f"{first}: program not found", EXIT_NOT_FOUND)
    _check_script(command)
    return command


_PYTHON = re.compile(r"python[0-9.]*\Z")
#: Interpreter options that take the next argument as their value.
_OPTION_VALUES = {"-X", "-W", "--check-hash-based-pycs"}


def _python_main(command: Sequence[str]) -> tuple[str, str] | None:
    """``("script", PATH)`` or ``("module", NAME)`` for ``python [options] SCRIPT|-m NAME``,
    None for another program, ``-c`` code or stdin."""
    if not command or not _PYTHON.match(Path(command[0]).name):
        return None
    args = iter(command[1:])
    for arg in args:
        if arg == "-m":
            name = next(args, None)
            return ("module", name) if name else None
        if arg.startswith("-m") and len(arg) > 2:
            return "module", arg[2:]
        if arg in ("-c", "-") or (arg.startswith("-c") and len(arg) > 2):
            return None  # code or stdin: no script file
        if arg in _OPTION_VALUES:
            next(args, None)
        elif not arg.startswith("-"):
            return "script", arg
    return None


def _check_script(command: Sequence[str]) -> None:
    """``python [options] SCRIPT ...`` with a SCRIPT that does not exist is an error before
    anything runs or is created (else: a trace directory of nothing, and the program's
    error above the summary)."""
    main = _python_main(command)
    if main is not None and main[0] == "script" and not os.path.exists(main[1]):
        raise CliError(
            f"{main[1]}: no such file (the script {command[0]} would run)", EXIT_NOT_FOUND
        )


def default_dir(argv: Sequence[str], now: float | None = None) -> Path:
    """A new directory under ./tracemark-traces/, named after the time and the program."""
    words = [a for a in argv[1:] if not a.startswith("-")] or [argv[0]]
    stem = Path(words[0]).name.removesuffix(".py")
    stem = re.sub(r"[^\w.-]+", "_", stem)[:40] or "trace"
    base = TRACES / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{stem}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def environment(
    trace_dir: Path,
    events: Sequence[str],
    mode: str,
    buffer: int | None,
    probes: Sequence[str],
    base: dict[str, str] | None = None,
    otel: str | None = None,
) -> dict[str, str]:
    """The environment of the recorded program (``otel``: the endpoint to send to live)."""
    env = dict(os.environ if base is None else base)
    for key in (_boot.ENV_BUFFER, _boot.ENV_PROBES, _boot.ENV_OTEL):
        env.pop(key, None)
    if otel:
        env[_boot.ENV_OTEL] = otel
    env[_boot.ENV_DIR] = str(trace_dir.resolve())
    env[_boot.ENV_EVENTS] = ",".join(events) if events else "*"
    env[_boot.ENV_MODE] = mode
    if buffer:
        env[_boot.ENV_BUFFER] = str(buffer)
    if probes:
        env[_boot.ENV_PROBES] = "\n".join(probes)
    env[_boot.ENV_HOME] = str(Path(__file__).resolve().parents[2])
    # One session for the whole process tree: every recorded process names it in its
    # metadata, so view tells this run from others in the same directory.
    from ..tracers.recording.session import ENV_SESSION, new_session_id

    env[ENV_SESSION] = new_session_id()
    # Recorded processes listen for tracemark attach/ps too (TRACEMARK_CONTROL=0: not).
    env.setdefault("TRACEMARK_CONTROL", "1")
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(SITE_DIR) + (os.pathsep + path if path else "")
    return env


def check_probe_specs(
    specs: Sequence[str],
    argv: Sequence[str] | None = None,
    *,
    optional: bool = False,
    err: IO[str] | None = None,
) -> list[str]:
    """Check every ``--probe`` before the program starts, not in each of its processes: a bad
    spec is a usage error; a target that cannot exist (no such module, function or line with
    code, found without importing anything: :mod:`tracemark.probes.static`) too, unless
    ``optional`` (then a warning on ``err``). Returns the specs as the program gets them:
    ``__main__`` and relative paths made the absolute path of the file. Without ``argv``
    (``attach``: the program runs already, with its own ``sys.path``) only the syntax."""
    from ..probes import static
    from ..probes.spec import format_spec

    main, search = _main_file(argv or ())
    out = []
    for spec in specs:
        if "\n" in spec:
            raise CliError(f"--probe {spec!r}: a spec is one line", EXIT_USAGE)
        try:
            parsed = parse_spec(spec)
        except ValueError as exc:
            raise CliError(f"--probe {spec}: {exc}", EXIT_USAGE) from None
        if argv is None:
            out.append(spec)
            continue
        try:
            target = static.check(parsed.target, parsed.capture, main=main, search=search)
        except ValueError as exc:
            if not optional:
                raise CliError(
                    f"--probe {spec}: {exc} (--probe-optional records without it)", EXIT_USAGE
                ) from None
            if err is not None:
                err.write(f"tracemark record: warning: --probe {printable(spec)}: {exc}\n")
            target = parsed.target
        out.append(format_spec(target, parsed.at, parsed.capture))
    return out


def _main_file(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The file the program runs as ``__main__`` (None: not a Python script or module found),
    and where its top-level imports are looked for first."""
    from ..probes.static import locate

    main = _python_main(argv)
    if main is None:
        return None, []
    kind, value = main
    if kind == "script":
        file = os.path.abspath(value)
        return (file if os.path.isfile(file) else None), [os.path.dirname(file)]
    cwd = os.getcwd()
    try:
        file = locate(value, [cwd])
        if os.path.basename(file) == "__init__.py":  # python -m PACKAGE runs its __main__
            file = locate(value + ".__main__", [cwd])
    except ValueError:
        return None, [cwd]
    return file or None, [cwd]


def run(args: Any, err: IO[str], style: Style) -> int:
    argv = program_argv(args.module, args.program)
    otel_endpoint(getattr(args, "otel", None))  # before anything runs or is created
    probes = check_probe_specs(
        args.probe, argv, optional=getattr(args, "probe_optional", False), err=err
    )
    buffer = parse_size(args.buffer) if args.buffer else None
    if buffer is not None and buffer < _boot.SUBBUFFERS * _boot.MIN_SUBBUFFER:
        raise CliError(
            f"--buffer {args.buffer}: at least {_boot.SUBBUFFERS * _boot.MIN_SUBBUFFER >> 10}K "
            f"({_boot.SUBBUFFERS} sub-buffers of {_boot.MIN_SUBBUFFER >> 10}K)",
            EXIT_USAGE,
        )
    trace_dir = Path(args.output) if args.output else default_dir(argv)
    if trace_dir.exists() and (not trace_dir.is_dir() or any(trace_dir.iterdir())):
        raise CliError(
            f"{trace_dir}: already exists and is not an empty directory; "
            "choose another -o DIR or leave -o out",
            EXIT_USAGE,
        )
    try:
        trace_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if failure := environment_failure(exc, trace_dir):
            raise failure from None
        raise CliError(f"{trace_dir}: cannot create the trace directory: {exc.strerror}") from None
    otel = otel_endpoint(getattr(args, "otel", None))
    env = environment(trace_dir, args.events or ["*"], args.mode, buffer, probes, otel=otel)
    started = time.monotonic()
    code = _run_child(argv, env)
    elapsed = time.monotonic() - started
    for path, cut in cut_torn_tails(trace_dir):
        err.write(
            f"tracemark record: {printable(str(path))}: cut the last {cut:,} bytes, part of a "
            "packet its process left when it was killed while writing\n"
        )
    _wait_for_recordings(trace_dir, RECORDINGS_GRACE)
    report_recovered(trace_dir, err, "tracemark record")
    index_trace(trace_dir)  # like LTTng's consumer daemon: view -e then reads only what it shows
    try:
        summarize(trace_dir, err, style, top=args.top, elapsed=elapsed, code=code)
    except CliError as exc:  # the program ran: its exit code matters more than ours
        err.write(f"tracemark record: {printable(exc.message)}\n")
    if otel:
        summarize_otel(trace_dir, err, style)
    if getattr(args, "export", None):  # after recovery: the recovered events are exported too
        from .export import run_export

        try:
            run_export(str(trace_dir), args.export, args.export_output, [], err, "tracemark record")
        except CliError as exc:  # likewise: reported, the program's exit code kept
            err.write(f"tracemark record: export: {printable(exc.message)}\n")
    return code


def otel_endpoint(value: str | None) -> str | None:
    """``--otel``'s endpoint (None without ``--otel``; the default when given bare), after
    checking that OpenTelemetry is installed: exit code 5 naming the extra if not."""
    if value is None:
        return None
    import importlib.util

    needed = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    try:
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
    except ImportError:  # a parent package missing
        missing = list(needed)
    if missing:
        raise CliError(
            f"--otel needs OpenTelemetry ({', '.join(missing)} is not installed): "
            "pip install 'tracemark[otel]'",
            EXIT_ENVIRONMENT,
        )
    if value and "://" not in value:
        raise CliError(f"--otel {value}: not a URL like http://collector:4318", EXIT_USAGE)
    # The bridge's default (tracemark.tracers.otel.default_endpoint), not imported for it:
    # OpenTelemetry's import costs this process a tenth of a second for one line.
    default = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return (value or default).rstrip("/")


def summarize_otel(trace_dir: Path, err: IO[str], style: Style) -> None:
    """What the processes' OpenTelemetry bridges sent (their ``.tracemark-otel-PID`` files),
    with a warning for what did not arrive."""
    import json

    totals: Counter[str] = Counter()
    endpoints = set()
    processes = 0
    unstopped = []
    for f in sorted(trace_dir.glob(f"{_boot.OTEL_FILE}*")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if data.get("stopped") is False:  # written at start and never again
            unstopped.append(data.get("pid"))
            continue
        processes += 1
        endpoints.add(str(data.get("endpoint")))
        for key, value in data.items():
            if type(value) is int and key != "pid":
                totals[key] += value
    if not processes:
        if not unstopped:
            err.write(
                style("  WARNING: OpenTelemetry: no process reported what it sent", "bold", "red")
                + "\n"
            )
        _unstopped_warning(unstopped, err, style)
        return
    to = ", ".join(sorted(endpoints))
    made = totals["spans_made"]
    err.write(
        f"  OpenTelemetry: {made:,} span{'s' if made != 1 else ''} sent live to "
        f"{printable(to)} from {processes} process{'es' if processes != 1 else ''}: "
        f"{totals['spans_sent']:,} sent"
        + (f", {totals['events']:,} span events" if totals["events"] else "")
        + "\n"
    )
    lost = totals["spans_failed"] + totals["spans_dropped"]
    if lost:
        err.write(
            style(
                f"  WARNING: OpenTelemetry: {lost:,} spans NOT sent ({totals['spans_failed']:,} "
                f"refused or failed, {totals['spans_dropped']:,} dropped: queue full or "
                "collector too slow at exit)",
                "bold",
                "red",
            )
            + "\n"
        )
    _unstopped_warning(unstopped, err, style)


def _unstopped_warning(unstopped: list, err: IO[str], style: Style) -> None:
    """The processes whose bridge said it started and never that it stopped."""
    if unstopped:  # pids sorted as text: a file may hold anything
        n = len(unstopped)
        pids = ", ".join(str(p) for p in sorted(unstopped, key=str)[:10])
        err.write(
            style(
                f"  WARNING: OpenTelemetry: {n} process{'es' if n != 1 else ''} ({pids}"
                f"{', ...' if n > 10 else ''}) ended without stopping the bridge (os._exit(), "
                "a crash or a kill): the spans still queued there were NOT sent, and are in no "
                "count here",
                "bold",
                "red",
            )
            + "\n"
        )


def _run_child(argv: list[str], env: dict[str, str]) -> int:
    try:
        child = subprocess.Popen(argv, env=env)
    except OSError as exc:
        raise CliError(f"{argv[0]}: cannot run it: {exc.strerror or exc}", EXIT_NOT_FOUND) from None
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the program handles Ctrl-C

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous_term = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
    return 128 - code if code < 0 else code


#: How long to wait, after the program ended, for processes it left behind that still record
#: (a multiprocessing forkserver and its workers end a moment after their parent): this long
#: after the last one of them ended, and RECORDINGS_GRACE_MAX in all. A daemon that goes on
#: recording is left alone (and named) after RECORDINGS_GRACE; processes that are still
#: ending one by one (on a loaded machine, seconds apart) are waited for.
RECORDINGS_GRACE = 3.0
RECORDINGS_GRACE_MAX = 15.0


def _wait_for_recordings(trace_dir: Path, grace: float, most: float = RECORDINGS_GRACE_MAX) -> None:
    from ..ctf import recovery

    start = time.monotonic()
    deadline = start + grace
    live = None
    while time.monotonic() < deadline:
        now_live = sum(1 for s in recovery.pending(trace_dir) if recovery.is_live(s))
        if not now_live:
            return
        if live is not None and now_live < live:  # one ended: the rest may be ending too
            deadline = min(time.monotonic() + grace, start + most)
        live = now_live
        time.sleep(0.05)


def cut_torn_tails(trace_dir: Path) -> list[tuple[Path, int]]:
    """Cut the half-written last packet a killed process may leave in its stream files
    (only of processes that have ended: a live one may still be appending)."""
    cut = []
    for sub in sorted(trace_dir.glob("*-*")):
        pid = sub.name.split("-", 1)[0]
        if pid.isdigit() and (sub / "metadata").is_file() and not pid_alive(int(pid)):
            try:
                cut += cut_partial_packets(sub)
            except OSError:
                pass  # unreadable: the summary reports what it can read
    return cut


def summarize(
    trace_dir: Path,
    err: IO[str],
    style: Style,
    *,
    top: int,
    elapsed: float,
    code: int,
    prog: str = "tracemark record",
    ran: str | None = None,
) -> None:
    """Print what the recording holds: events per marker, discarded, duration, size, path.

    ``prog`` names the command; ``ran`` replaces "program ran N s, exit code C" (attach)."""
    from ._common import guarded

    size = sum(f.stat().st_size for f in trace_dir.rglob("*") if f.is_file())
    if next(trace_dir.rglob("metadata"), None) is None:
        err.write(
            f"{prog}: no trace was written to {printable(str(trace_dir))} "
            "(was it a Python program? did it start?)\n"
        )
        return
    try:
        trace = read_trace(str(trace_dir))
        progress = Progress("reading the trace", total_events(trace), err)
        counts = Counter(ev.name for ev in progress.wrap(guarded(trace.events())))
    except TraceError as exc:
        if failure := environment_failure(exc, trace_dir):
            raise failure from None
        raise CliError(f"the trace is damaged: {exc}") from None
    total = sum(counts.values())
    processes = len({s.pid for s in trace.streams})
    duration = (
        trace.end - trace.start if trace.start is not None and trace.end is not None else None
    )
    status = f"exit code {code}" if code >= 0 else "killed"
    ran = ran or f"program ran {elapsed:.2f} s, {status}"
    err.write(
        style(f"{prog}:", "bold")
        + f" {total:,} events from {processes} process{'es' if processes != 1 else ''}"
        f" in {human_duration(duration)} ({ran})\n"
    )
    if trace.discarded:
        err.write(
            style(
                f"  WARNING: {trace.discarded:,} events were DISCARDED (buffers full)",
                "bold",
                "red",
            )
            + "\n  record fewer markers (-e GLOB) or give more buffer (--buffer 4M)\n"
        )
    _warn_losses(trace_dir, err, style)
    _say_waited(trace_dir, err)
    for line in _unmatched_globs(trace_dir, set(getattr(trace, "markers", ()))):
        err.write(style(f"  WARNING: {printable(line)}", "bold", "red") + "\n")
    for line in _probes_not_installed(trace_dir):
        err.write(style(f"  WARNING: {printable(line)}", "bold", "red") + "\n")
    # One width for the whole column, however long the names (probes' are long): aligned.
    width = max((len(printable(n)) for n, _ in counts.most_common(top)), default=0)
    for name, count in counts.most_common(top):
        err.write(f"  {printable(name):<{width}} {count:>12,}\n")
    if len(counts) > top:
        rest = total - sum(c for _, c in counts.most_common(top))
        err.write(f"  ({len(counts) - top} more markers, {rest:,} events)\n")
    err.write(f"  trace: {printable(str(trace_dir))} ({human_size(size)})\n")
    err.write(f"  view it: tracemark view {printable(_quote(str(trace_dir)))}\n")


def _unmatched_globs(trace_dir: Path, in_trace: set[str]) -> list[str]:
    """The -e globs that no process of the recording declared a marker for: no event class
    of the trace (``in_trace``) matches them, and every process that stopped normally said
    so in its status, with the closest names it had (a process that crashed said nothing:
    its trace's event classes speak for it)."""
    import fnmatch

    from ..ctf.status import read_status

    per_process = []
    for sub in sorted(p for p in trace_dir.iterdir() if p.is_dir()):
        status = read_status(sub)
        if status is not None and isinstance(status.get("unmatched"), list):
            per_process.append({g: close for g, close in status["unmatched"]})
    if not per_process:
        return []
    lines = []
    for glob in per_process[0]:
        if glob == "*":  # the default: a program without markers says so by its 0 events
            continue
        if any(fnmatch.fnmatchcase(name, glob) for name in in_trace):
            continue
        if all(glob in unmatched for unmatched in per_process):
            closest = sorted({n for unmatched in per_process for n in unmatched[glob]})[:3]
            hint = f"; closest: {', '.join(closest)}" if closest else ""
            lines.append(f"-e {glob!r} matched no marker the program declared{hint}")
    return lines


def _probes_not_installed(trace_dir: Path) -> list[str]:
    """The ``--probe`` specs that no process of the recording installed, with why (from the
    state files :mod:`._boot` writes)."""
    import json

    why: dict[str, list[str]] = {}
    installed: set[str] = set()
    for path in sorted(trace_dir.glob(_boot.PROBES_FILE + "*")):
        if path.name.endswith(".tmp"):
            continue
        try:
            data = json.loads(path.read_text())
            states = [(p["spec"], p["state"], p["why"]) for p in data["probes"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for spec, state, reason in states:
            if state == "installed":
                installed.add(spec)
            else:
                why.setdefault(spec, [])
                if reason and reason not in why[spec]:
                    why[spec].append(reason)
    return [
        f"--probe {spec} was never installed: {'; '.join(reasons) or 'no reason given'}"
        for spec, reasons in why.items()
        if spec not in installed
    ]


def _say_waited(trace_dir: Path, err: IO[str]) -> None:
    """How long the program waited for its trace to be written, when it did (1 ms or more)."""
    from ._losses import waited_seconds

    waited = waited_seconds(trace_dir)
    if waited >= 0.001:
        err.write(
            f"  the program waited {waited * 1000:,.0f} ms in all for its trace to be written "
            "(the disk was slower than it; at most 20 ms at once and 5% of its time, beyond "
            "which events are discarded)\n"
        )


def _warn_losses(trace_dir: Path, err: IO[str], style: Style) -> None:
    """Events lost without a count in the trace, processes that never stopped recording."""
    from ._losses import loss_warnings

    for line in loss_warnings(trace_dir):
        err.write(style(f"  {line}", "bold", "red") + "\n")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
