"""The native consumer (tracemark._speedups.Writer, tracemark/_speedups_consumer.c): a
pthread that writes full packets without the GIL, so firing threads never wait for a
consumer to get the GIL back. Same files, same counts, same errors as the pure consumer
(tracemark/tracers/recording/consumer.py, the reference, kept by TRACEMARK_CORE=python).

These tests ask for the C core whatever the suite runs under (and fail, never skip, where it
can be built and was not: test_speedups.py); the comparisons run both consumers.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from io import StringIO
from pathlib import Path

import pytest
from test_speedups import CAN_BUILD

import tracemark
from tracemark import env
from tracemark.cli._common import Style
from tracemark.cli.record import summarize
from tracemark.ctf import read_trace
from tracemark.ctf import writer as W
from tracemark.ctf.status import read_status
from tracemark.tracers.recording import consumer as C
from tracemark.tracers.recording import session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def native(monkeypatch):
    """The C core (and so the native consumer) for the recordings this test makes."""
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    monkeypatch.delenv(env.CORE_VARIABLE, raising=False)
    assert env.core()[0] == "c"


def _use(core: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != env.CORE_VARIABLE}
    if core == "python":
        environ[env.CORE_VARIABLE] = "python"
    return environ


def _run(code: str, *args, core: str = "c", timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_use(core),
    )


@pytest.fixture
def fast_dir(tmp_path):
    """A directory whose disk keeps up with any firing rate: tmpfs (/dev/shm) when there is
    one, so "up to the disk's bandwidth" is the machine's memory bandwidth."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="tracemark-test-") as d:
            yield Path(d)
    else:
        yield tmp_path


def test_a_discard_recording_on_the_c_core_uses_the_native_consumer(tmp_path, uniq, native):
    m = tracemark.marker(f"{uniq}.m", i=int)
    with tracemark.record(tmp_path, f"{uniq}.*") as rec:
        assert type(rec.consumer.native).__name__ == "Writer"
        m(1)
    over = tracemark.record(tmp_path / "o", f"{uniq}.*", mode="overwrite")
    assert over.consumer.native is None  # overwrite mode writes nothing while recording
    over.stop()


def test_the_pure_core_keeps_the_pure_consumer(tmp_path, uniq, monkeypatch):
    monkeypatch.setenv(env.CORE_VARIABLE, "python")
    with tracemark.record(tmp_path, f"{uniq}.*") as rec:
        assert rec.consumer.native is None and rec.consumer.thread is not None


# --- the figure: four threads flat out, default buffers, nothing lost ----------------

#: Each thread fires about 4 times what its channel's default buffers hold (an event of the
#: three fields below is 37 bytes).
EVENT_SIZE = 37
EVENTS_PER_THREAD = 4 * session.SUBBUFFERS * session.SUBBUFFER_SIZE // EVENT_SIZE


def _flat_out(fast_dir, uniq):
    """4 threads fire as fast as they can into default buffers (8 x 256 KiB each), 30 MB in
    all, almost 4 times what the buffers hold: the consumer must keep up, and every event
    must arrive. The load is a fixed count, not a duration, so a slow or shared machine
    only makes it take longer. The Python consumer thread (here only housekeeping) is held
    for the whole run: the firing threads need nothing that waits for the GIL."""
    m = tracemark.marker(f"{uniq}.m", n=int, s=str, x=float)
    for old in fast_dir.iterdir():
        shutil.rmtree(old)
    held, release = threading.Event(), threading.Event()
    real = C.Consumer._housekeep

    def blocked(self):
        held.set()
        release.wait(60)
        real(self)

    C.Consumer._housekeep = blocked
    try:
        rec = tracemark.record(fast_dir, f"{uniq}.*")
        assert held.wait(10)  # the housekeeping thread is stuck from here on

        def work(k: int) -> None:
            for i in range(EVENTS_PER_THREAD):
                m(i, "hello", k + 0.5)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert held.is_set() and not release.is_set()
    finally:
        release.set()
        C.Consumer._housekeep = real
    return rec.stop()


