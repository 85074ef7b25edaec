"""The registry: every marker declared in this process, and every probe connected to them.

One mechanism for every consumer (the seed thread's first conclusion): printers, recorders,
aggregators, exporters and a user's own callbacks all ``connect`` to markers by name, at run
time, and dynamic probes are markers in this same registry.

Guarantees
----------
* A marker is *active* exactly while at least one probe is connected to it; there is no other
  switch to get out of step.
* A probe connected by glob also binds markers declared later (a module imported afterwards).
* **Declaring again.** A name declared again with the same fields is the same marker (module
  reload is safe, and code that declares a library's marker to fire it shares it): every
  place that declared it is listed (``MarkerInfo.declared_at``). With *other* fields:

  - from the same place (the same module and line, or an interactive ``__main__``: a
    notebook cell run again after its fields changed), the new declaration **replaces** the
    old one: the old marker is forgotten (:func:`forget`: its connections move to the new
    one, its firing function does nothing any more);
  - from anywhere else (two installed packages that both declare ``db.query``), it is a
    **fault**, never an exception in the program (except in strict mode): counted and
    reported once with both places, and the newcomer gets a marker of its own named after
    its top-level package, LTTng's ``provider:event`` as ``provider.event``
    (``otherlib.db.query``; ``..._2`` if that is taken too). The first declaration keeps
    the plain name. ``markers()``, ``tracemark list`` and traces show both names, so the
    two are never mixed.

  Declarations with an explicit ``where`` (dynamic probes) keep the strict rule: other
  fields are a ValueError naming both declarations, the probe picks another name.
* Every change (declare, connect, disconnect) happens under one lock and is published to the
  firing threads by replacing immutable tuples (see :mod:`.dispatch`); firing takes no lock.
* **Re-entrant.** The lock is re-entrant, so a signal handler, ``__del__`` or weakref callback
  that declares a marker (or connects, or disconnects) in the middle of a ``connect``,
  ``disconnect`` or ``declare`` on the same thread neither deadlocks nor disturbs it: every
  loop over the registry runs over a snapshot, attaching is idempotent, and a marker declared
  meanwhile is bound by the glob all the same (by ``declare``, which sees the connection).
* **All or nothing.** ``connect`` and ``declare`` either complete or, if an exception (one
  that a signal handler raised, say) interrupts them, undo what they attached and raise:
  no probe stays attached without a handle to remove it. ``disconnect`` that was interrupted
  finishes its work when called again (and retries once by itself).
* A fork child gets the registry lock back free (:mod:`tracemark._forksafe`), so a fork while
  another thread holds it cannot deadlock the child.
* Listeners (the code patcher) hear about every marker that turns active or inactive, under
  the lock, in the order it happened.
* **Probes bound per marker.** A probe object with a ``bind_marker(marker)`` method is asked,
  once per marker it attaches to (now or when the marker is declared later, under the lock),
  for what to run on that marker's events: a callable ``fn(marker, args)``, or a
  :class:`~.dispatch.Binding` (separate callables for depth 0 and for nested events, and
  optionally an :class:`~.dispatch.Inline` body that the firing function runs fused while
  it is the marker's only probe). A tracer uses it to specialise its path for one marker
  (the recorder: no per-event lookup of the marker's packer, no call at all when fused).
  Errors of a bound callable are counted against its connection like the probe's own. A
  ``bind`` that raises or returns something not callable leaves that marker unconnected for
  this probe, counted in ``Connection.errors`` and reported once (``probe-bind-error``).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import CodeType
from typing import Any, Protocol, runtime_checkable

from .. import faults
from .._forksafe import fork_safe_rlock
from .._frozen import frozen
from . import dispatch
from .dispatch import (
    _MISSING,
    Binding,
    Inline,
    call_body,
    compile_fire,
    fire_code,
    synchronize,
)
from .fields import Field, fields_from_format, fields_from_types

__all__ = [
    "Connection",
    "Marker",
    "MarkerInfo",
    "connect",
    "declare",
    "disconnect",
    "lookup",
    "markers",
]

_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z", re.ASCII)
_NAME_RULE = "a marker name is one or more identifiers joined by dots, like 'net.rx'"


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid marker name, else raise ValueError saying why."""
    if not isinstance(name, str):
        raise ValueError(f"marker name must be a str, not {type(name).__name__}; {_NAME_RULE}")
    if not _NAME.match(name):
        raise ValueError(f"invalid marker name {name!r}: {_NAME_RULE}")
    return name


