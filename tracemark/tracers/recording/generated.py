"""The generated per-marker code: the firing thread's whole recording path.

For each marker a recording binds, the path is generated from the readable templates below
and the marker's field names and types: find this thread's channel, ask which asyncio task
is running (:mod:`.tasks`: a ``tracemark.task`` event first if it changed), pack the event with one
precompiled ``struct`` call (:func:`tracemark.ctf.writer.pack_source`), publish the position
(the contract with the channel: :class:`tracemark.ctf.writer.PackTarget`). The generated
source is registered in :mod:`linecache` (:mod:`tracemark._codegen`), so a traceback through
it shows its lines.

The registry gets the path three ways (a :class:`~tracemark.markers.dispatch.Binding`):

* **fused** (``inline``) into the marker's firing function while the recording is the
  marker's only probe: no call, no argument tuple. The common case, and what the per-event
  budget needs. The level-0 channel is kept in the thread's dispatch state (``_st.cache``):
  a ``threading.local`` lookup costs more than the rest of finding it;
* ``top``: a function for depth 0 when other probes share the marker;
* ``nested``: a function for events fired inside a probe (depth >= 1: a signal handler,
  ``__del__``), with a busy flag per level.

Depth 0 needs no flag: the firing function never runs two depth-0 calls at once on one
thread, so the level-0 channel is only ever written by one of them. Nested events go to the
channels of levels 1, 2, ... (a busy flag each), never to level 0, which the interrupted
depth-0 call may be in the middle of.

Names the templates use: ``_in`` is the binding's :class:`Bound` state, ``_ch`` the channel,
``_marker`` the marker, ``_st`` the thread's dispatch state; everything starts with ``_`` so
that no marker field (whose names never do) can clash.
"""

from __future__ import annotations

import fnmatch
import re
import textwrap
import types
from typing import TYPE_CHECKING, Any

from ... import env
from ..._codegen import function_code
from ...ctf import writer as W
from ...markers import dispatch
from ...markers.dispatch import Binding, Inline
from ...markers.fields import AnyValue
from .tasks import ASYNCIO

if TYPE_CHECKING:
    from .session import Recording

__all__ = ["Bound", "bind", "make_probe", "skip"]

_TOP_CHANNEL = """\
try:
    _ch = _in.tls.ch
except _AttributeError:
    _ch = _in.rec._new_channel()
"""

# Fused, the level-0 channel is kept in the thread's dispatch state (dispatch.Inline): a
# threading.local lookup costs more than the rest of finding it. Another recording's channel
# there is replaced.
_INLINE_CHANNEL = """\
_ch = _st.cache
if _ch is None or _ch.rec is not _in.rec:
{top}    _st.cache = _ch
""".format(top=textwrap.indent(_TOP_CHANNEL, "    "))

# Task identity (see .tasks): outside asyncio attribute loads and tests, no call; a task
# switch writes a tracemark.task event first (Channel.retask, the slow path).
_TASK = """\
_loop = _ch.loop.running
if _loop is None:
    if _ch.intask:
        _ch.retask(None)
else:
    _task = _aio.task(_loop)
    if _task is None:
        if _ch.intask:
            _ch.retask(None)
    elif _task is not _ch.task():
        _ch.retask(_task)
"""

_WRITE = (
    _TASK
    + """\
_id = _in.id
try:
{pack}except _Exception as _exc:
    _in.rec._bad_value(_ch, _marker, ({values}), _exc)
"""
)

# The C core (tracemark._speedups, when built and not turned off: tracemark.env.core()):
# one call packs and publishes the event; it declines (returns True, having written nothing)
# whatever it does not do exactly as the pure path, which then records the event: values
# not of their field's exact type, a thread inside an asyncio task. See C_KINDS.
_C_WRITE = """\
_id = _in.id
try:
    _slow = _record(_ch, _id, {layout!r}, {values})
except _Exception as _exc:
    _slow = False
    _in.rec._bad_value(_ch, _marker, ({values}), _exc)
if _slow:
{pure}"""

#: Field kinds the C core packs, by its layout code. A marker with a field of another kind
#: (``object``: its repr runs Python code) is recorded by the pure path: see the table in
#: docs (tracemark/tracers/recording/__init__.py).
C_KINDS: dict[Any, bytes] = {int: b"i", float: b"f", bool: b"b", str: b"s", bytes: b"y"}

_FUNCTION = """\
def probe(_marker, _args):
    {unpack}_in = _state
{body}"""

_NESTED_BODY = """\
_ch = _in.rec._nested_channel()
if _ch is None:
    return
try:
{write}finally:
    _ch.busy = False
"""


class Bound:
    """One recording's binding of one marker: the state its generated paths read as ``_in``."""

    __slots__ = ("id", "layout", "marker", "rec", "tls")

    def __init__(self, rec: Recording, marker: Any) -> None:
        self.rec = rec
        self.marker = marker
        self.tls = rec._tls  # the same object for the recording's life (a fork child clears it)
        # The event id: the recording's start registered the markers declared by then; a
        # marker declared later is bound, so registered, when it is declared.
        self.id = rec._event_id(marker)
        #: The C core's layout when the fused body records with it, else None (read by the
        #: probes' C path, tracemark/_speedups_probes.c).
        self.layout: bytes | None = None

    def __repr__(self) -> str:
        return f"<recording {str(self.rec.path)!r} of marker {self.marker.name!r}>"


