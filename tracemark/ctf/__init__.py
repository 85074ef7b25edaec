"""CTF 1.8: the trace format the recorder writes (:mod:`.writer`) and a reader for it.

::

    from tracemark.ctf import read_trace, TraceError

    trace = read_trace("out/trace")   # a directory written by tracemark.record()
    for ev in trace.events():         # every stream, merged in timestamp order
        print(ev.timestamp, ev.pid, ev.tid, ev.thread, ev.name, ev.fields)

The same traces open in babeltrace2 (the tests check it); this reader is the project's own,
pure Python, streaming, and strict (any damage is a :class:`TraceError` naming the file and
the byte offset). :func:`recover` turns what a process that died while recording left in its
ring files (:mod:`.ring`) into packets of its trace (:mod:`.recovery`). Every sub-trace names
its trace schema version (:mod:`.schema`); a newer one than this tracemark reads is a
:class:`SchemaError` ("upgrade tracemark").
"""

from __future__ import annotations

from .reader import *  # noqa: F403  (the reader's public names are this package's)
from .reader import __all__ as _reader_all
from .recovery import Recovered, recover
from .schema import SCHEMA_VERSION, SchemaError

__all__ = [*_reader_all, "SCHEMA_VERSION", "Recovered", "SchemaError", "recover"]
