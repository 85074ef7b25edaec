"""Tools that watch code run (coverage.py) see the same program whether it is patched or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MODULE = """\
import tracemark

rx = tracemark.marker("cov.rx", "n=%d")


def work(n):
    total = 0
    for i in range(n):
        rx(i)
        if i % 2:
            total += i
    try:
        return total
    finally:
        rx(total)


def unused():
    rx(0)
    return 1
"""

MAIN = """\
import sys
import tracemark
import covmod

original = covmod.work.__code__
sites = tracemark.patch(covmod)
patched = covmod.work.__code__ is not original
assert covmod.work(5) == 4
print(sys.argv[1], patched, [s.patched for s in sites])
"""


def _covered(tmp_path, nopatch: bool) -> tuple[str, list[int]]:
    (tmp_path / "covmod.py").write_text(MODULE)
    main = tmp_path / "main.py"
    main.write_text(MAIN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRACEMARK_NOPATCH": "1" if nopatch else ""}
    data = tmp_path / f".coverage-{nopatch}"
    run = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--data-file={data}", str(main), "x"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    out = tmp_path / f"cov-{nopatch}.json"
    subprocess.run(
        [sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(out)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    report = json.loads(out.read_text())
    (key,) = [k for k in report["files"] if k.endswith("covmod.py")]
    return run.stdout.strip(), sorted(report["files"][key]["executed_lines"])


def test_coverage_sees_the_same_lines_patched_or_not(tmp_path):
    patched_out, patched_lines = _covered(tmp_path, nopatch=False)
    plain_out, plain_lines = _covered(tmp_path, nopatch=True)
    assert patched_out == "x True [True, True, True]"
    assert plain_out == "x False [False, False, False]"
    assert patched_lines == plain_lines
    assert 9 in patched_lines and 15 in patched_lines  # marker lines still count as run
    assert 19 not in patched_lines  # and a function never called is not covered
