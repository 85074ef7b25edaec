"""The packet index (issue 10): ``view -e NAME`` decodes only the packets that hold NAME, and
prints exactly what it prints without an index, whatever state the index is in."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.cli import main
from tracemark.cli._common import name_matcher
from tracemark.cli.view import write_text
from tracemark.ctf import read_trace, recover
from tracemark.ctf import reader as reader_mod
from tracemark.ctf import writer as W
from tracemark.ctf.index import INDEX_DIR, build_index, index_path, load_index, trace_index
from tracemark.ctf.status import STATUS_FILE, encode, read_status

ROOT = Path(tracemark.__file__).resolve().parents[1]


def _env():
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def view(path, *globs, extra=()):
    """``tracemark view`` run in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["view", *[a for g in globs for a in ("-e", g)], *extra, str(path)]
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def reference(path, *globs):
    """What ``view -e`` printed before the index: every event decoded, then filtered."""
    match = name_matcher(globs)
    out = io.StringIO()
    write_text((ev for ev in read_trace(path).events() if match(ev.name)), out)
    return out.getvalue()


def drop_index(path):
    for d in Path(path).rglob(INDEX_DIR):
        shutil.rmtree(d)


def index_files(path):
    return sorted(Path(path).rglob(f"{INDEX_DIR}/*.idx"))


def assert_same_views(path, globs_list):
    """For each set of globs: view -e with no index (it builds one), with the saved index, and
    with the index of every stream made stale, all equal the full decode's output."""
    for globs in globs_list:
        drop_index(path)
        want = reference(path, *globs)
        first = view(path, *globs)
        assert first[0] == 0, first[2]
        assert first[1] == want
        assert index_files(path)  # saved by the first view
        assert view(path, *globs) == first
        for f in index_files(path):
            data = bytearray(f.read_bytes())
            data[10] ^= 1  # the stream size: stale (and the checksum fails too)
            f.write_bytes(bytes(data))
        assert view(path, *globs) == first
        assert view(path, *globs, extra=["--json"])[1] == _json_reference(path, globs)


def _json_reference(path, globs):
    from tracemark.cli.view import write_json

    match = name_matcher(globs)
    out = io.StringIO()
    write_json((ev for ev in read_trace(path).events() if match(ev.name)), out)
    return out.getvalue()


def _threads_trace(path, prefix, subbuffer=4096):
    """Four threads, five marker classes: fixed sizes 20 (int, float), 13 (bool), variable."""
    a = tracemark.marker(f"{prefix}.a", n=int)
    f = tracemark.marker(f"{prefix}.f", x=float)
    b = tracemark.marker(f"{prefix}.b", n=int, s=str)
    d = tracemark.marker(f"{prefix}.d", ok=bool)
    e = tracemark.marker(f"{prefix}.e", raw=bytes, o=object)
    barrier = threading.Barrier(4)

    def work(k):
        barrier.wait()
        for i in range(4000):
            a(i)
            if k == 1 and i % 3 == 0:
                f(i * 0.5)  # same size as a: mixed packets walked at C speed
            if 1000 <= i < 1100:
                b(i, f"burst {k} é")
            if k == 2 and i % 1500 == 0:
                d(i % 2 == 0)
            if k == 3 and i == 3999:
                e(b"\x00\xff", {"k": k})

    with tracemark.record(path, f"{prefix}.*", subbuffer_size=subbuffer, subbuffers=64):
        threads = [threading.Thread(target=work, args=(k,), name=f"w{k}") for k in range(1, 4)]
        for t in threads:
            t.start()
        work(0)
        for t in threads:
            t.join()
    return path


GLOBS = [("{p}.b",), ("{p}.[de]",), ("{p}.a",), ("{p}.b", "{p}.f"), ("nothing.*",), ("*",)]


def _globs(prefix):
    return [tuple(g.format(p=prefix) for g in globs) for globs in GLOBS]


