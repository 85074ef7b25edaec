"""The conversion of field values to OpenTelemetry attributes (export/otel_attributes.py):
every value gives an attribute OpenTelemetry accepts, by the documented table, never an error."""

import math

from hypothesis import given
from hypothesis import strategies as st

from tracemark.export.otel_attributes import attribute_value, attributes


def valid(v):
    if isinstance(v, list):
        return len({type(x) for x in v}) <= 1 and all(valid(x) for x in v)
    if type(v) is int:
        return -(2**63) <= v < 2**63
    if type(v) is float:
        return math.isfinite(v)
    if type(v) is str:
        v.encode("utf-8")  # raises on a lone surrogate
        return True
    return type(v) is bool


def test_the_documented_table():
    assert attribute_value(True) is True
    assert attribute_value(2**63 - 1) == 2**63 - 1
    assert attribute_value(2**63) == "9223372036854775808"
    assert attribute_value(-(2**64)) == "-18446744073709551616"
    assert attribute_value(1.5) == 1.5
    assert [attribute_value(x) for x in (math.nan, math.inf, -math.inf)] == ["nan", "inf", "-inf"]
    assert attribute_value("caf\u00e9") == "caf\u00e9"
    assert attribute_value("a\udcffb") == "a\\udcffb"
    assert attribute_value(b"\x01\xff") == "01ff"
    assert attribute_value(bytearray(b"\x00")) == "00"
    assert attribute_value([1, 2]) == [1, 2]
    assert attribute_value((1.0, math.nan)) == "(1.0, nan)"  # a float and a str: mixed
    assert attribute_value([1, "a"]) == "[1, 'a']"
    assert attribute_value([True, 1]) == "[True, 1]"
    assert attribute_value(None) == "None"
    assert attribute_value({"k": 1}) == "{'k': 1}"


def test_a_broken_repr_is_named_not_raised():
    class Broken:
        def __repr__(self):
            raise RuntimeError("no")

    assert attribute_value(Broken()) == "<unrepresentable Broken>"


def test_subclasses_become_their_base_values():
    class Flag(int):
        pass

    assert type(attribute_value(Flag(3))) is int and attribute_value(Flag(3)) == 3


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary()
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=8,
)


@given(st.dictionaries(st.text(min_size=1), values, max_size=5))
def test_every_value_gives_an_attribute_opentelemetry_accepts(fields):
    converted = attributes(fields)
    assert converted.keys() == fields.keys()
    assert all(valid(v) for v in converted.values())


@given(values)
def test_the_sdk_keeps_every_converted_value(value):
    from opentelemetry.attributes import BoundedAttributes

    kept = BoundedAttributes(attributes={"v": attribute_value(value)}, immutable=False)
    assert "v" in kept
