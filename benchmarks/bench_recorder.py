"""Issue 4: the cost of recording an event, and the throughput of the recorder.

Run: ``python -m benchmarks.run recorder``.

Three tables:

* cost per event, one thread, a marker with 3 fields (int, str, float), against packing the
  same values with ``struct.pack_into`` alone (the floor of any binary recorder in Python),
  the same marker with a no-op probe (the marker core's share), ``logging`` to a file, and
  viztracer's ``log_instant`` (when viztracer is installed); and the same recorded marker
  inside an asyncio task, and with a task switch before every event (two tasks made current
  in turn, as the loop does, with asyncio's own ``_enter_task``/``_leave_task``: the cost
  of the ``tracemark.task`` event, without the loop's own cost in the figure);
* sustained throughput in discard mode with default buffers, one thread paced at the target
  rate (1,000,000 events/s) and flat out, and the loss;
* the loss figure with 1, 2 and 4 threads firing flat out (they share one GIL, so together
  they fire about as fast as one), with the C core's native consumer (a thread without the
  GIL), the pure consumer behind the same C firing path, and the pure core, in one run;
  on tmpfs (/dev/shm) when there is one, so the disk keeps up and the figure is the
  consumer's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path

import tracemark
from tracemark import env
from tracemark.tracers.recording import consumer

from .harness import Case, measure, table

TITLE = "Recorder: cost per recorded event, 3 fields (int, str, float), one thread"
BASELINE = "struct.pack_into alone (same 3 fields + header)"


def _cases(tmp: Path) -> tuple[list[Case], list[object]]:
    m = tracemark.marker("bench.rec", n=int, s=str, x=float)
    mem = tracemark.marker("bench.mem", n=int, s=str, x=float)
    pure = tracemark.marker("bench.pure", n=int, s=str, x=float)
    quiet = tracemark.marker("bench.noop", n=int, s=str, x=float)
    tracemark.connect("bench.noop", lambda marker, args: None)
    buf = bytearray(1 << 16)
    packer = struct.Struct("<IQqI5sd")  # header, n, len(s), s, x
    handler = logging.FileHandler(tmp / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(message)s"))
    log = logging.getLogger("bench.recorder.file")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    ns = {
        "m": m,
        "mem": mem,
        "pure": pure,
        "quiet": quiet,
        "buf": buf,
        "packer": packer,
        "now": time.monotonic_ns,
        "n": 1500,
        "s": "hello",
        "x": 2.5,
        "log": log,
    }
    cases = [
        Case(BASELINE, "packer.pack_into(buf, 0, 7, now(), n, 5, s.encode(), x)", ns),
        Case("marker, one no-op probe", "quiet(n, s, x)", ns, "the marker core's share"),
        Case(
            "marker recorded, sub-buffers in plain memory",
            "mem(n, s, x)",
            ns,
            "TRACEMARK_NORING=1: nothing survives a crash",
        ),
        Case(
            "marker recorded by tracemark.record()",
            "m(n, s, x)",
            ns,
            "{} core ({}); target C: <= 120 ns".format(*env.core()),
        ),
        Case(
            "marker recorded, pure-Python core",
            "pure(n, s, x)",
            ns,
            "TRACEMARK_CORE=python: the reference core",
        ),
        Case(
            "logging.info to a file (formatted)",
            'log.info("n=%d s=%s x=%f", n, s, x)',
            ns,
        ),
    ]
    return cases, [handler]


def _viztracer_case() -> tuple[Case | None, object]:
    try:
        from viztracer import VizTracer
    except ImportError:
        return None, None
    # C calls are not traced, so the baseline (C calls only) runs at full speed while the
    # tracer is on; log_instant is a Python method, traced as viztracer always does.
    viz = VizTracer(verbose=0, tracer_entries=1_000_000, ignore_c_function=True)
    ns = {"viz": viz, "n": 1500, "s": "hello", "x": 2.5}
    case = Case(
        "viztracer log_instant (tracer running)",
        'viz.log_instant("rec", args={"n": n, "s": s, "x": x})',
        ns,
        "in-memory ring buffer, written at save",
    )
    return case, viz


def _task_rows(m: object) -> list[tuple[Case, float]]:
    """The recorded marker ``m`` inside an asyncio task, and with a task switch before each
    event; each with its ratio to the baseline measured in the same run (ns, scaled below)."""
    ns = {"m": m, "n": 1500, "s": "hello", "x": 2.5}
    base = Case(BASELINE, "packer.pack_into(buf, 0, 7, now(), n, 5, s.encode(), x)")
    base.namespace = {
        "packer": struct.Struct("<IQqI5sd"),
        "buf": bytearray(1 << 16),
        "now": time.monotonic_ns,
        **ns,
    }
    in_task = Case(
        "marker recorded in an asyncio task",
        "m(n, s, x)",
        ns,
        "the same task each event",
    )
    switch = "enter(loop, a); m(n, s, x); leave(loop, a); "
    switch += "enter(loop, b); m(n, s, x); leave(loop, b)"
    switched = Case(
        "marker recorded, a task switch before each event",
        switch,
        ns,
        "two tasks in turn: the tracemark.task event's cost included",
    )
    plain = Case("task switches alone", switch.replace("m(n, s, x); ", ""), ns)
    out: list[tuple[Case, float]] = []

    def in_loop() -> None:
        loop = asyncio.get_running_loop()
        a = loop.create_task(asyncio.sleep(0), name="bench-a")
        b = loop.create_task(asyncio.sleep(0), name="bench-b")
        enter, leave = asyncio.tasks._enter_task, asyncio.tasks._leave_task
        ns.update(loop=loop, a=a, b=b, enter=enter, leave=leave)
        enter(loop, a)
        try:
            r = measure([base, in_task], number=100_000, repeat=7)
        finally:
            leave(loop, a)
        out.append((in_task, r[in_task.name] / r[BASELINE]))
        r = measure([base, switched, plain], number=50_000, repeat=7)
        # Two events per statement; the task switches themselves taken out.
        out.append((switched, (r[switched.name] - r[plain.name]) / 2 / r[BASELINE]))

    async def main() -> None:
        asyncio.get_running_loop().call_soon(in_loop)  # outside any task: we enter them
        await asyncio.sleep(0.01)

    asyncio.run(main())
    return out


#: The consumers compared by the threads table: (label, TRACEMARK_CORE, native consumer).
CONSUMERS = (
    ("C core, native consumer", None, True),
    ("C core, pure consumer", None, False),
    ("pure core", "python", False),
)


def _throughput(
    tmp: Path,
    threads: int,
    seconds: float,
    pace: float | None = None,
    core: str | None = None,
    native: bool = True,
) -> tuple[float, int, int, float]:
    """Fire from ``threads`` threads for ``seconds``, flat out or (``pace``) at most that many
    events/s each, in bursts of 1000; events/s, recorded, lost, and the share of the time the
    firing threads waited for the consumer. ``core``: TRACEMARK_CORE for the recording;
    ``native``: whether the C core's native consumer writes."""
    m = tracemark.marker("bench.flat", n=int, s=str, x=float)
    stop = threading.Event()
    fired = [0] * threads
    clock = time.perf_counter

    def work(k: int) -> None:
        i = 0
        t0 = clock()
        while not stop.is_set():
            for _ in range(1000):
                m(i, "hello", 2.5)
                i += 1
            if pace is not None:
                while clock() - t0 < i / pace:  # spin: a sleep this short oversleeps
                    pass
        fired[k] = i

    saved = os.environ.pop(env.CORE_VARIABLE, None)
    if core is not None:
        os.environ[env.CORE_VARIABLE] = core
    consumer.NATIVE = native
    try:
        rec = tracemark.record(tmp / f"flat{threads}-{pace}-{core}-{native}", "bench.flat")
    finally:
        consumer.NATIVE = True
        os.environ.pop(env.CORE_VARIABLE, None)
        if saved is not None:
            os.environ[env.CORE_VARIABLE] = saved
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    summary = rec.stop()
    total = sum(fired)
    assert summary.recorded + summary.discarded + summary.lost == total
    # Each row writes up to 1 GB: kept, the rows' traces filled tmpfs until writing to it
    # slowed (4-5 GB in, the 4-thread rows lost 0.1-0.5%): then the rows after measured the
    # memory, not the recorder.
    shutil.rmtree(rec.path)
    return (
        total / elapsed,
        summary.recorded,
        summary.discarded + summary.lost,
        summary.waited_s / elapsed,
    )


