"""The logging bridge: a program's existing log records as marker events.

::

    import logging, tracemark.logging
    logging.getLogger().addHandler(tracemark.logging.Handler(extra={"request_id": int}))
    log = logging.getLogger("app.db")
    log.warning("slow query %s", sql, extra={"request_id": 27})
    # -> marker log.app.db: level='WARNING' message='slow query ...' request_id=27

so the log lands in the trace in time order with every other event, and every tracer
(the printer, the recorder, ``tracemark view --filter``) sees it.

Guarantees
----------
* **One marker per logger**: a record of logger ``a.b`` fires ``log.a.b`` (the root
  logger's ``log.root``; a logger name part that is not an identifier has each other
  character made ``_``, and ``_`` put before a leading digit), declared on the logger's
  first record. Its fields are ``level`` (str: the level's name), ``message`` (str: the
  record's message with its arguments applied; a logged exception's traceback follows on
  the next lines, as a Formatter would print it) and one field per name in ``extra``, with
  its declared type. A marker's fields are fixed, so the extras recorded are the ones the
  handler declares: a record without one records the type's "unset" value of
  :data:`tracemark.markers.fields.CONTEXT_DEFAULTS` (``-1``, ``""``...), extras not
  declared are not recorded.
* **Free while nobody listens**: while a logger's marker has no probe, ``emit`` checks one
  attribute and returns; no message is formatted. (The logging module itself has made the
  record by then: see the benchmark table for what a record costs.)
* **Never breaks the program**: a record whose message cannot be formatted is recorded with
  a message that says so; an extra of the wrong type is a counted fault of the marker
  (raised only in strict mode), as a marker fired with wrong arguments is. ``emit``
  raises nothing else.
* The markers count as declared where the handler was made (so two handlers with other
  extras, made in two places, give two markers by the registry's rules, never one mixed).
* A handler adds no lock to logging's: the marker fires from the logging call's thread
  (its thread and asyncio task are the event's).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from .markers import registry
from .markers.fields import CONTEXT_DEFAULTS

__all__ = ["Handler", "marker_name"]

_NOT_WORD = re.compile(r"\W", re.ASCII)


def marker_name(logger_name: str) -> str:
    """The marker a record of ``logger_name`` fires: ``log.<logger name>``."""
    parts = []
    for part in (logger_name or "root").split("."):
        part = _NOT_WORD.sub("_", part) or "_"
        parts.append("_" + part if part[0].isdigit() else part)
    return "log." + ".".join(parts)


class Handler(logging.Handler):
    """A :class:`logging.Handler` that fires ``log.<logger>`` markers (see the module doc)."""

    def __init__(self, level: int | str = logging.NOTSET, *, extra: Mapping[str, type] = {}):
        super().__init__(level)
        self.extra = dict(extra)
        for name, kind in self.extra.items():
            if name in ("level", "message") or kind not in CONTEXT_DEFAULTS:
                raise ValueError(
                    f"extra field {name!r}: {kind!r} is not one of int, float, str, bytes, "
                    "bool, object (and 'level' and 'message' are the record's own)"
                )
        self._fields = {"level": str, "message": str, **self.extra}
        self._unset = tuple(CONTEXT_DEFAULTS[kind] for kind in self.extra.values())
        # logger name -> (firing function, its registry record)
        self._markers: dict[str, tuple[Any, Any]] = {}
        self._formatter = logging.Formatter()
        # The markers are declared as made where the handler was made (the rules for a
        # name declared again are the registry's: two handlers with other extras made in
        # two places get two markers, never one mixed).
        self._where, self._module = registry.caller(1)

    def _marker(self, logger_name: str) -> tuple[Any, Any]:
        name = marker_name(logger_name)
        fields = registry.fields_of(name, None, self._fields)
        core = registry.declare_at(name, fields, None, self._where, self._module)
        found = (core.fire, core)
        self._markers[logger_name] = found
        return found

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fire, core = self._markers.get(record.name) or self._marker(record.name)
        except Exception:  # a name tracemark cannot declare: nothing to fire
            return
        if not core.connections:  # inactive: nothing formatted
            return
        try:
            message = record.getMessage()
        except Exception as exc:  # logging's own "--- Logging error ---" would print here
            message = f"<message {record.msg!r} with arguments {record.args!r}: {exc!r}>"
        if record.exc_info:
            message += "\n" + self._formatter.formatException(record.exc_info)
        elif record.exc_text:
            message += "\n" + record.exc_text
        if self.extra:
            values = [
                getattr(record, name, unset)
                for name, unset in zip(self.extra, self._unset, strict=True)
            ]
            fire(record.levelname, message, *values)
        else:
            fire(record.levelname, message)

    def __repr__(self) -> str:
        return f"<tracemark.logging.Handler ({logging.getLevelName(self.level)})>"
