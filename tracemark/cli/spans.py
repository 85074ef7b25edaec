"""``tracemark spans DIR``: which span was slow, and where its time went.

Spans are paired by :class:`tracemark.analysis.Pairing` (``NAME.begin``/``NAME.end`` and
probe ``P.entry``/``P.return``, per thread and asyncio task). The report has two parts:

* **The slowest spans**, each with the tree of spans and markers under it, as a waterfall:
  offset from the span's start and duration in ms, then the name and fields, indented by
  depth (``-`` in the duration column: a marker, which has none)::

      #1 req  21.110 ms  [4711 worker-3]  12:00:00.123456  endpoint=/users/27
           offset  duration
            0.000    21.110  req endpoint=/users/27
            0.050    20.220    db.query table=users
            0.061         -      db.row n=3
           20.300     0.030    render

  Listed are the spans that pass ``--filter`` and are not inside another span that passes
  it (on their thread or task): without a filter, the outermost spans ("the requests"); with
  ``--filter 'name == "db.query"'``, the queries, wherever they are. Listed spans are
  therefore never nested in one another.
* **Per span name** (with ``--by FIELD``, per name and value of that field): count of ended
  spans, of unfinished ones, and p50 / p99 / max of the ended ones' durations (exact,
  nearest rank, as ``stats``). Only the spans that pass ``--filter`` are counted.

What a span is, and what ``--filter`` sees
------------------------------------------
A span's fields are its begin event's fields, plus those of its end event that the begin
has not. A filter sees ``name`` (the span's name: ``db.query``, not ``db.query.begin``),
``pid``, ``tid``, ``thread``, ``task`` (the asyncio task's name, None outside a task),
``task_id``, ``timestamp`` (its start, ns since the epoch), its
fields, ``duration`` (float, in ms) and ``unfinished`` (bool). A field called like one of
those is ``fields["duration"]``.

Guarantees
----------
* **Nothing dropped silently.** A span left open (an exception, a thread that ended, a
  process killed, a damaged trace) is closed at its track's last event and shown as
  ``unfinished`` (its duration is then a lower bound; it is ranked by it but kept out of the
  percentiles); an end without a begin is never paired with a wrong begin: it is counted per
  name in the report, and shown in the tree where it happened.
* **Bounded memory** (10M events are fine): the trace is read once, streaming. Kept are the
  ``--top`` slowest spans in a heap; the spans still open, each with the items under it
  capped at :data:`TREE_CAP` (1,000) events (a child span counts 1 plus what is kept under
  it; when a closing child does not fit in what is left, it is kept as one line and its own
  items are dropped); 8 bytes per ended span for the exact percentiles; at most
  :data:`._groups.GROUP_CAP` groups per name with ``--by``. A tree that lost events says
  how many (``... 35 events not kept``), at the place they were lost; the waterfall shows at
  most :data:`SHOWN_DEPTH` levels under a listed span, and says what is deeper.
* **Damaged traces**: what was read before the damage is reported (its open spans closed
  unfinished), then the error, and exit code 4.

``--json`` writes one document::

    {"trace": DIR, "events": items read, "spans": spans closed (ended + unfinished),
     "unfinished": n, "ends_without_begin": {"db.query": 1}, "filter": EXPR | null,
     "by": FIELD | null, "tree_cap": 1000, "complete": false if the trace was damaged,
     "candidates": spans eligible for the list,
     "slowest": [SPAN, ...],               # slowest first
     "names": {"req": {"count": ended, "unfinished": n, "p50_ns": ..., "p99_ns": ...,
                       "max_ns": ..., "groups": [{"value": V, "count": ..., ...}],
                       "other": {... "values": n, "values_exact": bool} | null,
                       "ungrouped": spans without the field}}}   # groups etc. with --by

    SPAN = {"kind": "span", "name", "pid", "tid", "thread", "task" ({"id", "name"} or
            null), "start" (ns since the
            epoch), "offset_ns" (from the listed span's start), "duration_ns", "unfinished",
            "fields", "events" (items under it), "not_kept" (items lost right under it, by
            the cap or the depth limit), "children": [SPAN | EVENT | END, ...]}
    EVENT = {"kind": "event", "name", "timestamp", "offset_ns", "fields"}
    END = {"kind": "end_without_begin", "name", "timestamp", "offset_ns", "fields"}

Values are made JSON-safe as ``view --json`` does (bytes as hex, non-finite floats as
strings).
"""

