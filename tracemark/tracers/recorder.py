"""The recorder: marker events into a CTF 1.8 trace, LTTng style.

::

    with tracemark.record("out/trace", events=["net.*", "db.*"]) as rec:
        serve()
    print(rec.summary)            # events recorded, discarded, where

    $ babeltrace2 out/trace       # or tracemark.ctf.read_trace("out/trace")

Vocabulary (LTTng's): a *recording* (session) has one *channel* per thread alive, made of
``subbuffers`` fixed-size *sub-buffers*; a full sub-buffer is a CTF *packet*, handed to the
*consumer* thread which appends it to that channel's stream file.

Directory layout: ``record(DIR)`` creates ``DIR`` if needed and writes this process's trace
into its own sub-directory ``DIR/<pid>-<n>/`` (``metadata`` and one ``stream_<k>`` file per
thread and nesting level), so any number of processes (fork children, unrelated processes
given the same ``DIR``) can record into one ``DIR`` at once; ``babeltrace2 DIR`` and
:func:`tracemark.ctf.read_trace` read them all. Thread names are in every packet's context.
Every marker the recording matches has an event class in ``metadata``: those declared at
the start, and each one declared later, appended when it is declared (before it can fire).

Guarantees
----------
* **The firing thread never blocks on disk and takes no lock.** It reserves room in its own
  sub-buffer, packs the event with one precompiled ``struct`` call and publishes the new
  position; a full sub-buffer is handed over through a deque and the release of a lock the
  consumer waits on (never blocks: releasing an unheld lock is a no-op here, so a signal
  handler may do it too), then the GIL is offered once (``time.sleep(0)``) so the consumer
  writes before the other firing threads fill their buffers. That whole path is generated
  per marker and, while the recording is the marker's only probe, fused into the marker's
  firing function (:class:`~tracemark.markers.dispatch.Inline`): no call, no lookup.
* **Bounded memory.** ``subbuffers * subbuffer_size`` bytes per live thread (and per nesting
  level actually used), whatever the event rate; sub-buffers are allocated when first
  needed, and the consumer writes out and releases the channels of threads that ended
  (in overwrite mode they are kept for the next snapshot).
* **Nothing is lost silently.** ``mode="discard"``: when every sub-buffer is full, new events
  are dropped and counted in the next packet's ``events_discarded``. ``mode="overwrite"``
  (flight recorder): the oldest full packet is reused; nothing is written until
  :meth:`Recording.snapshot` or stop, and overwritten packets show as gaps in
  ``packet_seq_num`` (babeltrace2 reports them as discarded packets). A value that does not
  fit its field type (an int beyond 64 bits) is counted as discarded and reported once.
* **Nesting-safe.** A signal handler, ``__del__`` or weakref callback that fires a marker
  while this thread is recording an event does not touch the interrupted sub-buffer. Events
  fired at depth 0 (outside every probe) go to the thread's level-0 channel, which needs no
  flag: the firing function never runs two depth-0 probe calls at once on one thread. A
  nested event (depth >= 1) goes to the first channel of levels 1, 2, ... whose ``busy``
  flag is clear (its own stream, same thread), up to ``MAX_NESTING`` levels. The check and
  the set are two steps, but an interruption between them runs to completion before the
  outer event reads the position, so it can only ever see a consistent channel.
* **Only complete packets are written.** A stream file grows by whole packets only (a short
  write on a full disk is truncated away; babeltrace2 2.0.4 rejects a whole trace that ends
  inside a packet).
* **Buffers outlive the process.** Each channel's sub-buffers are a shared file mapping,
  ``<sub-trace>/.ring/chan_<k>`` (:mod:`tracemark.ctf.ring`; plain memory, reported once,
  when the file cannot be had), so a process that dies without stopping (SIGKILL, SIGSEGV,
  ``abort()``, ``os._exit()``, the OOM killer) leaves every event it fired in the page cache
  but the one being written; :func:`tracemark.ctf.recover` makes packets of them. A normal
  stop deletes the ring files. The process holds ``.ring/lock`` while it lives.
* **Flushed on stop and at normal exit (atexit). On SIGTERM** with its default action, what
  can be written without waiting is written (the consumer's lock is only tried, no thread is
  waited for) and the rest stays in the rings; then the signal is delivered again with the
  default action. A handler the program installed is chained to instead (the program's own
  exit then flushes). The consumer thread blocks signals, so they reach the program's
  threads (Python runs handlers in the main thread, which a signal delivered to another
  thread does not wake from a blocking call).
* **Channels are reused.** A thread that ended leaves its channel (and stream) to the next
  thread that needs one, so streams are bounded by the threads alive at once. In overwrite
  mode a reused channel keeps its packets in the ring like any other: the flight recorder
  holds the newest ``subbuffers`` packets per channel, and a packet never mixes threads.
* **fork**: the child records into its own sub-trace of the same directory; nothing of the
  parent's buffers is carried over. A ``multiprocessing`` child made by fork, which ends
  with ``os._exit()`` (no atexit), is flushed by a multiprocessing finalizer.
* **Faults never break the program**: an unwritable directory or a full disk stops the
  writing, counts every event that could not be written, and is reported once. Those
  counts, which no packet on disk can carry, go to the sub-trace's status file
  (:mod:`tracemark.ctf.status`, hidden from babeltrace2), reserved at start and written over
  in place at stop (so even on a full disk); until a clean stop it says ``recording``, so a
  process that ended without one (``os._exit``, a crash, SIGKILL) is known to have lost
  what it had buffered. ``tracemark record`` / ``view`` / ``stats`` warn about both.
* **Start and stop are each one step.** Every marker of a recording starts at one instant
  (its first packet opens once all are bound; earlier events are not inside it). A stop()
  that an exception interrupted is finished by the next call; a SIGTERM during stop() is
  acted on after it (main thread) or waits for it (another thread): the trace is written
  once, whole.
"""

from __future__ import annotations

