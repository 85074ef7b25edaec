"""What an inactive patched marker costs, in machine instructions (callgrind), and why.

Run: ``python -m benchmarks.run jumps`` (needs ``valgrind``; about a minute per Python).

Timings of a 25 ns function move by more than the few nanoseconds in question from one run
to the next on a shared machine, so this suite counts instructions instead: each case of
:mod:`benchmarks._jump_cases` runs under ``valgrind --tool=callgrind`` twice, with N1 and N2
calls (same interpreter, same hash seed, so the same start-up), and the difference over
``N2 - N1`` is the instructions one call costs, exact and repeatable.

The cases take apart the patched function:

* ``reassigned``: the function with its ``__code__`` replaced by an equal copy. On 3.13 the
  interpreter clears a function's version when ``__code__`` is assigned and never gives it
  a new one (CPython ``Objects/funcobject.c``, "Function (and code) versions"), so a call
  site can no longer specialise its ``CALL`` for it; 3.11 and 3.12 give the function a new
  version lazily, and nothing changes.
* ``jump_only``: the patch with its jump landing straight on the next statement (no
  rebinding guard): the one jump the design promises.
* ``patched``: what ships. On 3.12+ with the C core, the jump alone: a dictionary watcher
  on the module's globals stands in for the rebinding guard (tracemark/patching/patcher.py,
  ``_watch``), and the C core gives the function its version back after ``__code__`` is
  assigned (3.13). On 3.11 (no dictionary watchers) and on the pure core, the jump goes to
  the rebinding guard (load the marker's name, compare it with the marker, jump back), so
  that a name rebound to something else (a mock) is called.
* ``rebound``: patched, then the marker's name rebound (to the same marker): the watcher
  puts the guard back for good, as in a module that rebinds its markers.
* ``guarded``: ``if flag:`` around the marker, for scale.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TITLE = "Patching: an inactive marker statement in machine instructions (callgrind)"
N1, N2 = 20_000, 120_000
ROOT = Path(__file__).resolve().parent.parent
_NOTES = {
    "without": "baseline",
    "reassigned": "same code, new code object",
    "jump_only": "the patch's jump, no rebinding guard",
    "patched": "what ships: the jump (3.12+, C core: a watcher, no guard; 3.11: + guard)",
    "rebound": "jump + rebinding guard (after the marker's name is rebound)",
    "guarded": "`if flag:`, flag off",
}


def _instructions(case: str, n: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "benchmarks._jump_cases", case, str(n)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"callgrind said no total:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def per_call(case: str) -> float:
    """Machine instructions one call of ``case`` costs (see the module docstring)."""
    return (_instructions(case, N2) - _instructions(case, N1)) / (N2 - N1)


def report() -> str:
    import datetime
    import platform

    from benchmarks._jump_cases import CASES

    head = (
        f"### {TITLE}\n\n{datetime.date.today()}, Python {platform.python_version()} "
        f"({platform.python_implementation().lower()}, {platform.machine()}); "
        "instructions per call, "
        f"(Ir at {N2:,} calls - Ir at {N1:,}) / {N2 - N1:,}\n\n"
    )
    if shutil.which("valgrind") is None:
        return head + "not measured: valgrind is not installed\n"
    counts = {case: per_call(case) for case in CASES}
    base = counts["without"]
    rows = [
        f"| {case} | {counts[case]:.0f} | {round(counts[case] - base):+d} | "
        f"{counts[case] / base:.3f}x | {_NOTES[case]} |"
        for case in CASES
    ]
    return (
        head
        + "| case | instructions | vs baseline | ratio | note |\n"
        + "| --- | ---: | ---: | ---: | --- |\n"
        + "\n".join(rows)
        + "\n"
    )
