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


def test_non_ascii_names_are_fields_like_any_other():
    """Python identifiers may be non-ASCII: a format names them whole, not from the first
    ASCII letter on."""
    assert fields_from_format("größe=%d ärger=%s") == (Field("größe", int), Field("ärger", str))
    assert fields_from_types({"città": int}) == (Field("città", int),)
    assert fields_from_format("1ärger=%d") == (Field("ärger", int),)  # as "1len=%d" -> len


def test_names_are_nfkc_normalised_as_python_normalises_identifiers():
    (field,) = fields_from_format("ﬁ=%d")
    assert field.name == "fi"
    fire = {}
    exec("def f(**kw): fire.update(kw)\nf(ﬁ=1)", {"fire": fire})
    assert list(fire) == [field.name]  # what a keyword call passes
    assert fields_from_types({"ﬁ": int}) == (Field("fi", int),)


@pytest.mark.parametrize("name", ["é€", "x→", "é-", "_é", "2é"])
def test_non_identifiers_are_refused_whatever_the_script(name):
    with pytest.raises(ValueError, match="not a public identifier"):
        fields_from_types({name: int})


_TSDL_IDENT = __import__("re").compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_identifiers = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "Pc", "Mn", "Mc")), min_size=1
).filter(lambda s: s.isidentifier() and not s.startswith("_"))


@given(_identifiers, _identifiers)
def test_ctf_keys_are_tsdl_identifiers_reversible_and_distinct(a, b):
    from tracemark.ctf.writer import ctf_field_key, field_name_from_key

    for name in (a, b):
        key = ctf_field_key(name)
        assert _TSDL_IDENT.match("_" + key) and _TSDL_IDENT.match(f"__{key}_len")
        assert key.isascii()
        assert field_name_from_key(key) == name
        if name.isascii() and name not in ("Bool", "Complex", "Imaginary"):
            assert key == name  # ASCII names are written as before
        for other in (a, b):  # a field key is never another field's length key
            assert key != f"_{ctf_field_key(other)}_len"
    assert (ctf_field_key(a) == ctf_field_key(b)) == (a == b)


@pytest.mark.parametrize(
    "pair", [("città", "citt_u00e0"), ("xàé", "x_u00e0é"), ("Bool", "Bool"), ("a_à", "a__à")]
)
def test_escaped_keys_never_collide_with_names_that_spell_the_escape(pair):
    from tracemark.ctf.writer import ctf_field_key

    a, b = pair
    if a == b:
        assert ctf_field_key(a) == "0Bool"
        return
    assert ctf_field_key(a) != ctf_field_key(b)


@pytest.mark.parametrize("key", ["0abc", "0_u0041", "0_uzzzz", "0a_b", "_x", "0", "0_u00e", "é x"])
def test_keys_not_in_canonical_form_are_refused(key):
    from tracemark.ctf.writer import field_name_from_key

    assert field_name_from_key(key) is None
