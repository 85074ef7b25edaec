"""Recovery: the events a process buffered when it died, turned into packets of its trace.

A recording keeps its sub-buffers in ring files (:mod:`.ring`) under
``<sub-trace>/.ring/``, which a normal stop deletes. When the process dies first (SIGKILL,
SIGSEGV, ``abort()``, ``os._exit()``, the OOM killer), they stay, and :func:`recover` (or
``tracemark recover DIR``; ``tracemark record`` runs it by itself once the program has ended)
makes a normal trace of them:

* **discard mode**: every packet the ring holds that the stream file does not have yet (by
  ``packet_seq_num``) is appended to ``stream_<k>``, oldest first, after a torn packet the
  consumer left at the file's end is cut. The sub-trace's ``metadata`` is replaced by the
  ring's copy, which has every event class the process declared.
* **overwrite mode** (the flight recorder): the newest packets the ring holds go to
  ``<sub-trace>/recovered/``, a trace of its own like a snapshot.

An open packet is closed at its last complete event (:func:`.ring.walk`: a torn last event
is dropped, never decoded), with the discard count the ring kept. A sub-trace whose process
is still alive (it holds the ring's ``flock``) is left alone. Recovering twice is harmless:
the second finds nothing to do.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from . import reader as _reader
from . import ring as R
from . import writer as W
from .status import STATUS_FILE, encode, read_status

__all__ = ["Recovered", "pending", "pid_alive", "recover"]

_CTX = W.CTX_FIXED
_HEADER = W.HEADER


@dataclass
class Recovered:
    """What :func:`recover` did for one sub-trace."""

    #: The sub-trace directory (``DIR/<pid>-<n>``).
    path: Path
    #: Events recovered from the ring files (not in any stream file before).
    events: int = 0
    #: Packets written from the ring files.
    packets: int = 0
    #: Where they were written (the sub-trace itself, or its ``recovered/``).
    written_to: Path | None = None
    #: True when the process is still recording: nothing was done.
    live: bool = False
    #: Why a ring file could not be read (it is left in place), or None.
    error: str | None = None
    #: True once the ring files were read (whatever they held).
    checked: bool = False
    #: Sub-buffers the recording had to keep in plain memory, outside its ring files (the
    #: disk refused to reserve them): the events they held when the process died are lost,
    #: and how many is not known.
    outside: int = 0


def pending(path: str | os.PathLike[str]) -> list[Path]:
    """The sub-traces under ``path`` that still have ring files (a live recording, or a
    process that died without stopping it and has not been recovered)."""
    found = []
    for directory, dirs, _files in os.walk(path):
        dirs.sort()
        if R.RING_DIR in dirs:
            found.append(Path(directory))
            dirs.remove(R.RING_DIR)
    return found


def is_live(sub: str | os.PathLike[str]) -> bool:
    """Whether the process recording into sub-trace ``sub`` is alive (holds its lock)."""
    try:
        fd = os.open(R.lock_path(Path(sub) / R.RING_DIR), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def recover(path: str | os.PathLike[str]) -> list[Recovered]:
    """Recover every sub-trace under ``path`` whose process died while recording; one
    :class:`Recovered` per sub-trace whose ring files were there (recovered, or left alone
    because their process is alive)."""
    results = [recover_subtrace(sub) for sub in pending(path)]
    return [r for r in results if r.live or r.error or r.written_to or r.checked]


def recover_subtrace(sub: Path) -> Recovered:
    """Recover one sub-trace (see the module docstring)."""
    out = Recovered(sub)
    ring_dir = sub / R.RING_DIR
    try:
        lock = os.open(R.lock_path(ring_dir), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # The recording is removing its ring files (a normal stop), or died doing so (a
        # SIGTERM in the middle of a stop): nothing left to recover.
        if not any(ring_dir.glob("chan_*")) and not _alive(sub):
            _remove_ring_dir(ring_dir)
            out.checked = True
            _mark_recovered(sub, out)
        return out
    except OSError as exc:
        out.error = f"cannot open {R.lock_path(ring_dir)}: {exc.strerror or exc}"
        return out
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            out.live = True
            return out
        try:
            _recover_locked(sub, ring_dir, out)
        except (OSError, ValueError, _reader.TraceError) as exc:
            out.error = str(exc)
            return out
        _remove_ring_dir(ring_dir)
        out.checked = True
        _mark_recovered(sub, out)
        return out
    finally:
        os.close(lock)


def _recover_locked(sub: Path, ring_dir: Path, out: Recovered) -> None:
    rings = sorted(ring_dir.glob("chan_*"))
    if not rings:
        # Never fired, or its stop had written and deleted them: no packet to recover. Its
        # metadata may still have been cut short by the death: the ring's copy is whole.
        copy = R.metadata_path(ring_dir)
        if copy.is_file() and (sub / "metadata").is_file():
            _replace(sub / "metadata", copy.read_text(encoding="utf-8"))
        return
    meta_path = R.metadata_path(ring_dir)
    meta = _reader._Metadata(meta_path)
    skips = {eid: _reader._compile_skipper(f) for eid, (_, f) in meta.events.items()}
    decoders = {eid: (n, _reader._compile_decoder(f)) for eid, (n, f) in meta.events.items()}
    headers = []
    for path in rings:
        with open(path, "rb") as f:
            head = f.read(R.HEADER_SIZE)
        headers.append(R.read_header(head))
    out.outside = sum(h.outside for h in headers)
    overwrite = any(h.overwrite for h in headers)
    target = sub / "recovered" if overwrite else sub
    text = meta_path.read_text(encoding="utf-8")
    if overwrite:
        target.mkdir(exist_ok=True)
    _replace(target / "metadata", text)
    for path, header in zip(rings, headers, strict=True):
        stream = target / f"stream_{header.instance_id}"
        last_seq, last_discarded, last_end = -1, 0, 0
        if stream.exists():
            _reader.cut_partial_packet(stream)
            last_seq, last_discarded, last_end = _stream_tail(stream)
        packets = _packets_of(path, header, meta.uuid, skips, decoders, last_seq)
        packets = [p for p in packets if p[1] >= last_end]
        blobs = []
        events = 0
        for data, _ts_begin, count, discarded in packets:
            blobs.append(data)
            events += count
            last_discarded = max(last_discarded, discarded)
        if header.discarded > last_discarded and packets:
            # Events discarded after the last packet closed: carried by one more packet.
            blobs.append(_empty_packet(packets[-1][0], header.discarded))
        if blobs:
            with open(stream, "ab") as f:
                for blob in blobs:
                    f.write(blob)
            out.packets += len(blobs)
            out.events += events
            out.written_to = target
    if overwrite and out.written_to is None:
        (target / "metadata").unlink()
        target.rmdir()


def _packets_of(
    path: Path,
    header: R.RingHeader,
    uuid: bytes,
    skips: dict,
    decoders: dict,
    after_seq: int,
) -> list[tuple[bytearray, int, int, int]]:
    """The packets ``path`` holds with a sequence number above ``after_seq``, closed at
    their last complete event, oldest first: ``(bytes, ts_begin, events, discarded)``."""
    size = header.subbuffer_size
    found = []
    with open(path, "rb") as f:
        for i in range(header.subbuffers):
            f.seek(R.DATA_OFFSET + i * size)
            slot = f.read(size)
            if len(slot) < W.PACKET_FIXED_SIZE + 1:
                break
            magic, puuid, stream_id, inst = _HEADER.unpack_from(slot, 0)
            if magic != W.MAGIC or puuid != uuid or stream_id or inst != header.instance_id:
                continue  # never used, or not a packet of this stream
            ts_begin, ts_end, content, _psize, seq, discarded, count, _tid, _pid = _CTX.unpack_from(
                slot, _HEADER.size
            )
            if seq <= after_seq:
                continue  # the stream file has it already
            z = slot.find(b"\0", W.PACKET_FIXED_SIZE, W.PACKET_FIXED_SIZE + 257)
            if z < 0:
                continue  # opened, but its header was never finished: no event in it
            end, n, last_ts = R.walk(slot, z + 1, skips, ts_begin, decoders)
            closed = content and content // 8 == end and count == n and ts_end >= last_ts
            if not closed:
                ts_end = max(last_ts, ts_begin)
                discarded = max(discarded, header.discarded)
            if n == 0 and not closed:
                continue
            data = bytearray(slot[:end])
            W.close_packet(data, end, ts_end, discarded, n)
            found.append((seq, data, ts_begin, n, discarded))
    found.sort(key=lambda p: p[0])
    return [(data, ts, n, d) for _, data, ts, n, d in found]


def _empty_packet(last: bytearray, discarded: int) -> bytes:
    """A packet without events after ``last`` (same stream), carrying ``discarded``."""
    _, puuid, _, inst = _HEADER.unpack_from(last, 0)
    _, ts_end, _, _, seq, _, _, tid, pid = _CTX.unpack_from(last, _HEADER.size)
    z = last.find(b"\0", W.PACKET_FIXED_SIZE)
    name = bytes(last[W.PACKET_FIXED_SIZE : z])
    buf = bytearray(W.PACKET_FIXED_SIZE + len(name) + 1)
    end = W.open_packet(buf, puuid, inst, seq + 1, ts_end, tid, pid, name)
    W.close_packet(buf, end, ts_end, discarded, 0)
    return bytes(buf)


def _stream_tail(stream: Path) -> tuple[int, int, int]:
    """The last packet of a stream file: its ``packet_seq_num``, ``events_discarded`` and
    ``timestamp_end`` (-1, 0, 0 for an empty file)."""
    last = (-1, 0, 0)
    with open(stream, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            f.seek(offset)
            head = f.read(W.PACKET_FIXED_SIZE)
            if len(head) < W.PACKET_FIXED_SIZE:
                break
            _, ts_end, _, psize, seq, discarded, _, _, _ = _CTX.unpack_from(head, _HEADER.size)
            if psize < 8 * W.PACKET_FIXED_SIZE or psize % 8:
                raise ValueError(f"{stream}: damaged packet at byte {offset}")
            last = (seq, discarded, ts_end)
            offset += psize // 8
    return last


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one that exists but is not ours to signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _alive(sub: Path) -> bool:
    """Whether the process of sub-trace ``sub`` (``<pid>-<n>``) still runs."""
    pid = sub.name.split("-", 1)[0]
    return pid.isdigit() and pid_alive(int(pid))


def _mark_recovered(sub: Path, out: Recovered) -> None:
    """Say in the sub-trace's status file (:mod:`.status`) that it was recovered (a status
    that says the recording stopped is left as it is)."""
    status = read_status(sub) or {}
    if status.get("state") == "stopped":
        return
    status.update(state="recovered", recovered=out.events)
    try:
        with open(sub / STATUS_FILE, "wb") as f:
            f.write(encode(status))
    except OSError:
        pass


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove_ring_dir(ring_dir: Path) -> None:
    for entry in ring_dir.iterdir():
        try:
            entry.unlink()
        except OSError:
            pass
    try:
        ring_dir.rmdir()
    except OSError:
        pass
