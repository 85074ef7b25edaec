"""The recompiling mechanism: an instrumented copy of the function, compiled anew from its source.

The mechanism of Python 3.11 (no ``sys.monitoring``), and available on every version
(``TRACEMARK_PROBES=recompile``). Martin Bligh's idea in the seed thread: copy the function,
instrument the copy, reroute all calls -- here the copy is "compiled anew from original
sources" and calls are rerouted by assigning ``func.__code__``, one reference store.

How
---
The module's source file is parsed, the probed function's ``def`` is found by qualified name
and first line, probe calls are added to its syntax tree, and the *whole module* is compiled
again (so closures, ``super()``'s ``__class__`` cell, name mangling and ``from __future__``
behave exactly as at import). From the result only the code object of the owning function
is taken; each hook is a constant placed in ``co_consts``, so the copy has the same names,
locals and free variables as the original and touches no global.

* ``entry``: a hook call before the first statement (after the docstring). For generators
  and coroutines that is the first resume: once per call.
* ``return``: ``return X`` becomes ``return hook(X)``; a hook call is added where the body
  falls off its end.
* ``raise``: the body (after the docstring and the entry hook) is wrapped in
  ``try: ... except BaseException: hook(); raise`` -- a bare re-raise, so the traceback is
  the original one.
* ``line``: a hook call before the statement that starts on (or contains) the line.
* ``span`` (``@span`` on a function): the begin hook with the arguments, like ``entry``, then
  the body wrapped in ``try: ... except BaseException: note(); raise ... finally: end()``,
  so the end fires however the call ends (return, raise, a generator closed), and an
  exception leaving it is noted for the end marker's tracers while it fires
  (:func:`tracemark.markers.span.ending_exception`; re-raised as the raise probe's handler
  does). Several spans nest: the first begun ends last.

Added statements carry the line number of the ``def`` line (already "executed" for coverage
tools when the function was defined); every original statement keeps its own line, so
tracebacks, ``inspect`` and coverage see the function as written.

Guarantees
----------
* **Exactly the original on removal**: when the last probe of a function is disabled its
  ``__code__`` is set back to the very code object that was there before.
* **Verified source**: before instrumenting, the unmodified source is compiled too and must
  give a code object equal to the function's own; otherwise (source edited since import,
  code built some other way, or ``__code__`` already rewritten by something else such as a
  debugger or a mock) the probe is refused with a message that says so. The marker
  patcher's variants are not in the way: :func:`tracemark.probe` suspends patching of the
  function first, which puts its original code back (see :mod:`tracemark.probes`).
* **Refuses to fight over ``__code__``**: the function's ``__code__`` must be the one this
  mechanism last set; a function rewritten by someone else in between is left alone and the
  fault reported.

Limits
------
* Needs the source (``linecache``): functions from ``exec`` strings, lambdas, code in
  ``.pyc``-only installs cannot be probed this way.
* Function objects created *before* the probe from a nested ``def`` keep the code they were
  made with; calls of the outer function afterwards make probed ones.
* A ``line`` probe on a ``for``/``while`` header fires once when the loop statement starts
  (``sys.monitoring`` fires on every iteration); on an ``except``/``else`` line it fires before
  the whole compound statement.
* ``return`` inside ``try``/``finally`` reports before the ``finally`` block runs.
"""

from __future__ import annotations
import __future__

import ast
import bisect
import linecache
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import faults
from .._forksafe import fork_safe_rlock
from ..markers import span as _span_module
from .events import Probe
from .targets import ProbeError

__all__ = ["NAME", "Recompile"]

NAME = "recompile"


@dataclass
class _Owned:
    """One function whose ``__code__`` this mechanism rewrites, and the probes in it."""

    func: types.FunctionType
    original: types.CodeType
    current: types.CodeType
    probes: list[Probe] = field(default_factory=list)