from __future__ import annotations

import heapq
import json
from array import array
from collections import Counter
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from ..analysis.pairing import Begin, End, Instant, Pairing, track_of
from ..markers.fields import show_value
from ._common import CliError, Style, printable, who
from ._groups import Groups
from .stats import SHOWN_GROUPS, summary
from .view import _clock, _task_json
from .view import _plain as plain_value

__all__ = [
    "FILTER_NAMES",
    "SHOWN_DEPTH",
    "TREE_CAP",
    "Node",
    "Report",
    "collect",
    "render_json",
    "render_text",
]

#: The most items kept under one span (a child span counts 1 plus the items kept under it).
TREE_CAP = 1_000
#: The most levels under a listed span that are shown.
SHOWN_DEPTH = 64
#: What a ``--filter`` reads as attributes of a span rather than as its fields.
FILTER_NAMES = (
    "name",
    "pid",
    "tid",
    "thread",
    "task",
    "task_id",
    "timestamp",
    "duration",
    "unfinished",
)


class Node:
    """A span, with the items kept under it (spans, events, ends without a begin)."""

    __slots__ = (
        "attached",
        "begin",
        "children",
        "count0",
        "eligible",
        "end",
        "events",
        "kept",
        "name",
        "pending",
        "stop",
        "unfinished",
    )

    def __init__(self, name: str, begin: Any, count0: int) -> None:
        self.name = name
        self.begin = begin
        self.end: Any = None  # the end event (None if unfinished)
        self.stop = begin.timestamp
        self.unfinished = False
        self.children: list[Any] = []
        self.kept = 0  # items kept under it, at every level
        self.events = 0  # items under it, kept or not (known once it ended)
        self.count0 = count0  # its track's item count when it began
        self.attached = False  # in its parent's children
        self.pending: list | None = None  # the slowest candidates under it, a heap
        self.eligible = 0  # candidates under it (spans passing the filter, not nested in one)

    @property
    def duration(self) -> int:
        """ns from begin to end (to its track's last event, if unfinished)."""
        return self.stop - self.begin.timestamp

    @property
    def fields(self) -> dict[str, Any]:
        fields = self.begin.fields
        end = self.end
        if end is not None and end.fields:
            extra = {k: v for k, v in end.fields.items() if k not in fields}
            if extra:
                fields = {**fields, **extra}
        return fields

    def collapsed(self) -> Node:
        """This span without the items under it (they do not fit in its parent's tree)."""
        copy = Node(self.name, self.begin, self.count0)
        copy.end, copy.stop, copy.unfinished = self.end, self.stop, self.unfinished
        copy.events, copy.attached = self.events, True
        return copy


@dataclass(frozen=True)
class Orphan:
    """An end without a begin, as an item of a tree."""

    event: Any


class _SpanView:
    """What a ``--filter`` sees of a span (:data:`FILTER_NAMES` and ``fields``)."""

    __slots__ = (*FILTER_NAMES, "fields")

    def __init__(self, node: Node) -> None:
        ev = node.begin
        self.name = node.name
        self.pid, self.tid, self.thread = ev.pid, ev.tid, ev.thread
        self.task = getattr(ev, "task", None)  # the filter reads its name (or task_id)
        self.timestamp = ev.timestamp
        self.duration = node.duration / 1e6
        self.unfinished = node.unfinished
        self.fields = node.fields


@dataclass
class NameStats:
    """The durations of one span name's ended spans (ns, 8 bytes each) and its unfinished."""

    durations: array = field(default_factory=lambda: array("q"))
    unfinished: int = 0

    @property
    def count(self) -> int:
        return len(self.durations)

    def add(self, node: Node) -> None:
        if node.unfinished:
            self.unfinished += 1
        else:
            self.durations.append(node.duration)

    def figures(self) -> dict[str, int | None]:
        """count, unfinished, p50 / p99 / max in ns (None when no span ended)."""
        values = sorted(self.durations)
        s = summary(values) if values else {}
        return {
            "count": len(values),
            "unfinished": self.unfinished,
            **{f"{k}_ns": s.get(k) for k in ("p50", "p99", "max")},
        }


