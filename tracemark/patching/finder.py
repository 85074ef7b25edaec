"""Finding marker statements in a function, from its source.

A *marker statement* is an expression statement whose value is a call to a marker, written in
one of the forms the patcher understands:

* ``rx(...)`` where ``rx`` is a global name or a closure variable bound to a marker;
* ``mod.rx(...)`` (any dotted chain) where ``mod`` is a global or closure module;
* ``q.begin(...)`` and ``q.end()`` where ``q`` is a :class:`~tracemark.markers.span.Span`
  reached the same ways;
* ``tracemark.mark("a.b", ...)`` (``mark`` reached the same ways) with a literal name, once a
  marker of that name has been declared.

The statement is found in the function's source (``ast``), never by guessing at opcodes, and
mapped to bytecode by its exact source span (:func:`.bytecode.statement_spans`). Anything else
that is called is left alone.

Two more things are decided here, from the source:

* **Statements that must run even while inactive.** Arguments that bind a name (``:=``, also
  inside a comprehension, where it binds in the enclosing scope), or that ``yield``,
  ``yield from`` or ``await`` (they change the generator's or coroutine's protocol), are
  part of the program, not of the event: jumping over them would change what the function
  does (and code compiled after a ``:=`` reads the name with an unchecked load: a crash on
  3.12+). Such a statement is found (so ``tracemark.markers()`` lists it) with a
  :attr:`Statement.refusal`, and keeps the plain call path. Lambdas, generator expressions
  and comprehensions without these are fine: what they bind is their own scope's (a
  comprehension inlined by PEP 709 restores its iteration variable; the verifier still
  rejects a variant in which a later read could see a local only skipped code stores).
* **The guard.** The callee is resolved when the function is analysed, and the variant's
  jump is guarded so that the statement still runs if the name no longer refers to that
  object (:class:`.bytecode.Guard`): for ``rx(...)`` the global (or builtin) or closure
  variable ``rx`` itself; for ``mod.rx(...)``, ``q.begin(...)`` and ``tracemark.mark(...)``
  only the first name of the chain (``mod``, ``q``, ``tracemark``), not the attribute read
  from it (a span's attributes cannot change).
"""

from __future__ import annotations

import ast
import linecache
import sys
from collections.abc import Callable
from types import CodeType, FunctionType, ModuleType
from typing import Any

from .._frozen import frozen
from ..markers import registry
from ..markers.span import Span as SpanObject
from . import bytecode

__all__ = ["Statement", "find_statements", "source_statements"]

Span = tuple[int, int, int, int]


@frozen
class Statement:
    """One marker statement in one code object: every compiled copy of it."""

    core: Any  # registry.MarkerCore
    span: Span  # (line, end line, column, end column) in the source
    copies: tuple[tuple[int, int], ...]  # (start, end) offsets, one per compiled copy
    guard: bytecode.Guard | None = None  # what must still hold for the jump to be taken
    refusal: str = ""  # why the statement must never be jumped over ("" if it may be)

    def skips(self) -> list[bytecode.Skip]:
        return [bytecode.Skip(start, end, self.guard) for start, end in self.copies]


#: Reasons a statement keeps the plain call path whatever its marker's state.
BINDS = "arguments bind a name (:=)"
SUSPENDS = "arguments yield or await"


def refusal(call: ast.Call) -> str:
    """Why the arguments of ``call`` must run even while its marker is inactive, or "".

    A lambda's body is its own scope (a ``:=``, ``yield`` or ``await`` there is the lambda's),
    but its defaults are evaluated here. A comprehension or generator expression is walked
    whole: ``:=`` in it binds in the enclosing scope (PEP 572), and an ``await`` or
    ``async for`` in it awaits here, except in a generator expression, which becomes an
    async generator; it is refused all the same, to stay simple and safe.
    """
    binds = suspends = False
    work: list[ast.AST] = [*call.args, *(k.value for k in call.keywords)]
    while work:
        node = work.pop()
        if isinstance(node, ast.Lambda):
            work.extend(d for d in (*node.args.defaults, *node.args.kw_defaults) if d)
            continue
        if isinstance(node, ast.NamedExpr):
            binds = True
        elif isinstance(node, ast.Yield | ast.YieldFrom | ast.Await) or (
            isinstance(node, ast.comprehension) and node.is_async
        ):
            suspends = True
        work.extend(ast.iter_child_nodes(node))
    return BINDS if binds else SUSPENDS if suspends else ""


