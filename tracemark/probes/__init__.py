"""Dynamic probes: entry, return, line and raise probes on code nobody marked.

The kprobes / jretprobes of tracemark::

    h = tracemark.probe("json:loads", capture=["s"])        # marker probe.json.loads.entry
    r = tracemark.probe("json:loads", at="return")          # .return: value, duration_ns
    tracemark.probe("app/db.py:120", capture=["rows", "sql"])  # a line, with locals
    tracemark.connect("probe.json.*", tracemark.Printer())
    ...
    tracemark.unprobe(h)

Guarantees
----------
* **A probe is a marker.** Each probe declares a marker in the same registry, named
  ``probe.<module>.<qualname>.<at>`` (``probe.<module>.<qualname>.line<N>`` for a line),
  or ``name=``. Every tracer consumes it unchanged, by name or glob. A second probe on the
  same target gets its own marker (``..._2``): two probes, both fire. A marker of that name
  declared by code with other fields also makes a suffix; ``handle.name`` is always the
  truth.
* **A probe's marker goes with it.** The marker a probe declared is removed from the
  registry by :func:`unprobe` (:func:`tracemark.markers` no longer lists it, and a process
  that probes many things for a while does not keep them all), even while a glob connection
  such as ``probe.*`` binds it: connections stay, and bind the marker of a later probe of
  the same name. A recording keeps its event class, so what it recorded stays readable. A
  marker that existed before the probe (declared by code, same fields) is only reused, and
  stays; code that declares a probe's marker name *while* the probe exists shares it, and
  loses it with the probe.
* **Code not loaded yet.** ``probe(..., defer=True)`` waits for the module's import (or for
  the script to define the function) and installs then: :mod:`.deferred`.
* **Nothing half-installed.** Every error (see :mod:`.targets`) is raised before anything
  changes; :class:`ProbeError` is a ValueError.
* **Zero cost when nobody listens.** A probe's events are switched on only while its marker
  is active (a registry listener), so an installed probe without a connected consumer costs
  nothing, and code that is not probed runs unchanged on every Python.
* **unprobe restores.** After :func:`unprobe` the function's code and events are exactly as
  before (on 3.11 the very same code object; on 3.12+ no local event of tracemark's tool id
  on it, and the tool id given back once no probe is left). Probes in flight finish; use
  :func:`tracemark.synchronize` to wait for them.
* **unprobe silences every copy.** On the recompiling mechanism a function object made from
  the instrumented code while the probe was installed (``types.FunctionType(f.__code__,
  ...)``, a closure made then, a code object kept and turned into a function later) keeps
  that code, but after :func:`unprobe` it never fires the removed probe again: the copy's
  hooks reach the marker only through the probe's emitters, whose marker reference
  ``unprobe`` swaps for a no-op (:meth:`Probe.retire`; nothing is added to the firing
  path). Such a copy still runs the instrumented code, so it pays one no-op call per hook.
  On ``sys.monitoring`` no copy exists: events belong to the code object and are switched
  off.
* **Semantics preserved.** Return values, exceptions, tracebacks with their line numbers,
  generators (entry once per call, return once at the end), coroutines, async generators,
  closures, methods, decorated functions (probed at ``__wrapped__``), recursion.

The mechanism serving probes is chosen in :mod:`.core` (``sys.monitoring`` on 3.12+, an
instrumented copy compiled from source on 3.11).

Probes and the marker patcher
-----------------------------
A function holding marker statements may run a variant of its code made by the marker
patcher (:mod:`tracemark.patching`); ``sys.monitoring`` events enabled on the original never
fire in a variant, and the recompiling mechanism must start from the original. So, in one
place (:func:`probe` and :func:`unprobe` here, with the protocol of
:func:`tracemark.patching.patcher.suspend`):

* a probe **suspends** patching of its target's owning function (and of every function object
  running code of that function's tree) *before* the mechanism checks or installs anything:
  the original code is put back, and the patcher stops switching variants or patching it
  lazily. Suspension is counted, once per installed probe, whatever the mechanism.
* Targets are resolved on the original code (:func:`~tracemark.patching.patcher.original_code`),
  so events are enabled on, and copies compiled from, the original.
* While suspended, the function's marker statements take the plain marker call path (correct,
  not free), and ``tracemark.markers()`` reports those sites as
  ``"suspended: dynamic probe installed"``.
* :func:`unprobe` first lets the mechanism restore exactly the code the function had when the
  probe was installed (the original), then **resumes** the patcher, which puts the variant
  for the markers active now back once the last probe on that function is gone. A probe that
  fails to install resumes at once: nothing is left suspended.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._forksafe import fork_safe_rlock
from ..markers import registry
from ..patching import patcher
from . import core, decorated
from . import deferred as _deferred
from .deferred import DeferredProbe
from .events import AT, Probe
from .spec import Spec, parse_spec
from .targets import ProbeError, check_captures, resolve

__all__ = [
    "AT",
    "DeferredProbe",
    "Probe",
    "ProbeError",
    "Spec",
    "deferred_probes",
    "install_spec",
    "mechanism",
    "parse_spec",
    "probe",
    "probes",
    "unprobe",
]

_lock = fork_safe_rlock()  # a fork while another thread held it must not hang the child
_by_name: dict[str, Probe] = {}
_mechanism: object | None = None


def mechanism():
    """The mechanism object serving probes in this process (chosen on first use)."""
    global _mechanism
    with _lock:
        if _mechanism is None:
            _mechanism = core.choose()
            registry.add_listener(_on_activity)
            registry.add_site_reporter(_sites)
        return _mechanism


def _sites(marker: registry.MarkerCore) -> tuple[str, ...]:
    """What ``tracemark.markers()`` shows as the site of a probe's marker: how it is served."""
    p = _by_name.get(marker.name)
    if p is None or p.core is not marker:
        return decorated.sites(marker)
    state = "enabled" if p.enabled else "installed, events off until a probe is connected"
    return (f"{p.at} probe on {p.target.spec} ({p.target.where}): {core.REASON}; {state}",)


