"""The pytest plugin (tracemark.testing): capture, the flight recorder, strict mode.

Each test runs pytest in a child process on a small test file, with the plugin loaded by
``-p`` and autoloading off, so the result does not depend on what else is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracemark.ctf.reader import read_trace

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_it.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TRACEMARK_STRICT", None)
    argv = [sys.executable, "-m", "pytest", "-p", "tracemark.testing", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*argv, "-q", "-rN", *args, "test_it.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def outcome(done: subprocess.CompletedProcess) -> dict[str, int]:
    last = done.stdout.strip().splitlines()[-1]
    found = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}
    return {k: v for k, v in found.items() if k in ("passed", "failed", "errors", "error")}


def test_the_entry_point_is_declared():
    points = importlib.metadata.entry_points(group="pytest11")
    assert any(p.name == "tracemark" and p.value == "tracemark.testing" for p in points), (
        "reinstall the package (pip install -e .): the pytest11 entry point is missing"
    )


CAPTURE = """
    import threading
    import tracemark

    q = tracemark.marker("db.query", table=str, rows=int)
    other = tracemark.marker("net.rx", length=int, payload=object)


    def lookup(table):
        q(table, 3)
        return 3


    def test_fields_as_fired(tracemark_events):
        payload = {"a": [1, 2]}
        lookup("users")
        other(42, payload)
        lookup("orders")
        evs = tracemark_events("db.*")
        assert [e.fields for e in evs] == [
            {"table": "users", "rows": 3}, {"table": "orders", "rows": 3}]
        assert evs[0].timestamp <= evs[1].timestamp
        (rx,) = tracemark_events("net.rx")
        assert rx.fields["payload"] is payload  # the object, not its repr
        assert tracemark_events.names() == ["db.query", "net.rx", "db.query"]
        assert evs[0].thread == "MainThread"


    def test_threads_and_clear(tracemark_events):
        ts = [threading.Thread(target=lookup, args=(f"t{i}",), name=f"w{i}") for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        evs = tracemark_events("db.query")
        assert sorted(e.fields["table"] for e in evs) == [f"t{i}" for i in range(8)]
        assert {e.thread for e in evs} == {f"w{i}" for i in range(8)}
        tracemark_events.clear()
        assert tracemark_events() == []


    def test_nothing_leaks_into_the_next_test():
        # The previous tests' connections are gone: the markers are inactive again.
        info = {m.name: m for m in tracemark.markers()}
        assert not info["db.query"].active and not info["net.rx"].active


    def test_a_fresh_list_per_test(tracemark_events):
        assert tracemark_events() == []
"""


def test_capture_gives_events_as_fired_per_test(tmp_path):
    done = run_pytest(tmp_path, CAPTURE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(done) == {"passed": 4}


FLIGHT = """
    import tracemark

    step = tracemark.marker("app.step", n=int, what=str)


    def test_passes():
        for i in range(5):
            step(i, "fine")


    def test_fails():
        for i in range(100):
            step(i, "before the failure")
        assert False, "boom"


    def test_passes_after():
        step(999, "after")
"""


def test_flight_recorder_puts_the_failing_tests_last_events_in_its_report(tmp_path):
    trace = tmp_path / "trace"
    done = run_pytest(
        tmp_path, FLIGHT, "--tracemark=app.*", f"--tracemark-dir={trace}", "--tracemark-last=7"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert outcome(done) == {"failed": 1, "passed": 2}
    out = done.stdout
    section = out.split("tracemark: last events", 1)[1].split("short test summary", 1)[0]
    shown = re.findall(r"app\.step n=(\d+) what='before the failure'", section)
    assert shown == [str(i) for i in range(93, 100)]
    assert "93 earlier events of this test not shown" in section
    assert "fine" not in section and "after" not in section  # only this test's events
    (snapshot,) = re.findall(r"snapshot trace: (\S+)", section)
    events = [e for e in read_trace(snapshot).events() if e.name == "app.step"]
    assert [e.fields["n"] for e in events][-100:] == list(range(100))
    # babeltrace2 reads the snapshot too.
    bt = subprocess.run(["babeltrace2", snapshot], capture_output=True, text=True, timeout=60)
    assert bt.returncode == 0, bt.stderr
    assert 'what = "before the failure"' in bt.stdout
    # The whole session, with each test a pytest.test span named by its nodeid.
    (final,) = re.findall(r"tracemark: the session's last events are in (\S+)", out)
    assert Path(final).parent == Path(snapshot).parent and final != snapshot
    tm = [sys.executable, "-m", "tracemark", "spans", final, "--json"]
    spans = subprocess.run(tm, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert spans.returncode == 0, spans.stderr
    doc = json.loads(spans.stdout)
    nodeids = sorted(s["fields"]["nodeid"] for s in doc["slowest"])
    assert nodeids == [f"test_it.py::test_{t}" for t in ("fails", "passes", "passes_after")]


def test_no_section_without_a_failure_and_nothing_without_the_option(tmp_path):
    done = run_pytest(tmp_path, FLIGHT.replace('assert False, "boom"', "pass"))
    assert done.returncode == 0 and outcome(done) == {"passed": 3}
    assert "tracemark" not in done.stdout
    assert not (tmp_path / ".tracemark").exists()


STRICT = """
    import tracemark

    m = tracemark.marker("app.typed", n=int)


    def test_bad_value_raises_in_a_test(tracemark_events):
        m("not a number")
"""


@pytest.mark.parametrize(
    ("args", "ini", "failed"),
    [
        ((), "", True),
        (("--tracemark-strict=no",), "", False),
        ((), "false", False),
        (("--tracemark-strict=yes",), "false", True),
    ],
)
def test_strict_mode_by_default_and_overridable(tmp_path, args, ini, failed):
    if ini:
        (tmp_path / "pytest.ini").write_text(f"[pytest]\ntracemark_strict = {ini}\n")
    done = run_pytest(tmp_path, STRICT, *args)
    assert outcome(done) == ({"failed": 1} if failed else {"passed": 1}), done.stdout
    if failed:
        assert "MarkerArgumentError" in done.stdout or "TypeError" in done.stdout


def test_the_readme_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Markers in tests", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    done = run_pytest(tmp_path, code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert outcome(done) == {"passed": 1}
    # ... and it can fail: the assertion is real.
    done = run_pytest(tmp_path, code.replace('"rows": 3}', '"rows": 4}'))
    assert outcome(done) == {"failed": 1}
