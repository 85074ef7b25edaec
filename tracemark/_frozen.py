"""Small immutable value classes without :mod:`dataclasses`.

``@frozen`` on a class whose body lists annotated fields (some with defaults, after those
without) gives it what ``@dataclass(frozen=True)`` would for tracemark's uses: an ``__init__``
taking the fields in order (positional or keyword, defaults kept), ``__repr__``, ``__eq__``
and ``__hash__`` over the fields (equal only to the same class), attributes that cannot be
set or deleted afterwards (:class:`FrozenInstanceError`, an AttributeError), ``_replace(**changes)``
for a changed copy, and ``__match_args__``.

Why not dataclasses: it imports :mod:`inspect` (and with it ``ast``, ``dis``, ``tokenize``),
about a third of what ``import tracemark`` would cost; the classes on the import path (the
marker core's ``Field``, ``MarkerInfo``, ``Site``) need none of its other features. The
``__init__`` is generated source (:mod:`._codegen`), so its signature and tracebacks read as
written.
"""

from __future__ import annotations

from ._codegen import function_code

__all__ = ["FrozenInstanceError", "frozen"]


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen value was set or deleted."""


def _setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def frozen(cls: type) -> type:
    """Make ``cls`` an immutable value class over its annotated fields (see the module)."""
    # (the class's own annotations: the inspect.get_annotations ruff suggests costs inspect)
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = tuple(cls.__dict__[n] for n in names if n in cls.__dict__)
    if any(n not in cls.__dict__ for n in names[len(names) - len(defaults) :]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with")
    body = "".join(f"    _set(self, {n!r}, {n})\n" for n in names) or "    pass\n"
    source = f"def __init__(self, {', '.join(names)}):\n{body}"
    init = type(_setattr)(function_code(source, "frozen"), {"_set": object.__setattr__})
    init.__defaults__ = defaults or None
    init.__qualname__ = f"{cls.__qualname__}.__init__"

    def __repr__(self: object) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: object, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in names)

    def __hash__(self: object) -> int:
        return hash(tuple(getattr(self, n) for n in names))

    def _replace(self: object, **changes: object) -> object:
        return cls(**{n: changes.pop(n, getattr(self, n)) for n in names}, **changes)

    for name, value in (
        ("__init__", init),
        ("__repr__", __repr__),
        ("__eq__", __eq__),
        ("__hash__", __hash__),
        ("_replace", _replace),
    ):
        if name != "__init__":
            value.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, value)
    cls.__setattr__ = _setattr  # type: ignore[method-assign, assignment]
    cls.__delattr__ = _delattr  # type: ignore[method-assign, assignment]
    cls.__match_args__ = names  # type: ignore[attr-defined]
    return cls
