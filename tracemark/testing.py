"""Markers in tests: the pytest plugin (entry point ``tracemark``, loaded by pytest itself).

Three things, each usable alone::

    def test_lookup(tracemark_events):            # 1. capture, the way caplog captures logs
        lookup("users")
        (ev,) = tracemark_events("db.query.*")
        assert ev.fields["rows"] == 3

    $ pytest --tracemark='db.*'                   # 2. a flight recorder over the session
    $ pytest -p no:tracemark ...                  #    (the plugin off entirely)

Guarantees
----------
* **Capture** (fixture ``tracemark_events``): from the fixture's set-up to its tear-down,
  every marker matching the fixture's pattern (``"*"``: all of them; any number of tests
  and threads) is connected to a probe that keeps each event as it was fired: name,
  fields *with the values the program passed* (objects stay objects: the test can compare
  them), thread and a ``time.time_ns()`` timestamp. Calling the fixture with a glob returns
  the matching events in firing order as :class:`tracemark.ctf.reader.Event` tuples, the
  type the trace reader gives, so an assertion written against a captured event reads the
  same as one against a recorded trace. ``.clear()`` forgets what was captured. The
  connection is removed at tear-down and :func:`tracemark.synchronize` waits for probes
  still running in other threads, so one test's events never reach another's list.
* **Flight recorder** (``--tracemark[=GLOB]``, default ``*``): the session is recorded in
  overwrite mode (the newest events of every thread kept in memory) into ``--tracemark-dir``
  (default ``.tracemark/pytest-<date-time>`` under the root directory). Each test is a span
  ``pytest.test`` with its ``nodeid``, so ``tracemark spans DIR`` shows the slowest tests
  and what ran inside them. When a test fails, the recorder's buffers are written as a
  snapshot (a trace of their own, readable by every tool) and the report gains a section
  with the last ``--tracemark-last`` events (default 30) of that test's thread since the
  test began, and the snapshot's path: a flaky failure in CI comes with its trace. At the
  end of the session the buffers are written once more (the last snapshot, whose path is
  printed). Each snapshot is a whole trace: read them one at a time (reading the directory
  above them merges them, and the events they share appear once per snapshot).
* **Strict mode** is on while the session runs (faults raise in tests instead of being
  counted: :func:`tracemark.faults.set_strict`) unless the ini option
  ``tracemark_strict = false`` or ``--tracemark-strict=no`` says otherwise; the previous
  setting comes back at the end of the session.
* Nothing of tracemark is imported, and no marker declared, unless one of the three is used
  (the strict mode imports :mod:`tracemark.faults`).
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CapturedEvents"]

_RECORDING = pytest.StashKey[Any]()
_STRICT_BEFORE = pytest.StashKey[bool]()
_TEST_START = pytest.StashKey[tuple[int, int]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tracemark", "tracemark: markers and tracepoints")
    group.addoption(
        "--tracemark",
        nargs="?",
        const="*",
        default=None,
        metavar="GLOB",
        help="record the session's markers matching GLOB (default: all) in a flight recorder;"
        " a failing test's report shows its last events and where its snapshot trace is",
    )
    group.addoption(
        "--tracemark-dir",
        default=None,
        metavar="DIR",
        help="where --tracemark writes the trace (default: .tracemark/pytest-<date-time>)",
    )
    group.addoption(
        "--tracemark-last",
        type=int,
        default=30,
        metavar="N",
        help="events shown in a failing test's report (default: 30)",
    )
    group.addoption(
        "--tracemark-strict",
        choices=("yes", "no"),
        default=None,
        help="tracemark faults raise during the session (default: yes, or the ini option)",
    )
    parser.addini(
        "tracemark_strict",
        type="bool",
        default=True,
        help="tracemark faults raise during the session (default: true)",
    )


def _strict_wanted(config: pytest.Config) -> bool:
    flag = config.getoption("--tracemark-strict")
    if flag is not None:
        return flag == "yes"
    return bool(config.getini("tracemark_strict"))


def pytest_configure(config: pytest.Config) -> None:
    if _strict_wanted(config):
        from . import faults

        config.stash[_STRICT_BEFORE] = faults.set_strict(True)
    glob = config.getoption("--tracemark")
    if glob is not None:
        config.stash[_RECORDING] = _FlightRecorder.start(config, glob)


def pytest_sessionfinish(session: pytest.Session) -> None:
    recorder = session.config.stash.get(_RECORDING, None)
    if recorder is not None:
        recorder.stop()  # before the terminal summary, which names what it wrote


def pytest_unconfigure(config: pytest.Config) -> None:
    recorder = config.stash.get(_RECORDING, None)
    if recorder is not None:
        recorder.stop()
    if _STRICT_BEFORE in config.stash:
        from . import faults

        faults.set_strict(config.stash[_STRICT_BEFORE])


# --- capture ------------------------------------------------------------------------------


class CapturedEvents:
    """What the ``tracemark_events`` fixture gives: call it with a glob for the events."""

    def __init__(self) -> None:
        # (time ns, marker, args, tid, thread name): list.append is atomic, so probes in
        # several threads append without a lock.
        self._raw: list[tuple[int, Any, tuple, int, str]] = []

    def _probe(self, marker: Any, args: tuple) -> None:
        t = threading.current_thread()
        self._raw.append((time.time_ns(), marker, args, threading.get_ident(), t.name))

    def __call__(self, pattern: str = "*") -> list[Any]:
        """The captured events whose marker name matches the glob ``pattern``, in order."""
        from .ctf.reader import Event

        pid = os.getpid()
        return [
            Event(
                timestamp=ts,
                name=m.name,
                fields=dict(zip((f.name for f in m.fields), args, strict=False)),
                pid=pid,
                tid=tid,
                thread=thread,
            )
            for ts, m, args, tid, thread in list(self._raw)
            if fnmatch.fnmatchcase(m.name, pattern)
        ]

    def names(self, pattern: str = "*") -> list[str]:
        """Only the names of :meth:`__call__`'s events (for ``assert ... == [...]``)."""
        return [ev.name for ev in self(pattern)]

    def clear(self) -> None:
        """Forget every event captured so far."""
        self._raw.clear()

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"<tracemark_events: {len(self._raw)} events>"


