"""``--filter EXPR``: a small, safe expression language over one event.

Guarantees
----------
* User text is never evaluated. The expression is parsed with :func:`ast.parse` and every node
  is checked against a whitelist, then turned into a tree of plain Python closures; nothing
  the user writes can reach an attribute, a builtin or an import.
* What is allowed: literals (numbers, strings, ``True False None``, tuples and lists of them),
  field names, the event's metadata ``name pid tid thread task task_id timestamp`` (``task``
  is the asyncio task's name and ``task_id`` its id, both None outside a task),
  ``fields["x"]`` for a field whose name clashes with a metadata name, comparisons
  (``== != < <= > >= in not in``, chained), ``and or not``, arithmetic ``+ - * / // %``,
  the string methods ``startswith endswith contains lower upper strip matches``
  (``matches`` is a shell glob) and the functions ``len abs str``.
* A bad expression raises :class:`FilterError` with the column of the offending part, so the
  command line can print one message and a caret under the problem.
* When the set of known field names is given, a name that is neither metadata nor a field of
  any selected marker is an error (a typo is caught before reading the whole trace).
* An event that lacks a field (another marker) never matches a comparison on it, and nothing
  an event carries can make evaluation raise: a comparison between values of different types
  is false, arithmetic that fails gives "missing".
* Bounded work. An expression has at most :data:`MAX_LENGTH` characters (10,000) and nests at
  most :data:`MAX_DEPTH` levels (100): beyond, a FilterError, never a RecursionError. A value
  the filter builds (``*`` repeating or ``+`` joining text, bytes or tuples) has at most
  :data:`MAX_VALUE` items (1,000,000): written with constants only (``"x" * 10**9``) it is a
  FilterError, otherwise the result is "missing", checked before anything is built. ``%`` is
  arithmetic only: on text (printf formatting, which can pad to any width) it gives "missing".
"""

from __future__ import annotations

import ast
import fnmatch
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "MAX_VALUE", "METADATA", "FilterError", "compile_filter"]

#: The longest expression accepted, in characters.
MAX_LENGTH = 10_000
#: The deepest nesting accepted (operators inside operators, calls inside calls...).
MAX_DEPTH = 100
#: The most characters, bytes or items a value built by the filter may have.
MAX_VALUE = 1_000_000

#: Event attributes a filter can name, besides the fields.
METADATA = ("name", "pid", "tid", "thread", "task", "task_id", "timestamp")


def _task_name(ev: Any) -> Any:
    task = getattr(ev, "task", None)
    return None if task is None else getattr(task, "name", task)


def _task_id(ev: Any) -> Any:
    return getattr(getattr(ev, "task", None), "id", None)


#: Metadata names that are not plain attributes of what is matched: an event's ``task`` is
#: a reader Task (id, name); a filter compares its name, or its id as ``task_id``.
_GETTERS = {"task": _task_name, "task_id": _task_id}


