"""Checking a probe target without running anything: what ``tracemark record`` does before it
starts the program, so that a probe that cannot work fails there (exit 2), not in the program.

Guarantees
----------
* **Nothing of the probed code runs.** A module is *located*, never imported: the finders of
  :data:`sys.meta_path` are asked for its spec one dotted level at a time (a package's spec
  gives the directories of its submodules without running its ``__init__``), and its source
  is *compiled*, never executed. Only a module that is already imported (the stdlib the
  checking process uses) is taken from :data:`sys.modules`.
* **What is checked is what the probe will need**: the module exists; for ``module:qualname``
  a function of that qualified name is in the compiled source (``co_qualname``, so methods,
  nested ``outer.<locals>.inner`` and decorated functions are found); for ``:LINE`` a line
  with code inside a function; each captured name is a local of that function. Failures are
  :class:`~.targets.ProbeError` with close names (or the nearest lines with code), the very
  messages of a probe installed at run time.
* **What cannot be checked statically is accepted**, not refused: a name the module binds by
  ``import`` or assignment (``loads = _impl.loads``), a module after ``from x import *``, and
  modules without Python source (builtins, extensions): the run-time install still checks
  them, and a failure there is reported (:mod:`.deferred`).
* ``__main__`` is the program's own script: :func:`check` is told its file (``main=``), and
  rewrites ``__main__:X`` and a relative ``app.py:X`` to the absolute path of the file, so
  every process of the program (a ``multiprocessing`` spawn child runs the script as
  ``__mp_main__``) names the same file.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import os
import pkgutil
import sys
import types
from collections.abc import Sequence

from .targets import (
    ProbeError,
    Target,
    _all_code,
    _code_lines,
    _no_code_at,
    _params,
    check_captures,
    looks_like_path,
)

__all__ = ["check", "compiled", "locate", "top_level_name"]

MAIN = "__main__"
_CO_OPTIMIZED = 0x1  # inspect.CO_OPTIMIZED: set on function code, not on module or class bodies


def locate(name: str, search: Sequence[str] = ()) -> str:
    """The source file of module ``name`` without importing it ("" when it has none: a
    builtin or an extension). ``search`` goes before :data:`sys.path` for top-level names
    (the program's script directory). ProbeError when there is no such module."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        return _source_of(getattr(loaded, "__file__", None) or "")
    parts = name.split(".")
    locations: list[str] | None = [*search, *sys.path]
    spec = None
    for i in range(len(parts)):
        sub = ".".join(parts[: i + 1])
        parent = sys.modules.get(sub)
        if parent is not None and i < len(parts) - 1:
            locations = list(getattr(parent, "__path__", None) or [])
            if not locations:
                raise ProbeError(f"there is no module named {name!r} ({sub!r} is not a package)")
            continue
        spec = _find(sub, locations, top=i == 0)
        if spec is None:
            raise ProbeError(
                f"there is no module named {sub!r}"
                + _close_modules(parts[i], locations, ".".join(parts[:i]))
            )
        if i < len(parts) - 1:
            locations = list(spec.submodule_search_locations or [])
            if not locations:
                raise ProbeError(f"there is no module named {name!r} ({sub!r} is not a package)")
    assert spec is not None
    return _source_of(spec.origin if spec.has_location and spec.origin else "")


def _source_of(file: str) -> str:
    return file if file.endswith(".py") else ""


def _find(name: str, locations: list[str] | None, top: bool):
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(name, locations)
            else:
                spec = find(name, None if top else locations)
        except Exception:  # a third-party finder that fails: ask the next one
            continue
        if spec is not None:
            return spec
    return None


def _close_modules(part: str, locations: list[str] | None, parent: str) -> str:
    try:
        names = [m.name for m in pkgutil.iter_modules(locations or None)]
    except Exception:
        return ""
    close = difflib.get_close_matches(part, names, n=3, cutoff=0.7)
    close = [f"{parent}.{c}" if parent else c for c in close]
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def compiled(file: str) -> types.CodeType:
    """The code of ``file``'s source, compiled and not run; ProbeError if it cannot be."""
    try:
        with open(file, "rb") as f:
            source = f.read()
        return compile(source, file, "exec", dont_inherit=True)
    except OSError as exc:
        raise ProbeError(f"cannot read {file!r}: {exc.strerror or exc}") from None
    except (SyntaxError, ValueError) as exc:
        raise ProbeError(f"cannot compile {file!r}: {exc}") from None


def top_level_name(module_code: types.CodeType, qualname_or_line: str | int) -> str | None:
    """The module-level name (a ``def`` or ``class``) that must be bound before a probe on
    ``qualname_or_line`` can be installed in a module still running its top-level code."""
    if isinstance(qualname_or_line, str):
        return qualname_or_line.split(".", 1)[0]
    for code in module_code.co_consts:
        if isinstance(code, types.CodeType) and any(
            qualname_or_line in _code_lines(c) for c in _all_code(code)
        ):
            return code.co_name  # a function's name, or a class body's (the class name)
    return None


def check(
    target: str,
    capture: Sequence[str] | None = None,
    *,
    main: str | None = None,
    search: Sequence[str] = (),
) -> str:
    """Check ``target`` statically (see the module docstring); return it as the program's
    processes should get it: ``__main__`` and relative paths made the absolute file."""
    left, _, right = target.rpartition(":")
    if left == MAIN:
        if not main:
            raise ProbeError(
                f"cannot probe {target!r}: '__main__' is the program's own script, and this "
                "program is not a Python script or module tracemark can read"
            )
        file = main
        target = f"{main}:{right}"
    elif looks_like_path(left):
        file = os.path.abspath(left)
        if not os.path.isfile(file):
            raise ProbeError(f"cannot probe {target!r}: there is no file {left!r}")
        target = f"{file}:{right}"
    else:
        try:
            file = locate(left, search)
        except ProbeError as exc:
            raise ProbeError(f"cannot probe {target!r}: {exc}") from None
        if not file:
            return target  # no Python source to read: the run-time install checks it
    module_code = compiled(file)
    # Functions only: a class body is code too, but runs once and is not a function to probe.
    codes = [c for c in _all_code(module_code) if c.co_flags & _CO_OPTIMIZED]
    if right.isdigit():
        line = int(right)
        holding = [c for c in codes if line in _code_lines(c)]
        if not holding:
            lines: set[int] = set()
            for c in codes:
                lines |= _code_lines(c)
            raise ProbeError(_no_code_at(target, line, lines))
        code = max(holding, key=lambda c: c.co_firstlineno)  # the innermost function
    else:
        found = [c for c in codes if c.co_qualname == right]
        if not found:
            if _bound_otherwise(module_code, file, right):
                return target
            names = sorted({c.co_qualname for c in codes if c.co_name != "<lambda>"})
            close = difflib.get_close_matches(right, names, n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ProbeError(
                f"cannot probe {target!r}: {os.path.basename(file)} defines no function "
                f"{right!r}{hint}"
            )
        code = found[0]
    if capture:
        fake = Target(target, "", code, None, (), params=_params(code))
        check_captures(fake, list(capture))
    return target


def _bound_otherwise(module_code: types.CodeType, file: str, qualname: str) -> bool:
    """True when the first part of ``qualname`` is bound at module level by something other
    than a ``def``/``class`` (an import, an assignment), or the module star-imports: such a
    function exists only at run time."""
    first = qualname.split(".", 1)[0]
    try:
        with open(file, "rb") as f:
            tree = ast.parse(f.read(), file)
    except (OSError, SyntaxError, ValueError):
        return False
    for node in _module_level(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name).split(".")[0] == first:
                    return True
        elif isinstance(node, ast.Name) and node.id == first and isinstance(node.ctx, ast.Store):
            return True
    return False


def _module_level(tree: ast.AST):
    """The nodes of module-level code (inside ``if``/``try``/``with`` too, not in functions,
    classes or lambdas, whose names are not the module's)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda
            ):
                stack.append(child)
