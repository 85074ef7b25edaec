"""What OpenTelemetry can carry: the one rule that turns a marker's field values into
OpenTelemetry attribute values, for the live bridge (:mod:`tracemark.tracers.otel`) and the
OTLP export of a recorded trace (:mod:`tracemark.export.otlp`).

OpenTelemetry attribute values are a string, a boolean, a 64-bit signed integer, a double, or
a homogeneous array of one of those (OpenTelemetry specification, "Common": *Attribute*).
A marker's field may hold more than that. The rule, applied value by value, never raises:

==========================================  ==============================================
field value                                 attribute value
==========================================  ==============================================
``bool``                                    the same bool
``int`` within int64                        the same int
``int`` beyond int64                        its decimal digits as a string
finite ``float``                            the same float
NaN, ``inf``, ``-inf``                      the strings ``"nan"``, ``"inf"``, ``"-inf"``
``str`` that is valid Unicode               the same string
``str`` with lone surrogates                surrogates escaped: ``"\\udcff"`` (backslashreplace)
``bytes``, ``bytearray``, ``memoryview``    lowercase hex digits (``b"\\x01\\xff"`` -> ``"01ff"``)
list or tuple whose converted items are     a list of the converted items
all bool, all int, all float or all str
``None``, anything else                     ``repr(value)`` (or ``"<unrepresentable T>"`` if
                                            ``repr`` itself raises), surrogates escaped
==========================================  ==============================================

A float NaN is a valid double on the wire, but backends disagree about it (JSON has no NaN)
and it cannot be told from a missing value in most query languages: a string is unambiguous.
An int beyond int64 would be refused by the SDK (the attribute dropped with a warning): a
string keeps every digit. Mixed lists (``[1, "a"]``) are not arrays OpenTelemetry accepts:
their ``repr`` keeps what they held.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["attribute_value", "attributes"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

AttributeValue = str | bool | int | float | list


def _text(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _scalar(value: Any) -> str | bool | int | float:
    kind = type(value)
    if kind is bool:
        return value
    if kind is str:
        return _text(value)
    if isinstance(value, bool):  # a bool subclass: its truth, as a bool
        return bool(value)
    if isinstance(value, int):
        v = int(value)
        return v if _INT64_MIN <= v <= _INT64_MAX else str(v)
    if isinstance(value, float):
        v = float(value)
        if math.isfinite(v):
            return v
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(value, str):
        return _text(str(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ is the program's, never the bridge's error
        return f"<unrepresentable {type(value).__name__}>"
    return _text(text) if isinstance(text, str) else f"<unrepresentable {type(value).__name__}>"


def attribute_value(value: Any) -> AttributeValue:
    """The OpenTelemetry attribute value for one field value, by the module's rule.

    Never raises; the result is always one OpenTelemetry accepts."""
    if isinstance(value, (list, tuple)):
        items = [_scalar(v) for v in value]
        kinds = {type(v) for v in items}
        if len(kinds) <= 1:
            return items
        return _scalar(value)
    return _scalar(value)


def attributes(fields: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """Every field converted by :func:`attribute_value`, keys as they are (field names are
    identifiers, valid attribute keys)."""
    return {name: attribute_value(v) for name, v in fields.items()}