@runtime_checkable
class Marker(Protocol):
    """A declared marker: call it to fire it.

    A Marker is a plain Python function compiled for its fields (see
    :mod:`tracemark.markers.dispatch` for why), carrying its declaration as attributes.
    """

    name: str
    fields: tuple[Field, ...]
    fmt: str | None
    where: str

    def __call__(self, *args: Any, **kwargs: Any) -> None: ...


class Connection:
    """One probe connected to every marker whose name matches a glob.

    Returned by :func:`connect`; pass it to :func:`disconnect`, or use it as a context
    manager (``with connect(...):``), which disconnects and synchronizes on exit.
    """

    def __init__(
        self,
        pattern: str,
        probe: Callable[[Any, tuple], object],
        fields: tuple[str, ...] | Mapping[str, type] | None,
        reentrant: bool,
    ) -> None:
        self.pattern = pattern
        self.probe = probe
        self.fields = fields
        self.reentrant = reentrant
        self.connected = True
        #: How many times the probe raised (counted per connection).
        self.errors = 0
        #: Names of markers the pattern matched but whose fields differ from ``fields``.
        self.mismatched: list[str] = []
        #: Markers whose ``bind_marker`` failed (not tried again).
        self._refused: set[Any] = set()
        self._match = re.compile(fnmatch.translate(pattern)).match

    def matches(self, name: str) -> bool:
        return self._match(name) is not None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect(self)
        synchronize()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Connection {self.pattern!r} -> {self.probe!r} ({state})>"


@frozen
class MarkerInfo:
    """A snapshot of one marker, as :func:`markers` reports it."""

    name: str
    fields: tuple[Field, ...]
    fmt: str | None
    where: str
    probes: tuple[Connection, ...]
    #: Events dropped because their arguments did not fit the fields.
    bad_arguments: int
    #: Events dropped because they were fired too deep inside other probes on one thread.
    dropped_nested: int
    #: Times a probe of this marker raised.
    probe_errors: int
    #: How each place that fires this marker in code is served (filled in by the patcher).
    sites: tuple[Any, ...] = ()
    #: Every place that declared it (``where`` first): more than one when several modules
    #: declared it with the same fields and share it.
    declared_at: tuple[str, ...] = ()
    #: What the marker means, as its declaration says (``doc=``), or None.
    doc: str | None = None

    @property
    def active(self) -> bool:
        """True while at least one probe is connected."""
        return bool(self.probes)


