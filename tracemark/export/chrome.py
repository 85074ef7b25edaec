"""Chrome Trace Event JSON: what ``chrome://tracing``, Perfetto UI and speedscope load.

The format is the "Trace Event Format" document (Google Docs id
1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU, mirrored in catapult's
``docs/trace-event-format.md``): its *JSON Object Format*, ``{"traceEvents": [...]}`` with
``displayTimeUnit`` and ``otherData``. Events used:

* ``X`` (complete event: ``ts`` and ``dur``) for a span, written when it ends. Not ``B``/``E``
  pairs, because (1) an unfinished span is only known to be one at its end, and its name
  must say so (``NAME (unfinished)``), which a ``B`` already written cannot; (2) an ``X`` is
  balanced by construction, so no viewer can mis-pair a begin. The document allows events in
  any order ("do not have to be in timestamp-sorted order"), so a parent written after its
  children is fine; memory stays bounded (only open spans are held, by the walker).
* ``i`` (instant) with ``"s": "t"`` (thread scope) for every other marker, its fields as args.
* ``C`` (counter) for ``--counter NAME.FIELD``: ``"name": "NAME.FIELD"``, ``args: {FIELD:
  value}`` (counters belong to a process in this format).
* ``M`` (metadata): ``process_name``, ``thread_name`` and ``thread_sort_index``.

Times: ``ts`` and ``dur`` are microseconds, written with three decimals, and ``ts`` counts
from the trace's first event (``otherData.start_ns``: its time in ns since the Unix epoch),
so that viewers, which read numbers as doubles, keep every nanosecond: epoch µs (~1.8e15)
have a double's resolution of only 0.25 µs. ``displayTimeUnit: "ns"`` makes them show ns.
``otherData`` also names the trace (``tracemark_trace``), its schema version
(``tracemark_schema``: :mod:`tracemark.ctf.schema`) and ``tracemark_version``.

Tasks: the format has no track under a thread, so a task's spans go on a thread of their own
in the thread's process: tid ``2**31 + n`` (above any Linux tid, ``pid_max`` <= 2**22), named
``THREAD task TASK`` and sorted after its thread.

Args: bytes are hex text, object fields their text (the reader gives their repr), NaN and
infinities the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has none); every
document written is strict JSON (``json.loads`` reads it).
"""

from __future__ import annotations

import json
import math
from typing import IO, Any

from .walker import Track, end_args

__all__ = ["ChromeWriter"]

#: Synthetic tids of task tracks start here (see the module docstring).
TASK_TID_BASE = 1 << 31


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


_fast = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
).encode
_strict = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _args(fields: dict[str, Any]) -> str:
    try:
        return _fast(fields)  # in C; refuses NaN and infinities
    except ValueError:
        return _strict({k: _plain(v) for k, v in fields.items()})


def _us(ns: int) -> str:
    """ns as µs with three decimals, exactly (no float rounding)."""
    if ns < 0:
        return "-" + _us(-ns)
    return f"{ns // 1000}.{ns % 1000:03d}"


_str = _strict


class ChromeWriter:
    """A :class:`~.walker.Sink` writing Chrome Trace Event JSON to ``out``, as it goes."""

    def __init__(self, out: IO[str], other_data: dict[str, Any] | None = None) -> None:
        self.out = out
        self._tid: dict[int, int] = {}  # track uid -> the tid written for it
        self._tasks = 0
        self._sep = ""
        self._other = dict(other_data or {})
        #: ns of the first event: times are written relative to it (see the docstring).
        self.base: int | None = None
        out.write('{"displayTimeUnit":"ns","traceEvents":[\n')

    def _write(self, text: str) -> None:
        self.out.write(self._sep + text)
        self._sep = ",\n"

    def track(self, track: Track) -> None:
        if track.kind == "process":
            self._write(
                f'{{"ph":"M","name":"process_name","pid":{track.pid},"tid":0,'
                f'"args":{{"name":{_str(track.name)}}}}}'
            )
            return
        if track.kind == "counter":
            return  # a C event names its own series
        if track.kind == "thread":
            tid = self._tid[track.uid] = track.tid or 0
            name, order = track.name, tid
        else:
            tid = self._tid.get(track.uid)
            if tid is None:
                tid = self._tid[track.uid] = TASK_TID_BASE + self._tasks
                self._tasks += 1
            thread = track.parent
            name = f"{thread.name if thread else track.tid} {track.name}"
            order = track.tid or 0
        self._write(
            f'{{"ph":"M","name":"thread_name","pid":{track.pid},"tid":{tid},'
            f'"args":{{"name":{_str(name)}}}}}'
        )
        self._write(
            f'{{"ph":"M","name":"thread_sort_index","pid":{track.pid},"tid":{tid},'
            f'"args":{{"sort_index":{order}}}}}'
        )

    def begin(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        # Written whole at its end, as an X event.
        if self.base is None:
            self.base = ts

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
        if end_fields:
            args = {**begin_fields, **end_args(begin_fields, end_fields)}
        else:
            args = begin_fields
        if unfinished:
            name += " (unfinished)"
            args = {**args, "unfinished": True}
        self.out.write(
            f'{self._sep}{{"ph":"X","cat":"span","name":{_str(name)},'
            f'"ts":{_us(begin_ts - self.base)},'
            f'"dur":{_us(ts - begin_ts)},"pid":{track.pid},"tid":{self._tid[track.uid]},'
            f'"args":{_args(args)}}}'
        )
        self._sep = ",\n"

    def instant(self, track: Track, ts: int, name: str, fields: dict[str, Any]) -> None:
        if self.base is None:
            self.base = ts
        self.out.write(
            f'{self._sep}{{"ph":"i","s":"t","cat":"marker","name":{_str(name)},'
            f'"ts":{_us(ts - self.base)},'
            f'"pid":{track.pid},"tid":{self._tid[track.uid]},"args":{_args(fields)}}}'
        )
        self._sep = ",\n"

    def counter(self, track: Track, ts: int, value: int | float) -> None:
        if self.base is None:
            self.base = ts
        series = track.name.rpartition(".")[2]
        self._write(
            f'{{"ph":"C","name":{_str(track.name)},"ts":{_us(ts - self.base)},"pid":{track.pid},'
            f'"args":{{{_str(series)}:{_strict(value)}}}}}'
        )

    def close(self) -> None:
        self._other["start_ns"] = self.base
        self.out.write(f'\n],"otherData":{_strict(self._other)}}}\n')
