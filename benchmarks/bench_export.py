"""Issue 11: ``tracemark export --format perfetto`` (and ``chrome``) of a 5,000,000-event
trace against ``babeltrace2`` printing the same trace as text, in the same run; and the peak
memory of the export for 1M and 5M events, to show it does not grow with the trace.

Run: ``python -m benchmarks.run export``. ``tracemark export`` shares the streams out to
two processes where there are two CPUs (``--jobs``); the ``--jobs 1`` row is one process.
Each command runs as a user runs it (a new process, output to a file or /dev/null), best of
``REPEAT`` wall-clock timings, interleaved so that noise hits every case alike; peak memory
is the largest ``ru_maxrss`` of the export's processes (resource.getrusage of
RUSAGE_CHILDREN, read around each run in a fresh process, so one run's peak is not another's).
The trace is a server's shape: 4 threads, each event a span begin (path), a marker (n, dev)
or a span end (status): one third spans' begins, one third markers, one third ends.
``TRACEMARK_BENCH_EXPORT_EVENTS`` changes the big size (default 5,000,000).

Issue 15: ``--format parquet`` (a table per marker, and ``--layout long``) in the same run
and the same peak-memory table, when pyarrow is installed (the ``parquet`` extra); its
output size is the directory's.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .harness import child_env, make_trace, time_command

EVENTS = int(os.environ.get("TRACEMARK_BENCH_EXPORT_EVENTS", 5_000_000))
SMALL = EVENTS // 5
REPEAT = int(os.environ.get("TRACEMARK_BENCH_EXPORT_REPEAT", 3))
TITLE = f"export: a {EVENTS:,}-event trace (4 threads; spans and markers) to a timeline file"
BASELINE = "babeltrace2 DIR (text, to /dev/null)"

_MAKE_TRACE = textwrap.dedent(
    """
    import sys, threading, tracemark
    b = tracemark.marker("req.begin", path=str)
    m = tracemark.marker("req.step", n=int, dev=str)
    e = tracemark.marker("req.end", status=int)
    total = int(sys.argv[2]) // 4 // 3
    def work():
        for i in range(total):
            b("/users/27"); m(i, "eth0"); e(200)
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 20, subbuffers=16) as rec:
        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
    s = rec.summary
    print(s.recorded, s.discarded + s.lost)
    """
)

# Runs ARGV as a child and prints its peak resident memory (ru_maxrss, KiB on Linux).
_PEAK = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_kib(argv: list[str]) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    return int(out.stdout.split()[-1])


PARQUET = "tracemark export --format parquet"
PARQUET_LONG = "tracemark export --format parquet --layout long"


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def report() -> str:
    tm = [sys.executable, "-m", "tracemark"]
    with tempfile.TemporaryDirectory() as tmp:
        big, small = str(Path(tmp, "big")), str(Path(tmp, "small"))
        recorded, lost = make_trace(_MAKE_TRACE, big, EVENTS)
        small_recorded, _ = make_trace(_MAKE_TRACE, small, SMALL)
        out = str(Path(tmp, "out"))
        cases = {
            BASELINE: ["babeltrace2", big],
            "tracemark export --format perfetto": [
                *tm,
                "export",
                big,
                "-f",
                "perfetto",
                "-o",
                out + ".pftrace",
            ],
            "tracemark export --format perfetto --jobs 1": [
                *tm,
                "export",
                big,
                "-f",
                "perfetto",
                "-o",
                out + "-1.pftrace",
                "--jobs",
                "1",
            ],
            "tracemark export --format chrome": [
                *tm,
                "export",
                big,
                "-f",
                "chrome",
                "-o",
                out + ".json",
            ],
            "tracemark export --format chrome (.json.gz)": [
                *tm,
                "export",
                big,
                "-f",
                "chrome",
                "-o",
                out + ".json.gz",
            ],
        }
        parquet = importlib.util.find_spec("pyarrow") is not None
        if parquet:
            cases[PARQUET] = [*tm, "export", big, "-f", "parquet", "-o", out + "-pq"]
            cases[PARQUET_LONG] = [
                *tm,
                "export",
                big,
                "-f",
                "parquet",
                "--layout",
                "long",
                "-o",
                out + "-pql",
            ]
        if shutil.which("babeltrace2") is None:
            del cases[BASELINE]
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(REPEAT):
            for name, argv in cases.items():
                best[name] = min(best[name], time_command(argv))
        sizes = {
            "tracemark export --format perfetto": Path(out + ".pftrace").stat().st_size,
            "tracemark export --format perfetto --jobs 1": Path(out + "-1.pftrace").stat().st_size,
            "tracemark export --format chrome": Path(out + ".json").stat().st_size,
            "tracemark export --format chrome (.json.gz)": Path(out + ".json.gz").stat().st_size,
        }
        if parquet:
            sizes[PARQUET] = _tree_size(Path(out + "-pq"))
            sizes[PARQUET_LONG] = _tree_size(Path(out + "-pql"))
        peaks = {}
        for label, trace, _n in (
            (f"{small_recorded:,}", small, small_recorded),
            (f"{recorded:,}", big, recorded),
        ):
            for fmt in ("perfetto", "chrome", *(("parquet",) if parquet else ())):
                argv = [*tm, "export", trace, "-f", fmt, "-o", f"{out}-peak-{fmt}"]
                peaks[(label, fmt)] = min(_peak_kib(argv) for _ in range(2))
    ref = best.get(BASELINE)
    lines = [
        f"### {TITLE}",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} "
        f"({sys.implementation.name}, {platform.machine()}); baseline: {BASELINE}; "
        f"best of {REPEAT} wall-clock runs each, interleaved, on a shared machine with "
        f"{os.cpu_count()} CPUs (export uses 2 processes unless --jobs 1); trace: "
        f"{recorded:,} events recorded, {lost:,} discarded or lost",
        "",
        "| command | seconds | events/s | output | ratio to baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds in best.items():
        ratio = f"{seconds / ref:.2f}x" if ref else "n/a (babeltrace2 not installed)"
        size = f"{sizes[name] / 2**20:,.0f} MiB" if name in sizes else "-"
        lines.append(f"| {name} | {seconds:.2f} | {recorded / seconds:,.0f} | {size} | {ratio} |")
    lines += [
        "",
        "Peak memory of the export (ru_maxrss of the process, best of 2): bounded, the same for "
        "5x the events.",
        "",
        "| events | format | peak RSS |",
        "| ---: | --- | ---: |",
    ]
    for (label, fmt), kib in peaks.items():
        lines.append(f"| {label} | {fmt} | {kib / 1024:,.1f} MiB |")
    return "\n".join(lines) + "\n"