class Recompile:
    """Probes served by swapping in an instrumented copy of the function's code."""

    name = NAME

    def __init__(self) -> None:
        self._lock = fork_safe_rlock()
        self._owned: dict[types.FunctionType, _Owned] = {}

    # --- what the registry asks ----------------------------------------------------------------

    def check(self, probe: Probe) -> None:
        """Build (but do not install) the copy this probe would need: every error is here."""
        func = probe.target.owner
        if func is None:
            raise ProbeError(f"cannot probe {probe.target.spec!r}: no function owns its code")
        with self._lock:
            owned = self._owned.get(func)
            expected = owned.current if owned else func.__code__
            if func.__code__ is not expected:
                raise ProbeError(_taken(probe, func))
            original = owned.original if owned else func.__code__
            enabled = owned.probes if owned else []
            build(func, original, [*enabled, probe], probe.target.spec, trial=probe)

    def install(self, probe: Probe) -> None:
        pass

    def abandon(self) -> None:
        pass

    def serves(self, code: types.CodeType) -> int:
        """How many enabled probes the swapped-in copy has on ``code`` (for tests)."""
        with self._lock:
            return sum(p.code is code for o in self._owned.values() for p in o.probes)

    def remove(self, probe: Probe) -> None:
        pass

    def enable(self, probe: Probe) -> None:
        self._change(probe, add=True)

    def disable(self, probe: Probe) -> None:
        self._change(probe, add=False)
        probe.forget_frames()

    def _change(self, probe: Probe, add: bool) -> None:
        func = probe.target.owner
        assert func is not None
        with self._lock:
            owned = self._owned.get(func)
            if owned is None:
                owned = _Owned(func, func.__code__, func.__code__)
            if func.__code__ is not owned.current:
                faults.report("probe-code-taken", probe.name, _taken(probe, func))
                if not add and probe in owned.probes:
                    owned.probes.remove(probe)
                if not owned.probes:  # theirs now: forget ours
                    self._owned.pop(func, None)
                return
            probes = [*owned.probes, probe] if add else [p for p in owned.probes if p is not probe]
            if probes:
                code = build(func, owned.original, probes, probe.target.spec)
            else:
                code = owned.original
            func.__code__ = code  # the switch-over: one reference store
            owned.current, owned.probes = code, probes
            if probes:
                self._owned[func] = owned
            else:
                self._owned.pop(func, None)


def _taken(probe: Probe, func: types.FunctionType) -> str:
    return (
        f"cannot probe {probe.target.spec!r}: {func.__qualname__}.__code__ was replaced by "
        "something else (the marker patcher, a debugger, a mock?); tracemark will not "
        "overwrite it"
    )


# --- building the instrumented copy ---------------------------------------------------------------


def _source(func: types.FunctionType, spec: str) -> tuple[str, list[str]]:
    filename = func.__code__.co_filename
    module = sys.modules.get(func.__module__)
    lines = linecache.getlines(filename, getattr(module, "__dict__", None))
    if not lines:
        raise ProbeError(
            f"cannot probe {spec!r} with the {NAME} mechanism: the source of "
            f"{func.__qualname__} ({filename}) is not available"
        )
    return filename, lines


@dataclass
class _Stmt:
    """One statement of a module or class body: its lines, and for a class its own body."""

    first: int  # first line, decorators included
    last: int
    col: int
    cls: str | None = None  # the class name, for a ``class`` statement
    body: list[_Stmt] = field(default_factory=list)  # a class's statements


@dataclass
class _File:
    """One source file's layout, parsed once per version of the file."""

    lines: list[str]  # linecache's list: another list means the file was read again
    body: list[_Stmt]  # its module-level statements
    flags: int  # the compiler flags of its ``from __future__`` imports
    imports: str  # ``import a, b`` naming every module-level name an import binds, or ""


#: Layouts of the last few files probed (parsing a big module is the costly part).
_files: dict[str, _File] = {}
_MAX_FILES = 16
#: Original code objects recently found equal to what their source compiles to:
#: id -> (the code, the lines checked, the text to recompile, its flags). Bounded.
_verified: dict[int, tuple[types.CodeType, list[str], tuple[str, int, int], int]] = {}
_MAX_VERIFIED = 64


def _stmts(nodes: list[ast.stmt]) -> list[_Stmt]:
    out = []
    for node in nodes:
        decorators = getattr(node, "decorator_list", ())
        first = min([node.lineno] + [d.lineno for d in decorators])
        stmt = _Stmt(first, node.end_lineno or node.lineno, node.col_offset)
        if isinstance(node, ast.ClassDef):
            stmt.cls, stmt.body = node.name, _stmts(node.body)
        out.append(stmt)
    return out


