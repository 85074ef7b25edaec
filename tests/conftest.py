import itertools
import sys

import pytest

import tracemark
from tracemark import probes
from tracemark.env import PYBEHAVIOR
from tracemark.markers import registry

_ids = itertools.count()


@pytest.fixture
def uniq():
    """A fresh marker-name prefix, so tests never see each other's markers or reports."""
    return f"t{next(_ids)}"


def _live_recordings() -> set[int]:
    if "tracemark.tracers.recording" not in sys.modules:
        return set()
    from tracemark.tracers.recording import lifecycle

    return set(map(id, lifecycle.active))


@pytest.fixture(autouse=True)
def _disconnect_leftovers():
    """Whatever a test connects is disconnected after it, even when it fails; a recording
    it leaves running is stopped, and is an error of that test."""
    before = set(map(id, registry._connections))
    recordings = _live_recordings()
    previous = tracemark.faults.set_strict(False)
    yield
    for conn in list(registry._connections):
        if id(conn) not in before:
            tracemark.disconnect(conn)
    tracemark.synchronize()
    tracemark.faults.set_strict(previous)
    # A recording a test left running keeps its consumer thread, and a live thread makes
    # later tests differ (export --jobs forks only from a process running one thread).
    from tracemark.tracers.recording import lifecycle

    left = [r for r in list(lifecycle.active) if id(r) not in recordings]
    for r in left:
        r.stop()
    assert not left, f"the test left {len(left)} recording(s) running (stopped now)"


class Recorder:
    """A probe that remembers what it was called with."""

    def __init__(self):
        self.events = []

    def __call__(self, marker, args):
        self.events.append((marker.name, args))


@pytest.fixture
def rec():
    return Recorder()


#: The dynamic-probe mechanisms this Python has (both are tested where both exist).
MECHANISMS = ["sys.monitoring", "recompile"] if PYBEHAVIOR.sys_monitoring else ["recompile"]


@pytest.fixture(params=MECHANISMS)
def mech(request):
    """Run a probe test under one mechanism; remove whatever probes it left behind."""
    probes._use(request.param)
    yield probes.mechanism()
    for p in probes.probes():
        probes.unprobe(p)
    tracemark.synchronize()
