"""The marker patcher and dynamic probes sharing ``func.__code__`` (suspend / resume).

Run: ``python -m benchmarks.run codeown`` (``TRACEMARK_PROBES=recompile`` for the 3.11
mechanism on 3.12+).

Table 1 calls functions with identical bodies (one marker statement, inactive), as ratios to
the function without the marker: patched and nobody probing; patched while a probe is
installed on *another* function (must stay 1.00x); suspended by an installed entry probe
nobody listens to (the plain marker call path: correct, not free); and with that probe
listened to by a no-op. Table 2 times ``probe()`` + ``unprobe()`` on a patched function
(suspend, instrument, restore, resume) against the same on a function without markers.
"""

from __future__ import annotations

import statistics
import time

import tracemark
from tracemark import probes
from tracemark.patching import patcher

from .harness import Case, measure, table

TITLE = "Patcher and probes: one inactive marker statement, probed or not"
BASELINE = "function without the marker"

rx = tracemark.marker("bench.codeown", "len=%d dev=%s")


def without(n, dev):
    total = n + 1
    return total


def patched(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def neighbour(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def suspended(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def probed(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def elsewhere(n):
    return n


def _noop(marker, args):
    pass


def cases() -> list[Case]:
    tracemark.patch(patched)
    tracemark.patch(neighbour)
    here = __name__
    handles = [
        tracemark.probe(f"{here}:elsewhere"),
        tracemark.probe(f"{here}:suspended", capture=["n"]),
        tracemark.probe(f"{here}:probed", capture=["n"]),
    ]
    tracemark.connect(handles[2].name, _noop)
    for name in ("patched", "neighbour"):
        assert patcher._units[id(globals()[name].__code__)] is not None
    ns = {"n": 1500, "dev": "eth0"}
    ns.update(without=without, patched=patched, neighbour=neighbour)
    ns.update(suspended=suspended, probed=probed)
    return [
        Case(BASELINE, "without(n, dev)", ns),
        Case("inactive marker, patched", "patched(n, dev)", ns),
        Case("same, a probe installed on another function", "neighbour(n, dev)", ns, "1.00x"),
        Case("same, an entry probe installed (suspended)", "suspended(n, dev)", ns, "plain call"),
        Case("same, the entry probe listened to (no-op)", "probed(n, dev)", ns),
    ]


def plain_target(n):
    total = n + 1
    return total


def patched_target(n):
    rx(n, "x")
    total = n + 1
    return total


def install_remove() -> str:
    tracemark.patch(patched_target)
    assert patcher._units.get(id(patched_target.__code__)) is not None
    rows = []
    for name in ("plain_target", "patched_target"):
        times = []
        for _ in range(50):
            t0 = time.perf_counter_ns()
            tracemark.unprobe(tracemark.probe(f"{__name__}:{name}"))
            times.append((time.perf_counter_ns() - t0) / 1e3)
        rows.append((name, statistics.median(times)))
    out = [
        f"### Patcher and probes: probe() + unprobe() ({probes.mechanism().name})",
        "",
        "| function | us per probe()+unprobe(), median of 50 |",
        "| --- | ---: |",
    ]
    out += [f"| {name} | {us:.1f} |" for name, us in rows]
    return "\n".join(out) + "\n"


def report() -> str:
    suite = cases()
    title = f"{TITLE} ({probes.mechanism().name})"
    return table(title, suite, measure(suite), BASELINE) + "\n" + install_remove()
