"""A small timing harness: every number is a ratio to a baseline measured in the same run.

Each case is one statement, compiled into a loop of its own (``for _ in range(n): STMT``) with
its names as globals, timed ``repeat`` times; the best run is kept (the machine is noisy and
noise only ever adds time) and the cost of the empty loop is subtracted, so a row is the cost
of the statement alone.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field


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
