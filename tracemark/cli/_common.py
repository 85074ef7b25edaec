"""What every subcommand shares: exit codes, one-line errors, colour, width, progress, and
opening a trace.

Guarantees
----------
* A user error is a :class:`CliError`: :func:`tracemark.cli.main` prints it as one line
  (``tracemark view: error: ...``, plus a caret line for a filter) and returns its exit code;
  the user never sees a Python traceback for it.
* Colour only when the stream is a terminal, ``TERM`` is not ``dumb`` and ``NO_COLOR`` is
  unset or empty (https://no-color.org); progress only when stderr is a terminal.
* Output is laid out for 80 columns; on a wider or narrower terminal its width is used.
* **One recording at a time.** A trace directory may hold several unrelated recordings
  (sessions: a second program given the same ``DIR``, flight-recorder snapshots); every
  sub-trace names its session (:mod:`tracemark.tracers.recording.session`). A command that
  reads a directory of more than one (:func:`open_trace`) lists them (start, program,
  pids, events) and exits with the usage code, unless told ``--all`` (merge them all) or
  ``--session ID`` (a prefix of one id; ``none`` for sub-traces written before sessions,
  which form one session together); ``DIR/<pid>-<n>`` opens one process's sub-trace.
  :func:`sessions` is the one place they are grouped.
* Nothing a trace or a source tree holds can drive the terminal: every name, path and text
  from them is printed through :func:`printable`, which escapes control characters (C0, DEL,
  C1), line and paragraph separators and bidirectional-text controls, so a crafted thread
  name cannot forge a line, set the window title or reorder what is shown.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .._environment import environment_error, hint
from ..ctf import SchemaError, TraceError, read_trace
from ..ctf.reader import Trace

#: Exit codes, documented in ``tracemark --help``.
EXIT_OK = 0
EXIT_FOUND_ERRORS = 1  # list: marker declarations or call sites that do not match
EXIT_USAGE = 2  # unknown option, bad argument, bad filter expression
EXIT_NOT_TRACE = 3  # the path is missing or is not a trace directory
EXIT_CORRUPT = 4  # the trace is corrupt or truncated
EXIT_ENVIRONMENT = 5  # the machine: too many open files, disk full, permission denied
EXIT_NOT_FOUND = 127  # record: the program to run was not found (as a shell says)

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FOUND_ERRORS}    list: a marker call site or declaration is wrong
  {EXIT_USAGE}    usage error: unknown option, bad argument or --filter expression
  {EXIT_NOT_TRACE}    not a trace directory (or it does not exist), or a trace of a newer
       schema version than this tracemark reads (upgrade tracemark)
  {EXIT_CORRUPT}    corrupt or truncated trace (the message names file and offset)
  {EXIT_ENVIRONMENT}    the machine, not the trace: too many open files, disk full,
       permission denied (the message names the OS error, the path, what to do)
  6-9  ps, list PID, attach, detach, snapshot: see their --help; export
       --format otlp: 6 the collector refused some batches, 7 it could not be
       reached (sending stopped)
  {EXIT_NOT_FOUND}  record: the program to run was not found
  record otherwise returns the program's own exit code
       (128+N if the program was killed by signal N)"""


# C0 and DEL and C1 controls; U+061C, U+200E/F, U+202A-E, U+2066-9: bidirectional-text
# controls; U+2028/9: line and paragraph separators (line breaks to some terminals).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m[0]
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal, on one line: control characters, separators and
    bidirectional controls written as ``\\n``, ``\\x1b``, ``\\u2028``...; other text unchanged
    (the same object when there is nothing to escape: cheap on the common path)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def who(ev: Any) -> str:
    """Where an event was fired, printable: ``[pid thread]``, or ``[pid thread task]`` inside
    an asyncio task (the task's name; ``#ID`` for one without a name)."""
    task = getattr(ev, "task", None)
    where = f"{ev.pid} {ev.thread or ev.tid}"
    return printable(f"[{where} {task}]" if task is not None else f"[{where}]")


