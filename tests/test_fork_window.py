"""Events fired in a fork child before its recording is set up again (the at-fork window).

``os.register_at_fork(after_in_child=...)`` hooks run in the order registered: one registered
before tracemark's runs in the child while the recording still holds the parent's state. The
guarantee (tracemark.tracers.recording.lifecycle): every event fired in the child, there or
later, is written once in the child's own sub-trace or counted (discarded or lost); none lands
in the parent's files, none twice. Both cores, a plain fork and a fork Pool's workers.
"""

import collections
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from tracemark.ctf.reader import read_trace

SCRIPT = """
import multiprocessing as mp, os, sys, tracemark
from tracemark.tracers.recording import lifecycle

m = tracemark.marker("fw.m", who=str, i=int, pad=str)
N = int(sys.argv[3])
PAD = "x" * 100  # ~130 bytes an event: a 4 KiB packet holds ~30, N crosses several

def hook(tag):
    def fire():
        for i in range(N):
            m(tag, i, PAD)
    return fire

def work(i):
    m("task", i, PAD)
    return i

os.register_at_fork(after_in_child=hook("early"))  # runs before tracemark's child hook
rec = tracemark.record(sys.argv[1], subbuffer_size=4096, subbuffers=64)
os.register_at_fork(after_in_child=hook("late"))  # runs after it
for i in range(N):
    m("parent", i, PAD)
if sys.argv[2] == "fork":
    pid = os.fork()
    if pid == 0:
        m("task", 0, PAD)
        lifecycle.stop_all()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
else:
    pool = mp.get_context("fork").Pool(2)
    assert pool.map(work, range(4)) == list(range(4))
    pool.close()
    pool.join()
for i in range(N):
    m("parent2", i, PAD)
s = rec.stop()
print(s.recorded, s.discarded, s.lost)
"""

N = 150


@pytest.mark.parametrize("how", ["fork", "pool"])
@pytest.mark.parametrize("core", ["python", "c"])
def test_events_fired_in_the_at_fork_window_are_written_once_or_counted(tmp_path, how, core):
    # Built, not in use: the pure-core pass (TRACEMARK_CORE=python) runs this C case too.
    if core == "c" and importlib.util.find_spec("tracemark._speedups") is None:
        pytest.fail("the C core is not built (python setup.py build_ext --inplace)")
    environ = dict(os.environ, TRACEMARK_CORE="python" if core == "python" else "")
    if core == "c":
        environ.pop("TRACEMARK_CORE")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path), how, str(N)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    trace = read_trace(tmp_path)
    parent = os.getpid()  # not the script's: found below as the sub-trace with parent events
    seen = collections.Counter()
    by_pid: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for ev in trace.events():
        seen[(ev.pid, ev.fields["who"], ev.fields["i"])] += 1
        by_pid[ev.pid][ev.fields["who"]] += 1
    assert [k for k, n in seen.items() if n > 1] == []  # nothing written twice
    parents = [pid for pid, c in by_pid.items() if c["parent"]]
    assert len(parents) == 1
    parent = parents[0]
    # The parent's sub-trace holds the parent's events only, all of them or counted.
    assert set(by_pid[parent]) == {"parent", "parent2"}
    counted = {
        sub.pid: (sum(s.discarded for s in sub.streams), sub.lost) for sub in trace.subtraces
    }
    assert sum(by_pid[parent].values()) + sum(counted[parent]) == 2 * N
    children = [sub.pid for sub in trace.subtraces if sub.pid != parent]
    assert len(children) == (1 if how == "fork" else 2)
    tasks = 0
    for pid in children:
        c = by_pid[pid]
        assert set(c) <= {"early", "late", "task"}
        tasks += c["task"]
        # Every event the child fired in its hooks: in its sub-trace, or counted there.
        assert c["early"] + c["late"] + sum(counted[pid]) == 2 * N, (pid, c, counted[pid])
        assert c["late"] == N  # after the set-up: nothing to lose with 64 sub-buffers
    assert tasks == (1 if how == "fork" else 4)


# --- the same window: what each event is, and a stop() there -----------------------------

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
