"""The fast path of :func:`tracemark.export.export`: what :mod:`.walker` does, without an
Event object, a merge or a sink call per event.

Where the time went (cProfile of a 500k-event Perfetto export, before: 6.0 s profiled, 1.9 s
not): the walker's loop and Pairing's generator and objects (2.0 s), the sink's encoding (a
method call, a dict walk and several concatenations per event: 2.0 s), decoding (an Event
named tuple and a fields dict per event, a generator step: 1.1 s) and the merge of the
streams (``heapq.merge`` with a key per event: 0.5 s).

Here, per event, one generated function per event class does it all: the reader's shared
layout code (:func:`tracemark.ctf.reader.field_decoding`, driven by
:meth:`~tracemark.ctf.reader.Stream.walk_packet`) reads the fields into locals, then code
made for that class and that track writes the event, from constants computed once per
(track, class): Perfetto's packet prefix per annotation length (names interned), Chrome's
text around the values. Each class first looks its payloads up in a cache of their
encodings; after :data:`SAMPLE` events it keeps the cache if half were found, or encodes
each from then on. Spans are paired on the track's stack in place. Output is joined per CTF
packet.

Guarantees
----------
* **The same timeline as the walker**: the same tracks (made by :class:`.walker.Tracks`),
  slices (names, times, args), instants, counters, unfinished spans and ends without a
  begin, and the same :class:`.walker.Walk` counts; anything off the common path (an end
  that does not close the span on top of its track, counters, a begin of another class on
  top) goes through the sink's own methods, which are the walker's. Tests export varied
  traces both ways and compare what Perfetto's schema and ``json`` decode.
* **Used only where it is exact**: streams are walked one after the other, not merged, so
  it is used only when every thread's events are in one stream (pairing needs a track's
  events in order, nothing more); otherwise :func:`applies` says no and the walker runs.
  The file's events are then grouped per stream, not in global time order: both formats
  allow it (Chrome's document: events "do not have to be in timestamp-sorted order";
  Perfetto's trace processor sorts packets by timestamp).
* **Two processes where there are two CPUs** (``jobs``): the streams are shared out in two
  groups of about equal size; a forked child writes its group's part (Perfetto: its own
  packet sequence, names interned anew) to a file beside the output, which is appended
  after this process's part. Deterministic: the groups, and so the bytes, do not depend on
  timing. Forked only from a process running one thread. Track uids are planned before
  the fork (:meth:`.walker.Tracks.plan`); each process's track is described once, first;
  a counter's may be described by both parts (same uid, same description).
* **Bounded memory**, per process: one CTF packet's bytes and its output at a time, the
  spans still open, and caches: per field of each event class, and per class for the track
  being read (the handlers of a track are dropped when its stream moves on), each cleared
  when it reaches :data:`_CACHE_LIMIT` entries; whatever the number of threads.
* **A damaged packet ends only itself**, as in the walker: the events before the damage
  are written, the error is listed, the next packet is read.
* Task identity: a track is keyed (pid, tid, task) as the walker keys it; the reader does
  not record tasks yet, so ``task`` is None here, at the one place the key is made.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .._codegen import compile_generated
from ..analysis.pairing import span_kind
from ..ctf import TraceError
from ..ctf.reader import Stream, SubTrace, compile_handlers, field_decoding
from . import perfetto as P
from .walker import CounterSpec, Track, Tracks, Walk, note_damage

__all__ = ["applies", "export_fast"]

#: Entries per cache (of a class's payloads, of a field's values), at most.
_CACHE_LIMIT = 1 << 12
_TS_LOW = 1 << 56
_TS_HIGH = 1 << 63


def applies(subs: Sequence[SubTrace], fmt: str) -> bool:
    """Whether the fast path gives what the walker gives: every thread in one stream only,
    no asyncio task recorded (its events go on tracks of their own, which only the walker
    makes; the packet index says which packets hold task events, and is built and saved
    where missing), and, for Perfetto, every timestamp in the 9-byte varint range, 1972 to
    2262."""
    from ..ctf.index import build_index

    seen: dict[tuple[int, int], Stream] = {}
    for sub in subs:
        task_id = sub.task_event_id
        if task_id >= 0:
            try:
                ids = build_index(sub)
            except (TraceError, OSError):
                return False
            for packets in ids.values():
                if any(p is None or task_id in p for p in packets):
                    return False
        meta = sub.meta
        for s in sub.streams:
            for p in s.packet_list():
                other = seen.setdefault((p.pid, p.tid), s)
                if other is not s:
                    return False
                if fmt == "perfetto":
                    for raw in (p.ts_begin, p.ts_end):
                        ns = raw * 1_000_000_000 // meta.freq + meta.offset_ns
                        if not _TS_LOW <= ns < _TS_HIGH:
                            return False
    return True


class _TrackState:
    """What the generated handlers of one track see: the track, its open spans, its last
    event's time."""

    __slots__ = ("handlers", "last", "stack", "track")

    def __init__(self, track: Track) -> None:
        self.track = track
        #: Open spans: (span name, begin ns, begin class's field-dict maker, begin payload
        #: bytes, format's pre-encoded begin args).
        self.stack: list[tuple] = []
        self.last: int | None = None
        self.handlers: dict[int, Callable] = {}


