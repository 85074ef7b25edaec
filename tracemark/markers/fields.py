"""Fields: what a marker carries, declared once, from a printf format or from keywords.

Two ways to say the same thing (the seed's ``MARK(subsystem_event, fmt, args...)`` and the
later kernel's typed ``TRACE_EVENT``)::

    marker("net.rx", "len=%d dev=%s")          # fields len: int, dev: str
    marker("net.tx", length=int, dev=str)      # fields length: int, dev: str

Conversions: ``%d %i %u %x %X %o`` int, ``%f %F %g %G %e %E`` float, ``%s`` str, ``%r`` any
object (shown with repr); flags, width and precision are allowed (``%08.3f``); ``%%`` is a
literal percent. A field takes its name from the word written just before it (``len=%d``,
``len: %d``), else ``arg0``, ``arg1``, ...

A field name is a Python identifier not starting with ``_`` and not a keyword; it may be
non-ASCII (``größe=%d``, ``città=int``), as Python identifiers may. Names are NFKC-normalised,
as Python normalises the identifiers it compiles, so ``m(ﬁ=1)`` fires a field declared
``"ﬁ=%d"`` (stored as ``fi``). How a name that CTF cannot spell is written into a trace is
:func:`tracemark.ctf.writer.ctf_field_key`'s business.

Keyword types: ``int float str bytes bool object any``. A tracer stores each type the same way
whatever the marker was declared with, so the two forms are interchangeable. ``object``
(``%r``) is stored as the value's repr; ``any`` (:class:`AnyValue`, what dynamic probes
capture) keeps a value of one of the plain types as it is and stores anything else as its
repr cut to :data:`MAX_REPR` characters (:func:`repr_text`; the table is in
:mod:`tracemark.probes.events`).

Context fields
--------------
A keyword field may instead be read from a :class:`contextvars.ContextVar` the program
already sets (``request_id=tracemark.context(REQUEST_ID, int)``, a :class:`Context`): the
marker reads it when it fires, callers do not pass it, and every tracer sees it as an
ordinary field of its type (so ``--filter 'request_id == 27'`` selects one request). While
the marker is inactive nothing is read. An unset variable gives the context's ``default``:
the one given, else the variable's own default, else :data:`CONTEXT_DEFAULTS` of the type
(``-1``, ``nan``, ``""``, ``b""``, ``False``, ``None``); never an exception. A value of
another type than declared is a bad-arguments fault, like a wrong argument.
"""

from __future__ import annotations

import contextvars
import keyword
import math
import re
import unicodedata

from .._frozen import frozen

__all__ = [
    "CONTEXT_DEFAULTS",
    "FIELD_TYPES",
    "MAX_REPR",
    "AnyValue",
    "Context",
    "Field",
    "ReprText",
    "fields_from_format",
    "fields_from_types",
    "render",
    "repr_text",
]


class AnyValue:
    """The field type ``any``: a value of whatever type, kept typed where it is one of
    ``None bool int float str bytes`` (exact types; an int within int64), else its repr
    (:func:`repr_text`). Only a marker for declarations: never instantiated."""

    __slots__ = ()


AnyValue.__name__ = AnyValue.__qualname__ = "any"  # how declarations and traces name it

#: The types a field can have, by their name in a declaration.
FIELD_TYPES: dict[str, type] = {
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "object": object,
    "any": AnyValue,
}

_CONVERSIONS = {
    **dict.fromkeys("diuxXo", int),
    **dict.fromkeys("fFgGeE", float),
    "s": str,
    "r": object,
}

# A conversion, optionally preceded by the name it describes: "len=%d", "len: %5d". A name
# starts with a letter or _ (any script) not preceded by a non-ASCII word character, so
# "ärger=%d" names "ärger", not "rger".
_SPEC = re.compile(
    r"(?:(?<![^\W\x00-\x7f])(?P<name>[^\W\d]\w*)\s*[=:]\s*)?"
    r"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?:\.(?P<prec>\d+))?(?P<conv>[a-zA-Z%])"
)


class ReprText(str):
    """Text that already is the repr of a value (dynamic probes make it for captured values).

    An ``object`` field is stored as the repr of its value; a ReprText is stored as it is, so
    a value made text once is not quoted a second time.
    """

    __slots__ = ()


#: Longest repr recorded for an ``any`` value that is not of a plain type (and for a
#: probe's exception message), in characters.
MAX_REPR = 200


def repr_text(value: object) -> ReprText:
    """``repr(value)`` cut to :data:`MAX_REPR` characters (ending ``...`` when cut), as a
    :class:`ReprText`; never raises: a repr that fails says so (``<repr failed: E>``)."""
    if type(value) is ReprText:
        return value
    try:
        text = repr(value)
    except Exception as exc:
        return ReprText(f"<repr failed: {type(exc).__name__}>")
    if not isinstance(text, str):
        return ReprText("<repr failed: not a str>")
    return ReprText(text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "...")


#: What an unset context field records, by type (when neither the declaration nor the
#: variable gives a default).
CONTEXT_DEFAULTS: dict[type, object] = {
    int: -1,
    float: math.nan,
    str: "",
    bytes: b"",
    bool: False,
    object: None,
    AnyValue: None,
}

_NO_DEFAULT = object()


