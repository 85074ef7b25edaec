"""Tracers: the consumers that connect to markers (printer now; recorder and stats later)."""

from .printer import Printer

__all__ = ["Printer"]
