"""Started by ``tracemark record``: this directory is put first on ``PYTHONPATH``, so every
Python process the recorded program starts (subprocess, multiprocessing spawn or forkserver)
runs this file at start-up and records into the same trace directory.

It starts the recording (:mod:`tracemark.cli._boot`), then runs the ``sitecustomize`` this
process would have run without us, so a site's own customisation keeps working. Nothing here
may break the program: a failure is one line on stderr and the program runs untraced.

A Python process started with an interpreter or venv that has no ``tracemark`` of its own
is recorded with the recording interpreter's copy (``TRACEMARK_HOME``), loaded by location:
its ``sys.path`` is exactly what it would be without ``tracemark record``, so no other package
of the recording interpreter becomes importable in it (``import tracemark`` does work there,
as the recording needs it). A Python that cannot run that copy (a version tracemark does not
support) says so in one line and runs unrecorded; ``python -S``, ``-I`` and ``-E`` do not run
this file at all, so such a process is not recorded.
"""

import os
import sys


def _tracemark_start() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # Our directory stays in the PYTHONPATH children inherit, but leaves this sys.path: the
    # program should not see a module of ours named ``sitecustomize``.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        try:
            from tracemark.cli import _boot
        except ImportError:
            home = os.environ.get("TRACEMARK_HOME")
            if not home:
                raise
            _import_tracemark_from(home)
            from tracemark.cli import _boot
        _boot.start()
    except Exception as exc:
        sys.stderr.write(f"tracemark: this process ({os.getpid()}) is not recorded: {exc}\n")
    _chain(here)


def _import_tracemark_from(home: str) -> None:
    """Import the recording interpreter's ``tracemark`` package from ``home`` (the directory
    that holds it) without putting ``home`` on ``sys.path``.

    ``home`` is often a site-packages directory: on the path, every other package installed
    there would become importable in a program that runs with another interpreter or venv.
    Only the package itself is loaded, by its location; its submodules are found through its
    own ``__path__``. Nothing else of the recording interpreter is visible.
    """
    import importlib.util

    package = os.path.join(home, "tracemark")
    init = os.path.join(package, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"no tracemark package in {home}")
    spec = importlib.util.spec_from_file_location(
        "tracemark", init, submodule_search_locations=[package]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - a file location always has one
        raise ImportError(f"cannot load tracemark from {package}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tracemark"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == "tracemark" or n.startswith("tracemark.")]:
            del sys.modules[name]
        raise


def _chain(here: str) -> None:
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None or not spec.origin:
        return
    if os.path.dirname(os.path.abspath(spec.origin)) == here:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # what site.py itself does with a failing sitecustomize
        sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{exc!r}\n")


_tracemark_start()
del _tracemark_start
