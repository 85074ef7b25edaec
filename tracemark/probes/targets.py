"""Targets: turning ``package.module:qualname`` or ``path/to/file.py:LINE`` (or ``:qualname``)
into a code object.

Guarantees
----------
* Resolution only reads: it never changes a function, a module or ``sys.modules`` (except
  that a module named by a target is imported, as ``import`` would).
* Every failure is a :class:`ProbeError` that says what was wrong and what would be right:
  a module that does not exist, a qualname that does not exist (with close names from
  :func:`difflib.get_close_matches`), a line without code (with the nearest lines that have
  code), a builtin or C function ("cannot probe a function without Python bytecode"),
  module-level code (it has already run), a capture that is not a local of the function.
* Decorated functions are probed at the function they wrap (``__wrapped__``, followed to the
  end); static and class methods and properties at their underlying function.
* Nested qualnames (``outer.<locals>.inner``) name the code object inside ``outer``'s code,
  so every function made from it later is probed too.
* The code named is always the function's *original* code
  (:func:`tracemark.patching.patcher.original_code`), never a variant the marker patcher
  installed: probes are served on the original, with patching suspended (see
  :mod:`tracemark.probes`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import keyword
import os
import re
import sys
import types
from dataclasses import dataclass, field

from ..patching.patcher import original_code

__all__ = ["ProbeError", "Target", "resolve"]


class ProbeError(ValueError):
    """A probe could not be installed; the message says why. Nothing was installed."""


@dataclass(frozen=True)
class Target:
    """What a probe points at, resolved."""

    #: How the user spelled it (``json:loads``), for messages.
    spec: str
    #: Dotted name of the module that holds the code (``json.decoder``).
    module: str
    #: The code object whose events the probe needs.
    code: types.CodeType
    #: The function object that owns ``code`` directly or through nested code objects (the
    #: one whose ``__code__`` the 3.11 mechanism swaps), or None.
    owner: types.FunctionType | None
    #: Name parts the default marker name is built from (``["JSONDecoder", "decode"]``).
    name_parts: tuple[str, ...]
    #: The source line of a line target, else None.
    line: int | None = None
    #: Parameter names, in order (what an entry probe captures by default).
    params: tuple[str, ...] = field(default=())

    @property
    def where(self) -> str:
        return f"{self.code.co_filename}:{self.line or self.code.co_firstlineno}"

    def local_names(self) -> tuple[str, ...]:
        code = self.code
        return code.co_varnames + code.co_cellvars + code.co_freevars


def resolve(spec: str, module: types.ModuleType | None = None) -> Target:
    """Resolve ``module:qualname``, ``module:LINE``, ``path/to/file.py:LINE`` or
    ``path/to/file.py:qualname``.

    ``module`` is the module the left side names, when the caller already has it (a deferred
    probe, installed while that module is being imported: importing it again by name would
    wait on its own import).
    """
    if not isinstance(spec, str):
        raise ProbeError(f"a probe target is a str like 'json:loads', not {spec!r}")
    left, sep, right = spec.rpartition(":")
    if not sep or not left or not right:
        raise ProbeError(
            f"bad probe target {spec!r}: write 'package.module:qualname' (like "
            "'json.decoder:JSONDecoder.decode') or 'path/to/file.py:LINE'"
        )
    if module is None:
        module = _module_for_file(left, spec) if looks_like_path(left) else _import(left, spec)
    if right.isdigit():
        return _line_target(spec, module, int(right))
    return _function_target(spec, module, right)


def looks_like_path(text: str) -> bool:
    """True when the left side of a target is a file (``app.py``, ``src/app``), not a module."""
    return text.endswith(".py") or os.sep in text or "/" in text


def _import(name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name != exc.name and not name.startswith(exc.name + "."):
            # the module exists but itself imports something missing
            raise ProbeError(f"cannot probe {spec!r}: importing {name!r} failed: {exc}") from exc
        raise ProbeError(f"cannot probe {spec!r}: there is no module named {name!r}") from None
    except ImportError as exc:
        raise ProbeError(f"cannot probe {spec!r}: importing {name!r} failed: {exc}") from exc


def _module_for_file(path: str, spec: str) -> types.ModuleType:
    """The loaded module whose file is ``path``, importing it by name if it is on sys.path."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise ProbeError(f"cannot probe {spec!r}: there is no file {path!r}")
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.realpath(file) == real:
            return module
    for entry in sys.path:
        base = os.path.realpath(entry or os.getcwd())
        if not real.startswith(base + os.sep):
            continue
        rel = os.path.splitext(os.path.relpath(real, base))[0].split(os.sep)
        if rel[-1] == "__init__":
            rel.pop()
        if rel and all(p.isidentifier() for p in rel):
            return _import(".".join(rel), spec)
    raise ProbeError(
        f"cannot probe {spec!r}: {path!r} is not an imported module and not importable from "
        "sys.path"
    )


