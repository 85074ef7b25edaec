"""The session: :func:`record`, :class:`Recording` and its :class:`RecordingSummary`.

A recording (LTTng's session) connects one probe per glob of ``events`` to the markers,
gives each thread that fires one a :class:`~.channel.Channel` per nesting level, and owns
the sub-trace directory ``DIR/<pid>-<n>/``: ``metadata`` (every event class, declared at
start or appended before its marker can fire), the stream files (written by the
:mod:`.consumer`), the status file (:mod:`tracemark.ctf.status`) and ``.ring/``
(:mod:`.recovery`).

Guarantees
----------
* **Start and stop are each one step.** Every marker of a recording starts at one instant
  (its first packet opens once all are bound; earlier events are not inside it). A stop()
  that an exception interrupted is finished by the next call; a SIGTERM during stop() is
  acted on after it (main thread) or waits for it (another thread): the trace is written
  once, whole.
* **Faults never break the program**: an unwritable directory or a full disk stops the
  writing, counts every event that could not be written, and is reported once. Those
  counts, which no packet on disk can carry, go to the status file, reserved at start and
  written over in place at stop (so even on a full disk); until a clean stop it says
  ``recording``, so a process that ended without one is known. ``tracemark record`` /
  ``view`` / ``stats`` warn about both.
* **Values that cannot be recorded** (an int beyond 64 bits, a repr that raises) are counted
  as discarded and reported once.
* **Channels are reused**: a thread that ended leaves its channel (and stream) to the next
  thread that needs one, so streams are bounded by the threads alive at once.
* **Overwrite mode** (flight recorder): nothing is written until :meth:`Recording.snapshot`
  or stop; the newest ``subbuffers`` packets per channel are kept.
* **Every sub-trace names its session** (metadata env ``session_id``, with ``argv``, the
  command line of its process): the recordings of one program's process tree share one id,
  so a reader can tell them from unrelated recordings that share the directory (a second
  program given the same ``DIR``, a flight recorder's snapshots). The id is
  :envvar:`TRACEMARK_SESSION` when set (``tracemark record`` sets it for the program, so
  every process it starts, spawned or forked, joins), else one made at random once per
  process, which fork children keep (:func:`session_id`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid as _uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import faults
from ..._forksafe import fork_safe_rlock
from ...ctf import status as _status
from ...ctf import writer as W
from ...ctf.schema import tracer_env
from ...markers import registry
from ...markers.dispatch import MAX_NESTING
from . import lifecycle, tasks
from .channel import Channel, chain, ended
from .consumer import Consumer
from .generated import make_probe
from .recovery import RingDir, recover_dead_siblings

__all__ = [
    "ENV_SESSION",
    "SUBBUFFERS",
    "SUBBUFFER_SIZE",
    "Recording",
    "RecordingSummary",
    "record",
    "session_id",
]

#: The environment variable naming the session a process's recordings belong to.
ENV_SESSION = "TRACEMARK_SESSION"
_VALID_SESSION = re.compile(r"[0-9A-Za-z_.-]{1,64}\Z")
_own_session: str | None = None


def new_session_id() -> str:
    """A random session id (16 hex digits)."""
    return _uuid.uuid4().hex[:16]


def session_id() -> str:
    """The session this process records in: :data:`ENV_SESSION` if it holds a valid id,
    else an id made once per process (a fork child keeps its parent's: it is memory)."""
    global _own_session
    given = os.environ.get(ENV_SESSION, "")
    if _VALID_SESSION.match(given):
        return given
    if _own_session is None:
        _own_session = new_session_id()
    return _own_session


def _argv() -> str:
    """This process's command line, for telling sessions apart (at most 300 characters)."""
    import shlex

    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[:1] = [Path(str(argv[0])).name] if argv else []  # python3.12, not its whole path
    text = shlex.join(str(a) for a in argv)
    return text if len(text) <= 300 else text[:297] + "..."


#: Default sub-buffer (packet) size and count per channel: at most 8 MiB of memory per thread
#: (allocated as needed: a thread that fires a little holds one sub-buffer; the ring file
#: reserves the 8 MiB on disk). What sets it is how long the consumer thread may go without
#: running: the C core fires ~10M events/s of 37 bytes (~400 MB/s) from one thread, and on a
#: loaded 2-CPU machine with a 4 ms scheduler tick the consumer, woken at once, waited 4-18 ms
#: for a CPU (benchmarks/RESULTS.md, issue 14). 8 sub-buffers (2 MiB, ~5 ms of such firing)
#: lost 0.01-3% of the events then; 32 (~21 ms) lost none.
SUBBUFFER_SIZE = 256 * 1024
SUBBUFFERS = 32

_VALUE_ERRORS = (struct.error, OverflowError, TypeError, ValueError)


@dataclass
class RecordingSummary:
    """What a recording did, returned by :meth:`Recording.stop`."""

    #: The directory given to :func:`record` and this process's sub-trace in it.
    path: Path
    trace_path: Path
    #: Events written to the trace.
    recorded: int = 0
    #: Events counted in ``events_discarded``: buffers full, values that did not fit.
    discarded: int = 0
    #: Events in packets that could not be written (disk full, unwritable directory).
    lost: int = 0
    #: Events overwritten in overwrite mode (not in any snapshot).
    overwritten: int = 0
    #: Stream files written.
    streams: int = 0
    #: Why writing stopped early, if it did.
    error: str | None = None
    #: How long firing threads waited for the native consumer to give a sub-buffer back
    #: rather than discard events (seconds; at most 20 ms at once, 5% of the time in all).
    waited_s: float = 0.0
    snapshots: list[Path] = field(default_factory=list)


class Recording:
    """A recording session: markers matching ``events`` into a CTF trace under ``path``.

    Made by :func:`record`, already started. Use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        events: str | Iterable[str] = "*",
        *,
        mode: str = "discard",
        subbuffer_size: int = SUBBUFFER_SIZE,
        subbuffers: int = SUBBUFFERS,
    ) -> None:
        if mode not in ("discard", "overwrite"):
            raise ValueError(f"mode must be 'discard' or 'overwrite', not {mode!r}")
        if subbuffer_size < 4096 or subbuffer_size % 8:
            raise ValueError(
                f"subbuffer_size must be a multiple of 8 of at least 4096, not {subbuffer_size}"
            )
        if subbuffers < 2:
            raise ValueError(f"subbuffers must be at least 2, not {subbuffers}")
        self.path = Path(path)
        self.patterns = [events] if isinstance(events, str) else list(events)
        if not self.patterns:
            raise ValueError("events must name at least one marker glob")
        self.mode = mode
        self.overwrite = mode == "overwrite"
        self.subbuffer_size = subbuffer_size
        self.nbufs = subbuffers
        self.running = False
        self._stopping = False
        self.summary: RecordingSummary | None = None
        # Slow paths only, re-entrant for signal handlers, reset in a fork child: registering
        # event classes and channels, which the firing threads do, so it is never held
        # across I/O (the consumer has its own lock for that).
        self._reg_lock = fork_safe_rlock()
        self._connections: list[registry.Connection] = []
        # Stopping: one thread at a time does it (another thread's stop() waits for it); the
        # thread doing it, so that a signal handler re-entering stop() on it does not wait
        # for itself.
        self._stop_lock = fork_safe_rlock()
        self._stop_owner: int | None = None
        self._status_fd = -1
        self._final_snapshot = False

    # --- life cycle ---

    def start(self) -> Recording:
        """Create the sub-trace directory, write the metadata, connect to the markers."""
        if self.running:
            raise RuntimeError("this recording is already running")
        if self._stopping:
            raise RuntimeError("a stopped recording does not start again; call record() anew")
        # (marker name, fields) -> event id: a name forgotten and declared again with other
        # fields (a probe removed, then one with other captures) is another event class.
        self._classes: dict[tuple[str, Any], int] = {}
        # The event classes' metadata text, in pieces: a program may declare thousands of
        # markers, and one string grown by += would be copied whole for each (quadratic).
        self._classes_text: list[str] = []
        self.session = session_id()  # kept by a fork child (see the module docstring)
        # Declared first, in every trace: the task switch event (see .tasks).
        self._event_class(W.TASK_EVENT, W.TASK_FIELDS)
        self.task_event_id = self._classes[W.TASK_EVENT, W.TASK_FIELDS]
        tasks.install()  # count running asyncio loops from now on (once per process)
        self._setup_process()
        lifecycle.active.add(self)
        lifecycle.install_handlers()
        # One connection per glob; a marker matching several globs is recorded once, by the
        # first one that matches it (the others map it to None). Until every marker is bound,
        # ``running`` is False: an event fired meanwhile opens no packet and is ignored (it
        # is before the recording's start), so that no marker of the recording starts
        # before another (a thread firing two of them alternately shows no gap).
        try:
            for i, pattern in enumerate(self.patterns):
                earlier = self.patterns[:i]
                self._connections.append(
                    registry.connect(pattern, make_probe(self, earlier), reentrant=True)
                )
        except BaseException:  # interrupted (a signal handler raised): stopped, then raise
            self.stop()
            raise
        self.running = True  # the start instant: every packet opens after it
        return self

    def _setup_process(self) -> None:
        """Everything that is per process: run at start and again in a fork child."""
        self.pid = os.getpid()
        self.trace_uuid = _uuid.uuid4().bytes
        self._instances = itertools.count()
        self._channels: list[Channel] = []  # every level-0 channel, in use or spare
        self._spare: list[Channel] = []  # channels of ended threads, flushed, to reuse
        try:
            self._tls.__dict__.clear()  # a fork child: the forking thread's channel is gone
        except AttributeError:
            self._tls = threading.local()
        self._lost = 0
        self._error: str | None = None
        self._snapshots: list[Path] = []
        self.consumer = Consumer(self)  # a fork child's own: a new thread and new locks
        self.trace_path = self.path / f"{self.pid}-?"
        self.trace_path = self._make_trace_dir()
        self._fill = memoryview(b"\xff" * self.subbuffer_size)  # see Channel.switch
        self._open_status()
        offset = time.time_ns() - time.monotonic_ns()
        env = {
            "domain": "ust",
            # tracer_name/_major/_minor/_patchlevel, the schema version (tracemark.ctf.schema)
            **tracer_env(),
            "hostname": socket.gethostname(),
            "procname": _procname(),
            "vpid": self.pid,
            "python": sys.version.split()[0],
            "session_id": self.session,
            "argv": _argv(),
        }
        # Event classes survive a fork: the packers already compiled carry their ids.
        pieces = [W.metadata_preamble(self.trace_uuid, offset, env), *self._classes_text]
        # The registry's cores, not markers(): that also asks every site how it is served,
        # which costs O(sites) per marker (tens of ms for 1,000 markers: an attach waits).
        cores = sorted(registry.iter_cores(), key=lambda c: c.name)
        for pattern in self.patterns:
            match = re.compile(fnmatch.translate(pattern)).match
            for core in cores:
                if match(core.name) and (core.name, core.fields) not in self._classes:
                    pieces.append(self._event_class(core.name, core.fields, core.doc))
        self._metadata_parts = pieces
        text = "".join(pieces)
        self.rings = RingDir(self.trace_path, self.subbuffer_size, self.nbufs, self.overwrite)
        self.rings.open(text)
        if not self.overwrite and self._error is None:
            self._write_metadata(self.trace_path, text, "w")
        if not self.overwrite:
            self.consumer.start()

    def _make_trace_dir(self) -> Path:
        """``DIR/<pid>-<n>``, the first that does not exist yet. If it cannot be made, the
        recording still runs (the program must not notice) and counts every event as lost."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for n in itertools.count():
                candidate = self.path / f"{self.pid}-{n}"
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                return candidate
        except OSError as exc:
            self._fail(f"cannot create the trace directory in {self.path}: {exc}")
        return self.path / f"{self.pid}-0"

    def stop(self) -> RecordingSummary:
        """Stop recording, write everything still buffered, and return the summary.

        Stopping twice returns the same summary. Stopping is all or nothing: a stop() that an
        exception interrupted (one a signal handler raised) is finished by the next call
        (at the latest the one at exit), every step of it being idempotent. A SIGTERM that
        arrives while the main thread is stopping is acted on when the stop is done, so the
        trace is written once, whole; one that arrives while another thread stops waits for
        that thread's stop (see :func:`_on_sigterm`).

        In a fork child not set up yet (an at-fork hook registered before tracemark's stops
        it), the child is set up first: it stops its own recording, never the parent's
        buffers (they stay the parent's, written once, by the parent).
        """
        if self.pid != os.getpid():
            lifecycle.set_up_child()
            if self.pid != os.getpid():
                raise RuntimeError(
                    f"recording {self.path}: stopping in the parent when it forked; the "
                    "parent finishes it"
                )
        return self._stop(-1)

    def _stop(self, wait: float) -> RecordingSummary:
        if self.summary is not None:
            return self.summary
        if self._stop_owner == threading.get_ident():
            # Re-entered on the thread that is stopping (a signal handler, __del__): that
            # stop writes everything; this one must not wait for it, nor write twice.
            return self._summarize()
        if not self._stop_lock.acquire(timeout=wait):
            faults.report(
                "record-stop",
                str(self.path),
                f"another thread's stop of {self!r} did not end within {wait} s",
            )
            return self._summarize()
        main = threading.current_thread() is threading.main_thread()
        try:
            if self.summary is not None:
                return self.summary
            self._stop_owner = threading.get_ident()
            try:
                with lifecycle.main_thread_stopping() if main else contextlib.nullcontext():
                    self._finish_stop()
            finally:
                self._stop_owner = None
        finally:
            self._stop_lock.release()
            if main:
                lifecycle.deliver_deferred_sigterm()
        return self.summary  # type: ignore[return-value]

    def _finish_stop(self) -> None:
        """The steps of stop(), each idempotent (a call interrupted is finished by the next).
        The recording stays in the active set until its summary is made: until then, exit and
        SIGTERM still find it, and wait for it or finish it."""
        self._stopping = True
        for conn in self._connections:
            registry.disconnect(conn)  # finishes one an earlier stop() left half done
        # No thread is inside the probe after this (unless it takes longer than the timeout:
        # then its late events are counted as discarded, see Channel.switch).
        registry.synchronize(timeout=5.0)
        self.running = False
        with self.consumer.lock:
            for ch in list(self._channels):
                ch.flush()
        if self.overwrite:
            if not self._final_snapshot:
                self._snapshot()
                self._final_snapshot = True
        else:
            self.consumer.stop()
            self.consumer.drain()  # what the consumer did not get to (or never started for)
            for ch in list(self._all_channels()):
                ch.last_count()
            self.consumer.drain()
            self.consumer.close_files()
        summary = self._summarize()
        self._write_status(summary)
        for ch in list(self._all_channels()):
            ch.release()
        self.rings.close()
        self.summary = summary
        lifecycle.active.discard(self)
        recover_dead_siblings(self.path)

    def _flush_before_death(self, interrupted: Any) -> None:
        """From a signal handler, the process about to die: write every packet to the stream
        files if that needs no waiting. Async-signal-safe in Python's sense: no lock that the
        interrupted code may hold is waited for (the consumer's lock is only tried), nothing
        waits for the consumer or for other threads. The interrupted code never runs again, so
        an open packet is closed at its last published event. If the consumer is busy, or a
        thread is stopped half-way through the recorder's code, the ring files stay, and a
        recovery finds everything there (by sequence number: nothing is written twice)."""
        consumer = self.consumer
        lock = consumer.lock
        if self.summary is not None or lock._is_owned() or not lock.acquire(blocking=False):
            return
        try:
            self.running = False
            self._stopping = True
            consumer.stopping = True
            thread = consumer.thread
            whole = not lifecycle.inside_recorder(interrupted, thread and thread.ident)
            for ch in list(self._all_channels()):
                ch.flush()
            if self.overwrite:
                if not self._final_snapshot:
                    self._snapshot()
                    self._final_snapshot = True
            else:
                consumer.drain()
                for ch in list(self._all_channels()):
                    ch.last_count()
                consumer.drain()
                consumer.close_files()
            if (whole or self.overwrite) and self._error is None:  # a snapshot is whole
                summary = self._summarize()
                self._write_status(summary)
                for ch in list(self._all_channels()):
                    ch.release()
                self.rings.close()
                self.summary = summary
                lifecycle.active.discard(self)
        finally:
            lock.release()

    def _summarize(self) -> RecordingSummary:
        stats = [(c.written, c.discarded, c.overwritten, c.fd != -1) for c in self._all_channels()]
        return RecordingSummary(
            path=self.path,
            trace_path=self.trace_path,
            recorded=sum(s[0] for s in stats),
            discarded=sum(s[1] for s in stats),
            lost=self._lost,
            overwritten=sum(s[2] for s in stats),
            streams=sum(1 for s in stats if s[3]),
            error=self._error,
            waited_s=self.consumer.waited_s,
            snapshots=list(self._snapshots),
        )

    def _all_channels(self) -> Iterable[Channel]:
        for ch in list(self._channels):
            yield from chain(ch)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Recording {str(self.path)!r} {self.patterns} {self.mode} ({state})>"

    # --- the probe (the firing thread's fast path) ---

    def _event_id(self, marker: Any) -> int:
        """The event id of ``marker`` in this recording, adding its event class to the
        metadata the first time (idempotent; called when a marker is bound)."""
        with self._reg_lock:
            event_id = self._classes.get((marker.name, marker.fields))
            if event_id is None:
                text = self._event_class(marker.name, marker.fields, getattr(marker, "doc", None))
                self._metadata_parts.append(text)
                error = self.rings.append_metadata(text)  # before the marker can fire
                if error is not None:
                    self._fail(error)
                if not self.overwrite:  # overwrite mode writes it whole with each snapshot
                    self.consumer.pending_metadata.append(text)
                event_id = self._classes[marker.name, marker.fields]
            return event_id

    def _event_class(self, name: str, fields: Any, doc: str | None = None) -> str:
        # Ids start at 1: a zeroed event header is never an event (tracemark.ctf.ring).
        event_id = self._classes[name, fields] = len(self._classes) + 1
        text = W.event_class(name, event_id, fields, doc)
        self._classes_text.append(text)
        return text

    def _new_channel(self) -> Channel:
        """The calling thread's level-0 channel: a spare one if there is one (a thread that
        ended freed it), else a new one. So a process has at most as many streams as threads
        alive at once (per nesting level), however many threads it ran."""
        if self.pid != os.getpid():
            # A fork child's first event, before tracemark's own at-fork hook ran (one
            # registered earlier fired it): set the child up now (see lifecycle).
            lifecycle.set_up_child()
            if self.pid != os.getpid() or not self.running:
                raise RuntimeError(
                    f"recording {self.path}: stopping in the parent when it forked; "
                    "nothing of it is recorded in the child"
                )
        thread = threading.current_thread()
        with self._reg_lock:
            ch = self._spare.pop() if self._spare else self._claim_ended()
        if ch is None:
            ch = Channel(self, 0, thread)
            with self._reg_lock:
                self._channels.append(ch)  # registered even if a nested one won the race below
        else:
            ch.flush()  # its thread's last packet (the consumer did not get to it)
            ch.adopt(thread)
        try:
            return self._tls.ch  # a signal handler made (and used) one meanwhile
        except AttributeError:
            self._tls.ch = ch
            return ch

    def _nested_channel(self) -> Channel | None:
        """This thread's channel for a nested event (depth >= 1), marked busy; None (counted
        as discarded) when every nesting level is in use.

        Level 0 belongs to depth 0, which this event may have interrupted, so the search
        starts at level 1; a busy level is one that an event this one interrupted is writing.
        """
        try:
            ch = self._tls.ch
        except AttributeError:
            ch = self._new_channel()
        while True:
            if ch.level + 1 >= MAX_NESTING:
                ch.discard()  # counted in that channel's next packet
                return None
            if ch.child is None:
                child = Channel(self, ch.level + 1, threading.current_thread())
                # Making a channel takes a while (its buffers): a signal handler may have
                # made one meanwhile and written to it. Keep that one, drop ours.
                if ch.child is None:
                    ch.child = child
            ch = ch.child
            if not ch.busy:
                ch.busy = True
                return ch

    def _bad_value(self, ch: Channel, marker: Any, args: tuple, exc: Exception) -> None:
        if isinstance(exc, UnicodeEncodeError):  # surrogates: recorded as U+FFFD (writer)
            try:
                W.write_valid_text(ch, self._event_id(marker), marker.fields, args)
                return
            except Exception as again:
                exc = again
        ch.discard()
        if isinstance(exc, _VALUE_ERRORS):
            what = "a value its field type cannot record"
        else:  # an object's repr, or a str subclass's encode, that raised or recursed
            what = "a value whose conversion to text raised"
        try:
            detail = f"{type(exc).__name__}: {exc}"
        except Exception:  # the exception's own str() may raise too
            detail = type(exc).__name__
        message = (
            f"marker {marker.name!r} fired with {what} ({detail}); the event was counted "
            "as discarded"
        )
        if faults.report("record-bad-value", marker.name, message):
            raise faults.MarkerArgumentError(message) from exc

    def _too_large(self, size: int) -> None:
        faults.report(
            "record-too-large",
            str(self.path),
            f"an event of {size} bytes does not fit a sub-buffer of {self.subbuffer_size} "
            "bytes; it was counted as discarded (raise subbuffer_size to record it)",
        )

    # --- the consumer ---

    def _claim_ended(self) -> Channel | None:
        """A channel whose thread has ended, marked idle (so nobody else claims it); None if
        there is none. Call under ``_reg_lock``."""
        for ch in self._channels:
            if not ch.idle and ended(ch):
                ch.idle = True
                return ch
        return None

    def _retire_dead_threads(self) -> None:
        """Make the channels of threads that ended spares for the next threads, so that
        streams, files and memory stay bounded by the threads alive at once, not by every
        thread that ever fired (a thread that has ended runs no producer code: its channel
        can be handed on from here)."""
        with self._reg_lock:
            while (ch := self._claim_ended()) is not None:
                # Its open packet is closed by the thread that adopts it (or by stop): a
                # channel is a spare from the instant it is claimed, so a thread starting
                # now never makes a new one meanwhile.
                self._spare.append(ch)

    # --- the status file (tracemark.ctf.status): "recording" until a clean stop ---

    def _open_status(self) -> None:
        """Reserve the status file and mark the sub-trace as being recorded: a process that
        ends without stop() (os._exit, a crash, SIGKILL) leaves it so, which says that
        the events it had buffered were lost."""
        self._status_fd = -1
        if self._error is not None:
            return
        start = {"state": "recording", "pid": self.pid, "mode": self.mode}
        try:
            fd = os.open(
                self.trace_path / _status.STATUS_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644
            )
        except OSError as exc:
            self._fail(f"cannot write {self.trace_path / _status.STATUS_FILE}: {exc}")
            return
        self._status_fd = fd
        try:
            os.pwrite(fd, _status.encode(start), 0)
        except OSError as exc:
            self._fail(f"cannot write {self.trace_path / _status.STATUS_FILE}: {exc}")

    def _write_status(self, summary: RecordingSummary) -> None:
        """The final status, written over the reserved bytes (no new disk block: it is
        written even when the disk is full). If it cannot be, it is tried again at exit."""
        fd = self._status_fd
        if fd < 0:
            return
        uncounted = sum(c.uncounted() for c in self._all_channels())
        lost = summary.lost + uncounted
        final = {
            "state": "stopped",
            "pid": self.pid,
            "mode": self.mode,
            "recorded": summary.recorded,
            "discarded": summary.discarded - uncounted,
            "lost": lost,
            "reason": summary.error if lost else None,
            "unmatched": self._unmatched_patterns(),
            "waited_s": round(summary.waited_s, 6),
        }
        try:
            data = _status.encode(final)
            done = os.pwrite(fd, data, 0)
            if done != len(data):
                raise OSError(f"short write ({done} of {len(data)} bytes)")
            os.ftruncate(fd, len(data))
        except OSError as exc:
            faults.report(
                "record-status",
                str(self.trace_path),
                f"cannot write {self.trace_path / _status.STATUS_FILE} ({exc}); the trace may "
                f"look unfinished ({lost} events lost); tried again at exit",
            )
            lifecycle.status_retry.add(self)
            return
        lifecycle.status_retry.discard(self)
        self._status_fd = -1
        try:
            os.close(fd)
        except OSError:
            pass

    def _write_metadata(self, directory: Path, text: str, how: str) -> None:
        """Write (``how="w"``: whole or not at all, through a hidden temporary file: a
        process killed meanwhile leaves no half metadata) or append to ``metadata``."""
        try:
            if how == "w":
                tmp = directory / ".metadata.tmp"
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, directory / "metadata")
                return
            with open(directory / "metadata", how, encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            self._fail(f"cannot write {directory / 'metadata'}: {exc}")

    def _fail(self, message: str) -> None:
        if self._error is None:
            self._error = message
            faults.report(
                "record-write",
                str(self.trace_path),
                f"{message}; recording goes on counting the events it cannot write",
            )

    # --- overwrite mode ---

    def _unmatched_patterns(self) -> list[list[Any]]:
        """``[glob, [closest names]]`` for each pattern that matches no marker declared in
        this process by now (``tracemark record`` warns when no process declared one)."""
        import difflib

        names = sorted(c.name for c in registry.iter_cores())
        out: list[list[Any]] = []
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                out.append([pattern, difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)])
        return out

    def snapshot(self) -> Path:
        """Write what the buffers hold now as a trace of its own; return its directory.

        Overwrite mode only. Each snapshot is ``<sub-trace>/snapshot-<k>/``: complete packets,
        plus each thread's open packet up to its last complete event.
        """
        if not self.overwrite:
            raise RuntimeError("snapshot() is for mode='overwrite' recordings")
        if self.pid != os.getpid():  # a fork child: its own, never the parent's buffers
            lifecycle.set_up_child()
        if not self.running:
            raise RuntimeError("this recording is stopped")
        return self._snapshot()

    def _snapshot(self) -> Path:
        with self.consumer.lock:
            directory = self.trace_path / f"snapshot-{len(self._snapshots)}"
            try:
                directory.mkdir()
            except OSError as exc:
                self._fail(f"cannot create {directory}: {exc}")
                return directory
            self._write_metadata(directory, "".join(self._metadata_parts), "w")
            for ch in list(self._all_channels()):
                packets = self._copy_packets(ch)
                if not packets:
                    continue
                try:
                    with open(directory / f"stream_{ch.instance_id}", "wb") as f:
                        for _, data, events in packets:
                            f.write(data)
                            ch.written += events
                except OSError as exc:
                    self._fail(f"cannot write {directory}: {exc}")
            self._snapshots.append(directory)
            return directory

    def _copy_packets(self, ch: Channel) -> list[tuple[int, bytes, int]]:
        """Consistent copies of ``ch``'s packets while its thread may still be writing."""
        found: dict[int, tuple[int, bytes, int]] = {}
        # The open packet first: read the position, then copy; a copy whose header no longer
        # carries the sequence number read is a reused buffer and is skipped.
        seq, pos, count, buf, tasks = ch.seq, ch.pos, ch.count, ch.buf, ch.tasks
        if ch.limit >= 0 and count:
            data = bytearray(buf[:pos])
            if len(data) >= W.OFF_SEQ + 8 and struct.unpack_from("<Q", data, W.OFF_SEQ)[0] == seq:
                W.close_packet(data, pos, time.monotonic_ns(), ch.discarded, count)
                found[seq] = (seq, bytes(data), max(0, count - tasks))
        for buf, events, pseq in list(ch.full):
            size = struct.unpack_from("<Q", buf, W.OFF_TS_END + 8)[0] // 8
            data = bytes(buf[:size])
            if struct.unpack_from("<Q", data, W.OFF_SEQ)[0] == pseq:
                found.setdefault(pseq, (pseq, data, events))
        return sorted(found.values())

    # --- fork ---

    def _forget_in_child(self) -> None:
        """A fork child of a process that was stopping (or starting) this recording: it
        records nothing here; its markers are disconnected in the child."""
        self._tls.__dict__.clear()
        for conn in list(getattr(self, "_connections", ())):
            registry.disconnect(conn)

    def _after_fork_in_child(self) -> None:
        """The child records into a sub-trace of its own; the parent's buffers are dropped."""
        # (Its locks are fork-safe: reset if another thread held them at fork time; the
        # consumer, with its lock, is made anew by _setup_process.)
        self.rings.forget()  # the parent's ring lock stays the parent's
        # The parent's descriptors are not the child's business: close the inherited copies.
        fds = [c.fd for c in self._all_channels() if c.fd >= 0]
        if self._status_fd >= 0:  # the parent's status file: the parent finishes it
            fds.append(self._status_fd)
            self._status_fd = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._setup_process()
        except OSError as exc:
            self.running = False
            faults.report("record-fork", str(self.path), f"recording stopped in child: {exc}")
            for conn in self._connections:
                registry.disconnect(conn)