class MarkerCore:
    """The registry's own record of one marker (the user holds its firing function)."""

    def __init__(self, name: str, fields: tuple[Field, ...], fmt: str | None, where: str):
        self.name = name
        self.fields = fields
        self.fmt = fmt
        self.where = where
        #: Every place that declared it (see MarkerInfo.declared_at).
        self.declared_at: tuple[str, ...] = (where,)
        #: The module that declared it first (None: unknown, or given an explicit ``where``).
        self.module: str | None = None
        #: What it means (``doc=``): the first declaration that gives one sets it.
        self.doc: str | None = None
        self.connections: tuple[Connection, ...] = ()
        self.bad_arguments = 0
        self.dropped_nested = 0
        self.probe_errors = 0
        self.generation = 0  # counts publications (see publish)
        #: Connection -> what its probe's ``bind_marker`` returned for this marker.
        self.bound: dict[Connection, Binding] = {}
        #: Inline bodies fused into the firing function so far: source -> (the global that
        #: holds its state, the firing code with that body).
        self.fused: dict[str, tuple[str, CodeType]] = {}
        #: The same with a call of ``_fast`` first (Inline.fast where the C core cannot
        #: hook the function's calls: 3.11): source -> code.
        self.fused_fast: dict[str, CodeType] = {}
        #: Whether the marker's fields let a C firing path stand in (no context field).
        self.fast_ok = all(f.context is None for f in fields)
        #: The inline body that calls a marker's only probe directly.
        self.call_source = call_body(fields)
        self.fire, self.namespace = compile_fire(
            fields,
            self,
            bad_arguments=_bad_arguments,
            probe_failed=_probe_failed,
            dropped_nested=_dropped_nested,
        )
        f = self.fire
        self.plain_code = f.__code__
        f.__name__ = f.__qualname__ = name
        f.__doc__ = f"Fire marker {name!r} ({self.signature()}); declared at {where}."
        f.name, f.fields, f.fmt, f.where = name, fields, fmt, where
        f.doc = None
        f.__tracemark__ = self  # how the patcher and the registry recognise a marker

    def set_doc(self, doc: str) -> None:
        self.doc = doc
        f = self.fire
        f.doc = doc
        f.__doc__ = f"{doc}\n\n{f.__doc__}"

    def signature(self) -> str:
        return ", ".join(map(str, self.fields)) or "no fields"

    @property
    def active(self) -> bool:
        return bool(self.connections)

    def publish(self) -> None:
        """Give the firing threads the new probe tuples: one store each.

        While the marker has one probe, the firing function's code is the one with that
        probe fused in: its :class:`Inline` body if it offers one, else a direct call (no
        loop: ~15-30 ns less per event). Every inline slot is cleared before the code or the
        tuples change and the new one is set last, so a thread runs either a whole old
        binding, or the loop over the tuple it read, or the new inline state.
        """
        while True:
            # A signal handler that connects or disconnects a probe of this same marker
            # while this runs publishes in between: publish again, with what is current.
            self.generation += 1
            generation = self.generation
            self._publish()
            if self.generation == generation:
                return

    def _publish(self) -> None:
        conns, ns = self.connections, self.namespace
        bindings = [self.bound.get(c) or Binding(c.probe) for c in conns]
        inline = None
        if len(bindings) == 1:  # the only probe: its own body, or else a direct call
            inline = bindings[0].inline or Inline(self.call_source, {}, bindings[0].top)
        code, slot = self._fused(inline)
        ns["_fused_state"] = None  # the fused state, for the probes' C path (below)
        # A C firing path (Inline.fast) stands in for the fused body: through the function's
        # own calls where the C core can hook them, else through a prologue (see dispatch).
        support = dispatch.fast_support
        fast = inline.fast if inline is not None and slot and self.fast_ok else None
        if support is not None and fast is not None and not support.install(self.fire):
            code = self._prologue(inline)  # type: ignore[union-attr]
        ns["_fast"] = dispatch._no_fast  # cleared first, like the inline slots
        if support is not None and fast is None:
            support.uninstall(self.fire)
        for old, _ in tuple(self.fused.values()):
            ns[old] = None
        if self.fire.__code__ is not code:
            self.fire.__code__ = code
        pairs = zip(bindings, conns, strict=True)
        ns["_nested"] = tuple(b.nested or b.top for b, c in pairs if c.reentrant)
        ns["_probes"] = tuple(b.top for b in bindings)
        if inline is not None and slot:
            ns[slot] = inline.state
            # The C path of entry probes (tracemark/_speedups_probes.c) records a recorder's
            # fused event itself, and only while this holds that recorder's state.
            ns["_fused_state"] = inline.state
            if fast is not None:
                ns["_fast"] = fast  # last: the whole binding is in place

    def _prologue(self, inline: Inline) -> CodeType:
        """The fused code of ``inline`` with a call of ``_fast`` first (compiled once)."""
        code = self.fused_fast.get(inline.source)
        if code is None:
            slot = self.fused[inline.source][0]
            code = fire_code(self.fields, inline.source, slot, fast=True)
            self.fused_fast[inline.source] = code
        return code

    def _fused(self, inline: Inline | None) -> tuple[CodeType, str]:
        """The firing code for ``inline`` (compiled once per body) and its state slot; the
        plain code and "" when there is none or its globals clash with the marker's."""
        if inline is None:
            return self.plain_code, ""
        ns = self.namespace
        if any(ns.get(k, v) is not v for k, v in inline.globals.items()):
            return self.plain_code, ""  # another body gave a name another meaning: no fusion
        found = self.fused.get(inline.source)
        if found is None:
            slot = f"_inline{len(self.fused)}"
            ns[slot] = None
            found = self.fused[inline.source] = (slot, fire_code(self.fields, inline.source, slot))
        ns.update(inline.globals)
        return found[1], found[0]


# Reset in a fork child (only the forking thread survives: had another thread held it then,
# the child would hang on its first connect, declare or fault). The data it guards is changed
# by single assignments of immutable tuples, so the child can carry on with it.
_lock = fork_safe_rlock()
_markers: dict[str, MarkerCore] = {}
_connections: list[Connection] = []
_listeners: list[Callable[[MarkerCore, bool], None]] = []