def test_four_threads_flat_out_with_default_buffers_lose_nothing(fast_dir, uniq, native):
    """Every event arrives: up to three runs (a 2-CPU machine can deschedule the writer
    thread for longer than the sub-buffers last and the firing threads' wait budget, 20 ms;
    then the events are discarded and counted, never lost silently), and at least one of
    them loses nothing."""
    total = 4 * EVENTS_PER_THREAD
    for _ in range(3):
        s = _flat_out(fast_dir, uniq)
        assert s.recorded + s.discarded == total and (s.lost, s.error) == (0, None)
        if s.discarded == 0:
            break
    assert s.recorded == total
    # A thread that ends before another starts hands its channel on: 4 streams at most.
    assert 1 <= s.streams <= 4
    size = sum(p.stat().st_size for p in s.trace_path.glob("stream_*"))
    assert size > 3 * 4 * session.SUBBUFFERS * session.SUBBUFFER_SIZE
    # Every thread's events, each exactly once, in order.
    per_thread: dict[float, list[int]] = {}
    for ev in read_trace(fast_dir).events():
        per_thread.setdefault(ev.fields["x"], []).append(ev.fields["n"])
    assert sorted(per_thread) == [0.5, 1.5, 2.5, 3.5]
    assert all(v == list(range(EVENTS_PER_THREAD)) for v in per_thread.values())


# --- the same files as the pure consumer -------------------------------------------------------

SAME = """
import sys, tracemark
path = sys.argv[1]
a = tracemark.marker("same.a", n=int, s=str)
rec = tracemark.record(path, "same.*", subbuffer_size=4096, subbuffers=1024)
for i in range(20000):
    a(i, "x" * (i % 37))
    if i == 5000:  # a class declared while recording: its metadata goes before its packets
        b = tracemark.marker("same.b", v=float, t=bytes)
    if i > 5000:
        b(i / 3, bytes(i % 11))
s = rec.stop()
print(s.recorded, s.discarded, s.lost, s.streams)
"""


def _packets(stream: Path) -> list[tuple[int, int, int, int]]:
    """(size, seq, discarded, count) of every packet of a stream file."""
    data = stream.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        size = struct.unpack_from("<Q", data, pos + W.OFF_TS_END + 8)[0] // 8
        seq, disc, count = struct.unpack_from("<QQQ", data, pos + W.OFF_SEQ)
        out.append((size, seq, disc, count))
        pos += size
    assert pos == len(data)
    return out


def test_both_consumers_write_the_same_streams_and_metadata(tmp_path, native):
    results = {}
    for core in ("c", "python"):
        out = _run(SAME, tmp_path / core, core=core)
        assert out.returncode == 0, out.stderr
        (sub,) = (tmp_path / core).glob("*-*")
        streams = {p.name: _packets(p) for p in sorted(sub.glob("stream_*"))}
        meta = (sub / "metadata").read_text()
        events = [(e.name, e.fields) for e in read_trace(tmp_path / core).events()]
        results[core] = (out.stdout, streams, meta[meta.index("event {") :], events)
    c, py = results["c"], results["python"]
    assert c[0] == py[0] == "34999 0 0 1\n"
    assert c[1] == py[1] and len(c[1]["stream_0"]) > 100  # packet by packet
    assert c[2] == py[2] and "same.b" in c[2]  # every event class, in the same order
    assert c[3] == py[3]


# --- errors: a full disk, reported and counted as by the pure consumer -----------------------

FULL_DISK = """
import resource, signal, sys, tracemark
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
m = tracemark.marker("disk.m", i=int, pad=str)
rec = tracemark.record(sys.argv[1], subbuffer_size=4096, subbuffers=512)
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
for i in range(20000):
    m(i, "p" * 40)
s = rec.stop()
print(type(rec.consumer.native).__name__, s.recorded, s.discarded, s.lost)
print(s.error.replace(str(s.trace_path), "TRACE"))
"""


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_full_disk_is_counted_and_reported_as_by_the_pure_consumer(tmp_path, core):
    if core == "c" and not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    out = _run(FULL_DISK, tmp_path, core=core)
    assert out.returncode == 0, out.stderr
    first, error = out.stdout.splitlines()
    kind, recorded, discarded, lost = first.split()
    assert kind == ("Writer" if core == "c" else "NoneType")
    recorded, discarded, lost = int(recorded), int(discarded), int(lost)
    assert lost > 0 and discarded == 0 and recorded + lost == 20000
    assert error == "cannot write the trace in TRACE: [Errno 27] File too large"
    assert out.stderr.count("cannot write the trace in") == 1  # reported once, a warning
    trace = read_trace(tmp_path)  # only whole packets on disk
    got = [ev.fields["i"] for ev in trace.events()]
    assert got == list(range(recorded))
    (sub,) = trace.subtraces
    assert sub.status["lost"] == lost and "File too large" in sub.status["reason"]


