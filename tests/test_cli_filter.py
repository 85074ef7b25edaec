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


# -- limits: bounded work, one clear error ----------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("not " * 3000 + "True", "characters long; the limit is 10,000"),
        ("-" * 5000 + "len > 0", "nests more than 100 levels deep"),
        (" + ".join(["len"] * 30000) + " > 0", "characters long"),
        ("not " * 2000 + "True", "nests more than 100 levels deep"),
        ("+".join(["len"] * 2400) + " > 0", "nests more than 100 levels deep"),
        ("(" * 3000 + "len" + ")" * 3000 + " > 0", "nests more than 100 levels deep"),
        ("abs(" * 1500 + "len" + ")" * 1500 + " > 0", "nests more than 100 levels deep"),
        ('len("x" * 1000000000) > 0', "would build a value of 1,000,000,000 items"),
        ('("ab" * 1000) * 1000000 == dev', "would build a value of 2,000,000,000 items"),
        ("len((1,) * 2000000) > 0", "would build a value of 2,000,000 items"),
    ],
)
def test_expressions_too_large_to_evaluate_safely_are_refused(expr, message):
    with pytest.raises(FilterError, match=message) as info:
        compile_filter(expr)
    assert 0 <= info.value.column <= len(expr)
    if len(expr) > 200:
        assert info.value.pointer() == ""  # no 10,000-column caret line


def test_the_limits_leave_ordinary_nesting_alone():
    assert compile_filter("-" * 90 + "len < 0")(RX) is False  # even count: +1600
    assert compile_filter(" + ".join(["len"] * 90) + " == 144000")(RX) is True
    assert compile_filter('dev * 3 == "eth0eth0eth0" and len(dev * 250000) == 1000000')(RX)


@pytest.mark.serial
def test_values_built_from_fields_are_bounded_before_they_are_built():
    import tracemalloc

    tracemalloc.start()
    try:
        big = compile_filter("len(dev * len * len * len) > 0")  # 4 * 1600**3 characters
        assert big(RX) is False
        assert compile_filter("len(dev * len) == 6400")(RX) is True
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


def test_percent_is_arithmetic_not_formatting():
    padded = event(fmt="%0999999999d", n=1)
    assert compile_filter("len(fmt % n) > 0")(padded) is False
    assert compile_filter('len("%0999999999d" % 1) > 0')(padded) is False
    assert compile_filter("n % 2 == 1")(padded) is True


def test_a_filter_too_deep_is_one_line_from_the_command(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, tracemark\n"
        "with tracemark.record(sys.argv[1]):\n"
        "    tracemark.mark('f.d', 'i=%d', 1)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t")], check=True, timeout=60)
    exprs = ["not " * 3000 + "True", "-" * 5000 + "i>0", "+".join(["i"] * 30000) + ">0"]
    exprs += ["not " * 2000 + "True", 'len("x" * 1000000000) > 0']
    for expr in exprs:
        out = subprocess.run(
            [sys.executable, "-m", "tracemark", "view", str(tmp_path / "t"), f"--filter={expr}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        line = out.stderr.splitlines()[0]
        assert line.startswith("tracemark view: error: bad --filter at column ")
        assert len(out.stderr.splitlines()) == (1 if len(expr) > 200 else 3)  # + caret


TYPES = {"len": {"int"}, "dev": {"str"}, "ok": {"bool"}, "raw": {"bytes"}, "x": {"int", "str"}}


@pytest.mark.parametrize(
    ("expr", "column", "says"),
    [
        ('len > "5"', 6, "'len' holds a number in the selected markers, and '5' is text"),
        ('"5" < len', 0, "'len' holds a number"),
        ('fields["len"] == "5"', 17, "without quotes: 5"),
        ("dev == 3", 7, "'dev' holds text in the selected markers, and 3 is a number"),
        ("1 < len < dev", None, None),  # field against field: not checked
        ('raw == "x"', 7, "'raw' holds bytes"),
        ('pid == "10"', 7, "'pid' holds a number"),
        ("thread == 1", 10, "'thread' holds text"),
    ],
)
def test_a_comparison_that_could_never_be_true_is_an_error(expr, column, says):
    if says is None:
        compile_filter(expr, TYPES, field_types=TYPES)
        return
    with pytest.raises(FilterError) as err:
        compile_filter(expr, TYPES, field_types=TYPES)
    assert says in err.value.message and "could never be true" in err.value.message
    assert err.value.column == column


def test_kinds_are_checked_only_against_what_the_markers_hold():
    # A field that is a number in one marker and text in another takes either; in and
    # constants of other kinds (None, tuples) are not checked; without types, nothing is.
    for expr in ('x == "a"', "x == 1", "len in (1, 2)", "len == None", "ok == 1", 'len > "5"'):
        compile_filter(expr, TYPES if expr != 'len > "5"' else None)
    assert compile_filter('x == "a"', TYPES, field_types=TYPES)(event(x="a"))
