"""Export a trace to the formats timeline viewers load: Chrome Trace Event JSON
(:mod:`.chrome`: ``chrome://tracing``, Perfetto UI, speedscope) and Perfetto's protobuf
TrackEvent format (:mod:`.perfetto`: Perfetto UI, trace processor); and to Parquet tables
for query engines (:mod:`.parquet`: :func:`.parquet.export_parquet`, needs pyarrow).

::

    result = export("tracemark-traces/app", "app.pftrace", "perfetto", counters=["net.rx.len"])

Both walk the trace the same way (:mod:`.walker`: spans as slices on their thread's track,
tasks under their thread, markers as instants, chosen fields as counters, processes and
threads named) and write as they go: memory is bounded whatever the trace's size.

Guarantees
----------
* The file appears whole or not at all: it is written under a temporary name beside
  ``output`` and renamed at the end (an interrupted export leaves no half file behind).
  An ``output`` that exists and is not a regular file (``/dev/stdout``, a pipe, a device)
  is written to directly: it is never replaced by a file.
* ``output`` ending in ``.gz`` is gzip-compressed (both formats; the viewers read gzip).
* Every export names the trace schema version it was made from (:func:`about_trace`):
  Chrome's ``otherData``, Perfetto's trace metadata (:mod:`.perfetto`), Parquet's file
  metadata (:mod:`.parquet`).
* A damaged trace exports what reads; :attr:`.walker.Walk.errors` says what did not.
* Standard library only.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .walker import CounterSpec, Walk, open_streams, walk

__all__ = ["DEFAULT_SUFFIX", "FORMATS", "CounterSpec", "Walk", "default_output", "export"]

FORMATS = ("chrome", "perfetto")
#: Traces of this many events or more are exported by two processes where there are two
#: CPUs (:mod:`.fast`); below, one process is as fast.
PARALLEL_EVENTS = 200_000
#: The file name suffix a format's output gets by default.
DEFAULT_SUFFIX = {"chrome": ".json", "perfetto": ".pftrace", "parquet": ".parquet"}


def default_output(trace_dir: str | os.PathLike[str], fmt: str) -> Path:
    """The default file for ``fmt``: next to the trace directory, named after it (inside it
    the file could be taken for part of the trace)."""
    d = Path(trace_dir).resolve()
    return d.with_name(d.name + DEFAULT_SUFFIX[fmt])


def export(
    trace_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    fmt: str,
    *,
    counters: Iterable[str | CounterSpec] = (),
    wrap: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    fast: bool = True,
    jobs: int | None = None,
    only: Iterable[str | os.PathLike[str]] | None = None,
) -> Walk:
    """Export the trace in ``trace_dir`` to ``output`` in format ``fmt`` (``"chrome"`` or
    ``"perfetto"``). ``counters``: ``"NAME.FIELD"`` specs; ``progress(events so far)`` is
    called as it goes; ``wrap``: applied to the event stream (then the walker runs, not
    the fast path); ``fast=False``: the walker in any case (:mod:`.fast` says when the fast
    path runs and what it guarantees); ``jobs``: processes the fast path may use (None: two
    where there are two CPUs and the trace has :data:`PARALLEL_EVENTS` events or more);
    ``only``: export just these sub-trace directories of ``trace_dir`` (one session's).
    Returns what was exported; raises ValueError for a bad format or counter, OSError when
    ``output`` cannot be written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    specs = [c if isinstance(c, CounterSpec) else CounterSpec.parse(c) for c in counters]
    subs, errors = open_streams(trace_dir, only)
    from .fast import applies, export_fast
    from .walker import _events  # the per-packet guarded merge

    output = Path(output)
    use_fast = fast and wrap is None and applies(subs, fmt)
    events: Iterable[Any] = _events(subs, errors)
    if wrap is not None:
        events = wrap(events)
    elif progress is not None:
        events = _counting(events, progress)

    if jobs is None:
        big = sum(s.events for sub in subs for s in sub.streams) >= PARALLEL_EVENTS
        jobs = min(2, _cpus()) if big and hasattr(os, "fork") else 1

    def run(sink: Any, out: Any) -> Walk:
        if use_fast:
            return export_fast(
                subs,
                sink,
                fmt,
                out,
                counters=specs,
                errors=errors,
                progress=progress,
                jobs=jobs,
                scratch=tempfile.gettempdir() if direct else output.parent,
            )
        return walk(subs, sink, counters=specs, errors=errors, events=events)

    # A device, a pipe or /dev/stdout cannot be renamed onto: written as it is.
    direct = output.exists() and not output.is_file()
    tmp = output if direct else output.with_name(f".{output.name}.{os.getpid()}.partial")
    raw = open(tmp, "wb", buffering=1 << 20)  # noqa: SIM115 - closed below, on every path
    try:
        binary: Any = raw
        if output.name.endswith(".gz"):
            # mtime 0: the same trace gives the same bytes.
            binary = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
        buffered = io.BufferedWriter(binary, 1 << 20) if binary is not raw else raw
        about = about_trace(trace_dir, subs)
        if fmt == "chrome":
            from .chrome import ChromeWriter

            text = io.TextIOWrapper(buffered, encoding="utf-8", newline="\n", write_through=False)
            sink: Any = ChromeWriter(text, about)
            result = run(sink, text)
            sink.close()
            text.flush()
            text.detach()
        else:
            from .perfetto import PerfettoWriter

            sink = PerfettoWriter(buffered)
            sink.metadata(about)
            result = run(sink, buffered)
            sink.close()
        buffered.flush()
        if binary is not raw:
            binary.close()
        raw.close()
        if not direct:
            os.replace(tmp, output)
    except BaseException:
        raw.close()
        if not direct:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return result


def about_trace(trace_dir: str | os.PathLike[str], subs: Iterable[Any]) -> dict[str, Any]:
    """What every export says about the trace it was made from: ``tracemark_trace`` (the
    directory), ``tracemark_schema`` (its schema version: :mod:`tracemark.ctf.schema`) and
    ``tracemark_version`` (the tracemark that exported it)."""
    from .. import __version__
    from ..ctf.schema import SCHEMA_KEY, exported_schema

    return {
        "tracemark_trace": str(trace_dir),
        SCHEMA_KEY: exported_schema(subs),
        "tracemark_version": __version__,
    }


def _counting(events: Iterable[Any], progress: Callable[[int], None]) -> Iterable[Any]:
    n = 0
    for n, ev in enumerate(events, 1):
        if not n & 0x3FFF:
            progress(n)
        yield ev
    progress(n)


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)
