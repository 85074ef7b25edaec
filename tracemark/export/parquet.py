"""Parquet: a trace as tables for query engines (DuckDB, Spark, Trino, any Arrow reader).

::

    result = export_parquet("tracemark-traces/app", "out/")    # one table per marker
    # duckdb: SELECT * FROM read_parquet('out/shop.order/**/*.parquet', hive_partitioning=true)

Needs ``pyarrow`` (``pip install 'tracemark[parquet]'``): imported here only, never by the
rest of tracemark; without it :func:`export_parquet` raises :class:`MissingPyarrow`.

Layout
------
* ``layout="wide"`` (the default): **one table per marker**, a directory ``OUT/NAME/``
  (the marker's name, characters other than ``A-Z a-z 0-9 . _ -`` written ``%XX``, as
  hive paths escape them), with the columns ``timestamp`` (int64: ns since the Unix epoch,
  as every export and the reader give it), ``tid`` (int64), ``thread`` (string), ``task_id``
  (int64, null outside an asyncio task), ``task`` (string: its name, ``#ID`` for one
  without), then one column per field, in field order, typed by its kind:

  ======== =========================================================================
  int      int64
  float    double (NaN and infinities as they are)
  bool     boolean
  str      string
  bytes    binary
  object   string (the repr the recorder stored)
  any      struct ``{kind, bool, int, float, str, bytes, repr}``: ``kind`` is one of
           ``none bool int float str bytes repr``, the member of that name holds the
           value, the others are null
  ======== =========================================================================

  ``any`` is a struct because Parquet has no union type, and a struct keeps what a string
  would lose: an int stays an int (``WHERE a.int > 5``), bytes stay bytes, a repr stays
  told apart from a str of the same text (``a.kind``), exactly as
  :mod:`tracemark.probes.events` records them. A field whose name is one of the columns
  above or ``pid`` is the column ``field_NAME``.
  A marker declared with other fields by another process of the trace (same name, other
  fields or kinds) is a table of its own, ``OUT/NAME~2/``.
* ``layout="long"``: **one table** ``OUT/`` for every event: ``timestamp``, ``name``,
  ``tid``, ``thread``, ``task_id``, ``task`` and ``payload``, the fields as one JSON object
  (string), written as ``view --json`` writes them (bytes as hex, non-finite floats as
  ``"nan"``/``"inf"``/``"-inf"``, reprs as strings): DuckDB reads it with ``payload->>'$.n'``.
* **Partitioned by process, hive style**: a table's files are ``TABLE/pid=PID/*.parquet``;
  ``pid`` is the partition column (``read_parquet(..., hive_partitioning=true)``), not a
  column of the files. Several traces (a fleet's) exported into one ``OUT`` are one
  dataset: their files are named after the trace (``TOKEN-K.parquet``, ``TOKEN`` from the
  uuid of its first sub-trace), so exporting a trace again replaces its own files and
  never another trace's.

Guarantees
----------
* **Streaming, bounded memory.** Events are read one at a time, merged in time order (the
  walker's damage-tolerant merge, :mod:`.walker`) and buffered per (table, process) as
  events; a buffer of :data:`ROW_GROUP_ROWS` rows is written as one row group (turned into
  columns then), and when all buffers together hold :data:`BUFFERED_ROWS` events the
  largest is written. At most
  :data:`OPEN_FILES` files are open (the least recently written is finished, and its
  table goes on in a new file of that partition). Memory depends on those constants and
  the size of values, never on the number of events. (``tracemark export`` turns Python's
  cyclic garbage collector off meanwhile: the buffered events are GC-tracked, the export
  makes no cycles, and the collector's passes over them cost ~40% of a big export.)
* **Columns straight from the packets** (with the C reader, ``layout="wide"``, no
  ``select``/``names``, every marker of int, float, bool and str fields): the C reader
  decodes each packet into per-marker columns (``tracemark/_reader.c`` decode_columns) and
  Arrow arrays are made from them, with no Python object per event; the rows, their order
  per file, the tables and the error lines are the Event path's (see the columnar path
  below; ``tests/test_parquet_columns.py`` holds them equal). Any other trace takes the
  Event path, the reference.
* **Time order**: each file's rows are in the trace's time order (its row groups carry
  timestamp statistics, so a time range skips the rest).
* **Whole files or none**: each file is written under a hidden ``.partial`` name and
  renamed when the export succeeds; an export that fails leaves no new file behind.
* **The schema version** (:mod:`tracemark.ctf.schema`) is in every file's key-value
  metadata (``tracemark_schema``), with ``tracemark_version``, ``tracemark_trace``,
  ``tracemark_layout``, ``tracemark_marker`` and ``tracemark_fields`` (the marker's fields
  and kinds as JSON) and ``pid``.
* **A damaged trace exports what reads**; :attr:`ParquetResult.errors` says what did not
  (as for the other formats).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .walker import _events, open_streams

__all__ = [
    "BUFFERED_ROWS",
    "LAYOUTS",
    "OPEN_FILES",
    "ROW_GROUP_ROWS",
    "MissingPyarrow",
    "ParquetResult",
    "export_parquet",
]

LAYOUTS = ("wide", "long")
#: Rows of one row group (the largest a (table, process) buffer grows to).
ROW_GROUP_ROWS = 1 << 16
#: Events buffered over every table and process, at most (each is held as the reader gave
#: it, a few hundred bytes for small fields, until its row group is written).
BUFFERED_ROWS = 1 << 16
#: Files open at once, at most.
OPEN_FILES = 64
#: The install line for the extra.
INSTALL = "pip install 'tracemark[parquet]'"

_FIXED = ("timestamp", "tid", "thread", "task_id", "task")
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_ANY_KINDS = {
    type(None): "none",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bytes",
}


class MissingPyarrow(ImportError):
    """pyarrow is not installed: the message says how to install it."""


@dataclass
class ParquetResult:
    """What an export wrote."""

    events: int = 0
    #: Table directories written (relative to the output directory; ``.`` for long).
    tables: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    row_groups: int = 0
    pids: set[int] = field(default_factory=set)
    #: One line per part of the trace that could not be read (file, offset, reason).
    errors: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingPyarrow(f"the parquet format needs pyarrow: {INSTALL} ({exc})") from None
    return pa, pq


def table_dir(name: str) -> str:
    """The directory name of marker ``name``'s table: ``name`` when it is plain, else with
    every other character (and a leading dot) written ``%XX`` (its UTF-8 bytes)."""
    if _SAFE.match(name):
        return name
    return (
        "".join(
            c if (c.isascii() and (c.isalnum() or c in "_-" or (c == "." and i))) else _pct(c)
            for i, c in enumerate(name)
        )
        or "%00"
    )


def _pct(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


def _json_value(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return repr(v)


_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _payload(fields: dict[str, Any]) -> str:
    try:
        return _JSON(fields)
    except (TypeError, ValueError):  # bytes, a non-finite float, another type
        return _JSON({k: _json_value(v) for k, v in fields.items()})


def _any_struct(v: Any) -> dict[str, Any]:
    kind = _ANY_KINDS.get(type(v))  # exact types: a ReprText (a str) is a repr
    if kind is None:
        return {"kind": "repr", "repr": str(v) if isinstance(v, str) else repr(v)}
    return {"kind": kind} if kind == "none" else {"kind": kind, kind: v}


class _Table:
    """One table's schema: its directory, its columns' Arrow types and how values convert."""

    def __init__(self, pa: Any, directory: str, name: str, fields: tuple, layout: str) -> None:
        self.directory = directory
        self.name = name
        self.fields = fields
        self.layout = layout
        any_type = pa.struct(
            [
                ("kind", pa.string()),
                ("bool", pa.bool_()),
                ("int", pa.int64()),
                ("float", pa.float64()),
                ("str", pa.string()),
                ("bytes", pa.binary()),
                ("repr", pa.string()),
            ]
        )
        kinds = {
            "int": pa.int64(),
            "float": pa.float64(),
            "bool": pa.bool_(),
            "str": pa.string(),
            "bytes": pa.binary(),
            "object": pa.string(),
            "any": any_type,
        }
        columns = [
            ("timestamp", pa.int64()),
            *([("name", pa.string())] if layout == "long" else []),
            ("tid", pa.int64()),
            ("thread", pa.string()),
            ("task_id", pa.int64()),
            ("task", pa.string()),
        ]
        taken = {*_FIXED, "pid", "name"} if layout == "long" else {*_FIXED, "pid"}
        #: Per field column: a converter of its values' list (None: as they are).
        self.convert: list[Callable[[list], list] | None] = []
        if layout == "long":
            columns.append(("payload", pa.string()))
        else:
            for fname, kind in fields:
                column = f"field_{fname}" if fname in taken else fname
                columns.append((column, kinds.get(kind, any_type)))
                if kind not in kinds or kind == "any":
                    self.convert.append(lambda vs: [_any_struct(v) for v in vs])
                elif kind == "object":
                    self.convert.append(
                        lambda vs: [v if isinstance(v, str) or v is None else repr(v) for v in vs]
                    )
                else:
                    self.convert.append(None)
        self.columns = columns
        self.width = len(columns)

    def schema(self, pa: Any, about: dict[str, Any], pid: int) -> Any:
        meta = {k: str(v) for k, v in about.items()}
        meta["tracemark_layout"] = self.layout
        meta["pid"] = str(pid)
        if self.layout == "wide":
            meta["tracemark_marker"] = self.name
            meta["tracemark_fields"] = json.dumps([list(f) for f in self.fields])
        return pa.schema([pa.field(n, t) for n, t in self.columns], metadata=meta)


class _Buffer:
    """The events of one (table, process) not written yet, and its open file."""

    __slots__ = ("events", "file", "names", "part", "pid", "rows", "table", "writer")

    def __init__(self, table: _Table, pid: int, names: tuple[str, ...]) -> None:
        self.table = table
        self.pid = pid
        self.names = names  # the field names of its events (wide)
        self.events: list[Any] = []  # the columnar path: pyarrow tables
        self.rows = 0  # the columnar path: their rows
        self.writer: Any = None
        self.file: Path | None = None
        self.part = 0


def export_parquet(
    trace_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    layout: str = "wide",
    only: Iterable[str | os.PathLike[str]] | None = None,
    select: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    names: Callable[[str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
    buffered_rows: int = BUFFERED_ROWS,
    open_files: int = OPEN_FILES,
    compression: str = "zstd",
) -> ParquetResult:
    """Export the trace in ``trace_dir`` to the directory ``out_dir`` as Parquet (see the
    module). ``only``: these sub-trace directories; ``names``: only the markers whose name
    passes (``-e``: the others are not decoded, and packets the packet index says hold none
    are not read); ``select``: applied to the event stream (``--filter``);
    ``progress(events so far)`` now and then. Raises
    :class:`MissingPyarrow`, ValueError for a bad layout, OSError when writing fails."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    pa, pq = _pyarrow()
    from . import about_trace

    subs, errors = open_streams(trace_dir, only)
    result = ParquetResult(errors=errors)
    about = about_trace(trace_dir, subs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token = min(subs, key=lambda s: str(s.path)).meta.uuid.hex()[:16] if subs else "empty"

    # Declared fields: (pid, name, field names) -> ((name, kind), ...).
    declared: dict[tuple, tuple] = {}
    for sub in subs:
        for eid, (name, fields) in sub.meta.events.items():
            if eid != sub.task_event_id:
                declared.setdefault((sub.pid, name, tuple(f for f, _ in fields)), fields)

    tables: dict[tuple, _Table] = {}  # (name, fields) -> table (wide)
    dirs_of_name: dict[str, int] = {}
    buffers: dict[tuple, _Buffer] = {}
    open_writers: OrderedDict[int, _Buffer] = OrderedDict()  # id(buffer) -> buffer, LRU
    partials: list[tuple[Path, Path]] = []  # (partial, final)
    buffered = 0

    def table_for(name: str, pid: int, names: tuple[str, ...]) -> _Table:
        fields = declared.get((pid, name, names))
        if fields is None:  # not declared by its own process (cannot happen): typed as any
            fields = tuple((f, "any") for f in names)
        t = tables.get((name, fields))
        if t is None:
            n = dirs_of_name[name] = dirs_of_name.get(name, 0) + 1
            d = table_dir(name) + (f"~{n}" if n > 1 else "")
            t = tables[(name, fields)] = _Table(pa, d, name, fields, "wide")
            result.tables.append(d)
        return t

    def finish(b: _Buffer) -> None:
        if b.writer is not None:
            b.writer.close()
            b.writer = None
            open_writers.pop(id(b), None)

    def columns(b: _Buffer, evs: list[Any], dicts: list[Any] | None = None) -> list[Any]:
        t = b.table
        cols: list[Any] = [[e[0] for e in evs]]  # Event: timestamp, name, fields, pid, tid,
        if t.layout == "long":  # thread, task
            cols.append([e[1] for e in evs])
        cols.append([e[4] for e in evs])
        cols.append([e[5] for e in evs])
        tasks = [e[6] for e in evs]
        cols.append([None if k is None else k.id for k in tasks])
        cols.append([None if k is None else str(k) for k in tasks])
        if t.layout == "long":
            cols.append([_payload(e[2]) for e in evs])
        elif t.fields:
            # Column by column, by name (zip(*rows) over 64K rows is ~10x slower); a row
            # without one of the names is a KeyError: flush sorts such rows out.
            if dicts is None:
                dicts = [e[2] for e in evs]
            for conv, name in zip(t.convert, b.names, strict=True):
                vs = [d[name] for d in dicts]
                cols.append(conv(vs) if conv else vs)
        return [pa.array(c, type=typ) for c, (_, typ) in zip(cols, t.columns, strict=True)]

    def writer_of(b: _Buffer) -> Any:
        """b's open file's writer (opened if it has none), the most recently written now."""
        t = b.table
        if b.writer is None:
            while len(open_writers) >= open_files:
                _, oldest = open_writers.popitem(last=False)
                finish(oldest)
            part_dir = out / t.directory / f"pid={b.pid}"
            part_dir.mkdir(parents=True, exist_ok=True)
            final = part_dir / f"{token}-{b.part}.parquet"
            b.part += 1
            partial = part_dir / f".{final.name}.{os.getpid()}.partial"
            partials.append((partial, final))
            b.writer = pq.ParquetWriter(
                partial, t.schema(pa, about, b.pid), compression=compression
            )
            b.file = final
        open_writers[id(b)] = b
        open_writers.move_to_end(id(b))
        return b.writer

    def flush(b: _Buffer) -> None:
        nonlocal buffered
        evs = b.events
        if not evs:
            return
        b.events = []
        buffered -= len(evs)
        t = b.table
        arrays = None
        if t.layout == "wide":
            names, nf = b.names, len(b.names)
            try:
                dicts = [e[2] for e in evs]
                if not all(map(nf.__eq__, map(len, dicts))):
                    raise KeyError
                arrays = columns(b, evs, dicts)
            except KeyError:  # the same name declared with other fields (a replaced
                odd = [e for e in evs if tuple(e[2]) != names]  # declaration): elsewhere
                evs = [e for e in evs if tuple(e[2]) == names]
                for e in odd:
                    add(e, (e[1], e[3], tuple(e[2])))
                if not evs:
                    return
        writer_of(b)
        if arrays is None:
            arrays = columns(b, evs)
        table = pa.Table.from_arrays(arrays, schema=b.writer.schema)
        b.writer.write_table(table, row_group_size=row_group_rows)
        result.row_groups += 1

    def add(ev: Any, key: Any) -> None:
        nonlocal buffered
        b = buffers.get(key)
        if b is None:
            names = tuple(ev[2])
            table = long_table if long_table is not None else table_for(ev[1], ev[3], names)
            b = buffers[key] = _Buffer(table, ev[3], names)
            result.pids.add(ev[3])
        b.events.append(ev)
        buffered += 1
        if len(b.events) >= row_group_rows:
            flush(b)
        elif buffered >= buffered_rows:
            flush(max(buffers.values(), key=lambda x: len(x.events)))

    long_table = _Table(pa, ".", "", (), "long") if layout == "long" else None
    if long_table is not None:
        result.tables.append(".")
    events: Iterable[Any] = _events(subs, result.errors, names)
    if select is not None:
        events = select(events)
    wide = long_table is None
    n = 0
    columnar = wide and select is None and names is None and _columnar_layouts(subs, declared)

    def flush_columns(b: _Buffer, rows: int) -> None:
        """Write b's first ``rows`` rows (columnar path) as one row group."""
        nonlocal buffered
        table = pa.concat_tables(b.events) if len(b.events) > 1 else b.events[0]
        b.events = [table.slice(rows)] if rows < table.num_rows else []
        b.rows -= rows
        buffered -= rows
        writer = writer_of(b)
        writer.write_table(table.slice(0, rows), row_group_size=row_group_rows)
        result.row_groups += 1

    def add_columns(key: tuple, table: Any) -> None:
        nonlocal buffered
        b = buffers[key]
        b.events.append(table)
        b.rows += table.num_rows
        buffered += table.num_rows
        while b.rows >= row_group_rows:
            flush_columns(b, row_group_rows)
        while buffered >= buffered_rows:
            big = max(buffers.values(), key=lambda x: x.rows)
            flush_columns(big, big.rows)

    def new_buffer(key: tuple) -> None:
        pid, name, fnames = key
        buffers[key] = _Buffer(table_for(name, pid, fnames), pid, fnames)
        result.pids.add(pid)

    try:
        if columnar:
            n = _columnar(pa, subs, result.errors, buffers, new_buffer, add_columns, progress)
            for b in buffers.values():
                if b.rows:
                    flush_columns(b, b.rows)
        # The hot loop: one dictionary look-up and one append per event; the columns are
        # made per row group (flush). An Event is (timestamp, name, fields, pid, tid, ...).
        get = buffers.get
        for ev in () if columnar else events:
            n += 1
            b = get((ev[1], ev[3]) if wide else ev[3])
            if b is None or len(b.events) + 1 >= row_group_rows or buffered + 1 >= buffered_rows:
                add(ev, (ev[1], ev[3]) if wide else ev[3])
            else:
                b.events.append(ev)
                buffered += 1
            if progress is not None and not n & 0x3FFF:
                progress(n)
        if progress is not None and not columnar:
            progress(n)
        # Rows a flush re-routed (a replaced declaration) may be left in any buffer.
        while any(b.events for b in list(buffers.values())):
            for b in list(buffers.values()):
                flush(b)
        for b in buffers.values():
            flush(b)
            finish(b)
        # Done: the files of a previous export of this trace go, the new ones come in.
        new = {final for _, final in partials}
        for old in out.rglob(f"{token}-*.parquet"):
            if old not in new:
                old.unlink()
        for partial, final in partials:
            os.replace(partial, final)
    except BaseException:
        for b in buffers.values():
            try:
                finish(b)
            except Exception:  # already failing: the first error is the one to say
                pass
        for partial, _ in partials:
            try:
                os.unlink(partial)
            except OSError:
                pass
        raise
    result.events = n
    result.files = [final for _, final in partials]
    return result


# --- the columnar path ---------------------------------------------------------------------
#
# With the C reader, a wide export without --filter or -e of a trace whose markers have only
# int, float, bool and str fields is read a packet at a time straight into columns
# (tracemark/_reader.c decode_columns): no Event per event. The rows are the same, in the
# same order per file: the pure path's order is the streams' merge by (timestamp, stream
# order, place in the stream), restricted to one (table, process); here the packets are read
# in the order of their timestamp_begin, and the rows below `bound` (the least
# timestamp_begin of the packets not read yet: no unread row is earlier) go to their tables,
# each table's rows of several streams concatenated in stream order and stably sorted by
# timestamp. A table is made (its directory numbered) in the order of its first row, as the
# pure path makes it. A damaged packet gives its rows before the damage and its error line,
# as walker._stream_chunks does. Row groups are cut at the same sizes and the same memory
# bound (rows buffered), at other places: the pure path cuts them as the merged events come.

_COLUMN_KINDS = frozenset({"int", "float", "bool", "str"})
_INT64_MAX = (1 << 63) - 1


def _columnar_layouts(subs: list[Any], declared: dict[tuple, tuple]) -> bool:
    """Whether every sub-trace can take the columnar path (see above)."""
    import sys

    if sys.byteorder != "little":  # the columns are the trace's little-endian bytes
        return False
    from ..ctf.reader import reader_module

    module = reader_module()[0]
    if module is None or not hasattr(module, "decode_columns"):
        return False
    shapes: dict[tuple, tuple] = {}  # (pid, name) -> fields
    for sub in subs:
        if sub.c_layout is None:
            return False
        offset = sub.meta.offset_ns
        for s in sub.streams:
            for p in s.packet_list():
                if not (offset >= -(1 << 63) and p.ts_end + offset <= _INT64_MAX):
                    return False
        for eid, (name, fields) in sub.meta.events.items():
            if eid == sub.task_event_id:
                continue
            fnames = tuple(f for f, _ in fields)
            if len(set(fnames)) != len(fnames) or any(k not in _COLUMN_KINDS for _, k in fields):
                return False
            if declared.get((sub.pid, name, fnames)) != fields:  # kinds of another declaration
                return False
            # A name declared again with other fields in one process: the Event path makes
            # its second table when a row group is cut (flush), not at its first row.
            if shapes.setdefault((sub.pid, name), fields) != fields:
                return False
    return True


class _Source:
    """One stream of the columnar path: its packets, the next to read, its rows not given."""

    __slots__ = ("classes", "index", "offset", "packets", "pending", "stream", "sub")

    def __init__(self, sub: Any, stream: Any) -> None:
        self.sub = sub
        self.stream = stream
        self.packets = stream.packet_list()
        self.index = 0
        self.offset = sub.meta.offset_ns
        #: event id -> (table key, field kinds)
        self.classes = {
            eid: ((sub.pid, name, tuple(f for f, _ in fields)), tuple(k for _, k in fields))
            for eid, (name, fields) in sub.meta.events.items()
            if eid != sub.task_event_id
        }
        #: table key -> [[pyarrow table, first ts, last ts, order], ...] in stream order
        self.pending: dict[tuple, list[list[Any]]] = {}


def _columnar(
    pa: Any,
    subs: list[Any],
    errors: list[str],
    buffers: dict,
    new_buffer: Callable[[tuple], None],
    add_columns: Callable[[tuple, Any], None],
    progress: Callable[[int], None] | None,
) -> int:
    """Read every packet into columns and hand each table's rows, in order, to
    ``add_columns`` (see above); returns the number of events."""
    import heapq

    import pyarrow.compute as pc

    from ..ctf import TraceError
    from ..ctf import writer as W
    from ..ctf.reader import c_decode_error, reader_module
    from .walker import note_damage

    decode_columns = reader_module()[0].decode_columns  # type: ignore[union-attr]
    sources = [_Source(sub, s) for sub in subs for s in sub.streams if s.packets]
    schemas: dict[tuple, Any] = {}
    heap = [(src.packets[0].ts_begin + src.offset, i) for i, src in enumerate(sources)]
    heapq.heapify(heap)
    int64, int32, string = pa.int64(), pa.int32(), pa.string()
    n = 0
    reported = 0
    packet_no = 0

    def schema_of(key: tuple, kinds: tuple) -> Any:
        # The table's columns (its table is made later, when its first rows go).
        s = schemas.get(key)
        if s is None:
            t = _Table(pa, "", key[1], tuple(zip(key[2], kinds, strict=True)), "wide")
            s = schemas[key] = pa.schema([pa.field(c, typ) for c, typ in t.columns])
        return s

    def read(src: _Source, order: int) -> int:
        p = src.packets[src.index]
        stream = src.stream
        data = stream.read_packet(p)
        given = 0
        try:
            if len(data) < p.content_end:
                raise TraceError(stream.path, p.offset, "stream file shrank while being read")
            classes, _pos, _last, walked, tasks, error = decode_columns(
                src.sub.c_layout, data, p.start, p.content_end, p.ts_begin, p.ts_end
            )
            given = columns(src, p, classes, tasks, order)
            if error is not None:
                raise c_decode_error(stream.path, p.offset, error)
            if walked != p.count:
                raise TraceError(
                    stream.path,
                    p.offset + W.OFF_COUNT,
                    f"packet holds {walked} events, its context says {p.count}",
                )
        except TraceError as exc:
            note_damage(errors, exc, "; the rest of that packet was not exported")
        return given

    def columns(src: _Source, p: Any, classes: dict, tasks: list, order: int) -> int:
        given = 0
        tid, thread = p.tid, p.thread
        task_ids = task_names = None
        if len(tasks) > 1:
            task_ids = pa.array([None] + [t.id for t in tasks[1:]], int64)
            task_names = pa.array([None] + [str(t) for t in tasks[1:]], string)
        for eid, (count, first, ts, task, *values) in classes.items():
            if not count:  # its one event failed the time check
                continue
            key, kinds = src.classes[eid]
            arrays = [
                pa.Array.from_buffers(int64, count, [None, pa.py_buffer(ts)]),
                pa.repeat(pa.scalar(tid, int64), count),
                pa.repeat(pa.scalar(thread, string), count),
            ]
            if task_ids is None:
                arrays += [pa.nulls(count, int64), pa.nulls(count, string)]
            else:
                idx = pa.Array.from_buffers(int32, count, [None, pa.py_buffer(task)])
                arrays += [task_ids.take(idx), task_names.take(idx)]
            for kind, v in zip(kinds, values, strict=True):
                if kind == "str":
                    offsets, text = v
                    arrays.append(
                        pa.Array.from_buffers(
                            string, count, [None, pa.py_buffer(offsets), pa.py_buffer(text)]
                        )
                    )
                elif kind == "bool":
                    raw = pa.Array.from_buffers(pa.uint8(), count, [None, pa.py_buffer(v)])
                    arrays.append(raw.cast(pa.bool_()))
                else:
                    typ = int64 if kind == "int" else pa.float64()
                    arrays.append(pa.Array.from_buffers(typ, count, [None, pa.py_buffer(v)]))
            table = pa.Table.from_arrays(arrays, schema=schema_of(key, kinds))
            first_ts = int.from_bytes(ts[:8], "little", signed=True)
            last_ts = int.from_bytes(ts[-8:], "little", signed=True)
            src.pending.setdefault(key, []).append([table, first_ts, last_ts, (order, first)])
            given += count
        return given

    def release(bound: float) -> None:
        """Hand on every pending row before ``bound``."""
        out: dict[tuple, list[Any]] = {}
        firsts: dict[tuple, tuple] = {}
        for i, src in enumerate(sources):
            for key, pieces in src.pending.items():
                taken = 0
                for piece in pieces:
                    table, first_ts, last_ts, order = piece
                    if first_ts >= bound:
                        break
                    if last_ts < bound:
                        rows = table
                        taken += 1
                    else:
                        k = pc.sum(pc.less(table.column(0), bound)).as_py()
                        rows = table.slice(0, k)
                        piece[0] = table.slice(k)
                        piece[1] = piece[0].column(0)[0].as_py()
                        piece[3] = None  # not a first row any more
                    out.setdefault(key, []).append(rows)
                    if order is not None:
                        here = (first_ts, i, order)
                        firsts[key] = min(firsts.get(key, here), here)
                    if last_ts >= bound:
                        break
                del pieces[:taken]
        # Tables first seen now: made in the order of their first rows.
        for key in sorted((k for k in out if k not in buffers), key=firsts.__getitem__):
            new_buffer(key)
        for key, tables in out.items():
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            if len(tables) > 1:
                ts = table.column(0)
                if not pc.all(pc.greater_equal(ts.slice(1), ts.slice(0, len(ts) - 1))).as_py():
                    table = table.take(
                        pc.sort_indices(table, sort_keys=[("timestamp", "ascending")])
                    )
            add_columns(key, table)

    while heap:
        _, i = heapq.heappop(heap)
        src = sources[i]
        packet_no += 1
        n += read(src, packet_no)
        src.index += 1
        if src.index < len(src.packets):
            heapq.heappush(heap, (src.packets[src.index].ts_begin + src.offset, i))
        release(heap[0][0] if heap else float("inf"))
        if progress is not None and n - reported >= 0x4000:
            reported = n
            progress(n)
    if progress is not None:
        progress(n)
    return n
