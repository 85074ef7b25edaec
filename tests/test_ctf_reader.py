"""The reader: what the recorder wrote, streamed back; damage is a TraceError, never a crash."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.ctf import TraceError, read_trace
from tracemark.ctf import writer as W


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    """Two threads, several packets each, every field type."""
    path = tmp_path_factory.mktemp("small")
    m = tracemark.marker("reader.m", i=int, s=str, f=float, b=bytes, t=bool, o=object)

    def work(after_first=None):
        for i in range(400):
            m(i, f"s{i}", i / 2, bytes([i % 256]), bool(i % 2), None)
            if i == 0 and after_first is not None:
                after_first()

    with tracemark.record(path, "reader.*", subbuffer_size=4096, subbuffers=64):
        t = threading.Thread(target=work, name="other")
        # Start the other thread once this one has its channel: a thread that ended first
        # would leave its channel (and stream) to this one.
        work(after_first=t.start)
        t.join()
    return path


def copy(src, dst):
    shutil.copytree(src, dst)
    sub = next(p for p in dst.iterdir() if (p / "metadata").exists())
    return sub, sorted(sub.glob("stream_*"))


def all_events(path):
    return list(read_trace(path).events())


def test_streams_describe_threads_and_packets(small_trace):
    trace = read_trace(small_trace)
    assert sorted(s.thread for s in trace.streams) == ["MainThread", "other"]
    for s in trace.streams:
        assert s.pid == os.getpid() and s.tid > 0
        assert s.events == 400 and s.discarded == 0 and s.packets > 3
        assert s.path.parent.parent == small_trace
    assert trace.discarded == 0 and trace.lost_packets == 0
    assert list(trace.markers) == ["reader.m"]
    evs = all_events(small_trace)
    assert len(evs) == 800 and trace.start == evs[0].timestamp and trace.end == evs[-1].timestamp
    assert evs[0] == evs[0] and evs[0] != evs[1]


def test_each_event_is_decoded_once_even_with_the_bounds(small_trace):
    trace = read_trace(small_trace)
    calls = []
    for sub in trace.subtraces:
        sub.c_layout = None  # the Python decoders, counted here (test_creader: the C reader)
        for eid, (name, decode) in list(sub.decoders.items()):

            def counting(data, pos, end, decode=decode):
                calls.append(pos)
                return decode(data, pos, end)

            sub.decoders[eid] = (name, counting)
    evs = list(trace.events())
    assert len(calls) == len(evs) == 800
    start, end = trace.start, trace.end  # one decode per stream for the first event only
    assert (start, end) == (evs[0].timestamp, evs[-1].timestamp)
    assert len(calls) == 800 + len(trace.streams)


def test_a_renamed_thread_is_reported_by_its_latest_name(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", s=str)
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=4096):
        for _ in range(300):
            m("x" * 20)
        threading.current_thread().name = "renamed"
        try:
            for _ in range(300):
                m("y" * 20)
        finally:
            threading.current_thread().name = "MainThread"
    trace = read_trace(tmp_path)
    assert trace.streams[0].thread == "renamed"
    threads = [ev.thread for ev in trace.events()]
    assert threads[0] == "MainThread" and threads[-1] == "renamed"


def test_an_empty_recording_reads_as_no_events(tmp_path):
    with tracemark.record(tmp_path, "nothing.fires.this"):
        pass
    trace = read_trace(tmp_path)
    assert list(trace.events()) == [] and trace.start is None and trace.end is None
    assert trace.streams == []


def test_trace_error_can_carry_just_a_message():
    err = TraceError("something else went wrong")
    assert str(err) == "something else went wrong" and err.path is None and err.offset is None
    err = TraceError("f", 12, "bad")
    assert (str(err), err.path, err.offset) == ("f: at byte offset 12: bad", "f", 12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "not a directory"),
        (lambda p: p, "no metadata file"),
    ],
)
def test_no_trace_at_all(tmp_path, make, message):
    with pytest.raises(TraceError, match=message) as err:
        read_trace(make(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_metadata_damage_names_the_file_and_offset(small_trace, tmp_path):
    sub, _ = copy(small_trace, tmp_path / "t")
    meta = sub / "metadata"
    text = meta.read_text()
    meta.write_text(text.replace("/* CTF 1.8 */", "/* CTF 2.0 */"))
    with pytest.raises(TraceError, match=r"metadata: at byte offset 0: .*CTF 1\.8"):
        read_trace(tmp_path / "t")
    damaged = text.replace("tm_float _f;", "tm_flaot _f;")
    meta.write_text(damaged)
    with pytest.raises(TraceError) as err:
        read_trace(tmp_path / "t")
    at = damaged.index("\t\ttm_flaot")  # the line the field is on
    assert f"metadata: at byte offset {at}:" in str(err.value)
    meta.write_text(text.replace("uint64_t events_discarded;", "uint32_t events_discarded;"))
    with pytest.raises(TraceError, match="layout is not tracemark's"):
        read_trace(tmp_path / "t")


def test_a_truncated_stream_names_the_file_and_the_packet_offset(small_trace, tmp_path):
    _, streams = copy(small_trace, tmp_path / "t")
    data = streams[0].read_bytes()
    first = int.from_bytes(data[W.OFF_TS_END + 16 : W.OFF_TS_END + 24], "little") // 8
    streams[0].write_bytes(data[: first + 100])
    with pytest.raises(TraceError) as err:
        read_trace(tmp_path / "t")
    assert str(err.value).startswith(f"{streams[0]}: at byte offset {first}: truncated packet")
    streams[0].write_bytes(data[:first])  # a whole packet: readable, a prefix
    assert len(all_events(tmp_path / "t")) < 800


def test_packet_checks(small_trace, tmp_path):
    _, streams = copy(small_trace, tmp_path / "t")
    good = streams[0].read_bytes()

    def damaged(offset, value: bytes, pattern):
        data = bytearray(good)
        data[offset : offset + len(value)] = value
        streams[0].write_bytes(bytes(data))
        with pytest.raises(TraceError, match=pattern) as err:
            all_events(tmp_path / "t")
        assert str(streams[0]) in str(err.value)
        return err.value

    damaged(0, b"\0\0\0\0", "bad packet magic")
    damaged(4, b"\x01" * 16, "uuid differs")
    damaged(W.OFF_TS_END + 8, (7).to_bytes(8, "little"), "content_size")
    damaged(W.OFF_TS_END, (0).to_bytes(8, "little"), "timestamp_end is before")
    start = good.index(b"\0", W.PACKET_FIXED_SIZE) + 1
    err = damaged(start, (999).to_bytes(4, "little"), "event id 999 is not in the metadata")
    assert err.offset == start
    damaged(start + 4, (2**63).to_bytes(8, "little"), "timestamp")


def test_a_stream_from_another_trace_is_refused(small_trace, tmp_path, uniq):
    other = tmp_path / "other"
    m = tracemark.marker(f"{uniq}.m", i=int)
    with tracemark.record(other, f"{uniq}.*"):
        m(1)
    sub, _ = copy(small_trace, tmp_path / "t")
    shutil.copy(next(other.glob("*/stream_0")), sub / "stream_9")
    with pytest.raises(TraceError, match="uuid differs"):
        read_trace(tmp_path / "t")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_damage_never_crashes_or_hangs(small_trace, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz")
    sub, streams = copy(small_trace, root / "t")
    victim = data.draw(st.sampled_from([*streams, sub / "metadata"]))
    blob = bytearray(victim.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if how in ("flip", "both"):
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    if how in ("truncate", "both"):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    victim.write_bytes(bytes(blob))
    t0 = time.monotonic()
    try:
        trace = read_trace(root / "t")
        evs = list(trace.events())
        assert trace.start is None or trace.start <= trace.end
        assert trace.discarded >= 0 and sum(s.events for s in trace.streams) == len(evs)
    except TraceError as exc:
        assert re.match(rf"{re.escape(str(root))}/.*: at byte offset \d+: ", str(exc))
    else:
        assert len(evs) <= 800
    assert time.monotonic() - t0 < 10


@pytest.mark.serial
def test_reading_is_streaming(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", i=int, s=str)
    n = 100_000
    # Room for every event even if the consumer never runs (a loaded machine): no discards.
    with tracemark.record(tmp_path, f"{uniq}.*", subbuffer_size=1 << 16, subbuffers=128):
        for i in range(n):
            m(i, "some text of a typical length")
    size = sum(f.stat().st_size for f in tmp_path.glob("*/stream_*"))
    trace = read_trace(tmp_path)
    tracemalloc.start()
    try:
        count = 0
        for ev in trace.events():
            count += ev.fields["i"] == count
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n
    assert size > 4_000_000 and peak < 1_000_000  # a packet or two, not the whole trace


# --- cutting a torn tail ------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_stream_cut_anywhere_is_repaired_to_its_whole_packets(
    small_trace, tmp_path_factory, data
):
    """What a process killed mid-write leaves: a stream ending at any byte. Cutting keeps
    exactly the whole packets, and the trace reads again: the events of those packets."""
    root = tmp_path_factory.mktemp("torn")
    _, streams = copy(small_trace, root / "t")
    victim = data.draw(st.sampled_from(streams))
    blob = victim.read_bytes()
    bounds, offset = [0], 0
    while offset < len(blob):  # the packet boundaries, from the packet_size fields
        offset += (
            int.from_bytes(blob[offset + W.OFF_TS_END + 16 : offset + W.OFF_TS_END + 24], "little")
            // 8
        )
        bounds.append(offset)
    at = data.draw(st.integers(0, len(blob)))
    victim.write_bytes(blob[:at])
    kept = max(b for b in bounds if b <= at)
    assert tracemark.ctf.cut_partial_packets(root / "t") == (
        [(victim, at - kept)] if at != kept else []
    )
    assert victim.stat().st_size == kept
    evs = all_events(root / "t")  # readable again
    whole = read_trace(root / "t")
    assert len(evs) == sum(s.events for s in whole.streams)


def test_cutting_leaves_whole_and_otherwise_damaged_streams_alone(small_trace, tmp_path):
    _, streams = copy(small_trace, tmp_path / "t")
    before = [s.read_bytes() for s in streams]
    assert tracemark.ctf.cut_partial_packets(tmp_path / "t") == []
    damaged = bytearray(before[0])
    damaged[0] ^= 0xFF  # bad magic: not a torn tail, the reader's to report
    streams[0].write_bytes(bytes(damaged[:-10]))
    assert tracemark.ctf.cut_partial_packet(streams[0]) == 0
    assert streams[0].read_bytes() == bytes(damaged[:-10])
    assert [s.read_bytes() for s in streams[1:]] == before[1:]


def test_a_trace_of_many_streams_reads_with_few_open_files(tmp_path):
    """300 threads alive at once make 300 streams; merging them needs no file per stream."""
    script = textwrap.dedent(
        """
        import sys, threading, tracemark
        m = tracemark.marker("many.ev", k=int)
        go = threading.Event()
        def work(k):
            m(k)
            go.wait()
        with tracemark.record(sys.argv[1], "many.*", subbuffer_size=4096):
            ts = [threading.Thread(target=work, args=(k,)) for k in range(300)]
            for t in ts: t.start()
            go.set()
            for t in ts: t.join()
        """
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    assert len(list(tmp_path.glob("*/stream_*"))) == 300
    limited = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
        "from tracemark.ctf import read_trace; "
        "print(sorted(e.fields['k'] for e in read_trace(sys.argv[1]).events()) == "
        "list(range(300)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", limited, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "True", out.stderr
