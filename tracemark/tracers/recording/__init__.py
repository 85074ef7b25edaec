"""The recorder: marker events into a CTF 1.8 trace, LTTng style.

::

    with tracemark.record("out/trace", events=["net.*", "db.*"]) as rec:
        serve()
    print(rec.summary)            # events recorded, discarded, where

    $ babeltrace2 out/trace       # or tracemark.ctf.read_trace("out/trace")

One module per LTTng notion:

=================  ==========================================================================
:mod:`.session`    :func:`record`, :class:`Recording` (a session), :class:`RecordingSummary`;
                   the sub-trace directory, metadata, status file, snapshots
:mod:`.channel`    one thread's ring of sub-buffers per nesting level: reserve, switch,
                   publish (the firing thread's side, lock-free)
:mod:`.generated`  the per-marker code the firing thread runs (templates; fused into the
                   marker's firing function when it can be)
:mod:`.consumer`   the thread that writes full packets to the stream files
:mod:`.tasks`      which asyncio task fired an event: asked on the firing path, written as a
                   ``tracemark.task`` event when it changes (per channel, per packet)
:mod:`.lifecycle`  exit, SIGTERM, fork, ``multiprocessing`` children
:mod:`.recovery`   the shared ring files that outlive a crashed process, and who recovers them
=================  ==========================================================================

Two cores, one behaviour
------------------------
The firing path has a pure-Python core (the generated code of :mod:`.generated`: the
reference) and an optional C core, ``tracemark._speedups`` (``tracemark/_speedups.c``, built
by the package's build when a compiler is present). With the C core, one C call per event
packs it by the marker's layout, reads the same clock (``CLOCK_MONOTONIC``), switches
sub-buffers through :meth:`.channel.Channel.switch` (Python, once per packet) and publishes;
whatever it does not do exactly as the pure core, it declines before writing anything, and
the pure core records that event. Same traces, same guarantees, same counters
(tests/test_speedups.py checks both cores against each other).

=======================  ===================================================================
which core               ``tracemark.env.core()``, ``tracemark --version``: the C core when
                         built, else the pure core; ``TRACEMARK_CORE=python`` forces the
                         pure core (read when a recording binds a marker); a free-threaded
                         build always uses the pure core (the C core needs the GIL)
field kinds in C         ``int`` (exact int within int64), ``float`` (exact float), ``bool``
                         (True/False), ``str`` (exact str without surrogates), ``bytes``
                         (exact bytes), ``any`` (None, and the kinds above)
per event, pure core     any other value of those kinds (an int subclass, a float given for
                         an int, text with surrogates, a bytearray, an ``any`` value stored
                         as its repr); any event inside an asyncio task (the task
                         bookkeeping, :mod:`.tasks`, is Python)
per marker, pure core    markers with an ``object`` field (its repr runs Python code), and
                         any field kind the C core does not know
nesting, signals         unchanged: the channel choice (depth 0 or a nested level) is the
                         generated code's, around the C call; no Python code runs between
                         reading ``pos`` and publishing ``count`` in C
dynamic entry probes     an entry probe capturing plain names whose marker only this
                         recording consumes is recorded by one C call straight from the
                         arguments (3.11) or the frame (3.12+, ``PyFrame_GetVar``), no
                         emitter and no firing function (``tracemark/_speedups_probes.c``);
                         any other case, and whatever it declines, is the pure path's
the consumer             discard mode on the C core: a native thread that never takes the GIL
                         (``tracemark/_speedups_consumer.c``) writes the packets; the channel
                         hands them over and takes them back in one C call each
                         (:mod:`.consumer`). Same files, counts and error messages; a fork
                         child makes its own; the pure core keeps the Python consumer
=======================  ===================================================================

The trace format is :mod:`tracemark.ctf.writer`'s; the contract between the channel and the
packing code generated from it is :class:`tracemark.ctf.writer.PackTarget`.

Directory layout: ``record(DIR)`` creates ``DIR`` if needed and writes this process's trace
into its own sub-directory ``DIR/<pid>-<n>/`` (``metadata`` and one ``stream_<k>`` file per
channel), so any number of processes (fork children, pool workers, unrelated processes given
the same ``DIR``) can record into one ``DIR`` at once; ``babeltrace2 DIR`` and
:func:`tracemark.ctf.read_trace` read them all. Thread names are in every packet's context.

Guarantees (each module states its own in detail)
-------------------------------------------------
* **The firing thread never blocks on disk and takes no lock**: it reserves room in its own
  sub-buffer, packs the event with one precompiled ``struct`` call and publishes the new
  position; a full sub-buffer is handed to the consumer without blocking.
* **Bounded memory**: ``subbuffers * subbuffer_size`` bytes per live thread (and per nesting
  level used), whatever the event rate; at most as many streams as threads alive at once.
* **Nothing is lost silently**: ``mode="discard"`` drops new events when every sub-buffer is
  full and counts them in the next packet's ``events_discarded``; ``mode="overwrite"`` (the
  flight recorder) reuses the oldest packet, and overwritten packets show as gaps in
  ``packet_seq_num``. Events that cannot be written (a full disk) are counted and reported.
* **Nesting-safe**: a signal handler, ``__del__`` or weakref callback that fires a marker
  while this thread records an event writes to the next nesting level's channel.
* **Only complete packets are written**, and **buffers outlive the process**: after SIGKILL,
  SIGSEGV, ``abort()``, ``os._exit()`` or the OOM killer every event but the one being
  written can be recovered (:func:`tracemark.ctf.recover`).
* **Task identity**: an event fired inside an asyncio task is recorded with that task (a
  ``tracemark.task`` event before it whenever its channel's task changes; every packet
  names its own); outside asyncio this costs one C call and two tests per event, and
  asyncio is not imported for it (:mod:`.tasks`; figures in ``benchmarks/RESULTS.md``).
* **Flushed** on stop, at normal exit, in ``multiprocessing`` children, and as far as it can
  be without waiting on SIGTERM.
"""

from __future__ import annotations

from .session import SUBBUFFER_SIZE, SUBBUFFERS, Recording, RecordingSummary, record

__all__ = ["SUBBUFFERS", "SUBBUFFER_SIZE", "Recording", "RecordingSummary", "record"]
