"""``@q`` on a function: a span fired by the dynamic-probe machinery, free while inactive.

::

    q = tracemark.span("db.query", table=str)

    @q
    def lookup(table, limit=10):    # begin(table) on entry, end when the call ends
        ...

Guarantees
----------
* **Zero cost while inactive.** ``@q`` returns what it was given, unchanged (the same
  function, staticmethod or classmethod object): a call runs exactly the code it ran
  undecorated. It only registers a *span probe* (:class:`~.events.Probe` with
  ``at="span"``) on the function's code, which is installed while ``NAME.begin`` or
  ``NAME.end`` is active (a registry listener, as for every probe) and removed, the code
  and events exactly as before, when both turn inactive.
* **Fields from arguments.** ``NAME.begin`` gets each of its fields from the call's
  argument of the same name, passed as it is (a value that does not fit the field's type
  is a bad-arguments fault, as for ``q.begin(...)``); context fields
  (:func:`tracemark.context`) are read from their ContextVar by the marker itself. A field
  that no parameter is named like is a ValueError at decoration, naming it.
* **The whole call.** Begin fires on entry (a generator's or coroutine's first resume), end
  when the call is over: return, an exception leaving it, a generator closed. Recursion
  gives nested pairs; two spans on one function nest (the outer decorator begins first).
  One exception, on Python 3.13+ with ``sys.monitoring``: a generator closed (or collected)
  while suspended at a ``yield`` outside any ``try`` is finished by CPython without running
  its frame, so no event tells that it ended: its span has no end, and readers close it as
  unfinished (the recompile mechanism, and 3.11/3.12, end it).
* **Any order, any time.** Works at import, before anything is connected (nothing is
  resolved or compiled then), for plain functions, methods, ``staticmethod`` /
  ``classmethod`` on either side of ``@q``, async functions, generators, and functions that
  also hold marker statements (the patcher is suspended while the span probe is installed,
  as for :func:`tracemark.probe`). A decorated function wrapping another
  (``__wrapped__``) is probed at the innermost, whose parameters name the fields.
* **Failures are reported, never raised into the program.** A span probe that cannot be
  installed when the span turns active (recompile mechanism: source not available) is a
  ``span-probe-error`` fault; ``tracemark.markers()`` shows it at the span's sites.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

from .. import faults
from ..markers import registry
from ..patching import patcher
from .events import Probe
from .targets import Target, _function_of, _params

__all__ = ["decorate", "enabled", "on_activity", "sites"]

#: Span probes of decorated functions, by the name of each of their two markers.
_by_marker: dict[str, tuple[Probe, ...]] = {}
_order = itertools.count(1)


def decorate(span: Any, obj: Any) -> Any:
    """Register ``obj`` (a function, or a static/class method of one) as a site of ``span``
    and return it unchanged. ValueError for a field no parameter is named like."""
    from . import _lock, mechanism

    func = _function_of(obj)
    if func is None or not isinstance(obj, types.FunctionType | staticmethod | classmethod):
        raise TypeError(
            f"@{span.name}: a span decorates a Python function (or a staticmethod or "
            f"classmethod of one), not {obj!r}"
        )
    begin, end = span._begin_core, span._end_core
    code = patcher.original_code(func)
    params = _params(code)
    names = tuple(f.name for f in begin.fields if f.context is None)
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"@{span.name} on {func.__qualname__}({', '.join(params)}): field "
            f"{missing[0]!r} of {begin.name!r} has no argument of that name (a span's fields "
            "are taken from the arguments named like them, or from a tracemark.context())"
        )
    target = Target(
        spec=f"{func.__module__}:{func.__qualname__}",
        module=str(func.__module__),
        code=code,
        owner=func,
        name_parts=tuple(func.__qualname__.split(".")),
        params=params,
    )
    p = Probe(target, "span", names, begin.name)
    p.core, p.end, p.order = begin, end, next(_order)
    mech = mechanism()  # the registry listener is in place from here on
    p.mechanism = mech.name  # type: ignore[attr-defined]
    with registry._lock, _lock:
        for core in (begin, end):
            _by_marker[core.name] = (*_by_marker.get(core.name, ()), p)
        if begin.active or end.active:
            _switch(p, True)
    return obj


def on_activity(marker: registry.MarkerCore) -> None:
    """Registry listener (under its lock): install the span probes of ``marker``'s span
    while either of its markers is active, remove them when neither is."""
    for p in _by_marker.get(marker.name, ()):
        want = p.core.active or p.end.active  # type: ignore[union-attr]
        if want != p.enabled and (p.core is marker or p.end is marker):
            _switch(p, want)


def _switch(p: Probe, on: bool) -> None:
    from . import mechanism

    mech: Any = mechanism()
    owner = p.target.owner
    assert owner is not None
    if not on:
        mech.disable(p)
        mech.remove(p)
        p.retire()  # copies of recompiled code made meanwhile fire no more
        p.enabled = p.installed = False
        patcher.resume(owner)  # the patcher's variant is back, if it has one
        return
    patcher.suspend(owner)  # events and copies work on the original code
    try:
        mech.check(p)
        mech.install(p)
        try:
            p.compile()
            mech.enable(p)
        except BaseException:
            mech.remove(p)
            p.retire()
            raise
    except Exception as exc:
        patcher.resume(owner)
        p.error = f"{type(exc).__name__}: {exc}"  # type: ignore[attr-defined]
        faults.report(
            "span-probe-error",
            f"{p.name}:{p.target.spec}",
            f"span {p.name.rsplit('.', 1)[0]!r} on {p.target.spec} could not be installed "
            f"({p.error}); its calls are not traced",  # type: ignore[attr-defined]
        )
        return
    p.error = ""  # type: ignore[attr-defined]
    p.installed = p.enabled = True


def enabled() -> list[Probe]:
    """The span probes installed now."""
    return sorted({p for ps in _by_marker.values() for p in ps if p.enabled}, key=id)


def sites(marker: registry.MarkerCore) -> tuple[str, ...]:
    """What ``tracemark.markers()`` shows for the decorated functions of a span's marker."""
    from . import core

    out = []
    for p in _by_marker.get(marker.name, ()):
        if p.core is not marker and p.end is not marker:
            continue
        error = getattr(p, "error", "")
        state = (
            "enabled"
            if p.enabled
            else f"not installed: {error}"
            if error
            else "events off until a probe is connected"
        )
        out.append(
            f"@{p.name.rsplit('.', 1)[0]} on {p.target.spec} ({p.target.where}): "
            f"{core.REASON}; {state}"
        )
    return tuple(out)
