"""Issue 10: ``tracemark view -e NAME`` on a 5,000,000-event trace holding 5,000 events of NAME,
with the packet index (:mod:`tracemark.ctf.index`) and without it; and the index's build time.

Run: ``python -m benchmarks.run index``. The trace is recorded by the real recorder in a
child process (one thread, a tight loop of one marker ``bench.tick n=int``, with NAME =
``bench.rare n=int s=str`` fired in 10 bursts of 500 spread evenly over the run: NAME is in a
few packets of 1 MiB). Every row but one is an in-process call (output to /dev/null), best of
``REPEAT``, interleaved so that noise hits every case alike; the ``python -m tracemark`` row
is a new process, start-up included. A second, smaller trace of variable-size events (int,
str, float: the walk that cannot stride) gives the build rate of the slow path.
``TRACEMARK_BENCH_EVENTS`` changes the size of the main trace (default 5,000,000).
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from .harness import ROOT, child_env, make_trace

EVENTS = int(os.environ.get("TRACEMARK_BENCH_EVENTS", 5_000_000))
VARIABLE_EVENTS = 1_000_000
REPEAT = 3
NAME = "bench.rare"
TITLE = f"Packet index: view -e NAME on a {EVENTS:,}-event trace holding 5,000 NAME events"

_MAKE_TRACE = textwrap.dedent(
    """
    import sys, tracemark
    tick = tracemark.marker("bench.tick", n=int)
    rare = tracemark.marker("bench.rare", n=int, s=str)
    n, bursts = int(sys.argv[2]), 10
    every = n // bursts
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 20, subbuffers=32) as rec:
        for b in range(bursts):
            for i in range(every - 500):
                tick(i)
            for i in range(500):
                rare(i, "rare event")
    s = rec.summary
    print(s.recorded, s.discarded + s.lost)
    """
)

_MAKE_VARIABLE = textwrap.dedent(
    """
    import sys, tracemark
    ev = tracemark.marker("bench.event", n=int, dev=str, ms=float)
    devs = ["eth0", "eth1", "lo", "wlan0"]
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 20, subbuffers=32) as rec:
        for i in range(int(sys.argv[2])):
            ev(i, devs[i & 3], i * 0.001)
    s = rec.summary
    print(s.recorded, s.discarded + s.lost)
    """
)


def _drop_index(trace: str) -> None:
    from tracemark.ctf.index import INDEX_DIR

    for d in Path(trace).rglob(INDEX_DIR):
        shutil.rmtree(d)


def _cases(trace: str) -> dict[str, Callable[[], object]]:
    from tracemark.cli import main
    from tracemark.cli._common import name_matcher
    from tracemark.cli.view import write_text
    from tracemark.ctf import read_trace
    from tracemark.ctf.index import index_trace

    match = name_matcher([NAME])

    def quiet(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            saved = sys.stdout
            with open(os.devnull, "w") as devnull:
                sys.stdout = devnull
                try:
                    return fn()
                finally:
                    sys.stdout = saved

        return run

    def view() -> object:
        assert main(["view", "-e", NAME, trace]) == 0

    def first_view() -> object:
        _drop_index(trace)
        view()

    def no_index_walk() -> object:  # what a read-only trace without an index costs
        write_text(read_trace(trace).events(names=match), sys.stdout)

    def full_decode() -> object:  # what view -e did before this issue
        write_text((ev for ev in read_trace(trace).events() if match(ev.name)), sys.stdout)

    def build() -> object:
        _drop_index(trace)
        index_trace(trace)

    def cli() -> object:
        subprocess.run(
            [sys.executable, "-m", "tracemark", "view", "-e", NAME, trace],
            stdout=subprocess.DEVNULL,
            env=child_env(),
            check=True,
        )

    return {
        "before: every event decoded, then filtered by name (baseline)": quiet(full_decode),
        "no index, cannot save one: every packet walked, NAME decoded": quiet(no_index_walk),
        "first view -e: index built and saved, then read": quiet(first_view),
        "view -e NAME with the index (in-process main())": quiet(view),
        "python -m tracemark view -e NAME with the index (new process)": cli,
        "index build alone, as tracemark record does (index_trace)": build,
    }


def _best(cases: dict[str, Callable[[], object]]) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(REPEAT):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def report() -> str:
    sys.path.insert(0, str(ROOT))
    from tracemark.ctf import read_trace
    from tracemark.ctf.index import index_trace

    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp, "trace"))
        recorded, lost = make_trace(_MAKE_TRACE, trace, EVENTS)
        opened = read_trace(trace)
        packets = sum(s.packets for s in opened.streams)
        out = io.StringIO()
        from tracemark.cli.view import write_text

        write_text((ev for ev in opened.events() if ev.name == NAME), out)
        shown = out.getvalue().count("\n")
        best = _best(_cases(trace))
        from tracemark.ctf.index import load_index

        index_trace(trace)
        ids = [i for sub in opened.subtraces for v in load_index(sub).values() for i in v]
        rare = {eid for sub in opened.subtraces for eid in sub.ids_matching(lambda n: n == NAME)}
        holding = sum(1 for i in ids if i is None or not i.isdisjoint(rare))
        index_bytes = sum(f.stat().st_size for f in Path(trace).rglob(".index/*"))

        variable = str(Path(tmp, "variable"))
        v_recorded, _ = make_trace(_MAKE_VARIABLE, variable, VARIABLE_EVENTS)
        v_best = float("inf")
        for _ in range(REPEAT):
            _drop_index(variable)
            t0 = time.perf_counter()
            index_trace(variable)
            v_best = min(v_best, time.perf_counter() - t0)

    ref = best["before: every event decoded, then filtered by name (baseline)"]
    lines = [
        f"### {TITLE}",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({sys.implementation.name}, {platform.machine()}); best of {REPEAT} wall-clock runs "
        f"each, interleaved; trace: {recorded:,} events recorded, {lost:,} discarded or lost, "
        f"{packets} packets of 1 MiB, {holding} of them hold {NAME} ({shown:,} events); "
        f"index: {index_bytes:,} bytes",
        "",
        "| what | seconds | ratio to baseline |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in best.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / ref:.3f}x |")
    lines.append(
        f"| index build, variable-size events (int, str, float): {v_recorded:,} events "
        f"| {v_best:.3f} | {v_recorded / v_best / 1e6:.2f} M events/s |"
    )
    return "\n".join(lines) + "\n"
