"""A small timing harness: every number is a ratio to a baseline measured in the same run.

Each case is one statement, compiled into a loop of its own (``for _ in range(n): STMT``) with
its names as globals, timed ``repeat`` times; the best run is kept (the machine is noisy and
noise only ever adds time) and the cost of the empty loop is subtracted, so a row is the cost
of the statement alone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    stmt: str
    namespace: dict = field(default_factory=dict)
    note: str = ""


def _loop(stmt: str, namespace: dict):
    source = f"def run(n):\n    for _ in range(n):\n        {stmt}\n"
    ns = dict(namespace)
    exec(compile(source, "<bench>", "exec"), ns)
    return ns["run"]


def _best(run, number: int, repeat: int) -> float:
    run(number // 10)  # warm up: let the specialising interpreter settle
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        run(number)
        best = min(best, time.perf_counter_ns() - t0)
    return best / number


def measure(cases: list[Case], number: int = 200_000, repeat: int = 7) -> dict[str, float]:
    """ns per execution of each case's statement, loop overhead removed.

    Cases are measured interleaved (round-robin over ``repeat`` rounds) so that a burst of
    noise hits all of them alike rather than one.
    """
    empty = _loop("pass", {})
    runs = {c.name: _loop(c.stmt, c.namespace) for c in cases}
    best = {c.name: float("inf") for c in cases}
    base = float("inf")
    for _ in range(repeat):
        base = min(base, _best(empty, number, 1))
        for c in cases:
            best[c.name] = min(best[c.name], _best(runs[c.name], number, 1))
    return {name: max(ns - base, 0.0) for name, ns in best.items()}


def table(title: str, cases: list[Case], results: dict[str, float], baseline: str) -> str:
    """A Markdown table of ns per call and the ratio to ``baseline``."""
    ref = results[baseline] or 1e-9
    lines = [
        f"### {title}",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({sys.implementation.name}, {platform.machine()}); baseline: {baseline}",
        "",
        "| case | ns per call | ratio to baseline | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for c in cases:
        ns = results[c.name]
        lines.append(f"| {c.name} | {ns:.1f} | {ns / ref:.2f}x | {c.note} |")
    return "\n".join(lines) + "\n"


# --- suites that time whole commands in child processes --------------------------------------

#: The repository's root: children import this checkout's tracemark, whatever is installed.
ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a child process: this checkout first on ``PYTHONPATH``."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def time_command(argv: list[str]) -> float:
    """Wall-clock seconds of one run of ``argv`` (its output discarded; a failure raises)."""
    t0 = time.perf_counter()
    subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(), check=True
    )
    return time.perf_counter() - t0


def make_trace(script: str, trace: str, n: int) -> tuple[int, int]:
    """Run ``script`` (Python source) with arguments ``trace n``; it records a trace there
    and prints how many events it recorded and how many it lost."""
    made = subprocess.run(
        [sys.executable, "-c", script, trace, str(n)],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    recorded, lost = map(int, made.stdout.split())
    return recorded, lost
