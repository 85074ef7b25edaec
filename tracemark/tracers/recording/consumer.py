"""The consumer: the thread that writes full packets to the stream files (LTTng's consumer).

The firing threads hand a full sub-buffer over by appending it to their channel's ``full``
deque and waking the consumer (:meth:`Consumer.wake`: the release of a lock the consumer
waits on, which never blocks, so a signal handler may do it too). The consumer appends each
channel's packets to that channel's stream file, ``<sub-trace>/stream_<instance>``, then
gives the sub-buffers back to the channel's ``free`` deque.

Guarantees
----------
* **A stream file grows by whole packets only.** A short write (a full disk) is truncated
  away; babeltrace2 2.0.4 rejects a whole trace that ends inside a packet. Events in packets
  that could not be written are counted as lost and reported once; the recording goes on.
* **Metadata first.** Event classes declared while recording are appended to ``metadata``
  before any packet that uses them is written.
* **Few system calls.** Every system call gives the GIL away and must win it back from the
  firing threads: packets of a stream go out in one ``writev``, and while there is work the
  consumer only writes; it waits for a wake-up only when a round found nothing to do.
* **Signals reach the program.** The thread runs with process-directed signals blocked
  (:func:`.lifecycle.start_without_signals`).
* :attr:`Consumer.lock` is held for every write; a stop, a snapshot or a dying process's last
  flush takes it too, so the files are written by one thread at a time.

The native consumer
-------------------
With the C core (``tracemark.env.core()``; ``TRACEMARK_CORE=python`` keeps this module's
thread, the reference) a discard-mode recording hands its packets to
``tracemark._speedups.Writer`` instead (``tracemark/_speedups_consumer.c``, whose comment
states its protocol and guarantees): a pthread that writes them without ever taking the GIL,
so a firing thread never waits for a consumer to get the GIL back. Same files, same counts,
same error messages. What stays in Python, with the GIL, and waits for the thread only
where the last point says:

* :meth:`Consumer.hand_over` (from ``Channel._close``): the pending metadata first, then the
  packet, queued in one C call that also appends it to ``ch.full``;
* :meth:`Consumer.reap` (from ``Channel.switch`` when the channel has no free sub-buffer, and
  from :meth:`drain`): the packets written come back to ``ch.free`` and are counted, in one C
  call; a failure the thread met is reported here (``rec._fail``). Like the pure consumer, it
  needs :attr:`lock`: a firing thread only tries it (a stop, or a test holding it to stall the
  consumer, holds its buffers back);
* :meth:`drain` waits for the thread (GIL released) and reaps every channel; :meth:`close_files`
  ends the thread once everything queued is written;
* :meth:`await_written` (from ``Channel.switch`` when every sub-buffer of the channel is in the
  thread's hands): the firing thread waits for one, the GIL held, rather than discard its
  events, within a budget: at most 20 ms at once and 5% of the time in all. So a consumer
  that lost the CPU for a moment (four threads firing flat out on two cores) costs no
  events, and a disk slower than the program costs it at most 5% of its speed; beyond that,
  events are discarded and counted as before. How long the program waited is in the
  recording's summary (``waited_s``).

If the thread cannot be made, this module's thread consumes instead, for the whole recording.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ... import env, faults
from ..._forksafe import fork_safe_rlock
from ...ctf import writer as W
from . import lifecycle
from .channel import Channel

if TYPE_CHECKING:
    from .session import Recording

__all__ = ["Consumer"]

#: How often the consumer looks at the channels when nobody wakes it (seconds).
POLL = 0.05

_IOV_MAX = 512  # at most this many packets per writev (Linux allows 1024)

#: Whether recordings on the C core use the native consumer (benchmarks turn it off to
#: compare both consumers behind the same firing path; read when a recording starts).
NATIVE = True


class Consumer:
    """The consumer of one recording in one process (a fork child makes its own)."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.lock = fork_safe_rlock()
        self.thread: threading.Thread | None = None
        self.stopping = False
        #: Event classes declared while recording, for ``metadata``, in order.
        self.pending_metadata: collections.deque[str] = collections.deque()
        # The consumer waits on this lock, held while it has nothing to do; a producer wakes
        # it by releasing it. One wait is one GIL hand-over for the consumer (a pipe cost
        # two: select, then read), and with a thread firing flat out each hand-over can take
        # a whole switch interval.
        self._wakeup = _thread.allocate_lock()
        self._wakeup.acquire()
        #: The native consumer (tracemark._speedups.Writer) once started; None: this module's
        #: thread. Decided once, before the first packet, for the recording's life here.
        self.native: Any = None
        core = env.speedups()
        native = NATIVE and not rec.overwrite
        self._native_type = getattr(core, "Writer", None) if native else None

    def wake(self) -> None:
        if self.thread is None and not self.stopping:
            self.start()
        try:
            self._wakeup.release()
        except RuntimeError:  # already released: the consumer is awake or about to be
            pass

    def start(self) -> None:
        """Start the consumer thread if it is not running (idempotent; the CLI calls it in
        fork children). Python refuses new threads once interpreter shutdown began (3.12+):
        then packets are written by the recording's stop instead, and until then, once the
        buffers are full, new events are counted as discarded. With the native consumer,
        the thread started here only keeps house (:meth:`_housekeep`); the packets are
        written whether it starts or not."""
        with self.rec._reg_lock:
            if self._native_type is not None and self.native is None:
                self._start_native()
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="tracemark-consumer")
                thread.daemon = True
                try:
                    lifecycle.start_without_signals(thread)
                except RuntimeError as exc:
                    if self.native is None:
                        faults.report(
                            "record-consumer",
                            str(self.rec.trace_path),
                            f"the recorder's consumer thread could not start ({exc}); the "
                            "trace is written when the recording stops",
                        )
                    return
                self.thread = thread

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Nothing is written meanwhile, as with a disk that stalls (for tests): the pure
        consumer's lock is held, or the native consumer's thread paused."""
        with self.lock:
            if self.native is None:
                yield
                return
            self.native.pause(True)
            try:
                yield
            finally:
                self.native.pause(False)

    def _start_native(self) -> bool:
        rec = self.rec
        self._native_type, native_type = None, self._native_type  # tried once
        try:
            self.native = native_type(
                os.fsencode(rec.trace_path), W.OFF_TS_END + 8, W.OFF_DISCARDED
            )
        except (OSError, MemoryError, ValueError) as exc:
            faults.report(
                "record-consumer",
                str(rec.trace_path),
                f"the native consumer could not start ({exc}); the Python one is used",
            )
            return False
        self._metadata_path = os.fsencode(rec.trace_path / "metadata")
        return True

    # --- the native consumer (see the module's docstring) ---

    def hand_over(self, ch: Channel, entry: tuple[Any, int, int]) -> None:
        """Give the closed packet ``entry`` of ``ch`` to the native consumer (which appends it
        to ``ch.full``). Never raises: a packet that cannot be handed over is lost, counted."""
        rec = self.rec
        try:
            if self.pending_metadata:
                self._queue_metadata()
            self.native.hand_over(ch, entry, rec._error is None)
        except Exception as exc:  # memory: the packet is not in ch.full, its buffer free
            rec._fail(f"the consumer failed: {exc!r}")
            rec._lost += entry[1]
            ch.free.append(entry[0])

    def _queue_metadata(self) -> None:
        # Under the lock _event_id appends with: classes queued in the order declared.
        with self.rec._reg_lock:
            while self.pending_metadata:
                # Taken off only once queued: a hand-over that finds the deque empty (and so
                # takes no lock) comes after every class it may use is queued.
                text = self.pending_metadata[0]
                self.native.metadata(
                    self._metadata_path, text.encode("utf-8"), self.rec._error is None
                )
                self.pending_metadata.popleft()

    def reap(self, ch: Channel) -> int:
        """Take back ``ch``'s packets the native consumer wrote (see the module's docstring);
        how many. Takes no lock: the C call is atomic under the GIL (it allocates nothing
        the cyclic GC tracks, so no finalizer, no thread switch, can come in the middle)."""
        rec = self.rec
        try:
            n = self.native.reap(ch)
            error = self.native.take_error()
        except Exception as exc:
            rec._fail(f"the consumer failed: {exc!r}")
            return 0
        if error is not None:
            what, errno, path = error
            if path is not None:
                exc = OSError(errno, os.strerror(errno), os.fsdecode(path))
            else:
                exc = OSError(errno, os.strerror(errno))
            if what.startswith("metadata"):
                rec._fail(f"cannot write {rec.trace_path / 'metadata'}: {exc}")
            else:
                rec._fail(f"cannot write the trace in {rec.trace_path}: {exc}")
        return n

    @property
    def waited_s(self) -> float:
        """How long firing threads waited in :meth:`await_written`, in all (seconds)."""
        return 0.0 if self.native is None else self.native.waited_ns / 1e9

    def await_written(self, ch: Channel) -> bool:
        """With the native consumer, wait (within its budget: see ``await_written`` in
        tracemark/_speedups_consumer.c) until it gives one of ``ch``'s packets back, and take
        it back: whether ``ch.free`` now has a sub-buffer. The pure consumer needs the GIL the
        firing thread holds, so with it nothing waits (False)."""
        if self.native is None:
            return False
        try:
            if not self.native.await_written(ch):
                return False
        except Exception as exc:
            self.rec._fail(f"the consumer failed: {exc!r}")
            return False
        self.reap(ch)
        return bool(ch.free)

    def stop(self) -> None:
        """Make the thread end after its current round and wait for it (unless called on
        it); then whatever is left is the caller's to :meth:`drain`."""
        self.stopping = True
        self.wake()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _housekeep(self) -> None:
        """With the native consumer, this thread's round: packets written come back to the
        channels of threads that fire no more (and write failures are reported now, not at
        the next switch), and channels of ended threads become spares. Nothing here is on the
        firing threads' path: they never wait for it."""
        rec = self.rec
        for ch in list(rec._all_channels()):
            self.reap(ch)
        if rec.running and not rec._stopping:
            rec._retire_dead_threads()

    def _run(self) -> None:
        busy = False
        while True:
            if not busy:
                self._wakeup.acquire(timeout=POLL)
            try:
                if self.native is not None:
                    self._housekeep()
                else:
                    busy = self.drain() > 0
            except Exception as exc:  # a consumer that dies would silently fill the buffers
                self.rec._fail(f"the consumer failed: {exc!r}")
                busy = False
            if self.stopping:
                return

    def drain(self) -> int:
        """Write the pending metadata, then every full packet (metadata first: an event
        class is always on disk before any packet that uses it); return how many packets."""
        rec = self.rec
        written = 0
        if self.native is not None:
            with self.lock:
                self._queue_metadata()
                self.native.wait()  # the GIL released meanwhile
                for ch in list(rec._all_channels()):
                    written += self.reap(ch)
                if rec.running and not rec._stopping:
                    rec._retire_dead_threads()
            return written
        with self.lock:
            while self.pending_metadata:
                text = self.pending_metadata.popleft()
                if rec._error is None:
                    rec._write_metadata(rec.trace_path, text, "a")
            for ch in list(rec._all_channels()):
                written += self._write_full(ch)
            if rec.running and not rec._stopping:
                rec._retire_dead_threads()
        return written

    def _write_full(self, ch: Channel) -> int:
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

    def _write_packets(self, ch: Channel, batch: list[tuple[Any, int, int]]) -> None:
        """Append whole packets to ``ch``'s stream file with as few system calls as possible
        (each one gives the GIL away and must win it back from the firing threads)."""
        rec = self.rec
        if rec._error is not None:
            rec._lost += sum(events for _, events, _ in batch)
            return
        views = []
        for buf, _, _ in batch:
            size = struct.unpack_from("<Q", buf, W.OFF_TS_END + 8)[0] // 8
            views.append(memoryview(buf)[:size])
        total = sum(len(v) for v in views)
        done = 0
        try:
            if ch.fd == -1:
                path = rec.trace_path / f"stream_{ch.instance_id}"
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
            rec._fail(f"cannot write the trace in {rec.trace_path}: {exc}")
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
                rec._lost += events
        if kept != done:
            try:
                os.ftruncate(ch.fd, ch.file_size + kept)
            except OSError:
                pass
        ch.file_size += kept

    def close_files(self) -> None:
        if self.native is not None:
            with self.lock:
                self.native.close()  # writes whatever is still queued first
                for ch in list(self.rec._all_channels()):
                    self.reap(ch)
            return
        for ch in self.rec._all_channels():
            if ch.fd != -1:
                try:
                    os.close(ch.fd)
                except OSError:
                    pass
                ch.fd = -2  # closed, was written
