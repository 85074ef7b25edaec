"""``tracemark stats DIR``: what a trace holds, per marker, as bpftrace prints its ``@`` maps.

For each marker: how many events and at what rate; for each numeric field (int or float,
not bool) min / mean / max / p50 / p99 and a log2 histogram; for every other field (str,
bool, bytes, object) the number of distinct values and the most frequent ones::

    shop.db.query  300 events, 243.2/s
      rows (int)  min 1  mean 1  max 1  p50 1  p99 1
        [1]                 300 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|
      table (str)  1 distinct
        prices              300  100.0%

Guarantees
----------
* Every event is counted exactly once; the figures are exact (percentiles by nearest rank over
  all values, not estimates). Numbers are kept in typed arrays: 8 bytes a value.
* A histogram bucket ``[2^k, 2^(k+1))`` holds the values v with 2^k <= v < 2^(k+1); zero has
  its own bucket ``[0]`` and negative values one bucket ``(..., 0)``; buckets between the
  smallest and the largest non-empty one are shown even when empty, as bpftrace does. NaN is
  counted apart and left out of min / mean / max / percentiles.
* The text fits 80 columns; ``--json`` gives the same figures as one JSON document.
* ``--by FIELD`` gives each marker's figures per value of that field (per endpoint, per
  table), the most frequent values first: at most :data:`SHOWN_GROUPS` in the text (the
  others are counted in one line; ``--json`` lists them all), at most
  :data:`._groups.GROUP_CAP` kept (the values beyond share one "other values" group, and
  how many there were is said). A marker without that field is not grouped, and says so;
  every event is counted in exactly one group::

    shop.db.query  300 events, 243.2/s, by table: 2 groups
      table=prices  200 events, 162.1/s
        rows (int)  min 1  mean 1  max 1  p50 1  p99 1
      table=users  100 events, 81.1/s
        ...
    net.rx  10 events, 8.1/s  (no field 'table': not grouped)
"""

from __future__ import annotations

import json
import math
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice, repeat
from math import isnan
from operator import eq, itemgetter, methodcaller
from typing import IO, Any

from ..ctf.reader import Event
from ..env import reader
from ..markers.fields import show_value
from ._common import Style, human_duration, printable
from ._groups import Groups

__all__ = ["FieldStats", "MarkerStats", "collect", "histogram", "render_json", "render_text"]

TOP = 5  # most frequent values shown per non-numeric field
SHOWN_GROUPS = 20  # groups shown per marker with --by (--json has them all)
BAR = 40  # histogram bar width, so a row fits 80 columns


@dataclass
class FieldStats:
    """The values one field took, numeric ones in arrays and the others counted."""

    ints: array = field(default_factory=lambda: array("q"))
    floats: array = field(default_factory=lambda: array("d"))
    big: list = field(default_factory=list)  # ints beyond 64 bits, rare
    nan: int = 0
    others: Counter = field(default_factory=Counter)

    def add(self, value: Any) -> None:
        kind = type(value)
        if kind is int:
            try:
                self.ints.append(value)
            except OverflowError:
                self.big.append(value)
        elif kind is float:
            if value != value:
                self.nan += 1
            else:
                self.floats.append(value)
        else:
            try:
                self.others[value] += 1
            except TypeError:  # unhashable: count it by its repr
                self.others[repr(value)] += 1

    def extend(self, values: list) -> None:
        """``add`` each of ``values``, in bulk when they are all plain ints or all floats."""
        types = set(map(type, values))  # the scans below at C speed (map, not a genexpr)
        if types <= _INT:
            done = len(self.ints)
            try:
                self.ints.extend(values)
                return
            except OverflowError:  # one beyond 64 bits: value by value
                del self.ints[done:]  # array.extend keeps what it took before the error
        elif types <= _FLOAT and not any(map(isnan, values)):
            self.floats.extend(values)
            return
        elif not types & _NUMBERS:
            try:
                # counted in C, apart first: an unhashable value raises part-way
                self.others.update(Counter(values))
                return
            except TypeError:  # something unhashable: value by value
                pass
        for v in values:
            self.add(v)

    def numbers(self) -> list:
        """Every numeric value, sorted."""
        values: list = [*self.ints, *self.floats, *self.big]
        values.sort()
        return values


