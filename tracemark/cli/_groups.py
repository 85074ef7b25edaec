"""``--by FIELD``: figures kept apart per value of one field, in bounded memory.

Shared by ``tracemark stats --by`` (per marker) and ``tracemark spans --by`` (per span name).

Guarantees
----------
* At most :data:`GROUP_CAP` groups (1,000) per marker or span name: the first values seen get
  a group each; every later value shares one ``other`` group, and how many distinct values
  went there is counted exactly up to :data:`MORE_LIMIT` (100,000), as a lower bound beyond.
  Nothing is dropped: every event or span is in exactly one group.
* Values are grouped as they compare: ``1`` and ``1.0`` share a group, every NaN shares one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["GROUP_CAP", "MORE_LIMIT", "Groups"]

#: The most groups kept per marker (or span name); values beyond share the ``other`` group.
GROUP_CAP = 1_000
#: The most distinct values beyond the cap that are counted exactly.
MORE_LIMIT = 100_000

T = TypeVar("T")


class _Nan:
    """The one key of every NaN (nan != nan would make each its own group)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "nan"


_NAN = _Nan()


def _key(value: Any) -> Hashable:
    if isinstance(value, float) and value != value:
        return _NAN
    try:
        hash(value)
    except TypeError:  # the reader gives hashable values; be safe with anything else
        return repr(value)
    return value


class Groups(Generic[T]):
    """``make()``'s aggregate per value, at most ``cap`` of them, then one shared ``other``."""

    def __init__(self, make: Callable[[], T], cap: int | None = None) -> None:
        self.make = make
        self.cap = GROUP_CAP if cap is None else cap
        #: value -> aggregate, in order of first appearance.
        self.groups: dict[Hashable, T] = {}
        #: The aggregate of every value beyond the cap (None while there is none).
        self.other: T | None = None
        self._more: set[Hashable] = set()
        self._more_capped = False

    def get(self, value: Any) -> T:
        """The aggregate ``value`` goes into (made on first use)."""
        key = _key(value)
        group = self.groups.get(key)
        if group is not None:
            return group
        if len(self.groups) < self.cap:
            group = self.groups[key] = self.make()
            return group
        if key not in self._more:
            if len(self._more) < MORE_LIMIT:
                self._more.add(key)
            else:
                self._more_capped = True
        if self.other is None:
            self.other = self.make()
        return self.other

    @property
    def more(self) -> int:
        """Distinct values in ``other`` (a lower bound when :attr:`more_exact` is false)."""
        return len(self._more)

    @property
    def more_exact(self) -> bool:
        return not self._more_capped

    def more_text(self) -> str:
        """``"1,234 more groups"`` (``"100,000+ more groups"`` past MORE_LIMIT)."""
        plus = "" if self.more_exact else "+"
        return f"{self.more:,}{plus} more group{'s' if self.more != 1 or plus else ''}"

    @staticmethod
    def value_of(key: Hashable) -> Any:
        """The value a group key stands for (NaN for the NaN group)."""
        return float("nan") if key is _NAN else key