@pytest.mark.filterwarnings("ignore:cannot map a ring file:tracemark.TracemarkWarning")
def test_a_stream_that_cannot_be_opened_is_reported_with_its_path(tmp_path, uniq, native):
    m = tracemark.marker(f"{uniq}.m", n=int)
    with (
        pytest.warns(tracemark.TracemarkWarning, match="No such file or directory: '.*stream_0'"),
        tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096) as rec,
    ):
        for sub in rec.trace_path.iterdir():
            if sub.is_file() and sub.name != "status":  # keep the status, lose the rest
                sub.unlink()
        os.rename(rec.trace_path, tmp_path / "moved")
        m(1)
    assert rec.summary.lost == 1 and rec.summary.recorded == 0
    assert rec.summary.error.startswith(f"cannot write the trace in {rec.trace_path}: [Errno 2]")
    assert rec.summary.streams == 0  # never opened, as with the pure consumer


# --- stalls, stop while busy, no housekeeping thread -------------------------------------------


def test_default_buffers_hold_a_consumer_stalled_for_20_ms_of_flat_out_firing(
    tmp_path, uniq, native
):
    """Issue 14: the consumer thread is woken the moment a packet is handed over, but on a
    loaded 2-CPU machine (4 ms scheduler tick) it waited 4-18 ms for a CPU, while one thread
    firing flat out on the C core (~10M events/s) filled the old default 8 sub-buffers in
    ~5 ms. Without timing anything: with the consumer stalled, 200,000 events of the
    benchmark's marker (20 ms of such firing) all fit the default buffers; more are
    discarded and counted, none lost silently."""
    m = tracemark.marker(f"{uniq}.m", n=int, s=str, x=float)
    rec = tracemark.record(tmp_path, f"{uniq}.*")
    with rec.consumer.stalled():
        for i in range(200_000):
            m(i, "hello", 2.5)
        assert sum(c.discarded for c in rec._all_channels()) == 0
        assert rec.consumer.native.pending > 8  # more packets than 8 sub-buffers, none written
        for i in range(200_000, 400_000):  # beyond what they hold: discarded
            m(i, "hello", 2.5)
        assert sum(c.discarded for c in rec._all_channels()) > 0
    s = rec.stop()
    assert s.recorded + s.discarded == 400_000 and (s.lost, s.error) == (0, None)
    assert 200_000 <= s.recorded < 400_000
    got = [ev.fields["n"] for ev in read_trace(tmp_path).events()]
    assert got[:200_000] == list(range(200_000))


def test_a_stalled_native_consumer_fills_the_buffers_and_counts_discards(tmp_path, uniq, native):
    m = tracemark.marker(f"{uniq}.m", i=int)
    rec = tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096, subbuffers=2)
    with rec.consumer.stalled():
        for i in range(3000):
            m(i)
        assert rec.consumer.native.pending >= 2  # handed over, not written
    s = rec.stop()
    assert s.discarded > 0 and s.recorded + s.discarded == 3000 and s.lost == 0
    got = [ev.fields["i"] for ev in read_trace(tmp_path).events()]
    assert got[: len(got) - 1] == list(range(len(got) - 1))  # the first ones kept


