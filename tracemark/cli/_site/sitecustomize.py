"""Started by ``tracemark record``: this directory is put first on ``PYTHONPATH``, so every
Python process the recorded program starts (subprocess, multiprocessing spawn or forkserver)
runs this file at start-up and records into the same trace directory.

It starts the recording (:mod:`tracemark.cli._boot`), then runs the ``sitecustomize`` this
process would have run without us, so a site's own customisation keeps working. Nothing here
may break the program: a failure is one line on stderr and the program runs untraced.
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
            # A Python that does not have tracemark installed: use the recording one's copy,
            # last on the path so that it shadows nothing of the program's.
            sys.path.append(home)
            from tracemark.cli import _boot
        _boot.start()
    except Exception as exc:
        sys.stderr.write(f"tracemark: this process ({os.getpid()}) is not recorded: {exc}\n")
    _chain(here)


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