def _procname() -> str:
    """What the program is called: its script's name, or the module of ``python -m``
    (whose ``sys.argv[0]`` is still ``-m`` while the interpreter starts it up)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 in ("-m", "-c", ""):
        orig = getattr(sys, "orig_argv", [])
        if argv0 == "-m" and "-m" in orig[:-1]:
            return orig[orig.index("-m") + 1]
        return "python"
    return Path(argv0).name


def record(
    path: str | os.PathLike[str],
    events: str | Iterable[str] = "*",
    *,
    mode: str = "discard",
    subbuffer_size: int = SUBBUFFER_SIZE,
    subbuffers: int = SUBBUFFERS,
) -> Recording:
    """Start recording the markers matching ``events`` (a glob or several) into ``path``.

    Returns the running :class:`Recording`; ``with record(...):`` stops it on exit, or call
    ``.stop()``, which returns a :class:`RecordingSummary`. ``mode`` is ``"discard"`` (drop
    and count new events when every sub-buffer is full) or ``"overwrite"`` (keep the newest;
    write on :meth:`Recording.snapshot` and at stop). Each thread gets ``subbuffers``
    sub-buffers of ``subbuffer_size`` bytes (by default 32 of 256 KiB: see
    :data:`SUBBUFFERS`).
    """
    return Recording(
        path, events, mode=mode, subbuffer_size=subbuffer_size, subbuffers=subbuffers
    ).start()