# --- functions ---------------------------------------------------------------------------------


def _function_target(spec: str, module: types.ModuleType, qualname: str) -> Target:
    obj: object = module
    parts = qualname.split(".")
    done: list[str] = []
    code: types.CodeType | None = None
    owner: types.FunctionType | None = None
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "<locals>":
            if code is None or i + 1 >= len(parts):
                raise ProbeError(f"cannot probe {spec!r}: '<locals>' must follow a function")
            code = _nested_code(spec, code, parts[i + 1], ".".join(done))
            done += parts[i : i + 2]
            i += 2
            continue
        if code is not None:
            raise ProbeError(
                f"cannot probe {spec!r}: {'.'.join(done)!r} is a function; name a function "
                "defined inside it as 'outer.<locals>.inner'"
            )
        inside = obj.__dict__ if isinstance(obj, type | types.ModuleType) else {}
        if part in inside:
            value = inside[part]
        else:
            try:
                value = inspect.getattr_static(obj, part)
            except AttributeError:
                raise ProbeError(_missing(spec, module, obj, part, done)) from None
        done.append(part)
        func = _function_of(value)
        if func is not None:
            owner, code = func, original_code(func)  # never a marker patcher's variant
        elif isinstance(value, type | types.ModuleType):
            obj = value
        elif i == len(parts) - 1:
            raise ProbeError(_no_bytecode(spec, value))
        else:
            raise ProbeError(f"cannot probe {spec!r}: {'.'.join(done)!r} is {value!r}")
        i += 1
    if code is None:
        raise ProbeError(f"cannot probe {spec!r}: {qualname!r} is not a function or method")
    names = tuple(p.replace("<locals>", "locals") for p in parts)
    return Target(
        spec=spec,
        module=module.__name__,
        code=code,
        owner=owner,
        name_parts=names,
        params=_params(code),
    )


def _function_of(value: object) -> types.FunctionType | None:
    """The Python function behind ``value`` (unwrapping methods, properties, decorators)."""
    seen = 0
    while seen < 100:  # a __wrapped__ cycle must not hang us
        seen += 1
        if isinstance(value, staticmethod | classmethod | types.MethodType):
            value = value.__func__
        elif isinstance(value, property) and value.fget is not None:
            value = value.fget
        elif hasattr(value, "__wrapped__") and not isinstance(value, type):
            value = value.__wrapped__
        elif isinstance(value, types.FunctionType):
            return value
        else:
            return None
    return None


def _no_bytecode(spec: str, value: object) -> str:
    if callable(value):
        return (
            f"cannot probe {spec!r}: cannot probe a function without Python bytecode "
            f"({value!r} is a {type(value).__name__}, implemented in C)"
        )
    return f"cannot probe {spec!r}: it is {type(value).__name__} {value!r}, not a function"


def _missing(spec: str, module: types.ModuleType, obj: object, part: str, done: list[str]) -> str:
    where = ".".join(done) or module.__name__
    candidates = [n for n in dir(obj) if not n.startswith("__")]
    close = difflib.get_close_matches(part, candidates, n=4, cutoff=0.6)
    prefix = ".".join(done)
    hint = (
        "; did you mean " + ", ".join(repr(f"{prefix}.{c}" if prefix else c) for c in close) + "?"
        if close
        else ""
    )
    return f"cannot probe {spec!r}: {where!r} has no attribute {part!r}{hint}"


