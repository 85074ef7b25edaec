"""Task identity (issue 11): an event fired inside an asyncio task is recorded with that task.

Each test records a real program and reads it back: the reader's ``Event.task`` (id, name),
babeltrace2's view of the ``tracemark.task`` events, packets that stand alone (overwrite
mode), ids never reused, the cost-free path outside asyncio, and 1,000 interleaved tasks
whose spans ``tracemark spans``, the pairing and both exporters must put on the right task.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from pathlib import Path

import pytest

import tracemark
from tracemark.analysis.pairing import End, Pairing
from tracemark.ctf import read_trace
from tracemark.ctf.index import trace_index
from tracemark.ctf.reader import Task

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def tm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_events_in_tasks_carry_their_task_and_others_none(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.ev", n=int)
    seen: dict[int, asyncio.Task | None] = {}

    async def work(i: int) -> None:
        for k in range(3):
            seen[i * 10 + k] = asyncio.current_task()
            m(i * 10 + k)
            await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        named = [asyncio.create_task(work(i), name=f"w{i}") for i in range(3)]
        unnamed = asyncio.create_task(work(3))
        done = asyncio.Event()
        loop.call_soon(lambda: (m(99), done.set()))  # a callback: in no task
        await asyncio.gather(*named, unnamed, done.wait())

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]) as rec:
        m(-1)
        asyncio.run(main())
        m(-2)
    assert rec.summary.recorded == 15  # the task events are bookkeeping, not counted
    events = list(read_trace(tmp_path).events())
    assert [ev.name for ev in events] == [f"{uniq}.ev"] * 15  # and not given as events
    by_n = {ev.fields["n"]: ev.task for ev in events}
    assert by_n[-1] is None and by_n[-2] is None and by_n[99] is None
    ids: dict[str, int] = {}
    for n, task in seen.items():
        got = by_n[n]
        assert isinstance(got, Task)
        assert got.name == task.get_name()
        assert ids.setdefault(got.name, got.id) == got.id  # one id per task
    assert len(set(ids.values())) == 4  # and one task per id
    assert by_n[30].name.startswith("Task-")  # asyncio's default name
    assert str(by_n[0]) == "w0"


def test_babeltrace2_reads_the_task_events(tmp_path, uniq):
    """Other CTF readers see ``tracemark.task`` as an ordinary event before the events of
    each task."""
    if shutil.which("babeltrace2") is None:
        pytest.fail("babeltrace2 is required (make test installs it)")
    m = tracemark.marker(f"{uniq}.ev", n=int)

    async def work(i: int) -> None:
        m(i)
        await asyncio.sleep(0)
        m(i + 100)

    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(work(i), name=f"job-{i}") for i in range(2)))

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]):
        asyncio.run(main())
    out = subprocess.run(
        ["babeltrace2", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    shown = [
        ("task " + line.rsplit('name = "', 1)[1].split('"')[0])
        if " tracemark.task: " in line
        else line.split("{ n = ")[1].split(" }")[0]
        for line in out
    ]
    assert shown == ["task job-0", "0", "task job-1", "1", "task job-0", "100", "task job-1", "101"]


def test_ids_are_never_reused_even_when_the_memory_is(tmp_path, uniq):
    """Tasks that live one after the other often get the same ``id()``: each still gets an
    id of its own, and the pairing keeps their spans apart."""
    q = tracemark.span(f"{uniq}.q")
    addresses = []

    async def one() -> None:
        addresses.append(id(asyncio.current_task()))
        q.begin()
        await asyncio.sleep(0)
        q.end()

    async def main() -> None:
        for _ in range(50):
            await asyncio.create_task(one(), name="same-name")
            gc.collect(1)  # the young generations: a full pass costs ~0.3 s in a long test session

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]):
        asyncio.run(main())
    assert len(set(addresses)) < 50  # the memory was reused (what makes this test mean it)
    events = list(read_trace(tmp_path).events())
    tasks = {ev.task for ev in events}
    assert len(tasks) == 50 and {t.name for t in tasks} == {"same-name"}
    ends = [item for item in Pairing().pair(events) if isinstance(item, End)]
    assert len(ends) == 50 and all(e.begin is not None and not e.unfinished for e in ends)
    assert all(e.begin.task == e.event.task for e in ends)


def test_a_renamed_task_keeps_its_id(tmp_path, uniq):
    """The name recorded is the task's name when it was switched to (its events since the
    last switch keep the name of that switch): the id stays."""
    m = tracemark.marker(f"{uniq}.ev", n=int)

    async def other() -> None:
        m(0)

    async def main() -> None:
        m(1)
        asyncio.current_task().set_name("renamed")
        await asyncio.create_task(other())
        m(2)

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]):
        asyncio.run(main())
    first, between, second = (ev.task for ev in read_trace(tmp_path).events())
    assert between.id != first.id
    assert first.id == second.id and second.name == "renamed" and first.name != "renamed"


def test_loops_on_several_threads(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.ev", who=str)

    async def work(name: str) -> None:
        for _ in range(20):
            m(name)
            await asyncio.sleep(0)

    async def main(prefix: str) -> None:
        await asyncio.gather(
            *(asyncio.create_task(work(f"{prefix}{i}"), name=f"{prefix}{i}") for i in range(3))
        )

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]):
        threads = [
            threading.Thread(target=asyncio.run, args=(main(p),), name=f"loop-{p}") for p in "ab"
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m("outside")
    events = list(read_trace(tmp_path).events())
    assert len(events) == 121
    for ev in events:
        if ev.fields["who"] == "outside":
            assert ev.task is None
        else:
            assert ev.task.name == ev.fields["who"]
            assert ev.thread == f"loop-{ev.fields['who'][0]}"


def test_overwrite_mode_packets_name_their_task(tmp_path, uniq):
    """A flight recording that dropped its early packets (and with them the task events
    written when each task was first seen) still names the task of every event left, and
    of the first event of each packet: every packet states its tasks itself. Reading packets
    alone through the packet index gives the same."""
    m = tracemark.marker(f"{uniq}.ev", who=str, pad=str)

    async def work(name: str) -> None:
        for _ in range(400):
            m(name, "x" * 40)
            await asyncio.sleep(0)

    async def main() -> None:
        asyncio.current_task().set_name("main")
        # A task switch before every event, and long stretches of one task, both.
        await asyncio.gather(*(asyncio.create_task(work(f"t{i}"), name=f"t{i}") for i in "01"))
        await work("main")

    rec = tracemark.record(
        tmp_path, events=[f"{uniq}.*"], mode="overwrite", subbuffer_size=4096, subbuffers=4
    )
    with rec:
        asyncio.run(main())
        rec.snapshot()
    trace = read_trace(tmp_path)
    assert trace.lost_packets > 0  # early packets were overwritten
    events = list(trace.events())
    assert events and all(ev.task is not None and ev.task.name == ev.fields["who"] for ev in events)
    indexed = list(trace.events(names=lambda n: True, index=trace_index(trace)))
    assert [(ev.fields["who"], ev.task) for ev in indexed] == [
        (ev.fields["who"], ev.task) for ev in events
    ]


def test_without_asyncio_nothing_is_imported_or_written(tmp_path):
    """A program that never imports asyncio: the recording does not import it, no task
    event is written, and once the program imports asyncio later, its tasks are named
    (the wrap of asyncio.events, made as it is imported, counts the running loop)."""
    done = run(
        """
        import sys, tracemark
        m = tracemark.marker("plain.ev", n=int)
        with tracemark.record(sys.argv[1] + "/a"):
            for i in range(1000):
                m(i)
        print("asyncio" in sys.modules)
        with tracemark.record(sys.argv[1] + "/b"):
            m(-1)
            import asyncio
            from tracemark.tracers.recording import tasks
            async def main():
                m(int(tasks.thread_slot().running is asyncio.get_running_loop()))
            asyncio.run(main(), debug=False)
            m(-2)
        print(tasks._unseen, tasks.thread_slot().running, tasks._finder in sys.meta_path)
        """,
        str(tmp_path),
    )
    assert done.stdout.split() == ["False", "frozenset()", "None", "False"]
    plain = list(read_trace(tmp_path / "a").events())
    assert len(plain) == 1000 and all(ev.task is None for ev in plain)
    sub = read_trace(tmp_path / "a").subtraces[0]
    raw = sum(s.events for s in sub.streams)
    assert raw == 1000  # no tracemark.task event in the packets either
    later = [(ev.fields["n"], ev.task) for ev in read_trace(tmp_path / "b").events()]
    assert later[0] == (-1, None) and later[2] == (-2, None)
    assert later[1][0] == 1 and later[1][1] is not None  # the loop was seen starting


def test_filter_and_view_show_the_task(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.ev", n=int)

    async def work(i: int) -> None:
        m(i)
        await asyncio.sleep(0)
        m(i + 10)

    async def main() -> None:
        await asyncio.gather(*(asyncio.create_task(work(i), name=f"req-{i}") for i in range(3)))

    with tracemark.record(tmp_path, events=[f"{uniq}.*"]):
        m(-1)
        asyncio.run(main())
    out = tm("view", str(tmp_path)).stdout.splitlines()
    assert len(out) == 7
    assert f"] {uniq}.ev n=-1" in out[0] and "MainThread]" in out[0]
    assert "MainThread req-1] " in out[2] and out[2].endswith("n=1")
    got = tm("view", str(tmp_path), "--filter", 'task == "req-2"').stdout.splitlines()
    assert [line.rsplit("=", 1)[1] for line in got] == ["2", "12"]
    got = tm("view", str(tmp_path), "--filter", 'task.startswith("req") and n > 10').stdout
    assert [line.rsplit("=", 1)[1] for line in got.splitlines()] == ["11", "12"]
    ids = {ev.task.id for ev in read_trace(tmp_path).events() if ev.task}
    one = min(ids)
    got = tm("view", str(tmp_path), "--filter", f"task_id == {one}").stdout.splitlines()
    assert len(got) == 2 and all("req-0]" in line for line in got)
    got = tm("view", str(tmp_path), "--filter", "task == None").stdout.splitlines()
    assert len(got) == 1 and got[0].endswith("n=-1")
    lines = [json.loads(x) for x in tm("view", str(tmp_path), "--json").stdout.splitlines()]
    assert lines[0]["task"] is None
    assert lines[1]["task"] == {"id": one, "name": "req-0"}


# --- 1,000 interleaved tasks -------------------------------------------------------------------

TASKS = 1000

# The recording starts before asyncio is imported (as under ``tracemark record``): the loop
# is seen starting; the tests above run in a process that imported asyncio first.
SPANS = """
import json, sys, time, tracemark
rec = tracemark.record(sys.argv[1])
import asyncio
from tracemark.tracers.recording import tasks
assert not tasks._unseen
req = tracemark.span("req", n=int)
step = tracemark.span("step", k=int)
note = tracemark.marker("note", n=int)
measured = {}

