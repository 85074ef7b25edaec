"""The packet index of a sub-trace: which event ids each packet of each stream holds, so that
reading the events of a few names opens only the packets that hold them (LTTng's ``index/``).

::

    build_index("out/trace/4711-0")            # what tracemark record does once the program ended
    trace = read_trace("out/trace")
    trace.events(names=match, index=trace_index(trace))   # what tracemark view -e does

Where and who
-------------
The recorded event's cost is budgeted to the nanosecond and the in-process consumer shares
the traced program's GIL, so neither builds it: like LTTng's consumer daemon, the index is
made outside the traced process, from the stream files, by ``tracemark record`` once the
program (and the recovery of what it left in ring files) has ended, or else by the first
reader that filters by name (:func:`trace_index`), which also saves it. One file per stream,
``<sub-trace>/.index/<stream file name>.idx``: a hidden directory, which babeltrace2 skips
(it refuses any other file that is not a CTF stream; a test reads a trace with an index).

Guarantees
----------
* **An index never changes what is read.** Each file records the stream file's size and
  ``mtime_ns`` it was built for, and every packet's offset and size; it is used only if the
  stream file still has that size and mtime and the reader, walking the packet headers
  itself, finds exactly those packets. Otherwise (``tracemark recover`` appended packets, a
  truncation, a rewrite) that stream alone is indexed again. A file that is damaged,
  truncated or garbage fails its checksum or its bounds and is rebuilt the same way.
* **It only says what to skip.** A packet is marked as holding a set of ids only if the walk
  that built it checked everything decoding it would check (ids known to the metadata,
  lengths inside the content, text valid UTF-8, timestamps in order and inside the packet,
  the event count): see :meth:`~.reader.Stream.packet_ids`. A packet that fails is marked
  "unknown" and is always decoded, so its error is reported as without an index. The ids
  are those in the stream bytes; which names they are comes from the metadata when read
  (recovery may replace the metadata with a longer one; ids never change meaning).
* **Bounded.** An index file is read only if it is a regular file of at most
  :data:`INDEX_LIMIT` bytes, and every count in it is checked against the bytes that are
  left before anything is allocated for it. The reader reads only the packets it found
  itself: the index can make it skip a packet, never read elsewhere.
* **Atomic, and optional.** A file is written to a temporary name in ``.index/`` and renamed
  over the old one, so a reader sees the old index or the new one. When it cannot be written
  (a read-only trace, a full disk, ``.index`` not a plain directory) the index is used from
  memory and nothing is reported: it is a cache.
* **Fast to build.** Events are walked by their headers: a packet made only of fixed-size
  events of one size is walked by one ``struct.iter_unpack`` (C speed); others one event at a
  time, fixed-size fields skipped by their sizes and sequences by their lengths, nothing
  converted to Python values. A forged index with a valid checksum and wrong id sets would
  hide events: the checksum is against damage, not against someone who rewrites the file.

File layout (little-endian): ``b"TMIDX\\n"``, uint16 version (1), uint64 stream size, int64
stream ``mtime_ns``, the trace uuid (16 bytes), uint32 packet count; per packet uint64 offset,
uint64 size, int32 id count (-1: unknown, decode it) and that many uint32 ids; then the
16-byte BLAKE2b digest of everything before it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from .reader import Stream, SubTrace, Trace, TraceError, _read_packet, read_trace

__all__ = ["INDEX_DIR", "INDEX_LIMIT", "build_index", "index_trace", "load_index", "trace_index"]

#: The hidden directory of a sub-trace that holds its index files.
INDEX_DIR = ".index"
#: The largest index file read, in bytes.
INDEX_LIMIT = 64 << 20
MAGIC = b"TMIDX\n"
VERSION = 1

_HEAD = struct.Struct("<6sHQq16sI")
_ENTRY = struct.Struct("<QQi")
_DIGEST = 16

#: The id sets of a stream's packets, in file order (None: unknown, always decode).
PacketIds = list[frozenset[int] | None]


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def index_path(stream: Stream) -> Path:
    """Where the index of ``stream`` is kept."""
    return stream.path.parent / INDEX_DIR / f"{stream.path.name}.idx"


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _encode(stream: Stream, stamp: tuple[int, int], ids: PacketIds) -> bytes:
    parts = [_HEAD.pack(MAGIC, VERSION, stamp[0], stamp[1], stream.sub.meta.uuid, len(ids))]
    for p, found in zip(stream._packets, ids, strict=True):
        if found is None:
            parts.append(_ENTRY.pack(p.offset, p.size, -1))
        else:
            parts.append(_ENTRY.pack(p.offset, p.size, len(found)))
            parts.append(struct.pack(f"<{len(found)}I", *sorted(found)))
    body = b"".join(parts)
    return body + _digest(body)


def _decode(data: bytes, stream: Stream, stamp: tuple[int, int]) -> PacketIds | None:
    """The id sets ``data`` holds for ``stream`` as it is now (``stamp``), or None."""
    if len(data) < _HEAD.size + _DIGEST:
        return None
    body = memoryview(data)[:-_DIGEST]
    if _digest(body) != data[-_DIGEST:]:
        return None
    magic, version, size, mtime, uuid, count = _HEAD.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION or (size, mtime) != stamp:
        return None
    packets = stream._packets
    if uuid != stream.sub.meta.uuid or count != len(packets):
        return None
    pos = _HEAD.size
    end = len(body)
    out: PacketIds = []
    for p in packets:
        if pos + _ENTRY.size > end:
            return None
        offset, psize, n = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        if offset != p.offset or psize != p.size:
            return None
        if n < 0:
            if n != -1:
                return None
            out.append(None)
            continue
        if pos + 4 * n > end:  # checked before anything is allocated for n ids
            return None
        out.append(frozenset(struct.unpack_from(f"<{n}I", body, pos)))
        pos += 4 * n
    return out if pos == end else None


def _read_index(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > INDEX_LIMIT:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(INDEX_LIMIT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _load_stream(stream: Stream) -> PacketIds | None:
    stamp = _stamp(stream.path)
    if stamp is None:
        return None
    data = _read_index(index_path(stream))
    if data is None or len(data) > INDEX_LIMIT:
        return None
    return _decode(data, stream, stamp)


def _build_stream(stream: Stream) -> tuple[PacketIds, tuple[int, int] | None]:
    """The id sets of ``stream``'s packets, and the stamp to save them under (None when the
    file changed while being walked: use them, do not save them)."""
    before = _stamp(stream.path)
    ids: PacketIds = []
    for p in stream._packets:
        try:
            data = _read_packet(stream.path, p)
        except (OSError, TraceError):
            ids.append(None)
            continue
        ids.append(stream.packet_ids(p, data))
    end = stream._packets[-1].offset + stream._packets[-1].size if stream._packets else 0
    if before is None or _stamp(stream.path) != before or before[0] != end:
        return ids, None
    return ids, before


def _save_stream(stream: Stream, stamp: tuple[int, int], ids: PacketIds) -> bool:
    """Write the index file atomically; False (and nothing left behind) when it cannot be."""
    directory = stream.path.parent / INDEX_DIR
    try:
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(directory).st_mode):  # a symlink or a file: not ours
            return False
        target = index_path(stream)
        tmp = directory / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_encode(stream, stamp, ids))
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        return False
    return True


def _index_subtrace(sub: SubTrace, *, save: bool) -> dict[str, PacketIds]:
    out = {}
    for stream in sub.streams:
        ids = _load_stream(stream)
        if ids is None:
            ids, stamp = _build_stream(stream)
            if save and stamp is not None:
                _save_stream(stream, stamp, ids)
        out[stream.path.name] = ids
    return out


def build_index(subtrace: str | os.PathLike[str] | SubTrace) -> dict[str, PacketIds]:
    """Index every stream of a sub-trace (a ``DIR/<pid>-<n>`` directory, or an open
    :class:`SubTrace`) whose index is missing, stale or damaged, and save it; return the id
    sets of every stream's packets, by stream file name. Raises TraceError for a sub-trace
    that cannot be read."""
    sub = subtrace if isinstance(subtrace, SubTrace) else SubTrace(Path(subtrace))
    return _index_subtrace(sub, save=True)


def load_index(subtrace: str | os.PathLike[str] | SubTrace) -> dict[str, PacketIds]:
    """The saved, valid (not stale, not damaged) index of each stream of a sub-trace, by
    stream file name; streams without one are left out. Builds nothing."""
    sub = subtrace if isinstance(subtrace, SubTrace) else SubTrace(Path(subtrace))
    out = {}
    for stream in sub.streams:
        ids = _load_stream(stream)
        if ids is not None:
            out[stream.path.name] = ids
    return out


def trace_index(
    trace: Trace, *, save: bool = True
) -> Callable[[Stream], Sequence[frozenset[int] | None] | None]:
    """For :meth:`Trace.events`'s ``index``: every stream's packet id sets, loaded, or built
    (and saved, when ``save`` and the directory allows) where missing or stale."""
    by_stream: dict[Path, PacketIds] = {}
    for sub in trace.subtraces:
        for name, ids in _index_subtrace(sub, save=save).items():
            by_stream[sub.path / name] = ids
    return lambda stream: by_stream.get(stream.path)


def index_trace(path: str | os.PathLike[str]) -> int:
    """Build and save the index of every sub-trace under ``path`` (what ``tracemark record``
    does once the program has ended); return how many streams it covers. A trace that
    cannot be read is left alone (0): whoever reads it reports why."""
    try:
        trace = read_trace(path)
    except (TraceError, OSError):
        return 0
    n = 0
    for sub in trace.subtraces:
        n += len(_index_subtrace(sub, save=True))
    return n
