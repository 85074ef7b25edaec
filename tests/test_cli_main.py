"""The command line as a whole: help, exit codes, one-line errors, and the wiring of view and
stats to the trace reader (a stand-in reader here; tests/test_cli_e2e.py uses the real one)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import tracemark
from tracemark.cli import _common, main
from tracemark.ctf import TraceError

ROOT = Path(tracemark.__file__).resolve().parents[1]
T0 = 1_767_225_600_000_000_000


def tracemark_cmd(*args, cwd=None, env=None):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


@pytest.mark.parametrize("sub", [[], ["record"], ["view"], ["stats"], ["list"], ["export"]])
def test_help_shows_an_example_and_fits_80_columns(sub):
    proc = tracemark_cmd(*sub, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    assert "example" in proc.stdout
    assert "exit code" in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 80


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["view", "/no/such/dir"], 3, "no such trace directory"),
        (["stats", "."], 3, "not a trace directory"),
        (["view", "--bogus", "x"], 2, "unrecognized arguments: --bogus"),
        (["stats"], 2, "required: DIR"),
        (["frobnicate"], 2, "invalid choice"),
        (["view", "x", "--limit", "-3"], 2, "must be 0 or more"),
        (["record", "--", "no-such-program-xyz"], 127, "program not found"),
        (["record", "missing.py"], 127, "no such file"),
        (["record"], 2, "nothing to record"),
        (["record", "--buffer", "lots", "--", "python3", "-c", "pass"], 2, "--buffer"),
        (["list", "no.such.module"], 2, "no such file, directory or module"),
    ],
)
def test_user_errors_are_one_line_and_a_documented_exit_code(tmp_path, args, code, words):
    proc = tracemark_cmd(*args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tracemark") and ": error: " in lines[0]
    assert words in lines[0]
    assert "Traceback" not in proc.stderr


# -- view and stats over a stand-in reader -------------------------------------------------


def make_trace(events, *, discarded=0, fail_after=None):
    def stream():
        for i, ev in enumerate(events):
            if fail_after is not None and i == fail_after:
                raise TraceError("trace/1234/stream_0", 4096, "bad magic")
            yield ev

    return SimpleNamespace(
        events=stream,
        streams=[
            SimpleNamespace(pid=1, tid=1, tids={1}, events=len(events)),
            SimpleNamespace(pid=2, tid=5, tids={5}, events=0),
        ],
        discarded=discarded,
        markers={"net.rx": (("len", "int"), ("dev", "str")), "net.tx": (("n", "int"),)},
        start=events[0].timestamp if events else None,
        end=events[-1].timestamp if events else None,
    )


def ev(i, name="net.rx", **fields):
    return SimpleNamespace(
        timestamp=T0 + i * 1000, name=name, pid=1, tid=1, thread="MainThread", fields=fields
    )


EVENTS = [ev(i, len=i * 100, dev="eth0" if i % 2 else "lo") for i in range(20)] + [
    ev(30, "net.tx", n=5)
]


@pytest.fixture
def trace_dir(tmp_path, monkeypatch):
    (tmp_path / "metadata").write_text("/* CTF 1.8 */")
    state = {"trace": make_trace(EVENTS)}

    def read_trace(path):
        assert path == str(tmp_path)
        return state["trace"]

    monkeypatch.setattr(_common, "read_trace", read_trace)
    return tmp_path, state


def test_view_lists_selected_and_filtered_events(trace_dir, capsys):
    path, _ = trace_dir
    assert (
        main(["view", str(path), "-e", "net.rx", "--filter", 'len >= 1500 and dev == "eth0"']) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-2:] for line in lines] == [
        ["len=1500", "dev=eth0"],
        ["len=1700", "dev=eth0"],
        ["len=1900", "dev=eth0"],
    ]


def test_view_json_and_limit(trace_dir, capsys):
    path, _ = trace_dir
    assert main(["view", str(path), "--json", "--limit", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["fields"]["len"] for r in rows] == [0, 100]


def test_a_bad_filter_points_at_the_problem(trace_dir, capsys):
    path, _ = trace_dir
    assert main(["view", str(path), "--filter", "len > 3 and lenn < 2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tracemark view: error: bad --filter at column 13: unknown name")
    assert err[1:] == ["  len > 3 and lenn < 2", "              ^"]


def test_a_field_of_an_unselected_marker_is_unknown(trace_dir, capsys):
    path, _ = trace_dir
    assert main(["stats", str(path), "-e", "net.tx", "--filter", "len > 3"]) == 2
    assert "unknown name 'len'" in capsys.readouterr().err


def test_corruption_met_while_reading_is_exit_4_naming_file_and_offset(trace_dir, capsys):
    path, state = trace_dir
    state["trace"] = make_trace(EVENTS, fail_after=5)
    assert main(["view", str(path)]) == 4
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 5  # what was readable was shown
    assert err.strip() == (
        "tracemark view: error: corrupt trace: trace/1234/stream_0: at byte offset 4096: bad magic"
    )
    assert main(["view", "--json", str(path)]) == 4
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["stats", str(path)]) == 4


def test_stats_text_and_json(trace_dir, capsys):
    path, state = trace_dir
    state["trace"] = make_trace(EVENTS, discarded=3)
    assert main(["stats", str(path)]) == 0
    text = capsys.readouterr().out
    assert "21 events" in text and "2 processes, 2 threads" in text
    assert "WARNING: 3 events were discarded" in text
    assert "net.rx  20 events" in text
    assert main(["stats", str(path), "--json", "--filter", "dev == 'lo'"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["markers"]["net.rx"]["count"] == 10
    assert doc["markers"]["net.rx"]["fields"]["len"]["max"] == 1800
    assert "net.tx" not in doc["markers"]
    assert doc["discarded"] == 3


def test_an_empty_trace(trace_dir, capsys):
    path, state = trace_dir
    state["trace"] = make_trace([])
    assert main(["view", str(path)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["stats", str(path)]) == 0
    assert "no events" in capsys.readouterr().out


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert _common.wants_colour(FakeTTY())
    assert not _common.wants_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not _common.wants_colour(FakeTTY())
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert _common.wants_colour(FakeTTY())
    monkeypatch.setenv("TERM", "dumb")
    assert not _common.wants_colour(FakeTTY())


def test_progress_only_on_a_terminal_and_erased_after():
    quiet = io.StringIO()
    events = list(range(100_000))
    assert list(_common.Progress("reading", 100_000, quiet).wrap(iter(events))) == events
    assert quiet.getvalue() == ""
    tty = FakeTTY()
    progress = _common.Progress("reading", 100_000, tty)
    progress._last = -1e9  # draw at the first chance
    assert list(progress.wrap(iter(events), every=50_000)) == events
    drawn = tty.getvalue()
    assert "reading: 50,000 events (50%)" in drawn
    assert drawn.endswith("\r\x1b[K")  # the line is erased at the end
