"""--filter: a safe expression language; bad expressions point at the problem."""

from types import SimpleNamespace

import pytest

from tracemark.cli.filter import FilterError, compile_filter


def event(name="net.rx", fields=None, **more):
    return SimpleNamespace(
        name=name,
        pid=10,
        tid=11,
        thread="worker-1",
        timestamp=1_000,
        fields={**(fields or {}), **more},
    )


RX = event(len=1600, dev="eth0", ok=True)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('len > 1500 and dev == "eth0"', True),
        ('len > 1500 and dev == "lo"', False),
        ('name.startswith("net.")', True),
        ('name.endswith(".tx")', False),
        ('dev.contains("th")', True),
        ('dev.matches("eth*")', True),
        ('dev.upper() == "ETH0"', True),
        ("1000 < len <= 1600", True),
        ("1000 < len < 1600", False),
        ('dev in ("eth0", "lo")', True),
        ('dev not in ["eth0"]', False),
        ("len % 2 == 0 and len // 100 == 16 and len - 1 == 1599", True),
        ("pid == 10 and tid == 11 and timestamp > 999", True),
        ('thread == "worker-1"', True),
        ("len(dev) == 4 and abs(-len) == 1600", True),
        ("ok", True),
        ("not ok or len < 0", False),
        ('str(len).startswith("16")', True),
    ],
)
def test_expressions_evaluate_on_fields_and_metadata(expr, expected):
    assert compile_filter(expr)(RX) is expected


def test_a_missing_field_matches_no_comparison():
    tx = event("net.tx", length=3)
    assert compile_filter("len > 0")(tx) is False
    assert compile_filter("len == None")(tx) is False
    assert compile_filter("not len > 0")(tx) is True
    assert compile_filter("len + 1 > 0")(tx) is False


def test_values_of_the_wrong_type_never_raise():
    odd = event(len="many", dev=3)
    assert compile_filter("len > 5")(odd) is False
    assert compile_filter('dev.startswith("e")')(odd) is False
    assert compile_filter("len / 0 > 1")(event(len=1)) is False


def test_a_field_named_like_metadata_is_reached_through_fields():
    ev = event("a.b", {"name": "inner"})
    assert compile_filter('name == "a.b"')(ev)
    assert compile_filter('fields["name"] == "inner"')(ev)


@pytest.mark.parametrize(
    ("expr", "column", "words"),
    [
        ('__import__("os")', 0, "can be called"),
        ('open("x").read()', 9, "unknown method"),
        ("len.__class__", 3, "attribute"),
        ("len >> 3", 4, ">>"),
        ("(len) ** 2 > 1", 6, "**"),
        ("len is None", 4, "'is'"),
        ("len ==", 6, "incomplete"),
        ("a = 3", 2, "syntax"),
        ("[x for x in y]", 0, "comprehension"),
        ("lambda: 1", 0, "lambda"),
        ("dev.split()", 3, "unknown method"),
        ("dev.startswith", 3, "call it"),
        ('dev.startswith("a", "b")', 0, "1 argument"),
        ('f"{len}"', 0, "f-string"),
        ("  len > {1}", 8, "set"),
        ("", 0, "empty"),
        ("len > 1\nor 2", 7, "not allowed"),
    ],
)
def test_bad_expressions_name_the_problem_and_its_column(expr, column, words):
    with pytest.raises(FilterError) as info:
        compile_filter(expr)
    assert info.value.column == column
    assert words in info.value.message
    expr_line, caret_line = info.value.pointer().splitlines()
    assert caret_line.index("^") - 2 == column
    assert expr_line[2:] == expr.replace("\n", " ")


def test_unknown_names_are_caught_when_the_fields_are_known():
    with pytest.raises(FilterError) as info:
        compile_filter("name == 'x' and lenn > 3", {"len", "dev"})
    assert info.value.column == 16
    assert "'lenn'" in info.value.message and "dev, len" in info.value.message
    assert compile_filter("len > 3", {"len"})(RX)


def test_no_user_text_reaches_eval(monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert compile_filter('len > 3 and dev == "eth0"')(RX)