class _ListOut:
    """A text or binary sink's ``out`` that collects pieces, joined per packet."""

    def __init__(self, pieces: list) -> None:
        self.write = pieces.append


def _first_ts(stream: Stream) -> int | None:
    """The time of the stream's first event, from its header alone (None if unreadable)."""
    packets = stream.packet_list()
    if not packets:
        return None
    p = packets[0]
    meta = stream.sub.meta
    try:
        data = stream.read_packet(p)
        if p.count and p.start + 12 <= p.content_end:
            raw = int.from_bytes(data[p.start + 4 : p.start + 12], "little")
        else:
            raw = p.ts_begin
    except (OSError, TraceError):
        raw = p.ts_begin
    return raw * 1_000_000_000 // meta.freq + meta.offset_ns


def export_fast(
    subs: Sequence[SubTrace],
    sink: Any,
    fmt: str,
    out: Any,
    *,
    counters: Sequence[CounterSpec] = (),
    errors: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 1,
    scratch: str | os.PathLike[str] | None = None,
) -> Walk:
    """Export ``subs`` through ``sink`` (a :class:`~.perfetto.PerfettoWriter` or
    :class:`~.chrome.ChromeWriter` writing to ``out``), the fast way; only where
    :func:`applies`. ``progress(events so far)`` is called after each packet (of the part
    this process does). ``jobs`` > 1: the streams are shared out among that many processes
    (:func:`_share`; this one and forked children, each writing its part to a file in
    ``scratch``, appended here in order: the output does not depend on timing)."""
    wanted: dict[str, list[str]] = {}
    for spec in counters:
        wanted.setdefault(spec.marker, []).append(spec.field)
    streams = [s for sub in subs for s in sub.streams if s.packet_list()]
    alone = _one_thread() and hasattr(os, "fork")
    groups = _share(streams, jobs if scratch is not None and alone else 1)
    tracks = Tracks(sink, subs)
    pids = sorted({p.pid for s in streams for p in s.packet_list()})
    threads = sorted({(p.pid, p.tid) for s in streams for p in s.packet_list()})
    tracks.plan(
        [("process", pid) for pid in pids]
        + [("thread", pid, tid) for pid, tid in threads]
        + [("counter", pid, f"{m}.{f}") for pid in pids for m, fs in wanted.items() for f in fs]
    )
    base = None
    if fmt == "chrome":
        firsts = [_first_ts(s) for s in streams]
        base = min((t for t in firsts if t is not None), default=0)
        sink.base = base
    if len(groups) > 1:
        for pid in pids:  # every process named once, first: the parts name only threads
            tracks.process(pid)
    out.flush()
    children = []
    try:
        for k, group in enumerate(groups[1:], 1):
            children.append(_fork_part(k, group, subs, sink, fmt, tracks, wanted, base, scratch))
        result = _part(groups[0], subs, sink, fmt, out, tracks, wanted, base, progress)
        for child in children:
            part = _join_part(child, fmt, out)
            for name in ("events", "slices", "instants", "counters", "unfinished", "unmatched"):
                setattr(result, name, getattr(result, name) + getattr(part, name))
            for name, n in part.skipped_values.items():
                result.skipped_values[name] = result.skipped_values.get(name, 0) + n
            result.errors += part.errors
    finally:
        for child in children:
            _reap(child)
    if errors is not None:
        errors.extend(result.errors)
        result.errors = errors
    return result