@pytest.mark.serial  # it bounds a wait, which another worker's load stretches
def test_a_consumer_that_lost_the_cpu_for_a_moment_costs_no_events(tmp_path, uniq, native):
    """A firing thread whose sub-buffers are all in the consumer's hands waits for one (at
    most 20 ms at once) rather than discard: here the consumer takes 1 ms before each batch,
    as when it waits for a CPU, and a small ring fills many times over."""
    m = tracemark.marker(f"{uniq}.m", i=int)
    t0 = time.monotonic()
    rec = tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096, subbuffers=4)
    rec.consumer.native.slow_down(1_000_000)
    for i in range(3000):  # about 20 packets: 4 sub-buffers fill 5 times
        m(i)
    elapsed = time.monotonic() - t0
    s = rec.stop()
    assert (s.recorded, s.discarded, s.lost) == (3000, 0, 0)
    assert 0 < s.waited_s <= 0.020 + elapsed / 20 + 0.050
    assert [ev.fields["i"] for ev in read_trace(tmp_path).events()] == list(range(3000))


@pytest.mark.serial  # it bounds a wait, which another worker's load stretches
def test_a_disk_slower_than_the_program_costs_it_at_most_its_wait_budget(tmp_path, uniq, native):
    """The wait is bounded: a consumer that needs 50 ms per batch (a very slow disk) holds
    the program back at most 20 ms at once and 5% of the time in all (plus one wake-up's
    lateness); the rest is discarded and counted, as without waiting."""
    m = tracemark.marker(f"{uniq}.m", i=int)
    t0 = time.monotonic()
    rec = tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096, subbuffers=4)
    rec.consumer.native.slow_down(50_000_000)
    fired = 0
    while time.monotonic() - t0 < 1.0:
        for _ in range(1000):
            m(fired)
            fired += 1
    elapsed = time.monotonic() - t0
    s = rec.stop()
    assert s.recorded + s.discarded == fired and (s.lost, s.error) == (0, None)
    assert s.discarded > 0 and s.recorded > 4 * 4096 // 16
    assert 0.010 < s.waited_s <= 0.020 + elapsed / 20 + 0.050, (s.waited_s, elapsed)
    # And it is said: in the process's status file, and in record's summary.
    assert read_status(s.trace_path)["waited_s"] == round(s.waited_s, 6)
    out = StringIO()
    summarize(tmp_path, out, Style(False), top=3, elapsed=elapsed, code=0)
    assert f"the program waited {s.waited_s * 1000:,.0f} ms in all" in out.getvalue()


def test_stop_while_threads_fire_writes_everything_and_waits_for_nothing(fast_dir, uniq, native):
    m = tracemark.marker(f"{uniq}.m", k=int, i=int)
    rec = tracemark.record(fast_dir, f"{uniq}.*", subbuffer_size=8192, subbuffers=4)
    go = threading.Event()
    done = threading.Event()
    fired = [0] * 4

    def work(k: int) -> None:
        i = 0
        while not done.is_set():
            m(k, i)
            i += 1
            if i == 20000:
                go.set()
        fired[k] = i

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    assert go.wait(60)
    t0 = time.monotonic()
    s = rec.stop()
    took = time.monotonic() - t0
    done.set()
    for t in threads:
        t.join()
    assert took < 30 and s.lost == 0 and s.error is None
    native_writer = rec.consumer.native
    assert native_writer.pending == 0 and native_writer.alive == 0  # all written, reaped
    trace = read_trace(fast_dir)
    per: dict[int, list[int]] = {}
    for ev in trace.events():
        per.setdefault(ev.fields["k"], []).append(ev.fields["i"])
    assert sum(map(len, per.values())) == s.recorded
    for seq in per.values():  # in order, none twice (discards leave gaps)
        assert all(a < b for a, b in itertools.pairwise(seq))
    assert s.recorded + s.discarded <= sum(fired)


def test_without_a_housekeeping_thread_the_native_consumer_still_writes(
    tmp_path, uniq, native, monkeypatch
):
    m = tracemark.marker(f"{uniq}.m", n=int)

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096, subbuffers=4) as rec:
        assert rec.consumer.thread is None and rec.consumer.native is not None
        for i in range(20000):  # 30 times what the buffers hold
            m(i)
            if i % 100 == 0:
                time.sleep(0)  # 4 KiB buffers: let the thread run, even on a loaded machine
    monkeypatch.undo()
    s = rec.summary
    assert s.recorded + s.discarded == 20000 and s.recorded > 10000 and s.lost == 0
    got = [ev.fields["n"] for ev in read_trace(tmp_path).events()]
    assert len(got) == s.recorded and got == sorted(got)


# --- fork, exit ---------------------------------------------------------------------------------

