"""A probe: one marker in the registry, fired from events of one code object.

The mechanisms (:mod:`.sysmon`, :mod:`.recompile`) only report *events*: a frame started,
returned, reached a line, or let an exception out. This module turns an event into the
marker's values and fires the marker, so every mechanism produces identical events.

Guarantees
----------
* **Fields.** ``entry``: the captured names, by default the function's parameters in order.
  ``return``: ``value``, ``duration_ns`` (-1 when the call started before the probe was
  enabled), then the captured names. ``line``: the captured names. ``raise``: ``exc_type``
  (qualified name), ``message`` (``str(exc)``, truncated), then the captured names. A capture
  ``req.url`` becomes the field ``req_url``.
* **Values.** ``int float str bytes bool`` and ``None`` values (exact types) are kept as they
  are; anything else is recorded as its repr, cut to :data:`MAX_REPR` characters. A repr or
  an attribute that raises, or a local that is not bound yet, is recorded as a ``<...>``
  string saying so: capturing never raises into the traced program.
* **Durations** are measured from the probe's own start event for that frame, with
  ``time.perf_counter_ns``; generator and coroutine frames measure from the first resume to
  the end.
"""

from __future__ import annotations

import sys
import time
import types
from typing import Any

from ..markers import registry
from .targets import Target, field_name

__all__ = ["AT", "MAX_REPR", "Probe"]

#: Where a probe can fire.
AT = ("entry", "return", "line", "raise")
#: Longest repr recorded for a value that is not a plain int/float/str/bytes/bool.
MAX_REPR = 200

_PLAIN = {int, float, str, bytes, bool, type(None)}
#: Start times of frames kept for return probes are dropped past this many (frames whose
#: return event never came, e.g. the probe was enabled in the middle of a call).
_MAX_STARTS = 10_000
_UNBOUND = object()


def value_of(v: object) -> object:
    """The recorded form of a captured value (see the module docstring)."""
    if type(v) in _PLAIN:
        return v
    try:
        text = repr(v)
    except Exception as exc:
        return f"<repr failed: {type(exc).__name__}>"
    if type(text) is not str:
        return "<repr failed: not a str>"
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def _capture(local: dict[str, Any], path: tuple[str, ...]) -> object:
    value = local.get(path[0], _UNBOUND)
    if value is _UNBOUND:
        return f"<unbound: {path[0]}>"
    for attr in path[1:]:
        try:
            value = getattr(value, attr)
        except Exception as exc:
            return f"<{type(exc).__name__}: {'.'.join(path)}>"
    return value_of(value)


def _exc_type(exc: BaseException) -> str:
    cls = type(exc)
    mod = cls.__module__
    return cls.__qualname__ if mod == "builtins" else f"{mod}.{cls.__qualname__}"


class Probe:
    """The handle :func:`tracemark.probe` returns; pass it to :func:`tracemark.unprobe`.

    Attributes: ``target`` (the resolved :class:`~.targets.Target`), ``at``, ``capture``
    (dotted paths), ``name`` (its marker's name), ``marker`` (the firing function, as a probe
    receives it), ``mechanism`` (which mechanism serves it) and ``installed``.
    """

    def __init__(self, target: Target, at: str, capture: tuple[str, ...], name: str) -> None:
        self.target = target
        self.at = at
        self.capture = capture
        self.name = name
        self.code: types.CodeType = target.code
        self.line = target.line
        self.installed = False
        self.enabled = False
        self.mechanism = ""
        self.core: registry.MarkerCore | None = None
        self._paths = tuple(tuple(p.split(".")) for p in capture)
        self._starts: dict[int, int] = {}

    # --- the marker ---------------------------------------------------------------------------

    def field_types(self) -> dict[str, object]:
        fixed: dict[str, object] = {
            "entry": {},
            "return": {"value": object, "duration_ns": int},
            "line": {},
            "raise": {"exc_type": str, "message": str},
        }[self.at]
        types_ = dict(fixed)
        for path in self.capture:
            name = field_name(path)
            while name in types_:
                name += "_"
            types_[name] = object
        return types_

    @property
    def marker(self) -> Any:
        return None if self.core is None else self.core.fire

    # --- events (called by the mechanisms; none of them raises, but in strict mode) ------------

    def _values(self, frame: types.FrameType) -> tuple:
        if not self._paths:
            return ()
        local = frame.f_locals
        return tuple(_capture(local, p) for p in self._paths)

    def on_start(self, frame: types.FrameType) -> None:
        """A frame of the code started (first resume, for generators and coroutines)."""
        if self.at == "return":
            starts = self._starts
            if len(starts) >= _MAX_STARTS:
                starts.clear()
            starts[id(frame)] = time.perf_counter_ns()
        elif self.at == "entry":
            self.core.fire(*self._values(frame))  # type: ignore[union-attr]

    def on_return(self, frame: types.FrameType, value: object) -> None:
        t0 = self._starts.pop(id(frame), None)
        duration = -1 if t0 is None else time.perf_counter_ns() - t0
        self.core.fire(value_of(value), duration, *self._values(frame))  # type: ignore[union-attr]

    def on_line(self, frame: types.FrameType) -> None:
        self.core.fire(*self._values(frame))  # type: ignore[union-attr]

    def on_raise(self, frame: types.FrameType, exc: BaseException) -> None:
        self._starts.pop(id(frame), None)
        try:
            message = str(exc)
        except Exception as err:
            message = f"<str failed: {type(err).__name__}>"
        if len(message) > MAX_REPR:
            message = message[: MAX_REPR - 3] + "..."
        self.core.fire(_exc_type(exc), message, *self._values(frame))  # type: ignore[union-attr]

    def forget_frames(self) -> None:
        self._starts.clear()

    def __repr__(self) -> str:
        state = "installed" if self.installed else "removed"
        return f"<Probe {self.name} on {self.target.spec!r} at {self.at} ({state})>"


def caller_frame() -> types.FrameType:
    """The frame that called the function that calls this (the probed frame, for hooks)."""
    return sys._getframe(2)
