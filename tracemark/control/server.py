"""The control server: one daemon thread in the target, blocked in ``accept()``.

Started by :func:`listen` (``TRACEMARK_CONTROL=1`` at import of tracemark, or from code).
A process that never calls it has no thread, no socket, nothing.

Guarantees
----------
* **Idle costs nothing**: the thread sleeps in ``accept()`` without a timeout: no wake-up
  while nobody connects, and nothing on the markers' path changes (an opted-in process runs
  its markers and unprobed code exactly as one that did not opt in).
* **Only this user or root**: every connection's peer uid is read with ``SO_PEERCRED``; any
  other uid is closed at once and the refusal logged (logger ``tracemark.control``), on top
  of the 0700 directory and the 0600 socket (:mod:`.paths`).
* **Ownership**: what a client installs (probes, a recording: a *session*) belongs to its
  connection. When the connection ends, for any reason (``stop``, the client closing it,
  the client killed: the kernel closes it, so within one poll interval, 0.2 s), the
  session's recording is stopped, which flushes what it recorded, and its probes are
  removed: the target is as it was (probed functions back to their original code, markers
  back to inactive). ``detach`` ends every client's sessions. At the target's exit every
  session is ended and its client told so.
* **The program never notices a client**: requests are parsed by :mod:`.protocol` (bounded,
  JSON only); a malformed, oversized or unknown request is answered with an error and the
  connection closed; a request not complete within :data:`READ_TIMEOUT` seconds
  (slowloris) is closed; at most :data:`MAX_CLIENTS` connections are served at once (more
  are told so and closed), so the server's memory is bounded whatever clients send. Every
  failure in a handler ends that connection only.
* **Fork**: a forked child does **not** listen (it has no server thread and closes its copy
  of the parent's socket, which it never serves on nor removes); sessions inherited from the
  parent are ended in the child (their recordings stopped, probes removed), since their
  client cannot own them there. The child may call :func:`listen` to serve on a socket of
  its own (``<child pid>.sock``).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import shutil
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .._forksafe import fork_safe_rlock
from . import paths
from .protocol import (
    LineReader,
    ProtocolError,
    encode,
    parse_request,
)

__all__ = ["Server", "flight", "listen", "server"]

log = logging.getLogger("tracemark.control")

#: Seconds a client has to send a whole request line (slowloris bound).
READ_TIMEOUT = 5.0
#: Seconds an idle connection (no session) is kept between requests.
IDLE_TIMEOUT = 30.0
#: Connections served at once.
MAX_CLIENTS = 32
#: How often an attached connection is sent the event count (and checked for its end).
PROGRESS_INTERVAL = 0.2
#: Live mode: events held for the client between two sends; beyond, counted as not shown.
LIVE_BACKLOG = 10_000
#: Largest reply (markers of a big program); requests are bounded by MAX_MESSAGE.
MAX_REPLY = 16 * 1024 * 1024

_PEERCRED = struct.Struct("3i")

_lock = fork_safe_rlock()
_server: Server | None = None


def server() -> Server | None:
    """The running server of this process, or None."""
    return _server


def listen() -> Path:
    """Listen for ``tracemark`` commands (idempotent); return the socket's path.

    Raises :class:`~.paths.UnsafePath` (an OSError) when the control directory is not private,
    or OSError when the socket cannot be made; nothing is left listening then.
    """
    global _server
    with _lock:
        if _server is None or _server.pid != os.getpid():
            _server = Server()
            _server.start()
        return _server.path


class Session:
    """What one client installed: a recording and its probes (and a live feed)."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.recording: Any = None
        self.probes: list[Any] = []
        self.live: list[Any] | None = None  # the live feed's connections to the markers
        # Appended by firing threads, emptied by the connection's thread: deque's append and
        # popleft are atomic, so no event slips between a take and the next append.
        self.backlog: collections.deque = collections.deque()
        self.not_shown = 0
        self.reason: str | None = None
        self.summary: dict[str, Any] | None = None
        self.told = threading.Event()  # the client was sent "ended" (or is gone)
        self._lock = fork_safe_rlock()

    def count(self) -> int:
        """Events recorded so far (written, or in buffers): the live count."""
        rec = self.recording
        total = 0
        try:
            for ch in list(rec._all_channels()):
                total += ch.written + ch.count + sum(e for _, e, _ in list(ch.full))
        except Exception:  # a channel changing under us: the next count is right
            pass
        return total

    def feeder(self, earlier: list[str]) -> Any:
        """The live probe for one glob: it skips markers an ``earlier`` glob's probe shows,
        so an event matching two globs is shown once (the recorder's rule)."""
        import fnmatch

        seen: dict[str, bool] = {}

        def feed(marker: Any, args: tuple) -> None:
            name = marker.name
            mine = seen.get(name)
            if mine is None:
                mine = seen[name] = not any(fnmatch.fnmatchcase(name, g) for g in earlier)
            if mine:
                self.feed(marker, args)

        return feed

    def feed(self, marker: Any, args: tuple) -> None:
        """Keep the event for the client (bounded)."""
        if len(self.backlog) >= LIVE_BACKLOG:
            self.not_shown += 1
            return
        thread = threading.current_thread()
        self.backlog.append((time.time_ns(), thread.ident, thread.name, marker, args))

    def take(self) -> list[dict[str, Any]]:
        backlog = []
        popleft = self.backlog.popleft
        for _ in range(len(self.backlog)):
            backlog.append(popleft())
        pid = os.getpid()
        return [
            {
                "timestamp": ts,
                "name": marker.name,
                "pid": pid,
                "tid": tid,
                "thread": name,
                "fields": {f.name: _plain(v) for f, v in zip(marker.fields, args, strict=False)},
            }
            for ts, tid, name, marker, args in backlog
        ]

    def end(self, reason: str) -> dict[str, Any]:
        """Stop the recording (flushed) and remove the probes; idempotent, any thread."""
        from .. import unprobe
        from ..markers.registry import disconnect

        with self._lock:
            if self.summary is not None:
                return self.summary
            self.reason = reason
            for conn in self.live or ():
                disconnect(conn)
            summary: dict[str, Any] = {}
            if self.recording is not None:
                s = self.recording.stop()
                summary = {
                    "trace": str(s.trace_path),
                    "recorded": s.recorded,
                    "discarded": s.discarded,
                    "lost": s.lost,
                    "error": s.error,
                }
            for p in self.probes:
                try:
                    unprobe(p)
                except Exception as exc:  # never leave the others installed
                    log.warning("removing probe %s failed: %r", getattr(p, "name", p), exc)
            self.summary = summary
            return summary


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            return str(value)
        return value
    if isinstance(value, bytes):
        return value.hex()
    from ..markers.fields import show_value

    return show_value(value)


