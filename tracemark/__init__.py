"""tracemark: the Linux kernel's markers and tracepoints, for Python.

Put named markers in code once; connect any number of tracers to them at run time::

    import tracemark

    rx = tracemark.marker("net.rx", "len=%d dev=%s")      # printf-style fields
    tx = tracemark.marker("net.tx", length=int, dev=str)  # typed fields

    def receive(pkt):
        rx(len(pkt), pkt.dev)        # costs one call when nothing listens

    with tracemark.connect("net.*", tracemark.Printer()):
        receive(pkt)                 # 12:00:00.000001 [MainThread] net.rx: len=42 dev=eth0

A marker is active exactly while a probe is connected to it. Probes are any callable
``probe(marker, args)``. Tracing never breaks the traced program: faults are counted and
reported once (:mod:`tracemark.faults`), raised only in strict mode (``TRACEMARK_STRICT=1``).

Code nobody marked can be probed at run time: ``tracemark.probe("json:loads")`` declares the
marker ``probe.json.loads.entry`` and fires it on every call (:mod:`tracemark.probes`);
``tracemark.unprobe(handle)`` removes it.

``tracemark.record(DIR)`` records markers into a CTF 1.8 trace (babeltrace2 reads it;
:func:`tracemark.ctf.read_trace` too): see :mod:`tracemark.tracers.recording`.
"""

from typing import Any as _Any

from . import faults
from .faults import MarkerArgumentError, TracemarkWarning
from .markers import registry as _registry
from .markers.dispatch import MAX_NESTING, Binding, Inline, synchronize
from .markers.fields import Context, Field
from .markers.registry import Connection, Marker, MarkerInfo, connect, disconnect, markers
from .markers.span import Span
from .patching import Site, patch
from .patching import patcher as _patcher

# Loaded on first use (module __getattr__ below): importing tracemark to declare markers
# costs only the marker core and the patcher, not the recorder, the probes or the printer.
_LAZY = {
    "DeferredProbe": "probes",
    "Probe": "probes",
    "ProbeError": "probes",
    "probe": "probes",
    "unprobe": "probes",
    "Printer": "tracers.printer",
    "Recording": "tracers.recording",
    "RecordingSummary": "tracers.recording",
    "record": "tracers.recording",
    "otel_bridge": "tracers.otel",
}

#: Names re-exported under another name than their module's.
_RENAMED = {"otel_bridge": "bridge"}

__version__ = "0.1.0"

__all__ = [
    "MAX_NESTING",
    "Binding",
    "Connection",
    "Context",
    "DeferredProbe",
    "Field",
    "Inline",
    "Marker",
    "MarkerArgumentError",
    "MarkerInfo",
    "Printer",
    "Probe",
    "ProbeError",
    "Recording",
    "RecordingSummary",
    "Site",
    "Span",
    "TracemarkWarning",
    "connect",
    "context",
    "disconnect",
    "faults",
    "mark",
    "marker",
    "markers",
    "otel_bridge",
    "patch",
    "probe",
    "record",
    "span",
    "synchronize",
    "unprobe",
]


def marker(
    name: str, fmt: str | None = None, /, *, doc: str | None = None, **fields: type | str
) -> Marker:
    """Declare the marker ``name`` and return it; call the result to fire it.

    Fields come from a printf-style ``fmt`` (``"len=%d dev=%s"``) or from keywords
    (``length=int, dev=str``), not both; none at all is a marker without fields. Declaring a
    name again with the same fields returns the same marker. With other fields: from the same
    place (a notebook cell run again) it replaces the declaration; from another place (two
    packages both declaring ``db.query``) it is a fault, counted and reported once with both
    places, and the newcomer gets a marker of its own, ``<its package>.<name>``
    (:mod:`tracemark.markers.registry`). An invalid name or format is a ValueError.

    ``doc`` says what the marker means; ``tracemark list`` and ``markers()`` show it, traces
    carry it in their metadata, ``tracemark list --markdown`` makes a catalog of it. (So
    ``doc`` is not a keyword field name: declare a field called ``doc`` with a format.)

    Firing costs one function call when no probe is connected (and nothing at all inside a
    function the patcher has rewritten); arguments that do not fit the fields are counted and
    dropped, never raised (except in strict mode).
    """
    return _registry.declare(name, fmt, fields, stacklevel=2, doc=doc).fire


_inline: dict[tuple[str, str | None], _Any] = {}


def mark(name: str, fmt: str | None = None, /, *args: _Any) -> None:
    """Fire the marker ``name`` inline, declaring it on first use (the kernel's ``MARK()``).

    ``tracemark.mark("net.drop", "reason=%s", why)`` is ``marker("net.drop", "reason=%s")``
    followed by a call. A use whose format conflicts with the marker's declaration is a
    fault (counted, reported once, the event dropped), not an exception in the program.
    """
    fire = _inline.get((name, fmt))
    if fire is None:
        try:
            fire = _registry.declare(name, fmt, None, stacklevel=2).fire
        except ValueError as exc:
            if faults.report("bad-declaration", f"{name}:{fmt}", f"tracemark.mark(): {exc}"):
                raise
            return
        _inline[name, fmt] = fire
    fire(*args)


def span(
    name: str, fmt: str | None = None, /, *, doc: str | None = None, **fields: type | str
) -> Span:
    """Declare the span ``name``: the markers ``NAME.begin`` (with these fields, given as for
    :func:`marker`) and ``NAME.end``, returned together as a :class:`Span`.

    ``q.begin(...)`` ... ``q.end()`` are two marker statements (jumped over, arguments not
    evaluated, while nobody listens, like any marker statement in a function); ``with
    q(...):`` fires both around a block, also when it raises. Readers pair them per thread
    into spans with a duration (:mod:`tracemark.analysis`). ``doc`` is as for
    :func:`marker` (each of the two markers carries it).
    """
    return Span(name, fmt, stacklevel=2, doc=doc, **fields)


def context(var: _Any, type: type | str = object, *, default: _Any = ...) -> Context:
    """A field read from the ContextVar ``var`` when the marker fires, recorded as ``type``:
    ``tracemark.span("http.request", request_id=tracemark.context(REQUEST_ID, int))``.

    Callers do not pass it; nothing is read while the marker is inactive. Unset, it records
    ``default`` (else the variable's own default, else -1, nan, "", b"", False or None by
    type): never an exception into the program.
    """
    if default is ...:
        return Context(var, type)
    return Context(var, type, default)


# Inactive marker statements inside functions become one jump (see tracemark.patching).
_patcher.install()


def __getattr__(name: str) -> _Any:
    import importlib

    if name == "control":  # tracemark.control.listen() without importing it first
        return importlib.import_module(".control", __name__)
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{where}", __name__)
    value = getattr(module, _RENAMED.get(name, name))
    globals()[name] = value  # found once; later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    # The public API only: not the helpers this module imports, nor its submodules.
    return sorted([*__all__, "control", "__version__"])


# TRACEMARK_CONTROL=1 (or TRACEMARK_FLIGHT=GLOB): listen for tracemark attach; else nothing.
from . import env as _env  # noqa: E402

if _env.CONTROL or _env.FLIGHT:
    from . import control as _control

    _control._start_from_environment()
