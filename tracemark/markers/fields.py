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

Keyword types: ``int float str bytes bool object``. A tracer stores each type the same way
whatever the marker was declared with, so the two forms are interchangeable.
"""

from __future__ import annotations

import keyword
import re
import unicodedata
from dataclasses import dataclass

__all__ = [
    "FIELD_TYPES",
    "Field",
    "ReprText",
    "fields_from_format",
    "fields_from_types",
    "render",
]

#: The types a field can have, by their name in a declaration.
FIELD_TYPES: dict[str, type] = {
    "int": int,
    "float": float,
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "object": object,
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


@dataclass(frozen=True)
class Field:
    """One value a marker carries: its name and its type (one of :data:`FIELD_TYPES`)."""

    name: str
    type: type

    def __str__(self) -> str:
        return f"{self.name}: {self.type.__name__}"


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
    """A value as a person reads it in a one-line event: plain when unambiguous, else repr."""
    if isinstance(value, str):
        return value if _PLAIN.match(value) else repr(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)