@dataclass
class MarkerStats:
    name: str
    count: int = 0
    first: int | None = None
    last: int | None = None
    fields: dict[str, FieldStats] = field(default_factory=dict)
    #: Field dicts not yet folded into ``fields``: a column at a time is much faster.
    pending: list = field(default_factory=list, repr=False)
    #: With ``--by``: the figures per value of the field; ``ungrouped`` events lacked it.
    groups: Groups[MarkerStats] | None = field(default=None, repr=False)
    ungrouped: int = 0
    #: The field names every event of this name has (the trace declares it with those
    #: only), so that fold need not check each row's; None: check.
    shape: tuple[str, ...] | None = field(default=None, repr=False)

    def fold(self) -> None:
        rows, self.pending = self.pending, []
        if not rows:
            return
        if self.shape is not None:
            same, keys = True, dict.fromkeys(self.shape)
        else:
            same, keys = False, None
        if keys is None and len(rows) < 64:
            keys = dict.fromkeys(k for row in rows for k in row)
        elif keys is None:  # usually every row has the same fields: check, then trust it
            keys = dict.fromkeys(rows[0])
            same = all(map(eq, repeat(keys.keys()), map(_keys_of, rows)))
            if not same:
                keys = dict.fromkeys(k for row in rows for k in row)
        missing = object()
        for key in keys:
            if same:  # every row has the key
                column = list(map(itemgetter(key), rows))
                f = self.fields.get(key)
                if f is None:
                    f = self.fields[key] = FieldStats()
                f.extend(column)
                continue
            column = [row.get(key, missing) for row in rows]
            if any(v is missing for v in column):
                column = [v for v in column if v is not missing]
            f = self.fields.get(key)
            if f is None:
                f = self.fields[key] = FieldStats()
            f.extend(column)


_BATCH = 1 << 14
_INT = frozenset([int])
_FLOAT = frozenset([float])
_NUMBERS = frozenset([int, float])
_keys_of = methodcaller("keys")


def shapes_of(trace: Any) -> dict[str, tuple[str, ...]]:
    """For :func:`collect`: each marker name that every sub-trace of ``trace`` declares with
    the same field names, and those names."""
    seen: dict[str, set[tuple[str, ...]]] = {}
    for sub in getattr(trace, "subtraces", ()):
        for eid, (name, fields) in sub.meta.events.items():
            if eid != sub.task_event_id:
                seen.setdefault(name, set()).add(tuple(f for f, _ in fields))
    return {name: next(iter(s)) for name, s in seen.items() if len(s) == 1}


def collect(
    events: Iterable[Any],
    by: str | None = None,
    shapes: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, MarkerStats]:
    """Per marker name (in order of first appearance), the figures of ``events``.

    ``by``: also per value of that field (``MarkerStats.groups``, see :mod:`._groups`); the
    marker's own ``fields`` then hold only the events without that field (``ungrouped``).
    ``shapes``: :func:`shapes_of` the trace, if the events are all its own (their field
    names are then trusted, not checked event by event).
    """
    if by is not None:
        return _collect_by(events, by)
    stats: dict[str, MarkerStats] = {}
    shapes = shapes or {}
    fast = reader()[0]
    if fast is not None:
        return _collect_c(fast.group_events, events, stats, shapes)  # type: ignore[attr-defined]
    for ev in events:
        m = stats.get(ev.name)
        if m is None:
            m = stats[ev.name] = MarkerStats(ev.name, first=ev.timestamp, shape=shapes.get(ev.name))
        m.count += 1
        m.last = ev.timestamp
        pending = m.pending
        pending.append(ev.fields)
        if len(pending) >= _BATCH:
            m.fold()
    for m in stats.values():
        m.fold()
    return stats


def _collect_c(
    group: Any,
    events: Iterable[Any],
    stats: dict[str, MarkerStats],
    shapes: Mapping[str, tuple[str, ...]],
) -> dict:
    """collect() with the events of a chunk grouped by name by the C reader
    (tracemark/_reader.c group_events): the same figures, in the same order."""
    it = iter(events)
    while chunk := list(islice(it, _BATCH)):
        groups = group(chunk, Event)
        if groups is None:  # not all Event tuples: one at a time
            groups = {}
            for ev in chunk:
                g = groups.get(ev.name)
                if g is None:
                    g = groups[ev.name] = [ev.timestamp, ev.timestamp, []]
                g[1] = ev.timestamp
                g[2].append(ev.fields)
        for name, (first, last, rows) in groups.items():
            m = stats.get(name)
            if m is None:
                m = stats[name] = MarkerStats(name, first=first, shape=shapes.get(name))
            m.count += len(rows)
            m.last = last
            m.pending += rows
            if len(m.pending) >= _BATCH:
                m.fold()
    for m in stats.values():
        m.fold()
    return stats


