"""Exports checked in real viewers (issue 11): speedscope in headless Chromium, and
Chromium's own trace engine (the DevTools Performance panel's model).

A small threaded server is recorded, exported as Chrome JSON, and loaded the way a user
loads it: speedscope's published static build, served from a localhost ``http.server``
thread with the trace beside it (``#profileURL=/trace.json``), opened in Debian's Chromium
driven by Playwright (``tests/viewers/speedscope.cjs``). What speedscope *parsed* is read
back through its own "Export" (speedscope's file format: per thread, every frame's open
and close), and checked against what the program did, as the reader reads it: the threads,
the number of slices on each, their names and fields, their nesting and their durations to
the nanosecond. The same JSON is parsed by the trace engine of the DevTools frontend bundled
in Chromium (``models/trace/trace.js``, imported in a ``devtools://`` page:
``tests/viewers/devtools.cjs``), and the tracks and tree it builds are checked the same way.

The viewers are not Python packages: ``make system-deps`` installs them (``apt-get install
chromium``; speedscope and playwright-core, pinned, with npm into ``.viewers/``). Where they
are missing the tests skip, saying what is missing and how to install it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from tracemark.ctf import read_trace
from tracemark.export import export

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / ".viewers" / "node_modules"
SPEEDSCOPE = MODULES / "speedscope" / "dist" / "release"
DRIVER = ROOT / "tests" / "viewers" / "speedscope.cjs"
DEVTOOLS = ROOT / "tests" / "viewers" / "devtools.cjs"


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if _chromium() is None:
        return "Chromium is not installed (apt-get install chromium)"
    for need in (SPEEDSCOPE / "index.html", MODULES / "playwright-core" / "package.json"):
        if not need.exists():
            return f"{need.relative_to(ROOT)} is missing"
    return None


def _chromium() -> str | None:
    return shutil.which(os.environ.get("CHROMIUM", "chromium"))


if (why := _missing()) is not None:
    pytest.skip(
        f"viewer checks need Chromium, node and npm packages: {why}; run `make system-deps` "
        "as root (apt-get install chromium nodejs npm; npm install into .viewers/)",
        allow_module_level=True,
    )

WORKERS = 3

# Worker w handles 2 + w requests; each queries "users", odd ones "orders" too, nested in
# the request; markers in between (instants, which speedscope does not draw).
SERVER = textwrap.dedent(
    """
    import sys, threading, time, tracemark
    req = tracemark.span("req", path=str)
    db = tracemark.span("db", table=str)
    parsed = tracemark.marker("req.parsed", size=int)

    def handle(worker):
        for i in range(2 + worker):
            req.begin(f"/w{worker}/{i}")
            parsed(100 + i)
            db.begin("users")
            time.sleep(0.001)
            db.end()
            if i % 2:
                with db("orders"):
                    time.sleep(0.0005)
            req.end()

    with tracemark.record(sys.argv[1]):
        threads = [threading.Thread(target=handle, args=(w,), name=f"worker-{w}")
                   for w in range(N_WORKERS)]
        for t in threads: t.start()
        for t in threads: t.join()
    """
).replace("N_WORKERS", str(WORKERS))


@pytest.fixture(scope="module")
def server_trace(tmp_path_factory):
    trace = tmp_path_factory.mktemp("viewers") / "server"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", SERVER, str(trace)], check=True, env=env, timeout=120)
    return trace


def program_slices(trace: Path, track=lambda ev: ev.tid) -> dict:
    """Per tid (or per ``track(ev)``: an asyncio task), what the program did as the reader
    reads it: (name, begin ns, end ns, depth, begin fields), in begin order; the program
    leaves no span open."""
    stacks: dict = defaultdict(list)
    out: dict = defaultdict(list)
    for ev in read_trace(trace).events():
        base, _, kind = ev.name.rpartition(".")
        key = track(ev)
        if kind == "begin":
            stacks[key].append((base, ev.timestamp, dict(ev.fields)))
        elif kind == "end":
            name, begin, fields = stacks[key].pop()
            assert name == base
            out[key].append((name, begin, ev.timestamp, len(stacks[key]), fields))
    assert not any(stacks.values())
    return {key: sorted(v, key=lambda s: (s[1], s[3])) for key, v in out.items()}


def node(argv: list[str], profile_dir: Path) -> None:
    """Run a driver of tests/viewers with node, Chromium on a fresh profile; fail with its
    stderr."""
    env = {
        **os.environ,
        "CHROMIUM": _chromium(),
        "USER_DATA_DIR": str(profile_dir),
        "NODE_PATH": str(MODULES),
    }
    done = subprocess.run(["node", *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{Path(argv[0]).name} in Chromium failed:\n{done.stderr}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output is not an access log
        pass


def open_in_speedscope(site: Path, screenshot: Path | None = None) -> dict:
    """Serve ``site`` (speedscope as ``speedscope/``, the trace as ``trace.json``) on a free
    localhost port, open the trace in speedscope in headless Chromium, and return what
    speedscope exported (its file format)."""
    (site / "speedscope").symlink_to(SPEEDSCOPE, target_is_directory=True)
    handler = functools.partial(_Quiet, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            url = (
                f"http://127.0.0.1:{httpd.server_address[1]}/speedscope/index.html"
                "#profileURL=/trace.json"
            )
            out = site / "exported.speedscope.json"
            profile_dir = site / "chromium-profile"
            profile_dir.mkdir()
            argv = [str(DRIVER), url, str(out)] + ([str(screenshot)] if screenshot else [])
            node(argv, profile_dir)
            return json.loads(out.read_text())
        finally:
            httpd.shutdown()
            thread.join(10)


def speedscope_slices(
    profile: dict, frames: list[dict]
) -> list[tuple[str, float, float, int, dict]]:
    """A speedscope evented profile's calls: (name, open, close, depth, args), in open order.
    speedscope names a Chrome event's frame ``NAME {args as JSON}``."""
    stack: list[tuple[int, float]] = []
    calls = []
    for ev in profile["events"]:
        if ev["type"] == "O":
            stack.append((ev["frame"], ev["at"], len(calls)))
            calls.append(None)
        else:
            frame, at, slot = stack.pop()
            assert frame == ev["frame"], "speedscope closed a frame it had not opened last"
            name, _, args = frames[frame]["name"].partition(" ")
            calls[slot] = (name, at, ev["at"], len(stack), json.loads(args) if args else {})
    assert not stack
    return calls


