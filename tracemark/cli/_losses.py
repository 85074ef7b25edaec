"""What a trace cannot show by itself: events lost without a count, and processes that never
stopped their recording (both from the recorder's status files, :mod:`tracemark.ctf.status`).

``tracemark record``, ``view`` and ``stats`` print these warnings, so that nothing is lost
silently: the trace's own ``events_discarded`` counts only what its packets could carry.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..ctf.recovery import pid_alive
from ..ctf.ring import RING_DIR
from ..ctf.status import STATUS_FILE, read_status

__all__ = ["loss_warnings", "waited_seconds"]

#: At most this many directories are looked at (a trace directory holds one per process).
_MAX_DIRS = 100_000


def _status_dirs(root: Path) -> list[Path]:
    found = []
    for n, (directory, dirs, files) in enumerate(os.walk(root)):
        if n >= _MAX_DIRS:
            break
        dirs.sort()
        if STATUS_FILE in files:
            found.append(Path(directory))
    return found


def waited_seconds(trace_dir: str | os.PathLike[str]) -> float:
    """How long the recording's processes waited for their consumers in all (seconds):
    a disk slower than the program, within the wait budget (see the native consumer)."""
    total = 0.0
    for directory in _status_dirs(Path(trace_dir)):
        waited = (read_status(directory) or {}).get("waited_s")
        if isinstance(waited, (int, float)) and waited > 0:
            total += waited
    return total


def loss_warnings(trace_dir: str | os.PathLike[str]) -> list[str]:
    """One line per problem, worded for a user, without a trailing newline."""
    lost, reasons, unfinished, unrecovered = 0, [], [], []
    for directory in _status_dirs(Path(trace_dir)):
        status = read_status(directory)
        if status is None:
            continue
        pid = status.get("pid")
        pid = pid if isinstance(pid, int) else 0
        if status.get("state") == "recording":
            if not pid_alive(pid):
                # Its buffers are in ring files until recovered (none under NORING).
                ring = (directory / RING_DIR).is_dir()
                (unrecovered if ring else unfinished).append(pid)
            continue
        n = status.get("lost")
        if isinstance(n, int) and n > 0:
            lost += n
            reason = status.get("reason")
            if isinstance(reason, str) and reason and reason not in reasons:
                reasons.append(reason[:300])
    lines = []
    if lost:
        why = f": {reasons[0]}" if reasons else ""
        lines.append(
            f"WARNING: {lost:,} events were LOST: they could not be written to the trace{why}"
        )
    if unfinished:
        pids = ", ".join(map(str, sorted(unfinished)[:10])) + (
            ", ..." if len(unfinished) > 10 else ""
        )
        s = "es" if len(unfinished) > 1 else ""
        lines.append(
            f"WARNING: process{s} {pids} ended without stopping {'their' if s else 'its'} "
            "recording (os._exit(), a crash or a kill): the events still buffered there "
            "were LOST, and how many is unknown"
        )
    if unrecovered:
        n = len(unrecovered)
        lines.append(
            f"WARNING: {n} process{'es' if n > 1 else ''} ended without stopping "
            f"{'their' if n > 1 else 'its'} recording; {'their' if n > 1 else 'its'} last "
            f"events are still in ring files: run tracemark recover {trace_dir}"
        )
    return [line.replace("\n", " ") for line in lines]
