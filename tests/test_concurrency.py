"""Connecting and disconnecting while many threads fire: nothing torn, nothing lost."""

import subprocess
import sys
import threading
import time

import tracemark


class Retirable:
    """A probe that must never run once it has been disconnected and synchronized."""

    def __init__(self, violations):
        self.retired = False
        self.calls = 0
        self.violations = violations

    def __call__(self, marker, args):
        if self.retired:
            self.violations.append((marker.name, args))
        self.calls += 1
        if args[1] % 64 == 0:
            time.sleep(0)  # give the GIL away inside the probe: widen the race


def test_eight_threads_fire_while_probes_come_and_go(uniq):
    marks = [tracemark.marker(f"{uniq}.m{i}", "thread=%d seq=%d") for i in range(4)]
    received = [0] * 8  # per firing thread: the next sequence number expected
    out_of_order: list = []
    fired = [0] * 8
    violations: list = []
    errors: list = []
    stop = threading.Event()

    def always(marker, args):  # connected throughout: must see every event, once, in order
        t, seq = args
        if seq != received[t]:
            out_of_order.append((t, seq, received[t]))
        received[t] = seq + 1  # only thread t writes slot t: no lost update

    tracemark.connect(f"{uniq}.*", always)

    def fire(t):
        try:
            seq = 0
            while not stop.is_set():
                marks[seq % 4](t, seq)
                seq += 1
            fired[t] = seq
        except BaseException as exc:  # pragma: no cover - would be the failure
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often
    threads = [threading.Thread(target=fire, args=(t,)) for t in range(8)]
    try:
        for t in threads:
            t.start()
        retired = []
        for i in range(1200):  # each: connect, a switch, disconnect, a grace period
            probe = Retirable(violations)
            pattern = f"{uniq}.m{i % 4}" if i % 3 else f"{uniq}.*"
            h = tracemark.connect(pattern, probe)
            time.sleep(0)
            tracemark.disconnect(h)
            assert tracemark.synchronize(timeout=10)
            probe.retired = True
            retired.append(probe)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old_interval)

    assert errors == []
    assert violations == []
    assert sum(p.calls for p in retired) > 0  # the temporary probes really were called
    assert out_of_order == []
    assert received == fired  # every event fired reached the permanent probe
    for m in marks:
        info = tracemark.markers(m.name)[0]
        assert (info.bad_arguments, info.dropped_nested, info.probe_errors) == (0, 0, 0)


def test_synchronize_waits_for_a_thread_inside_a_removed_probe(uniq):
    m = tracemark.marker(f"{uniq}.m")
    inside, release = threading.Event(), threading.Event()

    def slow(marker, args):
        inside.set()
        release.wait(10)

    h = tracemark.connect(f"{uniq}.m", slow)
    t = threading.Thread(target=m)
    t.start()
    assert inside.wait(10)
    tracemark.disconnect(h)
    assert tracemark.synchronize(timeout=0.05) is False  # still inside
    release.set()
    assert tracemark.synchronize(timeout=10) is True
    t.join()


def test_synchronize_does_not_wait_for_unrelated_later_entries(uniq):
    """A thread that left and came back read the new probe list: no need to wait for it."""
    m = tracemark.marker(f"{uniq}.m")
    results = []
    tracemark.connect(f"{uniq}.m", lambda mk, a: results.append(tracemark.synchronize(timeout=1)))
    m()  # synchronize called from inside a probe does not wait for its own thread
    assert results == [True]


def test_connecting_does_not_disturb_calls_in_flight(uniq):
    """A probe connected while a thread is inside the probes runs from that thread's next
    event on: a firing thread sees the old tuple or the new one, never a mix."""
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    seen_by_late = []
    inside, go_on = threading.Event(), threading.Event()

    def first(marker, args):
        if args[0] == 0:
            inside.set()
            go_on.wait(10)

    tracemark.connect(f"{uniq}.m", first)
    t = threading.Thread(target=lambda: (m(0), m(1)))
    t.start()
    assert inside.wait(10)
    tracemark.connect(f"{uniq}.m", lambda mk, a: seen_by_late.append(a[0]))
    go_on.set()
    t.join()
    assert seen_by_late == [1]


GC_IN_CURRENT_FRAMES = r"""
import gc, threading, tracemark

class Holder:
    def __init__(self):
        self.local = threading.local()
        self.me = self  # a cycle: only the collector frees it, and its threading.local

stop = threading.Event()
workers = [threading.Thread(target=stop.wait) for _ in range(4)]
for t in workers:
    t.start()
gc.set_threshold(1)  # collect at nearly every allocation
for _ in range(300):
    for _ in range(20):
        Holder()
    tracemark.synchronize()
stop.set()
for t in workers:
    t.join()
print("done")
"""


def test_synchronize_survives_a_collection_freeing_a_thread_local():
    """CPython 3.11 hangs for good if a garbage collection starts inside
    sys._current_frames() and frees a threading.local (gh-106883): synchronize must not."""
    out = subprocess.run(
        [sys.executable, "-c", GC_IN_CURRENT_FRAMES], capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout.strip()) == (0, "done"), out.stderr