# --- faults from the firing path (slow path only) ---------------------------------------------


def _bad_arguments(core: MarkerCore, values: tuple, extra: tuple, named: dict) -> None:
    with _lock:
        core.bad_arguments += 1
    passed = [repr(v) for v in values if v is not _MISSING] + [repr(v) for v in extra]
    passed += [f"{k}={v!r}" for k, v in named.items()]
    message = (
        f"marker {core.name!r} fired with ({', '.join(passed)}), which does not fit its fields "
        f"({core.signature()}) declared at {core.where}; the event was dropped"
    )
    if faults.report("bad-arguments", core.name, message):
        raise faults.MarkerArgumentError(message)


def _probe_failed(core: MarkerCore, probe: object, exc: Exception) -> None:
    with _lock:
        core.probe_errors += 1
        for conn in core.connections:
            b = core.bound.get(conn)
            if probe is conn.probe or (b is not None and probe in _parts(b)):
                conn.errors += 1
                probe = conn.probe  # named as the user connected it
                break
    message = (
        f"probe {probe!r} raised {type(exc).__name__}: {exc} on marker {core.name!r}; "
        "the traced program went on"
    )
    if faults.report("probe-error", f"{core.name}:{id(probe)}", message):
        raise exc


def _parts(b: Binding) -> tuple[object, ...]:
    """What the firing function may report as the failing probe of binding ``b``."""
    return (b.top, b.nested, b.inline.state if b.inline is not None else None)


def _dropped_nested(core: MarkerCore) -> None:
    with _lock:
        core.dropped_nested += 1
    faults.report(
        "dropped-nested",
        core.name,
        f"marker {core.name!r} fired from inside a probe on the same thread was dropped "
        "(only probes connected with reentrant=True nest, and only a few levels deep)",
    )


# --- declaring ---------------------------------------------------------------------------------


def caller(depth: int) -> tuple[str, str | None]:
    """``(file:line, module name)`` of the code ``depth`` frames above the caller."""
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return "<unknown>", None
    module = frame.f_globals.get("__name__")
    return f"{frame.f_code.co_filename}:{frame.f_lineno}", module if isinstance(
        module, str
    ) else None


#: The most declaration places kept per marker (a marker declared from a loop of exec'd
#: code would otherwise grow without bound).
_DECLARED_AT_LIMIT = 16


def _interactive(where: str) -> bool:
    """Declared from an interactive ``__main__`` (a REPL, a notebook cell): its code has no
    file of its own, or the cell's temporary one."""
    filename = where.rpartition(":")[0]
    return filename.startswith("<") or "ipykernel_" in filename


def _same_place(core: MarkerCore, module: str | None, where: str) -> bool:
    if module is None or core.module != module:
        return False
    if core.where == where:
        return True
    return module == "__main__" and _interactive(where) and _interactive(core.where)


def _conflict_message(name: str, fields: tuple[Field, ...], where: str, core: MarkerCore) -> str:
    return (
        f"marker {name!r} declared at {where} with fields "
        f"({', '.join(map(str, fields)) or 'no fields'}), but it was declared at "
        f"{core.where} with fields ({core.signature()})"
    )


def own_name(name: str, module: str | None, fits: Callable[[str], bool]) -> str:
    """The name a conflicting declaration from ``module`` gets: ``<package>.<name>``, then
    ``<package>.<name>_2``, ... the first for which ``fits(candidate)`` (free, or declared
    with the same fields)."""
    package = (module or "").split(".")[0] or "_"
    if not package.isidentifier():
        package = "_"
    base = f"{package}.{name}"
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}_{n}"
        if fits(candidate):
            return candidate
    raise ValueError(f"no free name for marker {name!r} declared by {module!r}")


def placement(
    name: str, fields: tuple[Field, ...], module: str | None, where: str
) -> tuple[str, MarkerCore | None]:
    """How a declaration of ``name`` with ``fields`` from ``module`` at ``where`` lands:
    ``("new", None)``, ``("same", core)``, ``("replace", core)`` or ``("conflict", core)``
    (the rules in the module docstring). Call under the lock for a decision that holds."""
    core = _markers.get(name)
    if core is None:
        return "new", None
    if core.fields == fields:
        return "same", core
    if _same_place(core, module, where):
        return "replace", core
    return "conflict", core


