"""What differs between the Pythons tracemark runs on, named once.

The rest of the package asks a question (``PYBEHAVIOR.sys_monitoring``) instead of comparing
version numbers, so a reader finds every version-dependent decision from here (the habit of
coverage.py's ``env.py``). Settings read from the environment are here too, so that a test can
see in one place what a run was configured with.
"""

from __future__ import annotations

import os
import sys

from ._frozen import frozen

PYVERSION = sys.version_info[:2]


@frozen
class _Behavior:
    #: PEP 669 ``sys.monitoring`` exists (3.12+): dynamic probes use it instead of
    #: rewriting code objects.
    sys_monitoring: bool = PYVERSION >= (3, 12)
    #: PEP 709 (3.12+): list/set/dict comprehensions are inlined into the function, their
    #: exception handler laid out at the end of it, far from the statement they belong to.
    inlined_comprehensions: bool = PYVERSION >= (3, 12)
    #: 3.12+: an ``await`` has a ``CLEANUP_THROW`` handler placed after the function's return.
    await_cleanup_at_end: bool = PYVERSION >= (3, 12)
    #: A build without the GIL (PEP 703). Swapping ``__code__`` is still one reference store,
    #: but tracemark has not been proven there, so code patching is refused and says why.
    free_threaded: bool = (
        "t" in sys.abiflags  # a free-threaded build's ABI tag (3.13t); sysconfig costs ~1 ms
        if hasattr(sys, "abiflags")
        else bool(__import__("sysconfig").get_config_var("Py_GIL_DISABLED"))
    )


PYBEHAVIOR = _Behavior()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


#: ``TRACEMARK_STRICT=1``: faults (a probe that raises, a marker fired with the wrong
#: arguments) raise in the traced program instead of being counted. Meant for tests.
STRICT = _flag("TRACEMARK_STRICT")

#: ``TRACEMARK_NOPATCH=1``: never rewrite code objects; every marker site uses the plain
#: call path.
NOPATCH = _flag("TRACEMARK_NOPATCH")

#: ``TRACEMARK_NORING=1``: recordings keep their sub-buffers in plain memory instead of ring
#: files (tracemark.ctf.ring): nothing to recover if the process dies without stopping.
NORING = _flag("TRACEMARK_NORING")

#: ``TRACEMARK_CONTROL=1``: listen for ``tracemark attach`` and friends (tracemark.control)
#: from the import of tracemark on.
CONTROL = _flag("TRACEMARK_CONTROL")

#: ``TRACEMARK_FLIGHT=GLOB[,GLOB...]``: keep a flight recording of these markers for
#: ``tracemark snapshot`` (implies listening).
FLIGHT = os.environ.get("TRACEMARK_FLIGHT", "").strip()

#: ``TRACEMARK_CORE=python``: record with the pure-Python core even when the C core
#: (``tracemark._speedups``) is built. Read when a recording binds a marker (so a test can
#: switch cores between recordings); :func:`core` says which core that gives, and why.
CORE_VARIABLE = "TRACEMARK_CORE"


def speedups() -> object | None:
    """The C core module when it is the one to use now, else None (see :func:`core`)."""
    return _core()[0]


def core() -> tuple[str, str]:
    """Which recording core runs, ``"c"`` or ``"python"``, and why (a short sentence)."""
    module, why = _core()
    return ("c" if module is not None else "python"), why


_built: list = []  # [module or None, why], once: the import is tried once per process


def _core() -> tuple[object | None, str]:
    if not _built:
        if PYBEHAVIOR.free_threaded:
            _built[:] = [None, "free-threaded build: the C core needs the GIL"]
        else:
            try:
                from . import _speedups
            except ImportError as exc:
                _built[:] = [None, f"C core not built ({exc})"]
            else:
                _built[:] = [_speedups, "C core built"]
    module, why = _built
    if module is None:
        return None, why
    if os.environ.get(CORE_VARIABLE, "").strip().lower() == "python":
        return None, f"{CORE_VARIABLE}=python (C core built)"
    return module, why


_reader_built: list = []  # [module or None, why], once


def reader() -> tuple[object | None, str]:
    """The C reader (``tracemark._creader``, packet decoding) when it is the one to use now,
    else None; and why (a short sentence). Same rules as the recording core: not on a
    free-threaded build, off with ``TRACEMARK_CORE=python``."""
    if not _reader_built:
        if PYBEHAVIOR.free_threaded:
            _reader_built[:] = [None, "free-threaded build: the C reader needs the GIL"]
        else:
            try:
                from . import _creader
            except ImportError as exc:
                _reader_built[:] = [None, f"C reader not built ({exc})"]
            else:
                _reader_built[:] = [_creader, "C reader built"]
    module, why = _reader_built
    if module is not None and os.environ.get(CORE_VARIABLE, "").strip().lower() == "python":
        return None, f"{CORE_VARIABLE}=python (C reader built)"
    return module, why
