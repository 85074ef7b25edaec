"""Faults: how tracing goes wrong without breaking the traced program.

Rule (DESIGN.md): a probe that raises, a marker fired with the wrong arguments, a buffer that
overflows -- the program goes on, the fault is *counted*, *reported once* (a
:class:`TracemarkWarning` through :mod:`warnings`, so ``-W error`` or a logging bridge sees it)
and stays visible afterwards (:func:`tracemark.markers` shows per-marker and per-probe counts,
:func:`counts` shows them all).

Strict mode (``TRACEMARK_STRICT=1`` or :func:`set_strict`) is for test suites: the fault is still
counted, then raised in the traced program so a test fails at the line that caused it.

Reporting itself never raises: a warning filter set to ``error`` turns into a count, not into an
exception inside a marker call.
"""

from __future__ import annotations

import warnings
from collections import Counter

from . import env
from ._forksafe import fork_safe_rlock

__all__ = [
    "MarkerArgumentError",
    "MarkerConflictError",
    "TracemarkWarning",
    "counts",
    "is_strict",
    "report",
    "set_strict",
]


class TracemarkWarning(RuntimeWarning):
    """A tracing fault that was counted instead of raised (see :mod:`tracemark.faults`)."""


class MarkerArgumentError(TypeError):
    """A marker was fired with arguments that do not match its fields (raised only in strict
    mode; otherwise the event is dropped and counted)."""


class MarkerConflictError(ValueError):
    """A marker name was declared again, from another place, with other fields (raised only
    in strict mode; otherwise the newcomer gets a marker of its own: see
    :mod:`tracemark.markers.registry`)."""


# Re-entrant: a signal handler may fire a marker (and report a fault) while this thread is
# inside report() already; a plain Lock would deadlock there. Fork-safe: a fork while another
# thread held it would leave every report in the child waiting for good.
_lock = fork_safe_rlock()
_counts: Counter[tuple[str, str]] = Counter()
_strict = env.STRICT


def set_strict(flag: bool) -> bool:
    """Turn strict mode on or off for the whole process; returns the previous setting."""
    global _strict
    previous, _strict = _strict, bool(flag)
    return previous


def is_strict() -> bool:
    """True when faults raise in the traced program instead of being counted."""
    return _strict


def report(kind: str, key: str, message: str) -> bool:
    """Count one fault of ``kind`` about ``key``; warn the first time that pair is seen.

    Returns True when strict mode asks the caller to raise. The message is the whole
    explanation a user needs: what happened, to what, and what tracemark did about it.
    """
    with _lock:
        _counts[kind, key] += 1
        first = _counts[kind, key] == 1
    if first:
        try:
            warnings.warn(message, TracemarkWarning, stacklevel=4)
        except Exception:  # a filter set to "error": the count above is the record
            pass
    return _strict


def counts() -> dict[tuple[str, str], int]:
    """Every fault counted so far in this process, keyed by ``(kind, key)``."""
    with _lock:
        return dict(_counts)