def _share(streams: list[Stream], jobs: int) -> list[list[Stream]]:
    """``streams`` in ``jobs`` groups of about the same size in bytes (the largest first to
    the least loaded group), each in the reader's order; never an empty group."""
    jobs = max(1, min(jobs, len(streams)))
    if jobs == 1:
        return [streams]
    loads = [0] * jobs
    owner: dict[int, int] = {}
    sizes = [sum(p.content_end for p in s.packet_list()) for s in streams]
    for i in sorted(range(len(streams)), key=lambda i: -sizes[i]):
        g = loads.index(min(loads))
        owner[i] = g
        loads[g] += sizes[i]
    return [[s for i, s in enumerate(streams) if owner[i] == g] for g in range(jobs)]


class _Child:
    __slots__ = ("path", "pid", "pipe")

    def __init__(self, pid: int, pipe: int, path: str) -> None:
        self.pid, self.pipe, self.path = pid, pipe, path


def _one_thread() -> bool:
    """Whether this process runs one thread, so that forking is safe: a lock another thread
    holds at the fork would stay held in the child (and Python 3.12 warns of it). The
    kernel's count, where there is one: threading's misses threads it did not start (a C
    extension's, such as the native consumer, or ``_thread``'s)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


def _fork_part(
    k: int,
    group: list[Stream],
    subs: Sequence[SubTrace],
    sink: Any,
    fmt: str,
    tracks: Tracks,
    wanted: dict[str, list[str]],
    base: int | None,
    scratch: Any,
) -> _Child:
    path = os.path.join(scratch, f".tracemark-export-{os.getpid()}-part{k}")
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return _Child(pid, r, path)
    # The child: writes its part, says what it did on the pipe, exits without running
    # anything of the parent's (atexit, buffers of the parent's output file).
    code = 1
    try:
        os.close(r)
        tracks._uids = iter(range(k << 56, (k + 1) << 56))  # disjoint from the others'
        with open(path, "wb") as f:
            if fmt == "perfetto":
                sink.sequence(k + 1, f.write)
                part = _part(group, subs, sink, fmt, f, tracks, wanted, base, None)
            else:
                text = io.TextIOWrapper(f, encoding="utf-8", newline="\n")
                sink.out = text
                sink._tasks = k << 24  # synthetic task tids apart from the other parts'
                part = _part(group, subs, sink, fmt, text, tracks, wanted, base, None)
                text.flush()
                text.detach()
        os.write(w, json.dumps(dataclasses.asdict(part)).encode())
        code = 0
    except BaseException as exc:  # said to the parent, which raises
        try:
            said = {"failed": f"{type(exc).__name__}: {exc}"}
            if isinstance(exc, OSError):  # (an environment error stays one in the parent)
                said["os_error"] = [exc.errno, exc.strerror, exc.filename]
            os.write(w, json.dumps(said).encode())
        except BaseException:
            pass
    finally:
        os._exit(code)


def _join_part(child: _Child, fmt: str, out: Any) -> Walk:
    """Wait for a part, append its file to ``out``; what it did."""
    chunks = []
    while True:
        chunk = os.read(child.pipe, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(child.pipe)
    child.pipe = -1
    _, status = os.waitpid(child.pid, 0)
    child.pid = 0
    said = json.loads(b"".join(chunks) or b"{}")
    if said.get("os_error"):
        raise OSError(*said["os_error"])
    if status != 0 or "failed" in said:
        raise OSError(f"an export worker failed: {said.get('failed', f'status {status}')}")
    mode = "rb" if fmt == "perfetto" else "r"
    with open(child.path, mode, encoding=None if mode == "rb" else "utf-8") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
    os.unlink(child.path)
    return Walk(**said)


def _reap(child: _Child) -> None:
    """A part's process and file gone, whatever happened."""
    if child.pipe >= 0:
        os.close(child.pipe)
    if child.pid:
        try:
            os.kill(child.pid, 9)
            os.waitpid(child.pid, 0)
        except OSError:
            pass
    try:
        os.unlink(child.path)
    except OSError:
        pass


