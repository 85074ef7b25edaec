"""``tracemark view DIR``: the events of a trace, one line each, in time order.

A line reads ``time (+delta) [pid thread] event field=value ...``, and ``[pid thread task]``
for an event fired inside an asyncio task (the task's name)::

    14:02:07.123456 +0.000210 [4711 worker-0] shop.order.received order=1 items=3 customer=ada
    14:02:07.123501 +0.000045 [4712 MainThread Task-7] api.request path=/users/27

Guarantees
----------
* Events come in timestamp order (the reader merges every stream of every process) and
  each is shown once; ``--limit N`` stops after the N-th shown event without reading further.
* The delta is to the previous *shown* event, so a filtered listing reads naturally.
* Values are shown as the printer shows them (``fields.show_value``): plain when
  unambiguous, else repr; nothing an event carries can break a line in two or reach the
  terminal as a control character: event, thread and field names are printed through
  ``_common.printable`` (values are repr'd whenever they are not plain).
* On a terminal a line is cut at the terminal's width (marked with ``…``) and the event name
  is coloured; piped output is complete and plain.
* ``--json`` writes one JSON object per line: ``timestamp`` (ns since the Unix epoch),
  ``name``, ``pid``, ``tid``, ``thread``, ``task`` (``{"id": ID, "name": NAME}``, or null
  outside a task), ``fields`` (in field order), ``schema`` (the trace schema version the
  events were recorded under: :mod:`tracemark.ctf.schema`). Bytes become hex
  strings and non-finite floats the strings ``"nan"``, ``"inf"``, ``"-inf"``, so every line
  is strict JSON. The schema version is a key of every line, not a header line: every line
  stays one event (``head``, ``grep``, ``jq -c`` and line-per-event consumers keep working;
  one that checks keys sees one more), and any line taken alone still says its schema.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from itertools import islice
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import IO, Any

from ..ctf.reader import Event
from ..ctf.schema import SCHEMA_VERSION
from ..env import reader
from ..markers.fields import ReprText, show_value
from ._common import Style, printable
from ._common import who as where

__all__ = ["format_event", "write_json", "write_text"]


_last_second: list = [None, ""]  # localtime is slow; events come many to a second


def _clock(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    if _last_second[0] != seconds:
        _last_second[:] = [seconds, time.strftime("%H:%M:%S", time.localtime(seconds))]
    return f"{_last_second[1]}.{frac // 1000:06d}"


def _delta(ns: int | None) -> str:
    if ns is None:
        return "+?.??????"
    return f"+{ns / 1e9:.6f}"


def _single_line(text: str) -> str:
    # show_value leaves plain words alone and reprs the rest, so a newline is escaped;
    # this only guards values shown plain by an odd type's repr.
    return printable(text)


def format_event(
    ev: Any, previous: int | None, *, width: int | None = None, style: Style | None = None
) -> str:
    """One event as a line of text. ``previous``: the timestamp of the event shown before.

    ``width``: cut the line to this many columns (the fields are cut, never the event name).
    """
    style = style or Style(False)
    who = where(ev)
    name = printable(ev.name)
    head = f"{_clock(ev.timestamp)} {_delta(None if previous is None else ev.timestamp - previous)}"
    fields = " ".join(f"{printable(k)}={_single_line(show_value(v))}" for k, v in ev.fields.items())
    if width is not None:
        room = width - len(head) - len(who) - len(name) - 3
        if len(fields) > room:
            fields = fields[: max(0, room - 1)] + "…"
    line = f"{style(head, 'dim')} {who} {style(name, 'bold', 'cyan')}"
    return f"{line} {fields}" if fields else line


def _show_other(value: Any) -> str:
    return printable(show_value(value))


# show_value by exact type, for the types the reader gives (their text never has a newline).
_SHOW: dict[type, Any] = {
    int: int.__repr__,
    float: lambda v: f"{v:.6g}",
    str: show_value,
    bool: repr,
    bytes: repr,
}


def _line_template(ev: Any) -> str:
    """A %-template of one event's line after the time and delta (escaped once)."""
    who = where(ev)
    fields = " ".join(f"{printable(k).replace('%', '%%')}=%s" for k in ev.fields)
    text = f" {who} {printable(ev.name)} ".replace("%", "%%") + fields
    return text.rstrip(" ") if not ev.fields else text


class _Batched:
    """Lines written a batch at a time (one write per batch: per line, the writes dominate)."""

    def __init__(self, out: IO[str], size: int = 512) -> None:
        self.out = out
        self.size = size
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        lines = self.lines
        lines.append(line)
        if len(lines) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.out.write("\n".join(self.lines) + "\n")
            self.lines.clear()