# Each span's four instants (the recorder's clock): before and after its begin marker,
# before and after its end marker. Its recorded begin and end lie in between.
now = time.monotonic_ns

async def worker(i):
    a = now()
    with req(i):
        b = now()
        await asyncio.sleep(0)
        for k in range(2):
            s = [now()]
            step.begin(k)
            s.append(now())
            note(i)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            s.append(now())
            step.end()
            s.append(now())
            measured[f"w{i}/{k}"] = s
        await asyncio.sleep(0)
        c = now()
    measured[f"w{i}"] = [a, b, c, now()]

async def main(n):
    await asyncio.gather(*(asyncio.create_task(worker(i), name=f"w{i}") for i in range(n)))

with rec:
    asyncio.run(main(int(sys.argv[2])))
with open(sys.argv[3], "w") as f:
    json.dump(measured, f)
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    run(SPANS, str(d / "trace"), str(TASKS), str(d / "measured.json"))
    return d / "trace", json.loads((d / "measured.json").read_text())


def close_to(recorded: int, measured: list[int]) -> bool:
    """A span's recorded duration is what the program measured: at least the time between
    its begin and end markers' returning and calling, at most the time between calling the
    begin marker and the end marker's returning (exact: the recorder's clock is the
    program's; the markers' own cost, a packet handed over, is what lies between)."""
    before_begin, after_begin, before_end, after_end = measured
    return before_end - after_begin <= recorded <= after_end - before_begin


