"""The printer: the kernel's ``printk`` for markers, one readable line per event.

::

    tracemark.connect("net.*", Printer())                     # to sys.stderr
    tracemark.connect("net.*", Printer(logger=logging.getLogger("trace")))

A line is ``HH:MM:SS.ffffff [thread] name: text``, where the text is the marker's format
applied to the values, or ``field=value ...`` when it was declared with keywords. With a
logger, the message is ``name: text`` and the logging formatter adds time and thread, as it
does for every other record.

Lines from several threads never interleave within a line (one write per line, under a lock).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, Any

from .._forksafe import fork_safe_lock
from ..markers.fields import render

__all__ = ["Printer"]


class Printer:
    """A probe that prints every event it receives."""

    def __init__(
        self,
        file: IO[str] | None = None,
        *,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
    ) -> None:
        if file is not None and logger is not None:
            raise ValueError("Printer writes to a file or to a logger, not both")
        self.file = file
        self.logger = logger
        self.level = level
        self._lock = fork_safe_lock()  # a fork child prints too

    def __call__(self, marker: Any, args: tuple) -> None:
        text = f"{marker.name}: {render(marker.fmt, marker.fields, args)}"
        if self.logger is not None:
            self.logger.log(self.level, "%s", text)
            return
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        line = f"{stamp}.{int(now % 1 * 1e6):06d} [{threading.current_thread().name}] {text}\n"
        file = self.file if self.file is not None else sys.stderr  # looked up late: redirectable
        with self._lock:
            file.write(line)

    def __repr__(self) -> str:
        target = self.logger.name if self.logger is not None else getattr(self.file, "name", None)
        return f"<Printer to {target or 'stderr'}>"