@dataclass
class NameEntry:
    """Per span name: its figures, and with ``--by`` its groups."""

    all: NameStats = field(default_factory=NameStats)
    groups: Groups[NameStats] | None = None
    ungrouped: NameStats = field(default_factory=NameStats)


@dataclass
class Report:
    """What :func:`collect` found."""

    slowest: list[Node]
    names: dict[str, NameEntry]
    events: int
    spans: int
    unfinished: int
    ends_without_begin: Counter
    candidates: int
    by: str | None = None
    filter: str | None = None
    top: int = 10


class _Track:
    __slots__ = ("count", "stack")

    def __init__(self) -> None:
        self.stack: list[Node] = []
        self.count = 0  # items seen on this track


def collect(
    events: Iterable[Any],
    *,
    top: int = 10,
    by: str | None = None,
    predicate: Callable[[Any], bool] | None = None,
    on_error: list | None = None,
    declared: Container[str] | None = None,
) -> Report:
    """Pair ``events`` (in timestamp order) into spans and gather the report.

    ``predicate`` sees a span as described in the module docstring. If reading ``events``
    raises a :class:`CliError` (a damaged trace) and ``on_error`` is a list, the spans still
    open are closed unfinished, the error is appended to it and the report returned.
    ``declared``: the trace's event names (a begin without a declared partner is not a span:
    see :func:`tracemark.analysis.pairing.span_kind`).
    """
    pairing = Pairing(declared)
    tracks: dict[tuple, _Track] = {}
    names: dict[str, NameEntry] = {}
    heap: list[tuple[int, int, Node]] = []  # (duration, -seq, node): the smallest goes first
    seq = 0
    state = {"spans": 0, "candidates": 0}
    unmatched: Counter = Counter()
    cap = TREE_CAP

    def record(node: Node) -> None:
        entry = names.get(node.name)
        if entry is None:
            entry = names[node.name] = NameEntry()
            if by is not None:
                entry.groups = Groups(NameStats)
        entry.all.add(node)
        if by is not None:
            fields = node.fields
            if by in fields:
                entry.groups.get(fields[by]).add(node)  # type: ignore[union-attr]
            else:
                entry.ungrouped.add(node)

    def offer(into: list, item: tuple) -> None:
        if len(into) < top:
            heapq.heappush(into, item)
        elif into and item[:2] > into[0][:2]:
            heapq.heapreplace(into, item)

    def close(node: Node, tr: _Track) -> None:
        nonlocal seq
        state["spans"] += 1
        node.events = tr.count - node.count0
        parent = tr.stack[-1] if tr.stack else None
        passes = predicate is None or predicate(_SpanView(node))
        if passes:
            record(node)
            seq += 1
            found, eligible = [(node.duration, -seq, node)], 1
        else:
            found, eligible = node.pending or [], node.eligible
        node.pending = None  # what it held is inside it, or moves up
        if parent is None:
            state["candidates"] += eligible
        else:
            parent.eligible += eligible
        if top and found:
            if parent is None:
                for item in found:
                    offer(heap, item)
            else:
                if parent.pending is None:
                    parent.pending = []
                for item in found:
                    offer(parent.pending, item)
        if node.attached and parent is not None:
            # Its children joined the parent's tree: keep the parent within the cap.
            room = cap - parent.kept
            if node.kept > room:
                parent.children[-1] = node.collapsed()
            else:
                parent.kept += node.kept

    def item_under(tr: _Track, item: Any) -> None:
        tr.count += 1
        top_node = tr.stack[-1]
        if top_node.kept < cap:
            top_node.children.append(item)
            top_node.kept += 1

    def feed(item: Any) -> None:
        kind = type(item)
        if kind is Instant:
            if item.depth:
                item_under(tracks[track_of(item.event)], item.event)
        elif kind is Begin:
            ev = item.event
            key = track_of(ev)
            tr = tracks.get(key)
            if tr is None:
                tr = tracks[key] = _Track()
            tr.count += 1
            node = Node(item.span, ev, tr.count)
            if tr.stack:
                parent = tr.stack[-1]
                if parent.kept < cap:
                    parent.children.append(node)
                    parent.kept += 1
                    node.attached = True
            tr.stack.append(node)
        elif item.begin is None:  # an end without a begin
            unmatched[item.event.name] += 1
            if item.depth:
                item_under(tracks[track_of(item.event)], Orphan(item.event))
        else:
            key = track_of(item.begin)
            tr = tracks[key]
            node = tr.stack.pop()
            node.end, node.stop, node.unfinished = item.event, item.timestamp, item.unfinished
            close(node, tr)
            if not tr.stack:
                del tracks[key]  # a thread's state goes when its last span does

    read = 0
    try:
        for item in pairing.pair(events):
            if type(item) is not End or item.event is not None:
                read += 1
            feed(item)
    except CliError as exc:  # a damaged trace (from _common.guarded): report what was read
        if on_error is None:
            raise
        on_error.append(exc)
        for item in pairing.finish():
            feed(item)
    slowest = [node for _, _, node in sorted(heap, reverse=True)]
    return Report(
        slowest=slowest,
        names=names,
        events=read,
        spans=state["spans"],
        unfinished=pairing.unfinished,
        ends_without_begin=unmatched,
        candidates=state["candidates"],
        by=by,
        top=top,
    )