import _thread
import atexit
import collections
import fcntl
import fnmatch
import gc
import itertools
import os
import re
import signal
import socket
import struct
import sys
import textwrap
import threading
import time
import types
import uuid as _uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import env, faults
from .._forksafe import fork_safe_rlock
from ..ctf import ring as R
from ..ctf import status as _status
from ..ctf import writer as W
from ..markers import registry
from ..markers.dispatch import MAX_NESTING, Binding, Inline

__all__ = ["Recording", "RecordingSummary", "record"]

#: Default sub-buffer (packet) size and count per channel: at most 2 MiB per thread (allocated
#: as needed: a thread that fires a little holds one sub-buffer). Room for ~10 ms of a thread
#: firing flat out while the consumer waits for the GIL.
SUBBUFFER_SIZE = 256 * 1024
SUBBUFFERS = 8

#: How often the consumer looks at the channels when nobody wakes it (seconds).
_POLL = 0.05

_IOV_MAX = 512  # at most this many packets per writev (Linux allows 1024)

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
    snapshots: list[Path] = field(default_factory=list)


class _Channel:
    """One thread's sub-buffers at one nesting level: the producer side is lock-free."""

    __slots__ = (
        "__weakref__",
        "buf",
        "busy",
        "child",
        "count",
        "discarded",
        "fd",
        "file_size",
        "free",
        "full",
        "idle",
        "instance_id",
        "level",
        "limit",
        "name",
        "on_disk_discarded",
        "overwritten",
        "pos",
        "rec",
        "reported",
        "ring",
        "seq",
        "thread",
        "tid",
        "unallocated",
        "written",
    )

    def __init__(self, rec: Recording, level: int, thread: threading.Thread) -> None:
        self.rec = rec
        self.level = level
        self.thread = weakref.ref(thread)
        self.tid = threading.get_native_id()
        self.name = W.thread_name_bytes(thread.name)
        self.busy = False
        self.idle = False  # its thread ended: a spare, for the next thread that needs one
        self.child: _Channel | None = None
        self.instance_id = rec._next_instance()
        # Sub-buffers are allocated when first needed: a thread that fires a few events
        # costs one sub-buffer, not the whole channel.
        self.free: collections.deque[Any] = collections.deque()
        self.unallocated = rec.nbufs
        # The sub-buffers live in a shared file mapping (tracemark.ctf.ring), so that what
        # they hold outlives the process; in plain memory when the file cannot be had.
        self.ring = rec._new_ring(self.instance_id, level)
        self.full: collections.deque = collections.deque()  # (buf, events, seq)
        self.buf = bytearray(0)
        # Position in the open packet and events in it, published together (see
        # writer.compile_packer).
        self.pos = 0
        self.count = 0
        self.limit = -1  # no packet open: the first event opens one
        self.seq = -1
        self.discarded = 0  # free-running, as events_discarded
        self.reported = 0  # events_discarded of the last packet closed
        self.overwritten = 0
        self.written = 0  # events in packets written to disk
        self.on_disk_discarded = 0  # events_discarded of the last packet written to disk
        self.fd = -1
        self.file_size = 0

    # --- producer side (the owning thread, or whoever stops the recording) ---

    def switch(self, size: int) -> int:
        """Close the open packet, open the next; the position for ``size`` bytes, or -1."""
        rec = self.rec
        if self.limit >= 0:
            self._close(time.monotonic_ns())
        room = rec.subbuffer_size - W.PACKET_FIXED_SIZE - len(self.name) - 1 - W.END_SIZE
        if not rec.running or size > room:
            if rec.running:
                rec._too_large(size)
            elif not rec._stopping:
                # Fired while start() is still binding the recording's markers: before the
                # recording's start instant, so not inside it (not counted either). The first
                # packet opens once every marker is bound: no marker starts before another.
                return -1
            self.discard()
            return -1
        if self.free:
            buf = self.free.popleft()
        elif self.unallocated > 0:
            buf = self._allocate()
        elif not rec.overwrite:
            self.discard()
            return -1
        else:
            try:
                buf, events, _ = self.full.popleft()
            except IndexError:  # every sub-buffer is being copied by a snapshot
                self.discard()
                return -1
            self.overwritten += events
        self.seq += 1
        thread = self.thread()
        if thread is not None:
            self.name = W.thread_name_bytes(thread.name)
        start = W.open_packet(
            buf,
            rec.trace_uuid,
            self.instance_id,
            self.seq,
            time.monotonic_ns(),
            self.tid,
            rec.pid,
            self.name,
        )
        buf[start:] = rec._fill[start:]  # see tracemark.ctf.ring: how a crash is read back
        self.buf = buf
        self.pos = start
        self.count = 0
        self.limit = len(buf) - W.END_SIZE
        return start

    def adopt(self, thread: threading.Thread) -> None:
        """Give this spare channel (and its nesting levels) to ``thread``, the caller: its
        next packet carries the new thread's id and name. The stream stays the same one."""
        tid = threading.get_native_id()
        name = W.thread_name_bytes(thread.name)
        for c in _chain(self):
            c.thread = weakref.ref(thread)
            c.tid = tid
            c.name = name
        self.idle = False

    def _allocate(self) -> Any:
        """The next sub-buffer never used yet: a slot of the ring file, or plain memory."""
        self.unallocated -= 1
        if self.ring is not None:
            return self.ring.slots[self.rec.nbufs - 1 - self.unallocated]
        return bytearray(self.rec.subbuffer_size)

    def discard(self, n: int = 1) -> None:
        """Count ``n`` discarded events (in the next packet closed, and in the ring file, where
        a recovery finds the count if the process dies first). Slow paths only."""
        self.discarded += n
        if self.ring is not None:
            self.ring.set_discarded(self.discarded)

    def _close(self, ts_end: int) -> None:
        """Seal the open packet and hand it to the consumer (or keep it, overwrite mode)."""
        buf, pos, events = self.buf, self.pos, self.count
        discarded = self.discarded
        W.close_packet(buf, pos, ts_end, discarded, events)
        # Handed over before the channel forgets it: a stop() interrupted here (a signal
        # handler raised) and run again finds the packet either open or handed over, never
        # neither (flush() tells which). Nothing else writes this channel meanwhile: nested
        # events go to the next level.
        self.full.append((buf, events, self.seq))
        self.limit = -1  # from here on, the next event opens a new packet
        self.reported = discarded
        if not self.rec.overwrite and self.rec.running:
            self.rec._wake()
            # Give the GIL away once per packet, so the consumer just woken gets it now: with
            # several threads firing flat out it could otherwise wait several switch
            # intervals while they filled every sub-buffer (4 threads flat out lost 35-40%;
            # with this 0.3-21%, run to run).
            time.sleep(0)

    def flush(self) -> None:
        """Close the open packet if it holds events (the recording is stopping)."""
        if self.limit >= 0 and self.full and self.full[-1][0] is self.buf:
            self.limit = -1  # closed and handed over by a flush that was interrupted
            self.reported = self.discarded
        elif self.limit >= 0 and self.count:
            self._close(time.monotonic_ns())
        elif self.limit >= 0:
            self.limit = -1
            self.free.append(self.buf)
            self.seq -= 1  # the empty packet was never written: no gap in packet_seq_num
        if self.child is not None:
            self.child.flush()

    def uncounted(self) -> int:
        """Events discarded that no packet on disk counts (their packets were lost)."""
        return max(0, self.discarded - self.on_disk_discarded) if not self.rec.overwrite else 0

    def release(self) -> None:
        """Drop the sub-buffers once the recording has stopped and written them: a stopped
        recording (which the program may keep, for its summary) holds no buffer memory. An
        event fired after this finds no open packet and ``rec.running`` false: discarded."""
        self.free.clear()
        self.full.clear()
        self.unallocated = 0
        self.buf = bytearray(0)
        if self.ring is not None:
            self.ring.close(remove=True)
            self.ring = None

    def last_count(self) -> None:
        """At stop, events discarded after the last packet: record their count in one more
        packet without events (events_discarded is only ever carried by packets)."""
        if self.discarded == self.reported:
            return
        if self.free:
            buf = self.free.popleft()
        elif self.unallocated > 0:
            buf = self._allocate()
        else:
            buf = bytearray(self.rec.subbuffer_size)
        self.seq += 1
        self.buf = buf
        self.count = 0
        self.pos = W.open_packet(
            buf,
            self.rec.trace_uuid,
            self.instance_id,
            self.seq,
            time.monotonic_ns(),
            self.tid,
            self.rec.pid,
            self.name,
        )
        self._close(time.monotonic_ns())


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
        # Slow paths only, re-entrant for signal handlers. _lock: the consumer's work (held
        # during disk writes); _reg_lock: registering event classes and channels, which the
        # firing threads do, so it is never held across I/O.
        self._lock = fork_safe_rlock()  # free again in a fork child (_after_fork_in_child)
        self._reg_lock = fork_safe_rlock()
        self._connections: list[registry.Connection] = []
        # Stopping: one thread at a time does it (another thread's stop() waits for it); the
        # thread doing it, so that a signal handler re-entering stop() on it does not wait
        # for itself.
        self._stop_lock = fork_safe_rlock()  # a fork child stops its copy at exit
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
        self._classes_text = ""
        self._setup_process()
        _active.add(self)
        _install_handlers()
        # One connection per glob; a marker matching several globs is recorded once, by the
        # first one that matches it (the others map it to None). Until every marker is bound,
        # ``running`` is False: an event fired meanwhile opens no packet and is ignored (it
        # is before the recording's start), so that no marker of the recording starts
        # before another (a thread firing two of them alternately shows no gap).
        try:
            for i, pattern in enumerate(self.patterns):
                earlier = self.patterns[:i]
                self._connections.append(
                    registry.connect(pattern, self._make_probe(earlier), reentrant=True)
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
        self._channels: list[_Channel] = []  # every level-0 channel, in use or spare
        self._spare: list[_Channel] = []  # channels of ended threads, flushed, to reuse
        try:
            self._tls.__dict__.clear()  # a fork child: the forking thread's channel is gone
        except AttributeError:
            self._tls = threading.local()
        self._pending_metadata: collections.deque[str] = collections.deque()
        self._lost = 0
        self._error: str | None = None
        self._snapshots: list[Path] = []
        self._consumer: threading.Thread | None = None
        self._stop_consumer = False
        # The consumer waits on this lock, held while it has nothing to do; a producer wakes
        # it by releasing it. One wait is one GIL hand-over for the consumer (a pipe cost
        # two: select, then read), and with a thread firing flat out each hand-over can take
        # a whole switch interval.
        self._wakeup = _thread.allocate_lock()
        self._wakeup.acquire()
        self.trace_path = self.path / f"{self.pid}-?"
        self.trace_path = self._make_trace_dir()
        self._fill = memoryview(b"\xff" * self.subbuffer_size)
        self._open_status()
        offset = time.time_ns() - time.monotonic_ns()
        env = {
            "domain": "ust",
            "tracer_name": "tracemark",
            "hostname": socket.gethostname(),
            "procname": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
            "vpid": self.pid,
            "python": sys.version.split()[0],
        }
        # Event classes survive a fork: the packers already compiled carry their ids.
        text = W.metadata_preamble(self.trace_uuid, offset, env) + self._classes_text
        for pattern in self.patterns:
            for info in registry.markers(pattern):
                if (info.name, info.fields) not in self._classes:
                    text += self._event_class(info.name, info.fields)
        self._metadata_text = text
        self._open_ring_dir(text)
        if not self.overwrite and self._error is None:
            self._write_metadata(self.trace_path, text, "w")
        if not self.overwrite:
            self._start_consumer()

    def _open_ring_dir(self, metadata: str) -> None:
        """``<sub-trace>/.ring/``: the ring files, a copy of the metadata kept complete (each
        event class appended before it can fire) and a lock this process holds while it
        lives, so that a recovery knows a live recording from a dead one."""
        old = getattr(self, "_ring_lock_fd", -1)
        if old >= 0:  # a fork child: the parent's lock stays the parent's
            try:
                os.close(old)
            except OSError:
                pass
        self._ring_lock_fd = -1
        self._ring_dir: Path | None = None
        if env.NORING:
            return
        directory = self.trace_path / R.RING_DIR
        try:
            directory.mkdir()
            fd = os.open(R.lock_path(directory), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            self._ring_lock_fd = fd
            R.metadata_path(directory).write_text(metadata, encoding="utf-8")
        except OSError as exc:
            self._ring_unavailable(f"cannot create {directory}: {exc}")
            return
        self._ring_dir = directory

    def _ring_unavailable(self, why: str) -> None:
        faults.report(
            "record-ring",
            str(self.trace_path),
            f"{why}; sub-buffers are kept in plain memory: events buffered when the process "
            "dies without stopping the recording cannot be recovered",
        )

    def _new_ring(self, instance_id: int, level: int) -> R.Ring | None:
        """A ring file for a new channel, or None (plain memory) when it cannot be had."""
        directory = self._ring_dir
        if directory is None:
            return None
        try:
            return R.Ring(
                directory / f"chan_{instance_id}",
                instance_id,
                level,
                self.subbuffer_size,
                self.nbufs,
                self.overwrite,
            )
        except (OSError, ValueError) as exc:
            self._ring_unavailable(f"cannot map a ring file in {directory}: {exc}")
            return None

    def _close_ring_dir(self) -> None:
        """After a complete stop: every ring file is closed and gone; remove the rest."""
        directory, self._ring_dir = self._ring_dir, None
        if directory is not None:
            for path in (R.metadata_path(directory), R.lock_path(directory)):
                try:
                    path.unlink()
                except OSError:
                    pass
            try:
                directory.rmdir()
            except OSError:
                pass
        if self._ring_lock_fd >= 0:
            try:
                os.close(self._ring_lock_fd)
            except OSError:
                pass
            self._ring_lock_fd = -1

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
        """
        return self._stop(-1)

    def _stop(self, wait: float) -> RecordingSummary:
        global _main_stopping
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
            if main:
                _main_stopping += 1
            try:
                self._finish_stop()
            finally:
                self._stop_owner = None
                if main:
                    _main_stopping -= 1
        finally:
            self._stop_lock.release()
            if main:
                _deliver_deferred_sigterm()
        return self.summary  # type: ignore[return-value]

    def _finish_stop(self) -> None:
        """The steps of stop(), each idempotent (a call interrupted is finished by the next).
        The recording stays in the active set until its summary is made: until then, exit and
        SIGTERM still find it, and wait for it or finish it."""
        self._stopping = True
        for conn in self._connections:
            registry.disconnect(conn)  # finishes one an earlier stop() left half done
        # No thread is inside the probe after this (unless it takes longer than the timeout:
        # then its late events are counted as discarded, see _Channel.switch).
        registry.synchronize(timeout=5.0)
        self.running = False
        with self._lock:
            for ch in list(self._channels):
                ch.flush()
        if self.overwrite:
            if not self._final_snapshot:
                self._snapshot()
                self._final_snapshot = True
        else:
            self._stop_consumer = True
            self._wake()
            consumer = self._consumer
            if consumer is not None and consumer is not threading.current_thread():
                consumer.join()
            self._drain()  # whatever the consumer did not get to (or never started for)
            for ch in list(self._all_channels()):
                ch.last_count()
            self._drain()
            self._close_files()
        summary = self._summarize()
        self._write_status(summary)
        for ch in list(self._all_channels()):
            ch.release()
        self._close_ring_dir()
        self.summary = summary
        _active.discard(self)
        self._recover_dead_processes()

    def _recover_dead_processes(self) -> None:
        """Recover the sub-traces in this recording's directory of processes that died while
        recording (the pool workers ``Pool.terminate()`` killed, a child that crashed), so an
        in-process recording is whole without ``tracemark recover``. Never raises."""
        try:
            from ..ctf import recovery

            results = recovery.recover(self.path)
        except Exception as exc:  # a damaged ring file is reported, the program goes on
            faults.report("record-recover", str(self.path), f"recovery failed: {exc!r}")
            return
        for r in results:
            if r.error:
                faults.report("record-recover", str(r.path), f"cannot recover {r.path}: {r.error}")

    def _flush_before_death(self, interrupted: Any) -> None:
        """From a signal handler, the process about to die: write every packet to the stream
        files if that needs no waiting. Async-signal-safe in Python's sense: no lock that the
        interrupted code may hold is waited for (the consumer's lock is only tried), nothing
        waits for the consumer or for other threads. The interrupted code never runs again, so
        an open packet is closed at its last published event. If the consumer is busy, or a
        thread is stopped half-way through the recorder's code, the ring files stay, and a
        recovery finds everything there (by sequence number: nothing is written twice)."""
        lock = self._lock
        if self.summary is not None or lock._is_owned() or not lock.acquire(blocking=False):
            return
        try:
            self.running = False
            self._stopping = True
            self._stop_consumer = True
            consumer = self._consumer
            whole = not _inside_recorder(interrupted, consumer and consumer.ident)
            for ch in list(self._all_channels()):
                ch.flush()
            if self.overwrite:
                if not self._final_snapshot:
                    self._snapshot()
                    self._final_snapshot = True
            else:
                self._drain()
                for ch in list(self._all_channels()):
                    ch.last_count()
                self._drain()
                self._close_files()
            if (whole or self.overwrite) and self._error is None:  # a snapshot is whole
                summary = self._summarize()
                self._write_status(summary)
                for ch in list(self._all_channels()):
                    ch.release()
                self._close_ring_dir()
                self.summary = summary
                _active.discard(self)
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
            snapshots=list(self._snapshots),
        )

    def _all_channels(self) -> Iterable[_Channel]:
        for ch in list(self._channels):
            yield from _chain(ch)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Recording {str(self.path)!r} {self.patterns} {self.mode} ({state})>"

    # --- the probe (the firing thread's fast path) ---

    def _make_probe(self, earlier: list[str]) -> Any:
        """The probe of one glob: the registry calls its ``bind_marker(marker)`` once per marker
        and calls the returned per-marker function on every event (see :func:`_bind`)."""
        bound: dict[Any, Any] = {}
        claimed = [re.compile(fnmatch.translate(p)).match for p in earlier]

        def bind(marker: Any) -> Any:
            fn = bound.get(marker)
            if fn is None:
                # A marker that an earlier glob of this recording matches is recorded there.
                claimed_earlier = any(match(marker.name) for match in claimed)
                fn = bound[marker] = _skip if claimed_earlier else _bind(self, marker)
            return fn

        def probe(marker: Any, args: tuple) -> None:
            # Only for a caller that does not bind (the registry always does).
            (bound.get(marker) or bind(marker))(marker, args)

        def unbind(marker: Any) -> None:
            # A forgotten marker (a removed probe): its event class stays in the metadata.
            bound.pop(marker, None)

        probe.__qualname__ = f"Recording.probe[{self.path}]"
        probe.bind_marker = bind  # type: ignore[attr-defined]
        probe.unbind_marker = unbind  # type: ignore[attr-defined]
        return probe

    def _event_id(self, marker: Any) -> int:
        """The event id of ``marker`` in this recording, adding its event class to the
        metadata the first time (idempotent; called when a marker is bound)."""
        with self._reg_lock:
            event_id = self._classes.get((marker.name, marker.fields))
            if event_id is None:
                text = self._event_class(marker.name, marker.fields)
                self._metadata_text += text
                if self._ring_dir is not None:  # before the marker can fire: a recovery
                    try:  # decodes nothing it has no class for
                        with open(R.metadata_path(self._ring_dir), "a", encoding="utf-8") as f:
                            f.write(text)
                    except OSError as exc:
                        self._fail(f"cannot append to {R.metadata_path(self._ring_dir)}: {exc}")
                if not self.overwrite:  # overwrite mode writes it whole with each snapshot
                    self._pending_metadata.append(text)
                event_id = self._classes[marker.name, marker.fields]
            return event_id

    def _event_class(self, name: str, fields: Any) -> str:
        # Ids start at 1: a zeroed event header is never an event (tracemark.ctf.ring).
        event_id = self._classes[name, fields] = len(self._classes) + 1
        text = W.event_class(name, event_id, fields)
        self._classes_text += text
        return text

    def _new_channel(self) -> _Channel:
        """The calling thread's level-0 channel: a spare one if there is one (a thread that
        ended freed it), else a new one. So a process has at most as many streams as threads
        alive at once (per nesting level), however many threads it ran."""
        thread = threading.current_thread()
        with self._reg_lock:
            ch = self._spare.pop() if self._spare else self._claim_ended()
        if ch is None:
            ch = _Channel(self, 0, thread)
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

    def _nested_channel(self) -> _Channel | None:
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
                child = _Channel(self, ch.level + 1, threading.current_thread())
                # Making a channel takes a while (its buffers): a signal handler may have
                # made one meanwhile and written to it. Keep that one, drop ours.
                if ch.child is None:
                    ch.child = child
            ch = ch.child
            if not ch.busy:
                ch.busy = True
                return ch

    def _next_instance(self) -> int:
        return next(self._instances)

    def _bad_value(self, ch: _Channel, marker: Any, args: tuple, exc: Exception) -> None:
        if isinstance(exc, UnicodeEncodeError):  # lone surrogates: record a cleaned copy
            try:
                clean = tuple(W.clean_text(a) if isinstance(a, str) else a for a in args)
                W.compile_packer(self._event_id(marker), marker.fields)(clean, ch)
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

    def _wake(self) -> None:
        if self._consumer is None and not self._stop_consumer:
            self._start_consumer()
        try:
            self._wakeup.release()
        except RuntimeError:  # already released: the consumer is awake or about to be
            pass

    def _start_consumer(self) -> None:
        """Start the consumer thread if it is not running (idempotent; the CLI calls it in
        fork children). Python refuses new threads once interpreter shutdown began (3.12+):
        then packets are written by :meth:`stop` instead, and until then, once the buffers
        are full, new events are counted as discarded."""
        with self._reg_lock:
            if self._consumer is None:
                thread = threading.Thread(target=self._consume, name="tracemark-consumer")
                thread.daemon = True
                try:
                    _start_without_signals(thread)
                except RuntimeError as exc:
                    faults.report(
                        "record-consumer",
                        str(self.trace_path),
                        f"the recorder's consumer thread could not start ({exc}); the trace "
                        "is written when the recording stops",
                    )
                    return
                self._consumer = thread

    def _consume(self) -> None:
        """Write full packets until stopped. Every system call gives the GIL away, and with
        a thread firing flat out winning it back can take a whole switch interval (5 ms):
        so while there is work the consumer only writes (one writev per stream), and it
        waits for a wake-up only when a round found nothing to do."""
        busy = False
        while True:
            if not busy:
                self._wakeup.acquire(timeout=_POLL)
            try:
                busy = self._drain() > 0
            except Exception as exc:  # a consumer that dies would silently fill the buffers
                self._fail(f"the consumer failed: {exc!r}")
                busy = False
            if self._stop_consumer:
                return

    def _drain(self) -> int:
        """Write the pending metadata, then every full packet (metadata first: an event
        class is always on disk before any packet that uses it); return how many packets."""
        written = 0
        with self._lock:
            while self._pending_metadata:
                text = self._pending_metadata.popleft()
                if self._error is None:
                    self._write_metadata(self.trace_path, text, "a")
            for ch in list(self._all_channels()):
                written += self._write_full(ch)
            if self.running and not self._stopping:
                self._retire_dead_threads()
        return written

    def _write_full(self, ch: _Channel) -> int:
        # Taken off the queue once written: a stop() interrupted in between (a signal handler
        # raised) and run again never skips a packet. Only the owner thread appends to it, on
        # the right; only this (under the lock) takes from it.
        batch = list(ch.full)
        if batch:
            self._write_packets(ch, batch)
            for _ in batch:
                ch.full.popleft()
            ch.free.extend(buf for buf, _, _ in batch)
        return len(batch)

    def _claim_ended(self) -> _Channel | None:
        """A channel whose thread has ended, marked idle (so nobody else claims it); None if
        there is none. Call under ``_reg_lock``."""
        for ch in self._channels:
            if not ch.idle and _ended(ch):
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
            _status_retry.add(self)
            return
        _status_retry.discard(self)
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

    def _write_packets(self, ch: _Channel, batch: list[tuple[bytearray, int, int]]) -> None:
        """Append whole packets to ``ch``'s stream file with as few system calls as possible
        (each one gives the GIL away and must win it back from the firing threads)."""
        if self._error is not None:
            self._lost += sum(events for _, events, _ in batch)
            return
        views = []
        for buf, _, _ in batch:
            size = struct.unpack_from("<Q", buf, W.OFF_TS_END + 8)[0] // 8
            views.append(memoryview(buf)[:size])
        total = sum(len(v) for v in views)
        done = 0
        try:
            if ch.fd == -1:
                path = self.trace_path / f"stream_{ch.instance_id}"
                ch.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            while done < total:
                rest, skip = [], done
                for v in views:
                    if skip >= len(v):
                        skip -= len(v)
                        continue
                    rest.append(v[skip:])
                    skip = 0
                done += os.writev(ch.fd, rest[:_IOV_MAX])
        except OSError as exc:
            self._fail(f"cannot write the trace in {self.trace_path}: {exc}")
        # Count (and keep) only the packets written whole; cut a partial one away. Every
        # packet after the first one cut is lost too, even a smaller one that would fit.
        kept = 0
        whole = True
        for v, (_, events, _) in zip(views, batch, strict=True):
            whole = whole and kept + len(v) <= done
            if whole:
                kept += len(v)
                ch.written += events
                ch.on_disk_discarded = struct.unpack_from("<Q", v, W.OFF_DISCARDED)[0]
            else:
                self._lost += events
        if kept != done:
            try:
                os.ftruncate(ch.fd, ch.file_size + kept)
            except OSError:
                pass
        ch.file_size += kept

    def _fail(self, message: str) -> None:
        if self._error is None:
            self._error = message
            faults.report(
                "record-write",
                str(self.trace_path),
                f"{message}; recording goes on counting the events it cannot write",
            )

    def _close_files(self) -> None:
        for ch in self._all_channels():
            if ch.fd != -1:
                try:
                    os.close(ch.fd)
                except OSError:
                    pass
                ch.fd = -2  # closed, was written

    # --- overwrite mode ---

    def snapshot(self) -> Path:
        """Write what the buffers hold now as a trace of its own; return its directory.

        Overwrite mode only. Each snapshot is ``<sub-trace>/snapshot-<k>/``: complete packets,
        plus each thread's open packet up to its last complete event.
        """
        if not self.overwrite:
            raise RuntimeError("snapshot() is for mode='overwrite' recordings")
        if not self.running:
            raise RuntimeError("this recording is stopped")
        return self._snapshot()

    def _snapshot(self) -> Path:
        with self._lock:
            directory = self.trace_path / f"snapshot-{len(self._snapshots)}"
            try:
                directory.mkdir()
            except OSError as exc:
                self._fail(f"cannot create {directory}: {exc}")
                return directory
            self._write_metadata(directory, self._metadata_text, "w")
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

    def _copy_packets(self, ch: _Channel) -> list[tuple[int, bytes, int]]:
        """Consistent copies of ``ch``'s packets while its thread may still be writing."""
        found: dict[int, tuple[int, bytes, int]] = {}
        # The open packet first: read the position, then copy; a copy whose header no longer
        # carries the sequence number read is a reused buffer and is skipped.
        seq, pos, count, buf = ch.seq, ch.pos, ch.count, ch.buf
        if ch.limit >= 0 and count:
            data = bytearray(buf[:pos])
            if len(data) >= W.OFF_SEQ + 8 and struct.unpack_from("<Q", data, W.OFF_SEQ)[0] == seq:
                W.close_packet(data, pos, time.monotonic_ns(), ch.discarded, count)
                found[seq] = (seq, bytes(data), count)
        for buf, events, pseq in list(ch.full):
            size = struct.unpack_from("<Q", buf, W.OFF_TS_END + 8)[0] // 8
            data = bytes(buf[:size])
            if struct.unpack_from("<Q", data, W.OFF_SEQ)[0] == pseq:
                found.setdefault(pseq, (pseq, data, events))
        return sorted(found.values())

    # --- fork ---

    def _after_fork_in_child(self) -> None:
        """The child records into a sub-trace of its own; the parent's buffers are dropped."""
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


# --- the per-marker probe ---------------------------------------------------------------------
#
# The firing thread's whole path is generated per marker (field names and types): find this
# thread's channel, pack the event with one precompiled struct call, publish the position.
# The registry gets it three ways (a dispatch.Binding): fused into the marker's firing
# function while the recording is the marker's only probe (no call, no argument tuple: the
# common case, and what the per-event budget needs), as a function for depth 0 when other
# probes share the marker, and as a function for nested events (depth >= 1).
#
# Depth 0 needs no flag: the firing function never runs two depth-0 calls at once on one
# thread, so the level-0 channel is only ever written by one of them. Nested events go to the
# channels of levels 1, 2, ... (a busy flag each), never to level 0, which the interrupted
# depth-0 call may be in the middle of.

_TOP_CHANNEL = """\
try:
    _ch = _in.tls.ch
except _AttributeError:
    _ch = _in.rec._new_channel()
"""

# Fused, the level-0 channel is kept in the thread's dispatch state (dispatch.Inline): a
# threading.local lookup costs more than the rest of finding it. Another recording's channel
# there is replaced.
_INLINE_CHANNEL = """\
_ch = _st.cache
if _ch is None or _ch.rec is not _in.rec:
{top}    _st.cache = _ch
""".format(top=textwrap.indent(_TOP_CHANNEL, "    "))

_WRITE = """\
_id = _in.id
try:
{pack}except _Exception as _exc:
    _in.rec._bad_value(_ch, _marker, ({values}), _exc)
"""

_FUNCTION = """\
def probe(_marker, _args):
    {unpack}_in = _state
{body}"""

_NESTED_BODY = """\
_ch = _in.rec._nested_channel()
if _ch is None:
    return
try:
{write}finally:
    _ch.busy = False
"""


class _Bound:
    """One recording's binding of one marker: the state its generated paths read as ``_in``."""

    __slots__ = ("id", "marker", "rec", "tls")

    def __init__(self, rec: Recording, marker: Any) -> None:
        self.rec = rec
        self.marker = marker
        self.tls = rec._tls  # the same object for the recording's life (a fork child clears it)
        # The event id: the recording's start registered the markers declared by then; a
        # marker declared later is bound, so registered, when it is declared.
        self.id = rec._event_id(marker)

    def __repr__(self) -> str:
        return f"<recording {str(self.rec.path)!r} of marker {self.marker.name!r}>"


_compiled: dict[tuple, tuple[str, types.CodeType, types.CodeType, dict[str, Any]]] = {}


def _paths(fields: Any) -> tuple[str, types.CodeType, types.CodeType, dict[str, Any]]:
    """For one field signature (names and types): the depth-0 body (for fusing), the code of
    the depth-0 and nested functions, and the globals they share (the struct cache)."""
    key = tuple((f.name, f.type) for f in fields)
    found = _compiled.get(key)
    if found is None:
        names = [f.name for f in fields]
        pack, shared = W.pack_source(fields, names, "    ")
        shared.update(_Exception=Exception, _AttributeError=AttributeError)
        values = "".join(f"{n}, " for n in names)
        write = _WRITE.format(pack=pack, values=values)
        top = _TOP_CHANNEL + write
        fused = _INLINE_CHANNEL + write
        nested = _NESTED_BODY.format(write=textwrap.indent(write, "    "))
        unpack = f"{values} = _args\n    " if names else ""

        def code(body: str) -> types.CodeType:
            source = _FUNCTION.format(unpack=unpack, body=textwrap.indent(body, "    "))
            module = compile(source, "<tracemark recorder probe>", "exec")
            return next(c for c in module.co_consts if isinstance(c, types.CodeType))

        found = _compiled[key] = (fused, code(top), code(nested), shared)
    return found


def _bind(rec: Recording, marker: Any) -> Binding:
    """What the registry runs on each event of ``marker`` for recording ``rec``."""
    fused, top_code, nested_code, shared = _paths(marker.fields)
    state = _Bound(rec, marker)
    ns = {**shared, "_state": state}
    name = f"record[{marker.name}]"
    return Binding(
        top=types.FunctionType(top_code, ns, name),
        nested=types.FunctionType(nested_code, ns, name),
        inline=Inline(fused, shared, state),
    )


def _skip(marker: Any, args: tuple) -> None:
    """A marker this probe leaves to another glob of the same recording."""


# --- process-wide: active recordings, exit, SIGTERM, fork ---------------------------------------

_active: weakref.WeakSet[Recording] = weakref.WeakSet()
#: Stopped recordings whose final status could not be written yet (tried again at exit).
_status_retry: set[Recording] = set()
#: How many stop()s the main thread is inside (signal handlers run on the main thread only),
#: and a SIGTERM that arrived meanwhile, acted on when the last one ends.
_main_stopping = 0
_deferred_sigterm: int | None = None
#: How long the SIGTERM handler waits for a stop() running on another thread.
_installed = False
_sigterm_installed = False
_previous_sigterm: Any = None


def _ended(ch: _Channel) -> bool:
    """Whether the thread of ``ch`` has ended. The main thread counts as ended while atexit
    handlers (which may fire markers) still run on it: its channel stays its own."""
    thread = ch.thread()
    if thread is threading.main_thread():
        return False
    return thread is None or not thread.is_alive()


def _chain(ch: _Channel | None) -> Iterable[_Channel]:
    """A thread's channel and those of its nesting levels."""
    while ch is not None:
        yield ch
        ch = ch.child


def _install_handlers() -> None:
    """atexit and fork hooks once per process; the SIGTERM handler once, from the main
    thread (Python only lets the main thread set signal handlers: a recording started in
    another thread is still flushed at exit, not on SIGTERM, until one starts there)."""
    global _installed, _sigterm_installed, _previous_sigterm
    if not _installed:
        _installed = True
        atexit.register(_stop_all)
        os.register_at_fork(
            before=_hold_sigterm_over_fork,
            after_in_parent=_release_sigterm_after_fork,
            after_in_child=_after_fork_in_child,
        )
    if (
        not _sigterm_installed
        and not leave_sigterm_to_recovery
        and threading.current_thread() is threading.main_thread()
    ):
        _sigterm_installed = True
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:  # a program that ignores SIGTERM goes on doing so
            _previous_sigterm = previous
            signal.signal(signal.SIGTERM, _on_sigterm)


#: Set by ``tracemark record``'s bootstrap: its processes get no SIGTERM handler; a process
#: SIGTERM kills leaves its ring files, which the command recovers once the program ended.
#: (A Python-level handler cannot be relied on in a process blocked in ``sem_wait``: a
#: signal landing just before the call enters the kernel runs the C handler, sets the flag,
#: and the wait never returns to run the Python one. Pool workers wait there all the time.)
leave_sigterm_to_recovery = False

_fork_mask = threading.local()


def _hold_sigterm_over_fork() -> None:
    """Block SIGTERM in the forking thread (the child inherits the mask) until both sides
    are ready. A fork child forgets a signal that arrives before CPython resets its signal
    state in the child (``PyOS_AfterFork_Child``): with the default action that signal
    would have killed it, with our handler it is lost, and a ``Pool`` worker that
    ``terminate()`` signalled that early waited for a task for ever. Held, it stays pending
    and is delivered when the child unblocks it, after the reset."""
    if _sigterm_installed:
        try:
            _fork_mask.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        except (AttributeError, OSError, ValueError):
            pass


def _release_sigterm_after_fork() -> None:
    old = getattr(_fork_mask, "old", None)
    if old is not None:
        _fork_mask.old = None
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_all(wait: float = -1) -> None:
    for rec in list(_active):
        try:
            rec._stop(wait)
        except Exception as exc:  # at exit: report, never raise
            faults.report("record-stop", str(rec.path), f"stopping {rec!r} failed: {exc!r}")
    for rec in list(_status_retry):
        if rec.summary is not None:
            rec._write_status(rec.summary)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM with its default action: write what can be written without waiting, then die
    of SIGTERM; whatever is not written stays in the ring files, for a recovery (no lock the
    interrupted code may hold is waited for, nor any thread). A stop() that the main thread
    is running (this handler interrupted it) finishes first and the signal is acted on after
    it (deferred), so that trace is written once, whole. A program's own handler is chained
    to instead (its exit path then stops the recordings).
    """
    global _deferred_sigterm
    if _main_stopping:
        _deferred_sigterm = signum
        return
    previous = _previous_sigterm
    if callable(previous):  # the program's handler decides; its exit path flushes
        previous(signum, frame)
        return
    for rec in list(_active):
        try:
            rec._flush_before_death(frame)
        except Exception:  # dying anyway: the rings keep what was not written
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _deliver_deferred_sigterm() -> None:
    """Act on a SIGTERM that arrived while the main thread was stopping a recording."""
    global _deferred_sigterm
    if _main_stopping or _deferred_sigterm is None:
        return
    signum, _deferred_sigterm = _deferred_sigterm, None
    _on_sigterm(signum, sys._getframe(1))


#: Signals a thread cannot usefully block: those a fault of its own raises synchronously.
_FAULT_SIGNALS = {
    getattr(signal, n) for n in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS")
}


def _start_without_signals(thread: threading.Thread) -> None:
    """Start a tracemark thread with process-directed signals blocked in it. The kernel gives
    a signal to any thread that does not block it; Python runs handlers only in the main
    thread, which learns of a signal delivered elsewhere only at its next bytecode. A main
    thread blocked in a system call (``multiprocessing``'s ``SemLock`` in ``sem_wait``) is
    interrupted only by a signal delivered to itself: delivered to our consumer instead,
    SIGTERM from ``Pool.terminate()`` was never handled and the worker hung for good. The
    new thread inherits the mask of the thread that creates it, so the mask is set around
    the start (blocking from inside the new thread would leave a window open)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _FAULT_SIGNALS)
    except (AttributeError, OSError, ValueError):  # no pthread_sigmask on this platform
        thread.start()
        return
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _recorder_code(filename: str) -> bool:
    return filename in _RECORDER_FILES or filename.startswith("<tracemark")


_RECORDER_FILES = {__file__, W.__file__, R.__file__}


def _inside_recorder(interrupted: Any, consumer: int | None) -> bool:
    """Whether some thread is stopped inside the recorder's code (a channel's state may be
    half-changed there): this thread where the signal ``interrupted`` it, the others where
    they are, except the consumer (no channel state: the caller holds its lock)."""
    gc_was = gc.isenabled()
    gc.disable()  # CPython gh-106883, see markers.dispatch.synchronize()
    try:
        frames = sys._current_frames()
    finally:
        if gc_was:
            gc.enable()
    frames[threading.get_ident()] = interrupted
    for ident, frame in frames.items():
        if ident == consumer:
            continue
        while frame is not None:
            if _recorder_code(frame.f_code.co_filename):
                return True
            frame = frame.f_back
    return False


def _after_fork_in_child() -> None:
    global _main_stopping, _deferred_sigterm
    _main_stopping, _deferred_sigterm = 0, None  # the parent's stop is not the child's
    running = [rec for rec in list(_active) if rec.running]
    for rec in running:
        rec._after_fork_in_child()
    if _sigterm_installed and _previous_sigterm is signal.SIG_DFL:
        # A fork child (a Pool worker, most often) dies of SIGTERM as it would without
        # tracemark (see leave_sigterm_to_recovery for why a handler is unsafe there); its
        # rings are recovered by the parent's stop() or by tracemark record.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _release_sigterm_after_fork()  # last: a SIGTERM held over the fork acts now
    # A multiprocessing child made by fork ends with os._exit(), which skips atexit: its last
    # packets would never be written. multiprocessing runs its own finalizers before that
    # exit, so stop the recordings from one. Its bootstrap first clears the finalizers the
    # child inherited, then runs the after-fork hooks: so register the finalizer from one of
    # those. Only when multiprocessing is in use (imported); a plain os.fork() child that
    # ends with os._exit() must call tracemark's stop itself.
    util = sys.modules.get("multiprocessing.util")
    if running and util is not None:
        util.register_after_fork(_stop_all, _finalize_multiprocessing_child)


def _finalize_multiprocessing_child(_: object) -> None:
    util = sys.modules["multiprocessing.util"]
    # The lowest priority: after the child's own finalizers, which may still fire markers.
    util.Finalize(None, _stop_all, exitpriority=-(2**31))


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
    sub-buffers of ``subbuffer_size`` bytes.
    """
    return Recording(
        path, events, mode=mode, subbuffer_size=subbuffer_size, subbuffers=subbuffers
    ).start()
