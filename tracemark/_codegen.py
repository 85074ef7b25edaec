"""Generated code that tracebacks, debuggers and profilers can show.

tracemark generates Python source where speed needs straight-line code: markers' firing
functions (:mod:`.markers.dispatch`), the recorder's per-marker paths
(:mod:`.tracers.recording.generated`), packers and decoders (:mod:`.ctf`), probe emitters
(:mod:`.probes`). :func:`compile_generated` compiles each under a file name of its own,
``<tracemark KIND #n>``, and registers the source in :mod:`linecache`, so a traceback through
generated code prints its lines and ``pdb`` can list them (the names all start with
``<tracemark``, which is how tracemark recognises its own frames).

Compiled once: the same source compiled again gives the same code object (code objects are
immutable, so functions share it): a thousand markers with the same fields cost one
compile, not a thousand (compiling each would make starting the first recording on 1,000
markers take ~0.9 s).

Bounded: one name per distinct source, and at most :data:`MAX_SOURCES` sources are kept;
past that, new sources are compiled under the plain ``<tracemark KIND>`` and show no
lines. ``linecache.checkcache()`` keeps the entries
(they have no modification time); ``linecache.clearcache()`` drops them, and the next
compile of the same source registers it again.
"""

from __future__ import annotations

import linecache
from types import CodeType

__all__ = ["MAX_SOURCES", "compile_generated", "function_code"]

MAX_SOURCES = 4096

_names: dict[tuple[str, str], str] = {}
_codes: dict[tuple[str, str], CodeType] = {}


def compile_generated(source: str, kind: str) -> CodeType:
    """Compile module-level ``source``; ``kind`` says what made it (``"marker"``, ...)."""
    key = (kind, source)
    filename = _names.get(key)
    if filename is None:
        if len(_names) >= MAX_SOURCES:
            return compile(source, f"<tracemark {kind}>", "exec")
        filename = _names[key] = f"<tracemark {kind} #{len(_names) + 1}>"
    if filename not in linecache.cache:  # registered again after linecache.clearcache()
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = _codes.get(key)
    if code is None:
        code = _codes[key] = compile(source, filename, "exec")
    return code


def function_code(source: str, kind: str) -> CodeType:
    """The code of the one function that ``source`` defines."""
    module = compile_generated(source, kind)
    return next(c for c in module.co_consts if isinstance(c, CodeType))