def test_speedscope_shows_each_thread_s_requests_and_queries(server_trace, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    result = export(server_trace, site / "trace.json", "chrome")
    assert result.unfinished == 0 and result.unmatched == 0
    want = program_slices(server_trace)
    assert len(want) == WORKERS

    doc = open_in_speedscope(site)
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    profiles = {}
    for p in doc["profiles"]:
        assert p["type"] == "evented" and p["unit"] == "microseconds"
        m = re.search(r", (worker-\d+) \(tid (\d+)\)$", p["name"])
        assert m, p["name"]  # one profile per thread, named after the thread
        profiles[int(m[2])] = (m[1], p)
    assert set(profiles) == set(want)

    for tid, slices in want.items():
        thread, profile = profiles[tid]
        w = int(thread.removeprefix("worker-"))
        got = speedscope_slices(profile, frames)
        # What the program did: 2 + w requests, each with one or two queries inside.
        n = 2 + w
        assert [s[0] for s in got].count("req") == n
        assert [s[0] for s in got].count("db") == n + n // 2
        assert [s[4]["path"] for s in got if s[0] == "req"] == [f"/w{w}/{i}" for i in range(n)]
        tables = [s[4]["table"] for s in got if s[0] == "db"]
        assert tables == [t for i in range(n) for t in ("users", "orders")[: 1 + i % 2]]
        # Slice by slice against the recording: name, nesting, and, to the nanosecond, the
        # offset from the thread's first slice (speedscope starts each thread at 0) and the
        # duration (speedscope's values are microseconds).
        first = slices[0][1]
        assert profile["startValue"] == 0
        assert [(s[0], s[3]) for s in got] == [(s[0], s[3]) for s in slices]
        assert [round(s[1] * 1000) for s in got] == [b - first for _, b, *_ in slices]
        assert [round((s[2] - s[1]) * 1000) for s in got] == [e - b for _, b, e, *_ in slices]
        assert [s[4] for s in got] == [s[4] for s in slices]  # the fields, as args
        for s in got:
            if s[0] == "db":
                assert s[2] - s[1] >= (1000 if s[4]["table"] == "users" else 500)  # slept


def test_chromium_trace_engine_builds_each_thread_s_tree(server_trace, tmp_path):
    trace_json = tmp_path / "trace.json"
    export(server_trace, trace_json, "chrome")
    start = json.loads(trace_json.read_text())["otherData"]["start_ns"]
    want = program_slices(server_trace)
    out = tmp_path / "devtools.json"
    (tmp_path / "chromium-profile").mkdir()
    node([str(DEVTOOLS), str(trace_json), str(out)], tmp_path / "chromium-profile")

    processes = json.loads(out.read_text())
    assert len(processes) == 1  # the server: one process
    threads = {t["tid"]: t for t in processes[0]["threads"]}
    assert set(threads) == set(want)
    for tid, slices in want.items():
        thread = threads[tid]
        w = int(thread["name"].removeprefix("worker-"))  # threads carry their names
        n = 2 + w
        # The track's entries: the spans (the engine keeps instants off thread tracks).
        assert [e["ph"] for e in thread["entries"]] == ["X"] * (n + n + n // 2)
        # The tree the panel draws: every slice once, in time order, nested as recorded;
        # the engine's times are microseconds from the JSON's ts: exact to the ns.
        tree = thread["tree"]
        assert [(e["name"], e["depth"]) for e in tree] == [(s[0], s[3]) for s in slices]
        assert [start + round(e["ts"] * 1000) for e in tree] == [s[1] for s in slices]
        assert [round(e["dur"] * 1000) for e in tree] == [s[2] - s[1] for s in slices]
        assert [e["args"] for e in tree] == [s[4] for s in slices]
        assert [e["args"]["path"] for e in tree if e["name"] == "req"] == [
            f"/w{w}/{i}" for i in range(n)
        ]


# --- an asyncio program: one track per task ------------------------------------------------

TASKS = 4

# Task i handles one request with a "users" query inside and, for odd i, an "orders" one;
# the tasks interleave on one thread at every await, so only task identity nests them right.
ASYNC_SERVER = textwrap.dedent(
    """
    import asyncio, sys, tracemark
    req = tracemark.span("req", path=str)
    db = tracemark.span("db", table=str)

    async def handle(i):
        with req(f"/t{i}"):
            await asyncio.sleep(0.001 * (i + 1))
            db.begin("users")
            await asyncio.sleep(0)
            await asyncio.sleep(0.0005)
            db.end()
            if i % 2:
                with db("orders"):
                    await asyncio.sleep(0)

    async def main():
        await asyncio.gather(
            *(asyncio.create_task(handle(i), name=f"t{i}") for i in range(N_TASKS))
        )

    with tracemark.record(sys.argv[1]):
        asyncio.run(main())
    """
).replace("N_TASKS", str(TASKS))


@pytest.fixture(scope="module")
def async_trace(tmp_path_factory):
    trace = tmp_path_factory.mktemp("viewers") / "async"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", ASYNC_SERVER, str(trace)], check=True, env=env, timeout=120
    )
    return trace


def _task_slices(trace: Path) -> dict[str, list]:
    want = program_slices(trace, track=lambda ev: ev.task.name)
    assert sorted(want) == [f"t{i}" for i in range(TASKS)]
    for task, slices in want.items():
        i = int(task[1:])
        assert [(s[0], s[3]) for s in slices] == [("req", 0), ("db", 1), ("db", 1)][: 2 + i % 2]
    return want


def test_speedscope_shows_each_task_on_its_own_track(async_trace, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    result = export(async_trace, site / "trace.json", "chrome")
    assert result.unfinished == 0 and result.unmatched == 0
    want = _task_slices(async_trace)

    doc = open_in_speedscope(site)
    frames = doc["shared"]["frames"]
    profiles = {}
    for p in doc["profiles"]:
        m = re.search(r"MainThread task (t\d+) \(tid \d+\)$", p["name"])
        if m:
            profiles[m[1]] = p
    assert set(profiles) == set(want)
    for task, slices in want.items():
        got = speedscope_slices(profiles[task], frames)
        first = slices[0][1]
        assert [(s[0], s[3]) for s in got] == [(s[0], s[3]) for s in slices]
        assert [s[4] for s in got] == [s[4] for s in slices]
        assert [round(s[1] * 1000) for s in got] == [b - first for _, b, *_ in slices]
        assert [round((s[2] - s[1]) * 1000) for s in got] == [e - b for _, b, e, *_ in slices]
        (req,) = [s for s in got if s[0] == "req"]
        assert req[4]["path"] == f"/{task}"
        assert req[2] - req[1] >= 1000 * (int(task[1:]) + 1)  # it slept that long


def test_chromium_trace_engine_builds_each_task_s_tree(async_trace, tmp_path):
    trace_json = tmp_path / "trace.json"
    export(async_trace, trace_json, "chrome")
    start = json.loads(trace_json.read_text())["otherData"]["start_ns"]
    want = _task_slices(async_trace)
    out = tmp_path / "devtools.json"
    (tmp_path / "chromium-profile").mkdir()
    node([str(DEVTOOLS), str(trace_json), str(out)], tmp_path / "chromium-profile")

    (process,) = json.loads(out.read_text())
    tracks = {}
    for thread in process["threads"]:
        name = thread["name"]
        if name.startswith("MainThread task "):
            tracks[name.removeprefix("MainThread task ")] = thread
    assert set(tracks) == set(want)
    for task, slices in want.items():
        tree = tracks[task]["tree"]
        assert [(e["name"], e["depth"]) for e in tree] == [(s[0], s[3]) for s in slices]
        assert [start + round(e["ts"] * 1000) for e in tree] == [s[1] for s in slices]
        assert [round(e["dur"] * 1000) for e in tree] == [s[2] - s[1] for s in slices]
        assert [e["args"] for e in tree] == [s[4] for s in slices]
