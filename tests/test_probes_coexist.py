"""Probes beside other tools: coverage.py measures a probed function and its probes fire."""

import json
import os
import subprocess
import sys

import pytest

from tracemark.env import PYBEHAVIOR

MECHANISMS = ["sys.monitoring", "recompile"] if PYBEHAVIOR.sys_monitoring else ["recompile"]

APP = """\
def work(n):
    total = 0
    for i in range(n):
        total += i
    if total < 0:
        total = -total  # never runs
    return total


def unused():
    return 1
"""

MAIN = """\
import json, sys
import tracemark
import app

got = []
tracemark.connect("probe.*", lambda m, a: got.append([m.name, list(a)]))
tracemark.probe("app:work", at="return")
tracemark.probe("app:work", capture=["n"])
tracemark.probe("app:4", capture=["i"])  # the loop body
result = app.work(3)
mon = getattr(sys, "monitoring", None)
tools = [mon.get_tool(i) for i in range(6)] if mon else []
mechanism = tracemark.probes.mechanism().name
print(json.dumps({"result": result, "events": got, "mechanism": mechanism, "tools": tools}))
"""


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_coverage_measures_a_probed_function_and_probes_fire(tmp_path, mechanism):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "main.py").write_text(MAIN)
    env = dict(os.environ, TRACEMARK_PROBES=mechanism, PYTHONPATH=str(tmp_path))
    if PYBEHAVIOR.sys_monitoring:
        env["COVERAGE_CORE"] = "sysmon"  # coverage on sys.monitoring too: tool id 1 beside ours
    run = [sys.executable, "-m", "coverage"]
    out = subprocess.run(
        [*run, "run", "--include=app.py", "main.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["result"] == 3
    assert report["mechanism"] == mechanism
    events = [(name.rsplit(".", 1)[1], args) for name, args in report["events"]]
    assert events == [
        ("entry", [3]),
        ("line4", [0]),
        ("line4", [1]),
        ("line4", [2]),
        ("return", [3, events[-1][1][1]]),
    ]
    subprocess.run([*run, "json", "-o", "cov.json"], cwd=tmp_path, env=env, check=True)
    data = json.loads((tmp_path / "cov.json").read_text())["files"]["app.py"]
    lines = APP.splitlines()
    never = {
        lines.index("        total = -total  # never runs") + 1,
        lines.index("    return 1") + 1,
    }
    body = {n for n, text in enumerate(lines, 1) if text.startswith("    ")} - never
    assert set(data["missing_lines"]) == never
    assert body <= set(data["executed_lines"])
    if PYBEHAVIOR.sys_monitoring:  # both on sys.monitoring at once, each with its own id
        tools = report["tools"]
        assert tools[1] == "coverage.py"
        if mechanism == "sys.monitoring":
            assert tools.index("tracemark") not in (0, 1)
