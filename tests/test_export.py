"""tracemark export (issue 11): Chrome JSON and Perfetto protobuf of real recordings, checked
against what the reader reads (slices per track, names, nesting, exact durations), and the
Perfetto output decoded with Perfetto's *published* schema (the ``perfetto`` package's
``perfetto_trace_pb2``, via ``protobuf``), never with our own decoder."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from tracemark.ctf import read_trace
from tracemark.export import export
from tracemark.export.chrome import TASK_TID_BASE, ChromeWriter
from tracemark.export.perfetto import PerfettoWriter, varint
from tracemark.export.walker import walk

pb = pytest.importorskip(
    "perfetto.protos.perfetto.trace.perfetto_trace_pb2",
    reason="pip install '.[test]' (perfetto, protobuf): the published Perfetto schema",
)

ROOT = Path(__file__).resolve().parents[1]

SERVER = textwrap.dedent(
    """
    import sys, threading, time, tracemark
    req_b = tracemark.marker("req.begin", path=str)
    req_e = tracemark.marker("req.end", status=int)
    db_b = tracemark.marker("db.begin", table=str)
    db_e = tracemark.marker("db.end", rows=int)
    log = tracemark.marker("log.line", text=str, blob=bytes, ratio=float)
    queue = tracemark.marker("srv.queue", depth=int)

    def handle(worker, n):
        for i in range(n):
            queue(i)
            req_b(f"/w{worker}/{i}")
            log("parsing", bytes([worker, i]), i / 2)
            db_b("users")
            time.sleep(0.0005)
            db_e(i)
            if i % 2:
                db_b("orders"); db_e(0)
            req_e(200 + i)
        if worker == 2:
            req_b("/never-ends")  # the thread ends with it open
            db_e(7)               # an end without a begin, inside it

    with tracemark.record(sys.argv[1]):
        threads = [threading.Thread(target=handle, args=(w, 3 + w), name=f"worker-{w}")
                   for w in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
    """
)

FORKED = textwrap.dedent(
    """
    import os, sys, tracemark
    job_b = tracemark.marker("job.begin", who=str)
    job_e = tracemark.marker("job.end")
    step = tracemark.marker("job.step", n=int)
    with tracemark.record(sys.argv[1]):
        job_b("parent")
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(4):
                    job_b("child"); step(i); job_e()
            finally:
                tracemark.tracers.recording.lifecycle.stop_all()
                os._exit(0)
        os.waitpid(pid, 0)
        step(99)
        job_e()
    """
)


def _run(script: str, trace: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, str(trace)], check=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    trace = tmp_path_factory.mktemp("export") / "server"
    _run(SERVER, trace)
    return trace


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    trace = tmp_path_factory.mktemp("export") / "forked"
    _run(FORKED, trace)
    return trace


def expected_slices(trace: Path):
    """What the program did, from the reader's events, paired here independently: per
    (pid, tid), (name, begin ns, end ns, depth, unfinished), and the ends without a begin."""
    stacks: dict[tuple, list] = defaultdict(list)
    last: dict[tuple, int] = {}
    out: dict[tuple, list] = defaultdict(list)
    stray: dict[tuple, list] = defaultdict(list)
    for ev in read_trace(trace).events():
        key = (ev.pid, ev.tid)
        last[key] = ev.timestamp
        base, _, kind = ev.name.rpartition(".")
        if kind == "begin":
            stacks[key].append((base, ev.timestamp))
        elif kind == "end":
            names = [n for n, _ in stacks[key]]
            if base not in names:
                stray[key].append(ev.timestamp)
                continue
            while stacks[key][-1][0] != base:
                n, t = stacks[key].pop()
                out[key].append((n, t, ev.timestamp, len(stacks[key]), True))
            n, t = stacks[key].pop()
            out[key].append((n, t, ev.timestamp, len(stacks[key]), False))
    for key, stack in stacks.items():
        while stack:
            n, t = stack.pop()
            out[key].append((n, t, last[key], len(stack), True))
    return {k: sorted(v, key=lambda s: (s[1], s[3])) for k, v in out.items()}, stray


def depths(slices):
    """(name, begin, end) -> nesting depth, from the intervals alone (as a viewer does)."""
    result = {}
    for name, b, e, *_ in slices:
        result[(name, b, e)] = sum(
            1 for n2, b2, e2, *_ in slices if (n2, b2, e2) != (name, b, e) and b2 <= b and e <= e2
        )
    return result


# --- Chrome JSON ---------------------------------------------------------------------------


def chrome_slices(doc):
    start = doc["otherData"]["start_ns"]
    got = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            b = start + round(e["ts"] * 1000)
            got[(e["pid"], e["tid"])].append((e["name"], b, b + round(e["dur"] * 1000), e["args"]))
    return got


def test_chrome_slices_match_what_the_threaded_server_did(server, tmp_path):
    out = tmp_path / "server.json"
    result = export(server, out, "chrome", counters=["srv.queue.depth"])
    doc = json.loads(out.read_text())  # strict JSON
    assert doc["displayTimeUnit"] == "ns"
    want, stray = expected_slices(server)
    got = chrome_slices(doc)
    assert set(got) == set(want) and len(want) == 3
    for key, slices in want.items():
        mine = sorted(got[key], key=lambda s: s[1])
        names = [n.replace(" (unfinished)", "") for n, *_ in mine]
        assert names == [s[0] for s in sorted(slices, key=lambda s: s[1])]
        assert [(b, e) for _, b, e, _ in mine] == [(s[1], s[2]) for s in slices]  # exact ns
        # Nesting as a viewer sees it from the intervals equals the program's.
        geometric = depths([(n.replace(" (unfinished)", ""), b, e) for n, b, e, _ in mine])
        assert [geometric[(s[0], s[1], s[2])] for s in slices] == [s[3] for s in slices]
        for (name, *_, args), s in zip(mine, slices, strict=True):
            assert name.endswith(" (unfinished)") == s[4]
            assert args.get("unfinished", False) is s[4]
    # Worker w handled 3 + w requests, each with one db span, odd ones a second.
    threads = {
        e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["name"] == "thread_name"
    }
    for w in range(3):
        mine = got[next(k for k in got if k[1] == threads[f"worker-{w}"])]
        n = 3 + w
        assert sum(1 for s in mine if s[0] == "req") == n
        assert sum(1 for s in mine if s[0] == "db") == n + n // 2
        req = [s for s in mine if s[0] == "req"]
        assert [s[3]["path"] for s in req] == [f"/w{w}/{i}" for i in range(n)]
        assert [s[3]["status"] for s in req] == [200 + i for i in range(n)]
    assert result.unfinished == 1 and result.unmatched == 1
    # The end without a begin: an instant saying so, never a slice.
    strays = [e for e in doc["traceEvents"] if e["name"] == "db.end (end without begin)"]
    assert len(strays) == 1 and strays[0]["ph"] == "i" and strays[0]["args"]["unmatched"] is True
    assert strays[0]["args"]["rows"] == 7
    assert sum(len(v) for v in stray.values()) == 1
    # Markers: instants with their fields; bytes as hex.
    logs = [e for e in doc["traceEvents"] if e["name"] == "log.line"]
    assert len(logs) == 3 + 4 + 5
    assert all(e["ph"] == "i" and e["s"] == "t" for e in logs)
    assert {e["args"]["blob"] for e in logs} >= {"0000", "0204"}
    # The counter: one C per srv.queue event, its values.
    counts = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    assert sorted(e["args"]["depth"] for e in counts) == sorted(
        i for w in range(3) for i in range(3 + w)
    )
    assert all(e["name"] == "srv.queue.depth" for e in counts)
    # Every slice and instant is on a named thread of a named process.
    named = {(e["pid"], e["tid"]) for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in doc["traceEvents"] if e["ph"] in "Xi"} <= named
    procs = [e for e in doc["traceEvents"] if e["name"] == "process_name"]
    assert [p["args"]["name"] for p in procs] == ["python"]  # python -c: no script name


def test_chrome_gz_round_trip(server, tmp_path):
    export(server, tmp_path / "a.json", "chrome")
    export(server, tmp_path / "a.json.gz", "chrome")
    raw = (tmp_path / "a.json.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == (tmp_path / "a.json").read_bytes()


def test_an_output_that_is_not_a_regular_file_is_written_to_not_replaced(server, tmp_path):
    # A pipe (as /dev/stdout often is) and a device: the export writes into them; replacing
    # them by a renamed file (as root can, even /dev/null) would break the machine.
    export(server, tmp_path / "a.json", "chrome")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    export(server, fifo, "chrome")
    reader.join(30)
    assert got == [(tmp_path / "a.json").read_bytes()]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    export(server, "/dev/null", "perfetto")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not list(Path("/dev").glob(".null.*.partial"))


def test_chrome_fork_child_is_its_own_process(forked, tmp_path):
    out = tmp_path / "f.json"
    export(forked, out, "chrome")
    doc = json.loads(out.read_text())
    want, _ = expected_slices(forked)
    pids = {pid for pid, _ in want}
    assert len(pids) == 2
    procs = {e["pid"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert procs == pids
    got = chrome_slices(doc)
    for key, slices in want.items():
        assert sorted((n, b, e) for n, b, e, _ in got[key]) == sorted(s[:3] for s in slices)
    child = next(k for k, v in want.items() if len(v) == 4)
    assert [s[0] for s in want[child]] == ["job"] * 4
    parent = next(k for k in want if k != child)
    assert [(s[0], s[4]) for s in want[parent]] == [("job", False)]


# --- Perfetto, decoded with the published schema ---------------------------------------------


def decode(path: Path):
    trace = pb.Trace()
    trace.ParseFromString(path.read_bytes())
    return trace


def interned_events(trace):
    """The TrackEvent packets of ``trace`` in file order, each (packet, event name, args),
    interned names resolved as trace processor resolves them: per sequence, from the
    ``interned_data`` of the packets before, since its last SEQ_INCREMENTAL_STATE_CLEARED;
    a packet using them must say SEQ_NEEDS_INCREMENTAL_STATE."""
    names: dict[int, dict] = {}
    keys: dict[int, dict] = {}
    out = []
    for packet in trace.packet:
        seq = packet.trusted_packet_sequence_id
        if packet.sequence_flags & pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED:
            names[seq], keys[seq] = {}, {}
        if packet.HasField("interned_data"):
            for e in packet.interned_data.event_names:
                names[seq][e.iid] = e.name
            for e in packet.interned_data.debug_annotation_names:
                keys[seq][e.iid] = e.name
        if not packet.HasField("track_event"):
            continue
        te = packet.track_event
        interned = te.HasField("name_iid") or any(
            a.HasField("name_iid") for a in te.debug_annotations
        )
        if interned:
            assert packet.sequence_flags & pb.TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
        name = names[seq][te.name_iid] if te.HasField("name_iid") else te.name
        args = {
            (keys[seq][a.name_iid] if a.HasField("name_iid") else a.name): getattr(
                a, a.WhichOneof("value")
            )
            for a in te.debug_annotations
        }
        out.append((packet, name, args))
    return out


def perfetto_slices(trace):
    """Replay BEGIN/END per track as trace processor does: (name, begin, end, depth, args)."""
    tracks = {}
    events = []
    for packet in trace.packet:
        assert packet.trusted_packet_sequence_id >= 1  # one per process that wrote
        if packet.HasField("track_descriptor"):
            tracks[packet.track_descriptor.uuid] = packet.track_descriptor
    for i, (packet, name, args) in enumerate(interned_events(trace)):
        events.append((packet.timestamp, i, packet.track_event, name, args))
    events.sort(key=lambda e: (e[0], e[1]))
    stacks = defaultdict(list)
    slices = defaultdict(list)
    instants = defaultdict(list)
    counters = defaultdict(list)
    for ts, _, te, te_name, args in events:
        assert te.track_uuid in tracks  # every event on a declared track
        if te.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            stacks[te.track_uuid].append((te_name, ts, args))
        elif te.type == pb.TrackEvent.TYPE_SLICE_END:
            name, b, bargs = stacks[te.track_uuid].pop()
            depth = len(stacks[te.track_uuid])
            slices[te.track_uuid].append((name, b, ts, depth, {**bargs, **args}))
        elif te.type == pb.TrackEvent.TYPE_INSTANT:
            instants[te.track_uuid].append((te_name, ts, args))
        elif te.type == pb.TrackEvent.TYPE_COUNTER:
            value = te.counter_value if te.HasField("counter_value") else te.double_counter_value
            counters[te.track_uuid].append((ts, value))
    assert not any(stacks.values())  # every BEGIN ended
    return tracks, slices, instants, counters


def test_perfetto_decodes_with_the_published_schema_and_matches(server, tmp_path):
    out = tmp_path / "server.pftrace"
    export(server, out, "perfetto", counters=["srv.queue.depth"])
    trace = decode(out)
    tracks, slices, instants, counters = perfetto_slices(trace)
    want, _ = expected_slices(server)
    by_thread = {
        (t.thread.pid, t.thread.tid): uuid for uuid, t in tracks.items() if t.HasField("thread")
    }
    processes = {t.process.pid: (uuid, t) for uuid, t in tracks.items() if t.HasField("process")}
    assert set(by_thread) == set(want)
    for (pid, tid), uuid in by_thread.items():
        t = tracks[uuid]
        assert t.parent_uuid == processes[pid][0]
        assert t.thread.thread_name.startswith("worker-")
        got = sorted(slices[uuid], key=lambda s: (s[1], s[3]))
        assert [s[:4] for s in got] == [s[:4] for s in want[(pid, tid)]]
        for s, w in zip(got, want[(pid, tid)], strict=True):
            assert s[4].get("unfinished", False) is w[4]
            if w[4]:  # marked on the timeline too
                assert (f"{w[0]} (unfinished)", w[2], {}) in instants[uuid]
        reqs = [s for s in got if s[0] == "req" and not s[4].get("unfinished")]
        assert all(s[4]["path"].startswith("/w") and s[4]["status"] >= 200 for s in reqs)
    assert [p.process.process_name for _, p in processes.values()] == ["python"]
    stray = [i for v in instants.values() for i in v if i[0] == "db.end (end without begin)"]
    assert len(stray) == 1 and stray[0][2] == {"rows": 7, "unmatched": True}
    logs = [i for v in instants.values() for i in v if i[0] == "log.line"]
    assert len(logs) == 12 and all(set(i[2]) == {"text", "blob", "ratio"} for i in logs)
    (counter_uuid,) = [u for u, t in tracks.items() if t.HasField("counter")]
    assert tracks[counter_uuid].name == "srv.queue.depth"
    assert sorted(v for _, v in counters[counter_uuid]) == sorted(
        i for w in range(3) for i in range(3 + w)
    )


def test_perfetto_fork_child_is_its_own_process(forked, tmp_path):
    out = tmp_path / "f.pftrace"
    export(forked, out, "perfetto")
    tracks, slices, _, _ = perfetto_slices(decode(out))
    want, _ = expected_slices(forked)
    procs = {t.process.pid for t in tracks.values() if t.HasField("process")}
    assert procs == {pid for pid, _ in want} and len(procs) == 2
    for uuid, t in tracks.items():
        if t.HasField("thread"):
            key = (t.thread.pid, t.thread.tid)
            assert [s[:4] for s in sorted(slices[uuid], key=lambda s: s[1])] == [
                s[:4] for s in want[key]
            ]


def test_perfetto_values_of_every_type_and_varints():
    assert varint(0) == b"\x00" and varint(300) == b"\xac\x02"
    assert varint(-1 & ((1 << 64) - 1)) == b"\xff" * 9 + b"\x01"
    ev = SimpleNamespace
    fields = {"i": -5, "big": 1 << 70, "f": 1.5, "b": True, "s": "é", "raw": b"\x00\xff"}
    events = [
        ev(
            timestamp=1_700_000_000_000_000_000 + k,
            name="m",
            fields=fields,
            pid=1,
            tid=2,
            thread="t",
        )
        for k in range(2)
    ]
    import io

    buf = io.BytesIO()
    walk([], PerfettoWriter(buf), events=events)
    trace = pb.Trace()
    trace.ParseFromString(buf.getvalue())
    te = interned_events(trace)
    assert [p.timestamp for p, _, _ in te] == [e.timestamp for e in events]
    args = te[0][2]
    assert args == {"i": -5, "big": str(1 << 70), "f": 1.5, "b": True, "s": "é", "raw": "00ff"}


# --- tasks ------------------------------------------------------------------------------------


def test_task_tracks_go_under_their_thread():
    """Events carrying ``task`` (the reader's Task: id, name): each task's spans on a track
    of its own under the thread, nesting per task although the tasks interleave on one
    thread; two tasks that share a name (not an id) are two tracks. Recorded programs:
    tests/test_tasks.py."""
    import io

    from tracemark.ctf.reader import Task

    def ev(ts, name, task):
        return SimpleNamespace(
            timestamp=ts, name=name, fields={}, pid=10, tid=11, thread="loop", task=task
        )

    t1, t2, again = Task(1, "t1"), Task(2, "t2"), Task(3, "t1")
    events = [
        ev(1, "a.begin", t1),
        ev(2, "a.begin", t2),
        ev(3, "a.end", t1),
        ev(4, "a.end", t2),
        ev(5, "a.begin", again),
        ev(6, "a.end", again),
    ]
    buf = io.BytesIO()
    walk([], PerfettoWriter(buf), events=events)
    trace = pb.Trace()
    trace.ParseFromString(buf.getvalue())
    tracks, slices, _, _ = perfetto_slices(trace)
    (thread,) = [u for u, t in tracks.items() if t.HasField("thread")]
    tasks = sorted((t.name, u) for u, t in tracks.items() if t.parent_uuid == thread)
    assert [name for name, _ in tasks] == ["task t1", "task t1", "task t2"]
    got = sorted(s[:4] for _, u in tasks for s in slices[u])
    assert got == [("a", 1, 3, 0), ("a", 2, 4, 0), ("a", 5, 6, 0)]
    assert all(len(slices[u]) == 1 for _, u in tasks)

    text = io.StringIO()
    w = ChromeWriter(text)
    walk([], w, events=events)
    w.close()
    doc = json.loads(text.getvalue())
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    xs = {e["tid"]: (e["ts"], e["dur"]) for e in doc["traceEvents"] if e["ph"] == "X"}
    assert sorted(names[t] for t in xs) == ["loop task t1", "loop task t1", "loop task t2"]
    assert all(t >= TASK_TID_BASE for t in xs)
    assert sorted(xs.values()) == [(0.0, 0.002), (0.001, 0.002), (0.004, 0.001)]


# --- the command -----------------------------------------------------------------------------


def tm(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_cli_export_and_its_errors(server, tmp_path):
    out = tmp_path / "x.pftrace"
    r = tm(
        "export",
        str(server),
        "--format",
        "perfetto",
        "-o",
        str(out),
        "--counter",
        "srv.queue.depth",
    )
    assert r.returncode == 0, r.stderr
    assert "1 span(s) never ended" in r.stderr and "1 end(s) without a begin" in r.stderr
    assert decode(out).packet
    for bad, why in [
        ("nope.x", "no marker nope"),
        ("srv.queue.size", "has no field size (its fields: depth)"),
        ("log.line.text", "is str, not a number"),
        ("depth", "is not NAME.FIELD"),
    ]:
        r = tm(
            "export", str(server), "-f", "chrome", "-o", str(tmp_path / "y.json"), "--counter", bad
        )
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y.json").exists()
    r = tm("export", str(server), "-f", "chrome", "-o", str(tmp_path / "y.json"), "--jobs", "0")
    assert r.returncode == 2 and "--jobs must be 1 or more" in r.stderr
    r = tm("export", str(server), "-f", "perfetto", "-o", str(tmp_path / "j.pftrace"), "-j", "2")
    assert r.returncode == 0, r.stderr
    assert perfetto_slices(decode(tmp_path / "j.pftrace"))[1] == perfetto_slices(decode(out))[1]
    r = tm("export", str(tmp_path / "missing"), "-f", "chrome")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    r = tm("export", str(server), "-f", "chrome", "-o", str(tmp_path / "no" / "dir" / "z.json"))
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_damaged_trace_exports_what_reads_and_says_what_did_not(server, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(server, damaged)
    trace = read_trace(damaged)
    stream = max(trace.streams, key=lambda s: s.events)
    first = stream._packets[0]
    total = sum(s.events for s in trace.streams)
    with open(stream.path, "r+b") as f:  # the first event's id: one no metadata declares
        f.seek(first.offset + first.start)
        f.write(b"\xff\xff\xff\xff")
    out = tmp_path / "d.json"
    r = tm("export", str(damaged), "-f", "chrome", "-o", str(out))
    assert r.returncode == 4, r.stderr
    assert "not exported: corrupt trace" in r.stderr and str(stream.path) in r.stderr
    assert "is not in the metadata" in r.stderr and "Traceback" not in r.stderr
    doc = json.loads(out.read_text())
    shown = sum(1 for e in doc["traceEvents"] if e["ph"] == "i") + 2 * sum(
        1 for e in doc["traceEvents"] if e["ph"] == "X"
    )
    # Every other stream whole, this one up to its damaged packet (its only one here).
    assert total - first.count <= shown < total


def test_record_export_writes_beside_the_trace(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import tracemark\nb = tracemark.marker('s.begin')\ne = tracemark.marker('s.end')\n"
        "b(); e()\n"
    )
    trace = tmp_path / "rec"
    r = tm("record", "--export", "chrome", "-o", str(trace), "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "rec.json").read_text())
    assert [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"] == ["s"]
    r = tm(
        "record",
        "--export",
        "perfetto",
        "--export-output",
        str(tmp_path / "o.pftrace"),
        "-o",
        str(tmp_path / "rec2"),
        str(script),
    )
    assert r.returncode == 0, r.stderr
    _, slices, _, _ = perfetto_slices(decode(tmp_path / "o.pftrace"))
    assert [s[0] for v in slices.values() for s in v] == ["s"]