# -- text -----------------------------------------------------------------------------------


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def _fields_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{printable(k)}={printable(show_value(v))}" for k, v in fields.items())


def _own_lost(node: Node) -> int:
    """Items under ``node`` not kept, not counting those its kept child spans report."""
    inner = sum(c.events - c.kept for c in node.children if type(c) is Node)
    return node.events - node.kept - inner


def _waterfall(root: Node, width: int | None, style: Style) -> list[str]:
    t0 = root.begin.timestamp
    lines = [f"    {'offset':>10}  {'duration':>9}"]

    def line(offset: int, duration: str, depth: int, text: str) -> None:
        row = f"    {_ms(offset):>10}  {duration:>9}  {'  ' * depth}{text}"
        if width is not None and len(row) > width:
            row = row[: width - 1] + "…"
        lines.append(row)

    # Depth first, without recursion: (item, depth); a None item closes a span's children.
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        item, depth = stack.pop()
        if type(item) is tuple:  # the end of a span's children: what was not kept there
            (lost, deeper), at = item[1:], item[0]
            if lost:
                line(at, "", depth, style(f"... {lost:,} events not kept (tree cap)", "dim"))
            if deeper:
                note = f"... {deeper:,} items deeper than {SHOWN_DEPTH} levels not shown"
                line(at, "", depth, style(note, "dim"))
            continue
        if type(item) is Node:
            text = style(printable(item.name), "bold", "cyan")
            fields = _fields_text(item.fields)
            if fields:
                text += " " + fields
            if item.unfinished:
                text += " " + style("(unfinished)", "bold", "red")
            line(item.begin.timestamp - t0, _ms(item.duration), depth, text)
            if depth >= SHOWN_DEPTH and item.children:
                stack.append(((item.stop - t0, 0, item.kept + _own_lost(item)), depth + 1))
                continue
            stack.append(((item.stop - t0, _own_lost(item), 0), depth + 1))
            stack.extend((child, depth + 1) for child in reversed(item.children))
        else:
            ev = item.event if type(item) is Orphan else item
            text = style(printable(ev.name), "cyan")
            fields = _fields_text(ev.fields)
            if fields:
                text += " " + fields
            if type(item) is Orphan:
                text += " " + style("(end without a begin)", "bold", "red")
            line(ev.timestamp - t0, "-", depth, text)
    return lines


_who = who


