"""``tracemark ps``, ``list PID``, ``attach``, ``detach``, ``snapshot``: running processes.

They talk to processes that listen (:mod:`tracemark.control`: ``TRACEMARK_CONTROL=1``,
``TRACEMARK_FLIGHT=GLOB`` or ``tracemark.control.listen()``), over their private socket.

Guarantees
----------
* A process that cannot be reached is one line and an exit code: 7 when it does not exist,
  is not Python or does not listen, 8 when it belongs to another user (and we are not
  root); a request the target refuses (a probe that cannot be installed, a bad output
  directory) is exit code 6 with the target's reason.
* ``attach`` owns what it installs: ending it by Ctrl-C, ``--duration``, the target's exit,
  ``detach`` from elsewhere, or by being killed, removes its probes and stops its
  recording in the target (the target does that itself when the connection drops). It then
  prints ``record``'s summary. A target that dies while attached is reported, its trace
  recovered from the ring files (:func:`tracemark.ctf.recover`), and the exit code is 9.
* ``ps`` removes the sockets of processes that are gone (stale ones a killed process left).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from ._common import (
    EXIT_USAGE,
    CliError,
    Style,
    human_size,
    printable,
    wants_colour,
    width_of,
)

#: Exit codes of these commands (beside 0 and 2, usage).
EXIT_REFUSED = 6
EXIT_UNREACHABLE = 7
EXIT_PERMISSION = 8
EXIT_TARGET_DIED = 9

EXIT_HELP = f"""\
exit codes: 0 ok, 2 usage error, {EXIT_REFUSED} the target refused the request (its reason is
printed), {EXIT_UNREACHABLE} no such process, not Python, or not listening (start it with
TRACEMARK_CONTROL=1), {EXIT_PERMISSION} the process belongs to another user,
{EXIT_TARGET_DIED} attach: the target died while attached (its trace is recovered)."""


def add_parsers(sub: Any, positive: Any) -> None:
    ps = sub.add_parser(
        "ps",
        help="the Python processes that listen for tracemark (TRACEMARK_CONTROL=1)",
        description="List the processes that listen: pid, uptime, markers declared and\n"
        "active, recordings and probes installed, command line.",
        epilog=EXIT_HELP,
    )
    ps.add_argument("--json", action="store_true", help="one JSON document")

    att = sub.add_parser(
        "attach",
        help="record the markers of a running process, then leave it as it was",
        description=(
            "Install probes and start a recording in a running process that listens,\n"
            "show a live count of events, and on Ctrl-C, --duration or the end of the\n"
            "process, stop it, remove the probes and print what was recorded. If this\n"
            "command dies, the process removes them by itself."
        ),
        epilog=f"""\
examples:
  tracemark attach 4711 -e 'shop.*' --duration 10
  tracemark attach 4711 --probe 'json:loads%return' -o out/trace
  tracemark attach 4711 -e 'net.*' --live --filter 'len > 1500'

{EXIT_HELP}""",
    )
    att.add_argument("pid", type=int, metavar="PID")
    att.add_argument(
        "-o", "--output", metavar="DIR", help="trace directory (new or empty; default: new)"
    )
    att.add_argument(
        "-e", "--events", metavar="GLOB", action="append", help="markers to record (default: all)"
    )
    att.add_argument(
        "--probe", metavar="SPEC", action="append", default=[], help="a dynamic probe to install"
    )
    att.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    att.add_argument("--mode", choices=("discard", "overwrite"), default="discard")
    att.add_argument("--buffer", metavar="SIZE", help="buffer per thread, e.g. 256K or 4M")
    att.add_argument("--live", action="store_true", help="print the events as they happen")
    att.add_argument("--filter", metavar="EXPR", help="--live: only events where EXPR is true")
    att.add_argument("--top", type=positive, default=10, metavar="N", help="markers in summary")
    att.add_argument("--json", action="store_true", help="JSON: events (--live), then a summary")

    det = sub.add_parser(
        "detach",
        help="remove every probe and recording tracemark attach installed in a process",
        epilog=EXIT_HELP,
    )
    det.add_argument("pid", type=int, nargs="?", metavar="PID")
    det.add_argument("--all", action="store_true", help="every process that listens")
    det.add_argument("--json", action="store_true", help="one JSON document")

    snap = sub.add_parser(
        "snapshot",
        help="write what a process's flight recording holds now (TRACEMARK_FLIGHT=GLOB)",
        description=(
            "A process started with TRACEMARK_FLIGHT=GLOB (or that called\n"
            "tracemark.control.flight(GLOB)) keeps an overwrite-mode recording in memory;\n"
            "this writes its current buffers into DIR without stopping it."
        ),
        epilog=EXIT_HELP,
    )
    snap.add_argument("pid", type=int, metavar="PID")
    snap.add_argument("-o", "--output", metavar="DIR", help="where (default: a new directory)")
    snap.add_argument("--json", action="store_true", help="one JSON document")


def _client(pid: int) -> Any:
    from ..control.client import Unreachable, connect

    try:
        return connect(pid)
    except Unreachable as exc:
        code = EXIT_PERMISSION if exc.kind == "other-user" else EXIT_UNREACHABLE
        raise CliError(str(exc), code) from None


def _request(client: Any, op: str, **fields: Any) -> dict[str, Any]:
    try:
        return client.request(op, **fields)
    except RuntimeError as exc:
        raise CliError(f"process {client.pid} refused: {exc}", EXIT_REFUSED) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"process {client.pid}: {exc}", EXIT_UNREACHABLE) from None


def _all_dirs() -> list[Path]:
    """Our control directory; as root, every user's."""
    import glob
    import tempfile

    from ..control import paths

    dirs = [paths.socket_dir()]
    if os.geteuid() == 0:
        for d in sorted(
            glob.glob(os.path.join(tempfile.gettempdir(), "tracemark-*"))
            + glob.glob("/run/user/*/tracemark")
        ):
            if Path(d) not in dirs and os.path.isdir(d) and not os.path.islink(d):
                dirs.append(Path(d))
    return dirs


