"""Spans: a pair of markers, ``NAME.begin`` and ``NAME.end``, declared together.

The kernel's ``_entry``/``_exit`` tracepoint pairs, for Python::

    q = tracemark.span("db.query", table=str)

    def lookup(table):
        q.begin(table)          # two marker statements: the patcher jumps over both
        rows = run(table)       # while nobody listens
        q.end()

    @q                          # the whole call: begin(table) on entry, end on return
    def lookup3(table):         # or raise; the function itself is returned, so it costs
        return run(table)       # nothing while inactive (0.94-1.02x: noise)

    def lookup2(table):
        with q(table):          # the convenience form (costs a call and a with while
            return run(table)   # inactive: see benchmarks/RESULTS.md)

A field may be read from a ContextVar the program already sets, on begin and end alike, so
that "every event of request 27" is one filter (``--filter 'request_id == 27'``)::

    REQUEST_ID = contextvars.ContextVar("request_id")
    http = tracemark.span("http.request", path=str,
                          request_id=tracemark.context(REQUEST_ID, int))
    http.begin("/users/27")     # callers pass only path; request_id is read when it fires

Guarantees
----------
* ``q.begin`` and ``q.end`` are ordinary markers (``NAME.begin`` with the span's fields,
  ``NAME.end`` without): every tracer consumes them by name or glob, and a statement
  ``q.begin(...)`` / ``q.end()`` in a function is a marker statement the patcher jumps over
  while the marker is inactive, its arguments not evaluated (``q`` is guarded like the first
  name of ``mod.marker(...)``: rebinding ``q`` is noticed).
* ``with q(...)`` fires begin on entry and end on exit, also when the block raises; while
  neither marker has a probe it fires nothing and costs a call and a ``with`` on a shared
  no-op object. A span that turns active or inactive half-way is a begin without an end
  (or the reverse): readers close or report it, never pair it wrongly.
* ``@q`` on a function (or a staticmethod/classmethod, on either side) returns it
  unchanged and registers it with the dynamic-probe machinery: while ``NAME.begin`` or
  ``NAME.end`` is active, begin fires on entry with the call's arguments named like the
  span's fields, and end when the call is over (return, exception, generator closed); a
  field no parameter is named like is a ValueError at decoration. See
  :mod:`tracemark.probes.decorated`. (``q(f)`` with a function as the only argument is
  always the decorator: a span whose only field takes a function uses
  ``with q(field=f):``.)
* Context fields (:func:`tracemark.context`) are on both markers, read by the markers
  themselves when they fire (never while inactive), whichever form fires them; unset, they
  record their default (:mod:`tracemark.markers.fields`).
* Durations and nesting are read from the trace: :mod:`tracemark.analysis.pairing` pairs
  begin and end per thread (and per asyncio task when recorded), closes spans left open as
  unfinished, and reports ends without begins.
* A :class:`Span` is immutable, and declaring the same name with the same fields gives an
  equal span (the same markers); other fields are a ValueError, as for markers.
"""

from __future__ import annotations

import threading
from types import FunctionType
from typing import Any

from . import registry
from .fields import Context

__all__ = ["Span", "ending_exception"]

#: The exception ending a span on this thread while its end marker fires: set by ``with
#: q(...)`` left by an exception, and by both probe mechanisms for ``@q``.
#: A tracer that marks failed spans (the OpenTelemetry bridge) reads it; nothing else pays.
_ending = threading.local()


def ending_exception() -> BaseException | None:
    """The exception that is ending a span on this thread, while its ``NAME.end`` fires
    (None otherwise, and where the firing path cannot tell)."""
    return getattr(_ending, "exc", None)


def end_raising(end: Any, exc: BaseException) -> None:
    """Fire ``end`` with :func:`ending_exception` saying ``exc``."""
    _ending.exc = exc
    try:
        end()
    finally:
        _ending.exc = None