FORK = """
import os, sys, threading, tracemark
m = tracemark.marker("fork.m", who=str, i=int)
rec = tracemark.record(sys.argv[1])  # default buffers: 8 MiB a thread
parent_writer = rec.consumer.native
stop = threading.Event()
def busy():  # the parent's consumer is busy when it forks
    i = 0
    while not stop.is_set():
        m("parent-thread", i); i += 1
t = threading.Thread(target=busy); t.start()
for i in range(3000):
    m("parent", i)
pid = os.fork()
if pid == 0:
    parent_writer.wait()  # inert here: returns at once, never touches the parent's mutex
    parent_writer.pause(True)
    inert = parent_writer.pending == 0 and parent_writer.take_error() is None
    del parent_writer  # freed in the child: its files closed, its buffers let go
    mine = rec.consumer.native
    for i in range(800000):  # 3 times what the buffers hold
        m("child", i)
    s = rec.stop()
    # (Discards are the 4-thread test's business: a starved machine may cause a few here.)
    ok = inert and type(mine).__name__ == "Writer" and s.lost == 0 and s.error is None
    print(inert, type(mine).__name__, s, file=sys.stderr)
    print("child", s.recorded, flush=True)
    os._exit(0 if ok and s.recorded + s.discarded == 800000 else 3)
_, status = os.waitpid(pid, 0)
stop.set(); t.join()
for i in range(3000, 6000):
    m("parent", i)
s = rec.stop()
print(os.waitstatus_to_exitcode(status), s.lost, pid)
"""


def test_a_fork_child_records_with_a_native_consumer_of_its_own(tmp_path, native):
    out = _run(FORK, tmp_path)
    assert out.returncode == 0, out.stderr
    (_, recorded), (code, lost, child) = (line.split() for line in out.stdout.splitlines())
    assert (code, lost) == ("0", "0")
    by_pid: dict[int, dict[str, list[int]]] = {}
    for ev in read_trace(tmp_path).events():
        by_pid.setdefault(ev.pid, {}).setdefault(ev.fields["who"], []).append(ev.fields["i"])
    (mine,) = by_pid[int(child)].values()
    assert list(by_pid[int(child)]) == ["child"] and len(mine) == int(recorded) > 100000
    assert all(a < b for a, b in itertools.pairwise(mine))  # in order, none twice
    (parent,) = set(by_pid) - {int(child)}
    assert by_pid[parent]["parent"] == list(range(6000))


EXIT = """
import sys, threading, tracemark
m = tracemark.marker("exit.m", k=int, i=int)
tracemark.record(sys.argv[1], subbuffer_size=4096, subbuffers=4)
def work(k):
    for i in range(50000):
        m(k, i)
threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
for t in threads: t.start()
for t in threads: t.join()
# no stop(): the interpreter's exit (atexit) stops the recording
"""


@pytest.mark.parametrize("core", ["c", "python"])
def test_exit_while_recording_writes_everything(tmp_path, core):
    if core == "c" and not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    out = _run(EXIT, tmp_path, core=core)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    trace = read_trace(tmp_path)
    (sub,) = trace.subtraces
    assert sub.status["state"] == "stopped"
    recorded = sub.status["recorded"]
    assert recorded + sub.status["discarded"] == 100000 and sub.status["lost"] == 0
    assert sum(1 for _ in trace.events()) == recorded


# --- resources -------------------------------------------------------------------------------


