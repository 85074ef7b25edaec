"""tracemark list: markers found by reading source, wrong call sites reported as errors."""

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracemark
from tracemark.cli._common import Style
from tracemark.cli.listing import run, scan

ROOT = Path(tracemark.__file__).resolve().parents[1]

GOOD = {
    "app/__init__.py": "",
    "app/net.py": """
        import tracemark
        from tracemark import marker as declare

        rx = tracemark.marker("net.rx", "len=%d dev=%s")
        tx = declare("net.tx", length=int, dev=str)

        def receive(pkt):
            rx(len(pkt), pkt.dev)
            rx(len=3, dev="eth0")
            tx(3, dev="eth0")
            tracemark.mark("net.drop", "reason=%s", "full")
    """,
    "app/use.py": """
        from .net import rx
        from app import net

        def go():
            rx(1, "lo")
            net.tx(1, "lo")
    """,
}

BAD = {
    "bad/__init__.py": "",
    "bad/mod.py": """
        import tracemark as tm

        rx = tm.marker("net.rx", "len=%d dev=%s")
        other = tm.marker("net.other", n=int)

        def f():
            rx(1)
            rx(1, "eth0", 3)
            rx(1, dev="eth0", speed=3)
            rx(1, len=2)
            tm.mark("net.drop", "reason=%s code=%d", "full")

        def g(rx):
            rx(1)  # a parameter named rx is not the marker

        def local():
            tick = tm.marker("net.tick", n=int)
            tick(1)
            tick("too", "many")

        def h(*a, **k):
            rx(*a)
            rx(**k)
            other(*a, bad=1)
    """,
    "bad/decl.py": """
        from tracemark import marker, mark

        dup = marker("net.rx", "len=%d")
        broken = marker("bad name", "x=%d")
        fmt = marker("fmt.bad", "x=%q")
        both = marker("both.bad", "x=%d", y=int)
        mark("net.other", "x=%d", 1)
    """,
    "bad/more.py": """
        from bad.mod import rx

        rx()
    """,
    "bad/syntax.py": """
        def broken(:
    """,
}


def write(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_a_clean_tree_lists_every_marker_with_fields_and_sites(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, GOOD))
    result = scan(["app"])
    assert result.problems == []
    markers = result.markers
    assert set(markers) == {"net.rx", "net.tx", "net.drop"}
    assert [str(f) for f in markers["net.rx"].fields] == ["len: int", "dev: str"]
    assert [str(f) for f in markers["net.tx"].fields] == ["length: int", "dev: str"]
    assert (markers["net.rx"].file, markers["net.rx"].line) == ("app/net.py", 5)
    assert markers["net.rx"].sites == 3  # two in net.py, one imported into use.py
    assert markers["net.tx"].sites == 2  # one direct, one as net.tx
    assert markers["net.drop"].inline and markers["net.drop"].sites == 1
    out, err = io.StringIO(), io.StringIO()
    assert run(["app"], out, err, style=Style(False)) == 0
    assert "net.rx(len: int, dev: str)\n  declared app/net.py:5; 3 call sites" in out.getvalue()
    assert err.getvalue() == ""