def test_pairing_puts_every_slice_on_its_task(many):
    trace, measured = many
    events = list(read_trace(trace).events())
    assert len(events) == TASKS * 8
    ends = [item for item in Pairing().pair(events) if isinstance(item, End)]
    assert len(ends) == TASKS * 3
    offset = read_trace(trace).subtraces[0].meta.offset_ns  # epoch ns -> the clock's
    for end in ends:
        assert end.begin is not None and not end.unfinished
        assert end.begin.task == end.event.task
        task = end.event.task.name
        if end.span == "req":
            assert end.depth == 0 and end.begin.fields["n"] == int(task[1:])
            window = measured[task]
        else:
            assert end.depth == 1
            window = measured[f"{task}/{end.begin.fields['k']}"]
        assert close_to(end.duration, window)
        assert window[0] <= end.begin.timestamp - offset <= window[1]
        assert window[2] <= end.event.timestamp - offset <= window[3]
    assert len({e.event.task for e in ends}) == TASKS


def test_spans_command_gives_each_slice_its_task(many):
    trace, measured = many
    done = tm("spans", str(trace), "--json", "--top", str(TASKS))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["spans"] == TASKS * 3 and doc["unfinished"] == 0
    assert not doc["ends_without_begin"]
    assert len(doc["slowest"]) == TASKS
    for span in doc["slowest"]:
        task = span["task"]["name"]
        assert span["name"] == "req" and span["fields"]["n"] == int(task[1:])
        assert close_to(span["duration_ns"], measured[task])
        steps = [c for c in span["children"] if c["kind"] == "span"]
        assert [c["name"] for c in steps] == ["step", "step"]
        for c in steps:
            assert c["task"] == span["task"]
            assert close_to(c["duration_ns"], measured[f"{task}/{c['fields']['k']}"])
            notes = [x for x in c["children"] if x["kind"] == "event"]
            assert [x["fields"]["n"] for x in notes] == [int(task[1:])]
    # --filter on the task, for spans too.
    done = tm("spans", str(trace), "--json", "--filter", 'task == "w7"')
    doc = json.loads(done.stdout)
    (listed,) = doc["slowest"]  # its steps are inside it: listed spans never nest
    assert listed["task"]["name"] == "w7" and listed["name"] == "req"
    assert doc["names"]["step"]["count"] == 2


