"""Recovery: what keeps a recording's events when its process dies without stopping it.

LTTng keeps an application's ring buffers in memory shared with its consumer daemon, so a
crashed application's events survive. A Python process has no daemon at hand, so the shared
memory is a file mapping in the trace itself, ``<sub-trace>/.ring/`` (hidden: babeltrace2
skips it), which this module's :class:`RingDir` keeps for a recording:

* ``chan_<k>``: each channel's sub-buffers (:class:`tracemark.ctf.ring.Ring`; its layout, and
  how a torn last event is told from a whole one, are documented there);
* ``metadata.tsdl``: the metadata, kept complete: each event class is appended before the
  marker can fire, so a recovery can decode every event the rings hold;
* ``lock``: ``flock``-ed by the recording process while it lives, so a recovery tells a live
  recording (leave it alone) from a dead one.

A normal stop deletes the directory. After SIGKILL, SIGSEGV, ``abort()``, ``os._exit()`` or
the OOM killer, the page cache still holds every event fired before the death but the one
being written, and :func:`tracemark.ctf.recover` (:mod:`tracemark.ctf.recovery`) turns them
into packets. Who runs it: ``tracemark record`` once the program has ended; a recording's
stop, for the sibling sub-traces of processes that died while recording into the same
directory (:func:`recover_dead_siblings`: ``Pool.terminate()``'s workers); and
``tracemark recover DIR`` for everything else.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ... import env, faults
from ...ctf import ring as R

__all__ = ["RingDir", "recover_dead_siblings"]


class RingDir:
    """A sub-trace's ``.ring/`` directory, held by the recording process.

    Any failure (no space, a read-only directory, ``TRACEMARK_NORING=1``) leaves the
    recording in plain memory, reported once: it still records, it just cannot be recovered
    after a crash. ``fail(message)`` reports errors that stop the trace being complete.
    """

    def __init__(self, trace_path: Path, subbuffer_size: int, nbufs: int, overwrite: bool) -> None:
        self.trace_path = trace_path
        self.subbuffer_size = subbuffer_size
        self.nbufs = nbufs
        self.overwrite = overwrite
        self.directory: Path | None = None
        self._lock_fd = -1

    def open(self, metadata: str) -> None:
        """Create the directory, take its lock and write the metadata so far."""
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
            self._lock_fd = fd
            R.metadata_path(directory).write_text(metadata, encoding="utf-8")
        except OSError as exc:
            self._unavailable(f"cannot create {directory}: {exc}")
            return
        self.directory = directory

    def append_metadata(self, text: str) -> str | None:
        """Append an event class (before its marker can fire: a recovery decodes nothing it
        has no class for); an error message if that failed."""
        if self.directory is None:
            return None
        path = R.metadata_path(self.directory)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            return f"cannot append to {path}: {exc}"
        return None

    def new_ring(self, instance_id: int, level: int) -> R.Ring | None:
        """A ring file for a new channel, or None (plain memory) when it cannot be had."""
        directory = self.directory
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
            self._unavailable(f"cannot map a ring file in {directory}: {exc}")
            return None

    def close(self) -> None:
        """After a complete stop (every ring file closed and removed): remove the rest and
        let the lock go."""
        directory, self.directory = self.directory, None
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
        self.forget()

    def forget(self) -> None:
        """Let go of the lock without touching the directory: a fork child's copy of its
        parent's lock stays the parent's."""
        if self._lock_fd >= 0:
            try:
                os.close(self._lock_fd)
            except OSError:
                pass
            self._lock_fd = -1

    def _unavailable(self, why: str) -> None:
        faults.report(
            "record-ring",
            str(self.trace_path),
            f"{why}; sub-buffers are kept in plain memory: events buffered when the process "
            "dies without stopping the recording cannot be recovered",
        )


def recover_dead_siblings(path: Path) -> None:
    """Recover the sub-traces in the recording directory ``path`` of processes that died
    while recording (the pool workers ``Pool.terminate()`` killed, a child that crashed), so
    an in-process recording is whole without ``tracemark recover``. Never raises."""
    try:
        from ...ctf import recovery

        results = recovery.recover(path)
    except Exception as exc:  # a damaged ring file is reported, the program goes on
        faults.report("record-recover", str(path), f"recovery failed: {exc!r}")
        return
    for r in results:
        if r.error:
            faults.report("record-recover", str(r.path), f"cannot recover {r.path}: {r.error}")
