"""``tracemark list [PATH|MODULE]...``: the markers a code base declares, found by reading its
source, and the call sites that do not fit them.

The Python counterpart of gcc checking a ``trace_mark`` format string at compile time: a
marker fired with the wrong arguments is, at run time, only a counted fault (tracing never
breaks the program), so this is where such a mistake becomes an error with a file and a line.

What is recognised (``tm`` standing for any name ``tracemark`` is imported as):

* declarations ``X = tm.marker("name", "fmt")``, ``X = tm.marker("name", a=int, ...)`` and
  the same with ``marker`` imported from tracemark;
* inline markers ``tm.mark("name", "fmt", values...)`` (a declaration and a call at once);
* spans ``Q = tm.span("name", ...)`` (fields as for a marker): the markers ``name.begin``
  (those fields) and ``name.end`` (none), with call sites ``Q.begin(...)``, ``Q.end()`` and
  ``Q(...)`` (``with Q(...):``, the begin's fields), and ``@Q`` on a function (a site of
  both, whose parameters must name the begin's fields);
* context fields ``f=tm.context(VAR, TYPE)``: fields of that type that callers do not pass
  (a span's end has them too);
* call sites ``X(...)`` of a declared marker bound to a module-level name ``X``: in its own
  module (unless a function scope rebinds ``X``), through ``from mod import X`` (relative
  imports too) and as ``mod.X(...)`` after ``import mod``, when ``mod`` is among the files
  read; and of a marker bound to a name inside a function, in that function.

Guarantees
----------
* Nothing is imported or executed: only :mod:`ast` reads the files. A MODULE argument is
  looked up without importing its package, as the import system would find it: on
  ``sys.path`` and the path entries of ``.pth`` files there, then in the mappings of
  setuptools' editable finders (``__editable___*_finder.py``, read as literals); a namespace
  package (no ``__init__.py``) is read from all its portions, and each file gets its dotted
  name from the MODULE argument, so imports between portions are followed.
* Fields are parsed by the same code the marker core uses
  (:func:`~tracemark.markers.fields.fields_from_format`, ``fields_from_types``), so what this
  accepts the core accepts and what it rejects the core rejects, with the same message.
* Errors (exit code 1): a call site whose arguments do not fit (too many positional
  arguments, a keyword that names no field or a field already given, a field left out), an
  inline ``mark`` whose value count does not fit its format, a literal argument the marker
  would drop for its type (``a("one")`` for ``x=int``: the core's own check decides), a
  declaration the core would
  refuse (bad name or format), the same name declared twice with different fields, a file
  that does not parse. A call with ``*args`` or ``**kwargs`` is checked only as far as it can
  be. Declarations whose name or fields are not literals are listed as dynamic, unchecked.
* A file that cannot be read safely is skipped, reported as an error with the reason, and
  the command goes on: only regular files (a FIFO named ``x.py`` is not opened for
  reading, so it cannot hang the command) of at most :data:`MAX_SOURCE` bytes (10 MiB), and
  source nested too deeply for Python's parser or for this checker.
"""

from __future__ import annotations

import ast
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..markers.dispatch import MISFITS
from ..markers.fields import Field, fields_from_format, fields_from_types
from ..markers.registry import check_name
from ._common import EXIT_FOUND_ERRORS, EXIT_OK, EXIT_USAGE, CliError, Style, printable

__all__ = ["Declaration", "Problem", "Scan", "scan"]

_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "build", "dist"}

#: The largest source file read, in bytes.
MAX_SOURCE = 10 << 20


def _read_source(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most MAX_SOURCE bytes, else
    OSError/ValueError saying why; opened non-blocking, so a FIFO cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_SOURCE + 1)
    if len(data) > MAX_SOURCE:
        raise ValueError(f"larger than {MAX_SOURCE >> 20} MiB")
    return data


@dataclass
class Declaration:
    name: str
    fields: tuple[Field, ...] | None  # None: not literal, cannot be checked
    fmt: str | None
    file: str
    line: int
    inline: bool = False  # a tracemark.mark() use rather than a declaration
    sites: int = 0
    context: frozenset[str] = frozenset()  # fields read from a ContextVar: never passed
    doc: str | None = None  # the declaration's doc= (a literal), shown and catalogued


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        where = printable(f"{self.file}:{self.line}:{self.col + 1}")
        return f"{where}: error: {printable(self.message)}"


