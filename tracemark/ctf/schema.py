"""The trace schema version: which traces this tracemark writes, and which it reads.

Every sub-trace's metadata names, in its CTF ``env`` block (CTF 1.8, section 7.4: env values
are integers or strings), the tracer that wrote it, by LTTng's convention (``tracer_name``,
``tracer_major``, ``tracer_minor``, ``tracer_patchlevel``), and the trace schema version
:data:`SCHEMA_KEY` = :data:`SCHEMA_VERSION`. Exports (``view --json``, Chrome JSON,
Perfetto, Parquet) carry it too (:func:`exported_schema`), so a file that has left the
machine still says what it was made from.

What a schema version promises
------------------------------
A schema version names everything a reader relies on: the metadata's fixed parts (types,
packet header and context, event header: :mod:`.writer`), how each field kind is encoded
(the ``any`` variant included), the bookkeeping events (task switches) and the env keys
the tools read (``vpid``, ``procname``, ``session_id``...). Two traces of one schema
version read the same way, whatever tracemark version wrote them.

When it must be raised
----------------------
Whenever a trace written by the new code could be misread, or refused as corrupt, by a
tracemark that reads the current version: a changed or new field encoding, header, packet
layout, clock, bookkeeping event, or the meaning of an env key. Additions that an older
reader ignores safely (a new env key, a new marker) do not raise it. When it is raised, the
reader keeps reading every older version it knows (:data:`OLDEST_READ` stays put), so old
traces stay readable; an older tracemark refuses the new traces with :class:`SchemaError`
("upgrade tracemark") instead of misreading them.

Traces without the key
----------------------
Traces written before the key existed have exactly the layout of schema 1 (the reader
checks the fixed parts of the metadata byte for byte): they are read as schema 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .reader import TraceError

__all__ = [
    "OLDEST_READ",
    "SCHEMA_KEY",
    "SCHEMA_VERSION",
    "SchemaError",
    "exported_schema",
    "schema_of",
    "tracer_env",
]

#: The trace schema version this tracemark writes (see the module docstring for what it
#: promises and when it must be raised). The one place it is defined.
SCHEMA_VERSION = 1
#: The oldest schema version this tracemark reads.
OLDEST_READ = 1
#: The metadata ``env`` key that holds it.
SCHEMA_KEY = "tracemark_schema"


class SchemaError(TraceError):
    """A trace of a schema version this tracemark does not read (a newer one): upgrade."""


def tracer_env() -> dict[str, str | int]:
    """The env entries naming the tracer and the schema, for a sub-trace's metadata."""
    from .. import __version__

    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return {
        "tracer_name": "tracemark",
        "tracer_major": major,
        "tracer_minor": minor,
        "tracer_patchlevel": patch,
        "tracemark_version": __version__,
        SCHEMA_KEY: SCHEMA_VERSION,
    }


def schema_of(path: Any, env: Mapping[str, Any]) -> int:
    """The schema version of the sub-trace whose metadata file is ``path`` and env ``env``;
    a :class:`SchemaError` if this tracemark does not read it. No key: schema 1 (see the
    module docstring)."""
    value = env.get(SCHEMA_KEY)
    if value is None:
        return 1
    if not isinstance(value, int) or value < 1:  # damage, not a version: a corrupt trace
        raise TraceError(path, 0, f"env {SCHEMA_KEY} is not a schema version: {value!r}")
    if value > SCHEMA_VERSION:
        from .. import __version__

        tracer = env.get("tracemark_version")
        by = f" (written by tracemark {tracer})" if isinstance(tracer, str) else ""
        raise SchemaError(
            path,
            0,
            f"the trace is of schema version {value}{by}, newer than this tracemark "
            f"({__version__}) reads (schema versions up to {SCHEMA_VERSION}): "
            "upgrade tracemark to read it",
        )
    if value < OLDEST_READ:
        raise SchemaError(
            path,
            0,
            f"the trace is of schema version {value}; this tracemark reads schema versions "
            f"{OLDEST_READ} to {SCHEMA_VERSION} (an older tracemark reads it)",
        )
    return value


def exported_schema(subtraces: Iterable[Any]) -> int:
    """The schema version an export of ``subtraces`` names: the newest of theirs (every
    one of them was read by this tracemark, so it is at most :data:`SCHEMA_VERSION`);
    :data:`SCHEMA_VERSION` when there are none."""
    return max((getattr(s, "schema", SCHEMA_VERSION) for s in subtraces), default=SCHEMA_VERSION)