class Context:
    """A field read from a :class:`contextvars.ContextVar` when the marker fires (see the
    module docstring); made by :func:`tracemark.context`."""

    __slots__ = ("default", "type", "var")

    var: contextvars.ContextVar
    type: type
    default: object

    def __init__(
        self, var: contextvars.ContextVar, type_: object = object, default: object = _NO_DEFAULT
    ) -> None:
        if not isinstance(var, contextvars.ContextVar):
            raise ValueError(f"a context field reads a contextvars.ContextVar, not {var!r}")
        if isinstance(type_, str):
            type_ = FIELD_TYPES.get(type_, type_)
        if type_ not in FIELD_TYPES.values():
            allowed = ", ".join(FIELD_TYPES)
            raise ValueError(f"a context field's type is one of {allowed}, not {type_!r}")
        if default is _NO_DEFAULT:
            # The variable's own default, if it was created with one: read in an empty
            # context, where only that default can answer.
            try:
                default = contextvars.Context().run(var.get)
            except LookupError:
                default = CONTEXT_DEFAULTS[type_]  # type: ignore[index]
        set_ = object.__setattr__
        set_(self, "var", var)
        set_(self, "type", type_)
        set_(self, "default", default)
        from .dispatch import MISFITS  # (dispatch imports this module)

        if MISFITS[type_](default):  # type: ignore[index]
            raise ValueError(
                f"context field default {default!r} for ContextVar {var.name!r} is not "
                f"a {type_.__name__}"  # type: ignore[union-attr]
            )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Context is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not Context:
            return NotImplemented
        same = other.default is self.default or other.default == self.default
        return other.var is self.var and other.type is self.type and bool(same)

    def __hash__(self) -> int:
        return hash((id(self.var), self.type))

    def __repr__(self) -> str:
        return f"context({self.var.name}, {self.type.__name__}, default={self.default!r})"


@frozen
class Field:
    """One value a marker carries: its name and its type (one of :data:`FIELD_TYPES`); a
    context field also its :class:`Context` (callers do not pass it)."""

    name: str
    type: type
    context: Context | None = None

    def __str__(self) -> str:
        text = f"{self.name}: {self.type.__name__}"
        return text if self.context is None else f"{text} = context({self.context.var.name})"


def fields_from_format(fmt: str) -> tuple[Field, ...]:
    """The fields a printf-style format declares, in order.

    Raises ValueError for a conversion tracemark does not know, or two fields with one name.
    """
    if not isinstance(fmt, str):
        raise ValueError(f"a marker format must be a str, not {type(fmt).__name__}")
    fields = []
    for m in _SPEC.finditer(fmt):
        conv = m["conv"]
        if conv == "%":
            continue
        if conv not in _CONVERSIONS:
            raise ValueError(
                f"unknown conversion %{conv} in format {fmt!r}; "
                "use %d %i %u %x %X %o (int), %f %g %e (float), %s (str) or %r (any object)"
            )
        name = _normal(m["name"]) if m["name"] else f"arg{len(fields)}"
        fields.append(Field(name, _CONVERSIONS[conv]))
    return _checked(fields, f"format {fmt!r}")


def fields_from_types(types: dict[str, object]) -> tuple[Field, ...]:
    """The fields declared as keywords: ``{"length": int, "dev": str}`` (types or their names)."""
    fields = []
    for name, typ in types.items():
        if isinstance(typ, Context):
            fields.append(Field(_normal(name), typ.type, typ))  # type: ignore[arg-type]
            continue
        if isinstance(typ, contextvars.ContextVar):
            raise ValueError(
                f"field {name!r} is a ContextVar: declare it as "
                f"{name}=tracemark.context({typ.name}, TYPE) to read it when the marker fires"
            )
        if isinstance(typ, str):
            typ = FIELD_TYPES.get(typ, typ)
        if typ not in FIELD_TYPES.values():
            allowed = ", ".join(FIELD_TYPES)
            raise ValueError(f"field {name!r} has type {typ!r}; a field type is one of {allowed}")
        fields.append(Field(_normal(name), typ))  # type: ignore[arg-type]
    return _checked(fields, "keywords")


def _normal(name: object) -> object:
    """``name`` NFKC-normalised (what Python does to the identifiers it compiles)."""
    return unicodedata.normalize("NFKC", name) if isinstance(name, str) else name


def _checked(fields: list[Field], where: str) -> tuple[Field, ...]:
    seen = set()
    for f in fields:
        if not isinstance(f.name, str) or not f.name.isidentifier() or f.name.startswith("_"):
            raise ValueError(
                f"field name {f.name!r} in {where} is not a public identifier "
                "(letters, digits and _, not starting with _ or a digit)"
            )
        if keyword.iskeyword(f.name):
            raise ValueError(
                f"field name {f.name!r} in {where} is a Python keyword, so the marker could "
                "not be fired with it as a keyword argument; choose another name"
            )
        if f.name in seen:
            raise ValueError(f"field {f.name!r} appears twice in {where}")
        seen.add(f.name)
    return tuple(fields)


def render(fmt: str | None, fields: tuple[Field, ...], values: tuple) -> str:
    """The text of one event: its format applied, or ``name=value`` pairs when it has none.

    Never raises: a value the format cannot take is shown with ``name=value`` instead.
    """
    if fmt is not None:
        try:
            return fmt % values
        except (TypeError, ValueError):
            pass
    return " ".join(f"{f.name}={show_value(v)}" for f, v in zip(fields, values, strict=False))


_PLAIN = re.compile(r"[\w.:/@+-]+\Z")


def show_value(value: object) -> str:
    """A value as a person reads it in a one-line event: plain when unambiguous, else repr;
    a :class:`ReprText` as it is (it is a repr already: ``<Request GET />``, not quoted)."""
    if type(value) is ReprText:
        return value
    if isinstance(value, str):
        return value if _PLAIN.match(value) else repr(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)