def test_exports_give_one_track_per_task_under_the_thread(many, tmp_path):
    pb = pytest.importorskip(
        "perfetto.protos.perfetto.trace.perfetto_trace_pb2",
        reason="pip install '.[test]' (perfetto, protobuf): the published Perfetto schema",
    )
    from test_export import chrome_slices, perfetto_slices

    trace, measured = many
    out = tmp_path / "t.json"
    assert tm("export", str(trace), "--format", "chrome", "-o", str(out)).returncode == 0
    doc = json.loads(out.read_text())
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in doc["traceEvents"]
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    slices = chrome_slices(doc)
    assert len(slices) == TASKS
    for key, got in slices.items():
        thread, _, task = names[key].partition(" task ")
        assert thread == "MainThread"
        assert sorted(s[0] for s in got) == ["req", "step", "step"]
        (req,) = [s for s in got if s[0] == "req"]
        assert req[3]["n"] == int(task[1:])
        assert close_to(req[2] - req[1], measured[task])
        assert all(req[1] <= s[1] and s[2] <= req[2] for s in got)  # steps nest inside

    out = tmp_path / "t.pftrace"
    assert tm("export", str(trace), "--format", "perfetto", "-o", str(out)).returncode == 0
    decoded = pb.Trace()
    decoded.ParseFromString(out.read_bytes())
    tracks, slices, instants, _ = perfetto_slices(decoded)
    (thread,) = [u for u, t in tracks.items() if t.HasField("thread")]
    under = {u: t.name for u, t in tracks.items() if t.parent_uuid == thread}
    assert len(under) == TASKS and set(slices) == set(under)
    per_task = defaultdict(list)
    for uuid, got in slices.items():
        per_task[under[uuid]] = got
        assert sorted((s[0], s[3]) for s in got) == [("req", 0), ("step", 1), ("step", 1)]
        assert [i[0] for i in instants[uuid]] == ["note", "note"]
    for name, got in per_task.items():
        task = name.removeprefix("task ")
        (req,) = [s for s in got if s[0] == "req"]
        assert close_to(req[2] - req[1], measured[task])


def test_a_loop_running_before_the_recording_is_seen(tmp_path):
    """asyncio imported and a loop already running on another thread when the recording
    starts: nobody saw that loop start, so that thread's events ask asyncio; they are named
    all the same. The recording thread itself was asked once, and is outside any loop."""
    done = run(
        """
        import asyncio, sys, threading, tracemark
        from tracemark.tracers.recording import tasks
        m = tracemark.marker("pre.ev", n=int)
        started, go = threading.Event(), threading.Event()

        async def work(i):
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            for k in range(3):
                m(i * 10 + k)
                await asyncio.sleep(0)

        async def main():
            started.set()
            await asyncio.gather(*(asyncio.create_task(work(i), name=f"p{i}") for i in range(2)))

        t = threading.Thread(target=asyncio.run, args=(main(),), name="early")
        t.start()
        started.wait()
        with tracemark.record(sys.argv[1]):
            m(-1)
            print(type(tasks.thread_slot()).__name__, t.ident in tasks._unseen)
            go.set()
            t.join()
        """,
        str(tmp_path),
    )
    assert done.stdout.split() == ["_Slot", "True"]
    events = list(read_trace(tmp_path).events())
    assert len(events) == 7
    for ev in events:
        n = ev.fields["n"]
        assert (ev.task is None) if n < 0 else (ev.task.name == f"p{n // 10}")