def _layout(filename: str, lines: list[str], spec: str) -> _File:
    found = _files.get(filename)
    if found is not None and found.lines is lines:
        return found
    try:
        tree = ast.parse("".join(lines), filename)
    except SyntaxError as exc:
        raise ProbeError(f"cannot probe {spec!r}: its source does not compile: {exc}") from None
    flags = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                feature = getattr(__future__, alias.name, None)
                flags |= getattr(feature, "compiler_flag", 0)
    # 3.11+: ``name.attr()`` compiles differently when the module binds ``name`` by an import
    # (the compiler's is_import_originated), so the module's imported names come along.
    names = sorted(_imported(tree.body))
    imports = f"import {', '.join(names)}\n" if names else ""
    if len(_files) >= _MAX_FILES:
        del _files[next(iter(_files))]
    found = _files[filename] = _File(lines, _stmts(tree.body), flags, imports)
    return found


def _imported(nodes: list[ast.stmt]) -> set[str]:
    """Names bound by ``import`` at module level (inside ``if``/``try``/``with`` too)."""
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    out.add(alias.asname or alias.name.split(".")[0])
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for name in _BLOCKS:
                block = getattr(node, name, None)
                if isinstance(block, list):
                    out |= _imported([n for n in block if isinstance(n, ast.stmt)])
            for handler in getattr(node, "handlers", ()):
                out |= _imported(handler.body)
    return out


def _holding(body: list[_Stmt], line: int) -> _Stmt | None:
    i = bisect.bisect_right([s.first for s in body], line) - 1
    return body[i] if i >= 0 and line <= body[i].last else None


def _candidates(layout: _File, line: int) -> list[tuple[str, int, int]]:
    """Sources to recompile the ``def`` starting at ``line`` from, smallest first, as
    ``(head, first, last)``: head lines, then lines ``first..last`` of the file at their own
    line numbers (:func:`_text` pads with blank lines):

    1. the statement holding the ``def`` inside its classes, the classes reduced to their
       ``class NAME:`` headers (a method's code depends on its class only through the name,
       for mangling, and on its own body for the ``__class__`` cell);
    2. the module-level statement holding it, whole;
    3. the whole module, as ``import`` compiled it.

    1 and 2 start with one line ``import ...`` of the names the module binds by import (see
    :func:`_layout`); such a candidate is left out when there is no room for it.
    """
    lines = layout.lines
    out = []
    top = _holding(layout.body, line)
    if top is not None:
        head = [layout.imports] if layout.imports else []
        stmt = top
        while stmt.cls is not None:
            inner = _holding(stmt.body, line)
            if inner is None:
                break
            head.append(" " * stmt.col + f"class {stmt.cls}:\n")
            stmt = inner
        for first, last in ((stmt.first, stmt.last), (top.first, top.last)):
            if len(head) < first and (first, last) != (1, len(lines)):
                out.append(("".join(head), first, last))
            head = head[:1] if layout.imports else []  # the whole statement: no headers
    out.append(("", 1, len(lines)))
    return list(dict.fromkeys(out))


def _text(lines: list[str], candidate: tuple[str, int, int]) -> str:
    """A candidate's source: its head lines, blank lines, then its statement at its lines."""
    head, first, last = candidate
    pad = "\n" * (first - 1 - head.count("\n"))
    return head + pad + "".join(lines[first - 1 : last])


def _parse(text: str, filename: str, spec: str) -> ast.Module:
    try:
        return ast.parse(text, filename)
    except SyntaxError as exc:
        raise ProbeError(f"cannot probe {spec!r}: its source does not compile: {exc}") from None


