"""Issue 13: what the logging bridge costs per record, beside logging's own handlers.

Run: ``python -m benchmarks.run logging``.

One logger, one ``log.info("request %s took %d ms", path, ms, extra={"request_id": n})``
per call, with one handler each: a ``NullHandler`` (what logging costs before any handler
does work: the record is made), a ``FileHandler`` writing formatted lines to a temporary
file (the baseline: what a program pays for logging today), tracemark's ``Handler``
inactive (no probe on its marker) and recorded to a CTF trace by ``tracemark.record()``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import tracemark
import tracemark.logging as tmlog

from .harness import Case, measure, table

BASELINE = "FileHandler, formatted lines to a file"


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.Logger(name, logging.INFO)  # outside logging's tree: only this handler
    log.addHandler(handler)
    return log


def report() -> str:
    directory = Path(tempfile.mkdtemp(prefix="tracemark-bench-logging-"))
    stmt = 'log.info("request %s took %d ms", "/users/27", 12, extra={"request_id": 27})'
    file_handler = logging.FileHandler(directory / "app.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    bridge = tmlog.Handler(extra={"request_id": int})
    cases = [
        Case(
            "NullHandler (the record made, nothing done)",
            stmt,
            {"log": _logger(logging.NullHandler(), "bench.null")},
        ),
        Case(BASELINE, stmt, {"log": _logger(file_handler, "bench.file")}),
        Case("tracemark Handler, inactive", stmt, {"log": _logger(bridge, "bench.inactive")}),
    ]
    recorded = Case(
        "tracemark Handler, recorded to a CTF trace", stmt, {"log": _logger(bridge, "bench.rec")}
    )
    try:
        results = measure(cases, number=50_000)
        with tracemark.record(
            directory / "trace", "log.bench.*", subbuffer_size=4 << 20, subbuffers=12
        ) as rec:
            results.update(measure([recorded], number=50_000))
        assert rec.summary.recorded > 0 and rec.summary.discarded == 0, rec.summary
    finally:
        file_handler.close()
        shutil.rmtree(directory, ignore_errors=True)
    return table("Logging bridge: one log.info per call", [*cases, recorded], results, BASELINE)