@dataclass
class Scan:
    """What :func:`scan` found: declarations by marker name and the problems, in file order."""

    markers: dict[str, Declaration] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    files: int = 0


@dataclass
class _Module:
    path: Path
    shown: str  # the path as printed
    name: str  # dotted module name ('' when not inside a package structure)
    tree: ast.Module
    tm_modules: set[str] = field(default_factory=set)  # names bound to the tracemark module
    marker_funcs: set[str] = field(default_factory=set)  # names bound to tracemark.marker
    mark_funcs: set[str] = field(default_factory=set)  # names bound to tracemark.mark
    span_funcs: set[str] = field(default_factory=set)  # names bound to tracemark.span
    context_funcs: set[str] = field(default_factory=set)  # names bound to tracemark.context
    #: Module-level ``X = marker()`` (a Declaration) and ``Q = span()`` (a _Span).
    bindings: dict[str, Declaration | _Span] = field(default_factory=dict)


@dataclass
class _Span:
    """A span bound to a name: its two markers."""

    begin: Declaration
    end: Declaration


# -- finding files ------------------------------------------------------------------------


def _python_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in _SKIP_DIRS
            and not (Path(dirpath, d, "pyvenv.cfg")).exists()  # a virtual environment
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def _search_path() -> list[Path]:
    """Directories modules are found in: the current directory, ``sys.path``, then the path
    entries of ``.pth`` files in them (an editable install made as a path entry, in case this
    interpreter's start-up did not add it), without duplicates."""
    dirs: list[Path] = []
    for entry in ["", *sys.path]:
        d = Path(entry or os.getcwd())
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    for site_dir in list(dirs):
        for pth in sorted(site_dir.glob("*.pth")):
            try:
                lines = _read_source(pth).decode(errors="replace").splitlines()
            except (OSError, ValueError):
                continue
            for line in lines:  # site's rules: comments and "import" lines are not paths
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    d = Path(site_dir, line)
                    if d.is_dir() and d not in dirs:
                        dirs.append(d)
    return dirs


def _editable_maps(dirs: Sequence[Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """What setuptools' editable finders (PEP 660, ``__editable___*_finder.py`` in a site
    directory, installed at start-up by a ``.pth``) map: module name -> path, and namespace
    package -> its directories. Read as literals from the finders' source, not imported."""
    mapping: dict[str, str] = {}
    namespaces: dict[str, list[str]] = {}
    for d in dirs:
        for finder in sorted(d.glob("__editable___*_finder.py")):
            try:
                tree = ast.parse(_read_source(finder))
            except (OSError, ValueError, SyntaxError, RecursionError, MemoryError):
                continue
            for node in tree.body:
                target = node.target if isinstance(node, ast.AnnAssign) else None
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                if not isinstance(target, ast.Name) or node.value is None:
                    continue
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                if target.id == "MAPPING" and isinstance(value, dict):
                    mapping.update({k: v for k, v in value.items() if isinstance(v, str)})
                elif target.id == "NAMESPACES" and isinstance(value, dict):
                    for k, v in value.items():
                        if isinstance(v, list):
                            namespaces.setdefault(k, []).extend(map(str, v))
    return mapping, namespaces


def _find_in(roots: Sequence[Path], name: str) -> list[Path]:
    """``name`` in the directories ``roots`` as the import system finds it: the first
    package directory (with ``__init__.py``) or module file wins; without one, every
    directory of that name is a portion of one namespace package."""
    portions = []
    for root in roots:
        base = root / name
        if (base / "__init__.py").is_file():
            return [base]
        if base.with_suffix(".py").is_file():
            return [base.with_suffix(".py")]
        if base.is_dir():
            portions.append(base)
    return portions


def _find_module(dotted: str) -> list[Path]:
    """The file, package directory or namespace portions of module ``dotted``: found on
    ``sys.path`` (and ``.pth`` path entries), else through an editable install's finder
    mapping, without importing anything; [] when not found."""
    parts = dotted.split(".")
    if not all(p.isidentifier() for p in parts):
        return []
    dirs = _search_path()
    found = _find_in(dirs, parts[0])
    start = 1
    if not found or (found[0].is_dir() and not (found[0] / "__init__.py").is_file()):
        # sys.path has no regular package or module: an editable finder's mapping (searched
        # after sys.path by the import system too), longest dotted prefix first.
        mapping, namespaces = _editable_maps(dirs)
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if key in mapping and Path(mapping[key]).exists():
                found, start = [Path(mapping[key])], i
                break
        else:
            extra = [Path(p) for p in namespaces.get(parts[0], []) if Path(p).is_dir()]
            found += [p for p in extra if p not in found]
    for part in parts[start:]:
        found = _find_in([p for p in found if p.is_dir()], part)
    return found


def _module_name(path: Path) -> str:
    path = path.resolve()
    parts = [] if path.name == "__init__.py" else [path.stem]
    parent = path.parent
    while (parent / "__init__.py").is_file():
        parts.insert(0, parent.name)
        parent = parent.parent
    return ".".join(parts)


def resolve_targets(targets: Sequence[str]) -> list[tuple[Path, str | None]]:
    """Files to read for the PATH|MODULE arguments (the current directory when none), each
    with its dotted module name when a MODULE argument says it (None: worked out from the
    ``__init__.py`` files around it, which a namespace package does not have)."""
    files: list[tuple[Path, str | None]] = []
    for target in targets or ["."]:
        p = Path(target)
        if p.exists():
            if p.is_file() and p.suffix != ".py":
                raise CliError(f"{target}: not a Python source file", EXIT_USAGE)
            files.extend((f, None) for f in _python_files(p))
            continue
        found = _find_module(target)
        if not found:
            raise CliError(f"{target}: no such file, directory or module", EXIT_USAGE)
        for root in found:
            for f in _python_files(root):
                rel = f.relative_to(root).with_suffix("").parts if f != root else ()
                if rel and rel[-1] == "__init__":
                    rel = rel[:-1]
                files.append((f, ".".join((target, *rel))))
    seen: set[Path] = set()
    unique = []
    for f, name in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, name))
    return unique


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