def _segment(func: types.FunctionType, original: types.CodeType, spec: str) -> tuple[str, str, int]:
    """The file name, the source to recompile ``original`` from and its compiler flags: the
    smallest of :func:`_candidates` that compiles to exactly ``original`` (checked once and
    remembered). Compiling the least source that gives the same code makes the cost of a
    probe independent of the size of the module and of the class around the function.
    """
    filename, lines = _source(func, spec)
    done = _verified.get(id(original))
    if done is not None and done[0] is original and done[1] is lines:
        return filename, _text(lines, done[2]), done[3]
    layout = _layout(filename, lines, spec)
    for candidate in _candidates(layout, original.co_firstlineno):
        text = _text(lines, candidate)
        try:
            plain = _compile(ast.parse(text, filename), filename, layout.flags)
        except SyntaxError:
            continue
        found = _find_code(plain, original.co_qualname, original.co_firstlineno)
        if found is not None and found == original:
            if len(_verified) >= _MAX_VERIFIED:
                del _verified[next(iter(_verified))]
            _verified[id(original)] = (original, lines, candidate, layout.flags)
            return filename, text, layout.flags
    raise ProbeError(
        f"cannot probe {spec!r} with the {NAME} mechanism: {func.__qualname__}'s code is not "
        f"what its source file {filename} compiles to now (the file changed since import, "
        "or the code was made or rewritten some other way)"
    )


