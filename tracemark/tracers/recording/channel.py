"""The channel: one thread's ring of sub-buffers at one nesting level (LTTng's channel).

The firing thread is the only producer of its channel, and takes no lock:

* **reserve**: the generated packing code (:mod:`.generated`, from
  :func:`tracemark.ctf.writer.pack_source`) checks that ``pos + size`` fits under ``limit``;
* **switch**: if it does not, :meth:`Channel.switch` closes the open packet (hands it to the
  consumer, or keeps it in overwrite mode) and opens the next sub-buffer;
* **publish**: the packing code packs the event with one ``pack_into`` and stores ``pos``
  then ``count``, two stores nothing can come between (no call, no eval-breaker check), so
  whoever reads the channel (the consumer, a snapshot, a recovery of the ring file after a
  crash) sees a position and an event count that agree.

Which fields of a channel the packing code reads and writes is the contract
:class:`tracemark.ctf.writer.PackTarget`, stated there once.

Sub-buffers are slots of the channel's ring file (:class:`tracemark.ctf.ring.Ring`, a shared
file mapping that outlives the process: see :mod:`.recovery`), or plain memory when the file
cannot be had. They are allocated when first needed: a thread that fires a few events costs
one sub-buffer, not the whole channel.

A channel is handed on: when its thread ends, the next thread that needs a channel adopts it
(:meth:`Channel.adopt`), so a process has at most as many streams as threads alive at once,
per nesting level. Its next packet carries the new thread's id and name; a packet never
mixes threads.

A channel also knows the asyncio task of the last event it recorded (:mod:`.tasks`): the
firing path calls :meth:`Channel.retask` when the task changes, which writes a
``tracemark.task`` event; a packet opened while the thread is in a task starts with one
(:meth:`Channel.switch`), so every packet names its own tasks. These bookkeeping events are
in the packets' ``event_count`` but not in the recording's counts of events recorded.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ...ctf import writer as W
from .tasks import NO_TASK, task_info, thread_slot
from .tasks import check as check_asyncio

if TYPE_CHECKING:
    from .session import Recording

__all__ = ["Channel", "chain", "ended"]


class Channel:
    """One thread's sub-buffers at one nesting level: the producer side is lock-free.

    Implements :class:`tracemark.ctf.writer.PackTarget` (the fields the generated packing
    code reads and writes: ``buf``, ``pos``, ``limit``, ``count`` and :meth:`switch`).
    """

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
        "intask",
        "level",
        "limit",
        "loop",
        "name",
        "on_disk_discarded",
        "overwritten",
        "pos",
        "rec",
        "reported",
        "ring",
        "seq",
        "task",
        "task_id",
        "task_name",
        "task_size",
        "tasks",
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
        self.child: Channel | None = None
        self.instance_id = next(rec._instances)
        # Sub-buffers are allocated when first needed: a thread that fires a few events
        # costs one sub-buffer, not the whole channel.
        self.free: collections.deque[Any] = collections.deque()
        self.unallocated = rec.nbufs
        # The sub-buffers live in a shared file mapping (tracemark.ctf.ring), so that what
        # they hold outlives the process; in plain memory when the file cannot be had.
        self.ring = rec.rings.new_ring(self.instance_id, level)
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
        self._no_task()

    def _no_task(self) -> None:
        # The last event's task: a weak reference to it (NO_TASK outside a task), its
        # recorded id and name, and the size of its tracemark.task event (0: none).
        self.loop = thread_slot()  # the thread's running asyncio loop, as .loop.running
        self.task: Any = NO_TASK
        self.intask = False
        self.task_id = 0
        self.task_name = b""
        self.task_size = 0
        self.tasks = 0  # tracemark.task events in the open packet

    # --- producer side (the owning thread, or whoever stops the recording) ---

    def switch(self, size: int) -> int:
        """Close the open packet, open the next; the position for ``size`` bytes, or -1."""
        rec = self.rec
        if self.limit >= 0:
            self._close(time.monotonic_ns())
        room = rec.subbuffer_size - W.PACKET_FIXED_SIZE - len(self.name) - 1 - W.END_SIZE
        room -= self.task_size
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
        if not self.free and rec.consumer.native is not None:
            rec.consumer.reap(self)  # the packets the native consumer wrote come back
        if self.free:
            buf = self.free.popleft()
        elif self.unallocated > 0:
            buf = self._allocate()
        elif not rec.overwrite and not (self.full and rec.consumer.await_written(self)):
            self.discard()
            return -1
        elif not rec.overwrite:
            buf = self.free.popleft()
        else:
            try:
                buf, events, _ = self.full.popleft()
            except IndexError:  # every sub-buffer is being copied by a snapshot
                self.discard()
                return -1
            self.overwritten += events
        self.seq += 1
        check_asyncio()  # once per packet: see .tasks
        self.loop = thread_slot()
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
        self.tasks = 0
        self.limit = len(buf) - W.END_SIZE
        if self.intask:  # the packet names its task before its first event: self-contained
            start = self._write_task(start)
        return start

    def retask(self, task: Any) -> None:
        """The event about to be recorded is in ``task`` (None: in none), which differs from
        the last one's: write a ``tracemark.task`` event before it (see :mod:`.tasks`).
        The firing thread's slow path: once per task switch, not per event."""
        if task is None:
            self.task = NO_TASK
            self.intask = False
            self.task_id = 0
            self.task_name = b""
        else:
            info = task_info(task)
            self.task = info.ref
            self.intask = True
            self.task_id = info.id
            self.task_name = info.name_of(task)
        size = W.TASK_EVENT_FIXED + len(self.task_name)
        self.task_size = size if task is not None else 0
        if self.limit < 0:
            return  # no packet open: switch() opens the next one with it
        if self.pos + size > self.limit:
            # No room: the event after it must not land in this packet under the last task.
            # Closing it makes that event open the next packet, which starts with the task.
            self._close(time.monotonic_ns())
            return
        self._write_task(self.pos)

    def _write_task(self, pos: int) -> int:
        """Pack the current task's event at ``pos`` and publish it; the position after it."""
        end = W.pack_task(self.buf, pos, self.rec.task_event_id, self.task_id, self.task_name)
        # Published like an event (writer.PackTarget): pos, then count, nothing between.
        self.pos = end
        self.count += 1
        self.tasks += 1
        return end

    def adopt(self, thread: threading.Thread) -> None:
        """Give this spare channel (and its nesting levels) to ``thread``, the caller: its
        next packet carries the new thread's id and name. The stream stays the same one."""
        tid = threading.get_native_id()
        name = W.thread_name_bytes(thread.name)
        for c in chain(self):
            c.thread = weakref.ref(thread)
            c.tid = tid
            c.name = name
            c.task, c.intask, c.task_size = NO_TASK, False, 0
            c.loop = thread_slot()
        self.idle = False

    def _allocate(self) -> Any:
        """The next sub-buffer never used yet: a slot of the ring file, or plain memory."""
        self.unallocated -= 1
        if self.ring is not None:
            try:
                return self.ring.reserve(self.rec.nbufs - 1 - self.unallocated)
            except OSError:  # a full disk: this one in plain memory (not in a crash's ring)
                pass
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
        events -= self.tasks  # the counts of events recorded leave the bookkeeping out
        # Handed over before the channel forgets it: a stop() interrupted here (a signal
        # handler raised) and run again finds the packet either open or handed over, never
        # neither (flush() tells which). Nothing else writes this channel meanwhile: nested
        # events go to the next level.
        consumer = self.rec.consumer
        if consumer.native is not None:  # the native consumer appends it to full
            consumer.hand_over(self, (buf, events, self.seq))
        else:
            self.full.append((buf, events, self.seq))
        self.limit = -1  # from here on, the next event opens a new packet
        self.reported = discarded
        if consumer.native is None and not self.rec.overwrite and self.rec.running:
            self.rec.consumer.wake()
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
        self.tasks = 0
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


def chain(ch: Channel | None) -> Iterable[Channel]:
    """A thread's channel and those of its nesting levels."""
    while ch is not None:
        yield ch
        ch = ch.child


def ended(ch: Channel) -> bool:
    """Whether the thread of ``ch`` has ended. The main thread counts as ended while atexit
    handlers (which may fire markers) still run on it: its channel stays its own."""
    thread = ch.thread()
    if thread is threading.main_thread():
        return False
    return thread is None or not thread.is_alive()