def conflict(name: str, fields: tuple[Field, ...], where: str, core: MarkerCore, own: str) -> None:
    """Report a conflicting declaration (a fault: raised only in strict mode)."""
    message = (
        f"{_conflict_message(name, fields, where, core)}; this declaration gets the marker"
        f" {own!r} (markers of one name from different places are never mixed)"
    )
    if faults.report("marker-conflict", f"{name}:{where}", message):
        raise faults.MarkerConflictError(message)


def declare(
    name: str,
    fmt: str | None = None,
    types: Mapping[str, object] | None = None,
    *,
    where: str | None = None,
    stacklevel: int = 1,
    doc: str | None = None,
) -> MarkerCore:
    """Declare (or find again) the marker ``name``; see :func:`tracemark.marker` and the
    module docstring for a name declared again. Given ``where`` (a dynamic probe's target),
    other fields under the name are a ValueError instead."""
    check_name(name)
    fields = fields_of(name, fmt, types)
    if where is not None:
        return declare_at(name, fields, fmt, where, None, raise_on_conflict=True, doc=doc)
    where, module = caller(stacklevel)
    return declare_at(name, fields, fmt, where, module, doc=doc)


def fields_of(name: str, fmt: str | None, types: Mapping[str, object] | None) -> tuple[Field, ...]:
    if fmt is not None and types:
        raise ValueError(
            f"marker {name!r}: give its fields either as a format or as keywords, not both"
        )
    return fields_from_types(dict(types)) if types else fields_from_format(fmt or "")


def declare_at(
    name: str,
    fields: tuple[Field, ...],
    fmt: str | None,
    where: str,
    module: str | None,
    *,
    raise_on_conflict: bool = False,
    doc: str | None = None,
) -> MarkerCore:
    """:func:`declare` with the place known (``module`` may be None)."""
    if doc is not None and not isinstance(doc, str):
        raise ValueError(f"marker {name!r}: doc must be a str, not {type(doc).__name__}")
    with _lock:
        how, core = placement(name, fields, module, where)
        if core is not None and how == "same":
            if where not in core.declared_at and len(core.declared_at) < _DECLARED_AT_LIMIT:
                core.declared_at += (where,)
            if core.doc is None and doc:
                core.set_doc(doc)
            return core
        if core is not None and how == "conflict":
            if raise_on_conflict:
                raise ValueError(_conflict_message(name, fields, where, core))
            own = own_name(name, module, lambda n: fits(n, fields))
            conflict(name, fields, where, core, own)
            return declare_at(own, fields, fmt, where, module, raise_on_conflict=True, doc=doc)
        if core is not None:  # "replace": the same place declares it anew
            forget(name, core)
        core = MarkerCore(name, fields, fmt, where)
        core.module = module
        if doc:
            core.set_doc(doc)
        _markers[name] = core
        try:
            for conn in tuple(_connections):  # a snapshot: a signal handler may connect
                if conn.matches(name):
                    _attach(core, conn)
        except BaseException:  # interrupted (a signal handler raised): not declared at all
            if _markers.get(name) is core:
                del _markers[name]
            _detach_all(core)
            raise
        return core


def fits(name: str, fields: tuple[Field, ...]) -> bool:
    """``name`` is free, or declared with ``fields``."""
    core = _markers.get(name)
    return core is None or core.fields == fields


def lock() -> Any:
    """The registry's lock (re-entrant), for a decision over several markers that must
    hold while they are declared (a span's two)."""
    return _lock


def lookup(name: str) -> MarkerCore | None:
    """The marker called ``name``, if one was declared."""
    return _markers.get(name)


def core_of(obj: object) -> MarkerCore | None:
    """The registry record behind a marker's firing function, or None for anything else."""
    core = getattr(obj, "__tracemark__", None)
    return core if isinstance(core, MarkerCore) else None


# --- connecting ----------------------------------------------------------------------------------