def _defs(tree: ast.AST) -> dict[tuple[str, int], ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every ``def`` by (qualified name, first line as in ``co_firstlineno``)."""
    found: dict[tuple[str, int], Any] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qual = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found[qual, first] = child
                visit(child, qual + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.Lambda):
                visit(child, prefix + "<lambda>.<locals>.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _find_code(code: types.CodeType, qualname: str, first: int) -> types.CodeType | None:
    if code.co_qualname == qualname and code.co_firstlineno == first:
        return code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found = _find_code(const, qualname, first)
            if found is not None:
                return found
    return None


def _compile(tree: ast.Module, filename: str, flags: int = 0) -> types.CodeType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'str' object is not callable": our placeholders
        return compile(tree, filename, "exec", flags=flags, dont_inherit=True, optimize=-1)


def build(
    func: types.FunctionType,
    original: types.CodeType,
    probes: list[Probe],
    spec: str,
    trial: Probe | None = None,
) -> types.CodeType:
    """The instrumented copy of ``original`` (the code of ``func``) serving ``probes``.

    ``trial``: a probe whose marker is not declared yet (a check before installing); its
    hooks are stand-ins, and the result is thrown away.
    """
    filename, text, flags = _segment(func, original, spec)
    tree = _parse(text, filename, spec)
    defs = _defs(tree)
    hooks: dict[str, object] = {}
    by_code: dict[types.CodeType, list[Probe]] = {}
    for p in probes:
        by_code.setdefault(p.code, []).append(p)
    for code, group in by_code.items():
        node = defs.get((code.co_qualname, code.co_firstlineno))
        if node is None:
            raise ProbeError(
                f"cannot probe {spec!r} with the {NAME} mechanism: no 'def' for "
                f"{code.co_qualname} at line {code.co_firstlineno} of {filename}"
            )
        _Instrumenter(node, group, hooks, trial).run()
    compiled = _compile(tree, filename, flags)
    new = _find_code(compiled, original.co_qualname, original.co_firstlineno)
    if new is None:  # pragma: no cover - the plain compile above found it
        raise ProbeError(f"cannot probe {spec!r}: lost {original.co_qualname} when recompiling")
    return _replace_consts(new, hooks)


def _replace_consts(code: types.CodeType, hooks: dict[str, object]) -> types.CodeType:
    consts = []
    changed = False
    for const in code.co_consts:
        if type(const) is str and const in hooks:
            const, changed = hooks[const], True
        elif isinstance(const, types.CodeType):
            new = _replace_consts(const, hooks)
            changed |= new is not const
            const = new
        consts.append(const)
    return code.replace(co_consts=tuple(consts)) if changed else code


# --- the hooks ---------------------------------------------------------------------------------


def _stand_in(*args: object) -> None:
    """The hook of a probe being checked before its marker exists (never called)."""


def _framed(emit: Callable[..., object]) -> Callable[[], None]:
    """A hook taking no arguments that hands the probed frame to ``emit``."""
    getframe = sys._getframe

    def hook() -> None:
        emit(getframe(1))

    return hook


def _return_hook(emit: Callable[..., object]) -> Callable[[object], object]:
    getframe = sys._getframe

    def returned(value: object) -> object:
        emit(getframe(1), value)
        return value

    return returned


def _raise_hook(probes: tuple[Probe, ...]) -> Callable[[], None]:
    getframe = sys._getframe
    exc_info = sys.exc_info

    def raised() -> None:
        frame = getframe(1)
        exc = exc_info()[1]
        for p in probes:
            p.on_raise(frame, exc)  # type: ignore[arg-type]

    return raised


def _note_ending() -> None:
    """In a span's handler: the exception leaving the call, for the end marker's tracers."""
    _span_module._ending.exc = sys.exc_info()[1]


def _span_end_hook(end: Callable[[], None]) -> Callable[[], None]:
    ending = _span_module._ending

    def end_span() -> None:
        try:
            end()
        finally:
            ending.exc = None

    return end_span


class _Instrumenter:
    """Adds the hook calls of ``probes`` (all on one code object) to one ``def``."""

    def __init__(
        self, node: Any, probes: list[Probe], hooks: dict[str, object], trial: Probe | None
    ) -> None:
        self.node = node
        self.probes = probes
        self.hooks = hooks
        self.trial = trial
        self.async_gen = isinstance(node, ast.AsyncFunctionDef) and _yields(node)

    def _const(self, obj: object, at: Any = None) -> ast.Constant:
        # Unique within one build (the instrumenters of a build share ``hooks``), never a
        # constant of real code, and not an identifier: compiled code does not intern it.
        name = f"\0tracemark hook {len(self.hooks)}"
        self.hooks[name] = obj
        return self._at(ast.Constant(name), at)

    def _at(self, node: Any, at: Any = None) -> Any:
        """Place ``node`` on the line of ``at`` (a statement), else on the ``def`` line."""
        line = self.node.lineno if at is None else at.lineno
        node.lineno = node.end_lineno = line
        node.col_offset = node.end_col_offset = 0
        return node

    def _call(self, obj: object, *args: ast.expr, at: Any = None) -> ast.Call:
        return self._at(ast.Call(func=self._const(obj, at), args=list(args), keywords=[]), at)

    def _stmt(self, obj: object, at: Any = None) -> ast.Expr:
        return self._at(ast.Expr(self._call(obj, at=at)), at)

    def run(self) -> None:
        node, probes = self.node, self.probes
        body = list(node.body)
        doc = []
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            doc = [body.pop(0)]
        live = [p for p in probes if p is not self.trial]
        stand_in = self.trial is not None and self.trial in probes
        lines: dict[int, list[Probe]] = {}
        for p in probes:
            if p.at == "line":
                lines.setdefault(p.line, []).append(p)  # type: ignore[arg-type]
        for line, group in lines.items():
            emits = [p.emit_frame for p in group if p in live]
            hook = _stand_in if stand_in and len(emits) < len(group) else _framed_all(emits)
            body = _insert_at_line(body, line, lambda at, h=hook: self._stmt(h, at))
        for p in probes:
            if p.at != "return":
                continue
            hook = _return_hook(p.emit_return) if p in live else _stand_in
            body = _Returns(self, hook).rewrite(body)
            # Falling off the end: on the last statement's line, where the implicit
            # 'return None' is too, so no new line event appears.
            last = body[-1] if body else None
            none = self._at(ast.Constant(None), last)
            body.append(self._at(ast.Expr(self._call(hook, none, at=last)), last))
        head = []
        for p in probes:
            if p.at == "return":
                head.append(self._stmt(_framed(p.start) if p in live else _stand_in))
            elif p.at == "entry":
                if p is self.trial:
                    head.append(self._stmt(_stand_in))
                elif p.direct is not None:  # the values straight from the parameters
                    args = [self._at(ast.Name(n, ast.Load())) for n in p.direct]
                    head.append(self._at(ast.Expr(self._call(p.emit_args, *args))))
                else:
                    head.append(self._stmt(_framed(p.emit_frame)))
        raising = tuple(p for p in probes if p.at == "raise")
        if raising:  # (on_raise is a plain method: fine for a trial probe too)
            handler = ast.ExceptHandler(
                type=self._const(BaseException),
                name=None,
                body=[self._stmt(_raise_hook(raising)), self._at(ast.Raise(exc=None, cause=None))],
            )
            body = [
                self._at(
                    ast.Try(
                        body=body or [self._at(ast.Pass())],
                        handlers=[self._at(handler)],
                        orelse=[],
                        finalbody=[],
                    )
                )
            ]
        # The first decorated (innermost decorator) is wrapped first: it ends first and
        # begins last.
        spans = sorted((p for p in probes if p.at == "span"), key=lambda p: p.order)
        for p in spans:
            handlers = []
            if p in live:
                # An exception leaving the call is noted (and re-raised, as the raise probe's
                # handler does) so that the end marker's tracers can tell the span failed
                # (markers.span.ending_exception); the end clears the note.
                end = _span_end_hook(p.end_now)
                mark = ast.ExceptHandler(
                    type=self._const(BaseException),
                    name=None,
                    body=[self._stmt(_note_ending), self._at(ast.Raise(exc=None, cause=None))],
                )
                handlers.append(self._at(mark))
            else:
                end = _stand_in
            body = [
                self._at(
                    ast.Try(
                        body=body or [self._at(ast.Pass())],
                        handlers=handlers,
                        orelse=[],
                        finalbody=[self._stmt(end)],
                    )
                )
            ]
        for p in reversed(spans):
            if p is self.trial:
                head.append(self._stmt(_stand_in))
            else:
                args = [self._at(ast.Name(n, ast.Load())) for n in p.direct]  # type: ignore[union-attr]
                head.append(self._at(ast.Expr(self._call(p.emit_args, *args))))
        node.body = doc + head + (body or [self._at(ast.Pass())])


def _framed_all(emits: list[Callable[..., object]]) -> Callable[[], None]:
    if len(emits) == 1:
        return _framed(emits[0])
    getframe = sys._getframe

    def hook() -> None:
        frame = getframe(1)
        for emit in emits:
            emit(frame)

    return hook


def _yields(node: ast.AST) -> bool:
    return any(isinstance(child, ast.Yield | ast.YieldFrom) for child in _own_nodes(node))


def _own_nodes(node: ast.AST):
    """The nodes inside a function that belong to it (not to nested functions or classes)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        yield child
        yield from _own_nodes(child)


_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _insert_at_line(body: list[Any], line: int, make: Callable[[Any], ast.stmt]) -> list[Any]:
    """Insert ``make(stmt)`` before the innermost statement of ``body`` starting on or holding
    ``line`` (not looking inside nested functions or classes)."""
    out: list[Any] = []
    done = False
    for stmt in body:
        if not done and stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            done = True
            inner = False
            if stmt.lineno != line and not isinstance(
                stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                inner = _insert_inside(stmt, line, make)
            if not inner:
                out.append(make(stmt))
        out.append(stmt)
    return out


def _insert_inside(stmt: Any, line: int, make: Callable[[Any], ast.stmt]) -> bool:
    for name in _BLOCKS:
        block = getattr(stmt, name, None)
        if not block:
            continue
        for item in block:
            if isinstance(item, ast.ExceptHandler | ast.match_case):
                if _insert_inside(item, line, make):
                    return True
                continue
            if item.lineno <= line <= (item.end_lineno or item.lineno):
                block[:] = _insert_at_line(block, line, make)
                return True
    return False


class _Returns(ast.NodeTransformer):
    """``return X`` -> ``return hook(X)`` in one function's own body."""

    def __init__(self, owner: _Instrumenter, hook: Callable[[object], object]) -> None:
        self.owner = owner
        self.hook = hook

    def rewrite(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            new = self.visit(stmt)
            out.extend(new if isinstance(new, list) else [new])
        return out

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node  # a nested function's returns are its own

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_Return(self, node: ast.Return) -> Any:
        own = self.owner
        if node.value is None:
            if own.async_gen:  # 'return' with a value is a SyntaxError in async generators
                call = own._call(self.hook, own._at(ast.Constant(None), node), at=node)
                return [own._at(ast.Expr(call), node), node]
            node.value = ast.copy_location(ast.Constant(None), node)
        call = ast.Call(func=own._const(self.hook, node), args=[node.value], keywords=[])
        node.value = ast.copy_location(call, node.value)
        return node