def _nested_code(spec: str, code: types.CodeType, name: str, outer: str) -> types.CodeType:
    inner = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    found = [c for c in inner if c.co_name == name]
    if len(found) == 1:
        return found[0]
    if found:
        raise ProbeError(
            f"cannot probe {spec!r}: {outer!r} defines {len(found)} functions called {name!r}; "
            "probe one by its line ('path/to/file.py:LINE')"
        )
    close = difflib.get_close_matches(name, [c.co_name for c in inner], n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ProbeError(f"cannot probe {spec!r}: {outer!r} defines no function {name!r}{hint}")


def _params(code: types.CodeType) -> tuple[str, ...]:
    """Parameter names in the order of the signature (``co_varnames`` puts ``*args`` after
    the keyword-only ones)."""
    names = code.co_varnames
    pos, kw = code.co_argcount, code.co_kwonlyargcount
    star = bool(code.co_flags & inspect.CO_VARARGS)
    out = list(names[:pos])
    if star:
        out.append(names[pos + kw])
    out += names[pos : pos + kw]
    if code.co_flags & inspect.CO_VARKEYWORDS:
        out.append(names[pos + kw + star])
    return tuple(out)


# --- lines -------------------------------------------------------------------------------------


def _all_code(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _all_code(const)


def _code_lines(code: types.CodeType) -> set[int]:
    """Lines where ``code`` itself (not nested code) has instructions, but its header line."""
    lines = {line for _, _, line in code.co_lines() if line is not None}
    lines.discard(code.co_firstlineno)
    return lines


def _functions_of(module: types.ModuleType):
    """Every Python function reachable from the module's namespace and its classes."""
    seen: set[int] = set()
    stack: list[object] = list(vars(module).values())
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, type) and value.__module__ == module.__name__:
            stack.extend(vars(value).values())
            continue
        func = _function_of(value)
        if func is not None and func.__module__ == module.__name__:
            yield func


def _line_target(spec: str, module: types.ModuleType, line: int) -> Target:
    filename = getattr(module, "__file__", None)
    if not filename:
        raise ProbeError(f"cannot probe {spec!r}: module {module.__name__!r} has no source file")
    real = os.path.realpath(filename)
    best: tuple[types.CodeType, types.FunctionType] | None = None
    lines_with_code: set[int] = set()
    for func in _functions_of(module):
        for code in _all_code(original_code(func)):
            if os.path.realpath(code.co_filename) != real:
                continue
            lines = _code_lines(code)
            lines_with_code |= lines
            if line in lines and (best is None or code.co_firstlineno > best[0].co_firstlineno):
                best = (code, func)  # the innermost function holding the line
    if best is None:
        raise ProbeError(_no_code_at(spec, line, lines_with_code))
    code, owner = best
    qual = tuple(p.replace("<locals>", "locals") for p in code.co_qualname.split("."))
    return Target(
        spec=spec,
        module=module.__name__,
        code=code,
        owner=owner,
        name_parts=(*qual, f"line{line}"),
        line=line,
        params=_params(code),
    )


def _no_code_at(spec: str, line: int, lines: set[int]) -> str:
    if not lines:
        return f"cannot probe {spec!r}: the file has no function with code to probe"
    before = max((n for n in lines if n < line), default=None)
    after = min((n for n in lines if n > line), default=None)
    near = " and ".join(str(n) for n in (before, after) if n is not None)
    return (
        f"cannot probe {spec!r}: line {line} has no code inside a function (module-level code "
        f"has already run); the nearest lines with code are {near}"
    )


# --- captures ----------------------------------------------------------------------------------

_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z")


def check_captures(target: Target, capture: object) -> tuple[str, ...]:
    """The capture list as a tuple of dotted paths whose first part is a local of the code."""
    if capture is None:
        return ()
    if isinstance(capture, str):
        capture = [c.strip() for c in capture.split(",") if c.strip()]
    try:
        paths = tuple(capture)  # type: ignore[arg-type]
    except TypeError:
        raise ProbeError(f"capture must be a list of names, not {capture!r}") from None
    local = target.local_names()
    for path in paths:
        if not isinstance(path, str) or not _PATH.match(path):
            raise ProbeError(f"capture {path!r} is not a name or a dotted path like 'req.url'")
        root = path.split(".", 1)[0]
        if root not in local:
            close = difflib.get_close_matches(root, local, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            names = ", ".join(local) or "none"
            raise ProbeError(
                f"cannot capture {path!r} in {target.spec!r}: {root!r} is not a local variable "
                f"of {target.code.co_qualname} (its locals: {names}){hint}"
            )
    if len(set(paths)) != len(paths):
        raise ProbeError(f"capture {paths!r} names something twice")
    return paths


def field_name(path: str) -> str:
    """A field name for a captured path: ``req.url`` -> ``req_url``, ``_x`` -> ``x``."""
    name = path.replace(".", "_").lstrip("_") or "value"
    if keyword.iskeyword(name):
        name += "_"
    return name
