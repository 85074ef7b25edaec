"""Markers: declaration (:mod:`.fields`), the registry (:mod:`.registry`) and the firing path
(:mod:`.dispatch`). The public functions are re-exported from :mod:`tracemark`."""

from __future__ import annotations

from .dispatch import MAX_NESTING, synchronize
from .fields import Field
from .registry import Connection, Marker, MarkerInfo, connect, disconnect, markers

__all__ = [
    "MAX_NESTING",
    "Connection",
    "Field",
    "Marker",
    "MarkerInfo",
    "connect",
    "disconnect",
    "markers",
    "synchronize",
]
