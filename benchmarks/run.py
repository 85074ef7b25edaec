"""Run benchmark suites and print their tables; ``--write`` records them in RESULTS.md.

    python -m benchmarks.run                 # every suite
    python -m benchmarks.run markers --write # one suite, and update benchmarks/RESULTS.md

RESULTS.md keeps one section per suite and Python version, replaced whole on each write, so
the file always shows the latest run of each and never a mix of two runs inside one table.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
from pathlib import Path

from .harness import measure, table

SUITES = [
    "markers",
    "patching",
    "recorder",
    "probes",
    "cli",
    "codeown",
    "index",
    "spans",
    "export",
    "otlp",
    "logging",
    "control",
    "import",
    "jumps",
    "otel",
]
RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = """# Benchmark results

Written by `python -m benchmarks.run SUITE --write`: each table is one run, and every ratio in
it is to the baseline measured in that same run.
"""


def run_suite(name: str, number: int) -> str:
    mod = importlib.import_module(f"benchmarks.bench_{name}")
    if hasattr(mod, "report"):  # a suite that measures something other than one statement
        return mod.report()
    cases = mod.cases()
    return table(mod.TITLE, cases, measure(cases, number=number), mod.BASELINE)


def write(name: str, text: str) -> None:
    major, minor, _ = platform.python_version_tuple()
    key = f"<!-- {name} py{major}.{minor} -->"
    old = RESULTS.read_text() if RESULTS.exists() else _HEADER
    block = f"{key}\n{text}<!-- end -->\n"
    pattern = re.compile(re.escape(key) + r"\n.*?<!-- end -->\n", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old + "\n" + block
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"one of {', '.join(SUITES)}")
    parser.add_argument("--write", action="store_true", help="record the tables in RESULTS.md")
    parser.add_argument("--number", type=int, default=200_000, help="loop count per timing")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))}; choose from {', '.join(SUITES)}")
    for name in args.suites or SUITES:
        text = run_suite(name, args.number)
        print(text)
        if args.write:
            write(name, text)


if __name__ == "__main__":
    main()