def _collect_by(events: Iterable[Any], by: str) -> dict[str, MarkerStats]:
    stats: dict[str, MarkerStats] = {}
    for ev in events:
        name, ts, fields = ev.name, ev.timestamp, ev.fields
        m = stats.get(name)
        if m is None:
            m = stats[name] = MarkerStats(name, first=ts)
            m.groups = Groups(lambda name=name: MarkerStats(name))
        m.count += 1
        m.last = ts
        if by in fields:
            m = m.groups.get(fields[by])  # type: ignore[union-attr]
            if m.first is None:
                m.first = ts
            m.count += 1
            m.last = ts
        else:
            m.ungrouped += 1
        pending = m.pending
        pending.append(fields)
        if len(pending) >= _BATCH:
            m.fold()
    for m in stats.values():
        m.fold()
        for g in _all_groups(m):
            g.fold()
    return stats


def _all_groups(m: MarkerStats) -> list[MarkerStats]:
    if m.groups is None:
        return []
    return [*m.groups.groups.values(), *([m.groups.other] if m.groups.other else [])]


def _percentile(values: list, p: float) -> Any:
    # Nearest rank: the smallest value with at least p% of the values at or below it.
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[rank - 1]


def mean(values: list) -> Any:
    """The mean of ``values`` (numbers, not empty), never an error: ``nan`` when they hold
    both ``inf`` and ``-inf`` (no mean, as IEEE 754 says of inf - inf); ``inf``/``-inf``
    when one of them is there; else the exact sum's (``math.fsum``) mean, taken value by
    value where the sum overflows a float (values near 1e308, ints beyond a float), and the
    exact integer mean, floored, of ints whose mean itself is beyond a float."""
    n = len(values)
    try:
        return math.fsum(values) / n
    except ValueError:  # inf + -inf
        return math.nan
    except OverflowError:
        pass
    infinite = {v for v in values if isinstance(v, float) and math.isinf(v)}
    if infinite:  # beside an int beyond a float (which fsum could not convert)
        return math.nan if len(infinite) == 2 else infinite.pop()
    try:
        return math.fsum(v / n for v in values)
    except OverflowError:  # ints whose mean is beyond any float
        return sum(int(v) for v in values) // n


def summary(values: list) -> dict[str, Any]:
    """min / mean / max / p50 / p99 of sorted ``values`` (not empty)."""
    return {
        "min": values[0],
        "mean": mean(values),
        "max": values[-1],
        "p50": _percentile(values, 50),
        "p99": _percentile(values, 99),
    }


def _bucket(v: Any) -> int:
    """The log2 bucket k of a positive, finite number: 2^k <= v < 2^(k+1)."""
    if type(v) is int:
        return v.bit_length() - 1
    return math.frexp(v)[1] - 1


def histogram(values: Iterable[Any]) -> list[tuple[str, int]]:
    """``[(label, count), ...]``: log2 buckets from the lowest to the highest non-empty one.

    Empty buckets in between are listed too, unless that would take more than 64 rows
    (values spread from 1e-300 to 1e300): then only the non-empty ones.
    """
    values = sorted(values)
    if not values:
        return []
    rows = []
    below_zero = bisect_left(values, 0)
    if below_zero:
        rows.append(("(..., 0)", below_zero))
    zeros = bisect_right(values, 0) - below_zero
    if zeros:
        rows.append(("[0]", zeros))
    positive = values[below_zero + zeros :]
    if positive:
        infinite = len(positive) - bisect_left(positive, math.inf)
        finite = positive[: len(positive) - infinite]
        if finite:
            low, high = _bucket(finite[0]), _bucket(finite[-1])
            # [1, 2) holds only 1 when every value is an int: bpftrace's "[1]".
            integers = set(map(type, finite)) <= _INT  # every value an int (at C speed)
            buckets = range(low, high + 1) if high - low < 64 else sorted(set(map(_bucket, finite)))
            for k in buckets:
                count = bisect_left(finite, _pow2(k + 1)) - bisect_left(finite, _pow2(k))
                if count or high - low < 64:
                    label = "[1]" if integers and k == 0 else _range_label(k)
                    rows.append((label, count))
        if infinite:
            rows.append(("[inf]", infinite))
    return rows


def _pow2(k: int) -> int | float:
    # An int when it can be one: exact against any int value, however large.
    return 1 << k if k >= 0 else 2.0**k


_UNITS = (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10))


