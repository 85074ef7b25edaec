"""Issue 12: what live control costs a process that opted in, and how fast attach/detach are.

Run: ``python -m benchmarks.run control``. Three tables:

1. **Opted in, not attached, vs not opted in**: two child processes of the same script, one
   with ``TRACEMARK_CONTROL=1``; each times, in process, an inactive marker statement inside
   a patched function, a function that is not probed, and one that was probed and unprobed
   again (by a real ``attach --probe`` and its end). Best of ``ROUNDS`` interleaved rounds;
   ratios are opted-in to not-opted-in (so 1.00x means no cost). The opted-in process's
   context switches over one idle second, every thread summed, are its wake-ups.
2. **Attach and detach** on a target with 1,000 marker sites (1,000 functions, each with one
   marker statement, called in a loop): from connect to the first recorded event (the target
   reports its live count every millisecond here), and from ``stop`` to the reply that
   everything is removed and the markers are back to the patched jump. Best and median of
   ``ATTACHES`` attaches.
"""

from __future__ import annotations

import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .harness import child_env

ROUNDS = 5
ATTACHES = 10
SITES = 1000

_COST = textwrap.dedent(
    """
    import json, os, sys, timeit
    import tracemark
    m = tracemark.marker("bench.m", "n=%d")

    def marked(n):
        m(n)
        return n

    def plain(n):
        return n

    def probed(n):
        return n

    for _ in range(3):
        marked(1)  # the patcher has made its variant
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        res = {}
        for name, fn in (("marked", marked), ("plain", plain), ("probed", probed)):
            t = timeit.repeat("fn(1)", globals={"fn": fn}, number=200_000, repeat=5)
            res[name] = min(t) / 200_000 * 1e9
        print(json.dumps(res), flush=True)
    """
)