def listening_pids() -> list[int]:
    from ..control import paths

    pids: set[int] = set()
    for d in _all_dirs():
        paths.clean_stale(d)
        pids.update(pid for pid, _ in paths.listening(d))
    return sorted(pids)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ps(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    import shlex

    rows = []
    for pid in listening_pids():
        try:
            with _client(pid) as c:
                rows.append(_request(c, "info"))
        except CliError as exc:
            # one that ended while asked is no longer there, not an error
            if not _gone(pid, or_unlistened=True, wait=0.5):
                err.write(f"tracemark ps: {printable(exc.message)}\n")
    for r in rows:
        r.pop("ok", None)
    if args.json:
        out.write(json.dumps({"processes": rows}, indent=1) + "\n")
        return 0
    if not rows:
        err.write("tracemark ps: no process listens (start one with TRACEMARK_CONTROL=1)\n")
        return 0
    width = width_of(out) if out.isatty() else None  # piped: whole command lines
    out.write(
        f"{'PID':>7} {'UPTIME':>7} {'MARKERS':>7} {'ACTIVE':>6} {'REC':>3} {'PROBES':>6}  COMMAND\n"
    )
    for r in rows:
        line = (
            f"{r['pid']:>7} {_age(r['uptime']):>7} {r['markers']:>7} {r['active']:>6} "
            f"{r['recordings']:>3} {r['probes']:>6}  "
        )
        argv = [str(a) for a in r["argv"]]
        command = printable(shlex.join([os.path.basename(argv[0]), *argv[1:]] if argv else []))
        room = max(10, width - len(line)) if width else len(command)
        if len(command) > room:
            command = command[: room - 1] + "…"
        out.write(line + command + "\n")
    return 0


def list_pid(pid: int, as_json: bool, out: IO[str]) -> int:
    with _client(pid) as c:
        found = _request(c, "markers")["markers"]
    if as_json:
        out.write(json.dumps({"pid": pid, "markers": found}, indent=1) + "\n")
        return 0
    style = Style(wants_colour(out))
    for m in found:
        fields = ", ".join(f"{n}: {t}" for n, t in m["fields"]) or "no fields"
        state = style("active", "bold", "green") if m["active"] else "inactive"
        out.write(f"{style(printable(m['name']), 'bold')}  ({printable(fields)})  {state}\n")
        if m.get("doc"):
            out.write(f"    {printable(' '.join(m['doc'].split()))}\n")
        places = m.get("declared_at") or [m["where"]]
        out.write(f"    declared at {printable(', '.join(places))}\n")
        for s in m["sites"]:
            where = f"{s['where']} in {s.get('function', '')}: " if s["where"] else ""
            reason = f" ({s['reason']})" if s.get("reason") else ""
            out.write(f"    site {printable(where + s['mechanism'] + reason)}\n")
        faults = [
            f"{k.replace('_', ' ')} {m[k]}"
            for k in ("bad_arguments", "dropped_nested", "probe_errors")
            if m[k]
        ]
        if faults:
            out.write(style(f"    faults: {', '.join(faults)}", "red") + "\n")
    out.write(f"{len(found)} markers in process {pid}, {sum(m['active'] for m in found)} active\n")
    return 0


def detach(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    if args.all == (args.pid is not None):
        raise CliError("give a PID or --all (not both)", EXIT_USAGE)
    pids = listening_pids() if args.all else [args.pid]
    if not pids:
        err.write("tracemark detach: no process listens\n")
    done = {}
    code = 0
    for pid in pids:
        try:
            with _client(pid) as c:
                done[pid] = _request(c, "detach")["sessions"]
        except CliError as exc:
            if not args.all:
                raise
            err.write(f"tracemark detach: {printable(exc.message)}\n")
            if exc.code != EXIT_UNREACHABLE:  # gone or going meanwhile: nothing to detach
                code = exc.code
    if args.json:
        out.write(json.dumps({"detached": {str(p): n for p, n in done.items()}}) + "\n")
    else:
        for pid, n in done.items():
            out.write(f"process {pid}: {n} session{'s' if n != 1 else ''} detached\n")
    return code


def snapshot(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from .record import TRACES

    target = (
        Path(args.output)
        if args.output
        else TRACES / time.strftime(f"%Y%m%d-%H%M%S-snapshot-{args.pid}")
    )
    with _client(args.pid) as c:
        reply = _request(c, "snapshot", output=str(target.resolve()))
    path = Path(reply["path"])
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if args.json:
        out.write(json.dumps({"pid": args.pid, "path": str(path), "bytes": size}) + "\n")
    else:
        out.write(f"snapshot of process {args.pid}: {printable(str(path))} ({human_size(size)})\n")
        out.write(f"  view it: tracemark view {printable(str(path))}\n")
    return 0


# --- attach ---


def attach(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from . import _boot
    from .record import TRACES, check_probe_specs, parse_size

    check_probe_specs(args.probe)
    fields: dict[str, Any] = {}
    if args.buffer:
        fields["buffer"] = parse_size(args.buffer)
        if fields["buffer"] < _boot.SUBBUFFERS * _boot.MIN_SUBBUFFER:
            raise CliError(f"--buffer {args.buffer}: at least 16K", EXIT_USAGE)
    if args.duration is not None and args.duration <= 0:
        raise CliError("--duration: give seconds, more than 0", EXIT_USAGE)
    if args.filter and not args.live:
        raise CliError("--filter goes with --live (the trace itself is complete)", EXIT_USAGE)
    predicate = None
    if args.filter:
        from .filter import FilterError, compile_filter

        try:
            predicate = compile_filter(args.filter)
        except FilterError as exc:
            raise CliError(
                f"bad --filter at column {exc.column + 1}: {exc.message}", EXIT_USAGE, exc.pointer()
            ) from None
    trace_dir = (
        Path(args.output)
        if args.output
        else TRACES / time.strftime(f"%Y%m%d-%H%M%S-attach-{args.pid}")
    )
    trace_dir = trace_dir.resolve()
    if trace_dir.exists() and (not trace_dir.is_dir() or any(trace_dir.iterdir())):
        raise CliError(f"{trace_dir}: already exists and is not an empty directory", EXIT_USAGE)
    client = _client(args.pid)
    started = time.monotonic()
    interrupt = _Interrupt()
    try:
        reply = _request(
            client,
            "attach",
            output=str(trace_dir),
            events=args.events or [],
            probes=args.probe,
            mode=args.mode,
            live=bool(args.live),
            **fields,
        )
        session = _Watch(args, client, out, err, predicate)
        ended = session.run(started, interrupt)
    finally:
        interrupt.restore()
        client.close()
    return _finish(args, trace_dir, ended, session, reply, time.monotonic() - started, out, err)


class _Watch:
    """The attached connection: count, live events, and the end (Ctrl-C, duration, ...)."""

    def __init__(self, args: Any, client: Any, out: IO[str], err: IO[str], predicate: Any):
        self.args = args
        self.client = client
        self.out = out
        self.err = err
        self.predicate = predicate
        self.count = 0
        self.shown = 0
        self.not_shown = 0
        self.previous: int | None = None
        tty = getattr(err, "isatty", None)
        self.progress = bool(tty and tty()) and not (args.live and out.isatty())
        self.style = Style(wants_colour(out))
        self.width = width_of(out) if out.isatty() else None

    def run(self, started: float, interrupt: _Interrupt) -> dict[str, Any] | None:
        """The ``ended`` message, or None if the target went away without one."""
        deadline = None if self.args.duration is None else started + self.args.duration
        stop_deadline = None
        try:
            while True:
                now = time.monotonic()
                if stop_deadline is None and (
                    interrupt.hit or (deadline is not None and now >= deadline)
                ):
                    self.client.send("stop")
                    stop_deadline = now + 30
                if stop_deadline is not None and now > stop_deadline:
                    return None
                try:
                    msg = self.client.receive(timeout=0.1)
                except TimeoutError:
                    continue
                if msg is None:
                    return None
                op = msg.get("op")
                if op == "progress":
                    self.count = int(msg.get("events", 0))
                    self._draw()
                elif op == "events":
                    self._show(msg)
                elif op == "ended":
                    return msg
        except OSError:
            return None
        finally:
            self._erase()

    def _draw(self) -> None:
        if self.progress:
            self.err.write(f"\rattached to {self.args.pid}: {self.count:,} events\x1b[K")
            self.err.flush()

    def _erase(self) -> None:
        if self.progress:
            self.err.write("\r\x1b[K")
            self.err.flush()

    def _show(self, msg: dict[str, Any]) -> None:
        from .view import format_event, write_json

        self.not_shown += int(msg.get("not_shown", 0))
        events = []
        for e in msg.get("list", []):
            if not isinstance(e, dict):
                continue
            ev = SimpleNamespace(
                name=str(e.get("name")),
                pid=e.get("pid"),
                tid=e.get("tid"),
                thread=e.get("thread"),
                timestamp=int(e.get("timestamp", 0)),
                fields=e.get("fields") or {},
            )
            if self.predicate is None or self.predicate(ev):
                events.append(ev)
        if not events:
            return
        self._erase()
        if self.args.json:
            write_json(events, self.out)
        else:
            lines = []
            for ev in events:
                lines.append(format_event(ev, self.previous, width=self.width, style=self.style))
                self.previous = ev.timestamp
            self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.shown += len(events)


def _gone(pid: int, *, or_unlistened: bool = False, wait: float = 1.0) -> bool:
    """Whether ``pid`` has died (a zombie has), waiting a little: the connection drops a
    moment before a dying process is gone. ``or_unlistened``: a process whose socket is gone
    counts as gone too (it removes its socket as it exits)."""
    from ..control import paths
    from ..ctf.recovery import pid_alive

    deadline = time.monotonic() + wait
    while True:
        if not pid_alive(pid):
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return True
        except (OSError, IndexError):
            pass
        if or_unlistened and all(pid not in dict(paths.listening(d)) for d in _all_dirs()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class _Interrupt:
    """Ctrl-C and SIGTERM, while attached, ask the target to stop (and we wait for the
    summary) instead of raising: a stop half-sent would leave nothing to report."""

    def __init__(self) -> None:
        self.hit = False
        self.previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (tests call main() in a thread)
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.hit = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _finish(
    args: Any,
    trace_dir: Path,
    ended: dict[str, Any] | None,
    watch: _Watch,
    reply: dict[str, Any],
    elapsed: float,
    out: IO[str],
    err: IO[str],
) -> int:
    from ..ctf.index import index_trace
    from ._common import report_recovered
    from .record import summarize

    prog = "tracemark attach"
    code = 0
    if ended is None:
        if _gone(args.pid):
            err.write(
                f"{prog}: process {args.pid} died while attached; recovering its trace from "
                "the ring files\n"
            )
            code = EXIT_TARGET_DIED
        else:
            err.write(f"{prog}: process {args.pid} closed the connection without a summary\n")
            code = EXIT_UNREACHABLE
        report_recovered(trace_dir, err, prog)
        reason = "the target died" if code == EXIT_TARGET_DIED else "connection lost"
    else:
        reason = str(ended.get("reason"))
    if watch.not_shown:
        err.write(
            f"{prog}: {watch.not_shown:,} events were not shown live (this terminal was "
            "slower than the target); the trace has them all\n"
        )
    try:
        index_trace(trace_dir)
    except Exception:
        pass  # view reads without an index
    if args.json:
        out.write(
            json.dumps(
                {
                    "summary": {
                        "pid": args.pid,
                        "trace": str(trace_dir),
                        "reason": reason,
                        "probes": reply.get("probes", []),
                        "elapsed": round(elapsed, 3),
                        **((ended or {}).get("summary") or {}),
                    }
                }
            )
            + "\n"
        )
        return code
    style = Style(wants_colour(err))
    try:
        summarize(
            trace_dir,
            err,
            style,
            top=args.top,
            elapsed=elapsed,
            code=0,
            prog=prog,
            ran=f"attached {elapsed:.2f} s to process {args.pid}; ended: {printable(reason)}",
        )
    except CliError as exc:
        err.write(f"{prog}: {printable(exc.message)}\n")
        return code or exc.code
    return code


def main_for(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    sub = args.subcommand
    if sub == "ps":
        return ps(args, out, err)
    if sub == "attach":
        return attach(args, out, err)
    if sub == "detach":
        return detach(args, out, err)
    return snapshot(args, out, err)


__all__ = ["EXIT_PERMISSION", "EXIT_REFUSED", "EXIT_TARGET_DIED", "EXIT_UNREACHABLE"]
