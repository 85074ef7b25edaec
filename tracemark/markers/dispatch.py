"""Dispatch: the code that runs when a marker is fired, and the grace period that ends it.

Why a marker is a generated function
------------------------------------
Calling a plain Python function is the cheapest call CPython has: the interpreter specialises
it (3.11+), while an instance of a class with ``__call__`` costs three to four times as much.
So each marker is a small function compiled for its own fields::

    def fire(length=_MISSING, dev=_MISSING, /, *_extra, **_named):
        if _probes:
            ...                                 # the active path, below

Its globals are a dict of its own, so ``_probes`` is a global load of that dict: one load and
one test when nothing listens. No call can raise: missing arguments land on the sentinel,
extra ones in ``_extra`` / ``_named``. Positional calls (``rx(3, "eth0")``) take the fast
path; keyword calls (``rx(length=3, dev="eth0")``) work too, through a slower path that
places them by field name, and anything that does not fit is counted instead of raised.

Guarantees of the active path
-----------------------------
* **Snapshot (RCU).** ``_probes`` is an immutable tuple that the registry replaces by one
  assignment. A firing thread calls the probes of the tuple it read, in connection order: the
  old list or the new one, never a torn one.
* **Grace period.** A thread can only call a probe from inside a firing function that read
  the tuple holding it. :func:`synchronize` waits until every firing-function frame that was
  on another thread's stack when it was called has returned. After ``disconnect(h)`` and then
  ``synchronize()``, no thread is still running that probe: the kernel's
  ``tracepoint_synchronize_unregister``.
* **Bounded re-entrancy.** A marker fired while the same thread is already inside a probe
  (the probe fires one itself, or logs through a traced handler, or a signal handler,
  ``__del__`` or weakref callback runs in the middle) reaches only the probes connected with
  ``reentrant=True`` (tracers built to nest, like the recorder), and at most
  :data:`MAX_NESTING` levels deep. Anything beyond that is dropped and counted, never
  recursed into.
* **One depth-0 call at a time.** On one thread, the probes of a marker fired outside every
  probe (depth 0) never run while another depth-0 call is running: whatever interrupts them
  and fires a marker is nested. A tracer can keep one per-thread buffer for depth 0 and
  write it without a flag (the recorder does).
* **Fused probes are invisible.** While a marker has one probe, the registry swaps in a
  firing function with that probe fused into its depth-0 path: a direct call (no loop), or
  the :class:`Inline` body the probe bound (:class:`Binding`), which must do exactly what
  its depth-0 callable does. Keyword calls, nested events and markers with several probes
  take the loop.
* **A C firing path is invisible too.** With the C core, the recorder's binding also offers
  :attr:`Inline.fast`: the whole fused body in one C call (``tracemark/_speedups_fire.c``),
  which the registry publishes as the global ``_fast`` while the binding is the marker's
  only probe. On 3.12+ the function's own calls reach it first (its vectorcall), on 3.11 a
  prologue calls it; it records a positional depth-0 event or declines, having done
  nothing, and this function runs as ever. It has no frame for :func:`synchronize` to find,
  and needs none: it runs no Python code and never releases the GIL, so no other thread
  (nor a signal handler) ever runs while it does; a full sub-buffer (``Channel.switch``,
  Python code) is declined and switched here, in this function's frame.
* **Faults never propagate.** Arguments that do not fit the fields drop the event; a probe
  that raises an ``Exception`` is skipped for that event; both are counted and reported once
  (:mod:`tracemark.faults`), raised only in strict mode. ``KeyboardInterrupt`` and
  ``SystemExit`` are not caught: they are the program's, not the probe's.
"""

from __future__ import annotations

import gc
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import CodeType, FrameType, FunctionType
from typing import Any, NamedTuple

from .._codegen import function_code
from .fields import AnyValue, Field

__all__ = [
    "MAX_NESTING",
    "Binding",
    "Inline",
    "call_body",
    "compile_fire",
    "fire_code",
    "synchronize",
]