def _use(name: str | None) -> None:
    """Switch mechanism (tests run both on 3.12+); only while no probe is installed."""
    global _mechanism
    with _lock:
        if _by_name or decorated.enabled():
            installed = [*probes(), *decorated.enabled()]
            raise RuntimeError(f"cannot switch mechanism with probes installed: {installed}")
        first = _mechanism is None
        _mechanism = core.choose(name)
        if first:
            registry.add_listener(_on_activity)
            registry.add_site_reporter(_sites)


def _on_activity(marker: registry.MarkerCore, active: bool) -> None:
    """Registry listener: a probe's events follow its marker's activity."""
    decorated.on_activity(marker)  # spans decorating functions (@q)
    p = _by_name.get(marker.name)
    if p is None or not p.installed or p.core is not marker or p.enabled == active:
        return
    mech = mechanism()
    (mech.enable if active else mech.disable)(p)  # type: ignore[attr-defined]
    p.enabled = active


def _clean(part: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in part.strip("<>")) or "_"
    return "_" + out if out[0].isdigit() else out


def _declare(p: Probe, name: str | None) -> None:
    types_ = p.field_types()
    where = p.target.where
    if name is not None:
        if name in _by_name:
            raise ProbeError(f"probe name {name!r} is already used by {_by_name[name]!r}")
        p.owns_marker = registry.lookup(name) is None
        try:
            p.core = registry.declare(name, None, types_, where=where)
        except ValueError as exc:
            raise ProbeError(str(exc)) from None
        p.name = name
        p.compile()
        return
    # A spawn child runs the script as __mp_main__: its probes have the parent's names.
    module = "__main__" if p.target.module == "__mp_main__" else p.target.module
    parts = [*module.split("."), *p.target.name_parts]
    if p.at != "line":
        parts.append(p.at)
    base = "probe." + ".".join(_clean(x) for x in parts)
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}_{n}"
        if candidate in _by_name:
            continue
        existing = registry.lookup(candidate)
        if existing is not None and existing.fields != registry.fields_from_types(types_):
            continue  # declared by code with other fields
        p.owns_marker = existing is None
        p.core = registry.declare(candidate, None, types_, where=where)
        p.name = candidate
        p.compile()
        return
    raise ProbeError(f"too many probes on {p.target.spec!r}")


def probe(
    target: str,
    *,
    at: str = "entry",
    capture: Iterable[str] | str | None = None,
    name: str | None = None,
    defer: bool = False,
) -> Probe | DeferredProbe:
    """Probe ``target`` (``module:qualname``, ``module:LINE``, ``path/file.py:LINE`` or
    ``path/file.py:qualname``; ``__main__:qualname`` for the running script).

    ``at`` is ``entry`` (the arguments, or ``capture``), ``return`` (``value`` and
    ``duration_ns``), ``raise`` (``exc_type`` and ``message`` of an exception leaving the
    function) or ``line`` (for a LINE target, which implies it). ``capture`` names locals of
    the function, optionally with attribute paths (``req.url``). Returns the handle for
    :func:`unprobe`; raises :class:`ProbeError` (a ValueError) with the reason when the
    probe cannot be installed, having installed nothing.

    ``defer=True``: when the target's module is not loaded yet (or the script has not defined
    the function yet), return a :class:`DeferredProbe` at once, and install the probe when
    the module is imported (see :mod:`tracemark.probes.deferred`); a loaded module is probed
    at once, as without ``defer``.
    """
    if not defer:
        return _probe_resolved(target, None, at, capture, name)
    _check_at(target, at)
    d = DeferredProbe(target, at, capture, name)
    with _deferred._lock:  # no import of that module finishes between the check and add
        module = _deferred.loaded_module(d)
        if module is None:
            return _deferred.add(d)
    return _probe_resolved(target, _deferred.finished(module), at, capture, name)