@pytest.mark.serial
def test_no_memory_kept_per_packet(tmp_path, uniq, native):
    """Every job a packet makes is freed once the packet is reaped: recordings of 2,000
    packets each leave nothing behind (the jobs are allocated with PyMem: tracemalloc
    sees them)."""
    m = tracemark.marker(f"{uniq}.m", i=int, s=str)

    def one(k: int) -> None:
        with tracemark.record(tmp_path / str(k), f"{uniq}.*", subbuffer_size=4096) as rec:
            for i in range(2000 * 4096 // 40):
                m(i, "x" * 10)
        assert rec.summary.lost == 0
        assert rec.consumer.native.alive == 0 and rec.consumer.native.pending == 0

    one(0)
    tracemalloc.start()
    try:
        one(1)
        base = tracemalloc.get_traced_memory()[0]
        for k in range(2, 5):
            one(k)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown


def test_a_writer_refuses_bad_arguments_and_packets():
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    from tracemark import _speedups

    with pytest.raises(TypeError):
        _speedups.Writer("not bytes", 0, 0)
    with pytest.raises(ValueError):
        _speedups.Writer(b"/tmp", -1, 0)
    w = _speedups.Writer(b"/nonexistent-dir", W.OFF_TS_END + 8, W.OFF_DISCARDED)

    class Ch:
        instance_id = 0

        def __init__(self):
            import collections

            self.full = collections.deque()
            self.free = collections.deque()

    ch = Ch()
    with pytest.raises(ValueError, match="size"):
        w.hand_over(ch, (bytearray(4096), 1, 0), True)  # packet size 0
    too_big = bytearray(4096)
    struct.pack_into("<Q", too_big, W.OFF_TS_END + 8, 8 * 5000)
    with pytest.raises(ValueError, match="size"):
        w.hand_over(ch, (too_big, 1, 0), True)
    with pytest.raises(TypeError):
        w.hand_over(ch, (bytearray(4096), 1), True)
    assert not ch.full and w.alive == 0  # nothing handed over on an error
    w.close()
    w.close()  # idempotent
    assert re.search(r"Writer", repr(type(w)))


def test_a_written_packet_comes_back_while_the_rest_of_its_batch_is_stuck(tmp_path):
    """Issue 14: the thread gives packets back as each write is done, not once per batch.
    Here a batch is [A, B, A'] and B's stream file is a FIFO nobody reads yet, so the thread
    is stuck opening it (a disk or a CPU it does not get, without timing anything): A is
    already written and can be reused; A' and B come back once B's stream is read."""
    if not CAN_BUILD:
        pytest.fail("this test needs the C core, which cannot be built here")
    import collections

    from tracemark import _speedups

    class Rec:
        _lost = 0

    class Ch:
        def __init__(self, iid):
            self.instance_id = iid
            self.full = collections.deque()
            self.free = collections.deque()
            self.written = 0
            self.on_disk_discarded = 0
            self.fd = -1
            self.rec = Rec()

    def packet(fill):
        buf = bytearray([fill]) * 4096
        struct.pack_into("<Q", buf, W.OFF_TS_END + 8, 8 * 4096)  # packet_size, in bits
        struct.pack_into("<Q", buf, W.OFF_DISCARDED, 0)
        return buf

    os.mkfifo(tmp_path / "stream_2")
    w = _speedups.Writer(os.fsencode(tmp_path), W.OFF_TS_END + 8, W.OFF_DISCARDED)
    a, b = Ch(1), Ch(2)
    a1, b1, a2 = packet(1), packet(2), packet(3)
    fd = -1
    try:
        w.pause(True)  # the three in one batch
        w.hand_over(a, (a1, 3, 0), True)
        w.hand_over(b, (b1, 5, 0), True)
        w.hand_over(a, (a2, 4, 1), True)
        w.pause(False)
        deadline = time.monotonic() + 60
        while not w.reap(a):  # a1 comes back, b1 still being written
            assert time.monotonic() < deadline, "a written packet was not given back"
            time.sleep(0.01)
        assert list(a.free) == [a1] and a.written == 3 and len(a.full) == 1
        assert w.pending == 2 and w.reap(b) == 0 and not b.free
        fd = os.open(tmp_path / "stream_2", os.O_RDONLY | os.O_NONBLOCK)
        w.wait()  # the thread opens the FIFO now, writes b1 into it (4 KiB fit), then a2
        assert os.read(fd, 8192) == bytes(b1)
        assert w.reap(a) == 1 and w.reap(b) == 1 and w.pending == 0
        assert list(a.free) == [a1, a2] and a.written == 7 and list(b.free) == [b1]
        assert (tmp_path / "stream_1").read_bytes() == bytes(a1) + bytes(a2)
        assert w.take_error() is None
    finally:
        if fd < 0:  # failed while the thread is stuck: let it go, or close() waits forever
            fd = os.open(tmp_path / "stream_2", os.O_RDONLY | os.O_NONBLOCK)
        w.close()
        os.close(fd)