def test_wrong_call_sites_are_errors_with_file_line_and_column(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, BAD))
    problems = [str(p) for p in scan(["bad"]).problems]
    expected = [
        "bad/decl.py:5:10: error: marker 'bad name': invalid marker name",
        "bad/decl.py:6:7: error: marker 'fmt.bad': unknown conversion %q",
        "bad/decl.py:7:8: error: marker 'both.bad': fields come from a format or from "
        "keywords, not both",
        "bad/decl.py:8:1: error: marker 'net.other' has fields (x: int) here but (n: int)",
        "bad/mod.py:4:6: error: marker 'net.rx' has fields (len: int, dev: str) here but "
        "(len: int) where it is declared at bad/decl.py:4",
        "bad/mod.py:8:5: error: net.rx(len, dev) called without 'dev'",
        "bad/mod.py:9:5: error: net.rx(len, dev) takes 2 values, called with 3 positional",
        "bad/mod.py:10:23: error: net.rx(len, dev) has no field 'speed'",
        "bad/mod.py:11:11: error: net.rx(len, dev): field 'len' is given twice",
        "bad/mod.py:12:5: error: mark 'net.drop': format 'reason=%s code=%d' has 2 fields, "
        "given 1 value",
        "bad/mod.py:20:5: error: net.tick(n) takes 1 value, called with 2 positional",
        "bad/mod.py:25:15: error: net.other(n) has no field 'bad'",
        "bad/more.py:4:1: error: net.rx(len, dev) called without 'len', 'dev'",
        "bad/syntax.py:2:12: error: cannot parse",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for got, want in zip(problems, expected, strict=True):
        assert got.startswith(want), (got, want)


def test_the_command_exits_1_on_errors_and_names_them(tmp_path):
    write(tmp_path, BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "tracemark", "list", "bad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "bad/mod.py:9:5: error:" in proc.stderr
    assert "14 errors" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_nothing_is_imported(tmp_path, monkeypatch):
    files = dict(GOOD)
    files["app/boom.py"] = (
        "raise SystemExit('imported!')\nimport tracemark\ntracemark.mark('a.b')\n"
    )
    monkeypatch.chdir(write(tmp_path, files))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = scan(["app.boom"])  # a module name, found on sys.path
    assert set(result.markers) == {"a.b"}
    assert "app.boom" not in sys.modules


def test_unknown_targets_are_a_usage_error(tmp_path, monkeypatch):
    from tracemark.cli._common import CliError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CliError) as info:
        scan(["no.such.module"])
    assert info.value.code == 2


def test_the_bundled_demo_is_clean():
    result = scan(["tracemark.demo"])
    assert result.problems == []
    assert "shop.order.received" in result.markers


def test_files_that_cannot_be_read_safely_are_skipped_and_the_command_goes_on(tmp_path):
    """A FIFO named like a module (which hung), 100,000 unary minuses (MemoryError), nesting
    deeper than the checker's recursion, a file beyond the size limit: each is reported as
    skipped with its reason; the good file is still listed and checked."""
    import os

    from tracemark.cli.listing import MAX_SOURCE

    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text(
        'import tracemark\nm = tracemark.marker("ok.m", "n=%d")\nm(1, 2)\n'
    )
    (src / "neg.py").write_text("x = " + "-" * 100_000 + "1\n")
    (src / "deep.py").write_text(
        "import tracemark\ny = "
        + "+".join(["f(1)"] * 3000)
        + "\nz = "
        + "(" * 150
        + "1"
        + ")" * 150
    )
    os.mkfifo(src / "x.py")
    with open(src / "huge.py", "wb") as f:
        f.truncate(MAX_SOURCE + 1)
    proc = subprocess.run(
        [sys.executable, "-m", "tracemark", "list", "src"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert "ok.m(n: int)" in proc.stdout
    errors = proc.stderr.splitlines()
    assert "src/good.py:3:1: error: ok.m(n) takes 1 value, called with 2 positional arguments" in (
        errors
    )
    assert "src/x.py:1:1: error: skipped: not a regular file" in errors
    assert "src/huge.py:1:1: error: skipped: larger than 10 MiB" in errors
    assert "src/neg.py:1:1: error: skipped: nested too deeply to check" in errors
    assert "src/deep.py:1:1: error: skipped: nested too deeply to check" in errors
    assert errors[-1].endswith("; 5 errors")


SPANS = {
    "sp/__init__.py": "",
    "sp/decl.py": """\
        import tracemark
        from tracemark import span as mkspan

        q = tracemark.span("db.query", table=str)
        r = mkspan("req", "path=%s")
        tracemark.span("bad name")
        """,
    "sp/use.py": """\
        from .decl import q, r

        def handler(path):
            r.begin(path)
            with q("users"):
                pass
            q.begin("a", "b")
            q.end(1)
            with q(rows=1):
                pass
            r.end()
        """,
}


def test_spans_declare_two_markers_and_their_call_sites_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, SPANS))
    result = scan(["sp"])
    markers = result.markers
    assert {n for n in markers if n.startswith(("db.", "req"))} == {
        "db.query.begin",
        "db.query.end",
        "req.begin",
        "req.end",
    }
    assert [str(f) for f in markers["db.query.begin"].fields] == ["table: str"]
    assert markers["db.query.end"].fields == () and markers["req.end"].sites == 1
    assert markers["db.query.begin"].sites == 3  # with q(...) twice, q.begin once
    assert markers["db.query.end"].sites == 3  # with q(...) twice, q.end once
    problems = [str(p) for p in result.problems]
    expected = [
        "sp/decl.py:6:1: error: span 'bad name': invalid marker name",
        "sp/use.py:7:5: error: db.query.begin(table) takes 1 value, called with 2 positional",
        "sp/use.py:8:5: error: db.query.end() takes 0 values, called with 1 positional",
        "sp/use.py:9:12: error: db.query.begin(table) has no field 'rows'",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for got, want in zip(problems, expected, strict=True):
        assert got.startswith(want), (got, want)


DECORATED = {
    "dec.py": """\
        import contextvars
        import tracemark
        from tracemark import context

        REQ = contextvars.ContextVar("req")
        q = tracemark.span("app.q", table=str, req=tracemark.context(REQ, int))
        m = tracemark.marker("app.m", n=int, req=context(REQ, type=int))

        @q
        def lookup(table, limit):
            m(limit)
            with q(table):
                pass

        class C:
            @staticmethod
            @q
            def s(tabel):
                m(1, 2)
        """,
}


def test_decorated_functions_are_sites_and_context_fields_are_not_passed(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, DECORATED))
    result = scan(["dec.py"])
    markers = result.markers
    assert [f.name for f in markers["app.q.end"].fields] == ["req"]  # the end has it too
    assert markers["app.q.begin"].context == {"req"} == markers["app.m"].context
    assert markers["app.q.begin"].sites == markers["app.q.end"].sites == 3  # @q twice, with
    problems = [str(p) for p in result.problems]
    assert problems == [
        "dec.py:17:6: error: @q on s(): field 'table' of 'app.q.begin' has no argument "
        "of that name",
        "dec.py:19:9: error: app.m(n) takes 1 value, called with 2 positional arguments",
    ]
    out, err = io.StringIO(), io.StringIO()
    run(["dec.py"], out, err, style=Style(False))
    assert "app.q.begin(table: str, req: int) [from context: req]" in out.getvalue()
