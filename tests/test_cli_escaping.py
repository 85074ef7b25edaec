"""Nothing in a trace or a source tree reaches the terminal as a control character: names,
values, thread names and paths are printed escaped, one event per line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import tracemark
from tracemark.cli._common import printable

ROOT = Path(tracemark.__file__).resolve().parents[1]
FORGED = "w\n04:00:00 [1 root] FAKE.event\x1b]0;pwned\x07"
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# Every text a trace can carry, with C0, DEL, C1, separators and a bidi override in it.
NASTY = "a\x1b[2J\rb\x7fc\x9bd\u2028e\u2029f\u202eg\x00h\t"

RECORD = r"""
import sys, threading, tracemark
m = tracemark.marker("esc.m", s=str, b=bytes, o=object)
def work():
    m(sys.argv[2], sys.argv[2].encode("utf-8", "surrogatepass"), sys.argv[2])
with tracemark.record(sys.argv[1]):
    t = threading.Thread(target=work, name=sys.argv[3])
    t.start(); t.join()
    work()
"""


def run(*argv, cwd=None):
    out = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out


def assert_safe(text):
    for line in text.splitlines():
        assert not UNSAFE.search(line), repr(line)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    path = tmp_path_factory.mktemp("esc") / "trace\x1b]0;dir\x07\nFAKE"
    out = run("-c", RECORD, str(path), NASTY.replace("\x00", ""), FORGED)
    assert out.returncode == 0, out.stderr
    meta = next(path.glob("*/metadata"))
    text = meta.read_text()
    # An event name the recorder would refuse, as a crafted metadata spells it.
    meta.write_text(text.replace('name = "esc.m"', 'name = "esc\\x1b[2J\\xe2\\x80\\xa8.m"'))
    return path


def test_printable_escapes_controls_separators_and_bidi_only():
    assert printable(NASTY) == ("a\\x1b[2J\\rb\\x7fc\\x9bd\\u2028e\\u2029f\\u202eg\\x00h\\t")
    plain = "é ünï 日本 [1 worker-0] a=1"
    assert printable(plain) is plain
    assert printable(FORGED) == "w\\n04:00:00 [1 root] FAKE.event\\x1b]0;pwned\\x07"


def test_view_prints_one_safe_line_per_event(crafted):
    out = run("-m", "tracemark", "view", str(crafted))
    assert out.returncode == 0, out.stderr
    assert_safe(out.stdout)
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert sum("FAKE.event" in line for line in lines) == 1
    assert not any(line.startswith("04:00:00") for line in lines)
    assert "w\\n04:00:00 [1 root] FAKE.event\\x1b]0;pwned\\x07]" in lines[0] + lines[1]
    assert all(" esc\\x1b[2J\\u2028.m " in line for line in lines)


def test_stats_prints_safe_lines(crafted):
    out = run("-m", "tracemark", "stats", str(crafted))
    assert out.returncode == 0, out.stderr
    assert_safe(out.stdout)
    assert_safe(out.stderr)
    assert "esc\\x1b[2J\\u2028.m  2 events" in out.stdout
    assert "trace\\x1b]0;dir\\x07\\nFAKE" in out.stdout.splitlines()[0]


def test_errors_naming_crafted_paths_are_one_safe_line(tmp_path):
    missing = tmp_path / "no\x1b]0;x\x07\nsuch"
    out = run("-m", "tracemark", "view", str(missing))
    assert out.returncode == 3
    assert_safe(out.stderr)
    assert len(out.stderr.splitlines()) == 1


def test_record_summary_is_safe(tmp_path):
    script = tmp_path / "app.py"
    script.write_text("import tracemark\nm = tracemark.marker('esc.r', s=str)\nm('\\x1b[2J')\n")
    out = run("-m", "tracemark", "record", "-o", str(tmp_path / "o\x1b]0;x\x07\nut"), str(script))
    assert out.returncode == 0, out.stderr
    assert_safe(out.stderr)
    assert "esc.r" in out.stderr
    assert "o\\x1b]0;x\\x07\\nut" in out.stderr


def test_list_prints_crafted_file_names_safely(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a\x1b[31mred\u202e\n.py").write_text(
        'import tracemark\nm = tracemark.marker("esc.l", "n=%d")\nm(1, 2)\nm(1)\n'
    )
    (src / "b\x1b]0;x\x07.py").write_text("def (:\n")
    out = run("-m", "tracemark", "list", "src", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert_safe(out.stdout)
    assert_safe(out.stderr)
    assert "declared src/a\\x1b[31mred\\u202e\\n.py:2; 2 call sites" in out.stdout
    assert any(line.startswith("src/b\\x1b]0;x\\x07.py:1:") for line in out.stderr.splitlines())
