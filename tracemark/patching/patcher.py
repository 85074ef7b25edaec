"""The patching policy: which functions get rewritten, when, and how variants are switched.

When a function is patched
--------------------------
* **Lazily, the first time an inactive marker site runs** in a function that is not patched
  yet. A marker without probes is *armed*: its probe tuple is ``dispatch.ARMED``, whose one
  probe calls :func:`_on_unpatched_run`. That finds the function object(s) running the
  caller's code, analyses every function of that module holding marker statements, and
  installs the variant for the markers active now. The program is self-optimising: a site
  pays the plain call (and the analysis) once, then about one jump.
* **Finding the function object never searches the heap** (no ``gc.get_referrers`` on the
  lazy path: with millions of objects alive that is tens of ms inside whatever request ran
  first). A frame does not expose its function object (3.11-3.13), so it is found from what is
  near (:func:`_near`, bounded: a few hundred values): the module's functions, methods,
  properties and ``__wrapped__`` chains, whose code trees hold every nested ``def`` (closures
  are made by their parent); then the values of the running frame's and its callers' locals
  (closure variables included), their closure cells, ``__wrapped__`` chains, methods,
  partials, the methods of instances' classes, and one level into the lists, tuples and dicts
  among them. A closure made before its parent was patched is found this way when its caller
  holds it (``inner = outer(); inner()``), as is a function defined inside another function.
  A function object reachable only from elsewhere (a registry read by subscript, a C
  callback) is looked for again on its next few runs (:data:`NEAR_TRIES`), then stays on the
  plain call path, listed in ``tracemark.markers()`` with the reason :data:`NOT_FOUND`;
  :func:`patch` on it (or its module, class) patches it. On 3.11/3.12 reading a caller's
  ``f_locals`` leaves a snapshot of its locals on that frame until it returns (as a debugger's
  does), a few times per site at most.

  Two heap searches remain, both off the run path, and neither under ``TRACEMARK_NOPATCH=1``
  (nothing is switched or suspended then): :func:`_on_switch`, once per connect/disconnect
  that switches a function holding marker statements in nested functions (closures made from
  a parent's variant must follow the switch, and nothing else knows them); and
  :func:`suspend`, once per dynamic probe installed on such a function. Each is one pass
  over the heap (``gc.get_referrers`` with all the codes at once): bounded per switch, not
  per site, but proportional to the heap (tens of ms with millions of objects alive).
* **Explicitly**, with :func:`patch` (a function, class or module), for code that should be
  free from its first run (``tracemark.patch(sys.modules[__name__])`` at the end of a module).
* **On connect/disconnect**: the registry tells the patcher (``registry.add_listener``) when a
  marker turns active or inactive, and every function already patched that holds one of its
  statements gets the variant for the new set of active markers, built once and cached.
* Never at declaration: the functions that use a marker are usually defined after it.

A marker is disarmed (its probe tuple becomes ``()``) after :data:`HOOK_BUDGET` calls of the
hook that taught it nothing (module-level code, lambdas and other sites that cannot be
patched), so such sites then cost the bare plain call path; it is armed again whenever it
turns inactive. A site first reached while its marker is disarmed stays on the plain call
path until then, or until :func:`patch` is called on it.

Under ``TRACEMARK_NOPATCH=1`` or on a free-threaded build, sites are still found (so that
``tracemark.markers()`` can say why they are not patched) but no code object is replaced.

What swapping guarantees
------------------------
* A variant is built from the original code object only (never a variant of a variant), and
  :func:`.bytecode.verify` checks it before it is installed; a statement the verifier rejects
  is left unpatched and says why in ``tracemark.markers()``.
* Installing is one reference store per function object (``func.__code__ = variant``), under
  the GIL: a call that starts afterwards runs the new code. **Frames already running keep the
  code they started with**: a call (or a suspended generator or coroutine) that began before
  a probe connected still jumps over that marker until it returns. Events are delivered from
  every call that starts after ``connect()`` returns.
* Nested functions and closures: the parent's variant holds the nested variants in its
  ``co_consts``, so every function object made from it afterwards runs the right variant;
  function objects that already exist are found and swapped too.
* **A site calls whatever its name refers to when it runs.** The callee is resolved when the
  function is analysed, and the jump over an inactive statement is *guarded*: it is taken only
  while the name still refers to that object (:func:`.bytecode.rewrite`: the name is loaded
  and compared by identity: about 120 machine instructions per inactive statement,
  ``python -m benchmarks.run jumps``). On 3.12+ with the C core a dictionary watcher on the
  module's globals stands in for the guard of a global name (the jump is then bare, +10
  instructions) and puts the guard back before a watched name is rebound or deleted; a call
  already running at that moment keeps its bare jump until it returns (see ``_watch``).
  Otherwise the statement runs as written: rebinding ``rx = spy`` (a global, or a builtin)
  or a closure variable after patching, even while the marker stays inactive, makes the
  site call ``spy`` with its arguments evaluated; deleting the name raises the NameError the
  original would, from the same line and into the same handler. If the new object is another
  marker, its first call re-analyses the function. For ``mod.rx(...)`` and
  ``tracemark.mark(...)`` only the first name (``mod``, ``tracemark``) is guarded: assigning
  ``mod.rx = other`` after patching is not noticed while ``rx`` is inactive (the statement
  keeps being jumped over; once ``rx`` is active the statement runs and calls ``other``);
  call such a marker through a global name if it may be replaced.
* **Statements that are part of the program are never jumped over.** Arguments that bind a
  name (``:=``), or ``yield``, ``yield from`` or ``await``, keep the plain call path whatever
  the marker's state (:func:`.finder.refusal`); ``tracemark.markers()`` says so ("arguments
  bind a name (:=)", "arguments yield or await"). Independently, the verifier rejects any
  variant in which code that still runs reads a local only the skipped code stores.

Sharing ``__code__`` with dynamic probes: suspend / resume
-----------------------------------------------------------
Dynamic probes (:mod:`tracemark.probes`) also change what a function runs: on 3.11 (or
``TRACEMARK_PROBES=recompile``) they swap ``func.__code__`` to an instrumented copy of the
*original* code, on 3.12+ they enable ``sys.monitoring`` events on the original code object,
which never fire while a variant runs. This is the one protocol between the two, and it lives
here:

* :func:`original_code` ``(func)`` is the code object ``func`` had before tracemark patched
  it (``func.__code__`` itself when the patcher never touched it). Probe targets are resolved
  on it, never on a variant.
* :func:`suspend` ``(func)`` puts the original code back on ``func`` and stops managing it:
  no variant swap on connect/disconnect, no lazy or explicit patching. Suspension is counted
  (each probe on the function suspends once) and is **by code tree**: the function's original
  code and every code object nested in it (``co_consts``, recursively) are suspended, so every
  function object running any of them -- ``func``, other function objects made from the same
  code, closures made from its nested ``def``s before or after -- runs the original code. (A
  probe on ``outer.<locals>.inner`` is served on the nested *original* code, and closures made
  from a variant would never reach it.) The limit of this choice: code is suspended for all its
  function objects, so a sibling closure of a probed one also loses its jumps while the probe
  is installed; and a code object that is nested in a function *other* than ``func`` (a copy
  made by ``code.replace``) is not reached.
* While suspended, marker statements in that code take the plain marker call path: correct,
  not free. ``tracemark.markers()`` says so per site (``"suspended: dynamic probe
  installed"``).
* :func:`resume` ``(func)`` undoes one :func:`suspend`; when the last one is undone, every
  function object that was taken off a variant, and ``func``, is managed again and gets the
  variant for the markers active now -- but only if it still runs the original code: code
  someone else installed in between is never overwritten. A function never analysed before is
  left to the lazy path (its first inactive run patches it).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import weakref
from collections.abc import Iterator
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import TYPE_CHECKING, Any

from .. import env, faults
from .._frozen import frozen
from ..markers import dispatch, registry

if TYPE_CHECKING:
    from . import bytecode, finder

__all__ = [
    "HOOK_BUDGET",
    "NEAR_TRIES",
    "NOT_FOUND",
    "SUSPENDED",
    "Site",
    "original_code",
    "patch",
    "resume",
    "suspend",
    "unpatch_all",
]

#: Calls of a marker's lazy hook that find nothing new before the hook switches itself off.
HOOK_BUDGET = 64

#: The ``Site.reason`` of a marker statement in code whose function a dynamic probe holds.
SUSPENDED = "suspended: dynamic probe installed"

#: The ``Site.reason`` of a site whose function object the lazy hook could not find near it.
NOT_FOUND = "function object not found (tracemark.patch() it to patch it)"

#: Runs of a site whose function object was not found after which it is no longer looked for.
NEAR_TRIES = 8

_CO_OPTIMIZED = 0x0001  # inspect.CO_OPTIMIZED: a function's code (not a module's or class's)


class _OnFirstUse:
    """The module ``name`` (``bytecode``, ``finder``), imported when first used.

    They need ``dis`` and ``ast``, a third of what ``import tracemark`` would cost, and are
    used only once a marker is active (or :func:`patch` is called): a program that declares
    markers and never connects a probe never loads them. The first attribute read imports
    the module and puts it in this module's namespace in place of the stand-in."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        from importlib import import_module

        module = import_module(f"{__package__}.{self._name}")
        globals()[self._name] = module
        return getattr(module, attr)