def _check_at(target: str, at: str) -> str:
    """``at`` checked against the target's kind: ``line`` for a LINE target given ``entry``."""
    if at not in AT:
        raise ProbeError(f"at must be one of {', '.join(AT)}, not {at!r}")
    if not isinstance(target, str) or ":" not in target:
        resolve(target)  # raises the message for a bad target
    is_line = target.rpartition(":")[2].isdigit()
    if is_line and at not in ("entry", "line"):
        raise ProbeError(f"cannot probe {target!r} at {at!r}: a LINE target is a line probe")
    if not is_line and at == "line":
        raise ProbeError(
            f"cannot probe {target!r} at 'line': give the line as 'module:LINE' or 'file.py:LINE'"
        )
    return "line" if is_line else at


def _probe_resolved(
    target: str,
    module: object,
    at: str,
    capture: Iterable[str] | str | None,
    name: str | None,
) -> Probe:
    """:func:`probe` on ``module`` when the caller has it (a deferred probe), else imported."""
    at = _check_at(target, at)
    tgt = resolve(target, module)  # type: ignore[arg-type]
    paths = check_captures(tgt, capture)
    if capture is None and at == "entry":
        paths = tgt.params
    p = Probe(tgt, at, paths, name or "")
    mech = mechanism()
    p.mechanism = mech.name  # type: ignore[attr-defined]
    owner = tgt.owner
    with registry._lock, _lock:  # no marker turns active half-way through
        if owner is not None:
            patcher.suspend(owner)  # the original code runs from here on (see above)
        try:
            _install(p, mech, name)
        except BaseException:
            if owner is not None:
                patcher.resume(owner)
            raise
    return p


def _install(p: Probe, mech: object, name: str | None) -> None:
    mech.check(p)  # type: ignore[attr-defined]
    try:
        _declare(p, name)
    except BaseException:
        mech.abandon()  # type: ignore[attr-defined]
        raise
    mech.install(p)  # type: ignore[attr-defined]
    _by_name[p.name] = p
    p.installed = True
    if p.core is not None and p.core.active:
        try:
            mech.enable(p)  # type: ignore[attr-defined]
        except BaseException:
            _by_name.pop(p.name, None)
            p.installed = False
            mech.remove(p)  # type: ignore[attr-defined]
            p.retire()
            raise
        p.enabled = True


def unprobe(handle: Probe | DeferredProbe) -> bool:
    """Remove a probe: its events stop and its function is as before. False if already gone.

    Its marker is forgotten, if the probe declared it (connections stay: see the module
    docstring); nothing fires it again. A :class:`DeferredProbe` still pending is cancelled
    (never installed); an installed one is removed.
    """
    if isinstance(handle, DeferredProbe):
        if _deferred.cancel(handle):
            return True
        return handle.probe is not None and unprobe(handle.probe)
    if not isinstance(handle, Probe):
        raise TypeError(f"unprobe() takes what probe() returned, not {handle!r}")
    mech = mechanism()
    with registry._lock, _lock:
        if not handle.installed:
            return False
        if handle.enabled:
            mech.disable(handle)  # type: ignore[attr-defined]
            handle.enabled = False
        handle.installed = False
        _by_name.pop(handle.name, None)
        mech.remove(handle)  # type: ignore[attr-defined]
        handle.retire()  # copies of the instrumented code, wherever they are, fire no more
        if handle.owns_marker:
            registry.forget(handle.name, handle.core)  # its declaration was the probe's
        if handle.target.owner is not None:
            patcher.resume(handle.target.owner)  # the variant is back after the last probe
    return True


def install_spec(spec: str, *, defer: bool = False) -> Probe | DeferredProbe:
    """Install the probe a SPEC describes (see :mod:`.spec`); what ``--probe SPEC`` calls
    (with ``defer=True``: a module not imported yet is probed when it is).

    A bad spec, or a probe that cannot be installed, is a ValueError with the reason.
    """
    s = parse_spec(spec)
    return probe(s.target, at=s.at, capture=s.capture, defer=defer)


def deferred_probes() -> list[DeferredProbe]:
    """Every deferred probe of this process (pending, installed, failed or cancelled)."""
    return _deferred.deferred()


def probes() -> list[Probe]:
    """Every installed probe, by marker name."""
    with _lock:
        return [_by_name[n] for n in sorted(_by_name)]