def write_text(
    events: Iterable[Any],
    out: IO[str],
    *,
    limit: int | None = None,
    width: int | None = None,
    style: Style | None = None,
) -> int:
    """Write ``events`` as lines to ``out``; return how many were written.

    Plain output (no width, no colour) takes a fast path, a template per event shape, that
    writes exactly what :func:`format_event` writes (a test holds them to it). If reading
    fails part-way, every line read before the failure is written.
    """
    previous = None
    n = 0
    plain = width is None and (style is None or not style.enabled)
    templates: dict[tuple, str] = {}
    if plain:
        fast = reader()[0]
        if fast is not None:
            return _write_plain_c(fast.format_text, events, out, limit, templates)  # type: ignore[attr-defined]
    batch = _Batched(out)
    try:
        for ev in events:
            if limit is not None and n >= limit:
                break
            if plain:
                batch.add(_plain_line(ev, previous, templates))
            else:
                batch.add(format_event(ev, previous, width=width, style=style))
            previous = ev.timestamp
            n += 1
    finally:
        batch.flush()
    return n


def _plain_line(ev: Any, previous: int | None, templates: dict[tuple, str]) -> str:
    """The plain path's line of one event (what format_event writes, a template per event
    shape)."""
    fields = ev.fields
    key = (ev.name, ev.pid, ev.thread or ev.tid, getattr(ev, "task", None), *fields)
    template = templates.get(key)
    if template is None:
        template = templates[key] = _line_template(ev)
    ts = ev.timestamp
    head = f"{_clock(ts)} {_delta(None if previous is None else ts - previous)}"
    show = _SHOW
    values = [show.get(type(v), _show_other)(v) for v in fields.values()]
    return head + template % tuple(values)


def _line_pieces(ev: Any) -> tuple[str, ...]:
    """_line_template's text cut where the values go: the text before each value, or the
    whole rest of the line when the event has no field (for the C reader's format_text)."""
    head = f" {where(ev)} {printable(ev.name)} "
    if not ev.fields:
        return (head.rstrip(" "),)
    keys = [printable(k) for k in ev.fields]
    return (head + keys[0] + "=", *(f" {k}=" for k in keys[1:]))


def _second(seconds: int) -> str:
    """HH:MM:SS of a second since the epoch (local time), as _clock writes it."""
    return _clock(seconds * 1_000_000_000)[:-7]


_C_CHUNK = 512


def _write_plain_c(
    format_text: Any, events: Iterable[Any], out: IO[str], limit: int | None, templates: dict
) -> int:
    """write_text's plain path with the lines made by the C reader (tracemark/_reader.c
    format_text): the same text."""
    previous = None
    entries: list = []

    def in_c(chunk: list, i: int) -> tuple[str, int]:
        nonlocal previous
        text, i, previous = format_text(
            chunk, i, previous, entries, _line_pieces, _second, _show_other, Event
        )
        return text, i

    def here(ev: Any) -> str:
        nonlocal previous
        line = _plain_line(ev, previous, templates)
        previous = ev.timestamp
        return line

    return _write_by_chunks(events, out, limit, in_c, here)


def _write_by_chunks(
    events: Iterable[Any],
    out: IO[str],
    limit: int | None,
    in_c: Callable[[list, int], tuple[str, int]],
    here: Callable[[Any], str],
) -> int:
    """Write the lines of events (at most limit), a chunk at a time: in_c(chunk, i) makes
    the lines of chunk[i:next] in C and says next; an event it declines, and the rest of a
    chunk after an error in it, are made by here(ev), the Python way, so every line read
    before a failure is written, as on the Python path, and the failure then raised."""
    it = iter(events)
    n = 0
    failure = None
    while failure is None and (limit is None or n < limit):
        chunk: list = []
        try:
            # list.extend keeps what it took before an error (Objects/listobject.c)
            chunk.extend(islice(it, _C_CHUNK if limit is None else min(_C_CHUNK, limit - n)))
        except BaseException as exc:
            failure = exc
        if not chunk:
            break
        parts = []
        i = 0
        try:
            while i < len(chunk):
                text, i = in_c(chunk, i)
                parts.append(text)
                if i < len(chunk):  # declined: this one the Python way
                    parts.append(here(chunk[i]) + "\n")
                    i += 1
        except Exception:  # the Python way says it too, after the lines before it
            try:
                for ev in chunk[i:]:
                    parts.append(here(ev) + "\n")
                    i += 1
            finally:
                out.write("".join(parts))
        else:
            out.write("".join(parts))
        n += len(chunk)
    if failure is not None:
        raise failure
    return n


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def _finite_float(v: float) -> str:
    return float.__repr__(v) if v - v == 0 else f'"{v}"'  # inf - inf and nan are not 0


