"""Declaring a name again (issue 13): packages never break each other, notebooks re-run.

The rules (tracemark/markers/registry.py): the same fields share the marker and list every
place; other fields from the same place replace the declaration; from anywhere else they are
a fault and the newcomer gets ``<package>.<name>``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import tracemark
from tracemark.markers import registry


def _package(root, name, body):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))


def test_two_packages_with_one_name_never_break_each_other(tmp_path, monkeypatch, uniq):
    _package(
        tmp_path,
        f"liba_{uniq}",
        f'import tracemark\nq = tracemark.marker("{uniq}.db.query", sql=str)\n',
    )
    _package(
        tmp_path,
        f"libb_{uniq}",
        f'import tracemark\nq = tracemark.marker("{uniq}.db.query", rows=int)\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    a = importlib.import_module(f"liba_{uniq}")
    with pytest.warns(tracemark.TracemarkWarning) as caught:
        b = importlib.import_module(f"libb_{uniq}")  # imports: no exception
    (warning,) = caught
    text = str(warning.message)
    assert f"liba_{uniq}" in text and f"libb_{uniq}" in text  # both places
    assert f"'libb_{uniq}.{uniq}.db.query'" in text  # and the name the newcomer got
    assert a.q.name == f"{uniq}.db.query" and b.q.name == f"libb_{uniq}.{uniq}.db.query"
    got = []
    tracemark.connect(f"*{uniq}.db.query", lambda m, args: got.append((m.name, args)))
    a.q("select 1")
    b.q(3)
    assert got == [(a.q.name, ("select 1",)), (b.q.name, (3,))]  # never mixed
    counts = tracemark.faults.counts()
    assert counts[("marker-conflict", f"{uniq}.db.query:{b.q.where}")] == 1


def test_same_fields_from_two_modules_share_the_marker_and_list_both(tmp_path, monkeypatch, uniq):
    body = f'import tracemark\nq = tracemark.marker("{uniq}.shared", n=int)\n'
    _package(tmp_path, f"one_{uniq}", body)
    _package(tmp_path, f"two_{uniq}", body)
    monkeypatch.syspath_prepend(str(tmp_path))
    one = importlib.import_module(f"one_{uniq}")
    two = importlib.import_module(f"two_{uniq}")
    assert one.q is two.q
    (info,) = tracemark.markers(f"{uniq}.shared")
    assert [w.split("/")[-2] for w in info.declared_at] == [f"one_{uniq}", f"two_{uniq}"]


def test_the_same_place_with_changed_fields_replaces_the_declaration(uniq):
    def declare(**fields):
        return tracemark.marker(f"{uniq}.cell", **fields)  # one line: one place

    got = []
    tracemark.connect(f"{uniq}.cell", lambda m, args: got.append((m.name, args)))
    old = declare(n=int)
    new = declare(n=int, label=str)
    assert new is not old and new.fields != old.fields
    (info,) = tracemark.markers(f"{uniq}.cell")
    assert info.fields == new.fields and info.active  # the connection moved to it
    new(1, "x")
    old(2)  # the replaced one does nothing any more
    assert got == [(f"{uniq}.cell", (1, "x"))]
    assert not [c for c in tracemark.faults.counts() if c[1].startswith(f"{uniq}.cell")]


def test_an_interactive_cell_run_again_replaces_wherever_its_line_is(uniq):
    ns = {"__name__": "__main__", "tracemark": tracemark}
    first = f'm = tracemark.marker("{uniq}.nb", n=int)\n'
    exec(compile(first, "<ipython-input-1-abc>", "exec"), ns)
    second = f'\n\nm = tracemark.marker("{uniq}.nb", n=int, k=str)\n'  # edited cell
    exec(compile(second, "<ipython-input-2-def>", "exec"), ns)
    assert [m.name for m in tracemark.markers(f"*{uniq}.nb")] == [f"{uniq}.nb"]
    assert [f.name for f in ns["m"].fields] == ["n", "k"]


def test_a_script_declaring_one_name_twice_gets_two_markers(tmp_path):
    # __main__ of a file is not interactive: two lines are two places.
    script = tmp_path / "app.py"
    script.write_text(
        "import tracemark, warnings\n"
        "warnings.simplefilter('error')\n"  # a fault warning must not become an exception...
        "a = tracemark.marker('app.x', n=int)\n"
        "b = tracemark.marker('app.x', s=str)\n"
        "print(a.name, b.name)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # ...reporting never raises
    assert done.stdout.split() == ["app.x", "__main__.app.x"]


def test_a_span_moves_as_a_whole(uniq):
    q = tracemark.span(f"{uniq}.req", path=str)
    with pytest.warns(tracemark.TracemarkWarning):
        other = tracemark.span(f"{uniq}.req", path=str, status=int)
    assert other.name == f"test_declarations.{uniq}.req"
    assert other.begin.name == f"{other.name}.begin" and other.end.name == f"{other.name}.end"
    assert q.end is not other.end  # ends pair with their own begins


def test_strict_mode_raises_and_declares_nothing(uniq):
    tracemark.marker(f"{uniq}.s", n=int)
    tracemark.faults.set_strict(True)  # the conftest fixture turns it off again
    with pytest.raises(tracemark.faults.MarkerConflictError, match="declared at"):
        tracemark.marker(f"{uniq}.s", n=str)
    assert [m.name for m in tracemark.markers(f"*{uniq}.s")] == [f"{uniq}.s"]


def test_probes_keep_the_strict_rule(uniq):
    tracemark.marker(f"{uniq}.p", n=int)
    with pytest.raises(ValueError, match="declared at"):
        registry.declare(f"{uniq}.p", None, {"n": str}, where="somewhere:1")


def test_inline_mark_with_another_format_gets_its_own_marker(uniq):
    got = []
    tracemark.connect(f"*{uniq}.inline", lambda m, args: got.append((m.name, args)))
    tracemark.mark(f"{uniq}.inline", "n=%d", 1)
    with pytest.warns(tracemark.TracemarkWarning):
        tracemark.mark(f"{uniq}.inline", "s=%s", "x")
    assert got == [(f"{uniq}.inline", (1,)), (f"test_declarations.{uniq}.inline", ("x",))]
