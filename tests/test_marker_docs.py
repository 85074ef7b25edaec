"""Markers document themselves (issue 13): doc= on markers and spans, shown by markers(),
tracemark list (and --markdown), carried in a trace's metadata, read by babeltrace2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracemark
from tracemark.ctf.reader import read_trace

ROOT = Path(__file__).resolve().parent.parent


def test_doc_is_kept_and_shown(uniq):
    m = tracemark.marker(f"{uniq}.q", doc="A database query, as sent.", table=str)
    (info,) = tracemark.markers(f"{uniq}.q")
    assert info.doc == m.doc == "A database query, as sent."
    assert m.__doc__.startswith("A database query, as sent.")
    assert [f.name for f in info.fields] == ["table"]  # doc is not a field
    # Declared again without a doc (a user's module firing the library's marker): kept.
    assert tracemark.marker(f"{uniq}.q", table=str) is m and m.doc == "A database query, as sent."
    s = tracemark.span(f"{uniq}.req", doc="One HTTP request.", path=str)
    assert s.begin.doc == "One HTTP request. (begins)" and s.end.doc == "One HTTP request. (ends)"
    assert tracemark.marker(f"{uniq}.plain").doc is None
    with pytest.raises(ValueError, match="doc must be a str"):
        tracemark.marker(f"{uniq}.bad", doc=3)
    assert tracemark.marker(f"{uniq}.f", "doc=%s").fields[0].name == "doc"  # a field named doc


def test_doc_is_in_the_trace_metadata_and_babeltrace2_reads_it(uniq, tmp_path):
    text = 'Rows read; */ and "quotes" and ünïcode,\nover two lines.'
    m = tracemark.marker(f"{uniq}.rows", doc=text, n=int)
    with tracemark.record(tmp_path / "t", f"{uniq}.*"):
        m(3)
    (meta,) = (tmp_path / "t").glob("*/metadata")
    body = meta.read_text()
    assert '/* doc: Rows read; * / and "quotes" and ünïcode, over two lines. */' in body
    assert [e.fields for e in read_trace(tmp_path / "t").events()] == [{"n": 3}]
    bt = subprocess.run(["babeltrace2", str(tmp_path / "t")], capture_output=True, text=True)
    assert bt.returncode == 0, bt.stderr
    assert f"{uniq}.rows" in bt.stdout and "n = 3" in bt.stdout


def test_list_shows_docs_and_writes_a_markdown_catalog(tmp_path):
    src = tmp_path / "lib.py"
    src.write_text(
        textwrap.dedent(
            """
            import tracemark

            q = tracemark.marker("db.query", table=str, doc="A query | as sent.")
            r = tracemark.span("http.request", doc="One request.", path=str)


            def f():
                q("users")
            """
        )
    )
    run = [sys.executable, "-m", "tracemark", "list"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*run, "lib.py"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[lines.index("db.query(table: str)") + 1] == "  A query | as sent."
    assert "  One request. (begins)" in lines
    done = subprocess.run(
        [*run, "--markdown", str(src)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[0] == "| marker | fields | what it means | declared at |"
    cells = [row.rsplit(" | ", 1) for row in rows[2:]]
    assert [c[0] for c in cells] == [
        "| `db.query` | table: str | A query \\| as sent.",  # a | in a cell is escaped
        "| `http.request.begin` | path: str | One request. (begins)",
        "| `http.request.end` |  | One request. (ends)",
    ]
    assert [c[1].rsplit("/")[-1] for c in cells] == ["lib.py:4 |", "lib.py:5 |", "lib.py:5 |"]


def test_the_readme_library_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Shipping markers in a library", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    lib = tmp_path / "mylib_example.py"
    lib.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(lib)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "tracemark", "list", "--markdown", str(lib)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert "| `mylib.db.query` | table: str, rows: int | One query, as sent. |" in listed.stdout