# -- reading one module -------------------------------------------------------------------


def _literal_str(node: ast.AST | None) -> str | type[Ellipsis] | None:
    """A string or None literal; Ellipsis when the node is something else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, str)):
        return node.value
    return Ellipsis


_NOT_LITERAL = object()


def _literal(node: ast.expr) -> object:
    """The value of a literal argument (``"one"``, ``-1``, ``(1, 2)``), a stand-in str for an
    f-string (its value is not known, its type is), or _NOT_LITERAL."""
    if isinstance(node, ast.JoinedStr):
        return ""
    if not isinstance(node, ast.Constant | ast.UnaryOp | ast.BinOp | ast.Tuple | ast.List):
        return _NOT_LITERAL  # (a name, a call...: its type is not known without running it)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _short(node: ast.expr, value: object) -> str:
    """The literal as the message shows it: its repr, cut to 40 characters."""
    if isinstance(node, ast.JoinedStr):
        return "(an f-string)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Reader:
    def __init__(self, scan: Scan) -> None:
        self.scan = scan
        self.modules: dict[str, _Module] = {}
        #: Every declaration by the id of its call node, for names bound inside functions.
        self.by_call: dict[int, Declaration | _Span] = {}

    def problem(self, mod: _Module, node: ast.AST, message: str) -> None:
        self.scan.problems.append(
            Problem(mod.shown, getattr(node, "lineno", 1), getattr(node, "col_offset", 0), message)
        )

    def load(self, path: Path, name: str | None = None) -> _Module | None:
        shown = _shown(path)
        try:
            source = _read_source(path)
        except OSError as exc:
            self.scan.problems.append(Problem(shown, 1, 0, f"skipped: {exc.strerror or exc}"))
            return None
        except ValueError as exc:
            self.scan.problems.append(Problem(shown, 1, 0, f"skipped: {exc}"))
            return None
        try:
            tree = ast.parse(source, filename=shown)
        except SyntaxError as exc:
            self.scan.problems.append(
                Problem(shown, exc.lineno or 1, (exc.offset or 1) - 1, f"cannot parse: {exc.msg}")
            )
            return None
        except (RecursionError, MemoryError):  # the parser's own limits
            self.scan.problems.append(Problem(shown, 1, 0, _TOO_DEEP))
            return None
        except ValueError as exc:  # source with a NUL byte (3.11)
            self.scan.problems.append(Problem(shown, 1, 0, f"cannot parse: {exc}"))
            return None
        self.scan.files += 1
        mod = _Module(path, shown, name if name is not None else _module_name(path), tree)
        try:
            self._imports(mod)
            self._declarations(mod)
        except RecursionError:
            self.scan.problems.append(Problem(shown, 1, 0, _TOO_DEEP))
            return None
        if mod.name:
            self.modules[mod.name] = mod
        return mod

    def _imports(self, mod: _Module) -> None:
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "tracemark":
                        mod.tm_modules.add(alias.asname or "tracemark")
            elif isinstance(node, ast.ImportFrom) and node.module == "tracemark" and not node.level:
                for alias in node.names:
                    if alias.name == "marker":
                        mod.marker_funcs.add(alias.asname or "marker")
                    elif alias.name == "mark":
                        mod.mark_funcs.add(alias.asname or "mark")
                    elif alias.name == "span":
                        mod.span_funcs.add(alias.asname or "span")
                    elif alias.name == "context":
                        mod.context_funcs.add(alias.asname or "context")

    def _is(self, mod: _Module, func: ast.AST, attr: str, names: set[str]) -> bool:
        if isinstance(func, ast.Name):
            return func.id in names
        return (
            isinstance(func, ast.Attribute)
            and func.attr == attr
            and isinstance(func.value, ast.Name)
            and func.value.id in mod.tm_modules
        )

    def _declarations(self, mod: _Module) -> None:
        # Module-level bindings, including those inside top-level if/try/with blocks.
        top: set[int] = set()
        stack: list[ast.AST] = list(mod.tree.body)
        while stack:
            stmt = stack.pop()
            if isinstance(stmt, ast.If | ast.Try | ast.With):
                for attr in ("body", "orelse", "finalbody", "handlers"):
                    stack.extend(getattr(stmt, attr, []))
            elif isinstance(stmt, ast.ExceptHandler):
                stack.extend(stmt.body)
            elif isinstance(stmt, ast.Assign | ast.AnnAssign) and isinstance(stmt.value, ast.Call):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name):
                    top.add(id(stmt.value))
                    decl = self._declaration(mod, stmt.value)
                    if decl is not None:
                        mod.bindings[targets[0].id] = decl
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Call) and id(node) not in top:
                self._declaration(mod, node)  # declared without a module-level name

    def _declaration(self, mod: _Module, call: ast.Call) -> Declaration | _Span | None:
        is_span = self._is(mod, call.func, "span", mod.span_funcs)
        if not is_span and not self._is(mod, call.func, "marker", mod.marker_funcs):
            return None
        what = "span" if is_span else "marker"
        if not call.args or any(isinstance(a, ast.Starred) for a in call.args):
            self.problem(mod, call, f"{what}() needs the {what} name as its first argument")
            return None
        name = _literal_str(call.args[0])
        if not isinstance(name, str):
            return None  # a computed name: nothing to check
        fmt = _literal_str(call.args[1]) if len(call.args) > 1 else None
        fields: tuple[Field, ...] | None
        context: set[str] = set()
        doc_given = [k for k in call.keywords if k.arg == "doc"]
        doc = _literal_str(doc_given[0].value) if doc_given else None
        doc = doc if isinstance(doc, str) else None
        call_keywords = [k for k in call.keywords if k.arg != "doc"]
        try:
            check_name(name)
            if len(call.args) > 2:
                raise ValueError(
                    f"{what}() takes the name and one format, not {len(call.args)} "
                    "positional arguments"
                )
            if fmt is not None and call_keywords:
                raise ValueError("fields come from a format or from keywords, not both")
            if fmt is Ellipsis or any(k.arg is None for k in call_keywords):
                fields = None
            elif isinstance(fmt, str):
                fields = fields_from_format(fmt)
            else:
                types: dict[str, object] = {}
                for k in call_keywords:
                    v = k.value
                    if isinstance(v, ast.Call) and self._is(
                        mod, v.func, "context", mod.context_funcs
                    ):
                        context.add(k.arg)  # type: ignore[arg-type]
                        given = [*v.args[1:2], *(w.value for w in v.keywords if w.arg == "type")]
                        v = given[0] if given else ast.Constant("object")
                    if isinstance(v, ast.Name):
                        types[k.arg] = v.id  # type: ignore[index]
                    elif isinstance(v, ast.Constant) and isinstance(v.value, str):
                        types[k.arg] = v.value  # type: ignore[index]
                    else:
                        types[k.arg] = Ellipsis  # type: ignore[index]
                fields = None if Ellipsis in types.values() else fields_from_types(types)
        except ValueError as exc:
            self.problem(mod, call, f"{what} {name!r}: {exc}")
            return None
        fmt = fmt if isinstance(fmt, str) else None
        ctx = frozenset(context)
        if is_span:
            ends = tuple(f for f in fields if f.name in ctx) if fields is not None else None
            found: Declaration | _Span = _Span(
                self._register(
                    mod,
                    call,
                    Declaration(
                        f"{name}.begin",
                        fields,
                        fmt,
                        mod.shown,
                        call.lineno,
                        context=ctx,
                        doc=doc and f"{doc} (begins)",
                    ),
                ),
                self._register(
                    mod,
                    call,
                    Declaration(
                        f"{name}.end",
                        ends,
                        None,
                        mod.shown,
                        call.lineno,
                        context=ctx,
                        doc=doc and f"{doc} (ends)",
                    ),
                ),
            )
        else:
            found = self._register(
                mod,
                call,
                Declaration(name, fields, fmt, mod.shown, call.lineno, context=ctx, doc=doc),
            )
        self.by_call[id(call)] = found
        return found

    def _register(self, mod: _Module, node: ast.AST, decl: Declaration) -> Declaration:
        known = self.scan.markers.get(decl.name)
        if known is None:
            self.scan.markers[decl.name] = decl
            return decl
        if known.doc is None and decl.doc:
            known.doc = decl.doc
        if known.fields is not None and decl.fields is not None and known.fields != decl.fields:
            what = "used inline" if known.inline else "declared"
            self.problem(
                mod,
                node,
                f"marker {decl.name!r} has fields ({_fields(decl.fields)}) here but "
                f"({_fields(known.fields)}) where it is {what} at {known.file}:{known.line}",
            )
            return decl  # its own module's calls are checked against what it declares
        if known.inline and not decl.inline:  # a real declaration wins over an inline use
            decl.sites = known.sites
            self.scan.markers[decl.name] = decl
            return decl
        return known

    # -- call sites ---------------------------------------------------------------------

    def check(self, mod: _Module) -> None:
        # Names in this module that hold a declared marker: its own module-level bindings,
        # then what it imports from other modules that were read.
        local = dict(mod.bindings)
        attrs: dict[str, dict[str, Declaration | _Span]] = {}
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.ImportFrom):
                source = self._resolve(mod, node)
                other = self.modules.get(source) if source else None
                for alias in node.names:
                    if other is not None and alias.name in other.bindings:
                        local[alias.asname or alias.name] = other.bindings[alias.name]
                    submodule = self.modules.get(f"{source}.{alias.name}") if source else None
                    if submodule is not None:  # from package import module
                        attrs[alias.asname or alias.name] = submodule.bindings
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    other = self.modules.get(alias.name)
                    if other is not None and other.bindings:
                        attrs[alias.asname or alias.name] = other.bindings
        _SiteVisitor(self, mod, local, attrs).visit(mod.tree)

    def _resolve(self, mod: _Module, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        package = mod.name.split(".")
        if mod.path.name != "__init__.py":
            package = package[:-1]
        if node.level - 1 > len(package):
            return None
        base = package[: len(package) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def check_call(self, mod: _Module, call: ast.Call, decl: Declaration) -> None:
        decl.sites += 1
        if decl.fields is None:
            return
        names = [f.name for f in decl.fields if f.name not in decl.context]
        starred = any(isinstance(a, ast.Starred) for a in call.args)
        double = any(k.arg is None for k in call.keywords)
        positional = sum(not isinstance(a, ast.Starred) for a in call.args)
        where = f"{decl.name}({', '.join(names)})"
        if positional > len(names):
            self.problem(
                mod,
                call,
                f"{where} takes {len(names)} value{'s' if len(names) != 1 else ''}, "
                f"called with {positional} positional arguments",
            )
            return
        given = set(names[:positional])
        for k in call.keywords:
            if k.arg is None:
                continue
            if k.arg not in names:
                self.problem(mod, k, f"{where} has no field {k.arg!r}")
                return
            if k.arg in given:
                self.problem(mod, k, f"{where}: field {k.arg!r} is given twice")
                return
            given.add(k.arg)
        missing = [n for n in names if n not in given]
        if missing and not starred and not double:
            self.problem(mod, call, f"{where} called without {', '.join(map(repr, missing))}")
        types = {f.name: f.type for f in decl.fields}
        values = [(n, a) for n, a in zip(names, call.args, strict=False)]
        values += [(k.arg, k.value) for k in call.keywords if k.arg in types]
        if any(isinstance(a, ast.Starred) for _, a in values):
            values = values[: [isinstance(a, ast.Starred) for _, a in values].index(True)]
        for name, value in values:
            self._check_literal(mod, value, f"{where}: field {name!r}", types[name])

    def _check_literal(self, mod: _Module, node: ast.expr, what: str, expected: type) -> None:
        """A literal value that the marker would drop at run time (the core's own check,
        :data:`~tracemark.markers.dispatch.MISFITS`) is an error."""
        value = _literal(node)
        if value is not _NOT_LITERAL and MISFITS[expected](value):
            self.problem(
                mod,
                node,
                f"{what} expects {expected.__name__}, got {type(value).__name__} literal "
                f"{_short(node, value)}",
            )

    def check_inline(self, mod: _Module, call: ast.Call) -> None:
        args = call.args
        if not args or isinstance(args[0], ast.Starred):
            self.problem(mod, call, "mark() needs the marker name as its first argument")
            return
        name = _literal_str(args[0])
        if not isinstance(name, str):
            return
        fmt = _literal_str(args[1]) if len(args) > 1 else None
        if fmt is Ellipsis or (len(args) > 1 and isinstance(args[1], ast.Starred)):
            return
        try:
            check_name(name)
            fields = fields_from_format(fmt) if isinstance(fmt, str) else ()
        except ValueError as exc:
            self.problem(mod, call, f"mark {name!r}: {exc}")
            return
        decl = self._register(
            mod, call, Declaration(name, fields, fmt, mod.shown, call.lineno, True)
        )
        decl.sites += 1
        if decl.fields is not None and decl.fields != fields:
            return  # the conflict was reported by _register
        values = args[2:]
        if any(isinstance(a, ast.Starred) for a in values) or call.keywords:
            if call.keywords:
                self.problem(mod, call.keywords[0], "mark() takes its values positionally")
            return
        if len(values) != len(fields):
            self.problem(
                mod,
                call,
                f"mark {name!r}: format {fmt!r} has {len(fields)} field"
                f"{'s' if len(fields) != 1 else ''}, given {len(values)} value"
                f"{'s' if len(values) != 1 else ''}",
            )
            return
        for f, value in zip(fields, values, strict=True):
            self._check_literal(mod, value, f"mark {name!r}: field {f.name!r}", f.type)


class _SiteVisitor(ast.NodeVisitor):
    """Finds calls of marker names, minding function and class scopes that rebind them."""

    def __init__(
        self,
        reader: _Reader,
        mod: _Module,
        local: dict[str, Declaration | _Span],
        attrs: dict[str, dict[str, Declaration | _Span]],
    ) -> None:
        self.reader = reader
        self.mod = mod
        self.scopes = [dict(local)]
        self.attrs = attrs

    def visit_Call(self, node: ast.Call) -> None:
        reader, mod = self.reader, self.mod
        func = node.func
        if reader._is(mod, func, "mark", mod.mark_funcs):
            reader.check_inline(mod, node)
        elif isinstance(func, ast.Name):
            decl = self.scopes[-1].get(func.id)
            if isinstance(decl, _Span):  # with q(...): fires both, with the begin's fields
                decl.end.sites += 1
                decl = decl.begin
            if decl is not None:
                reader.check_call(mod, node, decl)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            span = self.scopes[-1].get(func.value.id)
            if isinstance(span, _Span):  # q.begin(...), q.end()
                decl = (
                    span.begin if func.attr == "begin" else span.end if func.attr == "end" else None
                )
            else:
                decl = self.attrs.get(func.value.id, {}).get(func.attr)
                if decl is not None and func.value.id in self.scopes[0]:
                    decl = None  # the module alias is shadowed (unusual): do not guess
            if isinstance(decl, Declaration):
                reader.check_call(mod, node, decl)
        self.generic_visit(node)

    def _scope(self, node: ast.AST, params: list[str]) -> None:
        bound = set(params)
        for sub in ast.walk(node):
            if sub is node:
                continue
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                bound.add(sub.id)
            elif isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bound.add(sub.name)
            elif isinstance(sub, ast.Import | ast.ImportFrom):
                bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
        globals_ = {n for sub in ast.walk(node) if isinstance(sub, ast.Global) for n in sub.names}
        scope = {k: v for k, v in self.scopes[-1].items() if k not in bound or k in globals_}
        # A marker declared and bound inside this function: ``rx = tracemark.marker(...)``.
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Assign)
                and len(sub.targets) == 1
                and isinstance(sub.targets[0], ast.Name)
                and id(sub.value) in self.reader.by_call
            ):
                scope[sub.targets[0].id] = self.reader.by_call[id(sub.value)]
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        a = node.args
        params = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
        for deco in node.decorator_list:  # @Q: a site of both markers, fields by parameter
            span = self.scopes[-1].get(deco.id) if isinstance(deco, ast.Name) else None
            if isinstance(span, _Span):
                span.begin.sites += 1
                span.end.sites += 1
                fields = span.begin.fields or ()
                missing = [f.name for f in fields if f.name not in {*params, *span.begin.context}]
                if missing:
                    self.reader.problem(
                        self.mod,
                        deco,
                        f"@{deco.id} on {node.name}(): field {missing[0]!r} of "
                        f"{span.begin.name!r} has no argument of that name",
                    )
        self._scope(node, params)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        a = node.args
        self._scope(node, [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)])


_TOO_DEEP = "skipped: nested too deeply to check"


def _fields(fields: tuple[Field, ...]) -> str:
    return ", ".join(map(str, fields))


def scan(targets: Sequence[str]) -> Scan:
    """Read every Python file of ``targets`` (paths or module names) and check the markers."""
    result = Scan()
    reader = _Reader(result)
    loaded = (reader.load(path, name) for path, name in resolve_targets(targets))
    modules = [m for m in loaded if m is not None]
    for mod in modules:
        try:
            reader.check(mod)
        except RecursionError:  # the site visitor recurses with the source's nesting
            result.problems.append(Problem(mod.shown, 1, 0, _TOO_DEEP))
    result.problems.sort()
    return result


def _markdown_cell(text: str) -> str:
    return " ".join(printable(text).split()).replace("|", "\\|")


def write_markdown(result: Scan, out: IO[str]) -> None:
    """The markers as a Markdown catalog a library can put in its docs: one row each."""
    out.write("| marker | fields | what it means | declared at |\n| --- | --- | --- | --- |\n")
    for decl in sorted(result.markers.values(), key=lambda d: d.name):
        fields = "(dynamic)" if decl.fields is None else _fields(decl.fields)
        if decl.context:
            fields += f" (from context: {', '.join(sorted(decl.context))})"
        cells = (f"`{decl.name}`", fields, decl.doc or "", f"{decl.file}:{decl.line}")
        out.write("| " + " | ".join(_markdown_cell(c) for c in cells) + " |\n")


def run(
    targets: Sequence[str],
    out: IO[str],
    err: IO[str],
    *,
    width: int = 80,
    style: Style,
    markdown: bool = False,
) -> int:
    result = scan(targets)
    if markdown:
        write_markdown(result, out)
        for problem in result.problems:
            err.write(f"{problem}\n")
        return EXIT_FOUND_ERRORS if result.problems else EXIT_OK
    for decl in sorted(result.markers.values(), key=lambda d: d.name):
        fields = "(dynamic fields)" if decl.fields is None else f"({_fields(decl.fields)})"
        if decl.context:
            fields += f" [from context: {', '.join(sorted(decl.context))}]"
        name = printable(decl.name)
        head = f"{style(name, 'bold', 'cyan')}{fields}"
        if len(name) + len(fields) > width:
            head = f"{style(name, 'bold', 'cyan')}\n  {fields}"
        kind = "inline, first used" if decl.inline else "declared"
        sites = f"{decl.sites} call site{'s' if decl.sites != 1 else ''}"
        out.write(f"{head}\n")
        if decl.doc:
            out.write(f"  {printable(' '.join(decl.doc.split()))}\n")
        out.write(f"  {kind} {printable(decl.file)}:{decl.line}; {sites}\n")
    for problem in result.problems:
        err.write(f"{style(str(problem), 'red')}\n")
    summary = (
        f"{len(result.markers)} marker{'s' if len(result.markers) != 1 else ''} in "
        f"{result.files} file{'s' if result.files != 1 else ''}"
    )
    if result.problems:
        n = len(result.problems)
        err.write(f"{summary}; {n} error{'s' if n != 1 else ''}\n")
        return EXIT_FOUND_ERRORS
    out.write(f"{summary}; no errors\n")
    return EXIT_OK
