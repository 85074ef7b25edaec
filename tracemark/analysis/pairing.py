"""Pairing begin and end events into spans, streaming.

A *span* is a pair of markers, ``NAME.begin`` and ``NAME.end`` (what :func:`tracemark.span`
declares, the kernel's entry/exit tracepoint pairs); a dynamic probe's ``P.entry`` pairs
the same way with ``P.return`` or ``P.raise``. Everything else is an instant.

:class:`Pairing` is fed a trace's events in timestamp order (``read_trace(...).events()``)
and gives back, for each, a :class:`Begin`, an :class:`End` or an :class:`Instant`; an end
carries its begin and the duration. Pairs are matched per *track*: the thread (pid, tid),
and inside an asyncio task the task, so interleaved tasks on one thread nest correctly.

Guarantees
----------
* **Streaming, bounded memory**: it holds only the spans still open, per track.
* **Nothing dropped silently.** A begin without an end (an exception, a thread that ended, a
  process killed) is closed at its track's last event, marked ``unfinished``, by
  :meth:`Pairing.finish`; so is a begin left open inside a span that ended (an end that
  skips open spans closes them first, at its own time). An end without a begin is never
  paired with a wrong begin: it is an :class:`End` with ``begin=None``, counted in
  :attr:`Pairing.unmatched`.
* Deterministic: the same events give the same items, in the same order.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Begin", "End", "Instant", "Pairing", "span_kind", "track_of"]

#: Event name suffix -> (kind, the suffixes of its partners). A probe's call ends by a
#: return or by an exception leaving it (``%raise``).
_SUFFIXES = {
    ".begin": ("begin", (".end",)),
    ".end": ("end", (".begin",)),
    ".entry": ("begin", (".return", ".raise")),
    ".return": ("end", (".entry",)),
    ".raise": ("end", (".entry",)),
}


def span_kind(name: str, declared: Container[str] | None = None) -> tuple[str, str] | None:
    """``("begin"|"end", span name)`` for an event of a span, else None.

    With ``declared`` (the event names the trace declares), an event is part of a span only
    if a partner of it is declared too: an entry probe without a return probe, a
    ``.begin`` marker without its ``.end``, or a ``%raise`` probe on its own are instants,
    not spans that never end."""
    dot = name.rfind(".")
    if dot <= 0:
        return None
    found = _SUFFIXES.get(name[dot:])
    if found is None:
        return None
    span = name[:dot]
    if declared is not None and not any(span + p in declared for p in found[1]):
        return None
    return found[0], span


def track_of(ev: Any) -> tuple:
    """The track an event belongs to: its process and thread, and its asyncio task if the
    trace recorded one (``ev.task``, when the reader provides it)."""
    return (ev.pid, ev.tid, getattr(ev, "task", None) or None)


@dataclass(frozen=True)
class Instant:
    """An event that is not part of a span."""

    event: Any
    depth: int  # spans open on its track


@dataclass(frozen=True)
class Begin:
    event: Any
    span: str
    depth: int  # spans open on its track before this one


@dataclass(frozen=True)
class End:
    """The end of a span. ``event`` is None for an end made up by :meth:`Pairing.finish` or by
    an end that skipped it (``unfinished``); ``begin`` is None for an end without a begin."""

    event: Any
    span: str
    begin: Any
    depth: int
    timestamp: int
    unfinished: bool = False

    @property
    def duration(self) -> int | None:
        """ns from begin to end, or None for an end without a begin."""
        return None if self.begin is None else self.timestamp - self.begin.timestamp


@dataclass
class _Track:
    open: list[tuple[str, Any]] = field(default_factory=list)  # (span name, begin event)
    last: int = 0  # timestamp of its last event


class Pairing:
    """Pair the begin and end events of spans, per track. Feed events in timestamp order.

    ``declared``: the event names the trace declares (see :func:`span_kind`); without it
    every ``.begin``/``.entry`` event opens a span."""

    def __init__(self, declared: Container[str] | None = None) -> None:
        self.declared = declared
        self._kinds: dict[str, tuple[str, str] | None] = {}
        self._tracks: dict[tuple, _Track] = {}
        #: Ends without a begin, and spans closed unfinished.
        self.unmatched = 0
        self.unfinished = 0

    def feed(self, ev: Any) -> Iterator[Instant | Begin | End]:
        key = track_of(ev)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
        track.last = ev.timestamp
        kinds = self._kinds
        name = ev.name
        if name in kinds:
            kind = kinds[name]
        else:
            kind = kinds[name] = span_kind(name, self.declared)
        stack = track.open
        if kind is None:
            yield Instant(ev, len(stack))
            return
        what, span = kind
        if what == "begin":
            yield Begin(ev, span, len(stack))
            stack.append((span, ev))
            return
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] == span:
                break
        else:
            self.unmatched += 1
            yield End(ev, span, None, len(stack), ev.timestamp)
            return
        while len(stack) > i + 1:  # spans opened inside this one and never ended
            inner, begin = stack.pop()
            self.unfinished += 1
            yield End(None, inner, begin, len(stack), ev.timestamp, unfinished=True)
        _, begin = stack.pop()
        yield End(ev, span, begin, len(stack), ev.timestamp)

    def finish(self) -> Iterator[End]:
        """Close every span still open, at its track's last event, marked unfinished."""
        for track in self._tracks.values():
            while track.open:
                span, begin = track.open.pop()
                self.unfinished += 1
                yield End(None, span, begin, len(track.open), track.last, unfinished=True)
        self._tracks.clear()

    def pair(self, events: Iterable[Any]) -> Iterator[Instant | Begin | End]:
        """Every item for ``events``, then the unfinished ends."""
        for ev in events:
            yield from self.feed(ev)
        yield from self.finish()
