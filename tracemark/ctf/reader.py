"""A pure-Python reader for the CTF traces tracemark writes (see :mod:`.writer`).

::

    trace = read_trace("out/trace")     # a DIR given to record(): every sub-trace in it
    for ev in trace.events():           # all streams, merged in timestamp order
        print(ev.timestamp, ev.thread, ev.name, ev.fields)

Guarantees
----------
* **Streaming.** Each stream is read one packet at a time; merging holds one decoded event
  per stream. A trace of any size reads in bounded memory.
* **Complete or an error.** Corrupt or truncated input raises :class:`TraceError` whose
  message names the file and the byte offset (for ``metadata``: the character offset); any
  input, however damaged, gives events or that error, never another exception, never a hang
  (every step advances by at least one event header).
* **Checked like babeltrace2, and more.** Magic, trace uuid (babeltrace2 2.0.4 does not check
  it), stream id, sizes in bits within the packet and the file, timestamps never going
  backwards within a stream nor past ``timestamp_end``, event ids declared in the metadata,
  strings valid UTF-8 and terminated inside the packet.
* **Reading by name reads less, shows the same.** ``events(names=...)`` decodes only the
  events it gives; the others are walked and checked as decoding would check them, so its
  result and any TraceError are those of filtering every event. With a packet index
  (:mod:`.index`), packets that hold no wanted event are not read at all.
* **Crafted input is refused, not obeyed.** Only regular files are read (a FIFO, a device or
  a symlink to one is a TraceError, opened without blocking); ``metadata`` may hold at most
  :data:`METADATA_LIMIT` bytes (64 MiB) and a packet at most :data:`PACKET_LIMIT` bytes
  (1 GiB); numbers in the metadata have at most 20 digits.
* **Every event knows its asyncio task.** ``Event.task`` is the :class:`Task` (id, name) the
  event was fired in, None outside a task, read from the ``tracemark.task`` events of its
  own packet (:mod:`.writer`, "Task identity"), which are bookkeeping and not given as
  events themselves. Task ids are never reused within a process, so ``(pid, task)`` names
  one task for the whole trace.
* **A C reader, the same results.** Where the optional extension ``tracemark._creader``
  (tracemark/_reader.c) is built, packets are decoded by it (:attr:`SubTrace.c_layout`):
  the same events, and the same TraceError after the same events; this module stays the
  reference, reads what the C reader declines, and reads everything with
  ``TRACEMARK_CORE=python`` (``tracemark.env.reader()`` says which runs).
* **Schema versions** (:mod:`.schema`): a sub-trace of an older schema version this
  tracemark knows is read (one without the ``tracemark_schema`` env key is schema 1); a
  newer one is a :class:`~.schema.SchemaError` (a TraceError) naming the file, its version,
  the newest read here, and "upgrade tracemark", before its layout is looked at.
* Only tracemark's own layout is read: a metadata file whose fixed part differs (another
  tracer's CTF) is a TraceError saying so, rather than a misreading.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from .._codegen import compile_generated
from ..env import reader as reader_module
from ..markers.fields import ReprText
from . import writer as W
from .status import read_status

__all__ = [
    "METADATA_LIMIT",
    "PACKET_LIMIT",
    "Event",
    "Stream",
    "SubTrace",
    "Task",
    "Trace",
    "TraceError",
    "cut_partial_packet",
    "cut_partial_packets",
    "read_trace",
]


class TraceError(Exception):
    """A trace that is corrupt, truncated, or not one tracemark wrote; ``str()`` names the
    file and the byte offset (``.path``, ``.offset``).

    ``TraceError(path, offset, message)``; ``TraceError(message)`` alone also works (for
    callers that wrap other failures), with ``.path`` and ``.offset`` None.
    """

    path: str | None
    offset: int | None

    def __init__(
        self, path: str | os.PathLike[str], offset: int | None = None, message: str | None = None
    ) -> None:
        if message is None and offset is None:
            self.path = self.offset = None
            super().__init__(str(path))
            return
        self.path = str(path)
        self.offset = offset
        super().__init__(f"{self.path}: at byte offset {offset}: {message}")


class Task(NamedTuple):
    """The asyncio task an event was fired in: the recorder's id for it (a serial number,
    never reused in a process) and its name when the event was recorded. ``str()`` is the
    name (``#ID`` for a task recorded without one)."""

    id: int
    name: str

    def __str__(self) -> str:
        return self.name or f"#{self.id}"


class Event(NamedTuple):
    """One recorded event (a named tuple: built by the reader at C speed)."""

    #: ns since the Unix epoch (the clock's offset applied).
    timestamp: int
    #: The marker's name.
    name: str
    #: field name -> value, in field order; object fields are their repr string, ``any``
    #: fields their typed value (a repr as a :class:`~tracemark.markers.fields.ReprText`).
    fields: dict[str, Any]
    pid: int
    tid: int
    #: The thread's name when the event's packet was opened ('' if unknown).
    thread: str
    #: The asyncio task the event was fired in; None outside a task.
    task: Task | None = None


_new_event = tuple.__new__
#: The task switch event's fields as the metadata declares them.
_TASK_FIELDS = tuple((f.name, f.type.__name__) for f in W.TASK_FIELDS)

#: The largest metadata file read, in bytes (tracemark's are a few KiB per hundred markers).
METADATA_LIMIT = 64 << 20
#: The largest packet read, in bytes (a packet is read whole; recorder sub-buffers are far
#: smaller).
PACKET_LIMIT = 1 << 30


def _open_regular(path: Path, what: str) -> Any:
    """``path`` opened for reading if it is a regular file (symlinks followed), else a
    TraceError. Opened non-blocking first, so a FIFO cannot hang the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TraceError(path, 0, f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise TraceError(path, 0, f"{what} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _number(text: str) -> int:
    """A decimal from the metadata; ValueError beyond 20 digits (int() of a huge one is slow,
    and beyond 4,300 digits raises its own ValueError)."""
    if len(text.lstrip("-")) > 20:
        raise ValueError("number too long")
    return int(text)


# --- metadata ---------------------------------------------------------------------------------

_TYPE_NAMES = {"tm_int": "int", "tm_float": "float", "tm_bool": "bool"}
_SEQUENCE_TYPES = {"tm_byte": "bytes", "tm_str": "str", "tm_object": "object"}
_EVENT = re.compile(
    r'event \{\n\tname = "((?:[^"\\\n]|\\.)*)";\n\tid = (\d+);\n\tstream_id = 0;\n'
    r"\tfields := struct \{\n((?:\t\t[^\n]*\n)*)\t\};\n\};\n"
)
# A field key is ASCII (tracemark.ctf.writer.ctf_field_key), or a raw non-ASCII name in
# traces written before names were escaped.
_FIELD = re.compile(r"\t\t(tm_\w+) _(\w+);\n")
# An ``any`` field: its tag and its variant, each on one line, exactly as the writer puts them.
_ANY_FIELD = re.compile(
    r"\t\t"
    + re.escape(W.ANY_TAG_TSDL)
    + r" __(?P<key>\w+)_tag;\n\t\t"
    + re.escape(W.ANY_VARIANT_TSDL).replace("%s", "(?P=key)")
    + r" _(?P=key);\n"
)
_SEQUENCE = re.compile(
    r"\t\ttm_len __(\w+)_len;\n\t\t(tm_byte|tm_str|tm_object) _\1\[__\1_len\];\n"
)
_UUID = re.compile(r'\ntrace \{\n\tmajor = 1;\n\tminor = 8;\n\tuuid = "([0-9a-f-]{36})";\n')
_CLOCK = re.compile(
    r"\n\tfreq = (\d+);\n\tprecision = \d+;\n\toffset_s = (-?\d+);\n\toffset = (\d+);"
)
_ENV = re.compile(r"\nenv \{\n((?:\t\w+ = [^\n]*;\n)*)\};\n")
_ENV_ITEM = re.compile(r'\t(\w+) = (-?\d+|"(?:[^"\\]|\\.)*");\n')


_STRING_PART = re.compile(r"\\x([0-9a-fA-F]{2})|\\(.)|[^\\]+|\\", re.DOTALL)


def _unquote(text: str) -> str | None:
    """A TSDL string literal's value (the writer's escapes: ``\\xNN`` are the bytes of UTF-8
    text; bytes that are not UTF-8, from older writers, become U+FFFD); None when it ends
    in a lone backslash."""
    out = bytearray()
    for m in _STRING_PART.finditer(text, 1, len(text) - 1):
        if m[1] is not None:
            out.append(int(m[1], 16))
        elif m[2] is not None:
            out += b"\n" if m[2] == "n" else m[2].encode()
        elif m[0] == "\\":
            return None  # a lone backslash at the end
        else:
            out += m[0].encode()
    return out.decode("utf-8", "replace")


class _Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with _open_regular(path, "metadata") as f:
                data = f.read(METADATA_LIMIT + 1)
            if len(data) > METADATA_LIMIT:
                raise TraceError(
                    path, METADATA_LIMIT, f"metadata is larger than {METADATA_LIMIT >> 20} MiB"
                )
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(path, exc.start, "metadata is not valid UTF-8") from None
        except OSError as exc:
            raise TraceError(path, 0, f"cannot read metadata: {exc.strerror or exc}") from None
        self._text = text
        if not text.startswith("/* CTF 1.8 */"):
            raise self._error(0, "metadata does not start with '/* CTF 1.8 */'")
        m = _UUID.search(text)
        if not m:
            raise self._error(0, "metadata has no trace block with a uuid")
        try:
            self.uuid = bytes.fromhex(m[1].replace("-", ""))
        except ValueError:
            raise self._error(m.start(1), "trace uuid is not valid") from None
        if len(self.uuid) != 16:
            raise self._error(m.start(1), "trace uuid is not 16 bytes")
        self.env: dict[str, str | int] = {}
        e = _ENV.search(text)
        if e:
            for item in _ENV_ITEM.finditer(e[1]):
                v = item[2]
                try:
                    value = _unquote(v) if v.startswith('"') else _number(v)
                except ValueError:
                    value = None
                if value is None:
                    raise self._error(e.start(1) + item.start(2), f"env {item[1]} is not valid")
                self.env[item[1]] = value
        # The schema version before the layout: a newer schema may lay its trace out
        # differently, and "upgrade tracemark" is the useful thing to say then.
        from .schema import schema_of

        #: The trace schema version (:mod:`.schema`); a SchemaError if not one read here.
        self.schema = schema_of(path, self.env)
        layout = text.find(W.STREAM_TSDL)
        if layout < 0 or W.TYPES_TSDL not in text:
            layout = -1
        if layout < 0:
            raise TraceError(
                path,
                0,
                "the stream layout is not tracemark's (this reader reads only traces "
                "tracemark wrote; use babeltrace2 for others)",
            )
        c = _CLOCK.search(text)
        try:
            if not c or _number(c[1]) == 0:
                raise ValueError
            self.freq = _number(c[1])
            offset = _number(c[2]) * self.freq + _number(c[3])
        except ValueError:
            raise self._error(c.start() if c else 0, "metadata has no valid clock block") from None
        self.offset_ns = offset * 1_000_000_000 // self.freq
        self.events: dict[int, tuple[str, tuple[tuple[str, str], ...]]] = {}
        pos = layout + len(W.STREAM_TSDL)
        while True:
            start = text.find("\nevent {", pos)
            if start < 0:
                break
            m = _EVENT.match(text, start + 1)
            if not m:
                raise self._error(start + 1, "event class block cannot be parsed")
            fields = self._fields(m[3], m.start(3))
            name = _unquote(f'"{m[1]}"')
            if name is None:
                raise self._error(m.start(1), "event name is not a valid string")
            if len(m[2]) > 10 or int(m[2]) > 0xFFFFFFFF:  # the event header's uint32
                raise self._error(m.start(2), "event id does not fit 32 bits")
            event_id = int(m[2])
            if event_id in self.events:
                raise self._error(m.start(2), f"event id {event_id} declared twice")
            self.events[event_id] = (name, fields)
            pos = m.end() - 1
        if text[pos:].strip() and not text[pos:].strip().startswith("/*"):
            rest = len(text) - len(text[pos:].lstrip())
            if text[rest:].strip():
                raise self._error(rest, "unexpected text after the last event class")

    def _error(self, at: int, message: str) -> TraceError:
        """A TraceError at character ``at`` of the text, reported as a byte offset."""
        return TraceError(self.path, len(self._text[:at].encode()), message)

    def _fields(self, body: str, offset: int) -> tuple[tuple[str, str], ...]:
        out = []
        pos = 0
        while pos < len(body):
            m = _SEQUENCE.match(body, pos)
            if m:
                key, type_name = m[1], _SEQUENCE_TYPES[m[2]]
            elif m := _ANY_FIELD.match(body, pos):
                key, type_name = m["key"], "any"
            else:
                m = _FIELD.match(body, pos)
                if not m or m[1] not in _TYPE_NAMES:
                    raise self._error(offset + pos, "event field cannot be parsed")
                key, type_name = m[2], _TYPE_NAMES[m[1]]
            name = W.field_name_from_key(key)  # an escaped non-ASCII name: see the writer
            if name is None:
                raise self._error(offset + pos, f"event field name {key!r} is not valid")
            if name in (f[0] for f in out):
                raise self._error(offset + pos, f"event field {name!r} declared twice")
            out.append((name, type_name))
            pos = m.end()
        return tuple(out)


# --- decoders, one per event class -------------------------------------------------------------

_FIXED = {"int": ("q", 8), "float": ("d", 8), "bool": ("?", 1)}

_ANY_NUMBERS = {1: struct.Struct("<?"), 2: struct.Struct("<q"), 3: struct.Struct("<d")}


def decode_any(data: bytes, pos: int, end: int) -> tuple[Any, int]:
    """An ``any`` field's value at ``pos`` (writer: "the ``any`` field type") and where it
    ends: None, a bool, int, float, str, bytes, or a :class:`ReprText` for a repr. Raises
    ValueError (past ``end``, an unknown tag, text that is not UTF-8), struct.error or
    IndexError on damaged data, like the rest of the decoding; the checker and the skipper
    call it too, so all three agree on what is damaged."""
    if pos >= end:
        raise ValueError("past the end")
    tag = data[pos]
    pos += 1
    if tag == 0:
        return None, pos
    number = _ANY_NUMBERS.get(tag)
    if number is not None:
        value = number.unpack_from(data, pos)[0]
        pos += number.size
    elif 4 <= tag <= 6:
        (n,) = _U32.unpack_from(data, pos)
        pos += 4 + n
        if pos > end:
            raise ValueError("past the end")
        raw = data[pos - n : pos]
        value = raw if tag == 5 else raw.decode() if tag == 4 else ReprText(raw.decode())
    else:
        raise ValueError(f"unknown any tag {tag}")
    if pos > end:
        raise ValueError("past the end")
    return value, pos


def field_decoding(
    fields: tuple[tuple[str, str], ...],
    ns: dict[str, Any],
    indent: str = "    ",
    raw_text: bool = False,
    skip: bool = False,
) -> list[str]:
    """The layout code of one event class, shared by every decoder made from it: source
    lines that read its fields from ``data`` at ``pos`` into the locals ``v0``, ``v1``, ...
    (in field order) and leave ``pos`` after the payload; they raise struct.error,
    ValueError (a length past ``end``, invalid UTF-8) or IndexError on damaged data. Runs of
    fixed-size fields are read by one ``struct`` each; the Structs go into ``ns``.

    ``raw_text``: str and object fields are left as their UTF-8 bytes, not decoded; the code
    that follows must then check them (decode them) before it gives them out, for the
    UTF-8 check to stay (an exporter caching per byte string checks each once). ``skip``:
    no locals, only ``pos`` moved past the payload, checked the same way (the code that
    follows then owns the UTF-8 check of the payload's text, as with ``raw_text``)."""
    lines: list[str] = []
    group: list[str] = []
    fmt = ""
    size = 0
    ns["_U32"] = _U32
    ns["_ANY"] = decode_any

    def flush() -> None:
        nonlocal group, fmt, size
        if group:
            if not skip:
                name = f"_S{sum(1 for k in ns if k.startswith('_S'))}"
                ns[name] = struct.Struct("<" + fmt)
                lines.append(f"{indent}{', '.join(group)}, = {name}.unpack_from(data, pos)\n")
            lines.append(f"{indent}pos += {size}\n")
            lines.append(f"{indent}if pos > end: raise ValueError('past the end')\n")
        group, fmt, size = [], "", 0

    for i, (_, type_name) in enumerate(fields):
        v = f"v{i}"
        if type_name in _FIXED:
            c, n = _FIXED[type_name]
            group.append(v)
            fmt += c
            size += n
        elif type_name == "any":  # a tag, then its kind's value: decoded (hence checked)
            flush()
            lines.append(f"{indent}{'_' if skip else v}, pos = _ANY(data, pos, end)\n")
        else:  # a length, then bytes (UTF-8 text for str and object)
            flush()
            lines.append(f"{indent}n, = _U32.unpack_from(data, pos)\n{indent}pos += 4\n")
            lines.append(f"{indent}if pos + n > end: raise ValueError('past the end')\n")
            text = ".decode()" if type_name != "bytes" and not raw_text else ""
            if not skip:
                lines.append(f"{indent}{v} = data[pos:pos + n]{text}\n")
            lines.append(f"{indent}pos += n\n")
    flush()
    return lines


def _compile_decoder(fields: tuple[tuple[str, str], ...]) -> Callable[[bytes, int, int], Any]:
    """``decode(data, pos, end) -> (fields dict, new pos)``; raises struct.error, ValueError
    (a length past ``end``, invalid UTF-8) or IndexError on damaged data."""
    ns: dict[str, Any] = {}
    lines = ["def decode(data, pos, end):\n", *field_decoding(fields, ns)]
    items = ", ".join(f"{name!r}: v{i}" for i, (name, _) in enumerate(fields))
    lines.append(f"    return {{{items}}}, pos\n")
    exec(compile_generated("".join(lines), "decoder"), ns)
    return ns["decode"]


def _compile_skipper(fields: tuple[tuple[str, str], ...]) -> Callable[[bytes, int, int], int]:
    """``skip(data, pos, end) -> new pos``: the end of an event's payload, nothing decoded;
    raises like the decoder on damaged data."""
    steps = [_FIXED[t][1] if t in _FIXED else -2 if t == "any" else -1 for _, t in fields]
    u32 = struct.Struct("<I").unpack_from

    def skip(data: bytes, pos: int, end: int) -> int:
        for step in steps:
            if step > 0:
                pos += step
            elif step == -2:
                pos = decode_any(data, pos, end)[1]
            else:
                pos += 4 + u32(data, pos)[0]
            if pos > end:
                raise ValueError("past the end")
        return pos

    return skip


def _compile_checker(fields: tuple[tuple[str, str], ...]) -> Callable[[bytes, int, int], int]:
    """``check(data, pos, end) -> new pos``: what the decoder checks, without building values.

    It fails exactly where the decoder fails (a length past ``end``, text that is not UTF-8:
    ValueError or struct.error), so an event that is walked over instead of decoded (one that
    ``Trace.events(names=...)`` does not show) is still checked, and a trace is "complete or
    an error" whatever is shown of it.
    """
    lines = ["def check(data, pos, end):\n"]
    fixed = 0

    def flush() -> None:
        nonlocal fixed
        if fixed:
            lines.append(f"    pos += {fixed}\n    if pos > end: raise ValueError\n")
        fixed = 0

    for _, type_name in fields:
        if type_name in _FIXED:
            fixed += _FIXED[type_name][1]
            continue
        flush()
        if type_name == "any":
            lines.append("    pos = _any(data, pos, end)[1]\n")
            continue
        lines.append("    n, = _u32(data, pos)\n    pos += 4\n")
        lines.append("    if pos + n > end: raise ValueError\n")
        if type_name != "bytes":
            lines.append("    _str(data[pos:pos + n], 'utf-8')\n")
        lines.append("    pos += n\n")
    flush()
    lines.append("    return pos\n")
    ns: dict[str, Any] = {"_u32": struct.Struct("<I").unpack_from, "_str": str, "_any": decode_any}
    exec(compile("".join(lines), "<tracemark checker>", "exec"), ns)
    return ns["check"]


class _Backwards(Exception):
    """An event's timestamp out of order (walk_packet says so with a TraceError)."""


def compile_handlers(
    sub: SubTrace,
    handler: Callable[[int, str, tuple[tuple[str, str], ...], dict[str, Any]], tuple[str, Any]],
    ns: dict[str, Any],
    raw_text: bool = False,
    prologue: str = "",
    only: Collection[int] | None = None,
) -> Callable[[Any], dict[int, Callable]]:
    """The handlers :meth:`Stream.walk_packet` calls, for every event class of ``sub``:
    returns ``bind(T) -> {event id: handler}``, handlers made for one ``T`` (what the
    caller keeps per track: they see it and what ``bind`` sets up from it as closure
    variables, which Python reads fastest).

    ``handler(event id, name, fields, ns)`` returns two pieces of source: lines run once in
    ``bind`` (indented 4: constants for that class and ``T``), and lines run per event after
    the class's shared layout code (:func:`field_decoding`, indented 8: the fields are in
    ``v0``, ``v1``...; ``p0`` is where the payload starts, ``pos`` where it ends and must be
    left; ``ts`` is the event's ns since the epoch). The second may instead be a list of
    (suffix, lines, skip): variants of the handler, each with the class's layout code (only
    moving ``pos`` when ``skip``), named ``h<id><suffix>``; the first is the one in the
    table, which they see as ``HANDLERS`` (a variant may put another in its place).
    ``prologue``: lines run first in ``bind`` (indented 4). ``ns``: the names all may use.
    ``raw_text``: as for :func:`field_decoding`. ``only``: the event ids the walked packets
    can hold (a superset; None: every class of the metadata). A program may declare
    thousands of markers and fire a few: the classes it never fired are not compiled."""
    setup: list[str] = []
    defs: list[str] = []
    table = []
    for eid, (name, fields) in sub.meta.events.items():
        if only is not None and eid not in only:
            continue
        once, body = handler(eid, name, fields, ns)
        setup.append(once)
        variants = [("", body, False)] if isinstance(body, str) else body
        for suffix, lines, skip in variants:
            defs.append(f"    def h{eid}{suffix}(data, pos, end, ts):\n        p0 = pos\n")
            defs += field_decoding(fields, ns, "        ", raw_text or skip, skip)
            defs.append(lines)
            defs.append("        return pos\n")
        table.append(f"{eid}: h{eid}{variants[0][0]}")
    source = (
        "def bind(T):\n    HANDLERS = {}\n"
        + prologue
        + "".join(setup)
        + "".join(defs)
        + f"    HANDLERS.update({{{', '.join(table)}}})\n"
        + "    return HANDLERS\n"
    )
    exec(compile_generated(source, "handlers"), ns)
    return ns["bind"]


class _Failure:
    """Where a source of :func:`merge_chunks` failed: sorted as its last event was."""

    __slots__ = ("exc", "ts")

    def __init__(self, ts: float, exc: BaseException) -> None:
        self.ts, self.exc = ts, exc

    def __getitem__(self, i: int) -> float:  # the sort key, as Event[0]
        return self.ts


def merge_chunks(sources: Sequence[Iterator[list[Any]]]) -> Iterator[Any]:
    """The events of ``sources`` (each yields lists of events in timestamp order) merged in
    timestamp order, ties in source order: exactly ``heapq.merge`` over the sources' events
    by timestamp, and an exception a source raises surfaces after the same events as there
    (right after that source's last event). But sorted a block at a time, in C (a stable
    ``list.sort``), instead of one heap operation in Python per event (1M events from 4
    threads: 1.4 s -> 0.2 s).

    How: every event before ``bound``, the least of the sources' last buffered timestamps,
    can go (no source holds an earlier one unread); the sources whose last is ``bound`` read
    their next list before any event at ``bound`` goes, so a source is never drained before
    its next list was read: its exception is found before any later event goes out, and sits
    where its last event was (a :class:`_Failure`). A finished source bounds nothing.
    Memory: one list per source, as ``heapq.merge`` over the sources' own chunked readers."""
    key = itemgetter(0)
    # Per source, in source order: [buffered events, whether it is finished].
    state: list[list[Any]] = []
    failures = 0  # _Failure objects buffered

    def refill(entry: list[Any], it: Iterator[list[Any]]) -> None:
        nonlocal failures
        buf = entry[0]
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                entry[1] = True
                return
            except Exception as exc:
                entry[1] = True
                buf.append(_Failure(buf[-1][0] if buf else -math.inf, exc))
                failures += 1
                return
            if chunk:
                buf.extend(chunk)
                return

    its = list(sources)
    for it in its:
        entry: list[Any] = [[], False]
        refill(entry, it)
        state.append(entry)
    while True:
        lasts = [buf[-1][0] for buf, finished in state if not finished]
        bound = min(lasts) if lasts else math.inf
        block: list[Any] = []
        for entry in state:
            buf = entry[0]
            k = len(buf) if not lasts else bisect.bisect_left(buf, bound, key=key)
            if k:
                block += buf[:k]
                del buf[:k]
        if block:
            block.sort(key=key)
            if failures:
                for i, ev in enumerate(block):
                    if type(ev) is _Failure:
                        yield from block[:i]
                        raise ev.exc
            yield from block
        if not lasts:
            return
        for entry, it in zip(state, its, strict=True):
            if not entry[1] and entry[0][-1][0] == bound:
                refill(entry, it)


def fixed_event_size(fields: tuple[tuple[str, str], ...]) -> int | None:
    """The size in bytes of an event of this class, header included, if it is fixed."""
    if any(t not in _FIXED for _, t in fields):
        return None
    return _EVENT_HEADER.size + sum(_FIXED[t][1] for _, t in fields)


# --- streams -----------------------------------------------------------------------------------

_HEADER = W.HEADER
_CTX = W.CTX_FIXED
_EVENT_HEADER = W.EVENT_HEADER
_FIXED_SIZE = W.PACKET_FIXED_SIZE


_U32 = struct.Struct("<I")
_first = itemgetter(0)
_second = itemgetter(1)
_STRIDERS: dict[int, struct.Struct] = {}


def _strider(size: int) -> struct.Struct:
    """The Struct that reads (id, timestamp) from events of ``size`` bytes laid end to end."""
    s = _STRIDERS.get(size)
    if s is None:
        s = _STRIDERS[size] = struct.Struct(f"<IQ{size - _EVENT_HEADER.size}x")
    return s


#: Events the C reader builds per call (a packet is decoded in chunks of this many).
_CHUNK = 4096
#: Events per list of the pure reader's :meth:`Stream.iter_chunks` (memory: each source of a
#: merge holds about two).
_PURE_CHUNK = 512


def _c_layout(meta: _Metadata, task_eid: int) -> Any:
    """The C reader's layout for ``meta``'s event classes, or None (see SubTrace.c_layout)."""
    module = reader_module()[0]
    if module is None:
        return None
    global _creader_decode
    if _creader_decode is None:
        _creader_decode = module.decode  # type: ignore[attr-defined]
    return module.make_layout(  # type: ignore[attr-defined]
        meta.events, task_eid, meta.offset_ns, meta.freq, Event, Task, ReprText
    )


_creader_decode: Any = None


class _Packet:
    __slots__ = (
        "content_end",
        "count",
        "discarded",
        "offset",
        "pid",
        "seq",
        "size",
        "start",
        "thread",
        "tid",
        "ts_begin",
        "ts_end",
    )


def c_decode_error(path: Path, packet_offset: int, error: tuple[int, int, int]) -> TraceError:
    """The TraceError the Python reader raises, for the C reader's ``(kind, at, event_id)``
    (tracemark/_reader.c: 1 unknown id, 2 damaged, 3 timestamp; ``at`` from the packet's
    start, the event's header for a timestamp error)."""
    kind, at, event_id = error
    if kind == 1:
        message = f"event id {event_id} is not in the metadata"
    elif kind == 2:
        message = "event runs past the packet content or is damaged"
    else:
        at += 4
        message = "event timestamp goes backwards or past the packet's timestamp_end"
    return TraceError(path, packet_offset + at, message)


def _open(path: Path) -> Any:
    return _open_regular(path, "stream")


def _read_packet(path: Path, p: _Packet) -> bytes:
    """The bytes of packet ``p`` of stream file ``path`` up to its content end."""
    with _open(path) as f:
        f.seek(p.offset)
        return f.read(p.content_end)


class Stream:
    """One stream file: one channel (a thread's, at one nesting level) of one process. A
    channel is handed on when its thread ends, so a stream may hold the packets of several
    threads in turn (each packet names its own: :attr:`tids`); ``tid`` and ``pid`` are its
    first packet's."""

    def __init__(self, sub: SubTrace, path: Path) -> None:
        self.sub = sub
        self.path = path
        self._packets: list[_Packet] = []
        self._index()
        first = self._packets[0] if self._packets else None
        self.pid: int = first.pid if first else int(sub.env.get("vpid", 0) or 0)
        self.tid: int = first.tid if first else 0
        #: The thread's name (as of its last packet: a thread may be renamed).
        self.thread: str = self._packets[-1].thread if self._packets else ""
        self.instance_id = -1

    @property
    def packets(self) -> int:
        """Number of packets in the file."""
        return len(self._packets)

    @property
    def tids(self) -> set[int]:
        """The threads whose packets the stream holds."""
        return {p.tid for p in self._packets}

    @property
    def discarded(self) -> int:
        """Events discarded in this stream (the last packet's free-running counter)."""
        return self._packets[-1].discarded if self._packets else 0

    @property
    def lost_packets(self) -> int:
        """Packets missing from the sequence, before the first one included (overwritten in
        overwrite mode)."""
        if not self._packets:
            return 0
        return self._packets[-1].seq + 1 - len(self._packets)  # numbering starts at 0

    @property
    def events(self) -> int:
        """Number of events in the stream (from the packet contexts: no decoding; iterating
        checks every packet holds as many as its context says), ``tracemark.task`` events
        included (bookkeeping, which iterating does not give)."""
        return sum(p.count for p in self._packets)

    def _index(self) -> None:
        """Read every packet's header and context; check they fit the file and each other.

        CTF §5.1: a packet starts with the magic and the trace uuid; §5.2: content_size and
        packet_size are in bits, content_size <= packet_size; a stream's packets follow each
        other in time (timestamp_begin/end) and packet_seq_num order; events_discarded is a
        free-running counter, so it never decreases.
        """
        path = self.path
        f = _open(path)
        size = os.fstat(f.fileno()).st_size
        uuid = self.sub.meta.uuid
        offset = 0
        instance = None
        prev: _Packet | None = None
        with f:
            while offset < size:
                f.seek(offset)
                head = f.read(_FIXED_SIZE + 256)
                if len(head) < _FIXED_SIZE:
                    raise TraceError(
                        path,
                        offset,
                        "truncated packet header (a process killed while writing leaves this; "
                        "tracemark.ctf.cut_partial_packets() cuts it)",
                    )
                magic, puuid, stream_id, inst = _HEADER.unpack_from(head, 0)
                if magic != W.MAGIC:
                    raise TraceError(path, offset, f"bad packet magic {magic:#010x}")
                if puuid != uuid:
                    raise TraceError(path, offset + 4, "packet uuid differs from the trace uuid")
                if stream_id != 0:
                    raise TraceError(path, offset + 20, f"unknown stream id {stream_id}")
                if instance is None:
                    instance = inst
                elif inst != instance:
                    raise TraceError(path, offset + 24, "stream_instance_id changes in a file")
                p = _Packet()
                (
                    p.ts_begin,
                    p.ts_end,
                    content,
                    psize,
                    p.seq,
                    p.discarded,
                    p.count,
                    p.tid,
                    p.pid,
                ) = _CTX.unpack_from(head, _HEADER.size)
                where = offset + _HEADER.size
                if content % 8 or psize % 8 or content > psize:
                    raise TraceError(path, where + 16, "content_size/packet_size are invalid")
                content //= 8
                psize //= 8
                if psize > PACKET_LIMIT:
                    raise TraceError(
                        path, where + 24, f"packet_size is beyond {PACKET_LIMIT >> 20} MiB"
                    )
                if content < _FIXED_SIZE + 1:
                    raise TraceError(path, where + 16, "content_size is smaller than the header")
                if offset + psize > size:
                    raise TraceError(
                        path,
                        offset,
                        f"truncated packet: {psize} bytes declared, {size - offset} in the file "
                        "(a process killed while writing leaves this; "
                        "tracemark.ctf.cut_partial_packets() cuts it)",
                    )
                z = head.find(b"\0", _FIXED_SIZE, content)
                if z < 0:
                    raise TraceError(path, offset + _FIXED_SIZE, "thread name not terminated")
                try:
                    p.thread = head[_FIXED_SIZE:z].decode()
                except UnicodeDecodeError:
                    raise TraceError(path, offset + _FIXED_SIZE, "thread name invalid") from None
                if p.ts_end < p.ts_begin:
                    raise TraceError(path, where + 8, "timestamp_end is before timestamp_begin")
                if prev is not None:
                    if p.ts_begin < prev.ts_end:
                        raise TraceError(path, where, "packet begins before the previous ends")
                    if p.seq <= prev.seq:
                        raise TraceError(path, where + 32, "packet_seq_num does not increase")
                    if p.discarded < prev.discarded:
                        raise TraceError(path, where + 40, "events_discarded goes backwards")
                p.offset = offset
                p.start = z + 1
                p.content_end = content
                p.size = psize
                self._packets.append(p)
                prev = p
                offset += psize
        self.instance_id = instance if instance is not None else -1

    def iter_events(self, packets: list[_Packet] | None = None) -> Iterator[Event]:
        """This stream's events in order, read one packet at a time (or those of
        ``packets``, a part of this stream's packet list)."""
        fast = self.sub.c_layout is not None  # one generator less per event
        for p in self._packets if packets is None else packets:
            # One open file per packet read, not per stream: a trace of thousands of streams
            # is merged without thousands of open files (a packet is ~256 KiB: the open is
            # noise next to decoding it).
            data = _read_packet(self.path, p)
            if fast and len(data) >= p.content_end:
                yield from self._c_decode_matching(p, data, None)
            else:
                yield from self._decode_matching(p, data, None)

    def iter_chunks(self, packets: list[_Packet] | None = None) -> Iterator[list[Event]]:
        """:meth:`iter_events` in lists (a chunk of the C reader, or a packet's events), for
        :func:`merge_chunks`: the same events in the same order, and the same TraceError
        after the same events (those before it in the failing packet come first)."""
        fast = self.sub.c_layout is not None
        for p in self._packets if packets is None else packets:
            data = _read_packet(self.path, p)
            if fast and len(data) >= p.content_end:
                yield from self._c_chunks(p, data, None)
                continue
            chunk: list[Event] = []
            try:
                for event in self._decode_matching(p, data, None):
                    chunk.append(event)
                    if len(chunk) == _PURE_CHUNK:
                        yield chunk
                        chunk = []
            except TraceError:
                if chunk:
                    yield chunk
                raise
            if chunk:
                yield chunk

    def iter_matching(
        self,
        wanted: frozenset[int],
        known: Sequence[frozenset[int] | None] | None = None,
        start: int = 0,
    ) -> Iterator[Event]:
        """This stream's events whose id is in ``wanted``, in order: exactly those that
        :meth:`iter_events` gives, and the same TraceError at the same point of them
        (from its packet number ``start`` on).

        Only packets that hold a wanted id are decoded, and in them only the wanted events;
        the others are walked and checked (:meth:`packet_ids`, :func:`_compile_checker`),
        never decoded. ``known``: the id set of each packet as a packet index recorded it
        (:mod:`.index`; None for a packet to walk); a packet it says holds no wanted id is
        not read at all.
        """
        packets = self._packets
        if known is not None and len(known) != len(packets):
            known = None
        for i in range(start, len(packets)):
            p = packets[i]
            data = None
            if known is not None:
                ids = known[i]
            else:
                data = _read_packet(self.path, p)
                ids = self.packet_ids(p, data)
            if ids is not None and ids.isdisjoint(wanted):
                continue  # checked, and nothing in it to show
            if data is None:
                data = _read_packet(self.path, p)
            yield from self._decode_matching(p, data, wanted)

    def _decode_matching(
        self, p: _Packet, data: bytes, wanted: frozenset[int] | None
    ) -> Iterator[Event]:
        """The events of packet ``p`` (its bytes ``data``) whose id is in ``wanted`` (all
        when it is None), every event checked; the others are walked over by their
        checkers, never decoded."""
        path = self.path
        sub = self.sub
        decoders = sub.decoders
        checks = sub.checks
        offset_ns = sub.meta.offset_ns
        scale = sub.meta.freq
        unpack_header = _EVENT_HEADER.unpack_from
        header_size = _EVENT_HEADER.size
        if len(data) < p.content_end:
            raise TraceError(path, p.offset, "stream file shrank while being read")
        if sub.c_layout is not None:
            yield from self._c_decode_matching(p, data, wanted)
            return
        pos = p.start
        end = p.content_end
        pid, tid, thread = p.pid, p.tid, p.thread
        task_eid = sub.task_event_id
        task = None  # a packet starts outside every task (writer: "Task identity")
        n = 0
        # Stream._index checked each packet begins at or after the previous one's end, so
        # a timestamp of an earlier packet is never above this one's ts_begin.
        last = p.ts_begin
        while pos < end:
            at = pos
            shown = False
            try:
                event_id, ts = unpack_header(data, pos)
                pos += header_size
                if pos > end:
                    raise ValueError
                if event_id == task_eid:  # bookkeeping: the task of the events after it
                    fields, pos = decoders[event_id][1](data, pos, end)
                    task = Task(fields["id"], fields["name"]) if fields["id"] else None
                elif wanted is None or event_id in wanted:
                    name, decode = decoders[event_id]
                    fields, pos = decode(data, pos, end)
                    shown = True
                else:
                    pos = checks[event_id](data, pos, end)
            except KeyError:
                raise TraceError(
                    path, p.offset + at, f"event id {event_id} is not in the metadata"
                ) from None
            except (struct.error, ValueError, IndexError):
                raise TraceError(
                    path, p.offset + at, "event runs past the packet content or is damaged"
                ) from None
            if ts < last or ts > p.ts_end:
                raise TraceError(
                    path,
                    p.offset + at + 4,
                    "event timestamp goes backwards or past the packet's timestamp_end",
                )
            last = ts
            n += 1
            if shown:
                if scale != 1_000_000_000:
                    ts = ts * 1_000_000_000 // scale
                yield _new_event(Event, (ts + offset_ns, name, fields, pid, tid, thread, task))
        if n != p.count:
            raise TraceError(
                path,
                p.offset + W.OFF_COUNT,
                f"packet holds {n} events, its context says {p.count}",
            )

    def _c_decode_matching(
        self, p: _Packet, data: bytes, wanted: frozenset[int] | None
    ) -> Iterator[Event]:
        """:meth:`_decode_matching` by the C reader (tracemark/_reader.c), a chunk of
        events at a time: the same events, the same TraceError after the same events."""
        for events in self._c_chunks(p, data, wanted):
            yield from events

    def _c_chunks(
        self, p: _Packet, data: bytes, wanted: frozenset[int] | None
    ) -> Iterator[list[Event]]:
        """:meth:`_c_decode_matching`'s events as the C reader makes them, in lists."""
        decode = _creader_decode
        layout = self.sub.c_layout
        pos, end, last, task, n = p.start, p.content_end, p.ts_begin, None, 0
        pid, tid, thread, ts_end = p.pid, p.tid, p.thread, p.ts_end
        chunk = 1  # the first event alone (bounds() reads no more), then chunks
        while True:
            events, pos, last, k, task, error = decode(
                layout, data, pos, end, last, ts_end, pid, tid, thread, task, wanted, chunk
            )
            chunk = _CHUNK
            n += k
            if events:
                yield events
            if error is not None:
                raise c_decode_error(self.path, p.offset, error)
            if pos >= end:
                break
        if n != p.count:
            raise TraceError(
                self.path,
                p.offset + W.OFF_COUNT,
                f"packet holds {n} events, its context says {p.count}",
            )

    # --- the fast path (exporters) ----------------------------------------------------

    def packet_list(self) -> list[_Packet]:
        """The stream's packets (their headers, as :meth:`_index` read them), in order."""
        return self._packets

    def read_packet(self, p: _Packet) -> bytes:
        """The bytes of packet ``p`` of this stream, up to its content end."""
        return _read_packet(self.path, p)

    def walk_packet(
        self, p: _Packet, data: bytes, handlers: dict[int, Callable]
    ) -> tuple[int, int | None]:
        """The fast path: every event of packet ``p`` (its bytes ``data``) handed to
        ``handlers[event id](data, pos, end, ts)``, which decodes the payload at ``pos``
        (with :func:`field_decoding`'s code, see :func:`compile_handlers`), does what it
        does with the fields, and returns the position after them; ``ts`` is ns since the
        epoch. No Event is built. Returns how many events were handled and the last one's
        timestamp (ns since the epoch; None if there is none).

        Checked as :meth:`iter_events` checks, with the same TraceError messages: an event
        that fails a check is not handed on, and the TraceError says where (its
        ``handled`` attribute: how many events before it were)."""
        path = self.path
        meta = self.sub.meta
        offset_ns = meta.offset_ns
        scale = meta.freq
        unit = scale == 1_000_000_000
        unpack_header = _EVENT_HEADER.unpack_from
        header_size = _EVENT_HEADER.size
        if len(data) < p.content_end:
            raise TraceError(path, p.offset, "stream file shrank while being read")
        pos = p.start
        end = p.content_end
        last = p.ts_begin
        ts_end = p.ts_end
        n = 0
        at = pos
        event_id = -1
        try:
            while pos < end:
                at = pos
                event_id, ts = unpack_header(data, pos)
                pos += header_size
                if pos > end:
                    raise ValueError
                if ts < last or ts > ts_end:
                    raise _Backwards
                last = ts
                handler = handlers[event_id]
                pos = handler(
                    data,
                    pos,
                    end,
                    ts + offset_ns if unit else ts * 1_000_000_000 // scale + offset_ns,
                )
                n += 1
        except KeyError:
            error = TraceError(path, p.offset + at, f"event id {event_id} is not in the metadata")
        except _Backwards:
            if event_id not in handlers:
                error = TraceError(
                    path, p.offset + at, f"event id {event_id} is not in the metadata"
                )
            else:
                error = TraceError(
                    path,
                    p.offset + at + 4,
                    "event timestamp goes backwards or past the packet's timestamp_end",
                )
        except (struct.error, ValueError, IndexError):
            error = TraceError(
                path, p.offset + at, "event runs past the packet content or is damaged"
            )
        else:
            if n == p.count:
                if not n:
                    return 0, None
                return n, last + offset_ns if unit else last * 1_000_000_000 // scale + offset_ns
            error = TraceError(
                path,
                p.offset + W.OFF_COUNT,
                f"packet holds {n} events, its context says {p.count}",
            )
        # What was handled, for the caller to go on from (a walk of the headers again: the
        # loop above keeps no more than it needs).
        error.handled = n  # type: ignore[attr-defined]
        done = None
        pos = p.start
        skips = self.sub.skips
        for _ in range(n):
            event_id, done = unpack_header(data, pos)
            pos = skips[event_id](data, pos + header_size, end)
        if done is not None:
            done = (done if unit else done * 1_000_000_000 // scale) + offset_ns
        error.last = done  # type: ignore[attr-defined]
        raise error

    def packet_ids(self, p: _Packet, data: bytes) -> frozenset[int] | None:
        """The event ids packet ``p`` (its bytes ``data``) holds, from a walk of its event
        headers that checks all that decoding it would (:meth:`iter_events`); None when
        that walk fails: such a packet must be decoded, for its error to be reported.

        A packet whose first event is of a fixed-size class and whose content is exactly
        ``event_count`` such events is walked at C speed (one ``iter_unpack`` of ids and
        timestamps); it is accepted that way only if every id found is of a class of that
        same size, which is what a walk one event at a time would have found.
        """
        sub = self.sub
        start, end, count = p.start, p.content_end, p.count
        if len(data) < end:
            return None
        if count == 0 or start >= end:
            return frozenset() if count == 0 and start == end else None
        if start + 4 <= end:
            size = sub.fixed_sizes.get(_U32.unpack_from(data, start)[0])
            if size is not None and end - start == count * size:
                rows = _strider(size).iter_unpack(memoryview(data)[start:end])
                ids_ts = list(rows)
                ids = frozenset(map(_first, ids_ts))
                sizes = sub.fixed_sizes
                if all(sizes.get(i) == size for i in ids):
                    ts = list(map(_second, ids_ts))
                    if ts[0] >= p.ts_begin and ts[-1] <= p.ts_end and ts == sorted(ts):
                        return ids
                    return None
        checks = sub.checks
        unpack_header = _EVENT_HEADER.unpack_from
        header_size = _EVENT_HEADER.size
        ts_end = p.ts_end
        last = p.ts_begin
        found = set()
        pos = start
        n = 0
        try:
            while pos < end:
                event_id, ts = unpack_header(data, pos)
                pos += header_size
                if pos > end:
                    return None
                pos = checks[event_id](data, pos, end)
                if ts < last or ts > ts_end:
                    return None
                last = ts
                n += 1
                found.add(event_id)
        except (KeyError, struct.error, ValueError, IndexError):
            return None
        return frozenset(found) if n == count else None

    def bounds(self) -> tuple[int | None, int | None]:
        """The timestamps of the first and last event. Decodes one event for the first; the
        last packet is only walked (event headers and field lengths), not decoded: a reader
        that iterates the events and asks for the bounds decodes each event once."""
        first = last = None
        for p in self._packets:
            for ev in self.iter_events([p]):
                first = ev.timestamp
                break
            if first is not None:
                break
        for p in reversed(self._packets):
            last = self._last_timestamp(p)
            if last is not None:
                break
        return first, last

    def _last_timestamp(self, p: _Packet) -> int | None:
        """The timestamp of ``p``'s last event (None if it has none), without decoding."""
        if not p.count:
            return None
        try:
            with _open(self.path) as f:
                f.seek(p.offset)
                data = f.read(p.content_end)
            skips = self.sub.skips
            pos, end, ts = p.start, p.content_end, None
            while pos < end:
                event_id, ts = _EVENT_HEADER.unpack_from(data, pos)
                pos = skips[event_id](data, pos + _EVENT_HEADER.size, end)
        except (OSError, TraceError, KeyError, struct.error, ValueError, IndexError):
            ts = None
        if ts is None or pos != end:  # damaged: decoding says where and why
            ts = None
            for ev in self.iter_events([p]):
                ts = ev.timestamp
            return ts
        meta = self.sub.meta
        if meta.freq != 1_000_000_000:
            ts = ts * 1_000_000_000 // meta.freq
        return ts + meta.offset_ns


class SubTrace:
    """One process's CTF trace: a ``metadata`` file and its stream files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = _Metadata(path / "metadata")
        self.env = self.meta.env
        #: The trace schema version of this sub-trace (:mod:`.schema`).
        self.schema: int = self.meta.schema
        self.pid = int(self.env.get("vpid", 0) or 0)
        #: The recording session this sub-trace belongs to (the recorder's ``session_id``,
        #: shared by one program's process tree); None in traces written before sessions.
        session = self.env.get("session_id")
        self.session: str | None = session if isinstance(session, str) and session else None
        self.decoders = {
            eid: (name, _compile_decoder(fields))
            for eid, (name, fields) in self.meta.events.items()
        }
        self.skips = {
            eid: _compile_skipper(fields) for eid, (_, fields) in self.meta.events.items()
        }
        self.checks = {
            eid: _compile_checker(fields) for eid, (_, fields) in self.meta.events.items()
        }
        #: The id of the task switch event class (writer: "Task identity"); -1 if none.
        self.task_event_id = next(
            (
                eid
                for eid, (name, fields) in self.meta.events.items()
                if name == W.TASK_EVENT and fields == _TASK_FIELDS
            ),
            -1,
        )
        #: The C reader's layout of this sub-trace's event classes (tracemark/_reader.c);
        #: None when the C reader is not used (not built, TRACEMARK_CORE=python) or declines.
        self.c_layout = _c_layout(self.meta, self.task_event_id)
        #: Event id -> size in bytes, for the classes whose events all have one size.
        self.fixed_sizes = {
            eid: size
            for eid, (_, fields) in self.meta.events.items()
            if (size := fixed_event_size(fields)) is not None
        }
        names = []
        try:
            entries = sorted(os.scandir(path), key=attrgetter("name"))
        except OSError as exc:
            raise TraceError(path, 0, f"cannot list the directory: {exc.strerror}") from None
        for e in entries:
            if e.name.startswith(".") or e.name == "metadata" or _is_dir(e):
                continue
            names.append(e.name)  # a FIFO or a device here: Stream() says it is not a file
        self.streams = [Stream(self, path / n) for n in names]
        seen: dict[int, Path] = {}
        for s in self.streams:
            if s.instance_id in seen and s.instance_id >= 0:
                raise TraceError(
                    s.path,
                    24,
                    f"stream_instance_id {s.instance_id} is also used by {seen[s.instance_id]}",
                )
            seen[s.instance_id] = s.path

    def ids_matching(self, names: Callable[[str], bool]) -> frozenset[int]:
        """The ids, in this sub-trace's metadata, of the event classes whose name passes
        (never the task switch events', which are not given as events)."""
        return frozenset(
            eid
            for eid, (name, _) in self.decoders.items()
            if names(name) and eid != self.task_event_id
        )

    @property
    def status(self) -> dict[str, Any] | None:
        """The recorder's status file of this sub-trace's process (:mod:`.status`): whether
        its recording stopped normally, and the events it lost; None if there is none."""
        return read_status(self.path)

    @property
    def lost(self) -> int:
        """Events this process lost without a count in the trace: not written (disk full),
        per its status file. A process that did not stop its recording (``status["state"]``
        is ``"recording"``) lost what it had buffered too, uncounted."""
        return _lost_of(self.status)


def _lost_of(status: dict[str, Any] | None) -> int:
    lost = status.get("lost") if status else None
    return lost if isinstance(lost, int) and lost > 0 else 0


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


class Trace:
    """Every sub-trace under one directory, read as one trace."""

    def __init__(self, path: Path, subtraces: list[SubTrace]) -> None:
        self.path = path
        self.subtraces = subtraces
        self.streams: list[Stream] = [s for sub in subtraces for s in sub.streams]
        self.markers: dict[str, tuple[tuple[str, str], ...]] = {}
        for sub in subtraces:
            for eid, (name, fields) in sub.meta.events.items():
                if eid != sub.task_event_id:  # bookkeeping, not a marker
                    self.markers.setdefault(name, fields)
        self._bounds: tuple[int | None, int | None] | None = None

    @property
    def discarded(self) -> int:
        """Events discarded, over every stream."""
        return sum(s.discarded for s in self.streams)

    @property
    def lost_packets(self) -> int:
        """Packets overwritten (overwrite mode), over every stream."""
        return sum(s.lost_packets for s in self.streams)

    @property
    def lost(self) -> int:
        """Events lost and counted only in the status files (:attr:`SubTrace.lost`), once
        per process (its snapshots share its status)."""
        dirs = {
            s.path.parent if s.path.name.startswith("snapshot-") else s.path for s in self.subtraces
        }
        return sum(_lost_of(read_status(d)) for d in dirs)

    def events(
        self,
        names: Callable[[str], bool] | None = None,
        index: Callable[[Stream], Sequence[frozenset[int] | None] | None] | None = None,
    ) -> Iterator[Event]:
        """Every event of every stream, merged in timestamp order (ties: stream order).

        ``names``: only the events whose name passes (``names(name)`` true); the others are
        checked but not decoded (:meth:`Stream.iter_matching`), so the result, and any
        TraceError, is what filtering all events by name gives, sooner. ``index``: per
        stream, the id sets of its packets (:func:`tracemark.ctf.index.trace_index`), so that
        packets without a wanted event are not read at all.
        """
        if names is not None:
            iterators = [
                s.iter_matching(s.sub.ids_matching(names), index(s) if index else None)
                for s in self.streams
                if s.packets
            ]
            if len(iterators) == 1:
                return iterators[0]
            return heapq.merge(*iterators, key=attrgetter("timestamp"))
        sources = [s.iter_chunks() for s in self.streams if s.packets]
        if len(sources) == 1:
            return itertools.chain.from_iterable(sources[0])
        return merge_chunks(sources)

    def _compute_bounds(self) -> tuple[int | None, int | None]:
        if self._bounds is None:
            bounds = [s.bounds() for s in self.streams]
            firsts = [b[0] for b in bounds if b[0] is not None]
            lasts = [b[1] for b in bounds if b[1] is not None]
            self._bounds = (min(firsts, default=None), max(lasts, default=None))
        return self._bounds

    @property
    def start(self) -> int | None:
        """ns since the epoch of the first event, None if there is none."""
        return self._compute_bounds()[0]

    @property
    def end(self) -> int | None:
        """ns since the epoch of the last event, None if there is none."""
        return self._compute_bounds()[1]

    def __repr__(self) -> str:
        n, k = len(self.subtraces), len(self.streams)
        return f"<Trace {str(self.path)!r}: {n} sub-traces, {k} streams>"


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Open the trace directory ``path`` (what :func:`tracemark.record` wrote).

    Every directory under ``path`` holding a ``metadata`` file is a sub-trace (one per
    process, and one per snapshot). Raises :class:`TraceError` if there is none, or if any
    is corrupt or truncated. Events are read only when iterated.
    """
    root = Path(path)
    if not root.is_dir():
        raise TraceError(root, 0, "not a directory (a trace is the directory record() wrote)")
    found = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        if "metadata" in files:
            found.append(Path(directory))
    if not found:
        raise TraceError(root, 0, "no CTF trace here (no metadata file in it or below it)")
    return Trace(root, [SubTrace(p) for p in found])


# --- repair --------------------------------------------------------------------------------------


def cut_partial_packet(stream_file: str | os.PathLike[str]) -> int:
    """Truncate a stream file that ends inside a packet at that packet's start; return how
    many bytes were cut (0 when the file ends on a packet boundary).

    The recorder only ever appends whole packets, but a process killed (SIGKILL, the OOM
    killer) while the kernel copies one can leave part of it; babeltrace2 then refuses the
    whole trace and :func:`read_trace` raises. Only packet headers are read: a file damaged
    in any other way is left as it is, for the reader to report. Never call it on a stream
    that a live process may still be appending to.
    """
    path = Path(stream_file)
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            f.seek(offset)
            head = f.read(_HEADER.size + _CTX.size)
            if len(head) < _HEADER.size + _CTX.size:
                break  # the file ends inside a packet's header
            if _HEADER.unpack_from(head, 0)[0] != W.MAGIC:
                return 0  # not a torn tail: damage for the reader to report
            psize = _CTX.unpack_from(head, _HEADER.size)[3]
            if psize % 8 or psize // 8 < _FIXED_SIZE:
                return 0
            if offset + psize // 8 > size:
                break  # the file ends inside this packet
            offset += psize // 8
        else:
            return 0
        f.truncate(offset)
        return size - offset


def cut_partial_packets(path: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """:func:`cut_partial_packet` on every stream file of every sub-trace under ``path``;
    the files that were cut and by how many bytes."""
    cut = []
    for directory, dirs, files in os.walk(path):
        dirs.sort()
        if "metadata" in files:
            for name in sorted(files):
                if name != "metadata" and not name.startswith("."):
                    n = cut_partial_packet(Path(directory) / name)
                    if n:
                        cut.append((Path(directory) / name, n))
    return cut