def _part(
    streams: list[Stream],
    subs: Sequence[SubTrace],
    sink: Any,
    fmt: str,
    out: Any,
    tracks: Tracks,
    wanted: dict[str, list[str]],
    base: int | None,
    progress: Callable[[int], None] | None,
) -> Walk:
    """The events of ``streams`` (and nothing else) through ``sink`` to ``out``."""
    result = Walk()
    mine = set(map(id, streams))
    declared = {name for sub in subs for name, _ in sub.meta.events.values()}
    pieces: list = []
    joiner: Any
    if fmt == "perfetto":
        sink._write = pieces.append
        joiner = b"".join
        maker: Any = _PerfettoCode(sink)
    else:
        sink.out = _ListOut(pieces)
        joiner = "".join
        maker = _ChromeCode(sink, base)
    counts = [0]  # spans begun
    states: dict[tuple, _TrackState] = {}
    by_track: list[_TrackState] = []

    def slow_end(t: _TrackState, ts: int, span: str, name: str, fields: dict[str, Any]) -> None:
        # The walker's pairing (analysis.pairing.Pairing.feed), for the ends the generated
        # code leaves: not the span on top, or a begin of another class on top.
        stack = t.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] == span:
                break
        else:
            args = dict(fields)
            args["unmatched"] = True
            sink.instant(t.track, ts, f"{name} (end without begin)", args)
            result.unmatched += 1
            return
        while len(stack) > i + 1:  # spans opened inside this one and never ended
            inner = stack.pop()
            sink.end(t.track, ts, inner[0], inner[1], inner[2](inner[3]), None, True)
            result.unfinished += 1
        begin = stack.pop()
        sink.end(t.track, ts, span, begin[1], begin[2](begin[3]), fields, False)

    def count(t: _TrackState, ts: int, marker: str, fields: dict[str, Any]) -> None:
        tracks.count(result, t.track.pid, ts, marker, fields, wanted[marker])

    env: dict[str, Any] = {
        "SLOW_END": slow_end,
        "COUNT": count,
        "COUNTS": counts,
        "OUT": pieces.append,
        "CACHE_LIMIT": _CACHE_LIMIT,
        "SAMPLE": SAMPLE,
    }
    maker.names(env)
    done = 0
    for sub in subs:
        if not any(id(s) in mine for s in sub.streams):
            continue
        ns = dict(env)
        ns["DICTS"] = {eid: _dict_maker(decode) for eid, (_, decode) in sub.decoders.items()}
        begin_of: dict[str, int] = {}
        for eid, (name, _) in sub.meta.events.items():
            kind = span_kind(name, declared)
            if kind and kind[0] == "begin":
                begin_of.setdefault(kind[1], eid)

        def handler(
            eid: int,
            name: str,
            fields: tuple[tuple[str, str], ...],
            ns: dict[str, Any],
            begin_of: dict[str, int] = begin_of,
            sub: SubTrace = sub,
        ) -> tuple[str, list[tuple[str, str]]]:
            kind = span_kind(name, declared) or ("instant", name)
            expect = begin_of.get(kind[1]) if kind[0] == "end" else None
            begin_fields = sub.meta.events[expect][1] if expect is not None else ()
            once, body = maker.code(eid, name, kind, fields, expect, begin_fields, ns)
            if name in wanted:
                count = f"        COUNT(T, ts, {name!r}, D{eid}(data[p0:pos]))\n"
                body = [(suffix, lines + count, skip) for suffix, lines, skip in body]
            return once, body

        bind = compile_handlers(
            sub, handler, ns, raw_text=True, prologue=maker.prologue, only=_fired(sub)
        )
        for stream in sub.streams:
            if id(stream) not in mine:
                continue
            current = None
            for p in stream.packet_list():
                task = None  # the reader gives no task yet: when it does, per event
                key = (p.pid, p.tid, task)
                t = states.get(key)
                if t is None:
                    t = states[key] = _TrackState(tracks.track(key, p.thread))
                    by_track.append(t)
                elif p.thread and p.thread != t.track.name and t.track.kind == "thread":
                    t.track.name = p.thread  # renamed: say it again
                    sink.track(t.track)
                if t is not current:
                    # Handlers (and their caches) live while their track's packets come:
                    # one track's at a time, whatever the number of threads.
                    if current is not None:
                        current.handlers = {}
                    if not t.handlers:
                        t.handlers = bind(t)
                    current = t
                try:
                    n, last = stream.walk_packet(p, stream.read_packet(p), t.handlers)
                except TraceError as exc:
                    n, last = getattr(exc, "handled", 0), getattr(exc, "last", None)
                    note_damage(result.errors, exc, "; the rest of that packet was not exported")
                if last is not None:
                    t.last = last
                done += n
                out.write(joiner(pieces))
                pieces.clear()
                if progress is not None:
                    progress(done)
            if current is not None:
                current.handlers = {}
    # Spans never ended: closed at their track's last event, marked unfinished.
    for t in by_track:
        stack = t.stack
        while stack:
            begin = stack.pop()
            ts = max(begin[1], t.last if t.last is not None else begin[1])
            sink.end(t.track, ts, begin[0], begin[1], begin[2](begin[3]), None, True)
            result.unfinished += 1
        out.write(joiner(pieces))
        pieces.clear()
    if fmt == "perfetto":
        sink._write = out.write
    else:
        sink.out = out
    begins = counts[0]
    result.events = done
    result.slices = begins
    result.instants = done - 2 * begins + result.unfinished
    return result


