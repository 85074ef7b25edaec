"""Crash-proof recording: a process that dies while recording leaves ring files from which
every event it fired can be recovered, but for the one being written when it died.

The crash matrix (the issue's "Crash" test): a child fires ``i = 0, 1, 2, ...`` and reports
its progress over a pipe; it dies at a random moment by SIGKILL (sent from outside: it may
land inside ``pack_into``, tearing an event), SIGSEGV, ``abort()`` or ``os._exit(3)`` (from
its own signal handler, at a random point of the loop), 20 times each, in both modes. The
recovered events are exactly ``0..k`` (discard mode) or a gapless suffix ending at ``k``
(overwrite mode), ``k`` at least the last progress reported, and babeltrace2 reads each one.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracemark
from tracemark.ctf import read_trace, recover
from tracemark.ctf import ring as R

DRIVER = textwrap.dedent(
    r"""
    import json, os, random, resource, signal, sys, time
    import tracemark

    out, how, mode, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    m = tracemark.marker("crash.i", i=int, s=str)
    death = {
        "segv": lambda *a: os.kill(os.getpid(), signal.SIGSEGV),
        "abort": lambda *a: os.abort(),
        "exit": lambda *a: os._exit(3),
    }
    rng = random.Random(int(sys.argv[5]))
    results = []
    for run in range(runs):
        d = os.path.join(out, f"{how}-{mode}-{run}")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if how in death:
                signal.signal(signal.SIGUSR1, death[how])
            if mode == "discard":
                tracemark.record(d, "crash.*", subbuffer_size=64 * 1024, subbuffers=64)
            else:
                tracemark.record(d, "crash.*", mode="overwrite", subbuffer_size=4096, subbuffers=4)
            i = 0
            while True:
                m(i, "x" * (i % 13))
                if i % 32 == 0:
                    os.write(w, b"%d\n" % i)
                i += 1
        os.close(w)
        f = os.fdopen(r, "rb")
        f.readline()
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGUSR1)
        last = -1
        for line in f:
            last = int(line)
        f.close()
        _, status = os.waitpid(pid, 0)
        results.append({"dir": d, "last": last, "status": status})
    print(json.dumps(results))
    """
)


def _drive(tmp_path, how, mode, runs=20, seed=0):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), how, mode, str(runs), str(seed)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("mode", ["discard", "overwrite"])
@pytest.mark.parametrize("how", ["kill", "segv", "abort", "exit"])
def test_every_event_before_a_crash_is_recovered(tmp_path, how, mode):
    bt = shutil.which("babeltrace2")
    for run in _drive(tmp_path, how, mode, seed=hash((how, mode)) & 0xFFFF):
        assert os.WIFSIGNALED(run["status"]) or os.WEXITSTATUS(run["status"]) == 3
        results = recover(run["dir"])
        assert len(results) == 1 and not results[0].error and not results[0].live, results
        trace = read_trace(run["dir"])
        got = [ev.fields["i"] for ev in trace.events()]
        assert all(ev.fields["s"] == "x" * (ev.fields["i"] % 13) for ev in trace.events())
        assert got, run
        k = got[-1]
        assert k >= run["last"], (run, k)
        if mode == "discard":
            assert got == list(range(k + 1)), run  # every event, none torn, none twice
            assert trace.discarded == 0
        else:  # the flight recorder: its newest packets, gapless
            assert got == list(range(got[0], k + 1)), run
        assert not (results[0].path / R.RING_DIR).exists()
        if bt:
            text = subprocess.run(
                [bt, run["dir"]], capture_output=True, text=True, timeout=60, check=True
            ).stdout
            assert text.count("crash.i:") == len(got)


def test_a_recording_that_stops_normally_leaves_no_ring_files(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", i=int)
    with tracemark.record(tmp_path, f"{uniq}.*") as rec:
        ring_dir = rec.trace_path / R.RING_DIR
        assert ring_dir.is_dir() and list(ring_dir.glob("chan_*")) == []
        m(1)
        assert len(list(ring_dir.glob("chan_*"))) == 1
        assert recover(tmp_path)[0].live  # a live recording is left alone
    assert not ring_dir.exists()
    assert recover(tmp_path) == []
    assert [ev.fields["i"] for ev in read_trace(tmp_path).events()] == [1]


def test_a_ring_file_reserves_only_the_sub_buffers_its_thread_used(tmp_path, uniq):
    """The default ring is 32 sub-buffers (issue 14); a thread that fires a little must not
    reserve all of them on disk (on tmpfs, in memory). Each is reserved when first used."""
    m = tracemark.marker(f"{uniq}.m", i=int)
    size = 64 * 1024
    rec = tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=size, subbuffers=32)
    try:
        m(1)  # one sub-buffer in use
        (ring,) = (rec.trace_path / R.RING_DIR).glob("chan_*")
        st = ring.stat()
        assert st.st_size == R.DATA_OFFSET + 32 * size  # mapped whole
        assert st.st_blocks * 512 < R.DATA_OFFSET + 4 * size  # but not reserved whole
        with rec.consumer.stalled():  # none written, so none reused: more sub-buffers,
            for i in range(2 * size // 16):  # each reserved as it is first used
                m(i)
        assert ring.stat().st_blocks * 512 >= R.DATA_OFFSET + 2 * size
    finally:
        s = rec.stop()
    assert s.recorded == 1 + 2 * size // 16 and s.discarded == 0


def test_recovery_is_idempotent_and_writes_nothing_twice(tmp_path):
    run = _drive(tmp_path, "kill", "discard", runs=1)[0]
    recover(run["dir"])
    again = recover(run["dir"])
    assert again == []
    got = [ev.fields["i"] for ev in read_trace(run["dir"]).events()]
    assert got == list(range(len(got)))


def test_view_says_to_recover_and_recover_command_does_it(tmp_path):
    run = _drive(tmp_path, "exit", "discard", runs=1)[0]
    cli = [sys.executable, "-m", "tracemark"]
    view = subprocess.run([*cli, "stats", run["dir"]], capture_output=True, text=True)
    assert "tracemark recover" in view.stderr
    done = subprocess.run([*cli, "recover", run["dir"]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(Path(run["dir"]).glob(f"*/{R.RING_DIR}"))
    view = subprocess.run([*cli, "stats", run["dir"]], capture_output=True, text=True)
    assert view.returncode == 0 and "recover" not in view.stderr


REFUSED = r"""
import os, signal, sys
import tracemark
from tracemark.ctf import ring