class FilterError(ValueError):
    """A filter expression that cannot be used; ``column`` is 0-based, in characters."""

    def __init__(self, message: str, expr: str, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.expr = expr
        self.column = max(0, min(column, len(expr)))

    def pointer(self) -> str:
        """Two lines: the expression, and a caret under the problem ('' for a very long
        expression, which would not help)."""
        if len(self.expr) > 200:
            return ""
        shown = self.expr.replace("\n", " ").replace("\r", " ").replace("\0", " ")
        return f"  {shown}\n  {' ' * self.column}^"


class _Missing:
    """The value of a field the event does not have: false, and equal to nothing."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


class _TooBig(ValueError):
    """A value beyond MAX_VALUE was about to be built."""


_SIZED = (str, bytes, tuple, list)


def _mul(a: Any, b: Any) -> Any:
    if isinstance(b, _SIZED):
        a, b = b, a
    if isinstance(a, _SIZED) and isinstance(b, int) and len(a) * b > MAX_VALUE:
        raise _TooBig(f"* would build a value of {len(a) * b:,} items")
    return operator.mul(a, b)


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _SIZED) and isinstance(b, _SIZED) and len(a) + len(b) > MAX_VALUE:
        raise _TooBig(f"+ would build a value of {len(a) + len(b):,} items")
    return operator.add(a, b)


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        raise TypeError("% is arithmetic only in a filter, not formatting")
    return operator.mod(a, b)


_ARITH: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: _add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: _mod,
}
# Methods callable on a string value; each takes the string and the (evaluated) arguments.
_METHODS: dict[str, tuple[int, Callable[..., Any]]] = {
    "startswith": (1, lambda s, p: s.startswith(p if isinstance(p, str) else tuple(p))),
    "endswith": (1, lambda s, p: s.endswith(p if isinstance(p, str) else tuple(p))),
    "contains": (1, lambda s, p: p in s),
    "matches": (1, lambda s, p: fnmatch.fnmatchcase(s, p)),
    "lower": (0, str.lower),
    "upper": (0, str.upper),
    "strip": (0, str.strip),
}
_FUNCTIONS: dict[str, Callable[[Any], Any]] = {"len": len, "abs": abs, "str": str}
_CONSTANT_TYPES = (str, int, float, bool, bytes, type(None))


def _column(expr: str, node: ast.AST) -> int:
    # ast offsets count UTF-8 bytes; the caret is placed under characters.
    offset = getattr(node, "col_offset", 0)
    return len(expr.encode()[:offset].decode(errors="ignore"))


def compile_filter(
    expr: str,
    known_fields: Iterable[str] | None = None,
    *,
    metadata: Iterable[str] = METADATA,
    field_types: Mapping[str, Iterable[str]] | None = None,
) -> Callable[[Any], bool]:
    """A predicate ``match(event) -> bool`` for the expression ``expr``.

    ``field_types``: field name -> the type names it has in the selected markers (``int``,
    ``float``, ``bool``, ``str``, ``object``, ``bytes``, ``any``); when given, comparing a
    field with a constant of another kind (``ms > "5"`` for a number, ``path == 3`` for a
    text) is an error that says so, instead of a filter that silently matches nothing. An
    ``any`` field (a probe's captured value) is compared by each event's own value: an
    event whose value is of another kind simply does not match.

    ``known_fields``: every field name of the selected markers; when given, other names are
    an error. ``metadata``: the names read as attributes of what is matched rather than as
    fields (``tracemark spans`` adds a span's ``duration``). Raises :class:`FilterError` for
    anything not in the language.
    """
    if not expr.strip():
        raise FilterError("the filter expression is empty", expr, 0)
    for bad in "\n\r\0":
        if bad in expr:
            raise FilterError(f"{bad!r} is not allowed in a filter", expr, expr.find(bad))
    if len(expr) > MAX_LENGTH:
        message = f"the filter is {len(expr):,} characters long; the limit is {MAX_LENGTH:,}"
        raise FilterError(message, expr, MAX_LENGTH)
    lead = len(expr) - len(expr.lstrip())
    text = expr.strip()
    too_deep = f"the filter nests more than {MAX_DEPTH} levels deep"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        if "too many nested" in exc.msg or "too complex" in exc.msg:
            raise FilterError(too_deep, expr, 0) from None
        if not exc.offset:  # offset 0: the parser ran out of input
            raise FilterError("incomplete expression", expr, lead + len(text)) from None
        raise FilterError(f"syntax error: {exc.msg}", expr, lead + exc.offset - 1) from None
    except (RecursionError, MemoryError):  # the parser's own stack (3.11: MemoryError)
        raise FilterError(too_deep, expr, 0) from None
    deep = _too_deep(tree.body)
    if deep is not None:
        raise FilterError(too_deep, expr, lead + _column(text, deep))
    known = None if known_fields is None else frozenset(known_fields)
    compiler = _Compiler(expr, known, lead, tuple(metadata))
    if field_types is not None:
        # An ``any`` field holds values of every kind (each event its own): never checked.
        compiler.kinds = {
            k: frozenset() if "any" in v else frozenset(map(_KIND.get, v)) - {None}
            for k, v in field_types.items()
        }
    fn = compiler.build(tree.body)

    def match(event: Any) -> bool:
        try:
            return bool(fn(event))
        except Exception:  # a value with a hostile __eq__ or __bool__: not a match
            return False

    return match


def _too_deep(root: ast.AST) -> ast.AST | None:
    """The first node nested deeper than MAX_DEPTH, None if there is none (walked without
    recursion, so any depth is measured safely)."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return None


_NOT_CONSTANT: Any = object()

#: What kind of value a field of each recorded type holds, for comparisons with constants.
_KIND = {"int": "number", "float": "number", "bool": "number", "str": "text", "object": "text"}
_KIND["bytes"] = "bytes"
_PLAIN_KIND = {"number": "a number", "text": "text", "bytes": "bytes"}
#: The kinds of the names read as attributes (``tracemark spans`` adds ``duration``).
_META_KINDS = {
    **dict.fromkeys(("pid", "tid", "timestamp", "task_id", "duration"), frozenset({"number"})),
    **dict.fromkeys(("name", "thread", "task"), frozenset({"text"})),
}


def _constant_kind(value: Any) -> str | None:
    if isinstance(value, bool | int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes):
        return "bytes"
    return None  # None, tuples (for in): not checked


def _constant(node: ast.AST) -> Any:
    """The value of ``node`` if it is made of constants only (checked like at run time),
    else _NOT_CONSTANT; raises _TooBig."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _constant(node.operand)
        if type(value) in (int, float):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Tuple | ast.List):
        items = [_constant(e) for e in node.elts]
        return _NOT_CONSTANT if _NOT_CONSTANT in items else tuple(items)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left, right = _constant(node.left), _constant(node.right)
        if left is not _NOT_CONSTANT and right is not _NOT_CONSTANT:
            try:
                return _ARITH[type(node.op)](left, right)
            except _TooBig:
                raise
            except Exception:
                return _NOT_CONSTANT
    return _NOT_CONSTANT


class _Compiler:
    def __init__(
        self, expr: str, known: frozenset[str] | None, lead: int, metadata: tuple[str, ...]
    ) -> None:
        self.expr = expr  # as the user wrote it; the parsed text starts ``lead`` chars in
        self.known = known
        #: field name -> the kinds of value it holds ("number", "text", "bytes"), if known.
        self.kinds: dict[str, frozenset[str]] | None = None
        self.lead = lead
        self.metadata = metadata

    def fail(self, node: ast.AST, message: str, after: ast.AST | None = None) -> FilterError:
        """The error for ``node``; with ``after``, for the token that follows that node
        (an operator or a ``.attribute``, which the ast gives no position of its own)."""
        text = self.expr[self.lead :]
        if after is not None:
            end = len(text.encode()[: after.end_col_offset].decode(errors="ignore"))
            column = end + len(text[end:]) - len(text[end:].lstrip(" )"))
        else:
            column = _column(text, node)
        return FilterError(message, self.expr, self.lead + column)

    def build(self, node: ast.AST) -> Callable[[Any], Any]:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"{_describe(node)} is not allowed in a filter")
        return method(node)

    def _Constant(self, node: ast.Constant) -> Callable[[Any], Any]:
        value = node.value
        if not isinstance(value, _CONSTANT_TYPES):
            raise self.fail(node, f"{value!r} is not allowed in a filter")
        return lambda ev: value

    def _Tuple(self, node: ast.Tuple | ast.List) -> Callable[[Any], Any]:
        items = [self.build(elt) for elt in node.elts]
        return lambda ev: tuple(item(ev) for item in items)

    _List = _Tuple

    def _Name(self, node: ast.Name) -> Callable[[Any], Any]:
        name = node.id
        if name in self.metadata:
            return _GETTERS.get(name) or operator.attrgetter(name)
        if name in ("True", "False", "None"):  # pragma: no cover - parsed as constants
            raise self.fail(node, f"{name} is a constant")
        if self.known is not None and name not in self.known:
            raise self.fail(node, _unknown(name, self.known, self.metadata))
        return lambda ev: ev.fields.get(name, MISSING)

    def _Subscript(self, node: ast.Subscript) -> Callable[[Any], Any]:
        key = node.slice
        if not (
            isinstance(node.value, ast.Name)
            and node.value.id == "fields"
            and isinstance(key, ast.Constant)
            and isinstance(key.value, str)
        ):
            raise self.fail(node, 'only fields["NAME"] can be subscripted in a filter')
        name = key.value
        if self.known is not None and name not in self.known:
            raise self.fail(key, _unknown(name, self.known, self.metadata))
        return lambda ev: ev.fields.get(name, MISSING)

    def _BoolOp(self, node: ast.BoolOp) -> Callable[[Any], Any]:
        parts = [self.build(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda ev: all(p(ev) for p in parts)
        return lambda ev: any(p(ev) for p in parts)

    def _UnaryOp(self, node: ast.UnaryOp) -> Callable[[Any], Any]:
        operand = self.build(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda ev: not operand(ev)
        if isinstance(node.op, ast.USub | ast.UAdd):
            op = operator.neg if isinstance(node.op, ast.USub) else operator.pos

            def signed(ev: Any) -> Any:
                value = operand(ev)
                return op(value) if _is_number(value) else MISSING

            return signed
        raise self.fail(node, f"{_describe(node.op)} is not allowed in a filter")

    def _BinOp(self, node: ast.BinOp) -> Callable[[Any], Any]:
        op = _ARITH.get(type(node.op))
        if op is None:
            raise self.fail(node, f"{_describe(node.op)} is not allowed in a filter", node.left)
        try:
            _constant(node)
        except _TooBig as exc:
            raise self.fail(node, f"{exc}; the limit is {MAX_VALUE:,}", node.left) from None
        left, right = self.build(node.left), self.build(node.right)

        def arith(ev: Any) -> Any:
            a, b = left(ev), right(ev)
            if a is MISSING or b is MISSING:
                return MISSING
            try:
                return op(a, b)
            except Exception:
                return MISSING

        return arith

    def _Compare(self, node: ast.Compare) -> Callable[[Any], Any]:
        ops = []
        for op, before in zip(node.ops, [node.left, *node.comparators], strict=False):
            fn = _COMPARE.get(type(op))
            if fn is None:
                message = f"{_describe(op)} is not allowed in a filter; use == or !="
                raise self.fail(node, message, before)
            ops.append(fn)
        nodes = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, nodes, nodes[1:], strict=False):
            if not isinstance(op, ast.In | ast.NotIn):
                self._check_kinds(a, b)
                self._check_kinds(b, a)
        operands = [self.build(n) for n in nodes]

        def compare(ev: Any) -> bool:
            left = operands[0](ev)
            for fn, right_fn in zip(ops, operands[1:], strict=True):
                right = right_fn(ev)
                if left is MISSING or right is MISSING:
                    return False
                try:
                    if not fn(left, right):
                        return False
                except TypeError:  # "eth0" < 3: different kinds never compare true
                    return False
                left = right
            return True

        return compare

    def _field_of(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name) and node.id not in self.metadata:
            return node.id
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "fields"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            return node.slice.value
        return None

    def _check_kinds(self, field_node: ast.AST, other: ast.AST) -> None:
        """A field compared with a constant of a kind it never holds is an error."""
        if self.kinds is None:
            return
        name = self._field_of(field_node)
        if isinstance(field_node, ast.Name) and field_node.id in self.metadata:
            name = field_node.id
            has = _META_KINDS.get(name)
        else:
            has = self.kinds.get(name) if name is not None else None
        if not has:
            return
        try:
            value = _constant(other)
        except _TooBig:
            return  # reported where the constant is built
        kind = None if value is _NOT_CONSTANT else _constant_kind(value)
        if kind is None or kind in has:
            return
        held = " or ".join(sorted(_PLAIN_KIND[k] for k in has))
        hint = ""
        if kind == "text" and "number" in has:
            try:
                hint = f"; without quotes: {float(value):g}"
            except ValueError:
                pass
        elif kind == "number" and "text" in has:
            hint = f"; quoted: {str(value)!r}"
        message = (
            f"{name!r} holds {held} in the selected markers, and {value!r} is "
            f"{_PLAIN_KIND[kind]}: the comparison could never be true{hint}"
        )
        raise self.fail(other, message)

    def _Call(self, node: ast.Call) -> Callable[[Any], Any]:
        if node.keywords:
            raise self.fail(node.keywords[0].value, "keyword arguments are not allowed in a filter")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, "*arguments are not allowed in a filter")
        args = [self.build(a) for a in node.args]
        func = node.func
        if isinstance(func, ast.Attribute):
            entry = _METHODS.get(func.attr)
            if entry is None:
                known = ", ".join(_METHODS)
                message = f"unknown method .{func.attr}(); use one of {known}"
                raise self.fail(func, message, func.value)
            arity, method = entry
            if len(args) != arity:
                raise self.fail(node, f".{func.attr}() takes {arity} argument(s), not {len(args)}")
            target = self.build(func.value)

            def call_method(ev: Any) -> Any:
                value = target(ev)
                if not isinstance(value, str):
                    return MISSING
                try:
                    return method(value, *(a(ev) for a in args))
                except Exception:
                    return MISSING

            return call_method
        if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
            function = _FUNCTIONS[func.id]
            if len(args) != 1:
                raise self.fail(node, f"{func.id}() takes 1 argument, not {len(args)}")
            (arg,) = args

            def call_function(ev: Any) -> Any:
                value = arg(ev)
                if value is MISSING:
                    return MISSING
                try:
                    return function(value)
                except Exception:
                    return MISSING

            return call_function
        raise self.fail(
            func, f"only the functions {', '.join(_FUNCTIONS)} and string methods can be called"
        )

    def _Attribute(self, node: ast.Attribute) -> Callable[[Any], Any]:
        if node.attr in _METHODS:
            message = f".{node.attr} is a method: call it, .{node.attr}(...)"
            raise self.fail(node, message, node.value)
        raise self.fail(node, f"attribute .{node.attr} is not allowed in a filter", node.value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unknown(name: str, known: frozenset[str], metadata: tuple[str, ...]) -> str:
    fields = ", ".join(sorted(known)) or "none"
    return (
        f"unknown name {name!r}: not a field of the selected markers ({fields}) "
        f"nor one of {', '.join(metadata)}"
    )


_DESCRIPTIONS = {
    "Lambda": "lambda",
    "Attribute": "attribute access",
    "Await": "await",
    "Yield": "yield",
    "Dict": "a dict",
    "Set": "a set",
    "ListComp": "a comprehension",
    "SetComp": "a comprehension",
    "DictComp": "a comprehension",
    "GeneratorExp": "a generator expression",
    "IfExp": "an if-expression",
    "NamedExpr": ":=",
    "JoinedStr": "an f-string",
    "Starred": "*",
    "Slice": "a slice",
    "Is": "'is'",
    "IsNot": "'is not'",
    "Pow": "**",
    "BitAnd": "&",
    "BitOr": "|",
    "BitXor": "^",
    "LShift": "<<",
    "RShift": ">>",
    "MatMult": "@",
    "Invert": "~",
}


def _describe(node: ast.AST) -> str:
    kind = type(node).__name__
    return _DESCRIPTIONS.get(kind, kind)
