"""Fields are declared from a printf format or from keywords, and mean the same either way."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracemark.markers.fields import Field, fields_from_format, fields_from_types, render


def test_format_names_fields_from_the_word_before_them():
    assert fields_from_format("len=%d dev=%s") == (Field("len", int), Field("dev", str))
    assert fields_from_format("took: %8.3f ms") == (Field("took", float),)


def test_format_without_names_numbers_the_fields():
    assert fields_from_format("%d packets from %s") == (Field("arg0", int), Field("arg1", str))


@pytest.mark.parametrize(
    ("conv", "typ"),
    [("d", int), ("i", int), ("u", int), ("x", int), ("X", int), ("o", int)]
    + [("f", float), ("g", float), ("e", float), ("E", float), ("s", str), ("r", object)],
)
def test_each_conversion_has_a_type(conv, typ):
    assert fields_from_format(f"v=%{conv}") == (Field("v", typ),)


def test_literal_percent_is_not_a_field():
    assert fields_from_format("load=%d%% cpu=%s") == (Field("load", int), Field("cpu", str))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("v=%q", "unknown conversion %q"),
        ("a=%d a=%s", "appears twice"),
        ("_x=%d", "not a public identifier"),
        ("from=%s", "Python keyword"),
    ],
)
def test_bad_formats_say_what_is_wrong(fmt, message):
    with pytest.raises(ValueError, match=message):
        fields_from_format(fmt)


def test_keyword_types_by_type_or_by_name():
    assert fields_from_types({"n": int, "s": "str", "o": object}) == (
        Field("n", int),
        Field("s", str),
        Field("o", object),
    )


def test_unknown_keyword_type_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="int, float, str, bytes, bool, object"):
        fields_from_types({"n": list})


def test_render_applies_the_format_or_lists_fields():
    assert render("len=%d dev=%s", fields_from_format("len=%d dev=%s"), (3, "eth0")) == (
        "len=3 dev=eth0"
    )
    fields = fields_from_types({"n": int, "who": str, "f": float})
    assert render(None, fields, (3, "a b", 0.5)) == "n=3 who='a b' f=0.5"


_SAMPLE = {int: 7, float: 2.5, str: "v", object: None}


@given(
    st.lists(
        st.tuples(st.sampled_from(["", "n{}=", "x{}: ", "%% "]), st.sampled_from("diuxXofgeEsr")),
        max_size=8,
    )
)
def test_parsing_agrees_with_python_percent_operator(parts):
    """The fields found are exactly the values Python's own ``%`` consumes, in order."""
    fmt = " ".join(f"{prefix.format(i)}%{conv}" for i, (prefix, conv) in enumerate(parts))
    fields = fields_from_format(fmt)
    assert len(fields) == len(parts)
    values = tuple(_SAMPLE[f.type] for f in fields)
    assert render(fmt, fields, values) == fmt % values
