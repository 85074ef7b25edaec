"""A trace directory holding several unrelated recordings (sessions): view, stats, spans and
export say so and list them, unless told --all or --session ID; one program's process tree
(fork, spawn, tracemark record) is one session; traces written before sessions are one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tracemark.cli import main
from tracemark.ctf import read_trace

PROGRAM = r"""
import os, sys, tracemark
m = tracemark.marker("sess.tick", n=int)
s = tracemark.span("sess.work")
with tracemark.record(sys.argv[1]):
    s.begin(); m(int(sys.argv[2])); s.end()
    pid = os.fork()
    if pid == 0:
        m(int(sys.argv[2]) + 1)
        tracemark.tracers.recording.lifecycle.stop_all()
        os._exit(0)
    os.waitpid(pid, 0)
"""


def run_program(trace: Path, n: int, name: str) -> None:
    script = trace.parent / "prog.py"
    script.write_text(PROGRAM)
    out = subprocess.run(
        [sys.executable, str(script), str(trace), str(n), name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.fixture
def shared(tmp_path):
    """Two unrelated programs that recorded into one directory (each with a fork child)."""
    trace = tmp_path / "t"
    run_program(trace, 10, "first-program")
    run_program(trace, 20, "second-program")
    return trace


def ids_of(trace: Path) -> list[str]:
    ids = []
    for sub in sorted(trace.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        m = re.search(r'session_id = "(\w+)";', (sub / "metadata").read_text())
        assert m, sub
        ids.append(m[1])
    return list(dict.fromkeys(ids))


def test_every_process_of_one_program_shares_its_session_and_programs_differ(shared):
    subs = read_trace(shared).subtraces  # the library reads what it is given: everything
    assert len(subs) == 4
    by_session: dict[str, set[int]] = {}
    for sub in subs:
        by_session.setdefault(sub.session, set()).add(sub.pid)
    assert len(by_session) == 2 and all(len(p) == 2 for p in by_session.values())


@pytest.mark.parametrize("command", ["view", "stats", "spans", "export"])
def test_a_directory_of_several_sessions_is_listed_not_merged(shared, command, capsys):
    extra = ["-f", "chrome", "-o", str(shared.parent / "out.json")] if command == "export" else []
    assert main([command, str(shared), *extra]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.splitlines()
    assert "holds 2 unrelated recordings (sessions)" in err[0] and "--all" in err[0]
    first, second = ids_of(shared)
    rows = [line for line in err if line.startswith(f"  {first}") or line.startswith(f"  {second}")]
    assert [r.split()[0] for r in rows] == [first, second]  # by start time
    assert "first-program" in rows[0] and "second-program" in rows[1]
    pids = {sub.session: set() for sub in read_trace(shared).subtraces}
    for sub in read_trace(shared).subtraces:
        pids[sub.session].add(str(sub.pid))
    for row, sid in zip(rows, (first, second), strict=True):
        assert pids[sid] <= set(row.split())  # its pids listed
        assert re.search(r"\s4\s", row)  # its events: span begin and end, two ticks
    assert not (shared.parent / "out.json").exists()


def test_all_merges_and_session_picks_one(shared, capsys):
    assert main(["view", str(shared), "--all", "-e", "sess.tick"]) == 0
    ticks = [re.search(r"n=(\d+)", line)[1] for line in capsys.readouterr().out.splitlines()]
    assert sorted(ticks) == ["10", "11", "20", "21"]
    first, second = ids_of(shared)
    assert main(["view", str(shared), "--session", second[:6], "-e", "sess.tick"]) == 0
    ticks = [re.search(r"n=(\d+)", line)[1] for line in capsys.readouterr().out.splitlines()]
    assert sorted(ticks) == ["20", "21"]
    assert main(["stats", str(shared), "--session", first, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["processes"] == 2
    out = shared.parent / "first.json"
    assert main(["export", str(shared), "-f", "chrome", "-o", str(out), "--session", first]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    got = sorted(e["args"]["n"] for e in events if e.get("name") == "sess.tick")
    assert got == [10, 11]
    # One process's sub-trace, by its path: no question asked.
    sub = next(p for p in shared.iterdir() if first in (p / "metadata").read_text())
    assert main(["view", str(sub), "-e", "sess.tick"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_an_unknown_session_is_a_usage_error_that_lists_them(shared, capsys):
    assert main(["view", str(shared), "--session", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--session nosuch: no session" in err
    for sid in ids_of(shared):
        assert sid in err


def strip_sessions(trace: Path) -> None:
    """Make the trace look written before sessions existed (no session_id in metadata)."""
    for meta in trace.glob("*/metadata"):
        text = meta.read_text()
        meta.write_text(re.sub(r"\tsession_id = \"\w+\";\n", "", text))


def test_traces_written_before_sessions_are_one_session(shared, capsys):
    strip_sessions(shared)
    assert main(["view", str(shared), "-e", "sess.tick"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    run_program(shared, 30, "third-program")  # a new recording beside the old ones
    assert main(["view", str(shared)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 unrelated recordings" in err and "  none " in err
    assert main(["view", str(shared), "--session", "none", "-e", "sess.tick"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_tracemark_record_makes_one_session_of_its_process_tree(tmp_path, capsys):
    """A spawned child (a new interpreter, not a fork) joins through the environment."""
    child = "import tracemark; tracemark.marker('sess.child', n=int)(2)"
    parent = (
        "import subprocess, sys, tracemark\n"
        "tracemark.marker('sess.parent', n=int)(1)\n"
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRACEMARK_SESSION"}
    out = subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", str(tmp_path / "t"), "--"]
        + [sys.executable, "-c", parent],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    subs = read_trace(tmp_path / "t").subtraces
    assert len({sub.pid for sub in subs}) == 2
    assert len({sub.session for sub in subs}) == 1 and subs[0].session
    assert main(["view", str(tmp_path / "t")]) == 0
    names = [line.split()[4] for line in capsys.readouterr().out.splitlines()]
    assert names == ["sess.parent", "sess.child"]
