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
* **Values.** A captured value (and a return probe's ``value``) is a field of type ``any``
  (:class:`~tracemark.markers.fields.AnyValue`): each event records the value's own kind
  with it (in CTF: a variant selected by an enum tag, :mod:`tracemark.ctf.writer`), so it
  is read back typed, compared by its type in ``--filter`` and shown as what it is. The
  whole rule, one row per kind (exact types: a subclass, an ``IntEnum`` say, is "anything
  else"):

  =====================  ===========  ======================  ============  ===============
  captured value         recorded as  ``read_trace`` gives    ``--json``    ``--filter``
  =====================  ===========  ======================  ============  ===============
  ``None``               none         ``None``                ``null``      ``x == None``
  ``bool``               bool         ``True`` / ``False``    true / false  ``x == True``
  ``int`` within int64   int          ``int``                 number        ``x > 5``
  ``float``              float        ``float``               number [1]_   ``x < 0.5``
  ``str``                str          ``str``, the text [2]_  string        ``x == "GET"``
  ``bytes``              bytes        ``bytes``               hex string    ``x == b"ok"``
  anything else, and     repr         ``ReprText`` (a ``str`` string        ``x == "[1]"``
  an int beyond int64                 subclass): the repr,
                                      cut to ``MAX_REPR``
  =====================  ===========  ======================  ============  ===============

  .. [1] NaN and infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``.
  .. [2] Surrogates become U+FFFD (the writer's rule for all text).

  A comparison with a value of another kind is false for that event, never an error (kinds
  vary per event). ``view`` shows a str as every text field (plain, or quoted when it has
  spaces or quotes) and a repr as it is. A repr or an attribute that raises, or a local that
  is not bound yet, is recorded as a repr saying so (``<repr failed: E>``,
  ``<AttributeError: a.b>``, ``<unbound: x>``): capturing never raises into the traced
  program. The value is made when the probe fires (a repr taken later could differ). A
  marker's own ``object`` / ``%r`` field keeps its meaning: always the value's repr, as
  text. Declare a field ``"any"`` to get a probe's rule in a marker of your own.
* **Span probes** (``at="span"``, made by ``@span`` on a function, :mod:`.decorated`) fire
  *given* markers: the span's ``NAME.begin`` on entry, with the arguments named like its
  fields passed as they are (the marker checks their types, as for ``q.begin(...)``), and
  ``NAME.end`` when the call ends (return, raise, or a generator closed).
* **Durations** are measured from the probe's own start event for that frame, with
  ``time.perf_counter_ns``; generator and coroutine frames measure from the first resume to
  the end.
"""

from __future__ import annotations

import sys
import time
import types
from typing import Any

from .._codegen import function_code
from ..markers import registry
from ..markers.fields import MAX_REPR, AnyValue, ReprText, repr_text
from .targets import Target, field_name

__all__ = ["AT", "MAX_REPR", "Probe"]

#: Where a probe can fire.
AT = ("entry", "return", "line", "raise")
_PLAIN = {int, float, str, bytes, bool, type(None)}
#: Start times of frames kept for return probes are dropped past this many (frames whose
#: return event never came, e.g. the probe was enabled in the middle of a call).
_MAX_STARTS = 10_000
_UNBOUND = object()


def value_of(v: object) -> object:
    """The recorded form of a captured value (see the module docstring): made now, in the
    traced frame, so every tracer sees the same value (a repr taken later could differ)."""
    return v if type(v) in _PLAIN else repr_text(v)


def _capture(local: dict[str, Any], path: tuple[str, ...]) -> object:
    value = local.get(path[0], _UNBOUND)
    if value is _UNBOUND:
        return ReprText(f"<unbound: {path[0]}>")
    for attr in path[1:]:
        try:
            value = getattr(value, attr)
        except Exception as exc:
            return ReprText(f"<{type(exc).__name__}: {'.'.join(path)}>")
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
        #: True when this probe declared its marker (it is forgotten on unprobe).
        self.owns_marker = False
        self._paths = tuple(tuple(p.split(".")) for p in capture)
        self._starts: dict[int, int] = {}
        #: The globals of every emitter compiled for this probe (see :meth:`retire`).
        self._namespaces: list[dict[str, Any]] = []
        self._fire: Any = _retired
        #: A span probe's end marker (its ``core`` is the begin marker), and its place in
        #: the order of decoration (two spans on one function nest by it).
        self.end: registry.MarkerCore | None = None
        self.order = 0

    # --- the marker ---------------------------------------------------------------------------

    def field_types(self) -> dict[str, object]:
        fixed: dict[str, object] = {
            "entry": {},
            "return": {"value": AnyValue, "duration_ns": int},
            "line": {},
            "raise": {"exc_type": str, "message": str},
        }[self.at]
        types_ = dict(fixed)
        for path in self.capture:
            name = field_name(path)
            while name in types_:
                name += "_"
            types_[name] = AnyValue
        return types_

    @property
    def marker(self) -> Any:
        return None if self.core is None else self.core.fire

    # --- events (called by the mechanisms; none of them raises, but in strict mode) ------------
    #
    # The emitters are compiled per probe (like the markers' firing functions) so the hot path
    # is straight-line code: no loop over captures, no call per plain value.

    def compile(self) -> None:
        """Build the emitters, once the marker is declared (``self.core`` is set)."""
        fire = self._fire = self.core.fire  # type: ignore[union-attr]
        paths = self._paths
        made = self._namespaces
        self.c_entry: Any = None  # set below for entry probes; a span's is always None
        if self.at == "span":
            self._compile_span(fire, paths, made)
            return
        if self.at in ("entry", "line"):
            #: ``emit_frame(frame)``: fire from the locals of a running frame.
            self.emit_frame = _emitter("frame", "", paths, fire, self._starts, made=made)
        if self.at == "entry":
            #: ``emit_caller()``: the same for the frame two calls up, found by the emitter
            #: itself (a ``sys.monitoring`` callback calls it: one call less than
            #: ``emit_frame(sys._getframe(2))``).
            self.emit_caller = _emitter("", "", paths, fire, self._starts, 2, made)
        #: For an entry probe that captures parameters by plain name (or nothing), the names
        #: a mechanism may pass straight to ``emit_args`` instead of handing over the frame.
        #: Never the marker's own firing function, even without values: instrumented code
        #: holds it as a constant, and :meth:`retire` must be able to silence it.
        self.direct: tuple[str, ...] | None = None
        if self.at == "entry" and all(len(p) == 1 and p[0] in self.target.params for p in paths):
            self.direct = tuple(p[0] for p in paths)
            self.emit_args = _args_emitter(len(paths), fire, made)
        #: The C path of an entry probe capturing plain names, when the C core is in use
        #: (tracemark/_speedups_probes.c): the same events, recorded in one C call, or
        #: declined to the pure emitters. It stands in for ``emit_args`` (3.11) and serves
        #: ``PY_START`` (3.12+, :mod:`.sysmon`).
        if self.at == "entry" and all(len(p) == 1 for p in paths):
            self.c_entry = _c_entry(fire, tuple(p[0] for p in paths), made, self)
            if self.c_entry is not None and self.direct is not None:
                self.emit_args = self.c_entry
        if self.at == "return":
            starts = self._starts
            self.emit_return = _emitter("frame, value", "return", paths, fire, starts, made=made)
            self.start = _emitter("frame", "start", (), fire, starts, made=made)
            #: The same two, finding the frame two calls up themselves (see emit_caller).
            self.return_caller = _emitter("value", "return", paths, fire, starts, 2, made)
            self.start_caller = _emitter("", "start", (), fire, starts, 2, made)

    def _compile_span(self, fire: Any, paths: tuple[tuple[str, ...], ...], made: list) -> None:
        """The emitters of a span probe: begin's as an entry probe's but passing values as
        they are, and end's, which fire the end marker with no value (from a return
        callback, a frame and a value, or nothing)."""
        starts = self._starts
        self.emit_frame = _emitter("frame", "", paths, fire, starts, made=made, convert=False)
        self.emit_caller = _emitter("", "", paths, fire, starts, 2, made, convert=False)
        self.direct = tuple(p[0] for p in paths)
        self.emit_args = _args_emitter(len(paths), fire, made, convert=False)
        end = self.end.fire  # type: ignore[union-attr]
        #: ``end_now()``, ``return_caller(value)``, ``emit_return(frame, value)``: fire end.
        self.end_now = _function("def end():\n    _fire()\n", {"_fire": end}, made)
        self.return_caller = _function("def end(value):\n    _fire()\n", {"_fire": end}, made)
        self.emit_return = _function("def end(frame, value):\n    _fire()\n", {"_fire": end}, made)

    def retire(self) -> None:
        """Silence this probe for good (:func:`tracemark.unprobe` calls it).

        Function objects made from an instrumented copy of the code (``types.FunctionType``
        on a probed function's ``__code__``, closures made while it was probed) keep that
        copy, and the copy holds this probe's emitters as constants. Each emitter looks its
        marker up as a global of its own, so swapping that one global for a no-op silences
        every such copy at once, at no cost to the firing path. A thread already inside an
        emitter finishes with the marker it read.
        """
        for namespace in self._namespaces:
            namespace["_fire"] = _retired
        self._fire = _retired

    def on_line(self, frame: types.FrameType) -> None:
        self.emit_frame(frame)

    def on_raise(self, frame: types.FrameType, exc: BaseException) -> None:
        self._starts.pop(id(frame), None)
        try:
            message = str(exc)
        except Exception as err:
            message = f"<str failed: {type(err).__name__}>"
        if len(message) > MAX_REPR:
            message = message[: MAX_REPR - 3] + "..."
        local = frame.f_locals if self._paths else {}
        values = tuple(_capture(local, p) for p in self._paths)
        self._fire(_exc_type(exc), message, *values)

    def forget_frames(self) -> None:
        self._starts.clear()

    def __repr__(self) -> str:
        state = "installed" if self.installed else "removed"
        return f"<Probe {self.name} on {self.target.spec!r} at {self.at} ({state})>"


def _slow(value: object, name: str) -> object:
    if value is _UNBOUND:
        return ReprText(f"<unbound: {name}>")
    return value_of(value)


_EMITTER_GLOBALS = {
    "_P": frozenset(_PLAIN),
    "_U": _UNBOUND,
    "_slow": _slow,
    "_capture": _capture,
    "_value_of": value_of,
    "_ns": time.perf_counter_ns,
    "_id": id,
    "_len": len,
    "_type": type,
    "_MAX_STARTS": _MAX_STARTS,
    "_getframe": sys._getframe,
}


def _retired(*args: object) -> None:
    """What a removed probe's emitters fire: nothing."""


#: Compiled emitter code by source (an emitter's source depends only on its shape and capture
#: names, not on the probe): probing the same shape again costs no ``compile``.
_codes: dict[str, types.CodeType] = {}
_MAX_CODES = 512


def _function(source: str, namespace: dict[str, Any], made: list | None) -> Any:
    code = _codes.get(source)
    if code is None:
        code = function_code(source, "probe")
        if len(_codes) >= _MAX_CODES:
            _codes.clear()  # bounded: shapes seen long ago are compiled again
        _codes[source] = code
    if made is not None:
        made.append(namespace)
    return types.FunctionType(code, namespace, code.co_name)


def _emitter(
    params: str,
    kind: str,
    paths: tuple[tuple[str, ...], ...],
    fire: Any,
    starts: dict,
    frame_at: int | None = None,
    made: list | None = None,
    convert: bool = True,
) -> Any:
    """Compile ``emit(params)``: capture ``paths`` from the frame's locals and fire; with
    ``frame_at``, the frame is ``sys._getframe(frame_at)`` as seen from ``emit``. ``made``
    collects its globals (where ``_fire`` is looked up). Without ``convert``, plain names'
    values are passed as they are (a span probe's: the marker checks them)."""
    body = [] if frame_at is None else [f"frame = _getframe({frame_at})"]
    if kind == "start":
        body += [
            "if _len(_starts) >= _MAX_STARTS:",
            "    _starts.clear()",  # bounded: starts whose return never came
            "_starts[_id(frame)] = _ns()",
        ]
    if kind == "return":
        body += [
            "t1 = _ns()",
            "t0 = _starts.pop(_id(frame), None)",
            "duration = -1 if t0 is None else t1 - t0",
            "if _type(value) not in _P:",
            "    value = _value_of(value)",
        ]
    if paths:
        body.append("L = frame.f_locals")
    names = []
    for i, path in enumerate(paths):
        v = f"v{i}"
        names.append(v)
        if len(path) == 1 and not convert:
            body.append(f"{v} = L.get({path[0]!r})")
        elif len(path) == 1:
            body += [
                f"{v} = L.get({path[0]!r}, _U)",
                f"if _type({v}) not in _P:",
                f"    {v} = _slow({v}, {path[0]!r})",
            ]
        else:
            body.append(f"{v} = _capture(L, {path!r})")
    if kind == "return":
        names = ["value", "duration", *names]
    if kind != "start":
        body.append(f"_fire({', '.join(names)})")
    source = f"def emit({params}):\n" + "".join(f"    {line}\n" for line in body)
    return _function(source, {**_EMITTER_GLOBALS, "_fire": fire, "_starts": starts}, made)


def _c_entry(fire: Any, names: tuple[str, ...], made: list, probe: Probe) -> Any:
    """The C core's EntryProbe for these captures, or None (pure core, or not built)."""
    from .. import env

    speedups: Any = env.speedups()
    if speedups is None or not hasattr(speedups, "EntryProbe"):
        return None
    if not _c_configured:
        from ..markers import dispatch
        from ..tracers.recording import channel, generated

        speedups.configure_probes(
            dispatch._tls, dispatch._ThreadState, generated.Bound, channel.Channel
        )
        _c_configured.append(speedups)
    ns = {"_fire": fire}  # retire() silences the C path through it, like every emitter
    made.append(ns)
    return speedups.EntryProbe(fire, names, ns, getattr(probe, "emit_args", None))


_c_configured: list = []


def _args_emitter(n: int, fire: Any, made: list | None = None, convert: bool = True) -> Any:
    """Compile ``emit(v0, ..., vn)``: the values passed straight in, made plain (unless not
    ``convert``), fired."""
    names = [f"v{i}" for i in range(n)]
    body = [f"    if _type({v}) not in _P:\n        {v} = _value_of({v})\n" for v in names]
    if not convert:
        body = []
    source = f"def emit({', '.join(names)}):\n{''.join(body)}    _fire({', '.join(names)})\n"
    return _function(source, {**_EMITTER_GLOBALS, "_fire": fire}, made)
