"""Events a fork child fires before tracemark's own at-fork hook ran (an at-fork hook
registered earlier, a finalizer, a signal handler) are the child's: recorded in its own
sub-trace, never into the parent's ring (shared memory), never lost silently. The child's
first event sets it up (tracers/recording/lifecycle.py: set_up_child). Before, such an
event went to the parent's channel and the child's thread kept it: the child recorded
nothing at all, and said nothing."""

import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from tracemark.ctf import read_trace

ROOT = Path(__file__).resolve().parents[1]

APP = textwrap.dedent(
    """
    import os, sys, tracemark
    m = tracemark.marker("fk.m", n=int, who=str)

    def early_hook():  # registered before tracemark's own hook: runs before it in the child
        for i in range(3000):  # several 16K sub-buffers
            m(i, "hook")

    os.register_at_fork(after_in_child=early_hook)
    rec = tracemark.record(sys.argv[1], "fk.*", subbuffer_size=1 << 14, subbuffers=8)
    for i in range(500):
        m(i, "parent")
    pid = os.fork()
    if pid == 0:
        for i in range(3000, 3100):
            m(i, "hook")  # the same sequence, after the set-up
        s = rec.stop()
        print("child", s.recorded, s.discarded, s.lost, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    for i in range(500, 1000):
        m(i, "parent")
    s = rec.stop()
    print("parent", s.recorded, s.discarded, s.lost, flush=True)
    """
)


@pytest.mark.parametrize("core", ["c", "python"])
def test_events_before_tracemark_s_fork_hook_are_the_child_s(tmp_path, core):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRACEMARK_CORE", None)
    if core == "python":
        env["TRACEMARK_CORE"] = "python"
    (tmp_path / "app.py").write_text(APP)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(tmp_path / "app.py"), str(tmp_path / "t")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert summaries == {"child": "3100 0 0", "parent": "1000 0 0"}, proc.stdout
    trace = read_trace(tmp_path / "t")
    by_pid: dict[int, list] = defaultdict(list)
    for ev in trace.events():
        by_pid[ev.pid].append((ev.fields["who"], ev.fields["n"]))
    assert len(by_pid) == 2 and trace.discarded == 0 and trace.lost == 0
    (parent,) = [evs for evs in by_pid.values() if evs[0][0] == "parent"]
    (child,) = [evs for evs in by_pid.values() if evs[0][0] == "hook"]
    # Each process's events whole and in order: the parent's packets were not written over.
    assert parent == [("parent", i) for i in range(1000)]
    assert child == [("hook", i) for i in range(3100)]


STOPPER = textwrap.dedent(
    """
    import os, sys, tracemark
    m = tracemark.marker("fk.s", n=int)
    box = []

    def stop_in_child():  # as the control server's fork hook stops its flight recorder
        s = box[0].stop()
        print("child", s.recorded, s.discarded, s.lost, flush=True)

    os.register_at_fork(after_in_child=stop_in_child)  # before tracemark's own hook
    box.append(tracemark.record(sys.argv[1], "fk.*", subbuffer_size=1 << 14, subbuffers=8))
    for i in range(2000):  # full packets handed over, and an open one at the fork
        m(i)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    for i in range(2000, 2500):
        m(i)
    s = box[0].stop()
    print("parent", s.recorded, s.discarded, s.lost, flush=True)
    """
)


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_child_stopping_the_recording_before_its_set_up_stops_its_own(tmp_path, core):
    """The parent's buffers (full packets not yet written, the open one) are the parent's:
    written once, by it; the child's stop is of the child's own (empty) recording."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRACEMARK_CORE", None)
    if core == "python":
        env["TRACEMARK_CORE"] = "python"
    (tmp_path / "app.py").write_text(STOPPER)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(tmp_path / "app.py"), str(tmp_path / "t")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert summaries == {"child": "0 0 0", "parent": "2500 0 0"}, proc.stdout
    trace = read_trace(tmp_path / "t")
    assert [ev.fields["n"] for ev in trace.events()] == list(range(2500))
    assert trace.discarded == 0 and trace.lost == 0