# How each exactly-typed value is written; any other type takes the slow path.
_ENCODE: dict[type, Any] = {
    int: int.__repr__,
    str: encode_basestring,
    float: _finite_float,
    bool: lambda v: "true" if v else "false",
    type(None): lambda v: "null",
    ReprText: encode_basestring,  # an ``any`` field's repr: its text
}


def _template(ev: Any, schema: int) -> str:
    """A %-template of one event's JSON line: everything but the values, escaped once."""

    def lit(text: str) -> str:
        return encode_basestring(text).replace("%", "%%")

    fields = ",".join(f"{lit(k)}:%s" for k in ev.fields)
    task = _task_json(getattr(ev, "task", None))
    return (
        f'{{"timestamp":%d,"name":{lit(ev.name)},"pid":%d,"tid":%d,'
        f'"thread":{lit(ev.thread)},"task":{_TASK_ENCODE(task).replace("%", "%%")},'
        f'"fields":{{{fields}}},"schema":{int(schema)}}}'
    )


_TASK_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _task_json(task: Any) -> dict[str, Any] | None:
    return None if task is None else {"id": task.id, "name": task.name}


def write_json(
    events: Iterable[Any],
    out: IO[str],
    *,
    limit: int | None = None,
    schema: int = SCHEMA_VERSION,
) -> int:
    """Write ``events`` as JSON lines to ``out``; return how many were written. ``schema``:
    the trace schema version each line names (the trace's: ``exported_schema``).

    With the C reader the lines are made in C (tracemark/_reader_json.c), which hands the
    events it declines (odd types, surrogates) to the Python path. That path: a template per
    (event name, thread, field names) and one small function per value type; the :mod:`json`
    encoder only for values of other types. All give the same bytes (tests hold them to it).
    """
    fast = reader()[0]
    if fast is not None:
        return _write_json_c(fast.format_json, events, out, limit, schema)  # type: ignore[attr-defined]
    n = 0
    batch = _Batched(out)
    line = _json_line_maker(schema)
    try:
        for ev in events:
            if limit is not None and n >= limit:
                break
            batch.add(line(ev))
            n += 1
    finally:
        batch.flush()
    return n


def _json_line_maker(schema: int) -> Any:
    """The Python path's line of one event (a template per event shape, the json encoder
    for values of other types)."""
    encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    templates: dict[tuple, str] = {}
    coders = _ENCODE

    def line(ev: Any) -> str:
        fields = ev.fields
        key = (ev.name, ev.thread, getattr(ev, "task", None), *fields)
        template = templates.get(key)
        if template is None:
            template = templates[key] = _template(ev, schema)
        try:
            values = [coders[type(v)](v) for v in fields.values()]
            return template % (ev.timestamp, ev.pid, ev.tid, *values)
        except (KeyError, TypeError):  # bytes, an odd type, a non-int pid: the slow path
            return encode(
                {
                    "timestamp": ev.timestamp,
                    "name": ev.name,
                    "pid": ev.pid,
                    "tid": ev.tid,
                    "thread": ev.thread,
                    "task": _task_json(getattr(ev, "task", None)),
                    "fields": {k: _plain(v) for k, v in fields.items()},
                    "schema": int(schema),
                }
            )

    return line


def _json_pieces(schema: int) -> Any:
    """The JSON around the values of an event's line, for the C reader's format_json
    (tracemark/_reader_json.c): what _template writes, cut where the timestamp, pid, tid
    and values go."""

    def pieces(ev: Any) -> tuple[str, ...]:
        task = _TASK_ENCODE(_task_json(getattr(ev, "task", None)))
        keys = [encode_basestring(k) + ":" for k in ev.fields]
        tail = f'}},"schema":{int(schema)}}}'
        around = f',"thread":{encode_basestring(ev.thread)},"task":{task},"fields":{{'
        if not keys:
            return (
                '{"timestamp":',
                f',"name":{encode_basestring(ev.name)},"pid":',
                ',"tid":',
                around + tail,
            )
        return (
            '{"timestamp":',
            f',"name":{encode_basestring(ev.name)},"pid":',
            ',"tid":',
            around + keys[0],
            *("," + k for k in keys[1:]),
            tail,
        )

    return pieces


def _write_json_c(
    format_json: Any, events: Iterable[Any], out: IO[str], limit: int | None, schema: int
) -> int:
    """write_json with the lines made by the C reader (tracemark/_reader_json.c): the same
    text."""
    entries: list = []
    pieces = _json_pieces(schema)

    def in_c(chunk: list, i: int) -> tuple[str, int]:
        return format_json(chunk, i, entries, pieces, ReprText, Event)

    return _write_by_chunks(events, out, limit, in_c, _json_line_maker(schema))