def connect(
    pattern: str,
    probe: Callable[[Any, tuple], object],
    *,
    fields: str | Sequence[str] | Mapping[str, type] | None = None,
    reentrant: bool = False,
) -> Connection:
    """Connect ``probe`` to every marker matching ``pattern``, now and declared later."""
    if not isinstance(pattern, str) or not pattern or pattern != pattern.strip():
        raise ValueError(
            f"pattern must be a non-empty glob over marker names, like 'net.*', not {pattern!r}"
        )
    if not callable(probe):
        raise TypeError(f"probe must be callable as probe(marker, args), not {probe!r}")
    expected = _expected_fields(fields)
    conn = Connection(pattern, probe, expected, bool(reentrant))
    with _lock:
        # Published first, so that a marker declared meanwhile (by a signal handler, say)
        # is bound by declare(); the loop runs over a snapshot and skips what is bound.
        _connections.append(conn)
        try:
            for core in tuple(_markers.values()):
                if conn.matches(core.name):
                    _attach(core, conn)
        except BaseException:  # interrupted: undo every attachment, leave nothing behind
            _remove(conn)
            raise
    return conn


def _expected_fields(
    fields: str | Sequence[str] | Mapping[str, type] | None,
) -> tuple[str, ...] | dict[str, type] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        return {f.name: f.type for f in fields_from_format(fields)}
    if isinstance(fields, Mapping):
        return {f.name: f.type for f in fields_from_types(dict(fields))}
    return tuple(fields)


def _fields_fit(core: MarkerCore, expected: tuple[str, ...] | dict[str, type] | None) -> bool:
    if expected is None:
        return True
    if isinstance(expected, dict):
        return {f.name: f.type for f in core.fields} == expected
    return tuple(f.name for f in core.fields) == expected


def _attach(core: MarkerCore, conn: Connection) -> None:
    # Idempotent: connect() and a declare() run by a signal handler in the middle of it may
    # both come here for one pair.
    if conn in core.connections or core.name in conn.mismatched or core in conn._refused:
        return
    if not _fields_fit(core, conn.fields):
        conn.mismatched.append(core.name)
        faults.report(
            "fields-mismatch",
            f"{core.name}:{id(conn)}",
            f"probe {conn.probe!r} expects fields {conn.fields!r} but marker {core.name!r} "
            f"has ({core.signature()}), declared at {core.where}; not connected to it",
        )
        return
    bind = getattr(conn.probe, "bind_marker", None)
    if bind is not None:
        try:
            fn = bind(core.fire)
            if not isinstance(fn, Binding):
                fn = Binding(fn)
            if not all(callable(p) for p in (fn.top, fn.nested or fn.top)):
                raise TypeError(f"bind_marker() returned {fn!r}, which is not callable")
        except Exception as exc:  # a probe's fault: counted and reported, never raised here
            conn._refused.add(core)
            conn.errors += 1
            faults.report(
                "probe-bind-error",
                f"{core.name}:{id(conn)}",
                f"probe {conn.probe!r} could not bind marker {core.name!r} "
                f"({type(exc).__name__}: {exc}); not connected to it",
            )
            return
        core.bound[conn] = fn
    was_active = core.active
    core.connections = (*core.connections, conn)
    core.publish()
    if not was_active:
        _notify(core, True)


def disconnect(conn: Connection) -> bool:
    """Stop ``conn``'s probe from being called: no new call starts after this returns.

    Returns False if it was already disconnected. Threads already inside the probe may still
    be running it; :func:`synchronize` waits for them.
    """
    if not isinstance(conn, Connection):
        raise TypeError(f"disconnect() takes what connect() returned, not {conn!r}")
    with _lock:
        if not conn.connected:
            return False
        try:
            _remove(conn)
        except BaseException:  # interrupted (a signal handler raised): finish, then raise
            _remove(conn)
            raise
    return True


def _remove(conn: Connection) -> None:
    """Detach ``conn`` from every marker (idempotent: an interrupted call is finished by the
    next). ``connected`` turns False only once it is attached nowhere."""
    if conn in _connections:
        _connections.remove(conn)  # first: a marker declared from here on is not bound
    for core in tuple(_markers.values()):
        _detach(core, conn)
    conn.connected = False


def _detach(core: MarkerCore, conn: Connection) -> None:
    if conn in core.connections:
        core.connections = tuple(c for c in core.connections if c is not conn)
        core.bound.pop(conn, None)
        core.publish()
        if not core.connections:
            _notify(core, False)
    else:
        core.bound.pop(conn, None)


def _detach_all(core: MarkerCore) -> None:
    for conn in core.connections:
        _detach(core, conn)


