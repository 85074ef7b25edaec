"""The status file of a process's sub-trace: did its recording end normally, what was lost.

A CTF trace can count discarded events only inside packets (``events_discarded``); events in
packets that never reached the disk (disk full, unwritable directory), and everything a
process still had buffered when it ended without stopping its recording (``os._exit``, a
crash, SIGKILL), leave no trace in it. So the recorder keeps one small JSON file beside the
streams, ``DIR/<pid>-<n>/.tracemark-status``:

* written at start with ``"state": "recording"``, padded to :data:`RESERVED` bytes so that the
  final version overwrites it in place (no new disk block needed: it can still be written
  when the disk is full);
* rewritten at stop with ``"state": "stopped"`` and the counts: ``lost`` (events neither in
  the trace nor counted in its ``events_discarded``) and ``reason``; and ``waited_s``, how
  long firing threads waited for the consumer (:attr:`RecordingSummary.waited_s`).

Its name starts with a dot: babeltrace2 2.0.4's ``source.ctf.fs`` skips hidden files (it
rejects any other file that is not a CTF stream), and so does :mod:`.reader`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RESERVED", "STATUS_FILE", "encode", "read_status"]

STATUS_FILE = ".tracemark-status"
#: Bytes reserved for the file at start (the final status is written over them in place).
RESERVED = 1024
_MAX_READ = 64 * 1024


def encode(status: dict[str, Any]) -> bytes:
    """``status`` as JSON padded with spaces to :data:`RESERVED` bytes (longer if it must)."""
    data = json.dumps(status, sort_keys=True).encode()
    if len(data) < RESERVED - 1:
        data += b" " * (RESERVED - 1 - len(data))
    return data + b"\n"


def read_status(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status of the sub-trace in ``directory`` (a snapshot's: its process's), or None
    when there is none or it cannot be read (a trace from before status files, a foreign
    one). Never raises."""
    path = Path(directory)
    candidates = [path / STATUS_FILE]
    if path.name.startswith("snapshot-"):
        candidates.append(path.parent / STATUS_FILE)
    for candidate in candidates:
        try:
            with open(candidate, "rb") as f:
                data = f.read(_MAX_READ)
        except OSError:
            continue
        try:
            status = json.loads(data)
        except ValueError:
            return None
        return status if isinstance(status, dict) else None
    return None
