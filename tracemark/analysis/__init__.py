"""Reading time out of a trace: spans paired from their begin and end events
(:mod:`.pairing`), for the commands and exporters that show time (``spans``, ``export``)."""

from __future__ import annotations

from .pairing import Begin, End, Instant, Pairing, span_kind

__all__ = ["Begin", "End", "Instant", "Pairing", "span_kind"]
