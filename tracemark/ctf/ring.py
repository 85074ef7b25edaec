"""Ring files: a channel's sub-buffers in a shared file mapping, so that they outlive the
process that writes them.

LTTng keeps its ring buffers in memory shared with a consumer daemon, so that a crashed
application's events survive it. A Python process has no daemon; it has the page cache. Each
channel of a recording maps one file, ``<sub-trace>/.ring/chan_<instance>``, ``MAP_SHARED``:
every store the firing thread makes into a sub-buffer is in the page cache the moment it is
made, and stays there when the process dies (SIGKILL, SIGSEGV, ``abort()``, ``os._exit()``,
the OOM killer). :mod:`tracemark.ctf.recovery` turns what the files hold into packets of the
trace; a normal stop writes everything and deletes them. (The directory starts with a dot:
babeltrace2 skips hidden files and directories of a trace.)

Layout of a ring file (little-endian)::

    0       control block: magic b"TMRING01", version, subbuffer_size, subbuffers, level,
            mode (0 discard, 1 overwrite), instance_id, events_discarded (kept current by
            the recorder's slow paths: a free-running counter, as in the packet context)
    48      outside: how many sub-buffers the recorder kept in plain memory because the disk
            would not reserve their blocks (a full disk); what they hold dies with the
            process, and a recovery says so (:attr:`RingHeader.outside`)
    4096    sub-buffer 0, then sub-buffer 1, ... each ``subbuffer_size`` bytes

Each sub-buffer holds one packet as the writer lays it out (:mod:`.writer`). What makes an
open packet readable after a crash, event by event:

* **The fill.** When a packet is opened, everything after its header is set to ``0xFF``.
* **The end mark.** Every event is packed with 4 more bytes after it, :data:`END` (``0xFFFFFFFF``,
  never an event id), by the same ``pack_into`` call; the next event's header overwrites it.
  The packet's content ends before it, so no reader ever sees it.
* ``struct.pack_into`` first zeroes the whole region it packs, then stores the values in
  order (CPython ``Modules/_struct.c``, ``s_pack_internal``): an event cut short by the
  process's death ends in zeroes where its end mark would be. :func:`walk` accepts an event
  only when what follows it is its end mark or the start of the next event (see there), so a
  torn last event is dropped, never decoded as garbage.

Event ids start at 1: a header that is all zeroes is never an event.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

from . import writer as W

__all__ = ["CONTROL", "END", "RING_DIR", "Ring", "RingHeader", "read_header", "walk"]

#: The directory of a sub-trace holding its ring files, the lock and the metadata copy.
RING_DIR = ".ring"
MAGIC = b"TMRING01"
VERSION = 1
#: magic, version, subbuffer_size, subbuffers, level, mode, instance_id, events_discarded
CONTROL = struct.Struct("<8sIIIIIQQ")
_OFF_DISCARDED = CONTROL.size - 8
#: After the control block's fixed part: the count of sub-buffers kept outside the ring.
OUTSIDE = struct.Struct("<I")
_OFF_OUTSIDE = CONTROL.size
#: The bytes of a ring file a reader needs for :class:`RingHeader`.
HEADER_SIZE = _OFF_OUTSIDE + OUTSIDE.size
DATA_OFFSET = 4096
#: The end mark packed after every event (an event id never takes this value).
END = W.END
END_BYTES = END.to_bytes(4, "little")


class Ring:
    """One channel's ring file, mapped. ``slots`` are writable views of its sub-buffers."""

    __slots__ = ("_map", "_outside", "fd", "path", "slots")

    def __init__(
        self,
        path: Path,
        instance_id: int,
        level: int,
        subbuffer_size: int,
        subbuffers: int,
        overwrite: bool,
    ) -> None:
        """Create and map the file. Raises OSError when it cannot be had (a full disk, a file
        size limit): the caller then keeps its sub-buffers in plain memory."""
        size = DATA_OFFSET + subbuffer_size * subbuffers
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # The control block's blocks are reserved now, each sub-buffer's when it is first
            # used (reserve()): a page of a sparse file first written through the mapping on a
            # full disk is a SIGBUS, which would kill the program. A thread that fires a
            # little reserves one sub-buffer, not the whole ring.
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, DATA_OFFSET)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        self.fd = fd
        self.path = path
        self._outside = 0
        CONTROL.pack_into(
            self._map,
            0,
            MAGIC,
            VERSION,
            subbuffer_size,
            subbuffers,
            level,
            int(overwrite),
            instance_id,
            0,
        )
        view = memoryview(self._map)
        self.slots = [
            view[DATA_OFFSET + i * subbuffer_size : DATA_OFFSET + (i + 1) * subbuffer_size]
            for i in range(subbuffers)
        ]
        view.release()

    def reserve(self, i: int) -> memoryview:
        """Sub-buffer ``i``, its blocks reserved on disk first (OSError when they cannot be:
        the caller then uses plain memory, and the control block counts it, so that a
        recovery can say that what it held was lost). Until then the file has a hole there,
        which reads as zeroes, as a reserved sub-buffer never written does: no packet."""
        slot = self.slots[i]
        try:
            os.posix_fallocate(self.fd, DATA_OFFSET + i * len(slot), len(slot))
        except OSError:
            self._outside += 1  # the control block's blocks were reserved at creation
            OUTSIDE.pack_into(self._map, _OFF_OUTSIDE, self._outside)
            raise
        return slot

    def set_discarded(self, count: int) -> None:
        """Keep the channel's free-running discard counter where a recovery finds it."""
        struct.pack_into("<Q", self._map, _OFF_DISCARDED, count)

    def close(self, remove: bool) -> None:
        """Unmap (every view of a slot must be gone: the caller dropped its buffers) and,
        with ``remove``, delete the file."""
        for s in self.slots:
            s.release()
        self.slots = []
        try:
            self._map.close()
        except BufferError:  # a view still exported somewhere: the mapping goes with it
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class RingHeader:
    """What a ring file's control block says."""

    __slots__ = (
        "discarded",
        "instance_id",
        "level",
        "outside",
        "overwrite",
        "subbuffer_size",
        "subbuffers",
    )

    def __init__(self, data: bytes) -> None:
        magic, version, self.subbuffer_size, self.subbuffers, self.level, mode, iid, disc = (
            CONTROL.unpack_from(data, 0)
        )
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a tracemark ring file (bad magic or version)")
        if self.subbuffer_size < 4096 or self.subbuffer_size % 8 or self.subbuffers <= 0:
            raise ValueError("ring file has an invalid sub-buffer layout")
        self.overwrite = bool(mode)
        self.instance_id = iid
        self.discarded = disc
        #: Sub-buffers kept in plain memory (the disk refused them): lost with the process.
        self.outside = OUTSIDE.unpack_from(data, _OFF_OUTSIDE)[0] if len(data) >= HEADER_SIZE else 0