class Server:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.directory = paths.ensure_private_dir()
        self.path = paths.socket_path(self.pid, self.directory)
        self.started = time.time()
        self.sessions: dict[int, Session] = {}  # id(session) -> session
        self.clients = 0
        self.refused = 0
        self.closing = False
        self.flight: Any = None
        self._lock = fork_safe_rlock()
        self._ids = iter(range(1, 1 << 62))
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        try:  # a socket of an earlier process with our pid (pid reuse); lstat: no symlink
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))  # fails on anything already there (a planted symlink)
            os.chmod(self.path, 0o600)  # in our 0700 directory: nobody could reach it before
            sock.listen(MAX_CLIENTS)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, name="tracemark-control", daemon=True)
        self.thread.start()
        atexit.register(self.close, "the target is exiting")

    # --- accepting ---

    def _serve(self) -> None:
        sock = self.sock
        assert sock is not None
        while not self.closing:
            try:
                conn, _ = sock.accept()  # blocks: no wake-up while idle
            except OSError:
                if self.closing or sock.fileno() < 0:
                    return
                time.sleep(0.05)  # out of descriptors: do not spin
                continue
            try:
                self._admit(conn)
            except Exception as exc:  # a connection's trouble never ends the server
                log.warning("control connection failed: %r", exc)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        me = os.geteuid()
        if uid not in (me, 0):
            self.refused += 1
            log.warning(
                "tracemark control: refused a connection from pid %d uid %d: only uid %d or "
                "root may control this process",
                pid,
                uid,
                me,
            )
            conn.close()
            return
        with self._lock:
            busy = self.clients >= MAX_CLIENTS
            if not busy:
                self.clients += 1
        if busy:
            _send(conn, {"ok": False, "error": f"busy: {MAX_CLIENTS} clients already"})
            conn.close()
            return
        t = threading.Thread(
            target=self._client, args=(conn,), name="tracemark-control-client", daemon=True
        )
        try:
            t.start()
        except BaseException:
            with self._lock:
                self.clients -= 1
            raise

    # --- one client ---

    def _client(self, conn: socket.socket) -> None:
        reader = LineReader(conn)
        try:
            first = True
            while not self.closing:
                try:
                    line = reader.readline(READ_TIMEOUT if first else IDLE_TIMEOUT)
                except (ProtocolError, TimeoutError) as exc:
                    _send(conn, {"ok": False, "error": str(exc)})
                    return
                first = False
                if line is None:
                    return
                try:
                    req = parse_request(line)
                except ProtocolError as exc:
                    _send(conn, {"ok": False, "error": str(exc)})
                    return
                if req["op"] == "attach":
                    self._attach(conn, reader, req)
                    return
                try:
                    reply = self._answer(req)
                except (OSError, ValueError, RuntimeError) as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                _send(conn, reply)
        except OSError:
            pass  # the client went away
        except Exception as exc:
            log.warning("control request failed: %r", exc)
        finally:
            with self._lock:
                self.clients -= 1
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "info":
            return {"ok": True, **self.info()}
        if op == "markers":
            return {"ok": True, "markers": markers_of(req.get("pattern", "*"))}
        if op == "detach":
            ended = self.detach_all("detached by tracemark detach")
            return {"ok": True, "sessions": ended}
        if op == "snapshot":
            return {"ok": True, **self.snapshot(req.get("output"))}
        if op == "stop":
            return {"ok": False, "error": "stop: this connection has no session"}
        return {"ok": False, "error": f"{op}: not here"}

    def info(self) -> dict[str, Any]:
        from .. import markers, probes
        from ..tracers.recording import lifecycle

        infos = markers()
        return {
            "pid": self.pid,
            "argv": list(getattr(sys, "orig_argv", sys.argv)),
            "uptime": _uptime(self.started),
            "python": sys.version.split()[0],
            "markers": len(infos),
            "active": sum(1 for m in infos if m.active),
            "recordings": len(lifecycle.active),
            "probes": len(probes.probes()),
            "sessions": len(self.sessions),
            "refused": self.refused,
            "flight": self.flight is not None,
        }

    def detach_all(self, reason: str, wait: float = 0.0) -> int:
        """End every session; with ``wait``, give their clients that long to be told."""
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            s.end(reason)
        deadline = time.monotonic() + wait
        for s in sessions:
            s.told.wait(max(0.0, deadline - time.monotonic()))
        return len(sessions)

    # --- attach ---

    def _attach(self, conn: socket.socket, reader: LineReader, req: dict[str, Any]) -> None:
        session = Session(next(self._ids))
        # Listed before anything is installed, and installed under the session's lock: a
        # detach meanwhile waits for the install, then ends it (it cannot miss it).
        with self._lock:
            self.sessions[session.owner] = session
        try:
            with session._lock:
                reply = self._install(session, req)
        except Exception as exc:
            session.end("not attached")
            with self._lock:
                self.sessions.pop(session.owner, None)
            _send(conn, {"ok": False, "error": str(exc)})
            return
        try:
            if self.closing:  # the target began exiting while we installed
                session.end("the target is exiting")
            _send(conn, reply)
            interval = float(req.get("progress", PROGRESS_INTERVAL))
            interval = min(max(interval, 0.001), 1.0)
            while True:
                if session.summary is not None:
                    self._send_ended(conn, session)
                    return
                got = reader.poll(interval)
                if got is None:  # the client went away: its session with it
                    session.end("the client disconnected")
                    return
                if got is False:
                    _send(conn, {"op": "progress", "events": session.count()})
                    if session.live is not None and (session.backlog or session.not_shown):
                        self._send_live(conn, session)
                    continue
                try:
                    msg = parse_request(got)
                except ProtocolError as exc:
                    session.end(f"a bad request from the client ({exc})")
                    self._send_ended(conn, session)
                    return
                if msg["op"] == "stop":
                    session.end("stopped by the client")
                    if session.live is not None:
                        self._send_live(conn, session)
                    self._send_ended(conn, session)
                    return
                _send(conn, {"ok": False, "error": f"{msg['op']}: not on an attached connection"})
        except (OSError, ProtocolError, TimeoutError):
            session.end("the client disconnected")
        finally:
            session.end("the client disconnected")
            session.told.set()
            with self._lock:
                self.sessions.pop(session.owner, None)

    def _send_live(self, conn: socket.socket, session: Session) -> None:
        events = session.take()
        not_shown, session.not_shown = session.not_shown, 0
        for i in range(0, len(events), 200):
            _send(conn, {"op": "events", "list": events[i : i + 200]})
        if not_shown:
            _send(conn, {"op": "events", "list": [], "not_shown": not_shown})

    def _send_ended(self, conn: socket.socket, session: Session) -> None:
        _send(
            conn,
            {"op": "ended", "reason": session.reason, "summary": session.summary or {}},
        )

    def _install(self, session: Session, req: dict[str, Any]) -> dict[str, Any]:
        from .. import probes as _probes
        from .. import record

        mode = req.get("mode", "discard")
        if mode not in ("discard", "overwrite"):
            raise ValueError(f"mode must be discard or overwrite, not {mode!r}")
        events = list(req.get("events") or [])
        for glob in events:
            if not glob or glob != glob.strip():
                raise ValueError(f"bad event glob {glob!r}")
        kwargs: dict[str, Any] = {"mode": mode}
        buffer = req.get("buffer")
        if buffer is not None:
            from ..cli._boot import MIN_SUBBUFFER, SUBBUFFERS

            if buffer < SUBBUFFERS * MIN_SUBBUFFER or buffer > 1 << 32:
                raise ValueError(f"buffer of {buffer} bytes: give 16K to 4G")
            kwargs["subbuffer_size"] = max(MIN_SUBBUFFER, buffer // SUBBUFFERS // 8 * 8)
            kwargs["subbuffers"] = SUBBUFFERS
        output = paths.check_output_dir(req["output"])
        for spec in req.get("probes") or []:
            session.probes.append(_probes.install_spec(spec))  # ValueError with the reason
        if events:  # a probe's marker is recorded even when -e does not name it
            events += [p.name for p in session.probes if p.name not in events]
        session.recording = record(output, events or "*", **kwargs)
        if req.get("live"):
            from .. import connect

            globs = events or ["*"]
            session.live = []
            for i, glob in enumerate(globs):
                session.live.append(connect(glob, session.feeder(globs[:i]), reentrant=True))
        return {
            "ok": True,
            "trace": str(session.recording.trace_path),
            "probes": [p.name for p in session.probes],
        }

    # --- flight recorder ---

    def snapshot(self, output: str | None) -> dict[str, Any]:
        rec = self.flight
        if rec is None:
            raise RuntimeError(
                "no flight recording in this process (start it with TRACEMARK_FLIGHT=GLOB "
                "or tracemark.control.flight(GLOB))"
            )
        directory = rec.snapshot()
        if output:
            dest_dir = paths.check_output_dir(output)
            dest = dest_dir / f"{self.pid}-{directory.name}"
            shutil.move(str(directory), str(dest))
            directory = dest
        return {"path": str(directory)}

    # --- the end ---

    def close(self, reason: str = "the target is exiting") -> None:
        """End every session (clients are told why), stop listening, remove the socket."""
        if self.pid != os.getpid():
            return
        self.detach_all(reason, wait=1.0)  # each client gets its summary before we go
        self.closing = True
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
            except OSError:
                pass
            sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        rec, self.flight = self.flight, None
        if rec is not None:
            try:
                rec.stop()
            finally:
                shutil.rmtree(rec.path, ignore_errors=True)

    def forget_in_child(self) -> None:
        """A fork child: not the parent's server (see the module docstring)."""
        self.closing = True
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()  # closes our copy only: the parent goes on listening
        for s in list(self.sessions.values()):
            try:
                s.end("the process forked: the child does not keep a client's session")
            except Exception as exc:
                log.warning("ending a session in a fork child failed: %r", exc)
        self.sessions.clear()
        rec, self.flight = self.flight, None
        if rec is not None:
            try:
                rec.stop()  # the child's part of it: the parent keeps its own
            except Exception:
                pass


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    data = encode(message, MAX_REPLY)
    conn.settimeout(READ_TIMEOUT)  # a client that does not read is dropped, not waited for
    conn.sendall(data)


def _uptime(fallback_start: float) -> float:
    """Seconds since this process started (from /proc), else since it began listening."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return max(0.0, time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() - fallback_start


def markers_of(pattern: str) -> list[dict[str, Any]]:
    """``tracemark.markers(pattern)`` as plain data."""
    from .. import markers

    out = []
    for m in markers(pattern):
        sites = []
        for s in m.sites:
            if isinstance(s, str):
                sites.append({"where": "", "mechanism": s, "reason": ""})
            else:
                sites.append(
                    {
                        "where": getattr(s, "where", ""),
                        "function": getattr(s, "function", ""),
                        "mechanism": getattr(s, "mechanism", str(s)),
                        "reason": getattr(s, "reason", ""),
                    }
                )
        out.append(
            {
                "name": m.name,
                "fields": [[f.name, f.type.__name__] for f in m.fields],
                "fmt": m.fmt,
                "where": m.where,
                "declared_at": list(m.declared_at),
                "doc": m.doc,
                "active": m.active,
                "probes": len(m.probes),
                "sites": sites,
                "bad_arguments": m.bad_arguments,
                "dropped_nested": m.dropped_nested,
                "probe_errors": m.probe_errors,
            }
        )
    return out


def flight(events: str | list[str] = "*", *, buffer: int | None = None) -> Any:
    """Keep an overwrite-mode recording of ``events`` in memory (a flight recorder) that
    ``tracemark snapshot PID`` writes out without stopping it; listens if not yet.

    Its ring files are in the private control directory (``flight-<pid>/``), removed at
    exit. Returns the :class:`~tracemark.Recording`. Idempotent: a second call returns the
    first recording.
    """
    from .. import record

    listen()
    srv = _server
    assert srv is not None
    with _lock:
        if srv.flight is None:
            kwargs: dict[str, Any] = {"mode": "overwrite"}
            if buffer:
                kwargs["subbuffer_size"] = max(4096, buffer // 4 // 8 * 8)
                kwargs["subbuffers"] = 4
            srv.flight = record(srv.directory / f"flight-{srv.pid}", events, **kwargs)
        return srv.flight


def _after_fork_in_child() -> None:
    global _server
    srv, _server = _server, None
    if srv is not None:
        srv.forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