if not TYPE_CHECKING:
    bytecode = _OnFirstUse("bytecode")
    finder = _OnFirstUse("finder")


@frozen
class Site:
    """One place in code that fires a marker, and how it is served (``MarkerInfo.sites``)."""

    marker: str
    where: str  # file:line
    function: str  # qualified name of the code holding it
    patched: bool  # True: jumped over while inactive; False: plain call path
    reason: str  # why not patched ("" when patched)
    copies: int = 1  # compiled copies of the statement (finally bodies)

    @property
    def mechanism(self) -> str:
        return "patched jump" if self.patched else "plain call"


def _refusal() -> str:
    """Why nothing may be patched in this process, or ""."""
    if env.NOPATCH:
        return "TRACEMARK_NOPATCH=1"
    if env.PYBEHAVIOR.free_threaded:
        return "free-threaded build"
    return ""


def _tree(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _tree(const)


class Unit:
    """The code tree of one outermost function, and every variant of it built so far."""

    def __init__(self, root: CodeType, statements: dict[int, list[finder.Statement]]):
        self.root = root
        self.codes = {id(c): c for c in _tree(root)}
        self.statements = statements  # id(original code) -> its marker statements
        self.rejected: dict[tuple[int, tuple], str] = {}  # (code id, span) -> verifier's why
        self.cores = {s.core for sts in statements.values() for s in sts}
        # (active markers, guards dropped) -> original code id -> variant; never emptied, so
        # that the ids in origin and _units stay the ids of live code objects.
        self.variants: dict[tuple[frozenset, bool], dict[int, CodeType]] = {}
        self.origin: dict[int, CodeType] = {i: c for i, c in self.codes.items()}
        # Every function object running this unit's code -> the original code it runs a
        # variant of (weak: a closure that is dropped is forgotten).
        self.funcs: weakref.WeakKeyDictionary[FunctionType, CodeType] = weakref.WeakKeyDictionary()
        self.nested = any(i != id(root) and sts for i, sts in statements.items())
        self.refused = ""
        # The globals dict whose dictionary watcher stands in for the guards of global names
        # (3.12+, C core: see _watch), or None while the variants carry their guards.
        self.watched: dict | None = None
        self.watched_names = frozenset(
            st.guard.name
            for sts in statements.values()
            for st in sts
            if st.guard is not None and st.guard.scope == "global"
        )
        self._check_each()

    def _check_each(self) -> None:
        """Verify each statement on its own, so one bad statement does not cost the others."""
        for cid, sts in self.statements.items():
            code = self.codes[cid]
            instrs = bytecode.instructions(code)
            for st in sts:
                if st.refusal:
                    self.rejected[cid, st.span] = st.refusal
                    continue
                try:
                    skips = st.skips()
                    bytecode.verify(code, bytecode.rewrite(code, instrs, skips), skips)
                except bytecode.VerifyError as exc:
                    self.rejected[cid, st.span] = f"verifier: {exc}"

    def _build(self, code: CodeType, skip: frozenset, out: dict[int, CodeType]) -> CodeType:
        consts = tuple(
            self._build(c, skip, out) if isinstance(c, CodeType) and id(c) in self.codes else c
            for c in code.co_consts
        )
        cid = id(code)
        spans = [
            copy
            for st in self.statements.get(cid, ())
            if st.core in skip and (cid, st.span) not in self.rejected
            for copy in self._skips(st)
        ]
        changed = any(a is not b for a, b in zip(consts, code.co_consts, strict=True))
        variant = code.replace(co_consts=consts) if changed else code
        if spans:
            try:
                patched = bytecode.rewrite(variant, bytecode.instructions(code), spans)
                bytecode.verify(code, patched, spans)
                variant = patched
            except bytecode.VerifyError:
                pass  # each statement passed alone; a combination that fails stays unpatched
        out[cid] = variant
        self.origin[id(variant)] = code
        return variant

    def _skips(self, st: finder.Statement) -> list[bytecode.Skip]:
        """The statement's jumps; without the guard of a global name the watcher covers."""
        skips = st.skips()
        if self.watched is not None and st.guard is not None and st.guard.scope == "global":
            skips = [s._replace(guard=None) for s in skips]
        return skips

    def mapping(self) -> dict[int, CodeType]:
        """Original code id -> the code to run for the markers active now (cached)."""
        active = frozenset(c for c in self.cores if c.active)
        key = (active, self.watched is not None)
        found = self.variants.get(key)
        if found is None:
            found = dict(self.codes)
            if not self.refused:
                self._build(self.root, frozenset(self.cores - active), found)
            self.variants[key] = found
            for code in found.values():
                _units[id(code)] = self
        return found

    def add(self, func: FunctionType) -> bool:
        """Manage ``func`` from now on; False if it cannot share this unit's variants."""
        orig = self.origin.get(id(func.__code__))
        if orig is None:
            return False
        if func in self.funcs:
            return False
        if self.watched is not None and func.__globals__ is not self.watched:
            self.unwatch()  # the same code run with other globals: the watcher cannot see them
        if id(orig) in _suspended_codes:
            # A dynamic probe holds this code: run the original, and take it back on resume.
            if func.__code__ is not orig:
                _assign(func, orig)
            _parked[func] = orig
            return False
        if orig is self.root and not self._same_closure_markers(func):
            _assign(func, orig)  # its closure holds other markers: plain call path
            return False
        self.funcs[func] = orig
        if not self.refused:
            _assign(func, self.mapping()[id(orig)])
        return True

    def _same_closure_markers(self, func: FunctionType) -> bool:
        """A marker reached through a closure variable is resolved from one function object;
        another function object of the same code may hold another marker in that cell."""
        root = self.root
        if not root.co_freevars:
            return True
        source = finder.source_statements(root.co_filename, func.__globals__) or {}
        found = finder.find_statements(root, func, func.__globals__, source)
        mine = self.statements.get(id(root), [])
        return [(s.span, s.core) for s in found] == [(s.span, s.core) for s in mine]

    def unwatch(self) -> None:
        """Put the guards back on every function of this unit, for good (see _watch)."""
        globs = self.watched
        if globs is None:
            return
        self.watched = None
        units = _watching.get(id(globs), [])
        if self in units:
            units.remove(self)
        if not units:
            _watching.pop(id(globs), None)
            native = _native()
            if native is not None:
                native.unwatch(globs)
        self.install()

    def install(self) -> None:
        if self.refused:
            return
        mapping = self.mapping()
        for func, orig in list(self.funcs.items()):
            # Never fight over __code__: a function whose code someone else replaced since
            # (a dynamic probe's instrumented copy, a debugger) is left as they made it.
            if self.origin.get(id(func.__code__)) is orig:
                _assign(func, mapping[id(orig)])

    def _all_codes(self) -> Iterator[CodeType]:
        yield from self.codes.values()
        for mapping in self.variants.values():
            yield from mapping.values()

    def sites(self, core: Any) -> Iterator[Site]:
        for cid, sts in self.statements.items():
            code = self.codes[cid]
            for st in sts:
                if st.core is not core:
                    continue
                why = self.refused or self.rejected.get((cid, st.span), "")
                if not why and cid in _suspended_codes:
                    why = SUSPENDED
                yield Site(
                    core.name,
                    f"{code.co_filename}:{st.span[0]}",
                    code.co_qualname,
                    not why,
                    why,
                    len(st.copies),
                )


# --- state (all under registry._lock) ----------------------------------------------------------

_units: dict[int, Unit] = {}  # id(code), original or variant -> its unit
_by_core: dict[Any, list[Unit]] = {}
_unpatchable: dict[tuple[int, int], tuple[Any, Site]] = {}  # (id(code), line) -> (code, site)
_no_sites: dict[int, CodeType] = {}  # analysed codes without marker statements
_idle: dict[Any, int] = {}  # core -> hook calls that taught nothing
_searched: set[int] = set()  # id(original code) whose function objects were looked for since
# the last switch: a thread looping in a frame that started before its function was patched
# runs the original code for good, and must not cost a search per iteration
_unfound: dict[int, int] = {}  # id(code) whose function object was not found -> looks so far
_retried: set[tuple[int, Any]] = set()  # (id(code), core) looked at again for a late name
# Suspension (see "Sharing __code__ with dynamic probes" above).
_held: dict[FunctionType, list[Any]] = {}  # func -> [its original code, suspend count]
_suspended_codes: dict[int, int] = {}  # id(code in a held tree) -> how many holds cover it
_places: set[tuple[str, str, int]] = set()  # _place() of every analysed code with sites
# Function objects taken off a variant by a suspension -> the original they run now.
_parked: weakref.WeakKeyDictionary[FunctionType, CodeType] = weakref.WeakKeyDictionary()


def _functions_of(obj: Any, seen: set[int]) -> Iterator[FunctionType]:
    """Plain functions reachable from a function, method, class or module, unwrapping
    decorators (``__wrapped__``), static/class methods and properties."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, MethodType | staticmethod | classmethod):
        yield from _functions_of(obj.__func__, seen)
    elif isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            if f is not None:
                yield from _functions_of(f, seen)
    elif isinstance(obj, FunctionType):
        yield obj
        wrapped = obj.__dict__.get("__wrapped__")
        if wrapped is not None:
            yield from _functions_of(wrapped, seen)
    elif isinstance(obj, type):
        for value in list(vars(obj).values()):
            yield from _functions_of(value, seen)
    elif isinstance(obj, ModuleType):
        for value in list(vars(obj).values()):
            if isinstance(value, FunctionType) and value.__globals__ is not vars(obj):
                continue  # imported from elsewhere
            if isinstance(value, type) and getattr(value, "__module__", None) != obj.__name__:
                continue
            if isinstance(value, FunctionType | type):
                yield from _functions_of(value, seen)
    else:
        wrapped = getattr(obj, "__dict__", {}).get("__wrapped__")
        if wrapped is not None:
            yield from _functions_of(wrapped, seen)


# --- installing code, and the watcher that stands in for the guards ------------------------
#
# Why: the rebinding guard of a patched jump costs 110-122 machine instructions per inactive
# statement (benchmarks/bench_jumps.py), more than the 5% the design allows, while the jump
# alone costs 10. On 3.12+ the C core can watch a module's globals (PEP 699) and drop the
# guards of global names: the watcher's callback runs before a watched name is rebound or
# deleted (or the dict cleared), and puts the guarded variants back on the unit's functions
# before the rebinding statement finishes, so every call that starts afterwards calls the new
# object. What the guard gave and the watcher does not: a call that is already running (or a
# suspended generator or coroutine) when the name is rebound keeps jumping over the statement
# until it returns -- the rule connect() already follows. Once a unit's names are rebound it
# keeps its guards (a module that rebinds its markers, a test's mock, pays the guard).
# Under TRACEMARK_CORE=python, on 3.11 and for closure variables the guards stay.

_watching: dict[int, list[Unit]] = {}  # id(globals) -> units whose guards it stands in for


def _native() -> Any:
    """The C core (tracemark._speedups), or None: pure core, by choice or for want of it."""
    return env._core()[0]


def _assign(func: FunctionType, code: CodeType) -> None:
    """``func.__code__ = code``; through the C core where it keeps the function's version
    (3.13: callers' CALL stays specialised, see _speedups_patching.c)."""
    native = _native()
    if native is None or not hasattr(native, "set_code"):
        func.__code__ = code
    else:
        native.set_code(func, code)


def _watch(unit: Unit, globs: dict) -> None:
    """Let a dictionary watcher on ``globs`` stand in for the unit's guards of global names,
    when the C core can and every such name is bound in ``globs`` itself (a name resolved
    through builtins keeps its guard: a change to builtins is not watched)."""
    native = _native()
    if native is None or not hasattr(native, "watch") or sys.version_info < (3, 12):
        return
    names = unit.watched_names
    if not names or type(globs) is not dict:
        return
    for sts in unit.statements.values():
        for st in sts:
            guard = st.guard
            global_name = guard is not None and guard.scope == "global"
            if global_name and globs.get(guard.name, _UNSET) is not guard.expected:
                return
    units = _watching.setdefault(id(globs), [])
    every = frozenset().union(*(u.watched_names for u in units), names)
    if not native.watch(globs, every, _on_rebind):
        if not units:
            del _watching[id(globs)]
        return
    unit.watched = globs
    units.append(unit)


_UNSET = object()


def _on_rebind(globs: dict, name: str | None) -> None:
    """The watcher's callback: ``name`` of ``globs`` is about to change (None: every name)."""
    if sys.is_finalizing():
        return  # module dicts are cleared at exit: nothing will call the functions again
    try:
        with registry._lock:
            for unit in list(_watching.get(id(globs), ())):
                if name is None or name in unit.watched_names:
                    unit.unwatch()
    except Exception as exc:  # never into the program's assignment
        faults.report("patch-error", str(name), f"tracemark could not restore a guard: {exc!r}")


def _analyse(func: FunctionType) -> Unit | None:
    """The unit of ``func``'s code (made now if needed), or None if it has no statements."""
    code = _original(func)  # never analyse a probe's instrumented copy as if it were original
    unit = _units.get(id(code))
    if unit is not None:
        return unit
    if id(code) in _no_sites:
        return None
    statements = finder.source_statements(code.co_filename, func.__globals__)
    found: dict[int, list[finder.Statement]] = {}
    if statements:
        for c in _tree(code):
            if id(c) in _units:  # already part of another unit: leave this tree alone
                found = {}
                break
            sts = finder.find_statements(
                c, func if c is code else None, func.__globals__, statements
            )
            if sts:
                found[id(c)] = sts
    if not found:
        _no_sites[id(code)] = code
        return None
    unit = Unit(code, found)
    unit.refused = _refusal()
    _watch(unit, func.__globals__)
    for cid, c in unit.codes.items():
        _units[cid] = unit
        _places.add(_place(c))
        if _unfound.pop(cid, None) is not None:  # found at last (patch(), a later caller)
            for key in [k for k in _unpatchable if k[0] == cid]:
                del _unpatchable[key]
    for core in unit.cores:
        _by_core.setdefault(core, []).append(unit)
    return unit


def _take(func: FunctionType) -> Unit | None:
    unit = _analyse(func)
    if unit is not None:
        unit.add(func)
    return unit


def patch(obj: Any) -> list[Site]:
    """Patch every function reachable from ``obj`` (function, method, class or module) now,
    rather than on the first run of each site; returns the sites found, patched or not."""
    out: list[Site] = []
    with registry._lock:
        units = []
        for func in _functions_of(obj, set()):
            unit = _take(func)
            if unit is not None and unit not in units:
                units.append(unit)
        for unit in units:
            for core in sorted(unit.cores, key=lambda c: c.name):
                out.extend(unit.sites(core))
    return out


def unpatch_all() -> None:
    """Put every patched function back on its original code and forget all analysis (tests)."""
    with registry._lock:
        native = _native()
        for units in _watching.values():
            if native is not None and units and units[0].watched is not None:
                native.unwatch(units[0].watched)
        _watching.clear()
        for unit in {id(u): u for u in _units.values()}.values():
            unit.watched = None
            for func, orig in list(unit.funcs.items()):
                _assign(func, orig)
        _units.clear()
        _by_core.clear()
        _unpatchable.clear()
        _no_sites.clear()
        _idle.clear()
        _searched.clear()
        _unfound.clear()
        _retried.clear()
        _places.clear()
        for core in registry.iter_cores():
            set_armed(core, True)


# --- sharing __code__ with dynamic probes (see the module docstring) ---------------------------


def _original(func: FunctionType) -> CodeType:
    held = _held.get(func)
    if held is not None:
        return held[0]
    code = func.__code__
    unit = _units.get(id(code))
    if unit is not None:
        return unit.origin.get(id(code), code)
    return code


def original_code(func: FunctionType) -> CodeType:
    """The code object ``func`` had before tracemark patched it (``func.__code__`` if the
    patcher never replaced it)."""
    with registry._lock:
        return _original(func)


def suspend(func: FunctionType) -> CodeType:
    """Put ``func``'s original code back and stop patching it (and every function object
    running code of its tree) until the matching :func:`resume`; returns the original code.

    Counted: each call needs one :func:`resume`. Call it before changing ``func.__code__`` or
    enabling events on its code.
    """
    if not isinstance(func, FunctionType):
        raise TypeError(f"suspend() takes a Python function, not {func!r}")
    with registry._lock:
        held = _held.get(func)
        if held is not None:
            held[1] += 1
            return held[0]
        root = _original(func)
        _held[func] = [root, 1]
        tree = {id(c): c for c in _tree(root)}
        for cid in tree:
            _suspended_codes[cid] = _suspended_codes.get(cid, 0) + 1
        # The units holding code of this tree: usually one, whose root is ``root`` or holds
        # it; a closure analysed on its own before its parent has a unit of its own.
        units = {id(u): u for cid in tree if (u := _units.get(cid)) is not None}
        for unit in units.values():
            runners = [f for f, orig in unit.funcs.items() if id(orig) in tree]
            nested = [
                c
                for c in unit._all_codes()
                if unit.origin[id(c)] is not c
                and id(unit.origin[id(c)]) in tree
                and unit.origin[id(c)] is not unit.root
            ]
            if nested:
                # Closures made from a parent's variant run nested variants the unit may
                # never have seen: find them on the heap (installing a probe is rare; never
                # on the lazy path, see "Finding the function object" above).
                for obj in gc.get_referrers(*nested):
                    if isinstance(obj, FunctionType) and obj not in runners:
                        runners.append(obj)
            for f in runners:
                orig = unit.origin.get(id(f.__code__))
                if orig is None or id(orig) not in tree:
                    continue  # not running our code (someone else's, or another tree)
                unit.funcs.pop(f, None)
                _assign(f, orig)
                _parked[f] = orig
        return root


def resume(func: FunctionType) -> bool:
    """Undo one :func:`suspend`; after the last, patch ``func`` (and the function objects the
    suspension took off their variants) again for the markers active now, if they still run
    their original code. False if ``func`` was not suspended."""
    with registry._lock:
        held = _held.get(func)
        if held is None:
            return False
        held[1] -= 1
        if held[1]:
            return True
        del _held[func]
        for c in _tree(held[0]):
            left = _suspended_codes.pop(id(c)) - 1
            if left:
                _suspended_codes[id(c)] = left
        back = [f for f, orig in list(_parked.items()) if id(orig) not in _suspended_codes]
        if func not in back:
            back.append(func)
        for f in back:
            _parked.pop(f, None)
            unit = _units.get(id(f.__code__))
            if unit is not None:
                unit.add(f)  # refuses code that is not a unit's (someone else's)
        return True


def _place(code: CodeType) -> tuple[str, str, int]:
    """Where code comes from: the same for every compilation of one ``def``."""
    return (code.co_filename, code.co_qualname, code.co_firstlineno)


def _probe_copy_of(code: CodeType) -> FunctionType | None:
    """The suspended function whose current code tree (a probe's instrumented copy) holds
    ``code``, or None."""
    for func, (root, _) in _held.items():
        current = func.__code__
        if current is not root and any(c is code for c in _tree(current)):
            return func
    return None


# --- hooks from the marker core -----------------------------------------------------------------


def _kind_of(code: CodeType) -> str:
    """Why code of this shape is never patched, or ""."""
    if code.co_name == "<module>":
        return "module level"
    if code.co_name == "<lambda>":
        return "lambda"
    if not code.co_flags & _CO_OPTIMIZED:
        return "class body or exec'd code"
    if finder.source_statements(code.co_filename, None) is None:
        return "exec'd code (no source)"
    return ""


def _on_unpatched_run(marker: Any) -> None:
    """An inactive marker fired through the plain call path: patch the caller if possible.

    Called by the marker's armed probe tuple: the frames above are the probe, the firing
    function, then the site (or ``tracemark.mark`` and then the site).
    """
    core = registry.core_of(marker)
    if core is None:
        return
    try:
        frame = sys._getframe(3)
        if frame.f_code is _MARK_CODE and frame.f_back is not None:
            frame = frame.f_back
        with registry._lock:
            if not _learn(core, frame):
                idle = _idle[core] = _idle.get(core, 0) + 1
                if idle >= HOOK_BUDGET:
                    set_armed(core, False)
    except Exception as exc:  # tracing never breaks the traced program
        with registry._lock:
            set_armed(core, False)
        faults.report("patch-error", core.name, f"tracemark could not patch a site: {exc!r}")


def _learn(core: Any, frame: Any) -> bool:
    """Handle one unpatched run; True if something new was learnt (or patched).

    Never searches the heap: function objects are found from the module and from the frames
    around the site (:func:`_near`), see the module docstring.
    """
    code = frame.f_code
    line = frame.f_lineno
    if _internal(code.co_filename):
        return False
    if (id(code), line) in _unpatchable:
        tries = _unfound.get(id(code))
        if tries is None or tries >= NEAR_TRIES or _refusal():
            return False
        _unfound[id(code)] = tries + 1  # not found before: a later caller may hold it
        for func in _near(frame, code):
            _take(func)
        return _units.get(id(code)) is not None  # _analyse forgot the site if so
    if _held:
        owner = _probe_copy_of(code)
        if owner is not None:
            # A dynamic probe's copy of a suspended function: never patch it; analyse the
            # original, so that markers() lists its sites as suspended.
            _analyse(owner)
            return False
    unit = _units.get(id(code))
    if unit is None and id(code) in _no_sites and (id(code), core) not in _retried:
        # Analysed before, when this statement's ``tracemark.mark`` name was not declared
        # yet: look again, once per marker.
        _retried.add((id(code), core))
        del _no_sites[id(code)]
    if unit is None and id(code) not in _no_sites:
        why = _kind_of(code)
        if not why:
            module = sys.modules.get(frame.f_globals.get("__name__", ""))
            if isinstance(module, ModuleType) and vars(module) is frame.f_globals:
                for func in _functions_of(module, set()):
                    _take(func)
            unit = _units.get(id(code))
            if unit is None and id(code) not in _no_sites:
                for func in _near(frame, code):
                    _take(func)
            elif unit is not None and all(o is not code for o in unit.funcs.values()):
                # Its parent's tree was analysed: the function object running it (a closure
                # made before patching) is not one the module holds.
                _searched.add(id(code))
                for func in _near(frame, code):
                    unit.add(func)
            unit = _units.get(id(code))
            if unit is not None:
                return True
            if _place(code) in _places:
                # Another compilation of code we know: a dynamic probe's instrumented copy
                # still running in a frame that started before the probe was removed.
                return False
            why = NOT_FOUND
            _unfound[id(code)] = 1
        _note_unpatchable(core, code, line, why)
        return True
    if unit is None:
        # Analysed, no statement found at this line: a form the finder does not know.
        _note_unpatchable(core, code, line, "not a marker statement the patcher recognises")
        return True
    if core not in unit.cores and not unit.refused:
        # A statement the analysis could not resolve then (``tracemark.mark`` of a name
        # declared only now): analyse the function again.
        return _reanalyse(unit)
    if unit.refused or unit.origin.get(id(code)) is not code:
        return False  # refused, or a variant in which this site is kept on purpose
    # Original code still running: a function object made before the parent was patched, or a
    # copy of the function, or a frame that started before patching. Look for the functions
    # holding this code near the site, once per switch.
    if id(code) in _searched:
        return False
    _searched.add(id(code))
    learnt = False
    for func in _near(frame, code):
        learnt = unit.add(func) or learnt
    return learnt


#: How many frames :func:`_near` reads (the site's own, then its callers), and how many values
#: it looks at in all: what bounds the lazy hook's search for a function object.
_NEAR_FRAMES = 4
_NEAR_VALUES = 512
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type()
# Read a class's own __mro__, __dict__ and __flags__ without looking them up on it (a metaclass
# could define any of them as a property: no user code runs here).
_mro_of = type.__dict__["__mro__"].__get__
_dict_of = type.__dict__["__dict__"].__get__
_flags_of = type.__dict__["__flags__"].__get__


def _near(frame: Any, code: CodeType) -> list[FunctionType]:
    """Function objects running ``code`` found near ``frame`` without searching the heap.

    Looks at the values of the locals (closure variables included) of ``frame`` and of its
    callers (:data:`_NEAR_FRAMES`), and from each value: a function (its ``__wrapped__`` and
    its closure cells), a bound, static or class method, a property, a
    ``functools.partial``, an instance's or a class's methods (classes made in Python only),
    and, for values read from a frame, the items of a list, tuple or dict. At most
    :data:`_NEAR_VALUES` values are looked at. Types are tested exactly (``type(v) is``), never
    with ``isinstance``, which reads ``__class__`` and could run a proxy's code.
    """
    work: list[tuple[Any, bool]] = []
    f = frame
    for _ in range(_NEAR_FRAMES):
        if f is None:
            break
        try:
            values = list(f.f_locals.values())  # 3.13: a read-only use of the proxy
        except Exception:  # a frame we cannot read is skipped
            values = []
        work.extend((v, True) for v in reversed(values))
        f = f.f_back
    work.reverse()  # the site's own frame first
    found: list[FunctionType] = []
    seen: set[int] = set()
    budget = _NEAR_VALUES
    while work and budget:
        value, from_frame = work.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        budget -= 1
        kind = type(value)
        more: list[Any] = []
        if kind is FunctionType:
            if value.__code__ is code:
                found.append(value)
            more.append(value.__dict__.get("__wrapped__"))
            for cell in value.__closure__ or ():
                try:
                    more.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
        elif kind in (MethodType, staticmethod, classmethod):
            more.append(value.__func__)
        elif kind is property:
            more += [value.fget, value.fset, value.fdel]
        elif kind is functools.partial:
            more.append(value.func)
        elif from_frame and kind in (list, tuple):
            more += value[:64]
        elif from_frame and kind is dict:
            more += list(value.values())[:64]
        elif issubclass(kind, type):
            for c in _mro_of(value):
                if _flags_of(c) & _HEAPTYPE:
                    more += _dict_of(c).values()
        elif from_frame and _flags_of(kind) & _HEAPTYPE:
            more.append(kind)  # an instance (``self``): its class's methods
        work.extend((v, False) for v in reversed(more) if v is not None)
    return found


def _reanalyse(unit: Unit) -> bool:
    funcs = list(unit.funcs)
    for func in funcs:
        _assign(func, unit.origin[id(func.__code__)])
    for cid in [cid for cid, u in _units.items() if u is unit]:
        del _units[cid]
    for units in _by_core.values():
        if unit in units:
            units.remove(unit)
    for func in funcs:
        _take(func)
    return True


def set_armed(core: Any, armed: bool) -> None:
    """Arm (or disarm) ``core``'s firing function to call the lazy hook while it has no probe.

    Call under ``registry._lock``: the registry publishes probe tuples under it too.
    """
    ns = core.namespace
    if armed and not core.connections and dispatch.lazy_hook is not None:
        ns["_probes"] = dispatch.ARMED
    elif not armed and ns["_probes"] is dispatch.ARMED:
        ns["_probes"] = ()


def _internal(filename: str) -> bool:
    """tracemark's own code (generated emitters, the probe mechanisms) is not a marker site;
    the bundled demo is a program like any other."""
    if filename.startswith("<tracemark"):
        return True
    return filename.startswith(_PACKAGE_DIR) and not filename.startswith(_DEMO_DIR)


def _note_unpatchable(core: Any, code: CodeType, line: int, why: str) -> None:
    reason = _refusal() or why
    site = Site(core.name, f"{code.co_filename}:{line}", code.co_qualname, False, reason)
    _unpatchable[id(code), line] = (code, site)


def _on_switch(core: Any, active: bool) -> None:
    """Registry listener (called under its lock): install the right variants for ``core``."""
    _searched.clear()
    units = [u for u in _by_core.get(core, ()) if not u.refused]
    nested = [u for u in units if u.nested]
    if nested:
        # Function objects made from nested code (closures) since the last switch run the
        # variant their parent's constants held then: find them all, in one pass over the heap
        # (per switch, not per site; the run path never searches: see the module docstring).
        codes = {id(c): c for u in nested for c in u._all_codes()}
        for obj in gc.get_referrers(*codes.values()):
            if isinstance(obj, FunctionType):
                unit = _units.get(id(obj.__code__))
                if unit is not None and any(unit is u for u in nested):
                    unit.add(obj)
    for unit in units:
        unit.install()
    if not active and dispatch.lazy_hook is not None:
        _idle.pop(core, None)
        set_armed(core, True)  # the registry has just published an empty probe tuple


def _on_forget(core: Any) -> None:
    """Registry forget-listener (under its lock): drop what is kept for a forgotten marker
    and never run the lazy hook for it again (nothing will connect to it)."""
    set_armed(core, False)
    _by_core.pop(core, None)
    _idle.pop(core, None)
    for key in [k for k in _retried if k[1] is core]:
        _retried.discard(key)
    for key in [k for k, (_, site) in _unpatchable.items() if site.marker == core.name]:
        del _unpatchable[key]


def _report(core: Any) -> tuple[Site, ...]:
    sites = [s for unit in _by_core.get(core, ()) for s in unit.sites(core)]
    sites += [site for _, site in _unpatchable.values() if site.marker == core.name]
    return tuple(sites)


_MARK_CODE: CodeType | None = None
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_DEMO_DIR = os.path.join(_PACKAGE_DIR, "demo") + os.sep


def install() -> None:
    """Connect the patcher to the marker core (once, at import of :mod:`tracemark`)."""
    global _MARK_CODE
    import tracemark

    _MARK_CODE = tracemark.mark.__code__
    with registry._lock:
        if dispatch.lazy_hook is _on_unpatched_run:
            return
        dispatch.lazy_hook = _on_unpatched_run
        registry.add_listener(_on_switch)
        registry.add_forget_listener(_on_forget)
        registry.add_site_reporter(_report)
        for core in registry.iter_cores():
            set_armed(core, True)
