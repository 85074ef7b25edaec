"""Issue 16: losses the trace cannot count are visible where users look (the recorder's
status file, ``read_trace(...).lost``, ``tracemark record`` / ``stats`` / ``view``)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracemark.ctf import read_trace
from tracemark.ctf.status import STATUS_FILE, read_status

ROOT = Path(__file__).resolve().parents[1]

FULL_DISK = """
import resource, signal, sys, time, tracemark
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
m = tracemark.marker("disk.m", i=int, pad=str)
rec = tracemark.record(sys.argv[1], subbuffer_size=4096, subbuffers=4)
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
for i in range(20000):
    m(i, "p" * 40)
    if i % 50 == 0:  # let the consumer write, even on a loaded machine: the disk fills
        time.sleep(0.0005)
s = rec.stop()
print(s.recorded, s.discarded, s.lost)
"""


def _run(code, *args, env=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _tracemark(*args):
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"},
    )


def test_a_full_disk_is_counted_in_the_status_file_and_the_reader(tmp_path):
    """Old code: the summary added up, but the trace said nothing was lost."""
    out = _run(FULL_DISK, tmp_path)
    assert out.returncode == 0, out.stderr
    recorded, discarded, lost = map(int, out.stdout.split())
    assert lost > 0 and recorded + discarded + lost == 20000
    trace = read_trace(tmp_path)
    events = sum(1 for _ in trace.events())
    assert events == recorded
    # Everything fired is in the trace, counted in its packets, or counted in its status.
    assert events + trace.discarded + trace.lost == 20000
    (sub,) = trace.subtraces
    assert sub.status["state"] == "stopped" and sub.lost == trace.lost > 0
    assert "File too large" in sub.status["reason"]


def test_tracemark_record_stats_and_view_say_events_were_lost(tmp_path):
    program = tmp_path / "app.py"
    program.write_text(
        textwrap.dedent("""
        import resource, signal, time, tracemark
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
        m = tracemark.marker("disk.m", i=int, pad=str)
        for i in range(20000):
            m(i, "p" * 40)
            if i % 50 == 0:  # let the consumer write, even on a loaded machine
                time.sleep(0.0005)
        """)
    )
    trace = tmp_path / "t"
    rec = _tracemark("record", "--buffer", "16K", "-o", trace, "--", sys.executable, program)
    assert rec.returncode == 0, rec.stderr
    assert "events were LOST" in rec.stderr and "File too large" in rec.stderr
    stats = _tracemark("stats", trace)
    assert stats.returncode == 0 and "events were LOST" in stats.stderr
    view = _tracemark("view", trace)
    assert view.returncode == 0 and "events were LOST" in view.stderr


def test_os_exit_under_tracemark_record_is_recovered(tmp_path):
    """Old code: exit code passed on, "0 events" for 1,000 fired, no warning. Now the ring
    files keep them: record recovers all 1,000 and says so."""
    code = "import os, tracemark\nm = tracemark.marker('ex.m', i=int)\n"
    code += "for i in range(1000):\n    m(i)\nos._exit(5)\n"
    rec = _tracemark("record", "-o", tmp_path / "t", "--", sys.executable, "-c", code)
    assert rec.returncode == 5
    assert "ended without stopping its recording" in rec.stderr, rec.stderr
    assert "recovered 1,000 events" in rec.stderr and "1,000 events from 1 process" in rec.stderr
    (status_dir,) = [p.parent for p in (tmp_path / "t").glob(f"*/{STATUS_FILE}")]
    assert read_status(status_dir)["state"] == "recovered"
    view = _tracemark("view", tmp_path / "t")
    assert view.returncode == 0 and "WARNING" not in view.stderr


def test_os_exit_without_ring_files_is_a_loss_warning(tmp_path):
    """With TRACEMARK_NORING=1 nothing survives the process: record and view say so."""
    code = "import os, tracemark\nm = tracemark.marker('ex.m', i=int)\n"
    code += "for i in range(1000):\n    m(i)\nos._exit(5)\n"
    env = {**os.environ, "TRACEMARK_NORING": "1"}
    rec = subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", str(tmp_path / "t"), "--"]
        + [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert rec.returncode == 5
    assert "ended without stopping its recording" in rec.stderr, rec.stderr
    assert "LOST" in rec.stderr
    (status_dir,) = [p.parent for p in (tmp_path / "t").glob(f"*/{STATUS_FILE}")]
    assert read_status(status_dir)["state"] == "recording"
    view = _tracemark("view", tmp_path / "t")
    assert "ended without stopping" in view.stderr


def test_a_clean_run_prints_no_loss_warning(tmp_path):
    code = "import tracemark\nm = tracemark.marker('ok.m', i=int)\nfor i in range(100):\n m(i)\n"
    rec = _tracemark("record", "-o", tmp_path / "t", "--", sys.executable, "-c", code)
    assert rec.returncode == 0 and "100 events" in rec.stderr
    assert "LOST" not in rec.stderr and "WARNING" not in rec.stderr
    status = read_status(next((tmp_path / "t").glob("*-*")))
    assert status["state"] == "stopped" and status["recorded"] == 100 and status["lost"] == 0


@pytest.mark.skipif(shutil.which("babeltrace2") is None, reason="babeltrace2 not installed")
def test_babeltrace2_reads_a_trace_with_the_status_file(tmp_path):
    out = _run(FULL_DISK, tmp_path)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.glob(f"*/{STATUS_FILE}"))
    bt = subprocess.run(["babeltrace2", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bt.returncode == 0, bt.stderr
    assert bt.stdout.count("disk.m:") == sum(1 for _ in read_trace(tmp_path).events())