_cache: dict[str, tuple[tuple[str, ...], dict[Span, ast.Call]]] = {}


def source_statements(filename: str, module_globals: dict | None) -> dict[Span, ast.Call] | None:
    """Every ``f(...)`` expression statement of a source file, by span; None without source."""
    if not filename or filename.startswith("<"):
        return None
    lines = linecache.getlines(filename, module_globals)
    if not lines:
        return None
    key = tuple(lines)
    hit = _cache.get(filename)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        tree = ast.parse("".join(lines), filename)
    except (SyntaxError, ValueError):
        return None
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            span = (node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)
            found[span] = node.value  # type: ignore[index]
    _cache[filename] = (key, found)
    return found


_MISSING = object()


def _lookup(name: str, code: CodeType, func: FunctionType | None, globs: dict) -> Any:
    if name in code.co_freevars:
        if func is None or func.__closure__ is None:
            return _MISSING
        try:
            return func.__closure__[code.co_freevars.index(name)].cell_contents
        except ValueError:  # an empty cell
            return _MISSING
    if name in code.co_varnames or name in code.co_cellvars:
        return _MISSING  # a local: its value is only known while the function runs
    value = globs.get(name, _MISSING)
    if value is _MISSING:
        builtins = globs.get("__builtins__")
        if isinstance(builtins, ModuleType):
            builtins = vars(builtins)
        if isinstance(builtins, dict):
            value = builtins.get(name, _MISSING)
    return value


def _guard(node: ast.expr, code: CodeType, func: FunctionType | None, globs: dict) -> Any:
    """The guard of a callee expression: its first name must still be what it is now."""
    while isinstance(node, ast.Attribute):
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    value = _lookup(node.id, code, func, globs)
    if value is _MISSING:
        return None
    scope = "free" if node.id in code.co_freevars else "global"
    return bytecode.Guard(scope, node.id, value)


def _resolve(node: ast.expr, code: CodeType, func: FunctionType | None, globs: dict) -> Any:
    """The object an ``a.b.c`` expression names, without running user code: attributes are
    only read from modules (their ``__dict__``) and from spans (``q.begin``, ``q.end``:
    immutable), never through ``getattr``."""
    if isinstance(node, ast.Name):
        return _lookup(node.id, code, func, globs)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, code, func, globs)
        if isinstance(base, ModuleType):
            return vars(base).get(node.attr, _MISSING)
        if type(base) is SpanObject:
            found = base.attribute(node.attr)
            return _MISSING if found is None else found
    return _MISSING


def _inline_mark() -> Callable[..., None] | None:
    mod = sys.modules.get("tracemark")
    return getattr(mod, "mark", None)


def _marker_of(
    call: ast.Call, code: CodeType, func: FunctionType | None, globs: dict
) -> Any | None:
    target = _resolve(call.func, code, func, globs)
    if target is _MISSING:
        return None
    core = registry.core_of(target)
    if core is not None:
        return core
    if target is _inline_mark() and target is not None:
        first = call.args[0] if call.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return registry.lookup(first.value)
    return None


def find_statements(
    code: CodeType,
    func: FunctionType | None,
    globs: dict,
    statements: dict[Span, ast.Call],
) -> list[Statement]:
    """The marker statements compiled into ``code`` (not its nested code objects)."""
    instrs = bytecode.instructions(code)
    handlers = {e.target for e in bytecode.exception_table(code)}
    spans = {ins.position for ins in instrs if ins.opcode == bytecode.POP_TOP}
    out = []
    for span in spans:
        call = statements.get(span)  # type: ignore[arg-type]
        if call is None:
            continue
        core = _marker_of(call, code, func, globs)
        if core is None:
            continue
        why = refusal(call)
        # A refused statement is listed even when its copies cannot be found (an
        # ``async for`` comprehension ends through an exception edge): it is never jumped.
        copies = () if why else bytecode.statement_spans(instrs, span, handlers)
        if copies or why:
            guard = _guard(call.func, code, func, globs)
            out.append(Statement(core, span, tuple(copies), guard, why))  # type: ignore[arg-type]
    out.sort(key=lambda s: s.span)
    return out
