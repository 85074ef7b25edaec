"""Issue 16: signal handlers and ``__del__`` that declare, connect or disconnect markers in the
middle of the registry's own work, and a SIGTERM in the middle of a recording's stop()."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tracemark
from tracemark.markers import registry


def run_child(code, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _Timer:
    """A 1 ms SIGALRM whose handler runs ``action`` (restored on exit)."""

    def __init__(self, action):
        self.action = action
        self.calls = 0

    def _handler(self, signum, frame):
        self.calls += 1
        self.action()

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, self.old)


def _bound(conn, pattern):
    """Markers matching ``pattern`` that ``conn`` is attached to, and those it is not."""
    cores = [c for c in registry.iter_cores() if c.name.startswith(pattern)]
    return [c for c in cores if conn in c.connections], [
        c for c in cores if conn not in c.connections
    ]


def test_a_signal_handler_declaring_markers_during_connect_and_disconnect(uniq):
    """Old code: RuntimeError 'dictionary changed size during iteration' out of connect or
    disconnect after 80-900 tries. Now: no error, and every marker matching the glob, those
    the handler declared during connect included, is bound; none is after disconnect."""
    for i in range(300):
        tracemark.marker(f"{uniq}.m{i}", n=int)
    n = 0

    def declare():
        nonlocal n
        n += 1
        tracemark.marker(f"{uniq}.h{n}", n=int)

    deadline = time.monotonic() + 3.0
    tries = 0
    with _Timer(declare) as timer:
        while time.monotonic() < deadline and (tries < 300 or timer.calls < 200):
            tries += 1
            conn = tracemark.connect(f"{uniq}.*", lambda m, a: None)
            bound, unbound = _bound(conn, f"{uniq}.")
            assert not unbound, [c.name for c in unbound]
            tracemark.disconnect(conn)
            bound, _ = _bound(conn, f"{uniq}.")
            assert not bound and not conn.connected
            if tries > 50_000:
                break
    assert timer.calls > 20  # the handler did run in the middle of things


def test_a_marker_declared_in_the_middle_of_connect_is_bound_once(uniq):
    """Deterministic: the probe's bind_marker declares another marker of the glob (as a signal
    handler or __del__ would) while connect is looping over the registry."""
    for i in range(5):
        tracemark.marker(f"{uniq}.m{i}", n=int)
    seen = []

    def bind(marker):
        seen.append(marker.name)
        if len(seen) == 2:
            tracemark.marker(f"{uniq}.late", n=int)
        return lambda m, a: None

    probe = lambda m, a: None  # noqa: E731
    probe.bind_marker = bind
    conn = tracemark.connect(f"{uniq}.*", probe)
    assert sorted(seen) == sorted([*(f"{uniq}.m{i}" for i in range(5)), f"{uniq}.late"])
    assert not _bound(conn, f"{uniq}.")[1]


def test_an_interrupted_connect_leaves_nothing_attached(uniq):
    """Old code: a connect that raised half-way left its probe attached to the markers it had
    reached, with no handle to remove it."""
    markers = [tracemark.marker(f"{uniq}.m{i}", n=int) for i in range(6)]
    calls = []

    def bind(marker):
        calls.append(marker)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what a signal handler raises into the program
        return lambda m, a: calls.append("fired")

    probe = lambda m, a: None  # noqa: E731
    probe.bind_marker = bind
    before = list(registry._connections)
    with pytest.raises(KeyboardInterrupt):
        tracemark.connect(f"{uniq}.*", probe)
    assert registry._connections == before
    for m in markers:
        assert not registry.core_of(m).connections
        m(1)
    assert "fired" not in calls


def test_a_listener_declaring_during_disconnect(uniq):
    """disconnect() loops over the registry while the patcher's listener (or a signal handler)
    may declare a marker: no error, and the connection is gone everywhere."""
    for i in range(5):
        tracemark.marker(f"{uniq}.m{i}", n=int)
    count = []

    def listener(core, active):
        if core.name.startswith(uniq) and not active:
            count.append(1)
            tracemark.marker(f"{uniq}.d{len(count)}", n=int)

    registry._listeners.append(listener)
    try:
        conn = tracemark.connect(f"{uniq}.m*", lambda m, a: None)
        assert tracemark.disconnect(conn) is True
    finally:
        registry._listeners.remove(listener)
    assert count and not _bound(conn, f"{uniq}.")[0] and not conn.connected
