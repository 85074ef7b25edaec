"""Perfetto's protobuf trace format (TrackEvent), encoded by hand with the standard library.

A trace is a ``Trace`` message: ``repeated TracePacket packet = 1``. Protobuf concatenates
repeated fields, so the file is written one packet at a time (tag, length, packet) and never
held whole: memory stays bounded whatever the trace's size.

What is written, following Perfetto's "Writing TrackEvent Protos Synthetically" /
"Converting arbitrary timestamped data to Perfetto" documentation:

* a ``TrackDescriptor`` packet before the first event of each track: a process (``process
  {pid, process_name}``), a thread (``parent_uuid`` its process, ``thread {pid, tid,
  thread_name}``; sent again when the thread is renamed), a task (``parent_uuid`` its thread,
  ``name``: a track of its own under the thread), a counter (``parent_uuid`` its process,
  ``name`` NAME.FIELD, an empty ``counter {}``);
* a span: ``TYPE_SLICE_BEGIN`` (name, begin fields as debug annotations) at its begin and
  ``TYPE_SLICE_END`` (end fields as debug annotations, merged into the slice's args) at its
  end, on its thread's (or task's) track; the walker closes inner spans before outer ones,
  so they nest. An **unfinished** span (see :mod:`.walker`) is closed by a ``SLICE_END``
  whose annotations say ``unfinished: true``, just after an instant named ``NAME
  (unfinished)`` at the same time on the same track: the BEGIN was written before anyone
  could know, so its name cannot say it, and that instant shows it on the timeline;
* other markers: ``TYPE_INSTANT``; counters: ``TYPE_COUNTER`` with ``counter_value`` (int64)
  or ``double_counter_value``;
* every packet carries ``trusted_packet_sequence_id`` 1 (2 for the part a second process
  of the fast path writes); timestamps are the trace's ns since the Unix epoch, in the
  default trace clock;
* **interned names** (Perfetto's "incremental state"): a sequence's first packet has
  ``sequence_flags`` SEQ_INCREMENTAL_STATE_CLEARED; an event name or a field name is sent
  once, in an ``interned_data`` packet, as an ``EventName`` or ``DebugAnnotationName``
  ``{iid, name}``, before the first event that uses it; events then carry ``name_iid`` and
  their annotations ``name_iid``, with ``sequence_flags`` SEQ_NEEDS_INCREMENTAL_STATE.

Field numbers, checked against Perfetto's published schema (the ``perfetto`` PyPI package's
``perfetto/protos/perfetto/trace/perfetto_trace_pb2.py``, built from
``protos/perfetto/trace/perfetto_trace.proto``; the tests decode our output with it):

* ``trace.proto``: Trace.packet = 1.
* ``trace_packet.proto``: TracePacket.timestamp = 8 (uint64), trusted_packet_sequence_id = 10
  (uint32), track_event = 11, interned_data = 12, sequence_flags = 13 (uint32:
  SEQ_INCREMENTAL_STATE_CLEARED 1, SEQ_NEEDS_INCREMENTAL_STATE 2), track_descriptor = 60.
* ``interned_data.proto``: InternedData.event_names = 2 (EventName), debug_annotation_names
  = 3 (DebugAnnotationName); ``track_event.proto``: EventName.iid = 1, name = 2;
  ``debug_annotation.proto``: DebugAnnotationName.iid = 1, name = 2.
* ``track_event/track_descriptor.proto``: TrackDescriptor.uuid = 1 (uint64), name = 2,
  process = 3, thread = 4, parent_uuid = 5 (uint64), counter = 8.
* ``track_event/process_descriptor.proto``: ProcessDescriptor.pid = 1 (int32),
  process_name = 6.
* ``track_event/thread_descriptor.proto``: ThreadDescriptor.pid = 1 (int32), tid = 2
  (int32 in older, int64 in newer schemas: the same varint), thread_name = 5.
* ``track_event/counter_descriptor.proto``: CounterDescriptor (all fields optional).
* ``track_event/track_event.proto``: TrackEvent.debug_annotations = 4, type = 9
  (TYPE_SLICE_BEGIN 1, TYPE_SLICE_END 2, TYPE_INSTANT 3, TYPE_COUNTER 4), track_uuid = 11
  (uint64), name_iid = 10 (uint64), name = 23, counter_value = 30 (int64),
  double_counter_value = 44 (double).
* ``track_event/debug_annotation.proto``: DebugAnnotation.name_iid = 1, name = 10, bool_value = 2,
  int_value = 4 (int64), double_value = 5 (double), string_value = 6.
* The trace's own metadata (:meth:`PerfettoWriter.metadata`: the trace schema version, the
  tracemark version, the trace directory): the first packet, ``TracePacket.chrome_events``
  = 5 holding a ``ChromeEventBundle`` (``chrome/chrome_trace_event.proto``) whose
  ``metadata`` = 2 entries are ``ChromeMetadata {name = 1, string_value = 2, int_value =
  4}``: the one TracePacket field for free-form key/value metadata of a whole trace, which
  trace processor keeps in its ``metadata`` table (TrackDescriptors carry no annotations).

Values: int -> int_value (beyond int64: string_value, its digits), float -> double_value,
bool -> bool_value, str and object (their text) -> string_value, bytes -> string_value in hex.
Negative int64 values are ten-byte two's-complement varints, as protobuf encodes int64.
"""

