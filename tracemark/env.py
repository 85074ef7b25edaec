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
