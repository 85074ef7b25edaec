"""The CTF 1.8 layout tracemark writes: TSDL metadata, packets, and one packer per event class.

What a trace directory holds (CTF 1.8, "Common Trace Format" specification, sections cited
as "CTF §n")::

    metadata        plain-text TSDL, starting with "/* CTF 1.8 */" (CTF §7.1, babeltrace2
                    requires the marker); event classes are appended as markers are
                    declared after the recording started
    stream_<n>      one per thread (and nesting level): a sequence of complete packets

Guarantees of the layout
------------------------
* Every type is byte-aligned (``align = 8`` bits) and little-endian, so a packed event is
  exactly what a ``struct.Struct`` with a ``"<"`` format produces: no padding to compute.
* Packet header (CTF §5.1): ``magic`` 0xC1FC1FC1, the trace ``uuid``, ``stream_id`` (always
  0: one stream class), ``stream_instance_id`` (unique per stream file in a trace: babeltrace2
  merges files that share one and then fails).
* Packet context (CTF §5.2): ``timestamp_begin``/``timestamp_end`` (the clock, ns),
  ``content_size`` and ``packet_size`` in *bits*, ``packet_seq_num`` (gaps mean packets lost
  in overwrite mode), ``events_discarded`` (a free-running per-stream counter: each packet
  holds the total so far), then tracemark's ``event_count`` (events in this packet: the
  reader counts a stream without decoding it, and checks), ``tid``, ``pid`` and
  ``thread_name`` (the
  thread's name when the packet was opened). The fixed part comes first so a packet can be
  closed by patching fixed offsets.
* Event header: ``uint32 id`` then ``uint64 timestamp`` (ns of the monotonic clock; the clock's
  offset maps it to the Unix epoch, CTF §8). Timestamps never go backwards within a stream and
  never pass the packet's ``timestamp_end``.
* Event payload by the marker's field types, each field named ``_<key>`` in TSDL (a leading
  underscore is stripped by readers, CTF §4.1.2, so a TSDL keyword like ``align`` is safe:
  tested with babeltrace2), where the key is the field's name, or its escaped form for a
  name TSDL cannot spell (see :func:`ctf_field_key`): int -> ``tm_int`` (int64), float ->
  ``tm_float`` (IEEE double),
  bool -> ``tm_bool`` (uint8 enum false/true); str, object (its repr; a ``ReprText`` is a
  repr already and stored as it is) and bytes -> ``tm_len __<key>_len`` followed by
  ``tm_str`` / ``tm_object`` / ``tm_byte`` ``_<key>[__<key>_len]`` (a CTF sequence; for
  text its elements are 8-bit integers with ``encoding = UTF8``, which CTF readers present
  as a string: babeltrace2 does, up to a NUL, tested); ``any`` (a value kept typed: what
  probes capture) -> an enum tag ``__<key>_tag`` (its kind) then a variant ``_<key>``
  selected by it (CTF §4.2.7; the table is at :func:`any_parts`, tested with babeltrace2).
  Text is length-prefixed rather than NUL-terminated: a NUL inside is kept, no byte has to be
  checked, and a reader stays in step whatever the text holds. The type alias names let the
  reader give back the declared Python type.

What a recorded text becomes (str fields, and the text of object fields)
------------------------------------------------------------------------
Exactly the text, as UTF-8, with one exception: a Python str may hold *surrogate code
points* (U+D800..U+DFFF: ``os.fsdecode`` and ``sys.argv`` make them of bytes that are not
UTF-8, ``"\\ud800"`` makes one), which no UTF-8 text can hold. Each one is recorded as
U+FFFD REPLACEMENT CHARACTER, one for one (:func:`valid_text`), so the text keeps its
length in characters and every reader, babeltrace2 included, decodes valid UTF-8. A
Python str holds a character beyond U+FFFF as one code point, so a surrogate in it is
never half of a valid character: pairs are not joined. Their bytes are not kept (record
``os.fsencode(name)`` in a bytes field for that). Everything else is kept as it is:
NUL (the text is length-prefixed), control characters, characters beyond U+FFFF, empty
and megabyte-long text (up to what a sub-buffer holds; a larger event is counted as
discarded). Text is never replaced by an escaped repr of itself.

The common case costs nothing for this: the packer encodes with ``str.encode()``, and only
when that raises ``UnicodeEncodeError`` does :func:`write_valid_text` record the event
again with valid text, through the packer of the same field types, compiled once, and the
same ``struct`` cache (nothing is compiled per event).

Readers: :mod:`tracemark.ctf.reader` gives the text back whole, NULs included. babeltrace2
(2.0.4) prints a text sequence as a C string: up to its first NUL (the fields after it
are still read by their lengths, so it stays in step), with ``\\``, quotes, ``?`` and
ASCII control characters escaped and other bytes as they are. It prints floats with
``%g`` (6 significant digits). Its printing of a text is quadratic in the text's length
(0.4 s for 256 KB, about 30 s for 1.75 MB): a babeltrace2 limit, not the trace's.

Task identity: the ``tracemark.task`` event
-------------------------------------------
An event fired inside an asyncio task is recorded after a ``tracemark.task`` event (event
class :data:`TASK_EVENT`, fields ``int64 _id`` and the text ``_name``: :data:`TASK_FIELDS`)
naming that task, like the kernel's ``sched_switch``: the task of an event is that of the
last ``tracemark.task`` event before it *in the same packet*, and there is none (no task)
when the packet holds no such event before it, or the last one has ``id`` 0. A task id is
the recorder's serial number of the task in its process (1, 2, ...), never reused, so that
two tasks are never one even when the first one's memory is reused; the name is the task's
``get_name()`` when the channel switched to it (a rename shows from the task's next
switch), stored as a thread name is (UTF-8, at most 255 bytes).
Each packet is self-contained: one that opens while its thread is inside a task starts with
a ``tracemark.task`` event, so a packet read alone (the packet index, overwrite mode, the
recovery of a crashed process's buffers) names the task of every event in it. Outside
asyncio nothing is written. The event class is declared in every trace's metadata; readers
that know it (:mod:`.reader`) hide these events and give each event its task, others
(babeltrace2) show them as ordinary events.

Names (of events, threads, env entries) go into NUL-terminated strings and TSDL literals:
there :func:`clean_text` also writes a NUL as the four characters ``\\x00``.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .._codegen import compile_generated
from ..markers.fields import AnyValue, Field, ReprText, repr_text

__all__ = [
    "CTX_FIXED",
    "EVENT_HEADER",
    "HEADER",
    "MAGIC",
    "PACKET_FIXED_SIZE",
    "STREAM_TSDL",
    "TASK_EVENT",
    "TASK_FIELDS",
    "TYPES_TSDL",
    "PackTarget",
    "any_parts",
    "clean_text",
    "compile_packer",
    "ctf_field_key",
    "event_class",
    "field_name_from_key",
    "metadata_preamble",
    "open_packet",
    "pack_source",
    "pack_task",
    "packer",
    "valid_text",
    "write_valid_text",
]

MAGIC = 0xC1FC1FC1

#: Packet header: magic, uuid, stream_id, stream_instance_id.
HEADER = struct.Struct("<I16sIQ")
#: Packet context, fixed part: timestamp_begin, timestamp_end, content_size, packet_size,
#: packet_seq_num, events_discarded, event_count, tid, pid. The thread name (a string)
#: follows.
CTX_FIXED = struct.Struct("<QQQQQQQqq")
PACKET_FIXED_SIZE = HEADER.size + CTX_FIXED.size
#: Offsets inside a packet that closing it patches.
OFF_TS_BEGIN = HEADER.size
OFF_TS_END = HEADER.size + 8
OFF_SEQ = HEADER.size + 32
OFF_DISCARDED = HEADER.size + 40
OFF_COUNT = HEADER.size + 48
#: events_discarded, event_count
DISCARDED_COUNT = struct.Struct("<QQ")
#: timestamp_end, content_size, packet_size: patched together when a packet closes.
CLOSE = struct.Struct("<QQQ")
EVENT_HEADER = struct.Struct("<IQ")
#: The end mark packed after every event (never an event id; see tracemark.ctf.ring) and its
#: size: a channel's ``limit`` is its sub-buffer's length less this.
END = 0xFFFFFFFF
END_SIZE = 4

#: The task switch event (see "Task identity" in the module docstring): its name and fields.
TASK_EVENT = "tracemark.task"
TASK_FIELDS = (Field("id", int), Field("name", str))
#: Size of a task event less its name's bytes: header, int64 id, uint32 length.
TASK_EVENT_FIXED = EVENT_HEADER.size + 8 + 4

#: Field type -> TSDL type alias (the aliases are declared in the preamble).
#: Field types stored as a length and a sequence of bytes (text or not).
_SEQUENCES = (str, object, bytes)

TYPE_ALIASES = {
    int: "tm_int",
    float: "tm_float",
    str: "tm_str",
    object: "tm_object",
    bool: "tm_bool",
    bytes: "tm_byte",
}

# --- the ``any`` field type ----------------------------------------------------------------------
#
# A field of type ``any`` (tracemark.markers.fields.AnyValue) is a CTF variant (CTF 1.8 §4.2.7)
# selected by an enumeration tag field written just before it (``__<key>_tag``, uint8): the
# value's kind, then the value as a field of that kind would store it. Both are declared
# inline in the event class, on one line each (TYPES_TSDL stays as it was: older readers
# require it word for word). Options start with "_" (``int``, ``float`` are TSDL keywords;
# readers strip the underscore, babeltrace2 prints ``int``) and the tag's labels are the
# options' names, as babeltrace2 matches them.
#
#   tag  label    payload after the tag byte
#   0    _none    nothing                          None
#   1    _bool    uint8 0/1                        bool
#   2    _int     int64                            int (within int64; a larger one: _repr)
#   3    _float   IEEE double                      float
#   4    _str     uint32 length, UTF-8 text        str (exact type)
#   5    _bytes   uint32 length, bytes             bytes (exact type)
#   6    _repr    uint32 length, UTF-8 text        the repr of anything else (ReprText)

#: The kinds of an ``any`` value, by tag.
ANY_KINDS = ("none", "bool", "int", "float", "str", "bytes", "repr")
ANY_TAG_TSDL = (
    "enum : uint8_t { " + ", ".join(f"_{k} = {i}" for i, k in enumerate(ANY_KINDS)) + " }"
)
ANY_VARIANT_TSDL = (
    "variant <__%s_tag> { struct { } _none; tm_bool _bool; tm_int _int; tm_float _float; "
    "struct { tm_len len; tm_str text[len]; } _str; "
    "struct { tm_len len; tm_byte data[len]; } _bytes; "
    "struct { tm_len len; tm_object text[len]; } _repr; }"
)
#: The struct format of an ``any`` value's tag and payload, by tag (text: by length too).
#: Every kind takes three values, the tag and two more (``0s`` takes an empty bytes and
#: packs nothing), so the packing call has one shape whatever the kinds: no ``*args``.
_ANY_FORMAT = ("B0s0s", "B?0s", "Bq0s", "Bd0s", "BI{}s", "BI{}s", "BI{}s")
_NONE_PARTS = (0, 0, b"", b"")
_INT64_LOW, _INT64_HIGH = -(1 << 63), 1 << 63


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # surrogates: see "What a recorded text becomes"
        return valid_text(text).encode()


def any_parts(value: object) -> tuple[int, int, Any, Any]:
    """How an ``any`` value is packed: ``(shape, tag, x, y)``, where ``tag, x, y`` are the
    struct's values for it and ``shape`` (the key of its struct format, :func:`any_format`)
    is the tag, plus 8 times the length for text and bytes. Never raises (a failing repr is
    recorded as saying so).

    Exact-type checks and one call, so that a port (the recorder's C core) is a switch on
    the type: the table above is the whole contract."""
    t = type(value)
    if t is str:
        try:
            b = value.encode()  # type: ignore[attr-defined]
        except UnicodeEncodeError:
            b = _utf8(value)  # type: ignore[arg-type]
        n = len(b)
        return 4 | n << 3, 4, n, b
    if t is int:
        if _INT64_LOW <= value < _INT64_HIGH:  # type: ignore[operator]
            return 2, 2, value, b""
    elif value is None:
        return _NONE_PARTS
    elif t is float:
        return 3, 3, value, b""
    elif t is bool:
        return 1, 1, value, b""
    elif t is bytes:
        n = len(value)  # type: ignore[arg-type]
        return 5 | n << 3, 5, n, value
    b = _utf8(repr_text(value))
    n = len(b)
    return 6 | n << 3, 6, n, b


def any_format(shape: int) -> str:
    """The struct format of an ``any`` value of this :func:`any_parts` shape."""
    return _ANY_FORMAT[shape & 7].format(shape >> 3)


def _quote(text: str) -> str:
    """A TSDL string literal (CTF §4.1.5 escapes): a character that is not printable is
    written as the ``\\xNN`` escapes of its UTF-8 bytes (the reader decodes them back)."""
    out = clean_text(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return (
        '"'
        + "".join(c if c.isprintable() else "".join(f"\\x{b:02x}" for b in c.encode()) for c in out)
        + '"'
    )


# --- field names in TSDL ------------------------------------------------------------------------
#
# A field name is a Python identifier (tracemark.markers.fields): ASCII or not. A TSDL
# identifier is ASCII only ([A-Za-z_][A-Za-z0-9_]*): babeltrace2 rejects the whole metadata,
# so every process's sub-trace, at the first other byte ("Invalid character"). And three
# words with the leading underscore tracemark adds are TSDL keywords: _Bool, _Complex and
# _Imaginary (babeltrace2 2.0 fails on them; the other keywords, align, struct, int, ...,
# are safe behind the underscore: tested).
#
# Such names are written escaped rather than refused, since Python lets users write them:
# the key is "0" followed by the name with "_" doubled and every other character that is
# not an ASCII letter or digit written "_uXXXX" (4 hex digits) or, beyond U+FFFF,
# "_UXXXXXXXX" (8), lowercase: ``città`` -> ``0citt_u00e0`` (TSDL ``_0citt_u00e0``, shown
# by babeltrace2 as ``0citt_u00e0``), ``Bool`` -> ``0Bool``. Why this cannot collide: a
# plain key starts with a letter (field names do), an escaped key with the digit 0, and
# sequence lengths with "__"; the escaping is decoded left to right without ambiguity, so
# two names never share a key, and the reader gives back the original name. Keys that are
# not in canonical form are a damaged trace.

_RESERVED_KEYS = frozenset({"Bool", "Complex", "Imaginary"})  # "_" + key is a TSDL keyword
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_ESCAPED_KEY = re.compile(r"0((?:[A-Za-z0-9]|__|_u[0-9a-f]{4}|_U[0-9a-f]{8})+)\Z")
_ESCAPE = re.compile(r"_u([0-9a-f]{4})|_U([0-9a-f]{8})|__")


def ctf_field_key(name: str) -> str:
    """The ASCII key under which field ``name`` is written (``_<key>``, ``__<key>_len``):
    the name itself when TSDL can spell it, else its reversible escape.

    Mapped, not refused: Python identifiers may be non-ASCII, so users write
    ``marker("a.b", città=int)`` and ``"größe=%d"``; refusing them would make a valid Python
    name a tracing error. The escape is simple (``città`` -> ``0citt_u00e0``, ``Bool`` ->
    ``0Bool``), stable, needs nothing else in the metadata, is readable in babeltrace2's
    output, and :func:`field_name_from_key` turns it back into the name exactly. Keys of
    plain ASCII names are unchanged, so existing traces and tools see what they saw.
    """
    if _PLAIN_KEY.match(name) and name not in _RESERVED_KEYS:
        return name
    out = ["0"]
    for c in name:
        if c == "_":
            out.append("__")
        elif c.isascii() and c.isalnum():
            out.append(c)
        elif ord(c) <= 0xFFFF:
            out.append(f"_u{ord(c):04x}")
        else:
            out.append(f"_U{ord(c):08x}")
    return "".join(out)


def field_name_from_key(key: str) -> str | None:
    """The field name that :func:`ctf_field_key` wrote as ``key``; None if no name gives
    ``key`` (a damaged or foreign trace)."""
    if not key.isascii():  # written raw by tracemark before escaping (babeltrace2 refuses)
        return key if key.isidentifier() and key[0] != "_" else None
    if key[:1] != "0":
        return key if _PLAIN_KEY.match(key) and key not in _RESERVED_KEYS else None
    m = _ESCAPED_KEY.match(key)
    if not m:
        return None
    name = _ESCAPE.sub(
        lambda e: "_" if e[0] == "__" else chr(min(int(e[1] or e[2], 16), 0x10FFFF)), m[1]
    )
    return name if ctf_field_key(name) == key else None


#: Type aliases; their names tell the reader the declared Python type of a field.
TYPES_TSDL = """typealias integer { size = 8; align = 8; signed = false; } := uint8_t;
typealias integer { size = 32; align = 8; signed = false; } := uint32_t;
typealias integer { size = 64; align = 8; signed = false; } := uint64_t;
typealias integer { size = 64; align = 8; signed = true; } := int64_t;
typealias integer { size = 64; align = 8; signed = true; } := tm_int;
typealias floating_point { exp_dig = 11; mant_dig = 53; align = 8; } := tm_float;
typealias integer { size = 8; align = 8; signed = false; encoding = UTF8; } := tm_str;
typealias integer { size = 8; align = 8; signed = false; encoding = UTF8; } := tm_object;
typealias enum : uint8_t { "false" = 0, "true" = 1 } := tm_bool;
typealias integer { size = 32; align = 8; signed = false; } := tm_len;
typealias integer { size = 8; align = 8; signed = false; base = 16; } := tm_byte;

"""

#: The clock type and the stream class: the fixed layout the reader relies on.
STREAM_TSDL = """typealias integer {
\tsize = 64; align = 8; signed = false;
\tmap = clock.monotonic.value;
} := tm_clock;

stream {
\tid = 0;
\tevent.header := struct {
\t\tuint32_t id;
\t\ttm_clock timestamp;
\t};
\tpacket.context := struct {
\t\ttm_clock timestamp_begin;
\t\ttm_clock timestamp_end;
\t\tuint64_t content_size;
\t\tuint64_t packet_size;
\t\tuint64_t packet_seq_num;
\t\tuint64_t events_discarded;
\t\tuint64_t event_count;
\t\tint64_t tid;
\t\tint64_t pid;
\t\tstring thread_name;
\t};
};
"""


def metadata_preamble(trace_uuid: bytes, clock_offset_ns: int, env: dict[str, str | int]) -> str:
    """The metadata text before any event class: types, trace, env, clock, stream."""
    u = trace_uuid.hex()
    uuid_text = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    env_lines = "".join(
        f"\t{key} = {value if isinstance(value, int) else _quote(str(value))};\n"
        for key, value in env.items()
    )
    offset_s, offset = divmod(clock_offset_ns, 1_000_000_000)
    return f"""/* CTF 1.8 */

{TYPES_TSDL}trace {{
\tmajor = 1;
\tminor = 8;
\tuuid = "{uuid_text}";
\tbyte_order = le;
\tpacket.header := struct {{
\t\tuint32_t magic;
\t\tuint8_t uuid[16];
\t\tuint32_t stream_id;
\t\tuint64_t stream_instance_id;
\t}};
}};

env {{
{env_lines}}};

clock {{
\tname = "monotonic";
\tuuid = "{uuid_text}";
\tdescription = "CLOCK_MONOTONIC, offset to the Unix epoch measured at start";
\tfreq = 1000000000;
\tprecision = 1;
\toffset_s = {offset_s};
\toffset = {offset};
\tabsolute = true;
}};

{STREAM_TSDL}"""


def event_class(name: str, event_id: int, fields: Sequence[Any], doc: str | None = None) -> str:
    """The TSDL ``event`` block of one marker (``fields``: its :class:`Field` tuple).

    The marker's ``doc`` goes in a comment before the block (``/* doc: ... */``; TSDL
    comments are C's, CTF §7.2, so every reader skips them), one line, with ``*/`` broken.
    """
    lines = []
    for f in fields:
        key = ctf_field_key(f.name)
        if f.type is AnyValue:
            lines.append(f"\t\t{ANY_TAG_TSDL} __{key}_tag;\n")
            lines.append(f"\t\t{ANY_VARIANT_TSDL % key} _{key};\n")
        elif f.type in _SEQUENCES:
            lines.append(f"\t\ttm_len __{key}_len;\n")
            lines.append(f"\t\t{TYPE_ALIASES[f.type]} _{key}[__{key}_len];\n")
        else:
            lines.append(f"\t\t{TYPE_ALIASES[f.type]} _{key};\n")
    comment = ""
    if doc:
        text = " ".join(clean_text(doc).split()).replace("*/", "* /")
        comment = f"\n/* doc: {text} */"
    return (
        f"{comment}\nevent {{\n\tname = {_quote(name)};\n\tid = {event_id};\n\tstream_id = 0;\n"
        f"\tfields := struct {{\n{''.join(lines)}\t}};\n}};\n"
    )


def open_packet(
    buf: bytearray,
    trace_uuid: bytes,
    instance_id: int,
    seq: int,
    ts_begin: int,
    tid: int,
    pid: int,
    thread_name: bytes,
) -> int:
    """Write a packet's header and context at the start of ``buf``; return where events go.

    The closing fields (timestamp_end, sizes, events_discarded, event_count) are patched by
    the closer.
    """
    HEADER.pack_into(buf, 0, MAGIC, trace_uuid, 0, instance_id)
    CTX_FIXED.pack_into(buf, HEADER.size, ts_begin, ts_begin, 0, 0, seq, 0, 0, tid, pid)
    end = PACKET_FIXED_SIZE + len(thread_name) + 1
    buf[PACKET_FIXED_SIZE:end] = thread_name + b"\0"
    return end


def close_packet(
    buf: bytearray, content_bytes: int, ts_end: int, discarded: int, count: int
) -> None:
    """Patch the closing fields of a packet whose events end at ``content_bytes``."""
    bits = content_bytes * 8
    CLOSE.pack_into(buf, OFF_TS_END, ts_end, bits, bits)
    DISCARDED_COUNT.pack_into(buf, OFF_DISCARDED, discarded, count)


def pack_task(buf: Any, pos: int, event_id: int, task_id: int, name: bytes) -> int:
    """Pack a ``tracemark.task`` event (and the end mark after it) at ``pos``; return where
    it ends (the end mark excluded). The caller checked there is room and publishes."""
    n = len(name)
    struct.pack_into(f"<IQqI{n}sI", buf, pos, event_id, time.monotonic_ns(), task_id, n, name, END)
    return pos + TASK_EVENT_FIXED + n


def thread_name_bytes(name: str) -> bytes:
    """A thread name as the packet context stores it: UTF-8, no NUL, at most 255 bytes."""
    return clean_text(name).encode()[:255].decode("utf-8", "ignore").encode()


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with each surrogate code point replaced by U+FFFD: what a recorded str
    becomes (see the module's docstring). NULs and everything else are kept."""
    return _SURROGATE.sub("\ufffd", text)


def clean_text(text: str) -> str:
    """``text`` for a NUL-terminated string or a TSDL literal (names, not field values):
    :func:`valid_text`, and each NUL written as the four characters ``\\x00``."""
    return valid_text(text).replace("\0", "\\x00")


# --- packers -----------------------------------------------------------------------------------
#
# One generated function per event class: ``pack(buf, pos, ts, args) -> end`` or, when the
# payload is variable, ``size(args)`` then the pack. Python generates them the way the marker
# core generates firing functions: straight-line code, a precompiled Struct for everything
# fixed-size, and a small cache of Structs keyed by the string lengths for the rest, so one
# event is normally one ``pack_into`` call.

_STRUCT_CACHE_LIMIT = 2048

_FIXED_FORMAT = {int: "q", float: "d", bool: "?"}


class PackTarget(Protocol):
    """What the packing code (:func:`pack_source`, :func:`compile_packer`) reads and writes
    of a channel: the writer/recorder contract, stated here once.

    Reads ``buf`` (the open packet's sub-buffer), ``pos`` (where the next event goes) and
    ``limit`` (the first byte no event may reach: the sub-buffer's end less the end mark's
    :data:`END_SIZE`; -1 when no packet is open). When ``pos + size > limit`` it calls
    ``switch(size)``, which closes the open packet, opens the next and returns the new
    position, or -1 when the event is to be dropped (switch has counted it as discarded).
    It then packs the event and the end mark after it with one ``pack_into`` at ``pos`` and
    publishes by storing ``pos`` (past the event, not the end mark) and then ``count`` (events
    in the open packet), with nothing in between where a thread switch or signal handler could
    run. It writes nothing else. The caller guarantees that no one else packs into the same
    channel meanwhile; readers of the channel (a consumer, a snapshot, a crash recovery of
    the buffer's bytes) may rely on ``pos`` and ``count`` agreeing.
    """

    buf: Any
    pos: int
    limit: int
    count: int

    def switch(self, size: int) -> int: ...


def compile_packer(event_id: int, fields: Sequence[Any]) -> Callable[[tuple, Any], None]:
    """The function ``write(args, ch)`` that records one event of this class in channel ``ch``.

    ``ch`` is a :class:`PackTarget` (what is read and written of it is stated there): an
    interruption half-way leaves the packet's committed content untouched. Values that do
    not fit their type raise ``struct.error``, ``OverflowError``, ``TypeError`` or
    ``ValueError`` before anything is written (``UnicodeEncodeError`` for text with
    surrogates: see :func:`write_valid_text`). The caller guarantees nothing else writes to
    ``ch`` meanwhile (the recorder's nesting rules).
    """
    write = packer(fields)
    return lambda args, ch: write(event_id, args, ch)


#: Field types -> the packer of that signature, ``write(event_id, args, ch)``.
_packers: dict[tuple[type, ...], Callable[[int, tuple, Any], None]] = {}


def packer(fields: Sequence[Any]) -> Callable[[int, tuple, Any], None]:
    """``write(event_id, args, ch)``: :func:`compile_packer`'s function for any event class
    with these field types, compiled once per type signature (and sharing the ``struct``
    cache of every packer of those types, the recorder's generated paths included)."""
    key = tuple(f.type for f in fields)
    write = _packers.get(key)
    if write is None:
        names = [f"a{i}" for i in range(len(fields))]
        body, ns = pack_source(fields, names, "    ")
        unpack = (", ".join(names) + ("," if len(names) == 1 else "")) if names else "_"
        source = f"def write(_id, args, _ch):\n    {unpack} = args\n{body}"
        exec(compile_generated(source, "packer"), ns)
        write = _packers[key] = ns["write"]
    return write


def write_valid_text(ch: Any, event_id: int, fields: Sequence[Any], args: tuple) -> None:
    """Record an event whose text could not be encoded (the packer raised
    ``UnicodeEncodeError``: surrogates in a str, or in an object's repr) with each text made
    :func:`valid_text`, through the packer of its field types (no compiling, no new
    ``struct`` for lengths seen before). Raises like the packer when a value does not fit
    (then nothing is written)."""
    clean = tuple(
        valid_text(a)
        if f.type is str
        else ReprText(valid_text(object_text(a)))
        if f.type is object
        else a
        for f, a in zip(fields, args, strict=True)
    )
    packer(fields)(event_id, clean, ch)


def object_text(value: Any) -> str:
    """What an ``object`` field stores: the value's repr, or the value itself when it is a
    :class:`~tracemark.markers.fields.ReprText` (already a repr)."""
    return value if type(value) is ReprText else repr(value)


#: Struct format template (the variable lengths left as ``{}``) -> its cache of Structs by
#: lengths and the function that fills it: shared by every packer of one type signature,
#: so an event packed by another path (write_valid_text) reuses the Structs already made.
_struct_caches: dict[
    tuple[str, str], tuple[dict[Any, tuple[Callable[..., None], int]], Callable]
] = {}


def _struct_cache(
    template: str, kinds: str
) -> tuple[dict[Any, tuple[Callable[..., None], int]], Callable]:
    """``kinds``: per ``{}`` of the template, ``n`` (a length) or ``a`` (an ``any`` value's
    :func:`any_parts` shape, which stands for its whole format)."""
    cache: dict[Any, tuple[Callable[..., None], int]] = {}

    def make(key: Any) -> tuple[Callable[..., None], int]:
        keys = key if isinstance(key, tuple) else (key,)
        parts = [any_format(k) if c == "a" else k for c, k in zip(kinds, keys, strict=True)]
        s = struct.Struct(template.format(*parts))
        found = (s.pack_into, s.size - END_SIZE)
        if len(cache) < _STRUCT_CACHE_LIMIT:
            cache[key] = found
        return found

    return cache, make


def pack_source(
    fields: Sequence[Any], names: Sequence[str], indent: str
) -> tuple[str, dict[str, Any]]:
    """Source lines (each starting with ``indent``) that pack one event into channel ``_ch``
    (a :class:`PackTarget`) with event id ``_id``, and the globals they need.

    The values are read from the locals ``names`` (one per field, never assigned to); every
    other name the lines use, local or global, starts with ``_`` (which field names cannot),
    so they can run inside a marker's firing function (the recorder fuses them there). They may
    ``return`` early when the event is discarded. They depend on the field *types* only, so
    callers compile them once per type signature; every caller with one type signature shares
    one ``struct`` cache.
    """
    prep: list[str] = []
    fmt_parts: list[str] = ["<IQ"]
    values: list[str] = []
    var: list[str] = []  # the variable lengths (or any shapes), in order
    kinds = ""  # per entry of var: "n" a length, "a" an any value's shape
    for i, (n, f) in enumerate(zip(names, fields, strict=True)):
        t = f.type
        v = f"_v{i}"
        if t is AnyValue:
            # Tag and payload as any_parts makes them; the Struct is found by their shape.
            prep.append(f"_n{i}, _g{i}, _x{i}, {v} = _any({n})\n")
            fmt_parts.append("{}")
            var.append(f"_n{i}")
            kinds += "a"
            values.append(f"_g{i}, _x{i}, {v}")
        elif t in _FIXED_FORMAT:
            fmt_parts.append(_FIXED_FORMAT[t])
            values.append(n)
        else:  # a uint32 length, then the bytes (UTF-8 text for str and object)
            if t is str:
                prep.append(f"{v} = {n}.encode()\n")
            elif t is object:
                prep.append(f"{v} = _text({n}).encode()\n")
            else:
                prep.append(f"{v} = _bytes({n})\n")
            prep.append(f"_n{i} = _len({v})\n")
            fmt_parts.append("I{}s")
            var.append(f"_n{i}")
            kinds += "n"
            values.append(f"_n{i}, {v}")
    lines = list(prep)
    # Every event is packed with the end mark after it (tracemark.ctf.ring: how a crashed
    # process's open packet is read back); the size reserved and published excludes it, the
    # next event overwrites it, and a channel's limit keeps room for it.
    fmt_parts.append("I")
    values.append("_END")
    # The Struct's bound pack_into and its size, found together: no attribute lookups.
    if not var:
        fixed = struct.Struct("".join(fmt_parts))
        ns: dict[str, Any] = {"_pack": fixed.pack_into}
        lines.append(f"_packer, _size = _pack, {fixed.size - END_SIZE}\n")
    else:
        key = var[0] if len(var) == 1 else "(" + ", ".join(var) + ")"
        lines += [
            "try:\n",
            f"    _packer, _size = _cache[{key}]\n",
            "except _KeyError:\n",
            f"    _packer, _size = _make({key})\n",
        ]
        template = "".join(fmt_parts)
        shared = _struct_caches.get((template, kinds))
        if shared is None:
            shared = _struct_caches[template, kinds] = _struct_cache(template, kinds)
        ns = {"_cache": shared[0], "_make": shared[1]}
    lines += [
        "_pos = _ch.pos\n",
        "if _pos + _size > _ch.limit:\n",
        "    _pos = _ch.switch(_size)\n",
        "    if _pos < 0:\n",
        "        return\n",
        f"_packer(_ch.buf, _pos, _id, _now(), {', '.join(values)})\n",
        # Publish: two stores with nothing between them where CPython could switch threads
        # or run a signal handler (no call, no eval-breaker check), so whoever reads the
        # channel sees a position and an event count that agree.
        "_ch.pos = _pos + _size\n",
        "_ch.count += 1\n",
    ]
    ns.update(
        _text=object_text,
        _any=any_parts,
        _now=time.monotonic_ns,
        _len=len,
        _bytes=bytes,
        _KeyError=KeyError,
        _END=END,
    )
    return "".join(indent + line for line in lines), ns
