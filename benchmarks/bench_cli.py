"""Issue 5: ``tracemark stats`` and ``tracemark view --json`` over a 1,000,000-event trace,
against ``babeltrace2`` printing the same trace, in the same run. Issue 11: ``tracemark
spans`` over a 1,000,000-event trace of requests (spans nested two deep, markers inside),
beside ``tracemark stats`` on the same trace.

Run: ``python -m benchmarks.run cli``. Each command runs as a user runs it (a new process,
output to /dev/null), best of ``REPEAT`` wall-clock timings, interleaved so that noise hits
every case alike. ``TRACEMARK_BENCH_EVENTS`` changes the trace size (default 1,000,000).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .harness import make_trace, time_command

EVENTS = int(os.environ.get("TRACEMARK_BENCH_EVENTS", 1_000_000))
REPEAT = 3
TITLE = f"CLI: reading a {EVENTS:,}-event trace (1 thread, fields int, str, float)"
BASELINE = "babeltrace2 DIR (text)"

_MAKE_TRACE = textwrap.dedent(
    """
    import sys, tracemark
    ev = tracemark.marker("bench.event", n=int, dev=str, ms=float)
    devs = ["eth0", "eth1", "lo", "wlan0"]
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 20, subbuffers=16) as rec:
        for i in range(int(sys.argv[2])):
            ev(i, devs[i & 3], i * 0.001)
    s = rec.summary
    print(s.recorded, s.discarded + s.lost)
    """
)

SPANS_TITLE = (
    f"CLI: spans of a {EVENTS:,}-event trace of requests (req > 2 db.query > 2 markers each)"
)
SPANS_BASELINE = "tracemark stats DIR"

_MAKE_SPANS = textwrap.dedent(
    """
    import sys, tracemark
    req_b = tracemark.marker("req.begin", endpoint=str)
    req_e = tracemark.marker("req.end", status=int)
    q_b = tracemark.marker("db.query.begin", table=str)
    q_e = tracemark.marker("db.query.end")
    row = tracemark.marker("db.row", n=int, ms=float)
    eps = ["/users", "/orders", "/items", "/login"]
    tables = ["users", "orders", "items"]
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 20, subbuffers=16) as rec:
        for i in range(int(sys.argv[2]) // 10):  # 10 events a request
            req_b(eps[i & 3])
            for k in range(2):
                q_b(tables[(i + k) % 3])
                row(i, i * 0.001)
                row(i + 1, i * 0.002)
                q_e()
            req_e(200)
    s = rec.summary
    print(s.recorded, s.discarded + s.lost)
    """
)

_READ_ONLY = (
    "import sys; from tracemark.ctf import read_trace\n"
    "for _ in read_trace(sys.argv[1]).events(): pass"
)


def _best(cases: dict[str, list[str]]) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(REPEAT):
        for name, argv in cases.items():
            best[name] = min(best[name], time_command(argv))
    return best


def _table(
    title: str, baseline: str, best: dict[str, float], recorded: int, lost: int
) -> list[str]:
    ref = best.get(baseline)
    lines = [
        f"### {title}",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({sys.implementation.name}, {platform.machine()}); baseline: {baseline}; "
        f"best of {REPEAT} wall-clock runs each; trace: {recorded:,} events recorded, "
        f"{lost:,} discarded or lost",
        "",
        "| command | seconds | events/s | ratio to baseline |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, seconds in best.items():
        ratio = f"{seconds / ref:.2f}x" if ref else "n/a (babeltrace2 not installed)"
        rate = "-" if "start-up" in name else f"{recorded / seconds:,.0f}"
        lines.append(f"| {name} | {seconds:.2f} | {rate} | {ratio} |")
    return lines


def report() -> str:
    tm = [sys.executable, "-m", "tracemark"]
    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp, "trace"))
        recorded, lost = make_trace(_MAKE_TRACE, trace, EVENTS)
        cases = {
            BASELINE: ["babeltrace2", trace],
            "tracemark stats DIR": [*tm, "stats", trace],
            "tracemark view --json DIR": [*tm, "view", "--json", trace],
            "tracemark view DIR (text)": [*tm, "view", trace],
            "reader alone: iterate read_trace(DIR).events()": [
                sys.executable,
                "-c",
                _READ_ONLY,
                trace,
            ],
            "python -m tracemark --version (start-up)": [*tm, "--version"],
        }
        if shutil.which("babeltrace2") is None:
            del cases[BASELINE]
        lines = _table(TITLE, BASELINE, _best(cases), recorded, lost)
    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp, "trace"))
        recorded, lost = make_trace(_MAKE_SPANS, trace, EVENTS)
        cases = {
            SPANS_BASELINE: [*tm, "stats", trace],
            "tracemark stats --by endpoint DIR": [*tm, "stats", "--by", "endpoint", trace],
            "tracemark spans DIR": [*tm, "spans", trace],
            "tracemark spans --by endpoint DIR": [*tm, "spans", "--by", "endpoint", trace],
            "tracemark spans --filter 'duration > 0.01' DIR": [
                *tm,
                "spans",
                "--filter",
                "duration > 0.01",
                trace,
            ],
        }
        lines += ["", *_table(SPANS_TITLE, SPANS_BASELINE, _best(cases), recorded, lost)]
    return "\n".join(lines) + "\n"