_SITES = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import tracemark
    src = []
    for i in range(%d):
        src.append(f"m{i} = tracemark.marker('site.m{i}', 'n=%%d')")
        src.append(f"def f{i}(n):\\n    m{i}(n)\\n    return n")
    ns = {"tracemark": tracemark}
    exec(compile("\\n".join(src), "sites.py", "exec"), ns)
    fns = [ns[f"f{i}"] for i in range(%d)]

    def loop():
        while True:
            for f in fns:
                f(1)
            time.sleep(0.0002)

    threading.Thread(target=loop, daemon=True).start()
    time.sleep(0.5)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    """
) % (SITES, SITES)


def _start(script: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    # A file, not -c: on 3.11 a probe recompiles its function from the source.
    fd, path = tempfile.mkstemp(suffix=".py", prefix="bench_control_")
    with os.fdopen(fd, "w") as f:
        f.write(script)
    p = subprocess.Popen(
        [sys.executable, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        return p, json.loads(p.stdout.readline())["pid"]  # type: ignore[union-attr]
    finally:
        os.unlink(path)  # read by then (the probe's linecache keeps it)


def _ask(p: subprocess.Popen) -> dict[str, float]:
    p.stdin.write("time\n")  # type: ignore[union-attr]
    p.stdin.flush()  # type: ignore[union-attr]
    ready, _, _ = select.select([p.stdout], [], [], 120)
    assert ready
    return json.loads(p.stdout.readline())  # type: ignore[union-attr]


def _end(p: subprocess.Popen) -> None:
    try:
        p.stdin.close()  # type: ignore[union-attr]
        p.wait(10)
    except (OSError, subprocess.TimeoutExpired):
        p.kill()
        p.wait(10)
    p.stdout.close()  # type: ignore[union-attr]


def _switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            total += sum(int(x.split()[1]) for x in f if "ctxt_switches" in x)
    return total


def _costs() -> list[str]:
    plain_env = child_env()
    plain_env.pop("TRACEMARK_CONTROL", None)
    opted_env = {**plain_env, "TRACEMARK_CONTROL": "1"}
    off, _ = _start(_COST, plain_env)
    on, on_pid = _start(_COST, opted_env)
    try:
        best: dict[str, dict[str, float]] = {"off": {}, "on": {}}

        def rounds(key_on: str) -> None:
            for _ in range(ROUNDS):
                for key, p in (("off", off), (key_on, on)):
                    for name, ns in _ask(p).items():
                        d = best.setdefault(key, {})
                        d[name] = min(d.get(name, 1e18), ns)

        rounds("on")
        time.sleep(0.2)
        before = _switches(on_pid)
        time.sleep(1.0)
        wakeups = _switches(on_pid) - before
        # A real attach that probes `probed` and records `bench.m`, then its end.
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "tracemark", "attach", str(on_pid), "-e", "bench.m"]
                + ["--probe", "__main__:probed", "-o", str(Path(tmp, "t")), "--duration", "0.3"],
                env=plain_env,
                check=True,
                capture_output=True,
            )
        best["off"] = {}
        rounds("after")
    finally:
        _end(off)
        _end(on)
    rows = [
        ("inactive marker statement in a patched function", "marked"),
        ("function that is not probed", "plain"),
        ("function probed by an attach, after its detach", "probed"),
    ]
    lines = [
        "### Live control: a process that opted in (TRACEMARK_CONTROL=1), not attached",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({platform.python_implementation().lower()}, {platform.machine()}); ns per call, "
        f"best of {ROUNDS} interleaved rounds of 5 x 200,000 calls in each of two processes; "
        "ratio: opted in / not opted in",
        "",
        "| what | not opted in (ns) | opted in (ns) | ratio | opted in, after an attach "
        "and detach (ns) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        off_ns, on_ns, after_ns = best["off"][key], best["on"][key], best["after"][key]
        lines.append(
            f"| {label} | {off_ns:.1f} | {on_ns:.1f} | {on_ns / off_ns:.2f}x | "
            f"{after_ns:.1f} | {after_ns / off_ns:.2f}x |"
        )
    lines += ["", f"Idle wake-ups of the opted-in process, all threads, over 1 s: {wakeups}"]
    return lines


def _attach_times() -> list[str]:
    from tracemark.control.client import connect

    env = child_env()
    env["TRACEMARK_CONTROL"] = "1"
    p, pid = _start(_SITES, env)
    first: list[float] = []
    back: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(ATTACHES):
                t0 = time.perf_counter()
                c = connect(pid)
                c.request(
                    "attach", output=str(Path(tmp, f"t{i}")), events=["site.*"], progress=0.001
                )
                while True:
                    msg = c.receive(timeout=10)
                    assert msg is not None
                    if msg.get("op") == "progress" and msg["events"] > 0:
                        break
                first.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                c.send("stop")
                while True:
                    msg = c.receive(timeout=10)
                    assert msg is not None
                    if msg.get("op") == "ended":
                        break
                back.append(time.perf_counter() - t1)
                c.close()
                time.sleep(0.05)
            with connect(pid) as c:
                info = c.request("info")
            assert info["active"] == 0 and info["recordings"] == 0, info
    finally:
        _end(p)
    ms = 1e3
    return [
        f"### Live control: attach and detach, target with {SITES:,} marker sites",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}; {ATTACHES} "
        "attaches of the markers site.* into a new trace each, in one target",
        "",
        "| what | best (ms) | median (ms) | target |",
        "| --- | ---: | ---: | ---: |",
        f"| connect + attach to the first recorded event | {min(first) * ms:.1f} | "
        f"{statistics.median(first) * ms:.1f} | under 100 |",
        f"| the first of them, in a target never traced before | {first[0] * ms:.1f} | "
        f"{first[0] * ms:.1f} | under 100 |",
        f"| stop to detached: recording flushed, {SITES:,} sites back to the patched jump | "
        f"{min(back) * ms:.1f} | {statistics.median(back) * ms:.1f} | under 50 |",
    ]


def report() -> str:
    return "\n".join([*_costs(), "", *_attach_times()]) + "\n"