from __future__ import annotations

import struct
from typing import IO, Any

from .walker import Track, end_args

__all__ = ["PerfettoWriter"]

#: Encoded annotations kept for reuse, at most (a few MiB).
_CACHE_LIMIT = 1 << 16
_MASK64 = (1 << 64) - 1
_INT64 = 1 << 63

# Wire types.
_VARINT, _I64, _LEN = 0, 1, 2

TYPE_SLICE_BEGIN, TYPE_SLICE_END, TYPE_INSTANT, TYPE_COUNTER = 1, 2, 3, 4


def varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a protobuf varint."""
    if n < 0x80:
        return _SMALL[n] if n >= 0 else varint(n & _MASK64)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]
#: Varints of 0 .. 2**14-1 (most field values and lengths).
_V14 = [_SMALL[i] if i < 0x80 else bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(1 << 14)]
#: 14 low bits as the first two bytes of a longer varint (continuation bits set).
_T14 = [bytes(((i & 0x7F) | 0x80, ((i >> 7) & 0x7F) | 0x80)) for i in range(1 << 14)]


def _uvarint(n: int) -> bytes:
    return _V14[n] if n < 16384 else varint(n)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def _len(number: int, payload: bytes) -> bytes:
    return tag(number, _LEN) + _uvarint(len(payload)) + payload


def _vfield(number: int, value: int) -> bytes:
    return tag(number, _VARINT) + varint(value & _MASK64)


def _text(v: str) -> bytes:
    return v.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()


# Pre-encoded tags.
_T_TS = tag(8, _VARINT)
# TracePacket.sequence_flags (13): SEQ_INCREMENTAL_STATE_CLEARED = 1 on the sequence's first
# packet, SEQ_NEEDS_INCREMENTAL_STATE = 2 on every packet that uses interned names.
_T_FLAGS_CLEARED = tag(13, _VARINT) + varint(1)
_T_FLAGS_NEEDED = tag(13, _VARINT) + varint(2)
#: The size of a timestamp's varint for ns in [2**56, 2**63): every date after 1972.
TS_SIZE = 9
_TS_LOW = 1 << 56
_T_TRACK_EVENT = tag(11, _LEN)
_T_PACKET = tag(1, _LEN)
_T_ANNOTATION = tag(4, _LEN)
_T_NAME = tag(10, _LEN)  # DebugAnnotation.name
_T_BOOL = tag(2, _VARINT)
_T_INT = tag(4, _VARINT)
_T_DOUBLE = tag(5, _I64)
_T_STRING = tag(6, _LEN)
_pack_double = struct.Struct("<d").pack


def _annotation_value(v: Any) -> bytes:
    t = type(v)
    if t is int:
        if -_INT64 <= v < _INT64:
            return _T_INT + (_V14[v] if 0 <= v < 16384 else varint(v & _MASK64))
        b = str(v).encode()
        return _T_STRING + _uvarint(len(b)) + b
    if t is str:
        b = v.encode("utf-8", "replace")
        return _T_STRING + _uvarint(len(b)) + b
    if t is float:
        return _T_DOUBLE + _pack_double(v)
    if t is bool:
        return _T_BOOL + (b"\x01" if v else b"\x00")
    if t is bytes:
        b = v.hex().encode()
        return _T_STRING + _uvarint(len(b)) + b
    if isinstance(v, str):  # object fields: their text
        b = str(v).encode("utf-8", "replace")
        return _T_STRING + _uvarint(len(b)) + b
    if isinstance(v, int):  # a subclass
        return _annotation_value(int(v))
    b = str(v).encode("utf-8", "replace")
    return _T_STRING + _uvarint(len(b)) + b


def _timestamp(ns: int) -> bytes:
    # Epoch ns take 9 varint bytes: 4 of them from two tables, the rest from varint() cached
    # per 2**28 ns (a quarter second), so the common case builds no bytearray.
    if ns < (1 << 28) or ns >= _INT64:
        return varint(ns & _MASK64)
    hi = ns >> 28
    cached = _hi_cache
    if cached[0] != hi:
        cached[0], cached[1] = hi, varint(hi)
    return _T14[ns & 0x3FFF] + _T14[(ns >> 14) & 0x3FFF] + cached[1]


_hi_cache: list = [-1, b""]


class PerfettoWriter:
    """A :class:`~.walker.Sink` writing a Perfetto protobuf trace to ``out`` (binary).

    Its encoding pieces (heads, interned names, annotations, :meth:`frame`) are what the
    fast path (:mod:`.fast`) builds its per-class code from: one encoding, two drivers."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self._write = out.write
        # (track uid, event name, type) -> the start of its TrackEvent (type, track, name).
        self._heads: dict[tuple[int, str, int], bytes] = {}
        # field name -> its DebugAnnotation.name_iid field, encoded.
        self._keys: dict[str, bytes] = {}
        # event name -> its TrackEvent.name_iid field, encoded.
        self._names: dict[str, bytes] = {}
        self._cache: dict[tuple, bytes] = {}
        # (head, annotations' length) -> the packet's bytes before the annotations.
        self._frames: dict[tuple[bytes, int], bytes] = {}
        # The sequence starts with its incremental state cleared (sequence_flags = 1), so
        # that the interned names below are read as this sequence's.
        self.sequence(1, self._write)

    def metadata(self, items: dict[str, int | str]) -> None:
        """One packet of the trace's metadata ``items`` (see the module docstring): write it
        first, before any event."""
        entries = b""
        for name, value in items.items():
            v = _vfield(4, value) if isinstance(value, int) else _len(2, _text(str(value)))
            entries += _len(2, _len(1, _text(name)) + v)
        self._write(_frame_packet(self._seq + _len(5, entries)))

    def sequence(self, number: int, write: Any) -> None:
        """Go on as sequence ``number`` (trusted_packet_sequence_id), writing with
        ``write``: its first packet clears the incremental state, and names are interned
        anew (the fast path gives each process it runs in a sequence of its own)."""
        self._write = write
        self._seq = tag(10, _VARINT) + varint(number)
        for table in (self._heads, self._keys, self._names, self._cache, self._frames):
            table.clear()
        self._write(_frame_packet(self._seq + _T_FLAGS_CLEARED))

    def _intern(self, field: int, iid: int, name: str) -> None:
        # TracePacket.interned_data (12) holding one EventName (InternedData.event_names = 2)
        # or DebugAnnotationName (debug_annotation_names = 3): {iid = 1, name = 2}.
        entry = _vfield(1, iid) + _len(2, _text(name))
        self._write(_frame_packet(self._seq + _T_FLAGS_NEEDED + _len(12, _len(field, entry))))

    def name_iid(self, name: str) -> bytes:
        """``TrackEvent.name_iid`` (10) of ``name``, interned on first use."""
        f = self._names.get(name)
        if f is None:
            iid = len(self._names) + 1
            self._intern(2, iid, name)
            f = self._names[name] = _vfield(10, iid)
        return f

    def key_iid(self, key: str) -> bytes:
        """``DebugAnnotation.name_iid`` (1) of field name ``key``, interned on first use."""
        f = self._keys.get(key)
        if f is None:
            iid = len(self._keys) + 1
            self._intern(3, iid, key)
            f = self._keys[key] = _vfield(1, iid)
        return f

    def _packet(self, ts: int | None, body: bytes) -> None:
        packet = (_T_TS + _timestamp(ts) if ts is not None else b"") + self._seq + body
        self._write(_T_PACKET + _uvarint(len(packet)) + packet)

    def track(self, track: Track) -> None:
        d = _vfield(1, track.uid)
        if track.parent is not None:
            d += _vfield(5, track.parent.uid)
        if track.kind == "process":
            d += _len(3, _vfield(1, track.pid) + _len(6, _text(track.name)))
        elif track.kind == "thread":
            thread = _vfield(1, track.pid) + _vfield(2, track.tid or 0)
            d += _len(4, thread + _len(5, _text(track.name)))
        elif track.kind == "task":
            d += _len(2, _text(track.name))
        else:  # counter
            d += _len(2, _text(track.name)) + _len(8, b"")
        self._packet(None, _len(60, d))

    def head(self, track: Track, kind: int, name: str) -> bytes:
        """The start of a TrackEvent: type (9), track_uuid (11), name_iid (10)."""
        key = (track.uid, name, kind)
        head = self._heads.get(key)
        if head is None:
            head = _vfield(9, kind) + _vfield(11, track.uid)
            if name:
                head += self.name_iid(name)
            self._heads[key] = head
        return head

    def frame(self, head: bytes, size: int) -> bytes:
        """The bytes of an event's packet before its annotations (``size`` bytes of them),
        for a timestamp of :data:`TS_SIZE` bytes that follows them: Trace.packet (1) tag and
        length; trusted_packet_sequence_id (10), sequence_flags (13) =
        SEQ_NEEDS_INCREMENTAL_STATE (the names are interned); track_event (11) tag, length
        and ``head``. The timestamp (8) goes last: protobuf fields come in any order."""
        key = (head, size)
        f = self._frames.get(key)
        if f is None:
            te = len(head) + size
            inner = self._seq + _T_FLAGS_NEEDED + _T_TRACK_EVENT + _uvarint(te) + head
            n = len(inner) + size + len(_T_TS) + TS_SIZE
            if len(self._frames) >= _CACHE_LIMIT:
                self._frames.clear()
            f = self._frames[key] = _T_PACKET + _uvarint(n) + inner
        return f

    def annotations(self, fields: dict[str, Any]) -> bytes:
        """The DebugAnnotation fields (TrackEvent.debug_annotations = 4) of ``fields``."""
        # Whole DebugAnnotation fields cached per (name, value) for str and int values
        # (paths, table names, status codes repeat): one dict look-up instead of encoding.
        # Keyed by type too, since 1 == 1.0 == True. Cleared when large: memory bounded.
        cache = self._cache
        parts = []
        for k, v in fields.items():
            t = type(v)
            if t is str or t is int:
                key = (k, t, v)
                a = cache.get(key)
                if a is None:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    a = cache[key] = self.annotation(k, v)
            else:
                a = self.annotation(k, v)
            parts.append(a)
        return b"".join(parts)

    def annotation(self, k: str, v: Any) -> bytes:
        """One DebugAnnotation field: name_iid, then the value."""
        a = self.key_iid(k) + _annotation_value(v)
        return _T_ANNOTATION + _uvarint(len(a)) + a

    def event(self, ts: int, head: bytes, annotations: bytes) -> None:
        """Write a TrackEvent packet: ``head`` and ``annotations`` (encoded) at ``ts``."""
        if _TS_LOW <= ts < _INT64:
            self._write(self.frame(head, len(annotations)) + annotations + _T_TS + _timestamp(ts))
            return
        te = head + annotations  # a timestamp of another size: framed here
        packet = self._seq + _T_FLAGS_NEEDED + _T_TRACK_EVENT + _uvarint(len(te)) + te
        packet += _T_TS + varint(ts & _MASK64)
        self._write(_T_PACKET + _uvarint(len(packet)) + packet)

    def begin(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        self.event(ts, self.head(track, TYPE_SLICE_BEGIN, name), self.annotations(fields))

    def end(
        self,
        track: Track,
        ts: int,
        name: str,
        begin_ts: int,
        begin_fields: dict[str, Any],
        end_fields: dict[str, Any] | None,
        unfinished: bool,
    ) -> None:
        if unfinished:
            self.event(ts, self.head(track, TYPE_INSTANT, f"{name} (unfinished)"), b"")
            self.event(
                ts, self.head(track, TYPE_SLICE_END, ""), self.annotations({"unfinished": True})
            )
            return
        # The begin's fields are on the slice already: only the end's, renamed on a clash.
        if end_fields and not begin_fields.keys().isdisjoint(end_fields):
            end_fields = end_args(begin_fields, end_fields)
        ann = self.annotations(end_fields) if end_fields else b""
        self.event(ts, self.head(track, TYPE_SLICE_END, ""), ann)

    def instant(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        self.event(ts, self.head(track, TYPE_INSTANT, name), self.annotations(fields))

    def counter(self, track: Track, ts: int, value: int | float) -> None:
        head = self.head(track, TYPE_COUNTER, "")
        if type(value) is int and -_INT64 <= value < _INT64:
            te = head + tag(30, _VARINT) + varint(value & _MASK64)
        else:
            te = head + tag(44, _I64) + _pack_double(float(value))
        self._packet(ts, _T_TRACK_EVENT + _uvarint(len(te)) + te)

    def close(self) -> None:
        pass


def _frame_packet(packet: bytes) -> bytes:
    return _T_PACKET + _uvarint(len(packet)) + packet
