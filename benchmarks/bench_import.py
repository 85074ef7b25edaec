"""What ``import tracemark`` costs a program, beside its peers.

Run: ``python -m benchmarks.run import``.

Each case is a fresh interpreter (``-X importtime``, the import's own cumulative time, so
the interpreter's start-up is not counted), best of :data:`RUNS`: ``import tracemark``
(the marker core and the patcher; the recorder, probes and printer load on first use),
``import tracemark`` followed by ``tracemark.record`` (what a program that records pays),
and the peers a library might import instead: ``logging``, ``blinker``,
``opentelemetry.trace``.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time

from .harness import child_env

RUNS = 15
TARGET_MS = 15.0

CASES = [
    ("import tracemark", "tracemark", "import tracemark"),
    (
        "import tracemark; tracemark.record (the recorder loaded)",
        "tracemark",
        "import tracemark; tracemark.record",
    ),
    ("import logging", "logging", "import logging"),
    ("import blinker", "blinker", "import blinker"),
    ("import opentelemetry.trace", "opentelemetry.trace", "import opentelemetry.trace"),
]


def _import_ms(module: str, code: str) -> float | None:
    """What running ``code`` in a fresh process imports of ``module``'s package (ms): the
    cumulative times of the imports the code itself made (``-X importtime``'s unindented
    lines), so a lazy import on first use (``tracemark.record``) counts too."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    if done.returncode != 0:
        return None
    root = module.split(".")[0]
    total = 0
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2][1:]  # one space after the bar, then the nesting's indentation
        if name == root or name.startswith(root + "."):
            total += int(parts[1])
    return total / 1000


def report() -> str:
    rows = []
    for label, module, code in CASES:
        best = min(
            (ms for ms in (_import_ms(module, code) for _ in range(RUNS)) if ms is not None),
            default=None,
        )
        rows.append((label, best))
    base = rows[0][1]
    lines = [
        "### Import: what `import X` costs (python -X importtime, cumulative)",
        "",
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}; best of {RUNS} fresh"
        " processes each; baseline: import tracemark",
        "",
        "| case | ms | ratio to baseline | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for label, ms in rows:
        if ms is None:
            lines.append(f"| {label} | - | - | not installed |")
            continue
        note = f"target: under {TARGET_MS:g} ms" if label == "import tracemark" else ""
        lines.append(f"| {label} | {ms:.1f} | {ms / base:.2f}x | {note} |")
    return "\n".join(lines) + "\n"
