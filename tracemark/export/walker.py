"""The walk both exporters share: a trace's events, in time order, turned into tracks,
slices, instants and counter values for a :class:`Sink` (:mod:`.chrome`, :mod:`.perfetto`).

Guarantees
----------
* **Streaming, bounded memory.** Events are read one at a time (the reader merges the
  streams holding one decoded event per stream) and handed on at once; what is kept is one
  small record per track (process, thread, task, counter) and the spans still open, which
  :class:`tracemark.analysis.Pairing` holds. A sink writes what it is given, so a trace of
  10M events exports in the memory a 10K one does.
* **Tracks.** A process track per pid (named from the trace's ``env.procname``, else
  ``pid N``); a thread track per (pid, tid), named after the thread (its tid when it has no
  name; renamed when the thread is); when events carry an asyncio task (``ev.task``, the reader's
  :class:`~tracemark.ctf.reader.Task`, which :func:`tracemark.analysis.pairing.track_of`
  keys on) a task track per (pid, tid, task) *under* its thread track, named ``task NAME``;
  task ids are never reused, so two tasks of one name are two tracks. A fork child has its
  own pid, hence its own process track. A counter track per (pid, ``NAME.FIELD``) chosen
  with ``counters``.
* **Spans.** ``NAME.begin``/``NAME.end`` and probe ``P.entry``/``P.return`` pairs (paired by
  Pairing, per track) become a slice named ``NAME`` on their track; its args are the begin's
  fields, then the end's (an end field whose name the begin also has is ``end.NAME``).
* **Nothing dropped silently.** A span never ended (exception, thread ended, process
  killed, or an inner span its parent's end skipped) is closed at its track's last event
  and handed on with ``unfinished=True``: each exporter marks it visibly (see there) and
  gives it the arg ``unfinished: true``. An end without a begin is never paired with a
  wrong begin: it is an instant named ``NAME.end (end without begin)`` with the arg
  ``unmatched: true``. Both are counted in the :class:`Walk` result.
* **A damaged trace exports what reads.** Each packet of each stream is read on its own:
  a damaged packet ends only itself (the events before the damage in it are kept), the walk
  goes on with the next packet and every other stream, and the :class:`Walk` result lists
  what could not be read, file and offset, for the command to say. A sub-trace whose
  metadata cannot be read at all is listed the same way, and the others are exported.
* Everything else is an instant with the event's fields as args; a marker chosen as a
  counter stays an instant as well (its other fields are still shown there).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

from .._environment import environment_error
from ..analysis.pairing import End, Pairing, span_kind, track_of
from ..ctf import TraceError
from ..ctf.reader import Stream, SubTrace, merge_chunks

__all__ = [
    "CounterSpec",
    "Sink",
    "Track",
    "Tracks",
    "Walk",
    "end_args",
    "open_streams",
    "walk",
]


class Track:
    """A timeline: a process, a thread, a task under a thread, or a counter.

    ``uid`` is unique in the export (Perfetto's track uuid, Chrome's synthetic tid for a
    task); ``parent`` the process track of a thread or counter, the thread track of a task.
    """

    __slots__ = ("kind", "name", "parent", "pid", "task", "tid", "uid")

    def __init__(
        self,
        uid: int,
        kind: str,
        pid: int,
        tid: int | None = None,
        task: Any = None,
        name: str = "",
        parent: Track | None = None,
    ) -> None:
        self.uid = uid
        self.kind = kind  # "process", "thread", "task" or "counter"
        self.pid = pid
        self.tid = tid
        self.task = task
        self.name = name
        self.parent = parent


class Sink(Protocol):
    """What an exporter implements; the walker calls these in timestamp order, except the
    ``end`` of an unfinished span closed when the trace ends (its track's last time)."""

    def track(self, track: Track) -> None:
        """A new track (or a thread renamed: the same track again, new name), before any
        event on it; a thread's process and a task's thread come first."""

    def begin(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None: ...

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
        """A span's end; ``end_fields`` is None for an unfinished one (closed, not ended)."""

    def instant(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None: ...

    def counter(self, track: Track, ts: int, value: int | float) -> None: ...


@dataclass(frozen=True)
class CounterSpec:
    """``--counter NAME.FIELD``: the numeric field FIELD of the marker NAME."""

    marker: str
    field: str

    @classmethod
    def parse(cls, text: str) -> CounterSpec:
        marker, dot, name = text.rpartition(".")
        if not dot or not marker or not name:
            raise ValueError(f"{text!r} is not NAME.FIELD (e.g. net.rx.len)")
        return cls(marker, name)

    def __str__(self) -> str:
        return f"{self.marker}.{self.field}"


@dataclass
class Walk:
    """What a walk did: counts, and what could not be read."""

    events: int = 0
    slices: int = 0
    instants: int = 0
    counters: int = 0
    unfinished: int = 0
    unmatched: int = 0
    #: Counter values left out: not a finite number (or a bool), each a (counter, count).
    skipped_values: dict[str, int] = field(default_factory=dict)
    #: One line per part that could not be read (file, offset, reason).
    errors: list[str] = field(default_factory=list)


def note_damage(errors: list[str], exc: TraceError, what: str) -> None:
    """Add the damage ``exc`` to ``errors``, and go on: unless it is the machine's (too many
    open files, a permission: :func:`tracemark._environment.environment_error`), which says
    nothing about the trace and would fail every packet after it: that OSError is raised."""
    os_error = environment_error(exc)
    if os_error is not None:
        raise os_error
    errors.append(f"{exc}{what}")


def open_streams(
    path: str | os.PathLike[str], only: Iterable[str | os.PathLike[str]] | None = None
) -> tuple[list[SubTrace], list[str]]:
    """Every sub-trace under ``path`` (or in ``only``, sub-trace directories) that opens,
    and one line per one that does not."""
    found = []
    for directory, dirs, files in os.walk(path):
        dirs.sort()
        if "metadata" in files:
            found.append(Path(directory))
    if only is not None:
        wanted = {Path(p) for p in only}
        found = [p for p in found if p in wanted]
    subs, errors = [], []
    for p in found:
        try:
            subs.append(SubTrace(p))
        except TraceError as exc:
            note_damage(errors, exc, " (this sub-trace was not exported)")
    return subs, errors


def _stream_chunks(stream: Stream, errors: list[str]) -> Iterator[list[Any]]:
    # Packet by packet, so that one damaged packet costs only itself. Stream._packets is the
    # reader's index of the file (same package: reading it is part of the reader's contract
    # with its callers here, kept small on purpose).
    packets = stream._packets
    try:
        yield from stream.iter_chunks(packets)
        return
    except TraceError as exc:
        note_damage(errors, exc, "; the rest of that packet was not exported")
        failed = exc.offset
    # Find the packet that failed, then go on after it, one packet at a time.
    start = 0
    for i, p in enumerate(packets):
        if failed is not None and p.offset <= failed:
            start = i + 1
    for p in packets[start:]:
        try:
            yield from stream.iter_chunks([p])
        except TraceError as exc:
            note_damage(errors, exc, "; the rest of that packet was not exported")


def _stream_matching(
    stream: Stream,
    wanted: frozenset[int],
    known: Sequence[frozenset[int] | None] | None,
    errors: list[str],
) -> Iterator[Any]:
    """:func:`_stream_chunks`' events whose id is in ``wanted`` (the rest checked, not
    decoded; packets the index ``known`` says hold none not read), one at a time."""
    packets = stream._packets
    start = 0
    while start < len(packets):
        try:
            yield from stream.iter_matching(wanted, known, start)
            return
        except TraceError as exc:
            note_damage(errors, exc, "; the rest of that packet was not exported")
            failed = exc.offset
            first = start
            start = len(packets) if failed is None else first + 1
            for i in range(first, len(packets)):
                if failed is not None and packets[i].offset <= failed:
                    start = i + 1


def _events(
    subs: Sequence[SubTrace], errors: list[str], names: Callable[[str], bool] | None = None
) -> Iterator[Any]:
    """Every event of ``subs`` in time order (ties: stream order), a damaged packet's
    events up to its damage (said in ``errors``), then the next packets. ``names``: only
    the events whose name passes; the others are checked, not decoded, and packets the
    packet index (:mod:`tracemark.ctf.index`, built and saved if missing) says hold none
    of them are not read: what filtering every event gives, sooner."""
    if names is not None:
        from ..ctf.index import build_index

        iterators = []
        for sub in subs:
            wanted = sub.ids_matching(names)
            try:
                index = build_index(sub)
            except (TraceError, OSError):
                index = {}
            for s in sub.streams:
                if s.packets and wanted:
                    known = index.get(s.path.name)
                    iterators.append(_stream_matching(s, wanted, known, errors))
        if len(iterators) == 1:
            return iterators[0]
        return heapq.merge(*iterators, key=itemgetter(0))
    sources = [_stream_chunks(s, errors) for sub in subs for s in sub.streams if s.packets]
    if len(sources) == 1:
        return itertools.chain.from_iterable(sources[0])
    return merge_chunks(sources)


def end_args(begin: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """An end's fields as a slice's args beside its begin's: a name the begin also has
    becomes ``end.NAME``."""
    return {f"end.{k}" if k in begin else k: v for k, v in end.items()}


class Tracks:
    """The tracks of one export, made on first use and handed to the sink then (a thread's
    process first, a task's thread first); shared by :func:`walk` and the fast path
    (:mod:`.fast`), so both name and number tracks alike."""

    def __init__(self, sink: Sink, subs: Sequence[SubTrace]) -> None:
        self.sink = sink
        self.procnames: dict[int, str] = {}
        for sub in subs:
            name = sub.env.get("procname")
            if isinstance(name, str) and name and sub.pid not in self.procnames:
                self.procnames[sub.pid] = name
        self._uids = iter(range(1, 1 << 62))
        self.processes: dict[int, Track] = {}
        #: (pid, tid, task) -> the thread's track (task None) or the task's.
        self.threads: dict[tuple, Track] = {}
        self.counters: dict[tuple[int, str], Track] = {}
        #: Uids decided ahead (:meth:`plan`), for tracks made in several processes.
        self.planned: dict[tuple, int] = {}

    def plan(self, keys: Iterable[tuple], later: int = 1 << 62) -> None:
        """Decide the uids of the tracks ``keys`` name (``("process", pid)``, ``("thread",
        pid, tid)``, ``("counter", pid, name)``) now, in that order, so that processes
        working on parts of one export number them alike; tracks not planned take uids
        from ``later`` on."""
        for key in keys:
            if key not in self.planned:
                self.planned[key] = next(self._uids)
        self._uids = iter(range(later, 1 << 63))

    def _uid(self, key: tuple) -> int:
        uid = self.planned.get(key)
        return uid if uid is not None else next(self._uids)

    def process(self, pid: int) -> Track:
        t = self.processes.get(pid)
        if t is None:
            name = self.procnames.get(pid, f"pid {pid}")
            t = self.processes[pid] = Track(self._uid(("process", pid)), "process", pid, name=name)
            self.sink.track(t)
        return t

    def track(self, key: tuple, thread_name: str) -> Track:
        """The track of ``key`` = (pid, tid, task), made if new; a task's under its thread."""
        t = self.threads.get(key)
        if t is not None:
            return t
        pid, tid, task = key
        thread_key = (pid, tid, None)
        thread = self.threads.get(thread_key)
        if thread is None:
            process = self.process(pid)
            thread = self.threads[thread_key] = Track(
                self._uid(("thread", pid, tid)),
                "thread",
                pid,
                tid,
                name=thread_name or str(tid),
                parent=process,
            )
            self.sink.track(thread)
        if task is None:
            return thread
        t = self.threads[key] = Track(
            next(self._uids), "task", pid, tid, task, name=f"task {task}", parent=thread
        )
        self.sink.track(t)
        return t

    def count(
        self,
        result: Walk,
        pid: int,
        ts: int,
        marker: str,
        values: dict[str, Any],
        fields: Iterable[str],
    ) -> None:
        """The values of ``fields`` (of marker ``marker``) on their counter tracks; values
        that are not a finite number are counted as skipped."""
        skipped = result.skipped_values
        for f in fields:
            value = values.get(f)
            name = f"{marker}.{f}"
            if type(value) not in (int, float) or value != value or value in (_INF, -_INF):
                skipped[name] = skipped.get(name, 0) + 1
                continue
            ct = self.counters.get((pid, name))
            if ct is None:
                process = self.process(pid)
                ct = self.counters[(pid, name)] = Track(
                    self._uid(("counter", pid, name)), "counter", pid, name=name, parent=process
                )
                self.sink.track(ct)
            self.sink.counter(ct, ts, value)
            result.counters += 1


def walk(
    subs: Sequence[SubTrace],
    sink: Sink,
    *,
    counters: Iterable[CounterSpec] = (),
    errors: list[str] | None = None,
    events: Iterable[Any] | None = None,
) -> Walk:
    """Walk the events of ``subs`` (or ``events``, already read, in timestamp order) into
    ``sink``; ``errors`` are lines already known (sub-traces that did not open)."""
    result = Walk(errors=errors if errors is not None else [])
    if events is None:
        events = _events(subs, result.errors)
    tracks = Tracks(sink, subs)
    threads = tracks.threads  # track_of(ev) -> thread or task track
    last: dict[tuple, int] = {}  # track_of(ev) -> its last event's timestamp
    wanted: dict[str, list[str]] = {}
    for spec in counters:
        wanted.setdefault(spec.marker, []).append(spec.field)

    def track_for(ev: Any, key: tuple) -> Track:
        return tracks.track(key, ev.thread)

    def count(ev: Any, fields: list[str]) -> None:
        tracks.count(result, ev.pid, ev.timestamp, ev.name, ev.fields, fields)

    def close(end: End, key: tuple) -> None:
        # A span closed unfinished: at the time Pairing says (an outer end that skipped it)
        # or, at the end of the trace, at its track's last event, which this walk knows
        # better than Pairing (instants are not fed to it: see walk's loop).
        ts = max(end.timestamp, last.get(key, end.timestamp))
        begin = end.begin
        sink.end(threads[key], ts, end.span, begin.timestamp, begin.fields, None, True)
        result.unfinished += 1
        result.slices += 1

    declared = {name for sub in subs for name, _ in sub.meta.events.values()} if subs else None
    pairing = Pairing(declared)
    feed = pairing.feed
    kinds: dict[str, Any] = {}
    instant = sink.instant
    n = 0
    for ev in events:
        n += 1
        name = ev.name
        kind = kinds.get(name)
        if kind is None:
            kind = kinds[name] = (span_kind(name, declared) or ("instant", name), wanted.get(name))
        key = track_of(ev)
        track = threads.get(key)
        if track is None:
            track = track_for(ev, key)
        elif ev.thread != track.name and track.kind == "thread" and ev.thread:
            track.name = ev.thread  # renamed: say it again
            sink.track(track)
        last[key] = ev.timestamp
        what = kind[0][0]
        if what == "instant":
            # Not fed to Pairing: it would only give it back as an Instant (the cost of a
            # generator and an object per event, on the most common path).
            instant(track, ev.timestamp, name, ev.fields)
            result.instants += 1
        elif what == "begin":
            for _ in feed(ev):  # a Begin, always
                pass
            sink.begin(track, ev.timestamp, kind[0][1], ev.fields)
        else:
            for item in feed(ev):
                if item.unfinished:
                    close(item, track_of(item.begin))
                elif item.begin is None:
                    args = dict(ev.fields)
                    args["unmatched"] = True
                    instant(track, ev.timestamp, f"{name} (end without begin)", args)
                    result.unmatched += 1
                    result.instants += 1
                else:
                    begin = item.begin
                    sink.end(
                        track,
                        ev.timestamp,
                        item.span,
                        begin.timestamp,
                        begin.fields,
                        ev.fields,
                        False,
                    )
                    result.slices += 1
        if kind[1]:
            count(ev, kind[1])
    for item in pairing.finish():
        close(item, track_of(item.begin))
    result.events = n
    return result


_INF = float("inf")