def _listed(report: Report, width: int | None, style: Style) -> list[str]:
    lines: list[str] = []
    kind = "spans passing --filter" if report.filter else "outermost spans"
    if not report.slowest:
        return [f"no {kind} to list"] if report.top else []
    lines.append(
        style(f"slowest spans: {len(report.slowest):,} of {report.candidates:,} {kind}", "bold")
        + " (times in ms)"
    )
    for rank, node in enumerate(report.slowest, 1):
        head = (
            f"#{rank} {style(printable(node.name), 'bold', 'cyan')}  {_ms(node.duration)} ms"
            f"  {_who(node.begin)}  {_clock(node.begin.timestamp)}"
        )
        fields = _fields_text(node.fields)
        if fields:
            head += "  " + fields
        notes = []
        if node.unfinished:
            notes.append("UNFINISHED: closed at its thread's last event")
        if node.events > node.kept:
            notes.append(f"tree cut: {node.events - node.kept:,} of {node.events:,} not kept")
        if notes:
            head += "  " + style(f"({'; '.join(notes)})", "bold", "red")
        lines.append("")
        lines.append(head)
        lines.extend(_waterfall(node, width, style))
    return lines


def _table(report: Report, style: Style) -> list[str]:
    rows: list[tuple[str, dict]] = []
    by = report.by
    for name, entry in sorted(report.names.items(), key=lambda kv: (-kv[1].all.count, kv[0])):
        shown = printable(name)
        if by is None:
            rows.append((shown, entry.all.figures()))
            continue
        groups = entry.groups
        kept = sorted(groups.groups.items(), key=lambda kv: -kv[1].count) if groups else []
        if not kept and (groups is None or groups.other is None):
            rows.append((f"{shown} (no field {printable(by)})", entry.all.figures()))
            continue
        for value, stats in kept[:SHOWN_GROUPS]:
            value_text = printable(show_value(Groups.value_of(value)))
            rows.append((f"{shown} {printable(by)}={value_text}", stats.figures()))
        rest = kept[SHOWN_GROUPS:]
        if rest:
            n = sum(s.count + s.unfinished for _, s in rest)
            rows.append((f"{shown} ... {len(rest):,} more groups, {n:,} spans (--json)", {}))
        if groups is not None and groups.other is not None:
            title = f"{shown} other values ({groups.more_text()} beyond {groups.cap:,})"
            rows.append((title, groups.other.figures()))
        if entry.ungrouped.count or entry.ungrouped.unfinished:
            rows.append((f"{shown} without {printable(by)}", entry.ungrouped.figures()))
    if not rows:
        return ["no spans"]
    title = "span" if by is None else f"span by {printable(by)}"
    left = min(48, max(len(title), *(len(r[0]) for r in rows)))
    head = f"{title:<{left}}  {'count':>9}  {'unfinished':>10}  {'p50':>9}  {'p99':>9}  {'max':>9}"
    lines = [style(head, "bold") + "  (ms)"]
    for text, f in rows:
        if len(text) > left:
            text = text[: left - 1] + "…"
        if not f:
            lines.append(text)
            continue
        figures = [_ms(f[k]) if f[k] is not None else "-" for k in ("p50_ns", "p99_ns", "max_ns")]
        lines.append(
            f"{text:<{left}}  {f['count']:>9,}  {f['unfinished']:>10,}  "
            + "  ".join(f"{x:>9}" for x in figures)
        )
    return lines


def render_text(
    report: Report,
    *,
    path: str = "",
    width: int | None = None,
    style: Style | None = None,
    complete: bool = True,
) -> str:
    """The report as text: summary, slowest spans with their waterfall, per-name table.
    ``width``: cut waterfall lines to it (a terminal)."""
    style = style or Style(False)
    lines = [style(f"trace {printable(path)}", "bold") if path else style("trace", "bold")]
    summary_line = (
        f"  {report.events:,} events, {report.spans:,} spans of {len(report.names):,} "
        f"name{'s' if len(report.names) != 1 else ''}"
        if report.filter is None
        else f"  {report.events:,} events, {report.spans:,} spans"
    )
    if report.unfinished:
        summary_line += f", {report.unfinished:,} unfinished (closed at their thread's last event)"
    lines.append(summary_line)
    if report.filter is not None:
        n = sum(e.all.count + e.all.unfinished for e in report.names.values())
        lines.append(f"  {n:,} spans pass --filter {printable(report.filter)}")
    if report.ends_without_begin:
        n = sum(report.ends_without_begin.values())
        which = ", ".join(
            f"{printable(k)} {v:,}" for k, v in report.ends_without_begin.most_common(10)
        )
        more = ", ..." if len(report.ends_without_begin) > 10 else ""
        lines.append(
            style(f"  {n:,} end{'s' if n != 1 else ''} without a begin: {which}{more}", "red")
        )
    if not complete:
        lines.append(style("  the trace is damaged: only the events before it are here", "red"))
    listed = _listed(report, width, style)
    if listed:
        lines.append("")
        lines.extend(listed)
    lines.append("")
    lines.extend(_table(report, style))
    return "\n".join(lines) + "\n"