#: Up to this many event classes, every one is compiled; beyond, only those the packet index
#: says were fired (a program that declares thousands of markers and fires a few would
#: otherwise spend minutes compiling handlers no event needs).
_COMPILE_ALL = 64


def _fired(sub: SubTrace) -> frozenset[int] | None:
    """The event ids of ``sub``'s packets, from its index (loaded, or built and saved), or
    None (compile them all) when the classes are few or a packet's ids are unknown."""
    if len(sub.meta.events) <= _COMPILE_ALL:
        return None
    from ..ctf.index import build_index

    fired: set[int] = set()
    try:
        for ids in build_index(sub).values():
            for packet in ids:
                if packet is None:
                    return None
                fired |= packet
    except (TraceError, OSError):
        return None
    return frozenset(fired)


def _values(fields: tuple) -> str:
    return "".join(f"v{i}, " for i in range(len(fields)))


def _values_decoder(fields: tuple[tuple[str, str], ...]) -> Callable:
    """``values(data, pos, end)``: the payload's fields as a tuple (text as UTF-8 bytes), by
    the reader's layout code for the class."""
    ns: dict[str, Any] = {}
    lines = ["def values(data, pos, end):\n", *field_decoding(fields, ns, raw_text=True)]
    lines.append(f"    return ({_values(fields)})\n")
    exec(compile_generated("".join(lines), "values"), ns)
    return ns["values"]


def _dict_maker(decode: Callable) -> Callable[[bytes], dict[str, Any]]:
    """``make(payload)``: the fields dict the reader gives for an event's payload bytes
    (its own decoder: they were checked when the event was handled)."""

    def make(payload: bytes) -> dict[str, Any]:
        return decode(payload, 0, len(payload))[0]

    return make


def _bounded(cache: dict) -> dict:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    return cache


# --- the code per event class ---------------------------------------------------------------

#: Events of a class (on one track) whose payloads are looked up in a cache of their
#: encodings before deciding to keep the cache (half of them found) or to encode each.
SAMPLE = 256


def _indent(lines: str, by: int) -> str:
    pad = " " * by
    return "".join(pad + line + "\n" for line in lines.splitlines())