@pytest.fixture
def tracemark_events() -> Iterator[CapturedEvents]:
    """Every marker event fired during the test, as fired: ``tracemark_events("db.*")``."""
    import tracemark

    captured = CapturedEvents()
    conn = tracemark.connect("*", captured._probe)
    try:
        yield captured
    finally:
        tracemark.disconnect(conn)
        tracemark.synchronize()


# --- the flight recorder ------------------------------------------------------------------


class _FlightRecorder:
    def __init__(self, recording: Any, span: Any, last: int, directory: Path) -> None:
        self.recording = recording
        self.span = span
        self.last = last
        self.directory = directory
        self.written: Path | None = None

    @classmethod
    def start(cls, config: pytest.Config, glob: str) -> _FlightRecorder:
        import tracemark

        directory = config.getoption("--tracemark-dir")
        if directory is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            directory = Path(config.rootpath) / ".tracemark" / f"pytest-{stamp}"
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        span = tracemark.span("pytest.test", nodeid=str)
        recording = tracemark.record(directory, [glob, "pytest.test.*"], mode="overwrite")
        return cls(recording, span, max(0, config.getoption("--tracemark-last")), directory)

    def stop(self) -> None:
        if self.recording.running:
            summary = self.recording.stop()
            self.written = summary.snapshots[-1] if summary.snapshots else None

    def failure_section(self, start_ns: int, tid: int) -> str:
        """The last events of thread ``tid`` since ``start_ns``, from a snapshot."""
        from .cli.view import format_event
        from .ctf.reader import read_trace

        snapshot = self.recording.snapshot()
        events = [
            ev
            for ev in read_trace(snapshot).events()
            if ev.tid == tid and ev.timestamp >= start_ns and not ev.name.startswith("pytest.")
        ]
        shown = events[-self.last :] if self.last else []
        lines = [f"snapshot trace: {snapshot}"]
        if len(events) > len(shown):
            lines.append(f"... {len(events) - len(shown)} earlier events of this test not shown")
        previous = None
        for ev in shown:
            lines.append(format_event(ev, previous))
            previous = ev.timestamp
        if not events:
            lines.append("(no event of this test's thread was recorded)")
        return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    recorder = item.config.stash.get(_RECORDING, None)
    if recorder is None:
        return (yield)
    item.stash[_TEST_START] = (time.time_ns(), threading.get_native_id())
    recorder.span.begin(item.nodeid)
    try:
        return (yield)
    finally:
        recorder.span.end()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    recorder = item.config.stash.get(_RECORDING, None)
    if recorder is not None and report.failed and _TEST_START in item.stash:
        start, tid = item.stash[_TEST_START]
        try:
            section = recorder.failure_section(start, tid)
        except Exception as exc:  # the report must come out whatever the trace holds
            section = f"could not read the flight recorder: {exc}"
        report.sections.append(("tracemark: last events", section))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    recorder = config.stash.get(_RECORDING, None)
    if recorder is not None:
        where = recorder.written or recorder.directory
        terminalreporter.write_line(
            f"tracemark: the session's last events are in {where}"
            " (failing tests' snapshots beside it)"
        )