# -- JSON -----------------------------------------------------------------------------------


def _plain_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: plain_value(v) for k, v in fields.items()}


def _node_json(root: Node) -> dict[str, Any]:
    t0 = root.begin.timestamp

    def event(item: Any) -> dict[str, Any]:
        ev = item.event if type(item) is Orphan else item
        return {
            "kind": "end_without_begin" if type(item) is Orphan else "event",
            "name": ev.name,
            "timestamp": ev.timestamp,
            "offset_ns": ev.timestamp - t0,
            "fields": _plain_fields(ev.fields),
        }

    def span(node: Node) -> dict[str, Any]:
        ev = node.begin
        return {
            "kind": "span",
            "name": node.name,
            "pid": ev.pid,
            "tid": ev.tid,
            "thread": ev.thread,
            "task": _task_json(getattr(ev, "task", None)),
            "start": ev.timestamp,
            "offset_ns": ev.timestamp - t0,
            "duration_ns": node.duration,
            "unfinished": node.unfinished,
            "fields": _plain_fields(node.fields),
            "events": node.events,
            "not_kept": _own_lost(node),
            "children": [],
        }

    # Built without recursion (a tree may be TREE_CAP levels deep); cut at SHOWN_DEPTH.
    doc = span(root)
    stack: list[tuple[Node, dict, int]] = [(root, doc, 0)]
    while stack:
        node, out, depth = stack.pop()
        if depth >= SHOWN_DEPTH:
            out["not_kept"] += node.kept
            continue
        for child in node.children:
            if type(child) is Node:
                sub = span(child)
                out["children"].append(sub)
                stack.append((child, sub, depth + 1))
            else:
                out["children"].append(event(child))
    return doc


def render_json(report: Report, *, path: str = "", complete: bool = True) -> str:
    """The report as one JSON document (its shape: the module docstring)."""
    names: dict[str, Any] = {}
    for name, entry in report.names.items():
        doc: dict[str, Any] = entry.all.figures()
        if report.by is not None and entry.groups is not None:
            groups = entry.groups
            kept = sorted(groups.groups.items(), key=lambda kv: -kv[1].count)
            other = None
            if groups.other is not None:
                other = {
                    **groups.other.figures(),
                    "values": groups.more,
                    "values_exact": groups.more_exact,
                }
            doc["groups"] = [
                {"value": plain_value(Groups.value_of(v)), **s.figures()} for v, s in kept
            ]
            doc["other"] = other
            doc["ungrouped"] = entry.ungrouped.count + entry.ungrouped.unfinished
        names[name] = doc
    out = {
        "trace": path,
        "complete": complete,
        "events": report.events,
        "spans": report.spans,
        "unfinished": report.unfinished,
        "ends_without_begin": dict(report.ends_without_begin),
        "filter": report.filter,
        "by": report.by,
        "tree_cap": TREE_CAP,
        "candidates": report.candidates,
        "slowest": [_node_json(n) for n in report.slowest],
        "names": names,
    }
    return json.dumps(out, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write(report: Report, out: IO[str], *, as_json: bool, **info: Any) -> None:
    if as_json:
        info.pop("width", None)
        info.pop("style", None)
        out.write(render_json(report, **info))
    else:
        out.write(render_text(report, **info))