def _variants(eid: int, encode: str, fields: tuple) -> list[tuple[str, str, bool]]:
    """The ways to get ``fa``, a class's encoded payload (``encode``: source computing it
    from ``v0``...): a sample of :data:`SAMPLE` events through a cache keyed by the payload's
    bytes, then, for good, the cache (where payloads repeat: paths, status codes, table
    names) or no cache (where they do not: sizes, counters). Text checked (decoded) on a
    miss: a payload found was checked when it went in."""
    # The cached handler only walks the payload: it decodes one when not found.
    decode = f"{_values(fields)}= VALS{eid}(data, p0, pos)\n" if fields else ""
    cached = (
        "key = data[p0:pos]\n"
        f"fa = PC{eid}.get(key)\n"
        "if fa is None:\n"
        f"{_indent(decode + encode, 4)}"
        f"    if len(PC{eid}) >= CACHE_LIMIT:\n"
        f"        PC{eid}.clear()\n"
        f"    PC{eid}[key] = fa\n"
    )
    sample = (
        f"N{eid} += 1\n"
        "key = data[p0:pos]\n"
        f"fa = PC{eid}.get(key)\n"
        "if fa is None:\n"
        f"{_indent(encode, 4)}"
        f"    PC{eid}[key] = fa\n"
        "else:\n"
        f"    K{eid} += 1\n"
        f"if N{eid} == SAMPLE:\n"
        f"    HANDLERS[{eid}] = h{eid}c if 2 * K{eid} >= N{eid} else h{eid}d\n"
    )
    return [("", sample, False), ("c", cached, True), ("d", encode, False)]


class _Code:
    """Per event class: the handler's source, from a format's pieces (:meth:`pieces`)."""

    prologue = ""

    def code(
        self,
        eid: int,
        name: str,
        kind: tuple[str, str],
        fields: tuple,
        expect: int | None,
        begin_fields: tuple,
        ns: dict[str, Any],
    ) -> tuple[str, list[tuple[str, str]]]:
        what, label = kind
        once, encode, emit = self.pieces(eid, kind, fields, begin_fields, ns)
        once += f"    D{eid} = DICTS[{eid}]\n    PC{eid} = {{}}\n    N{eid} = K{eid} = 0\n"
        out = []
        ns[f"VALS{eid}"] = _values_decoder(fields)
        for suffix, get, skip in _variants(eid, encode, fields):
            # The payload's bytes: already sliced as ``key`` where the cache is looked in.
            here = emit.replace("data[p0:pos]", "key") if "key = " in get else emit
            nonlocal_ = f"        nonlocal N{eid}, K{eid}\n" if not suffix else ""
            if what == "end":
                same = f"top[2] is E{eid}" if expect is not None else "False"
                body = (
                    nonlocal_
                    + f"        if STACK and (top := STACK[-1])[0] == {label!r} and {same}:\n"
                    "            STACK.pop()\n"
                    + _indent(get, 12)
                    + _indent(here, 12)
                    + "        else:\n"
                    f"            SLOW_END(T, ts, {label!r}, {name!r}, D{eid}(data[p0:pos]))\n"
                )
            else:
                body = nonlocal_ + _indent(get, 8) + _indent(here, 8)
                if what == "begin":
                    body += "        COUNTS[0] += 1\n"
            out.append((suffix, body, skip))
        if expect is not None:
            once += f"    E{eid} = DICTS[{expect}]\n"
        return once, out

    def pieces(
        self, eid: int, kind: tuple[str, str], fields: tuple, begin_fields: tuple, ns: dict
    ) -> tuple[str, str, str]:
        """(lines once per track, source computing ``fa`` from the fields, source writing
        the event with ``fa``)."""
        raise NotImplementedError


# --- Perfetto -------------------------------------------------------------------------------

#: "\x40" (TracePacket.timestamp = 8, varint) and the first two bytes of a 9-byte varint.
_TS_A = [b"\x40" + t for t in P._T14]
_HI: dict[int, bytes] = {}


def _hi(h: int) -> bytes:
    """The last 5 bytes of a 9-byte timestamp varint: bits 28 and up (cached)."""
    b = _bounded(_HI)[h] = P._T14[h & 0x3FFF] + P.varint(h >> 14)
    return b