def _power(k: int) -> str:
    """2**k as bpftrace writes it: 512, 1K, 8M; small fractions as 0.25, then 2^-5."""
    for unit, scale in _UNITS:
        if k >= scale:
            return f"{1 << (k - scale)}{unit}"
    if k >= 0:
        return str(1 << k)
    if k >= -4:
        return f"{2.0**k:g}"
    return f"2^{k}"


def _range_label(k: int) -> str:
    return f"[{_power(k)}, {_power(k + 1)})"


def _number(v: Any) -> str:
    if isinstance(v, float):
        if 1e4 <= abs(v) < 1e15:  # 500000.5, not 5e+05
            return f"{v:.1f}"
        return f"{v:.4g}"
    return str(v)


def _is_numeric(f: FieldStats) -> bool:
    return bool(f.ints or f.floats or f.big or f.nan)


def _duration(stats: dict[str, MarkerStats], start: int | None, end: int | None) -> int | None:
    if start is None or end is None:
        firsts = [m.first for m in stats.values() if m.first is not None]
        lasts = [m.last for m in stats.values() if m.last is not None]
        if not firsts:
            return None
        start, end = min(firsts), max(lasts)
    return end - start


def _rate(count: int, duration: int | None) -> float | None:
    return count / (duration / 1e9) if duration else None


def render_text(
    stats: dict[str, MarkerStats],
    *,
    path: str = "",
    start: int | None = None,
    end: int | None = None,
    discarded: int = 0,
    processes: int | None = None,
    threads: int | None = None,
    style: Style | None = None,
    by: str | None = None,
) -> str:
    """The report as text, 80 columns wide. ``by``: the field ``collect`` grouped by."""
    style = style or Style(False)
    total = sum(m.count for m in stats.values())
    duration = _duration(stats, start, end)
    where = []
    if processes is not None:
        where.append(f"{processes} process{'es' if processes != 1 else ''}")
    if threads is not None:
        where.append(f"{threads} thread{'s' if threads != 1 else ''}")
    lines = [
        style(f"trace {printable(path)}", "bold") if path else style("trace", "bold"),
        f"  {total:,} events in {human_duration(duration)}"
        + (f" from {', '.join(where)}" if where else ""),
    ]
    if discarded:
        lines.append(
            style(f"  WARNING: {discarded:,} events were discarded (buffers full)", "bold", "red")
        )
    if not stats:
        lines.append("  no events")
    for m in sorted(stats.values(), key=lambda m: (-m.count, m.name)):
        lines.append("")
        head = f"{style(printable(m.name), 'bold', 'cyan')}  {_counted(m, duration)}"
        if by is None:
            lines.append(head)
            for name, f in m.fields.items():
                lines.extend(_field_lines(name, f, style))
        else:
            lines.extend(_grouped_lines(head, m, by, duration, style))
    return "\n".join(lines) + "\n"


def _counted(m: MarkerStats, duration: int | None) -> str:
    rate = _rate(m.count, duration)
    return f"{m.count:,} events" + (f", {rate:,.1f}/s" if rate is not None else "")


def _grouped_lines(
    head: str, m: MarkerStats, by: str, duration: int | None, style: Style
) -> list[str]:
    """A marker's figures per value of ``by``, the most frequent values first."""
    groups = m.groups
    kept = sorted(groups.groups.items(), key=lambda kv: -kv[1].count) if groups else []
    other = groups.other if groups else None
    shown_by = printable(by)
    if not kept and other is None:
        lines = [f"{head}  (no field {shown_by!r}: not grouped)"]
        for name, f in m.fields.items():
            lines.extend(_field_lines(name, f, style))
        return lines
    n = len(kept) + (groups.more if groups else 0)
    lines = [f"{head}, by {shown_by}: {n:,}{'' if groups.more_exact else '+'} groups"]

    def block(title: str, g: MarkerStats) -> None:
        lines.append(f"  {style(title, 'bold')}  {_counted(g, duration)}")
        for name, f in g.fields.items():
            if name != by:  # the same value throughout the group
                lines.extend("  " + line for line in _field_lines(name, f, style))

    for value, g in kept[:SHOWN_GROUPS]:
        block(f"{shown_by}={_shown(Groups.value_of(value))}", g)
    rest = kept[SHOWN_GROUPS:]
    if rest:
        events = sum(g.count for _, g in rest)
        lines.append(f"  ... {len(rest):,} more groups with {events:,} events (--json lists them)")
    if other is not None:
        block(f"other values ({groups.more_text()} beyond the first {groups.cap:,})", other)
    if m.ungrouped:
        lines.append(f"  {style(f'without {shown_by}', 'bold')}  {m.ungrouped:,} events")
        for name, f in m.fields.items():
            lines.extend("  " + line for line in _field_lines(name, f, style))
    return lines