def read_header(data: bytes) -> RingHeader:
    """The control block of a ring file's bytes; ValueError if it is not one."""
    if len(data) < CONTROL.size:
        raise ValueError("ring file is shorter than its control block")
    return RingHeader(data)


def walk(
    data: bytes | memoryview,
    start: int,
    skips: Mapping[int, Callable[[bytes, int, int], int]],
    ts_floor: int,
    decoders: Mapping[int, tuple[str, Callable[..., tuple[dict, int]]]] | None = None,
) -> tuple[int, int, int]:
    """Walk an open (or closed) packet's events from ``start`` (after the thread name);
    return ``(end, count, last_ts)``: where the last complete event ends, how many there
    are, and the last one's timestamp (``ts_floor`` if none).

    An event is complete when the 4 bytes after it are

    * its end mark (:data:`END`): it is the last one, or
    * the start of a next event (an id declared in the metadata, a timestamp not going
      backwards): the next ``pack_into`` began only after this one returned, or
    * zero, *and* the 12 bytes after those are zero too: the next event's ``pack_into`` has
      zeroed its region but not yet stored its header. (A torn event is followed by the
      fill, ``0xFF``.) This one case cannot tell a complete event from one cut before a
      length field was stored (whose unwritten length reads 0); an event with an empty text
      or bytes field is dropped there, the safe side: rather lose the last event than
      decode a wrong one.

    Anything else ends the walk before the event in doubt.
    """
    size = len(data)
    pos = start
    count = 0
    last_ts = ts_floor
    unpack = W.EVENT_HEADER.unpack_from
    hsize = W.EVENT_HEADER.size
    prev_ambiguous_ok = True  # whether the event before ``pos`` survives a zero end
    while pos + 4 <= size:
        slot = bytes(data[pos : pos + 4])
        if slot == END_BYTES:
            return pos, count, last_ts
        if slot == b"\0\0\0\0":
            follow = bytes(data[pos + 4 : pos + 16])
            if count and len(follow) == 12 and follow == bytes(12) and prev_ambiguous_ok:
                return pos, count, last_ts
            return _back_one(data, start, pos, count, skips, ts_floor)
        if pos + hsize > size:
            break
        event_id, ts = unpack(data, pos)
        skip = skips.get(event_id)
        if skip is None or ts < last_ts:
            return _back_one(data, start, pos, count, skips, ts_floor)
        try:
            end = skip(data, pos + hsize, size - 4)
        except (struct.error, ValueError, IndexError):
            end = -1
        if end < 0 or end + 4 > size:
            break  # this event is torn (runs past the buffer): keep those before it
        prev_ambiguous_ok = decoders is None or not _has_empty_sequence(
            data, pos + hsize, end, decoders[event_id][1]
        )
        pos = end
        count += 1
        last_ts = ts
    # No room for an end mark, or a torn event: everything before ``pos`` is complete.
    return pos, count, last_ts


def _back_one(
    data: bytes | memoryview,
    start: int,
    pos: int,
    count: int,
    skips: Mapping[int, Callable[[bytes, int, int], int]],
    ts_floor: int,
) -> tuple[int, int, int]:
    """The walk found something that is neither an end mark nor an event at ``pos``: the
    event before it is in doubt. Walk again up to the one before it."""
    if count == 0:
        return start, 0, ts_floor
    p, n, ts = start, 0, ts_floor
    unpack = W.EVENT_HEADER.unpack_from
    hsize = W.EVENT_HEADER.size
    while n < count - 1:
        event_id, ts = unpack(data, p)
        p = skips[event_id](data, p + hsize, len(data))
        n += 1
    return p, n, ts


def _has_empty_sequence(data: bytes | memoryview, pos: int, end: int, decode: Callable) -> bool:
    """Whether the event payload in ``data[pos:end]`` has an empty text or bytes field (the
    only way a torn event can decode to a complete-looking one)."""
    try:
        fields, _ = decode(bytes(data[pos:end]), 0, end - pos)
    except Exception:
        return True
    return any(v == "" or v == b"" for v in fields.values())


def metadata_path(ring_dir: Path) -> Path:
    """The copy of the recording's metadata kept beside the ring files (never named
    ``metadata``: that name makes a directory a trace for babeltrace2)."""
    return ring_dir / "metadata.tsdl"


def lock_path(ring_dir: Path) -> Path:
    """The file the recording process holds an ``flock`` on while it lives."""
    return ring_dir / "lock"