# --- listeners (the patcher) ---------------------------------------------------------------------


def add_listener(listener: Callable[[MarkerCore, bool], None]) -> None:
    """Call ``listener(core, active)`` whenever a marker turns active or inactive."""
    with _lock:
        _listeners.append(listener)


def _notify(core: MarkerCore, active: bool) -> None:
    for listener in tuple(_listeners):
        try:
            listener(core, active)
        except Exception as exc:  # a listener must not break connect/disconnect
            faults.report(
                "listener-error",
                repr(listener),
                f"tracemark listener {listener!r} raised {exc!r} for marker {core.name!r}",
            )


# --- forgetting a marker (its declarer is gone: a removed dynamic probe) -----------------------

_forget_listeners: list[Callable[[MarkerCore], None]] = []


def add_forget_listener(listener: Callable[[MarkerCore], None]) -> None:
    """Call ``listener(core)`` when a marker is forgotten (under the lock), so that whoever
    keeps state per marker (the patcher) drops it."""
    with _lock:
        _forget_listeners.append(listener)


def forget(name: str, core: MarkerCore | None = None) -> bool:
    """Remove the marker ``name`` from the registry; False if there is none (or, given
    ``core``, if ``name`` is another marker now).

    For a marker nothing will fire any more, whose declaration belonged to something that is
    gone (a dynamic probe, on :func:`tracemark.unprobe`), so that a process that probes many
    things does not keep every marker it ever probed.

    * It is disconnected from every connection first (a marker turning inactive: listeners
      hear it), and a probe bound per marker that has an ``unbind_marker(marker)`` method is
      told, so that it drops what it kept for it (a recording keeps the event class in its
      metadata: events already recorded stay readable). Then ``add_forget_listener``
      listeners are called.
    * Connections stay: a glob or name that matched it matches a marker declared later
      under that name (a new probe of the same target), as it would any new marker.
    * Safe while threads fire: a thread already inside the firing function finishes with
      the probes it read; later calls find none. The firing function stays callable and
      does nothing; it is not connected again by anything.
    """
    with _lock:
        found = _markers.get(name)
        if found is None or (core is not None and found is not core):
            return False
        del _markers[name]
        conns = found.connections
        found.connections = ()
        found.bound = {}
        found.publish()
        for conn in conns:
            unbind = getattr(conn.probe, "unbind_marker", None)
            if unbind is None:
                continue
            try:
                unbind(found.fire)
            except Exception as exc:  # a probe's fault: counted, never raised here
                conn.errors += 1
                faults.report(
                    "probe-unbind-error",
                    f"{name}:{id(conn)}",
                    f"probe {conn.probe!r} failed to unbind marker {name!r} ({exc!r})",
                )
        if conns:
            _notify(found, False)
        for listener in _forget_listeners:
            try:
                listener(found)
            except Exception as exc:
                faults.report(
                    "listener-error",
                    repr(listener),
                    f"tracemark listener {listener!r} raised {exc!r} forgetting marker {name!r}",
                )
    return True


# --- reading the registry ----------------------------------------------------------------------


_site_reporters: list[Callable[[MarkerCore], tuple[Any, ...]]] = []


def add_site_reporter(reporter: Callable[[MarkerCore], tuple[Any, ...]]) -> None:
    """Let a mechanism (the patcher) say how the sites of each marker are served."""
    _site_reporters.append(reporter)


def markers(pattern: str = "*") -> list[MarkerInfo]:
    """Every declared marker whose name matches ``pattern``, sorted by name."""
    match = re.compile(fnmatch.translate(pattern)).match
    with _lock:
        cores = sorted((c for c in tuple(_markers.values()) if match(c.name)), key=lambda c: c.name)
        return [
            MarkerInfo(
                name=c.name,
                fields=c.fields,
                fmt=c.fmt,
                where=c.where,
                probes=c.connections,
                bad_arguments=c.bad_arguments,
                dropped_nested=c.dropped_nested,
                probe_errors=c.probe_errors,
                sites=tuple(s for r in tuple(_site_reporters) for s in r(c)),
                declared_at=c.declared_at,
                doc=c.doc,
            )
            for c in cores
        ]


def iter_cores() -> Iterator[MarkerCore]:
    """Every marker's registry record (a snapshot: safe while markers are declared)."""
    with _lock:
        return iter(tuple(_markers.values()))
