"""Issue 3: an inactive marker statement in a patched function costs about one jump.

Run: ``python -m benchmarks.run patching``.

Table 1 calls small functions that differ only in their first statement (none, an inactive
patched marker, an ``if flag:`` guard, the same marker unpatched, ``logging.debug`` on a
disabled logger), as ratios to the function without it. Table 2 times connecting and
disconnecting one probe that switches 1,000 marker sites (``report()``, since it is not one
statement per case). Table 3 times the first inactive run of a module (the lazy patcher finds
and patches its functions) in fresh subprocesses, with few and with 3 million objects alive.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tracemark
from tracemark.markers import registry
from tracemark.patching import patcher

from .harness import Case, measure, table

TITLE = "Patching: a function with an inactive marker statement"
BASELINE = "function without the marker"

rx = tracemark.marker("bench.patched", "len=%d dev=%s")
rx_plain = tracemark.marker("bench.unpatched", "len=%d dev=%s")
flag = False
log = logging.getLogger("bench.patching.disabled")
log.setLevel(logging.WARNING)


def without(n, dev):
    total = n + 1
    return total


def patched(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def guarded(n, dev):
    if flag:
        rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def unpatched(n, dev):
    rx_plain(len(dev) + n, dev.upper())
    total = n + 1
    return total


def logged(n, dev):
    log.debug("len=%d dev=%s", len(dev) + n, dev.upper())
    total = n + 1
    return total


def cases() -> list[Case]:
    # The unpatched row must stay unpatched: switch its marker's lazy hook off.
    patcher.set_armed(registry.core_of(rx_plain), False)
    (site,) = tracemark.patch(patched)
    assert site.patched, site
    ns = {"n": 1500, "dev": "eth0"}
    ns.update(without=without, patched=patched, guarded=guarded)
    ns.update(unpatched=unpatched, logged=logged)
    return [
        Case(BASELINE, "without(n, dev)", ns),
        Case("inactive marker, patched", "patched(n, dev)", ns, "target: within 5%"),
        Case("`if flag:` guard, flag off", "guarded(n, dev)", ns),
        Case("inactive marker, unpatched (plain call)", "unpatched(n, dev)", ns),
        Case("logging.debug, logger disabled", "logged(n, dev)", ns),
    ]


SITES = 1000


def _many_sites_module() -> object:
    lines = [
        "import tracemark",
        "ms = [tracemark.marker(f'bench.sw.m{i}', 'v=%d') for i in range(10)]",
    ]
    lines += [f"m{i} = ms[{i}]" for i in range(10)]
    for i in range(SITES):
        lines += [f"def f{i}(x):", f"    m{i % 10}(x)", "    return x", ""]
    path = Path(tempfile.mkdtemp(prefix="tracemark-bench-")) / "bench_many_sites.py"
    path.write_text("\n".join(lines) + "\n")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def switching() -> str:
    mod = _many_sites_module()
    t0 = time.perf_counter_ns()
    sites = tracemark.patch(mod)
    analyse = _ms(t0)
    assert len(sites) == SITES and all(s.patched for s in sites)

    def probe(marker, args):
        pass

    t0 = time.perf_counter_ns()
    conn = tracemark.connect("bench.sw.*", probe)
    first_on = _ms(t0)
    t0 = time.perf_counter_ns()
    tracemark.disconnect(conn)
    first_off = _ms(t0)
    on, off = [], []
    for _ in range(15):
        t0 = time.perf_counter_ns()
        conn = tracemark.connect("bench.sw.*", probe)
        on.append(_ms(t0))
        t0 = time.perf_counter_ns()
        tracemark.disconnect(conn)
        off.append(_ms(t0))
    rows = [
        ("analyse and patch the module (`tracemark.patch`)", analyse, "once"),
        ("first connect (builds and verifies the active variants)", first_on, "once"),
        ("first disconnect (variants cached since patch)", first_off, ""),
        ("connect, median of 15", statistics.median(on), "target: < 50 ms"),
        ("disconnect, median of 15", statistics.median(off), "target: < 50 ms"),
    ]
    out = [
        f"### Patching: switching {SITES} marker sites (10 markers, {SITES} functions)",
        "",
        "| step | ms | note |",
        "| --- | ---: | --- |",
    ]
    out += [f"| {name} | {ms:.2f} | {note} |" for name, ms, note in rows]
    return "\n".join(out) + "\n"


_STALL_MODULE = """\
import tracemark
m = tracemark.marker('bench.stall.m', 'v=%d')
def f(x):
    m(x)
    return x
def g(x):
    m(x)
    return -x
class K:
    def method(self, x):
        m(x)
        return x
"""

_STALL_PROGRAM = """\
import sys, time
alive = [{'k': []} for _ in range(int(sys.argv[1]))]  # dicts holding a list: GC-tracked
import tracemark, bench_stall_mod as mod
t0 = time.perf_counter_ns()
mod.f(1)
print((time.perf_counter_ns() - t0) / 1e6)
"""


def _first_run_ms(objects: int, runs: int = 3, **env: str) -> float:
    """Best of ``runs`` fresh processes: ms of the module's first inactive run."""
    folder = Path(tempfile.mkdtemp(prefix="tracemark-bench-stall-"))
    (folder / "bench_stall_mod.py").write_text(_STALL_MODULE)
    (folder / "prog.py").write_text(_STALL_PROGRAM)
    # Bytecode caches as an installed package has them: with PYTHONDONTWRITEBYTECODE set (as
    # on some CI machines), each fresh process compiled the patcher's lazily imported modules
    # from source, and this row measured the compiler (about 6 ms of 11).
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TRACEMARK_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    # The tracemark being measured, not whichever one the interpreter would find on its own.
    root = Path(tracemark.__file__).resolve().parents[1]
    clean.update(PYTHONPATH=os.pathsep.join([str(folder), str(root)]), **env)
    cmd = [sys.executable, str(folder / "prog.py"), str(objects)]
    subprocess.run(cmd, env=clean, capture_output=True, check=True)  # writes the caches
    return min(
        float(subprocess.run(cmd, env=clean, capture_output=True, text=True, check=True).stdout)
        for _ in range(runs)
    )


def first_run() -> str:
    base = _first_run_ms(1000)
    rows = [
        ("first inactive run of a module, 1,000 objects alive", base, "baseline"),
        ("first inactive run of a module, 3M objects alive", _first_run_ms(3_000_000), "< 5 ms"),
        (
            "the same with TRACEMARK_NOPATCH=1, 3M objects alive",
            _first_run_ms(3_000_000, TRACEMARK_NOPATCH="1"),
            "",
        ),
    ]
    out = [
        "### Patching: the first inactive run of a module (finds, analyses, patches it)",
        "",
        "Fresh process per run (bytecode caches written first), best of 3; 3M objects = 3M "
        "dicts each holding a list.",
        "",
        "| case | ms | ratio to baseline | note |",
        "| --- | ---: | ---: | --- |",
    ]
    out += [f"| {name} | {ms:.2f} | {ms / base:.2f}x | {note} |" for name, ms, note in rows]
    return "\n".join(out) + "\n"


def report() -> str:
    suite = cases()
    return table(TITLE, suite, measure(suite), BASELINE) + "\n" + switching() + "\n" + first_run()
