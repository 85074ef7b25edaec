"""Process life cycle: when recordings are stopped or flushed, at exit, on SIGTERM, across
fork and in ``multiprocessing`` children. Process-wide state (the active recordings) lives
here; what one recording does then is the session's (:mod:`.session`).

Guarantees
----------
* **At normal exit** (atexit) every active recording is stopped: its trace is written whole.
* **On SIGTERM** with its default action, what can be written without waiting is written
  (``Recording._flush_before_death``: the consumer's lock is only tried, no thread is waited
  for) and the rest stays in the ring files, for a recovery; then the signal is delivered
  again with the default action. A handler the program installed is chained to instead (the
  program's own exit then flushes). A SIGTERM that arrives while the main thread is stopping
  a recording is acted on after that stop (:func:`main_thread_stopping`), so the trace is
  written once, whole. ``tracemark record``'s processes install no handler at all
  (:data:`leave_sigterm_to_recovery`).
* **Signals reach the program**: tracemark's own threads block process-directed signals
  (:func:`start_without_signals`).
* **fork**: the child records into its own sub-trace of the same directory; nothing of the
  parent's buffers is carried over. That holds from the child's first instant: an event it
  fires before this module's at-fork hook runs (an at-fork hook registered earlier, a
  finalizer, a signal handler) finds no channel of the parent's (tracemark's first hook,
  registered by ``import tracemark``, forgot them) and sets the child up itself; a stop()
  or snapshot() there does too, so the parent's buffers are written once, by the parent.
  A SIGTERM sent around the fork is held until the child is ready for it. A
  ``multiprocessing`` child made by fork, which ends with ``os._exit()`` (no atexit), is
  stopped by a multiprocessing finalizer.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ... import faults
from ...ctf import ring as R
from ...ctf import writer as W
from ...markers import dispatch

if TYPE_CHECKING:
    from .session import Recording

__all__ = [
    "active",
    "install_handlers",
    "leave_sigterm_to_recovery",
    "main_thread_stopping",
    "start_without_signals",
    "stop_all",
]

#: The recordings running (or stopping) in this process.
active: weakref.WeakSet[Recording] = weakref.WeakSet()
#: Stopped recordings whose final status could not be written yet (tried again at exit).
status_retry: set[Recording] = set()

#: Set by ``tracemark record``'s bootstrap: its processes get no SIGTERM handler; a process
#: SIGTERM kills leaves its ring files, which the command recovers once the program ended.
#: (A Python-level handler cannot be relied on in a process blocked in ``sem_wait``: a
#: signal landing just before the call enters the kernel runs the C handler, sets the flag,
#: and the wait never returns to run the Python one. Pool workers wait there all the time.)
leave_sigterm_to_recovery = False

# How many stop()s the main thread is inside (signal handlers run on the main thread only),
# and a SIGTERM that arrived meanwhile, acted on when the last one ends.
_main_stopping = 0
_deferred_sigterm: int | None = None
_installed = False
_sigterm_installed = False
_previous_sigterm: Any = None
_fork_mask = threading.local()


def install_handlers() -> None:
    """atexit and fork hooks once per process; the SIGTERM handler once, from the main
    thread (Python only lets the main thread set signal handlers: a recording started in
    another thread is still flushed at exit, not on SIGTERM, until one starts there)."""
    global _installed, _sigterm_installed, _previous_sigterm
    if not _installed:
        _installed = True
        atexit.register(stop_all)
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


def stop_all(wait: float = -1) -> None:
    """Stop every active recording (at exit, in a multiprocessing child); never raises."""
    for rec in list(active):
        try:
            rec._stop(wait)
        except Exception as exc:  # at exit: report, never raise
            faults.report("record-stop", str(rec.path), f"stopping {rec!r} failed: {exc!r}")
    for rec in list(status_retry):
        if rec.summary is not None:
            rec._write_status(rec.summary)


@contextlib.contextmanager
def main_thread_stopping() -> Iterator[None]:
    """Around a stop on the main thread: a SIGTERM that arrives meanwhile waits for it."""
    global _main_stopping
    _main_stopping += 1
    try:
        yield
    finally:
        _main_stopping -= 1


def deliver_deferred_sigterm() -> None:
    """Act on a SIGTERM that arrived while the main thread was stopping a recording."""
    global _deferred_sigterm
    if _main_stopping or _deferred_sigterm is None:
        return
    signum, _deferred_sigterm = _deferred_sigterm, None
    _on_sigterm(signum, sys._getframe(1))


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
    for rec in list(active):
        try:
            rec._flush_before_death(frame)
        except Exception:  # dying anyway: the rings keep what was not written
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


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


#: The process whose recordings are set up for it (a fork child's differs until
#: set_up_child runs there).
_set_up_pid = os.getpid()


def _forget_channels_in_child() -> None:
    """First thing in a fork child (dispatch.child_resets): no recording's channel of the
    parent's is reachable any more, so the child's first event, whenever it comes (an at-fork
    hook registered before tracemark's own, a finalizer, a signal handler), goes to
    ``Recording._new_channel``, which sets the child up first (:func:`set_up_child`). Without
    this, such an event went to the parent's channel: into the parent's ring (shared
    memory), and the child's thread kept that channel, recording nothing for good."""
    if _set_up_pid != os.getpid():
        for rec in list(active):
            rec._tls.__dict__.clear()


def set_up_child() -> None:
    """The recordings' part of a fork child's set-up, once per process: each running one
    records into a sub-trace of its own. Run by the at-fork hook, or earlier by the child's
    first event (``Recording._new_channel``)."""
    global _main_stopping, _deferred_sigterm, _set_up_pid
    if _set_up_pid == os.getpid():
        return
    _set_up_pid = os.getpid()
    _main_stopping, _deferred_sigterm = 0, None  # the parent's stop is not the child's
    running = [rec for rec in list(active) if rec.running]
    for rec in list(active):
        if not rec.running:
            # Being stopped (or started) by another thread of the parent: the parent's to
            # finish. Stopped here too, at exit, it would write the parent's buffers to the
            # parent's files a second time. It records nothing in the child.
            active.discard(rec)
            rec._forget_in_child()
    status_retry.clear()  # the parent's status files, the parent's to write
    for rec in running:
        rec._after_fork_in_child()


def _after_fork_in_child() -> None:
    set_up_child()
    running = [rec for rec in list(active) if rec.running]
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
        util.register_after_fork(stop_all, _finalize_multiprocessing_child)


def _finalize_multiprocessing_child(_: object) -> None:
    util = sys.modules["multiprocessing.util"]
    # The lowest priority: after the child's own finalizers, which may still fire markers.
    util.Finalize(None, stop_all, exitpriority=-(2**31))


#: Signals a thread cannot usefully block: those a fault of its own raises synchronously.
_FAULT_SIGNALS = {
    getattr(signal, n) for n in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS")
}


def start_without_signals(thread: threading.Thread) -> None:
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


# The recorder's code: this package, the writer, the ring files, and the generated code
# (whose file names start with "<tracemark", see tracemark._codegen).
_RECORDER_DIR = os.path.dirname(__file__) + os.sep
_RECORDER_FILES = {W.__file__, R.__file__}


def _recorder_code(filename: str) -> bool:
    return (
        filename.startswith(_RECORDER_DIR)
        or filename in _RECORDER_FILES
        or filename.startswith("<tracemark")
    )


def inside_recorder(interrupted: Any, consumer: int | None) -> bool:
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


dispatch.child_resets.append(_forget_channels_in_child)
