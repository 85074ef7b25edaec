"""End to end: the commands run as a user runs them (subprocesses), on real recordings."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

import tracemark
from tracemark.ctf import read_trace

ROOT = Path(tracemark.__file__).resolve().parents[1]

APP = """
import multiprocessing as mp
import subprocess
import sys
import threading

import tracemark

rx = tracemark.marker("net.rx", "len=%d dev=%s")
job = tracemark.marker("job.done", worker=str, ms=float)


def child(kind, n):
    for i in range(n):
        rx(i, kind)


def work(name):
    for i in range(50):
        job(name, i / 10)


if __name__ == "__main__":
    for i in range(1000):
        rx(i, "eth0")
    threads = [threading.Thread(target=work, args=(f"w{k}",), name=f"w{k}") for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for method in ("fork", "spawn"):
        p = mp.get_context(method).Process(target=child, args=(method, 7))
        p.start()
        p.join()
    code = "import tracemark; m = tracemark.marker('sub.x', n=int); [m(i) for i in range(5)]"
    subprocess.run([sys.executable, "-c", code], check=True)
    if "--crash" in sys.argv:
        raise RuntimeError("the program crashed")
    print("done")
"""


def tm(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def json_events(trace, *more):
    proc = tm("view", str(trace), "--json", *more)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One recording of APP (threads, fork and spawn children, a subprocess) that crashes."""
    base = tmp_path_factory.mktemp("e2e")
    (base / "app.py").write_text(APP)
    proc = tm(
        "record", "-o", str(base / "trace"), "--", sys.executable, "app.py", "--crash", cwd=base
    )
    return base / "trace", proc


def test_every_process_and_thread_is_recorded_into_one_trace(recorded):
    trace, _ = recorded
    events = json_events(trace)
    by_dev = Counter(e["fields"]["dev"] for e in events if e["name"] == "net.rx")
    assert by_dev == {"eth0": 1000, "fork": 7, "spawn": 7}
    assert Counter(e["name"] for e in events)["sub.x"] == 5
    jobs = [e for e in events if e["name"] == "job.done"]
    assert Counter(e["thread"] for e in jobs) == {"w0": 50, "w1": 50, "w2": 50}
    pids = {e["fields"]["dev"]: e["pid"] for e in events if e["name"] == "net.rx"}
    sub_pid = next(e["pid"] for e in events if e["name"] == "sub.x")
    assert len({*pids.values(), sub_pid}) == 4  # parent, fork child, spawn child, subprocess
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    eth0 = [e["fields"]["len"] for e in events if e["fields"].get("dev") == "eth0"]
    assert eth0 == list(range(1000))


def test_a_crashing_program_keeps_its_exit_code_and_its_trace(recorded):
    trace, proc = recorded
    assert proc.returncode == 1
    assert "RuntimeError: the program crashed" in proc.stderr
    assert "done" not in proc.stdout
    summary = proc.stderr[proc.stderr.index("tracemark record:") :]
    assert "1,169 events from 4 processes" in summary
    assert "net.rx" in summary and "1,014" in summary
    assert f"tracemark view {trace}" in summary
    assert "DISCARDED" not in summary


def test_view_text_and_filter(recorded):
    trace, _ = recorded
    proc = tm(
        "view", str(trace), "-e", "net.*", "--filter", 'dev in ("fork", "spawn") and len >= 5'
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert all(" net.rx len=" in line for line in lines)
    assert sorted(line.split()[-1] for line in lines) == ["dev=fork"] * 2 + ["dev=spawn"] * 2
    limited = tm("view", str(trace), "--limit", "3").stdout.splitlines()
    assert len(limited) == 3 and "+?.??????" in limited[0]


def test_stats_agrees_with_view(recorded):
    trace, _ = recorded
    proc = tm("stats", str(trace), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["events"] == len(json_events(trace)) == 1169
    assert doc["processes"] == 4 and doc["discarded"] == 0
    # Every thread that fired, even those whose streams later threads took over.
    assert doc["threads"] == len({(e["pid"], e["tid"]) for e in json_events(trace)})
    ms = doc["markers"]["job.done"]["fields"]["ms"]
    assert (ms["min"], ms["max"], ms["p50"]) == (0.0, 4.9, 2.4)
    text = tm("stats", str(trace)).stdout
    assert "job.done  150 events" in text
    assert max(map(len, text.splitlines())) <= 80


def test_babeltrace2_sees_the_same_events(recorded):
    trace, _ = recorded
    if shutil.which("babeltrace2") is None:  # make test installs it; say so plainly if not
        pytest.fail("babeltrace2 is not installed (apt-get install babeltrace2)")
    out = subprocess.run(["babeltrace2", str(trace)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1169


@pytest.mark.parametrize(
    ("expr", "column"),
    [("len >> 2", 4), ("dev.split()", 3), ("lenn > 3", 0), ("__import__('os')", 0)],
)
def test_bad_filter_expressions(recorded, expr, column):
    trace, _ = recorded
    proc = tm("view", str(trace), "--filter", expr)
    assert proc.returncode == 2
    first, shown, caret = proc.stderr.splitlines()
    assert first.startswith(f"tracemark view: error: bad --filter at column {column + 1}:")
    assert shown == f"  {expr}" and caret == "  " + " " * column + "^"
    assert proc.stdout == ""


def damaged(recorded, tmp_path, how):
    trace, _ = recorded
    copy = tmp_path / "trace"
    shutil.copytree(trace, copy)
    stream = max(copy.rglob("stream_*"), key=lambda p: p.stat().st_size)
    data = bytearray(stream.read_bytes())
    if how == "magic":
        data[0:4] = b"\0\0\0\0"
    else:
        del data[len(data) // 2 :]
    stream.write_bytes(bytes(data))
    return copy, stream


@pytest.mark.parametrize("how", ["magic", "truncated"])
@pytest.mark.parametrize("command", ["view", "stats"])
def test_corrupt_traces_are_exit_4_naming_file_and_offset(recorded, tmp_path, how, command):
    copy, stream = damaged(recorded, tmp_path, how)
    proc = tm(command, str(copy))
    assert proc.returncode == 4
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tracemark {command}: error: corrupt trace: {stream}")
    assert "offset" in line
    assert "Traceback" not in proc.stderr


def test_an_empty_trace(tmp_path):
    proc = tm(
        "record", "-o", str(tmp_path / "t"), "-e", "nothing.*", "--", sys.executable, "-c", "pass"
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 events" in proc.stderr
    view = tm("view", str(tmp_path / "t"))
    assert (view.returncode, view.stdout) == (0, "")
    stats = tm("stats", str(tmp_path / "t"))
    assert stats.returncode == 0 and "no events" in stats.stdout


def test_discarded_events_are_loud(tmp_path):
    burst = textwrap.dedent(
        """
        import tracemark
        from tracemark.tracers.recording.lifecycle import active as _active
        m = tracemark.marker("burst.x", n=int, s=str)
        (rec,) = _active  # the recording the CLI started here
        with rec.consumer.stalled():  # nothing written meanwhile, as with a disk that stalls
            for i in range(200_000):
                m(i, "x" * 40)
        """
    )
    (tmp_path / "burst.py").write_text(burst)
    proc = tm("record", "-o", str(tmp_path / "t"), "--buffer", "16K", "burst.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "events were DISCARDED" in proc.stderr
    stats = tm("stats", str(tmp_path / "t"))
    assert "WARNING:" in stats.stdout and "discarded" in stats.stdout
    doc = json.loads(tm("stats", str(tmp_path / "t"), "--json").stdout)
    assert doc["discarded"] > 0
    assert doc["events"] + doc["discarded"] <= 200_000


def test_sigterm_to_the_program_still_leaves_a_trace(tmp_path):
    app = textwrap.dedent(
        """
        import os, signal, tracemark
        m = tracemark.marker("t.x", n=int)
        for i in range(100):
            m(i)
        os.kill(os.getpid(), signal.SIGTERM)
        """
    )
    (tmp_path / "app.py").write_text(app)
    proc = tm("record", "-o", str(tmp_path / "t"), "app.py", cwd=tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM
    assert [e["fields"]["n"] for e in json_events(tmp_path / "t")] == list(range(100))


def test_the_default_directory_and_module_mode(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(
        "import sys, tracemark\ntracemark.mark('m.x', 'a=%s', sys.argv[1])\n"
    )
    proc = tm("record", "-m", "pkg.main", "hello", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (trace,) = (tmp_path / "tracemark-traces").iterdir()
    assert trace.name.endswith("-pkg.main")
    assert [e["fields"] for e in json_events(trace)] == [{"a": "hello"}]


def test_view_into_a_closed_pipe_is_quiet(recorded):
    trace, _ = recorded
    cmd = f"{sys.executable} -m tracemark view {trace} | head -1"
    proc = subprocess.run(
        cmd,
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert len(proc.stdout.splitlines()) == 1
    assert proc.stderr == ""


def test_the_demo_records_its_threads_and_its_invoice_printer(tmp_path):
    proc = tm("record", "-o", str(tmp_path / "t"), "-m", "tracemark.demo", "--orders", "40")
    assert proc.returncode == 0, proc.stderr
    assert "processed 40 orders" in proc.stdout
    events = json_events(tmp_path / "t")
    names = Counter(e["name"] for e in events)
    assert names["shop.order.received"] == 40
    done = {e["fields"]["order"] for e in events if e["name"] == "shop.order.done"}
    printed = [e for e in events if e["name"] == "shop.invoice.printed"]
    assert {e["fields"]["order"] for e in printed} == done and len(printed) == len(done)
    parent = {e["pid"] for e in events if e["name"] == "shop.order.received"}
    child = {e["pid"] for e in printed}
    assert len(parent) == 1 and len(child) == 1 and parent != child
    workers = {e["thread"] for e in events if e["name"] == "shop.order.received"}
    assert workers <= {f"worker-{i}" for i in range(4)} and len(workers) > 1
    # The process is named after the module `-m` ran (argv[0] is still "-m" at start-up).
    names = {sub.pid: sub.env["procname"] for sub in read_trace(tmp_path / "t").subtraces}
    assert names[parent.pop()] == "tracemark.demo"


def test_a_python_without_tracemark_installed_is_recorded_too(tmp_path):
    base = Path(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    assert base.exists(), base
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([str(base), "-c", "import tracemark"], env=env, capture_output=True)
    bare = check.returncode != 0  # true under `make test` (tracemark is in the venv only)
    (tmp_path / "app.py").write_text("import tracemark\ntracemark.mark('bare.x', 'n=%d', 42)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", "t", "--", str(base), "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": ""} if bare else {**env, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert [e["fields"] for e in json_events(tmp_path / "t")] == [{"n": 42}]


def on_a_terminal(argv, env, *, stderr_too=True):
    """Run argv with stdout (and stderr, unless told) on a pseudo-terminal; return what it
    wrote there."""
    import pty
    import select

    leader, follower = pty.openpty()
    stderr = follower if stderr_too else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=follower, stderr=stderr, env=env)
    # No timing guess decides when the child's output is all read: the kernel may hand the
    # leader a dead child's last lines late on a loaded machine. Once the child has exited,
    # this end writes a marker into the follower; the terminal keeps one queue, so the
    # marker arrives after everything the child wrote, and reading stops there.
    end_mark = b"<end of the child's output>"
    chunks = []
    marked = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not marked and proc.poll() is not None:
                os.set_blocking(follower, False)
                try:
                    marked = os.write(follower, end_mark) == len(end_mark)
                except BlockingIOError:  # the queue is full: read some first
                    pass
            ready, _, _ = select.select([leader], [], [], 0.05)
            if ready:
                chunks.append(os.read(leader, 65536))
            if marked and b"".join(chunks).endswith(end_mark):
                break
        else:
            raise AssertionError(f"{argv}: no end of its output on the terminal in 60 s")
    finally:
        os.close(follower)
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks)[: -len(end_mark)].decode()


def test_on_a_terminal_lines_fit_and_colour_follows_no_color(recorded):
    trace, _ = recorded
    argv = [sys.executable, "-m", "tracemark", "view", str(trace), "-e", "job.*", "--limit", "5"]
    # 50 columns: every line of these events is longer (time, delta, [pid thread], name and
    # fields take more), so each one must be cut, fields first.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "50", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    coloured = on_a_terminal(argv, env)
    lines = coloured.replace("\r\n", "\n").splitlines()
    assert len(lines) == 5 and "\x1b[1;36mjob.done\x1b[0m" in coloured
    plain = on_a_terminal(argv, {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in plain
    plain_lines = plain.replace("\r\n", "\n").splitlines()
    assert len(plain_lines) == 5 and all(len(line) <= 50 for line in plain_lines)
    assert all(line.endswith("…") and " job.done " in line for line in plain_lines)


def test_a_packet_torn_by_sigkill_is_cut_and_said(tmp_path):
    """A program killed while the kernel copies a packet into its stream file leaves part of
    it (simulated here: the program appends half a packet itself, then is killed)."""
    app = textwrap.dedent(
        """
        import os, signal, time, tracemark
        from tracemark.tracers.recording.lifecycle import active as _active
        m = tracemark.marker("t.x", n=int, s=str)
        (rec,) = _active
        for i in range(5000):
            m(i, "x" * 30)  # several packets of the 16K sub-buffers
        stream = rec.trace_path / "stream_0"
        while not stream.exists() or stream.stat().st_size == 0:
            time.sleep(0.01)  # the consumer writes the first full packets
        with open(stream, "ab") as f:
            f.write(stream.read_bytes()[:3000])  # a packet cut short
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    (tmp_path / "app.py").write_text(app)
    proc = tm("record", "-o", str(tmp_path / "t"), "--buffer", "128K", "app.py", cwd=tmp_path)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "stream_0: cut the last 3,000 bytes, part of a packet" in proc.stderr
    assert "events from 1 process" in proc.stderr and "damaged" not in proc.stderr
    events = json_events(tmp_path / "t")
    numbers = [e["fields"]["n"] for e in events]
    assert numbers and numbers == sorted(set(numbers)) and numbers[0] == 0
    # A loaded machine may fill the 128K ring before the consumer frees a sub-buffer: the
    # events dropped then leave a gap that the summary counts, never a silent one.
    gap = numbers[-1] + 1 - len(numbers)
    said = re.search(r"([\d,]+) events were DISCARDED", proc.stderr)
    assert gap <= (int(said.group(1).replace(",", "")) if said else 0), proc.stderr
    bt = subprocess.run(["babeltrace2", str(tmp_path / "t")], capture_output=True, text=True)
    assert bt.returncode == 0 and len(bt.stdout.splitlines()) == len(events)


def test_stats_counts_every_thread_of_a_reused_stream(tmp_path):
    """Threads that run one after another share one stream (a channel is handed on): stats
    still counts each of them."""
    (tmp_path / "seq.py").write_text(
        textwrap.dedent(
            """
            import threading, tracemark
            m = tracemark.marker("seq.m", i=int)
            for i in range(4):
                t = threading.Thread(target=m, args=(i,))
                t.start()
                t.join()
            """
        )
    )
    proc = tm("record", "-o", str(tmp_path / "t"), "--", sys.executable, "seq.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(tm("stats", str(tmp_path / "t"), "--json").stdout)
    tids = {e["tid"] for e in json_events(tmp_path / "t")}
    assert len(tids) == 4 and doc["threads"] == 4
    assert len(list((tmp_path / "t").glob("*/stream_*"))) < 4  # the streams were reused


@pytest.mark.parametrize("command", ["view", "stats", "spans"])
def test_a_glob_that_matches_nothing_says_so_with_the_closest_names(recorded, command):
    trace, _ = recorded
    proc = tm(command, str(trace), "-e", "net.xr", "-e", "app.*", "-e", "sub.*")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "tracemark: warning: -e 'net.xr' matches no marker in this trace; closest: net.rx",
        "tracemark: warning: -e 'app.*' matches no marker in this trace",
    ]


def test_a_filter_comparing_a_number_with_text_is_an_error(recorded):
    trace, _ = recorded
    proc = tm("view", str(trace), "-e", "net.rx", "--filter", 'len > "5"')
    assert proc.returncode == 2
    assert "'len' holds a number" in proc.stderr and "without quotes: 5" in proc.stderr


def _view_on_a_terminal(trace, *more):
    """``tracemark view`` with its output on a pseudo-terminal 50 columns wide."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "50", "NO_COLOR": "1"}
    argv = [sys.executable, "-m", "tracemark", "view", str(trace), "-e", "job.*", *more]
    return on_a_terminal(argv, env, stderr_too=False).splitlines()


def test_view_cuts_lines_on_a_terminal_unless_wide_and_never_into_a_pipe(recorded):
    trace, _ = recorded
    cut = _view_on_a_terminal(trace, "--limit", "5")
    wide = _view_on_a_terminal(trace, "--limit", "5", "--wide")
    piped = tm("view", str(trace), "-e", "job.*", "--limit", "5").stdout.splitlines()
    # 50 columns: each of these lines is longer (the time and delta take 25, "[pid w0]" up to
    # 12, the name 8, its fields 14), with a pid of any length, so each one is cut.
    assert len(cut) == 5 and all(len(line) <= 50 and line.endswith("…") for line in cut)
    assert wide == piped and all(len(line) > 50 for line in wide)
    assert all(" ms=" in line for line in piped)  # whole: the last field is there