def test_round_trip_and_each_packets_ids_are_its_events(tmp_path, uniq):
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    built = build_index(sub)
    assert sorted(built) == sorted(s.path.name for s in sub.streams)
    assert load_index(sub.path) == built
    ids_of = {name: eid for eid, (name, _) in sub.meta.events.items()}
    kinds = set()
    for stream in sub.streams:
        assert len(built[stream.path.name]) == stream.packets > 1
        for p, ids in zip(stream._packets, built[stream.path.name], strict=True):
            truth = {ids_of[ev.name] for ev in stream.iter_events([p])}
            assert ids == truth
            kinds.add(frozenset(ids))
    assert len(kinds) >= 4  # single-class, mixed fixed-size and variable packets all seen
    assert index_files(tmp_path) == sorted(index_path(s) for s in sub.streams)


def test_view_e_is_the_same_with_and_without_index_threads(tmp_path, uniq):
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    status = read_status(sub.path)
    status.update(lost=7, reason="disk full")  # and the loss warning view prints with them
    (sub.path / STATUS_FILE).write_bytes(encode(status))
    assert "7 events were LOST" in view(tmp_path, f"{uniq}.b")[2]
    assert_same_views(tmp_path, _globs(uniq))


def test_only_the_packets_holding_the_name_are_read(tmp_path, uniq, monkeypatch):
    _threads_trace(tmp_path, uniq)
    trace = read_trace(tmp_path)
    index = trace_index(trace)
    read = []
    real = reader_mod._read_packet

    def counting(path, p):
        read.append((path, p.offset))
        return real(path, p)

    monkeypatch.setattr(reader_mod, "_read_packet", counting)
    match = name_matcher([f"{uniq}.b"])
    got = [ev.fields["n"] for ev in trace.events(names=match, index=index)]
    assert sorted(got) == sorted(list(range(1000, 1100)) * 4)
    holding = {(s.path, p.offset) for s in trace.streams for p in s._packets}
    total = len(holding)
    assert 0 < len(read) <= total // 4, (len(read), total)
    read.clear()  # without the index: every packet is read (walked), the same events given
    assert [ev.fields["n"] for ev in trace.events(names=match)] == got
    assert len(read) == total


MULTI = textwrap.dedent(
    """
    import subprocess, sys, time, tracemark
    a = tracemark.marker("mp.a", n=int)
    b = tracemark.marker("mp.b", n=int, who=str)
    def work(who):
        for i in range(6000):
            a(i)
            if i % 1999 == 0:
                b(i, who)
                time.sleep(0.02)  # the consumer keeps up: nothing discarded
    if len(sys.argv) > 1:
        work(sys.argv[1])
    else:
        kids = [subprocess.Popen([sys.executable, __file__, f"kid{k}"]) for k in range(2)]
        work("parent")
        assert all(k.wait() == 0 for k in kids)
    """
)