#: How deep markers may nest on one thread (a probe firing a marker that reaches a probe that
#: fires a marker...). Like LTTng's nesting levels for interrupts.
MAX_NESTING = 4


class MISSING:
    """Stands for an argument the caller did not pass."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = MISSING()


# --- per-thread nesting depth, and the grace period ------------------------------------------

#: How every firing function's file name starts (each has its own, see :mod:`.._codegen`):
#: how :func:`synchronize` recognises the frames of threads that are inside a marker.
FIRE_FILENAME = "<tracemark marker"


class _ThreadState:
    __slots__ = ("cache", "depth")

    def __init__(self) -> None:
        self.depth = 0  # > 0 while this thread is inside the probes of a marker
        #: One value per thread that inline probe bodies may keep here (see Inline): shared
        #: by all of them, so a body checks that what it finds is its own.
        self.cache: object = None


_tls = threading.local()


def _new_thread_state() -> _ThreadState:
    state = _tls.state = _ThreadState()
    if fast_support is not None:  # where the C firing path finds it (a thread-state dict)
        fast_support.register(state)
    return state


class FastSupport(NamedTuple):
    """What a C firing path needs from the C core (see :attr:`Inline.fast`)."""

    #: ``install(fire) -> bool``: route calls of the firing function through its global
    #: ``_fast`` first, in C (3.12+); False where it cannot (3.11: the registry compiles a
    #: prologue that calls ``_fast`` instead).
    install: Callable[[Any], bool]
    #: ``uninstall(fire)``: undo ``install``.
    uninstall: Callable[[Any], object]
    #: ``register(state)``: a new thread's dispatch state, where the C path finds it.
    register: Callable[[_ThreadState], object]


#: Set by the C core (tracemark/tracers/recording/generated.py) once it is configured.
fast_support: FastSupport | None = None


def _no_fast(*_values: object) -> bool:
    """The global ``_fast`` while no C firing path is published: declines every event."""
    return False


#: Called first thing in a fork child (tracemark's earliest at-fork hook, registered when
#: tracemark is imported): the tracers' own "forget the parent's" steps (the recorder
#: appends its own: see tracers/recording/lifecycle.py), run before any at-fork hook
#: registered later can fire a marker.
child_resets: list[Callable[[], None]] = []


def _forget_cache_in_child() -> None:
    # What an inline body cached (a recorder's channel) belongs to the parent process; the
    # forking thread is the only one left in the child, so clearing its state is enough.
    state = getattr(_tls, "state", None)
    if state is not None:
        state.cache = None
    for reset in child_resets:
        try:
            reset()
        except Exception as exc:  # never into the program's fork
            from .. import faults

            faults.report("fork-reset", getattr(reset, "__qualname__", "?"), repr(exc))


os.register_at_fork(after_in_child=_forget_cache_in_child)


def current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()``, safe from a CPython 3.11 deadlock.

    It holds the runtime's thread-list lock while it makes frame objects; if that allocation
    starts a garbage collection which frees a ``threading.local`` (whose clean-up takes the
    same lock), the interpreter hangs for good with the GIL held (CPython gh-106883, fixed
    in 3.12, not in 3.11; a recording per test was enough to hit it). So no collection may
    start meanwhile: the collector is paused around the call, if it was running.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return sys._current_frames()
    finally:
        if paused:
            gc.enable()


def _firing_frames(skip: int) -> dict[int, list[FrameType]]:
    """Per thread (but the one with ident ``skip``), the frames of firing functions on it."""
    found: dict[int, list[FrameType]] = {}
    for ident, frame in current_frames().items():
        if ident == skip:
            continue
        f: FrameType | None = frame
        while f is not None:
            if f.f_code.co_filename.startswith(FIRE_FILENAME):
                found.setdefault(ident, []).append(f)
            f = f.f_back
    return found


def synchronize(timeout: float | None = None) -> bool:
    """Wait until no thread is still inside a probe that was disconnected before this call.

    Returns True when the grace period is over, False if ``timeout`` seconds passed first.
    Called from inside a probe, it does not wait for its own thread (that would never end).

    How: every thread that can still call a removed probe is running a marker's firing
    function that read the old probe tuple, so its stack holds that function's frame. Take
    the frames of firing functions on every other thread now, and wait until none of those
    frame objects is on its thread's stack any more. A thread that fires again meanwhile runs
    in a new frame, reads the new tuple, and is not waited for. The firing path itself pays
    nothing for this.
    """
    me = threading.get_ident()
    waiting = _firing_frames(me)
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.0
    while waiting:
        now = _firing_frames(me)
        waiting = {
            ident: still
            for ident, frames in waiting.items()
            if (still := [f for f in frames if any(f is g for g in now.get(ident, ()))])
        }
        if not waiting:
            break
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(pause)  # sleep(0) first: just give the GIL to the threads we wait for
        pause = min(pause * 2 or 1e-5, 1e-3)
    return True


# --- argument checks, one per field type -----------------------------------------------------
# Each check is an expression that is True when the value does NOT fit. The first test is
# the exact type (a pointer compare); the general one only runs for other types. Every name
# in generated code starts with "_", so no field name (which cannot) shadows it.


def _not_int(v: Any) -> bool:
    return not isinstance(v, numbers.Integral)


def _not_real(v: Any) -> bool:
    return not isinstance(v, numbers.Real)


def _not_bytes(v: Any) -> bool:
    return not isinstance(v, bytes | bytearray | memoryview)


_CHECKS: dict[type, str] = {
    int: "(_type({0}) is not _int and _not_int({0}))",
    float: "(_type({0}) is not _float and _not_real({0}))",
    str: "(_type({0}) is not _str and not _isinstance({0}, _str))",
    bytes: "(_type({0}) is not _bytes and _not_bytes({0}))",
    bool: "(_type({0}) is not _bool and _not_int({0}))",
    object: "({0} is _MISSING)",
    AnyValue: "({0} is _MISSING)",
}

_CHECK_GLOBALS = {
    "_MISSING": _MISSING,
    "_type": type,
    "_isinstance": isinstance,
    "_not_int": _not_int,
    "_not_real": _not_real,
    "_not_bytes": _not_bytes,
    "_int": int,
    "_float": float,
    "_str": str,
    "_bytes": bytes,
    "_bool": bool,
}

#: The same checks as functions, for the slow path that sorts out keyword arguments.
MISFITS: dict[type, Callable[[Any], bool]] = {
    t: eval(f"lambda v: {c.format('v')}", dict(_CHECK_GLOBALS)) for t, c in _CHECKS.items()
}


def resolve_arguments(
    fields: tuple[Field, ...], index: dict[str, int], values: tuple, extra: tuple, named: dict
) -> tuple | None:
    """The event's values from a call the fast path could not take: keywords are placed by
    field name. Returns None when the arguments do not fit the fields."""
    if extra:
        return None
    values = list(values)
    for key, value in named.items():
        i = index.get(key)
        if i is None or values[i] is not _MISSING:  # unknown name, or given twice
            return None
        values[i] = value
    for i, f in enumerate(fields):
        if MISFITS[f.type](values[i]):
            return None
    return tuple(values)


#: Called as ``lazy_hook(marker)`` when a marker fires while its probe tuple is :data:`ARMED`:
#: how the patcher (:mod:`tracemark.patching`) learns that an unpatched site ran. The patcher
#: arms a marker that has no probe, and disarms it (``_probes = ()``) once it has nothing more
#: to learn. The hook travels as a probe, so neither the inactive path nor the active path pays
#: anything for it; only the rare branches (arguments that do not fit, nesting) ask whether
#: the marker is merely armed, so that an inactive marker never reports a fault.
lazy_hook: Callable[[Any], None] | None = None


def _lazy_probe(marker: Any, args: tuple) -> None:
    hook = lazy_hook
    if hook is not None:
        hook(marker)


class _Armed(tuple):
    """The type of :data:`ARMED`: a probe tuple that only the patcher publishes."""

    __slots__ = ()


ARMED = _Armed((_lazy_probe,))


class Inline(NamedTuple):
    """A probe's path fused into a marker's firing function (see :class:`Binding`).

    ``source`` is the body of the probe for one marker: statements that read the event's
    values from locals named like the marker's fields (never assigning them), the probe's
    per-binding state from the local ``_in`` (``state``) and the marker from ``_marker``, use
    only locals whose names start with ``_`` and the globals in ``globals`` (which must not
    give a name another meaning than the firing function's own), and may ``return``. It runs
    only at depth 0, like :attr:`Binding.top`, and must do exactly what ``top`` does; an
    exception out of it is the probe's fault, counted and reported like one out of ``top``.
    It may keep one per-thread value in ``_st.cache`` (the thread's dispatch state, which
    it gets for free, where a ``threading.local`` costs ~25 ns); every inline body shares that
    slot, so a body must check that what it finds there is its own. A fork child starts
    with the slot empty.
    """

    source: str
    globals: Mapping[str, Any]
    state: object
    #: Optional: ``fast(extra, named, *values) -> bool`` (the firing function's
    #: ``*_extra`` and ``**_named``, then the event's values), a C callable that does
    #: exactly what ``source`` does for a positional depth-0 call, or declines (False)
    #: having done nothing, running
    #: no Python code when it records (see tracemark/_speedups_fire.c for why that keeps
    #: every guarantee above: it cannot be interrupted, so no grace period can see it). The
    #: registry publishes it as the global ``_fast``, called before anything else (on 3.11;
    #: on 3.12+ the C core calls it in place of the function) while the binding is the
    #: marker's only probe and its fields have no context field; else ``_fast`` is
    #: :func:`_no_fast`.
    fast: object = None


class Binding(NamedTuple):
    """What a probe's ``bind_marker(marker)`` may return instead of a single callable.

    * ``top`` is called for events fired at depth 0, outside every probe on this thread. The
      firing function guarantees that no other depth-0 call runs on the same thread while it
      does (an interruption that fires a marker is nested, depth 1): a tracer can keep one
      per-thread buffer for depth 0 and write to it without any flag.
    * ``nested`` (default: ``top``) is called for events fired inside a probe (depth >= 1), if
      the probe was connected with ``reentrant=True``.
    * ``inline`` (optional) fuses ``top`` into the firing function while it is the marker's
      only probe: no call, no argument tuple. This is how the recorder gets under its
      per-event budget; it changes nothing a probe could observe.
    """

    top: Callable[[Any, tuple], object]
    nested: Callable[[Any, tuple], object] | None = None
    inline: Inline | None = None


_TEMPLATE = """\
def fire({params}*_extra, **_named):
{fast}    if _probes:
        try:
            _st = _tls.state
        except _AttributeError:
            _st = _new_thread_state()
        _depth = _st.depth
        if _depth and (_depth >= _MAX_NESTING or not _nested):
            if _probes is _ARMED:
                return None
            return _dropped_nested(_core)
        _st.depth = _depth + 1
        try:
{context}            if {bad}:
                if _probes is _ARMED:
                    return None
                _args = _resolve_arguments(_fields, _index, ({names}), _extra, _named)
                if _args is None:
                    return _bad_arguments(_core, ({names}), _extra, _named)
            else:
{inline}                _args = ({names})
            for _probe in _nested if _depth else _probes:
                try:
                    _probe(_marker, _args)
                except _Exception as _exc:
                    _probe_failed(_core, _probe, _exc)
        finally:
            _st.depth = _depth
"""

# The fused path, placed in the template above when a marker has an inline probe. Its state
# is read from one global, so a thread sees one binding's state whole, or None (then the
# ordinary loop runs): the registry clears it before it changes the code or the probes.
# Every local of the firing function starts with "_": field names cannot (fields.py).
_INLINE = """\
                _in = {slot}
                if _in is not None and not _depth:
                    try:
{body}
                    except _Exception as _exc:
                        _probe_failed(_core, _in, _exc)
                    return None
"""


# The C firing path (Inline.fast) where the interpreter cannot call it instead of the
# function itself (3.11: see tracemark/_speedups_fire.c): one C call first.
_FAST = """\
    if _fast(_extra, _named, {names}):
        return None
"""


def call_body(fields: tuple[Field, ...]) -> str:
    """The inline body that calls a marker's only probe (its state, ``_in``) directly."""
    return f"_in(_marker, ({_value_list(fields)}))\n"


def _value_list(fields: tuple[Field, ...]) -> str:
    return "".join(f"{f.name}, " for f in fields)


def fire_code(
    fields: tuple[Field, ...], inline: str | None = None, slot: str = "", fast: bool = False
) -> CodeType:
    """The code of a firing function for ``fields``; with ``inline``, a probe body fused into
    its depth-0 path, reading its state from the global ``slot``; with ``fast``, a call of
    the global ``_fast`` (a C firing path, :attr:`Inline.fast`) before everything else."""
    names = [f.name for f in fields if f.context is None]  # what callers pass
    fused = ""
    if inline is not None:
        import textwrap  # (only here: ~0.7 ms of import tracemark otherwise)

        fused = _INLINE.format(slot=slot, body=textwrap.indent(inline, " " * 24))
    source = _TEMPLATE.format(
        params="".join(f"{n}=_MISSING, " for n in names) + ("/, " if names else ""),
        context=_context_reads(fields),
        bad=" or ".join(["_extra", "_named", *(_CHECKS[f.type].format(f.name) for f in fields)]),
        names=_value_list(fields),
        inline=fused,
        fast=_FAST.format(names=", ".join(names)) if fast else "",
    )
    return function_code(source, "marker")


# Context fields (fields.Context) are locals of the firing function, read from their
# ContextVar on the active path only, before anything uses the values: the checks, the
# argument tuple and a fused probe body all see them as if the caller had passed them. The
# variable's bound ``get`` and the default are globals ``_cvI``/``_cdI`` (I: the field's
# index), so reading one costs one call.
def _context_reads(fields: tuple[Field, ...]) -> str:
    return "".join(
        f"            {f.name} = _cv{i}(_cd{i})\n" for i, f in enumerate(fields) if f.context
    )


def _context_globals(fields: tuple[Field, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, f in enumerate(fields):
        if f.context is not None:
            out[f"_cv{i}"] = f.context.var.get
            out[f"_cd{i}"] = f.context.default
    return out


def compile_fire(
    fields: tuple[Field, ...],
    core: object,
    *,
    bad_arguments: Callable[..., None],
    probe_failed: Callable[..., None],
    dropped_nested: Callable[..., None],
) -> tuple[Callable[..., None], dict[str, Any]]:
    """Compile the firing function of one marker.

    Returns the function and its globals dict: the registry publishes a new probe tuple by
    assigning ``namespace["_probes"]`` (and ``"_nested"``), one store each, and fuses an
    inline probe by swapping the function's ``__code__`` for one from :func:`fire_code`.
    """
    namespace: dict[str, Any] = {
        **_CHECK_GLOBALS,
        "__builtins__": {},
        "_probes": ARMED if lazy_hook is not None else (),
        "_nested": (),
        "_fast": _no_fast,
        "_ARMED": ARMED,
        "_core": core,
        "_fields": fields,
        "_index": {f.name: i for i, f in enumerate(fields)},
        "_tls": _tls,
        "_new_thread_state": _new_thread_state,
        "_MAX_NESTING": MAX_NESTING,
        "_resolve_arguments": resolve_arguments,
        "_bad_arguments": bad_arguments,
        "_probe_failed": probe_failed,
        "_dropped_nested": dropped_nested,
        "_AttributeError": AttributeError,
        "_Exception": Exception,
        **_context_globals(fields),
    }
    fire = FunctionType(fire_code(fields), namespace, "fire", _defaults(fields))
    namespace["_marker"] = fire
    return fire, namespace


def _defaults(fields: tuple[Field, ...]) -> tuple | None:
    return (_MISSING,) * sum(f.context is None for f in fields) or None
