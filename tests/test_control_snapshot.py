"""tracemark snapshot: a flight recording (TRACEMARK_FLIGHT) written out without stopping."""

from __future__ import annotations

import json

from control_helpers import Target, cli

from tracemark.control import paths
from tracemark.ctf import read_trace


def _events(path):
    return [ev for ev in read_trace(str(path)).events()]


def test_snapshot_writes_the_flight_recording_and_it_goes_on(tmp_path):
    with Target(tmp_path, env={"TRACEMARK_FLIGHT": "app.tick"}) as t:
        st = t.wait_for(lambda s: s["results"] > 200)
        assert st["recordings"] == 1 and st["active"] == ["app.tick"]
        r = cli("snapshot", str(t.pid), "-o", str(tmp_path / "s1"), "--json")
        assert r.returncode == 0, r.stderr
        first = json.loads(r.stdout)["path"]
        assert first.startswith(str(tmp_path / "s1"))
        ev1 = _events(tmp_path / "s1")
        assert ev1 and {e.name for e in ev1} == {"app.tick"}
        t.wait_for(lambda s: s["results"] > st["results"] + 200)
        r = cli("snapshot", str(t.pid), "-o", str(tmp_path / "s2"))
        assert r.returncode == 0, r.stderr
        assert "snapshot of process" in r.stdout
        ev2 = _events(tmp_path / "s2")
        # Still recording: the second snapshot holds later events.
        assert max(e.fields["n"] for e in ev2) > max(e.fields["n"] for e in ev1)
        st = t.state()
        assert st["recordings"] == 1 and st["results_ok"]
        flight_dir = paths.socket_dir() / f"flight-{t.pid}"
        assert flight_dir.is_dir()
        assert t.exit() == 0
        assert not flight_dir.exists()  # removed at exit


def test_snapshot_without_flight_recording_is_refused(tmp_path):
    with Target(tmp_path) as t:
        r = cli("snapshot", str(t.pid), "-o", str(tmp_path / "s"))
        assert r.returncode == 6
        assert "no flight recording" in r.stderr and "TRACEMARK_FLIGHT" in r.stderr
