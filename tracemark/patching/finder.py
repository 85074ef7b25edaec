"""Finding marker statements in a function, from its source.

A *marker statement* is an expression statement whose value is a call to a marker, written in
one of the forms the patcher understands:

* ``rx(...)`` where ``rx`` is a global name or a closure variable bound to a marker;
* ``mod.rx(...)`` (any dotted chain) where ``mod`` is a global or closure module;
* ``tracemark.mark("a.b", ...)`` (``mark`` reached the same ways) with a literal name, once a
  marker of that name has been declared.

The statement is found in the function's source (``ast``), never by guessing at opcodes, and
mapped to bytecode by its exact source span (:func:`.bytecode.statement_spans`). The callee is
resolved when the function is analysed: a name later rebound to another object is not
followed (say so in the docs). Anything else that is called is left alone.
"""

from __future__ import annotations

import ast
import linecache
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FunctionType, ModuleType
from typing import Any

from ..markers import registry
from . import bytecode

__all__ = ["Statement", "find_statements", "source_statements"]

Span = tuple[int, int, int, int]


@dataclass(frozen=True)
class Statement:
    """One marker statement in one code object: every compiled copy of it."""

    core: Any  # registry.MarkerCore
    span: Span  # (line, end line, column, end column) in the source
    copies: tuple[tuple[int, int], ...]  # (start, end) offsets, one per compiled copy


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


def _resolve(node: ast.expr, code: CodeType, func: FunctionType | None, globs: dict) -> Any:
    """The object an ``a.b.c`` expression names, without running user code: attributes are
    only read from modules (their ``__dict__``), never through ``getattr``."""
    if isinstance(node, ast.Name):
        return _lookup(node.id, code, func, globs)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, code, func, globs)
        if isinstance(base, ModuleType):
            return vars(base).get(node.attr, _MISSING)
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
        copies = bytecode.statement_spans(instrs, span, handlers)
        if copies:
            out.append(Statement(core, span, tuple(copies)))  # type: ignore[arg-type]
    out.sort(key=lambda s: s.span)
    return out