class _Inactive:
    """The shared no-op context of ``with q(...)`` while the span has no probe."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_INACTIVE = _Inactive()

#: What ``q(x)`` (one argument) decorates rather than opens a ``with`` for (exact types). A
#: span whose only field takes a function is used as ``with q(field=func):``.
_DECORATES = frozenset((FunctionType, staticmethod, classmethod))
_NOTHING: Any = object()  # ``q()``: no first argument


class _Active:
    __slots__ = ("args", "kwargs", "span")

    def __init__(self, span: Span, args: tuple, kwargs: dict) -> None:
        self.span, self.args, self.kwargs = span, args, kwargs

    def __enter__(self) -> None:
        self.span.begin(*self.args, **self.kwargs)

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.span.end()
        else:
            end_raising(self.span.end, exc)


class Span:
    """A pair of markers ``NAME.begin`` (the span's fields) and ``NAME.end``; see
    :func:`tracemark.span`."""

    __slots__ = ("_begin_core", "_end_core", "begin", "end", "name")

    name: str
    #: The begin marker: call it to fire ``NAME.begin``.
    begin: registry.Marker
    #: The end marker: call it to fire ``NAME.end``.
    end: registry.Marker

    def __init__(
        self,
        name: str,
        fmt: str | None = None,
        /,
        *,
        stacklevel: int = 1,
        doc: str | None = None,
        **fields: Any,
    ) -> None:
        registry.check_name(name)
        # Context fields go on both: "every event of request 27" includes the ends.
        context = {k: v for k, v in fields.items() if isinstance(v, Context)}
        begin_fields = registry.fields_of(f"{name}.begin", fmt, fields)
        end_fields = registry.fields_of(f"{name}.end", None, context)
        where, module = registry.caller(stacklevel)
        with registry.lock():
            # A conflict of either marker moves the span as a whole (begin and end must
            # keep one name to pair).
            clash = [
                (f"{name}.{part}", f, core)
                for part, f in (("begin", begin_fields), ("end", end_fields))
                for how, core in [registry.placement(f"{name}.{part}", f, module, where)]
                if how == "conflict" and core is not None
            ]
            if clash:
                own = registry.own_name(
                    name,
                    module,
                    lambda n: (
                        registry.fits(f"{n}.begin", begin_fields)
                        and registry.fits(f"{n}.end", end_fields)
                    ),
                )
                marker_name, f, core = clash[0]
                registry.conflict(marker_name, f, where, core, f"{own}.begin/.end")
                name = own
            docs = (f"{doc} (begins)", f"{doc} (ends)") if doc else (None, None)
            begin = registry.declare_at(
                f"{name}.begin", begin_fields, fmt, where, module, doc=docs[0]
            )
            end = registry.declare_at(f"{name}.end", end_fields, None, where, module, doc=docs[1])
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "begin", begin.fire)
        set_(self, "end", end.fire)
        set_(self, "_begin_core", begin)
        set_(self, "_end_core", end)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Span is immutable")

    def __call__(self, first: Any = _NOTHING, /, *args: Any, **kwargs: Any) -> Any:
        """``with q(*fields):`` fires begin on entry and end on exit (nothing while
        inactive); ``@q`` on a function (the only argument a function, staticmethod or
        classmethod) returns it unchanged, a site of the span (see
        :mod:`tracemark.probes.decorated`)."""
        # ``first`` apart, and its exact type in a set: the cheapest test (~0 ns measured;
        # ``isinstance`` on ``args[0]`` cost ``with q(...)`` 60 ns).
        if type(first) in _DECORATES and not args and not kwargs:
            from ..probes import decorated

            return decorated.decorate(self, first)
        if self._begin_core.connections or self._end_core.connections:
            return _Active(self, args if first is _NOTHING else (first, *args), kwargs)
        return _INACTIVE

    def __eq__(self, other: object) -> bool:
        return type(other) is Span and other.begin is self.begin

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<span {self.name!r} ({self._begin_core.signature()})>"

    def attribute(self, name: str) -> Any:
        """``begin`` or ``end`` read without running user code (for the patcher); else
        None."""
        if name == "begin":
            return self.begin
        if name == "end":
            return self.end
        return None