def report() -> str:
    tmp = Path(tempfile.mkdtemp(prefix="tracemark-bench-"))
    try:
        cases, cleanup = _cases(tmp)
        # Buffers that hold everything the measurement fires: this row is the cost of
        # recording an event, never the (cheaper) cost of discarding one.
        rec = tracemark.record(tmp / "cost", "bench.rec", subbuffer_size=1 << 20, subbuffers=48)
        env.NORING = True  # the same recording, its sub-buffers in plain memory: what the
        try:  # ring files (crash recovery) cost, in the same run
            in_memory = tracemark.record(
                tmp / "mem", "bench.mem", subbuffer_size=1 << 20, subbuffers=48
            )
        finally:
            env.NORING = False
        saved = os.environ.get(env.CORE_VARIABLE)
        os.environ[env.CORE_VARIABLE] = "python"  # read when the recording binds its markers
        try:
            pure = tracemark.record(
                tmp / "pure", "bench.pure", subbuffer_size=1 << 20, subbuffers=48
            )
        finally:
            if saved is None:
                del os.environ[env.CORE_VARIABLE]
            else:
                os.environ[env.CORE_VARIABLE] = saved
        try:
            results = measure(cases, number=100_000, repeat=7)
            # Right after the row outside asyncio, scaled by the baseline of their own run.
            for i, (case, ratio) in enumerate(_task_rows(cases[3].namespace["m"]), start=4):
                cases.insert(i, case)
                results[case.name] = ratio * results[BASELINE]
        finally:
            summary = rec.stop()
            in_memory.stop()
            pure.stop()
        # Before viztracer: its stop() leaves a threading.setprofile hook behind, which would
        # profile every thread started afterwards (it made these rows 2.5x too slow).
        shm = Path("/dev/shm")
        fast = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp
        lines = [
            "### Recorder: sustained throughput, discard mode, default buffers",
            "",
            f"Trace on {'tmpfs (/dev/shm)' if fast != tmp else 'the temporary directory'}; "
            "2 s per row. Waited: the share of the time firing threads waited for the native "
            "consumer to give a sub-buffer back (at most 5%; beyond that, events are "
            "discarded).",
            "",
            "| threads | firing | consumer | events/s fired | recorded | lost (discarded) | loss "
            "| waited for the consumer |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        rows = [(1, 1_000_000.0, *CONSUMERS[0])]
        rows += [(n, None, *c) for n in (1, 2, 4) for c in CONSUMERS]
        try:
            for threads, pace, label, core, native in rows:
                rate, recorded, lost, waited = _throughput(fast, threads, 2.0, pace, core, native)
                total = recorded + lost
                how = "flat out" if pace is None else f"paced at {pace:,.0f}/s"
                lines.append(
                    f"| {threads} | {how} | {label} | {rate:,.0f} | {recorded:,} | {lost:,} | "
                    f"{lost / total if total else 0:.2%} | {waited:.2%} |"
                )
        finally:
            if fast != tmp:
                shutil.rmtree(fast, ignore_errors=True)
        viz_case, viz = _viztracer_case()
        if viz_case is None:
            cases.append(Case("viztracer log_instant", "pass", {}, "viztracer not installed"))
            results[cases[-1].name] = float("nan")
        else:
            viz.start()  # type: ignore[attr-defined]
            try:  # with the baseline again, in the same run
                again = measure([cases[0], viz_case], number=100_000, repeat=7)
            finally:
                viz.stop()  # type: ignore[attr-defined]
                threading.setprofile(None)  # what viztracer's stop() leaves set
            cases.append(viz_case)
            results[viz_case.name] = again[viz_case.name] * results[BASELINE] / again[BASELINE]
            viz_case.note += f" (baseline under the tracer: {again[BASELINE]:.0f} ns)"
        for c in cleanup:
            c.close()  # type: ignore[attr-defined]
        text = table(TITLE, cases, results, BASELINE)
        text += (
            f"\nRecorded {summary.recorded:,} events while measuring, "
            f"{summary.discarded + summary.lost:,} discarded (48 MiB of buffers).\n\n"
        )
        return text + "\n".join(lines) + "\n"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