class _PerfettoCode(_Code):
    """Per event class and track: the source that writes its TrackEvent packets."""

    # A timestamp's varint: 2 bytes from a table, 7 kept per track while ts >> 14 (16 µs)
    # stays the same.
    prologue = (
        "    STACK = T.stack\n"
        "    LB = -1\n"
        "    LT = b''\n"
        "    def TSN(ts):\n"
        "        nonlocal LB, LT\n"
        "        LB = ts >> 14\n"
        "        LT = T14[LB & 16383] + (HI.get(ts >> 28) or HIV(ts >> 28))\n"
        "        return LT\n"
    )
    TS = "TSA[ts & 16383] + (LT if ts >> 14 == LB else TSN(ts))"

    def __init__(self, w: P.PerfettoWriter) -> None:
        self.w = w

    def names(self, env: dict[str, Any]) -> None:
        w = self.w
        env.update(
            W=w,
            TSA=_TS_A,
            T14=P._T14,
            HI=_HI,
            HIV=_hi,
            V14=P._V14,
            FR=_frame_maker(w.frame),
            ANN=w.annotation,
        )

    def field(self, k: str, type_name: str, i: int, eid: int, ns: dict[str, Any]) -> str:
        """An expression: field ``k`` (in ``v{i}``) as a DebugAnnotation."""
        w = self.w
        v = f"v{i}"
        tag = f"{eid}_{i}"
        if type_name == "int":
            # Common: 0 <= v < 2**28, a varint of 1 to 4 bytes (from two tables) after a
            # prefix that depends only on its length.
            ns[f"AP_{tag}"] = [b""] + [w.annotation(k, 1 << (7 * n))[: -n - 1] for n in range(4)]
            x = f"x{i}"
            return (
                f"(AP_{tag}[len({x})] + {x} if 0 <= {v} < 268435456 and ({x} := V14[{v}] "
                f"if {v} < 16384 else T14[{v} & 16383] + V14[{v} >> 14]) else ANN({k!r}, {v}))"
            )
        if type_name == "bool":
            ns[f"BT_{tag}"], ns[f"BF_{tag}"] = w.annotation(k, True), w.annotation(k, False)
            return f"(BT_{tag} if {v} else BF_{tag})"
        if type_name in ("float", "any"):  # any: the decoded value, typed
            return f"ANN({k!r}, {v})"
        # str, object (UTF-8 bytes: decoded, hence checked, on a cache miss) and bytes
        cache: dict[bytes, bytes] = {}
        text = type_name != "bytes"

        def miss(raw: bytes, k: str = k, cache: dict = cache, text: bool = text) -> bytes:
            a = _bounded(cache)[raw] = w.annotation(k, raw.decode() if text else raw)
            return a

        ns[f"C_{tag}"], ns[f"M_{tag}"] = cache, miss
        return f"(C_{tag}.get({v}) or M_{tag}({v}))"

    def pieces(
        self, eid: int, kind: tuple[str, str], fields: tuple, begin_fields: tuple, ns: dict
    ) -> tuple[str, str, str]:
        what, label = kind
        types = {"instant": P.TYPE_INSTANT, "begin": P.TYPE_SLICE_BEGIN, "end": P.TYPE_SLICE_END}
        name = label if what != "end" else ""
        once = f"    H{eid} = W.head(T.track, {types[what]}, {name!r})\n    F{eid} = {{}}\n"
        rename = {k for k, _ in begin_fields} if what == "end" else set()
        parts = [
            self.field(f"end.{k}" if k in rename else k, t, i, eid, ns)
            for i, (k, t) in enumerate(fields)
        ]
        ann = " + ".join(parts) if parts else 'b""'
        encode = f"a = {ann}\nfa = (F{eid}.get(len(a)) or FR({eid}, H{eid}, F{eid}, len(a))) + a\n"
        emit = f"OUT(fa + {self.TS})\n"
        if what == "begin":
            emit += f"STACK.append(({label!r}, ts, D{eid}, data[p0:pos]))\n"
        return once, encode, emit


def _frame_maker(frame: Callable[[bytes, int], bytes]) -> Callable:
    def fr(eid: int, head: bytes, cache: dict, size: int) -> bytes:
        f = _bounded(cache)[size] = frame(head, size)
        return f

    return fr


# --- Chrome ---------------------------------------------------------------------------------

_M3 = [f".{r:03d}" for r in range(1000)]