real = os.posix_fallocate
def refuse_after_the_first(fd, offset, length):  # a disk that fills after sub-buffer 0
    if offset > ring.DATA_OFFSET:
        raise OSError(28, "No space left on device")
    return real(fd, offset, length)
os.posix_fallocate = refuse_after_the_first

m = tracemark.marker("full.i", i=int)
rec = tracemark.record(sys.argv[1], "full.*", subbuffer_size=4096, subbuffers=8)
with rec.consumer.stalled():  # nothing written, so each packet takes a new sub-buffer
    for i in range(500):  # about 200 fit a sub-buffer: three sub-buffers, two refused
        m(i)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sub_buffers_the_disk_refused_are_named_as_lost_by_the_recovery(tmp_path):
    """A full disk refuses a sub-buffer's blocks: it is kept in plain memory (the program
    goes on), and the ring file counts it, so that after a crash the recovery says that
    what it held is lost rather than hand back a trace that silently lacks it."""
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, "-c", REFUSED, str(out)], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "tracemark", "recover", str(out)], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert "2 sub-buffers had to be kept in memory" in cli.stderr and "LOST" in cli.stderr
    got = [ev.fields["i"] for ev in read_trace(out).events()]
    assert got == list(range(len(got))) and 0 < len(got) < 250  # sub-buffer 0's, no more


def test_the_recovery_api_counts_the_sub_buffers_kept_outside(tmp_path):
    out = tmp_path / "t"
    subprocess.run([sys.executable, "-c", REFUSED, str(out)], capture_output=True, check=False)
    (result,) = recover(out)
    assert result.outside == 2 and result.events > 0 and not result.error


def test_a_torn_last_event_is_dropped(tmp_path, uniq):
    """Tear the last event by hand (zero its tail, as a death inside pack_into leaves it):
    recovery keeps the events before it and drops it; it never decodes it."""
    m = tracemark.marker(f"{uniq}.m", i=int, s=str)
    rec = tracemark.record(tmp_path, f"{uniq}.*", mode="overwrite", subbuffer_size=4096)
    for i in range(10):
        m(i, "abc" * i)
    ch = rec._tls.ch
    ring_file = ch.ring.path
    data = bytearray(ring_file.read_bytes())
    slot = R.DATA_OFFSET + (rec.nbufs - 1 - ch.unallocated) * rec.subbuffer_size
    end = slot + ch.pos  # where the end mark of the last event is
    data[end - 10 : end + 4] = bytes(14)  # the last event's tail and its end mark: zeroes
    ring_copy = tmp_path / "copy"
    shutil.copytree(rec.trace_path, ring_copy / "1-0")
    (ring_copy / "1-0" / R.RING_DIR / ring_file.name).write_bytes(data)
    rec.stop()
    recover(ring_copy)
    got = [ev.fields["i"] for ev in read_trace(ring_copy).events()]
    assert got == list(range(9)), got


def test_a_torn_packet_with_rings_left_says_to_recover(tmp_path):
    # A process that died while its consumer wrote leaves a torn last packet and its ring
    # files: reading says the trace is damaged *and* what mends it; recovery does.
    code = (
        "import os, sys, time, tracemark\n"
        "m = tracemark.marker('torn.m', i=int, s=str)\n"
        "rec = tracemark.record(sys.argv[1], 'torn.*', subbuffer_size=4096)\n"
        "for i in range(3000):\n"
        "    m(i, 'x' * 20)\n"
        "time.sleep(0.5)\n"  # the consumer writes the full packets
        "os._exit(0)\n"
    )
    trace = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", code, str(trace)], check=True, env=env, timeout=60)
    (stream,) = [p for p in trace.glob("*/stream_*") if p.stat().st_size > 0]
    with open(stream, "r+b") as f:
        f.truncate(stream.stat().st_size - 10)  # the last packet: torn
    cli = [sys.executable, "-m", "tracemark"]
    stats = subprocess.run([*cli, "stats", str(trace)], capture_output=True, text=True, env=env)
    assert stats.returncode == 4, stats.stderr
    assert "corrupt trace" in stats.stderr and f"run tracemark recover {trace}" in stats.stderr
    done = subprocess.run([*cli, "recover", str(trace)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    stats = subprocess.run([*cli, "stats", str(trace)], capture_output=True, text=True, env=env)
    assert stats.returncode == 0, stats.stderr