def _shown(value: Any) -> str:
    shown = printable(show_value(value))
    return shown if len(shown) <= 40 else shown[:39] + "…"


def _field_lines(name: str, f: FieldStats, style: Style) -> list[str]:
    lines = []
    if _is_numeric(f):
        values = f.numbers()
        kind = "float" if f.floats or f.nan else "int"
        head = f"  {style(printable(name), 'bold')} ({kind})"
        if values:
            s = summary(values)
            head += "  " + "  ".join(f"{k} {_number(v)}" for k, v in s.items())
        if f.nan:
            head += f"  nan {f.nan:,}"
        lines.append(head)
        rows = histogram(values)
        peak = max((c for _, c in rows), default=0) or 1
        for label, count in rows:
            bar = "@" * round(BAR * count / peak)
            lines.append(f"    {label:<17} {count:>9,} |{bar:<{BAR}}|")
    if f.others:
        kinds = sorted({type(v).__name__ for v in f.others})
        n = sum(f.others.values())
        shown_name = style(printable(name), "bold")
        lines.append(f"  {shown_name} ({'/'.join(kinds)})  {len(f.others):,} distinct")
        for value, count in f.others.most_common(TOP):
            lines.append(f"    {_shown(value):<40} {count:>12,}  {100 * count / n:5.1f}%")
    return lines


def render_json(
    stats: dict[str, MarkerStats],
    *,
    path: str = "",
    start: int | None = None,
    end: int | None = None,
    discarded: int = 0,
    processes: int | None = None,
    threads: int | None = None,
    by: str | None = None,
) -> str:
    """The report as one JSON document (with ``by``: see :func:`_grouped_json`)."""
    duration = _duration(stats, start, end)
    markers = {}
    for m in stats.values():
        markers[m.name] = _marker_json(m, duration)
        if by is not None:
            markers[m.name].update(_grouped_json(m, by, duration))
    doc = {
        "trace": path,
        "start": start,
        "end": end,
        "duration_ns": duration,
        "events": sum(m.count for m in stats.values()),
        "discarded": discarded,
        "processes": processes,
        "threads": threads,
        "markers": markers,
    }
    if by is not None:
        doc["by"] = by
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _marker_json(m: MarkerStats, duration: int | None, skip: str | None = None) -> dict:
    fields: dict[str, Any] = {}
    for name, f in m.fields.items():
        if name == skip:
            continue
        entry: dict[str, Any] = {}
        if _is_numeric(f):
            values = f.numbers()
            entry["type"] = "float" if f.floats or f.nan else "int"
            entry["count"] = len(values) + f.nan
            entry["nan"] = f.nan
            if values:
                entry.update({k: _finite(v) for k, v in summary(values).items()})
            entry["histogram"] = [{"bucket": b, "count": c} for b, c in histogram(values)]
        if f.others:
            entry["distinct"] = len(f.others)
            entry["top"] = [{"value": _plain(v), "count": c} for v, c in f.others.most_common(TOP)]
            entry.setdefault("type", "/".join(sorted({type(v).__name__ for v in f.others})))
        fields[name] = entry
    return {
        "count": m.count,
        "rate": _rate(m.count, duration),
        "first": m.first,
        "last": m.last,
        "fields": fields,
    }


def _grouped_json(m: MarkerStats, by: str, duration: int | None) -> dict:
    """``grouped`` (false: no event had the field), ``groups`` (each with its ``value``, most
    frequent first), ``other`` (the values beyond the cap together, with ``values`` and
    ``values_exact``; null if none), ``ungrouped`` (events without the field, whose figures
    are the marker's ``fields``)."""
    groups = m.groups
    kept = sorted(groups.groups.items(), key=lambda kv: -kv[1].count) if groups else []
    other = None
    if groups is not None and groups.other is not None:
        other = _marker_json(groups.other, duration, skip=by)
        other.update(values=groups.more, values_exact=groups.more_exact)
    return {
        "grouped": bool(kept) or other is not None,
        "groups": [
            {"value": _plain(Groups.value_of(v)), **_marker_json(g, duration, skip=by)}
            for v, g in kept
        ],
        "other": other,
        "ungrouped": m.ungrouped,
    }


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, str | int | float | bool) or v is None:
        return _finite(v)
    return repr(v)


def write(stats: dict[str, MarkerStats], out: IO[str], *, as_json: bool, **info: Any) -> None:
    out.write(render_json(stats, **info) if as_json else render_text(stats, **info))