def _us_text(ns: int) -> str:
    from .chrome import _us

    return _us(ns)


def _json_text(raw: bytes) -> str:
    return json.dumps(raw.decode(), ensure_ascii=False)


def _json_value(v: Any) -> str:
    """One value as JSON text, as :func:`.chrome._args` writes it in the walker."""
    from .chrome import _fast, _plain, _strict

    try:
        return _fast(v)
    except ValueError:  # NaN, infinities
        return _strict(_plain(v))


def _json_float(v: float) -> str:
    if math.isfinite(v):
        return float.__repr__(v)
    return '"nan"' if v != v else ('"inf"' if v > 0 else '"-inf"')


class _ChromeCode(_Code):
    """Per event class and track: the source that writes its Chrome JSON events."""

    prologue = (
        "    STACK = T.stack\n"
        '    PT = f\',"pid":{T.track.pid},"tid":{CW._tid[T.track.uid]},"args":{{\'\n'
    )
    #: µs with three decimals of X (ns); as chrome._us, without its call when X >= 0.
    US = "(str(X // 1000) + M3[X % 1000] if X >= 0 else US(X))"

    def __init__(self, w: Any, base: int) -> None:
        self.w = w
        self.base = base

    def names(self, env: dict[str, Any]) -> None:
        env.update(BASE=self.base, M3=_M3, US=_us_text, JF=_json_float, JV=_json_value, CW=self.w)

    def field(self, type_name: str, i: int, eid: int, ns: dict[str, Any]) -> str:
        """An expression: ``v{i}`` as JSON text."""
        v = f"v{i}"
        if type_name == "int":
            return f"str({v})"
        if type_name == "bool":
            return f'("true" if {v} else "false")'
        if type_name == "float":
            return f"JF({v})"
        if type_name == "any":  # the decoded value, typed, as the walker writes it
            return f"JV({v})"
        cache: dict[bytes, str] = {}
        text = type_name != "bytes"

        def miss(raw: bytes, cache: dict = cache, text: bool = text) -> str:
            s = _bounded(cache)[raw] = _json_text(raw) if text else f'"{raw.hex()}"'
            return s

        tag = f"{eid}_{i}"
        ns[f"C_{tag}"], ns[f"M_{tag}"] = cache, miss
        return f"(C_{tag}.get({v}) or M_{tag}({v}))"

    def members(self, fields: tuple, eid: int, ns: dict[str, Any], rename=()) -> str:
        """An expression: the fields as JSON object members (no braces)."""
        parts = []
        for i, (k, t) in enumerate(fields):
            key = json.dumps(f"end.{k}" if k in rename else k, ensure_ascii=False)
            sep = "," if i else ""
            parts.append(repr(f"{sep}{key}:") + " + " + self.field(t, i, eid, ns))
        return " + ".join(parts) if parts else '""'

    def pieces(
        self, eid: int, kind: tuple[str, str], fields: tuple, begin_fields: tuple, ns: dict
    ) -> tuple[str, str, str]:
        what, label = kind
        jname = json.dumps(label, ensure_ascii=False)
        once = ""
        if what == "instant":
            pre = repr(f',\n{{"ph":"i","s":"t","cat":"marker","name":{jname},"ts":')
            encode = f"fa = PT + {self.members(fields, eid, ns)} + '}}}}'\n"
            emit = f"X = ts - BASE\nOUT({pre} + {self.US} + fa)\n"
        elif what == "begin":
            encode = f"fa = {self.members(fields, eid, ns)}\n"
            emit = f"STACK.append(({label!r}, ts, D{eid}, data[p0:pos], fa))\n"
        else:
            ends = self.members(fields, eid, ns, {k for k, _ in begin_fields})
            sep = '","' if fields and begin_fields else '""'
            pre = repr(f',\n{{"ph":"X","cat":"span","name":{jname},"ts":')
            encode = f"fa = {sep} + {ends} + '}}}}'\n"
            emit = (
                "X = top[1] - BASE\n"
                f"head = {pre} + {self.US}\n"
                "X = ts - top[1]\n"
                f"OUT(head + ',\"dur\":' + {self.US} + PT + top[4] + fa)\n"
            )
        return once, encode, emit