_compiled: dict[
    tuple, tuple[str, types.CodeType, types.CodeType, dict[str, Any], bytes | None]
] = {}


def _layout(fields: Any) -> bytes | None:
    """The C core's layout for these fields, or None when it is not to record them."""
    speedups = env.speedups()
    if speedups is None:
        return None
    if not _configured:
        from .channel import Channel
        from .tasks import _Slot

        speedups.configure(Channel, _Slot)  # type: ignore[attr-defined]
        speedups.configure_fire(dispatch._ThreadState, dispatch._tls)  # type: ignore[attr-defined]
        _configured.append(speedups)
        dispatch.fast_support = dispatch.FastSupport(
            speedups.install,  # type: ignore[attr-defined]
            speedups.uninstall,  # type: ignore[attr-defined]
            speedups.set_thread_state,  # type: ignore[attr-defined]
        )
    codes = [C_KINDS.get(f.type, b"a" if f.type is AnyValue else None) for f in fields]
    return None if None in codes else b"".join(codes)  # type: ignore[arg-type]


_configured: list = []


def _paths(
    fields: Any,
) -> tuple[str, types.CodeType, types.CodeType, dict[str, Any], bytes | None]:
    """For one field signature (names and types) and the core in use: the depth-0 body (for
    fusing), the code of the depth-0 and nested functions, the globals they share (the
    struct cache), and the C core's layout (None: the pure core)."""
    layout = _layout(fields)
    key = (layout, *((f.name, f.type) for f in fields))
    found = _compiled.get(key)
    if found is None:
        names = [f.name for f in fields]
        pack, shared = W.pack_source(fields, names, "    ")
        shared.update(_Exception=Exception, _AttributeError=AttributeError, _aio=ASYNCIO)
        values = "".join(f"{n}, " for n in names)
        write = _WRITE.format(pack=pack, values=values)
        if layout is not None:
            shared["_record"] = _configured[0].record
            write = _C_WRITE.format(
                layout=layout, values=values, pure=textwrap.indent(write, "    ")
            )
        top = _TOP_CHANNEL + write
        fused = _INLINE_CHANNEL + write
        nested = _NESTED_BODY.format(write=textwrap.indent(write, "    "))
        unpack = f"{values} = _args\n    " if names else ""

        def code(body: str) -> types.CodeType:
            source = _FUNCTION.format(unpack=unpack, body=textwrap.indent(body, "    "))
            return function_code(source, "recorder probe")

        found = _compiled[key] = (fused, code(top), code(nested), shared, layout)
    return found


def bind(rec: Recording, marker: Any) -> Binding:
    """What the registry runs on each event of ``marker`` for recording ``rec``."""
    fused, top_code, nested_code, shared, layout = _paths(marker.fields)
    state = Bound(rec, marker)
    state.layout = layout  # read by the probes' C path (tracemark/_speedups_probes.c)
    # The C core's firing path (tracemark/_speedups_fire.c): the fused body in one C call.
    fast = _configured[0].fire(state, layout) if layout is not None else None
    ns = {**shared, "_state": state}
    name = f"record[{marker.name}]"
    return Binding(
        top=types.FunctionType(top_code, ns, name),
        nested=types.FunctionType(nested_code, ns, name),
        inline=Inline(fused, shared, state, fast),
    )


def skip(marker: Any, args: tuple) -> None:
    """A marker this probe leaves to another glob of the same recording."""


def make_probe(rec: Recording, earlier: list[str]) -> Any:
    """The probe of one glob of ``rec``: the registry calls its ``bind_marker(marker)`` once
    per marker and calls the returned per-marker function on every event (see :func:`bind`).
    A marker that a glob in ``earlier`` matches is recorded there, and skipped here."""
    bound: dict[Any, Any] = {}
    claimed = [re.compile(fnmatch.translate(p)).match for p in earlier]

    def bind_marker(marker: Any) -> Any:
        fn = bound.get(marker)
        if fn is None:
            claimed_earlier = any(match(marker.name) for match in claimed)
            fn = bound[marker] = skip if claimed_earlier else bind(rec, marker)
        return fn

    def probe(marker: Any, args: tuple) -> None:
        # Only for a caller that does not bind (the registry always does).
        (bound.get(marker) or bind_marker(marker))(marker, args)

    def unbind(marker: Any) -> None:
        # A forgotten marker (a removed probe): its event class stays in the metadata.
        bound.pop(marker, None)

    probe.__qualname__ = f"Recording.probe[{rec.path}]"
    probe.bind_marker = bind_marker  # type: ignore[attr-defined]
    probe.unbind_marker = unbind  # type: ignore[attr-defined]
    return probe