class CliError(Exception):
    """A user error: printed as one line (and ``detail`` lines after it), then exit ``code``."""

    def __init__(
        self, message: str, code: int = EXIT_USAGE, detail: str = "", *, prog: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.detail = detail
        self.prog = prog  # the (sub)command to name, when the caller does not know it


def wants_colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def width_of(stream: IO[str]) -> int:
    """Columns to lay out for: the terminal's, or 80 when not a terminal."""
    isatty = getattr(stream, "isatty", None)
    if isatty and isatty():
        return max(40, shutil.get_terminal_size((80, 24)).columns)
    return 80


class Style:
    """ANSI colours, or nothing at all."""

    _CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        codes = ";".join(self._CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"


class Progress:
    """A one-line progress counter on stderr, drawn only on a terminal, at most 10 times/s."""

    def __init__(self, label: str, total: int | None = None, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.label = label
        self.total = total
        self._last = 0.0
        self._drawn = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        text = f"{self.label}: {done:,} events"
        if self.total:
            text += f" ({min(100, 100 * done // self.total)}%)"
        self.stream.write("\r" + text[:79] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def done(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def wrap(self, events: Iterable[Any], every: int = 1 << 14) -> Iterator[Any]:
        """``events`` unchanged, counting them; the counter is erased at the end."""
        if not self.enabled:
            yield from events
            return
        try:
            n = 0
            for n, ev in enumerate(events, 1):
                if not n % every:
                    self.update(n)
                yield ev
        finally:
            self.done()


def name_matcher(globs: Sequence[str] | None) -> Callable[[str], bool]:
    """``match(name)`` for ``-e`` globs (all names when there are none), cached per name."""
    if not globs:
        return lambda name: True
    regex = re.compile("|".join(fnmatch.translate(g) for g in globs))
    cache: dict[str, bool] = {}

    def match(name: str) -> bool:
        hit = cache.get(name)
        if hit is None:
            hit = cache[name] = regex.match(name) is not None
        return hit

    return match


class Session:
    """One recording session of a trace directory: its sub-traces and what tells it apart."""

    def __init__(self, trace: Any, id: str | None, subtraces: list[Any]) -> None:
        self.id = id
        self.subtraces = subtraces
        self.pids = sorted({sub.pid for sub in subtraces})
        self.events = sum(s.events for sub in subtraces for s in sub.streams)
        starts = []
        for sub in subtraces:
            try:
                starts.append((Trace(trace.path, [sub]).start, sub))
            except (TraceError, OSError):  # damaged: reading it says so
                pass
        known = [(t, sub) for t, sub in starts if t is not None]
        self.start: int | None = min(t for t, _ in known) if known else None
        # The program: the command line of the process that recorded first (the root).
        first = min(known, key=lambda ts: ts[0])[1] if known else subtraces[0]
        env = first.env
        self.program = str(env.get("argv") or env.get("procname") or "?")

    @property
    def label(self) -> str:
        """How ``--session`` names it."""
        return self.id or "none"


def sessions(trace: Any) -> list[Session]:
    """The sessions of ``trace``, by start time: sub-traces grouped by the session id in
    their metadata; those written before sessions existed (no id) form one together."""
    groups: dict[str | None, list[Any]] = {}
    for sub in trace.subtraces:
        groups.setdefault(getattr(sub, "session", None), []).append(sub)
    found = [Session(trace, sid, subs) for sid, subs in groups.items()]
    return sorted(found, key=lambda s: (s.start is None, s.start or 0, s.label))


def session_table(found: Sequence[Session]) -> str:
    """The sessions as lines of text: id, start (local time), pids, events, program."""
    lines = [f"  {'SESSION':<16}  {'START':<19}  {'EVENTS':>9}  PIDS  PROGRAM"]
    for s in found:
        start = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.start // 10**9))
            if s.start is not None
            else "-"
        )
        pids = " ".join(map(str, s.pids[:6])) + (" ..." if len(s.pids) > 6 else "")
        program = printable(s.program)  # one line whatever the command line held
        lines.append(f"  {s.label:<16}  {start:<19}  {s.events:>9,}  {pids}  {program}")
    return "\n".join(lines)


def _one_session(trace: Any, path: str, session: str | None, merge: bool) -> Any:
    """``trace``, or the part of it that is session ``session``; a CliError when it holds
    several sessions and neither ``session`` nor ``merge`` says which (see the module)."""
    ids = {getattr(sub, "session", None) for sub in getattr(trace, "subtraces", ())}
    if session is None and (merge or len(ids) <= 1):
        return trace
    found = sessions(trace)
    if session is None:
        raise CliError(
            f"{path} holds {len(found)} unrelated recordings (sessions); pick one with "
            "--session ID (or view DIR/<pid>-<n>), or merge them with --all",
            EXIT_USAGE,
            session_table(found),
        )
    chosen = [s for s in found if s.label == session] or [
        s for s in found if s.id and s.id.startswith(session)
    ]
    if len(chosen) != 1:
        what = "no session" if not chosen else "more than one session"
        raise CliError(
            f"--session {session}: {what} of {path} is named so; its sessions:",
            EXIT_USAGE,
            session_table(found),
        )
    return Trace(trace.path, chosen[0].subtraces)


def add_session_args(p: Any) -> None:
    """``--all`` and ``--session ID``, for the commands that read a trace directory."""
    p.add_argument(
        "--all",
        action="store_true",
        help="a directory of several unrelated recordings (sessions): merge them all",
    )
    p.add_argument(
        "--session",
        metavar="ID",
        help="only this recording session of the directory (an id or its prefix; see --all)",
    )


def open_trace(path: str, *, session: str | None = None, merge: bool = True) -> Any:
    """The trace in directory ``path`` (``tracemark.ctf.read_trace``), or a CliError.

    ``merge=False``: a directory of several sessions is a CliError listing them (what the
    reading commands do unless ``--all``); ``session``: only that session's sub-traces
    (an id, a prefix of one, or ``none``)."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: no such trace directory", EXIT_NOT_TRACE)
    if not p.is_dir():
        raise CliError(f"{path}: not a trace directory (it is a file)", EXIT_NOT_TRACE)
    if not (p / "metadata").is_file() and not _holds_metadata(p):
        raise CliError(
            f"{path}: not a trace directory (no CTF 'metadata' file in it); "
            "make one with: tracemark record -- python app.py",
            EXIT_NOT_TRACE,
        )
    try:
        return _one_session(read_trace(path), path, session, merge)
    except TraceError as exc:
        if failure := environment_failure(exc, path):
            raise failure from None
        if isinstance(exc, SchemaError):
            # Not damage: a trace of a newer schema than this tracemark reads. Exit 3 (not a
            # trace this tracemark can read), not 4, which sends the user to recover it.
            raise CliError(str(exc), EXIT_NOT_TRACE) from None
        # A process that died while writing leaves a torn packet and its ring files: say
        # what mends it (recovery cuts the torn packet and writes what the rings hold).
        raise CliError(f"corrupt trace: {exc}{_recover_hint(path)}", EXIT_CORRUPT) from None
    except OSError as exc:
        if failure := environment_failure(exc, path):
            raise failure from None
        message = f"{path}: cannot read the trace: {exc.strerror or exc}"
        raise CliError(message, EXIT_NOT_TRACE) from None


def _holds_metadata(p: Path) -> bool:
    """Whether a ``metadata`` file is somewhere under ``p``; a directory the machine will not
    list (no file descriptor left, no permission) is that error, not "no trace here"."""

    def fail(exc: OSError) -> None:
        if environment_error(exc) is not None:
            raise exc

    return any("metadata" in files for _, _, files in os.walk(p, onerror=fail))


def environment_failure(exc: BaseException, path: str | Path = "") -> CliError | None:
    """A CliError (:data:`EXIT_ENVIRONMENT`) when ``exc`` comes from the machine, not from
    the trace (:func:`tracemark._environment.environment_error`): the OS error, the file it
    concerns (else ``path``) and what to do. None for anything else."""
    os_error = environment_error(exc)
    if os_error is None:
        return None
    where = os_error.filename if os_error.filename is not None else path
    name = errno.errorcode.get(os_error.errno or 0, "")
    text = f"{os_error.strerror or os_error}" + (f" [{name}]" if name else "")
    if where:
        text = f"{where}: {text}"
    return CliError(f"{text}; {hint(os_error)}", EXIT_ENVIRONMENT)


def _recover_hint(path: str) -> str:
    from ._losses import loss_warnings

    try:
        hints = [line for line in loss_warnings(Path(path)) if "tracemark recover" in line]
    except Exception:  # the hint is a courtesy: the error is said whatever happens here
        return ""
    return f"\n{hints[0]}" if hints else ""


def report_recovered(path: str | Path, err: IO[str], prog: str) -> list[Any]:
    """Recover the sub-traces of dead processes under ``path`` and say so on ``err``: one line
    for all that were recovered, one for each left alone or that failed."""
    from ..ctf import recover

    results = recover(path)
    done = [r for r in results if not r.live and not r.error and r.events]
    if done:
        n = len(done)
        err.write(
            f"{prog}: {n} process{'es' if n != 1 else ''} ended without stopping "
            f"{'their' if n != 1 else 'its'} recording (killed, crashed, os._exit()); "
            f"recovered {sum(r.events for r in done):,} events from "
            f"{'their' if n != 1 else 'its'} buffers\n"
        )
    for r in results:
        where = printable(str(r.path))
        if r.live:
            err.write(f"{prog}: {where}: still recording (its process is alive): left alone\n")
        elif r.error:
            err.write(f"{prog}: {where}: cannot recover: {printable(r.error)}\n")
        if r.outside:
            n = r.outside
            err.write(
                f"{prog}: WARNING: {where}: {n} sub-buffer{'s' if n != 1 else ''} had to be "
                "kept in memory, outside the ring files (the disk refused to reserve "
                f"{'them' if n != 1 else 'it'}): the events in {'them' if n != 1 else 'it'} "
                "when the process died are LOST, and how many is not known\n"
            )
    return results


def guarded(events: Iterable[Any]) -> Iterator[Any]:
    """``events`` with a TraceError met while streaming turned into a CliError."""
    try:
        yield from events
    except (TraceError, OSError) as exc:
        if failure := environment_failure(exc):
            raise failure from None
        if isinstance(exc, OSError):
            raise
        raise CliError(f"corrupt trace: {exc}", EXIT_CORRUPT) from None


def select(
    trace: Any, globs: Sequence[str] | None, predicate: Callable[[Any], bool] | None = None
) -> Iterator[Any]:
    """The events of ``trace`` whose name matches ``globs`` and that pass ``predicate``.
    A glob that matches no marker the trace declares is said on stderr, with the closest
    names (an empty result is never silent)."""
    warn_unmatched(trace, globs)
    match = name_matcher(globs)
    if not globs or not hasattr(trace, "subtraces"):
        events = guarded(trace.events())
    else:
        # Only the packets that hold a selected marker are decoded: the packet index says
        # which (built and saved here the first time; tracemark.ctf.index).
        events = guarded(trace.events(names=match, index=_index_of(trace)))
    if predicate is None and not globs:
        return events
    if predicate is None:
        return (ev for ev in events if match(ev.name))
    return (ev for ev in events if match(ev.name) and predicate(ev))


def unmatched_globs(
    names: Sequence[str], globs: Sequence[str] | None, where: str = "in this trace"
) -> list[str]:
    """Each glob of ``globs`` that matches none of ``names``, with the closest names:
    ``"-e 'db.qeury' matches no marker in this trace; closest: db.query"``."""
    import difflib

    out = []
    for glob in globs or ():
        if any(fnmatch.fnmatchcase(n, glob) for n in names):
            continue
        close = difflib.get_close_matches(glob, names, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        out.append(f"-e {glob!r} matches no marker {where}{hint}")
    return out


def warn_unmatched(trace: Any, globs: Sequence[str] | None, err: IO[str] | None = None) -> None:
    declared = getattr(trace, "markers", None)
    if not globs or not isinstance(declared, dict):
        return
    for line in unmatched_globs(sorted(declared), globs):
        (err or sys.stderr).write(f"tracemark: warning: {printable(line)}\n")


def _index_of(trace: Any) -> Any:
    """The packet index of ``trace`` (loaded, or built and saved), or None when it cannot be
    made: reading without it gives the same events."""
    from ..ctf.index import trace_index

    try:
        return trace_index(trace)
    except (OSError, TraceError):
        return None


def field_names(trace: Any, globs: Sequence[str] | None) -> set[str]:
    """Every field name of the markers of ``trace`` that ``globs`` select."""
    match = name_matcher(globs)
    names: set[str] = set()
    for marker, fields in getattr(trace, "markers", {}).items():
        if match(marker):
            names.update(f[0] if isinstance(f, tuple) else getattr(f, "name", f) for f in fields)
    return names


def field_types(trace: Any, globs: Sequence[str] | None) -> dict[str, set[str]]:
    """Field name -> the type names it has in the markers of ``trace`` that ``globs``
    select (``int``, ``str``, ...: the trace's own type names)."""
    match = name_matcher(globs)
    types: dict[str, set[str]] = {}
    for marker, fields in getattr(trace, "markers", {}).items():
        if match(marker):
            for f in fields:
                if isinstance(f, tuple) and len(f) == 2:
                    types.setdefault(f[0], set()).add(f[1])
    return types


def total_events(trace: Any) -> int | None:
    """How many events the trace holds, if its streams say so cheaply (for progress)."""
    try:
        counts = [s.events for s in trace.streams]
    except (AttributeError, TypeError):
        return None
    return sum(counts) if all(isinstance(c, int) for c in counts) else None


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(ns: int | None) -> str:
    if ns is None:
        return "-"
    s = ns / 1e9
    if s < 1e-3:
        return f"{ns / 1e3:.1f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"