def test_record_builds_the_index_and_view_is_the_same_multiprocess(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(MULTI)
    out = tmp_path / "trace"
    done = subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", str(out), "--buffer", "256K"]
        + ["--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    trace = read_trace(out)
    assert len(trace.subtraces) == 3 and trace.discarded == 0
    assert all(s.packets > 1 for s in trace.streams)
    for sub in trace.subtraces:  # every stream indexed by record, valid as it stands
        assert sorted(load_index(sub)) == sorted(s.path.name for s in sub.streams)
    code, text, _ = view(out, "mp.b")
    assert code == 0 and text.count(" mp.b ") == 3 * 4
    assert_same_views(out, [("mp.b",), ("mp.a",), ("mp.*",)])


def test_overwrite_mode_snapshots(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", i=int)
    rare = tracemark.marker(f"{uniq}.rare", i=int, s=str)
    rec = tracemark.record(
        tmp_path, f"{uniq}.*", mode="overwrite", subbuffer_size=4096, subbuffers=4
    )
    for i in range(6000):
        m(i)
        if i % 450 == 0:
            rare(i, "r")
    snap = rec.snapshot()
    for i in range(300):
        m(i)
    rec.stop()
    assert read_trace(snap).lost_packets > 0  # gaps in the sequence: packets overwritten
    assert_same_views(snap, [(f"{uniq}.rare",), (f"{uniq}.m",)])
    assert_same_views(tmp_path, [(f"{uniq}.rare",), (f"{uniq}.*",)])


KILLED = textwrap.dedent(
    """
    import os, signal, sys, tracemark
    m = tracemark.marker("kill.i", i=int, s=str)
    n = tracemark.marker("kill.n", i=int)
    tracemark.record(sys.argv[1], "kill.*", subbuffer_size=4096, subbuffers=256)  # no discards
    for i in range(20000):
        m(i, "x" * (i % 13)) if i % 700 == 0 else n(i)
    for i in range(20000, 20010):  # in the packet left open: only recovery writes it
        m(i, "last")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_recovered_trace_and_an_index_made_stale_by_recovery(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], env=_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    reader_mod.cut_partial_packets(tmp_path)
    (sub,) = read_trace(tmp_path).subtraces
    before = build_index(sub)  # the streams as the killed process left them
    stamps = {f: f.stat().st_mtime_ns for f in index_files(tmp_path)}
    assert stamps
    (done,) = recover(tmp_path)
    assert done.events > 0 and done.written_to == sub.path  # packets appended to the streams
    (sub,) = read_trace(tmp_path).subtraces
    assert load_index(sub) != before  # stale: not trusted
    want = reference(tmp_path, "kill.i")
    assert want.count("kill.i") == len(range(0, 20000, 700)) + 10
    assert view(tmp_path, "kill.i")[1] == want
    after = load_index(sub)  # re-indexed by that view
    assert sorted(after) == sorted(s.path.name for s in sub.streams)
    assert all(len(after[s.path.name]) == s.packets for s in sub.streams)
    assert_same_views(tmp_path, [("kill.i",), ("kill.n",)])


def test_a_truncated_stream_is_reindexed(tmp_path, uniq):
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    build_index(sub)
    stream = max(sub.streams, key=lambda s: s.packets)
    last = stream._packets[-1]
    st = stream.path.stat()
    os.truncate(stream.path, last.offset)  # one packet less, mtime put back as it was
    os.utime(stream.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    others = {f: f.read_bytes() for f in index_files(tmp_path) if f != index_path(stream)}
    assert_same_views(tmp_path, [(f"{uniq}.a",)])
    (sub,) = read_trace(tmp_path).subtraces
    again = {s.path.name: s for s in sub.streams}[stream.path.name]
    assert len(load_index(sub)[stream.path.name]) == again.packets == stream.packets - 1
    assert others  # the other streams' files were not stale


def test_only_the_stale_stream_is_reindexed(tmp_path, uniq):
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    build_index(sub)
    stream = max(sub.streams, key=lambda s: s.packets)
    written = {f: f.stat().st_mtime_ns for f in index_files(tmp_path)}
    os.truncate(stream.path, stream._packets[-1].offset)
    (sub,) = read_trace(tmp_path).subtraces
    assert load_index(sub).keys() == {s.path.name for s in sub.streams} - {stream.path.name}
    build_index(sub)
    for f, mtime in written.items():
        assert (f.stat().st_mtime_ns == mtime) == (f != index_path(stream)), f
    assert load_index(sub).keys() == {s.path.name for s in sub.streams}


@pytest.fixture(scope="module")
def fuzz_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    _threads_trace(path, "tidxfuzz", subbuffer=8192)
    (sub,) = read_trace(path).subtraces
    build_index(sub)
    stream = sub.streams[0]
    good = index_path(stream).read_bytes()
    want = view(path, "tidxfuzz.b")
    assert want[0] == 0 and want[1] == reference(path, "tidxfuzz.b")
    return path, index_path(stream), good, want


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.tuples(st.integers(0, 10**6), st.integers(1, 255)).map(lambda t: ("flip", *t)),
        st.integers(0, 10**6).map(lambda n: ("cut", n)),
    )
)
def test_a_garbage_index_file_changes_nothing(fuzz_trace, data):
    path, file, good, want = fuzz_trace
    if isinstance(data, bytes):
        bad = data
    elif data[0] == "flip":  # one byte of a valid index changed
        b = bytearray(good)
        b[data[1] % len(b)] ^= data[2]
        bad = bytes(b)
    else:  # a valid index truncated
        bad = good[: data[1] % len(good)]
    file.write_bytes(bad)
    assert view(path, "tidxfuzz.b") == want
    assert file.read_bytes() == good  # rebuilt, and the same as before


def test_an_index_that_is_not_a_file_or_not_a_directory(tmp_path, uniq):
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    want = view(tmp_path, f"{uniq}.b")
    drop_index(tmp_path)
    (sub.path / INDEX_DIR).write_bytes(b"not a directory")  # cannot be saved: used in memory
    assert view(tmp_path, f"{uniq}.b") == want
    (sub.path / INDEX_DIR).unlink()
    (sub.path / INDEX_DIR).mkdir()
    os.mkfifo(index_path(sub.streams[0]))  # never opened as a file, never blocks
    assert view(tmp_path, f"{uniq}.b") == want


def _as_nobody_view(path, glob):
    """``view -e`` in a forked child that cannot write ``path`` (root drops to nobody)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            result = view(path, glob)
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return tuple(json.loads(data))


def test_a_read_only_trace_uses_the_index_in_memory(uniq):
    top = Path(tempfile.mkdtemp(prefix="tm-index-ro-"))
    try:
        os.chmod(top, 0o755)
        path = _threads_trace(top / "trace", uniq)
        want = view(path, f"{uniq}.b")
        (sub,) = read_trace(path).subtraces
        bad = index_path(sub.streams[0])
        bad.write_bytes(b"garbage")  # a damaged index in a trace nobody may fix
        for d, _dirs, files in os.walk(top):
            for name in files:
                os.chmod(Path(d, name), 0o444)
            os.chmod(d, 0o555)
        assert _as_nobody_view(path, f"{uniq}.b") == want
        assert bad.read_bytes() == b"garbage"
    finally:
        for d, _dirs, _files in os.walk(top):
            os.chmod(d, 0o755)
        shutil.rmtree(top)


@pytest.mark.parametrize("damage", ["utf8", "count", "timestamp", "unknown id"])
def test_a_damaged_packet_is_an_error_with_or_without_index(tmp_path, uniq, damage):
    """Damage in a packet that holds no event shown is still reported, the same way."""
    _threads_trace(tmp_path, uniq)
    (sub,) = read_trace(tmp_path).subtraces
    ids = build_index(sub)
    a = next(eid for eid, (name, _) in sub.meta.events.items() if name == f"{uniq}.a")
    stream, p = next(
        (s, p)
        for s in sub.streams
        for p, found in zip(s._packets, ids[s.path.name], strict=True)
        if found == {a} and p.count > 2
    )
    data = bytearray(stream.path.read_bytes())
    at = p.offset + p.start  # its first event
    if damage == "utf8":
        stream, shown = next(s for s in sub.streams if b"burst" in s.path.read_bytes()), ".a"
        data = bytearray(stream.path.read_bytes())
        data[data.index(b"burst")] = 0xFF  # not UTF-8, in an event view -e .a does not show
    elif damage == "count":
        shown = ".b"
        data[p.offset + W.OFF_COUNT] += 1
    elif damage == "timestamp":
        shown = ".b"
        data[at + 4 : at + 12] = (p.ts_end + 1).to_bytes(8, "little")
    else:
        shown = ".b"
        data[at : at + 4] = (999).to_bytes(4, "little")
    stream.path.write_bytes(bytes(data))
    with pytest.raises(tracemark.ctf.TraceError) as full:
        list(read_trace(tmp_path).events())
    drop_index(tmp_path)
    first = view(tmp_path, uniq + shown)
    assert first[0] == 4 and str(full.value) in first[2], first[2]
    assert index_files(tmp_path)  # saved, the damaged packet marked "decode it"
    assert view(tmp_path, uniq + shown) == first


def test_babeltrace2_reads_a_trace_with_an_index(tmp_path, uniq):
    bt = shutil.which("babeltrace2")
    assert bt, "babeltrace2 is needed for this test"
    _threads_trace(tmp_path, uniq)
    view(tmp_path, f"{uniq}.b")
    assert index_files(tmp_path)
    with_index = subprocess.run([bt, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert with_index.returncode == 0, with_index.stderr
    drop_index(tmp_path)
    without = subprocess.run([bt, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert with_index.stdout == without.stdout
    assert with_index.stdout.count(f"{uniq}.b:") == 400
