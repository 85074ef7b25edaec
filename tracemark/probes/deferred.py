"""Deferred probes: a probe on code that is not loaded yet, installed when it is (as the
kernel's probes on modules not loaded yet)::

    tracemark.probe("app.db:save", defer=True)          # installed when app.db is imported
    tracemark.probe("/srv/app/jobs.py:42", defer=True)  # when that file is imported
    tracemark.probe("__main__:main", defer=True)        # the script, once it defines main()

``probe(..., defer=True)`` installs at once what it can (the module is loaded); otherwise it
returns a :class:`DeferredProbe` whose ``probe`` is the installed :class:`~.events.Probe` once
it is, and whose ``state``/``error`` say what happened.

Guarantees
----------
* **Installed when the module has run its top level**, before the importer gets it back: an
  import hook (a finder first in :data:`sys.meta_path`) hands the module's own loader on,
  wrapped so that after ``exec_module`` the probes waiting for it are installed. The module's
  ``__loader__`` and ``__spec__.loader`` are the original loader again before its code runs.
* **Never breaks an import.** A probe that cannot be installed (its function is not in the
  module, a capture that is not a local) is counted and reported as a fault
  (:mod:`tracemark.faults`, kind ``"probe"``) and kept as ``state == "failed"`` with the
  reason; the import succeeds. A module whose import raises keeps its probes pending (a later
  import may succeed).
* **Costs nothing once nothing is pending.** The finder is removed from :data:`sys.meta_path`
  when the last deferred probe is installed, failed or cancelled. While some are pending, an
  import of another module pays one set lookup (``benchmarks/bench_probes.py``).
* **The program's own script.** ``__main__:X`` and a path naming the running script cannot
  wait for an import (a script is not imported): a trace function watches only the main
  module's top-level frame (``sys.settrace``, every other frame is declined at its first
  event) and installs each probe as soon as the module-level name it needs is bound (the
  ``def``/``class`` holding the function or line), so before the script calls it. It is
  removed when they are all installed, or when the script's top level ends (those never
  defined are failed, with why). It is armed only in a process whose main program can be
  that script (``sys.argv[0]`` is it, ``-m``, or a ``multiprocessing`` spawn child or
  forkserver, which run the parent's script as ``__mp_main__``), never when another trace
  function is already set.
  While it watches, each Python call the script's top level makes (its imports' code too)
  pays one call of the trace function, which declines it; watching ends as soon as the
  names are bound, so a script that defines its functions before it calls them pays little.
* **Threads**: each probe is installed once, by the thread whose import ran the module (the
  import system's module lock makes other importers of that module wait for it). A probe
  asked for while another thread is importing its module waits for that import to end and
  is installed at once (:func:`finished`).
* **fork**: a child inherits the pending probes and the hook, and installs them when *it*
  imports the module; the parent's state is not changed by the child's.
* **importlib.reload**: a probe is installed once per process, on the function objects of
  the first import. A reload makes new function objects, which are not probed (as after any
  :func:`~tracemark.probe`); unprobe and probe again to follow them.
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from .._forksafe import fork_safe_rlock
from .targets import ProbeError, looks_like_path

__all__ = ["DeferredProbe", "add_listener", "deferred", "remove_listener"]

_lock = fork_safe_rlock()
_pending: list[DeferredProbe] = []
_all: list[DeferredProbe] = []
_listeners: list[Callable[[DeferredProbe], None]] = []
#: Module names and file stems the import hook looks for; replaced, never mutated, so the
#: hook reads them without the lock.
_names: frozenset[str] = frozenset()
_stems: frozenset[str] = frozenset()
_MAIN_NAMES = ("__main__", "__mp_main__")


class DeferredProbe:
    """A probe waiting for its module (see :mod:`tracemark.probes.deferred`).

    ``state`` is ``"pending"``, ``"installed"`` (``probe`` is the :class:`~.events.Probe`),
    ``"failed"`` (``error`` says why) or ``"cancelled"`` (by :func:`tracemark.unprobe`).
    """

    def __init__(self, target: str, at: str, capture: Any, name: str | None) -> None:
        self.target = target
        self.at = at
        self.capture = capture
        self.name = name
        self.state = "pending"
        self.probe: Any = None
        self.error: str | None = None
        left, _, right = target.rpartition(":")
        #: What it waits for: a module name, a file (real path), or "__main__".
        self.module = left if not looks_like_path(left) else None
        self.file = os.path.realpath(left) if looks_like_path(left) else None
        self.what = int(right) if right.isdigit() else right
        #: The module-level name the main-script watcher waits for (set when it is armed).
        self.wait_for: str | None = None

    @property
    def why(self) -> str:
        """Why it is not installed (empty once it is)."""
        if self.state == "pending":
            if self.error:
                return self.error
            if self.module == "__main__":
                return "the main module never defined it"
            if self.file:
                return f"{self.file} was never imported"
            return f"module {self.module!r} was never imported"
        return self.error or ""

    def __repr__(self) -> str:
        return f"<DeferredProbe {self.target!r} at={self.at} {self.state}>"


def deferred() -> list[DeferredProbe]:
    """Every deferred probe of this process, in the order they were asked for."""
    with _lock:
        return list(_all)


def add_listener(callback: Callable[[DeferredProbe], None]) -> None:
    """Call ``callback(d)`` whenever a deferred probe is installed or fails (``tracemark
    record`` writes the state of its probes for the summary)."""
    with _lock:
        _listeners.append(callback)


def remove_listener(callback: Callable[[DeferredProbe], None]) -> None:
    with _lock:
        if callback in _listeners:
            _listeners.remove(callback)


def loaded_module(d: DeferredProbe) -> types.ModuleType | None:
    """The module ``d`` names if it is loaded or being imported (see :func:`finished`) and,
    for the main module, already binds the name the probe needs."""
    if d.module in _MAIN_NAMES:
        main = sys.modules.get("__main__")
        first = d.what.split(".", 1)[0] if isinstance(d.what, str) else None
        return main if main is not None and first and first in vars(main) else None
    if d.module is not None:
        candidates = [sys.modules.get(d.module)]  # by the name imported: os.path is posixpath
    else:
        candidates = [m for m in list(sys.modules.values()) if _is_file_of(m, d.file or "")]
    for module in candidates:
        if module is None:
            continue
        if d.file is not None and getattr(module, "__name__", None) in _MAIN_NAMES:
            first = d.what.split(".", 1)[0] if isinstance(d.what, str) else None
            if first is None or first not in vars(module):
                return None  # the script is still running its top level
        return module
    return None


def finished(module: types.ModuleType) -> types.ModuleType:
    """``module`` once its import is over. Another thread importing it right now (past the
    import hook, so the hook cannot install the probe) is waited for, through the import
    system's lock on that module. This thread's own import (``probe(..., defer=True)``
    called by the module's top level) is not: the probe sees what is defined so far."""
    spec = getattr(module, "__spec__", None)
    if not getattr(spec, "_initializing", False) or _running_here(module):
        return module
    import importlib

    try:
        return importlib.import_module(spec.name)  # waits for the other thread's import
    except Exception as exc:
        raise ProbeError(f"importing {spec.name!r} failed: {exc}") from exc


def _running_here(module: types.ModuleType) -> bool:
    names = vars(module)
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is names:
            return True
        frame = frame.f_back
    return False


def _is_file_of(module: object, file: str) -> bool:
    f = getattr(module, "__file__", None)
    return isinstance(f, str) and os.path.realpath(f) == file


def add(d: DeferredProbe) -> DeferredProbe:
    """Make ``d`` pending: the import hook and, for the main script, the watcher serve it."""
    with _lock:
        _all.append(d)
        _pending.append(d)
        _refresh()
        if d.module in _MAIN_NAMES or (d.file is not None and _may_be_main(d.file)):
            _arm_main_watcher(d)
    return d


def cancel(d: DeferredProbe) -> bool:
    with _lock:
        if d.state != "pending":
            return False
        d.state = "cancelled"
        _pending.remove(d)
        _all.remove(d)  # a process that defers and cancels many keeps none of them
        _refresh()
    return True


def _refresh() -> None:
    """Recompute what the hook looks for; remove it (and the watcher) when nothing waits."""
    global _names, _stems
    _names = frozenset(d.module for d in _pending if d.module and d.module not in _MAIN_NAMES)
    _stems = frozenset(_stem(d.file) for d in _pending if d.file)
    if _names or _stems:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
    else:
        while _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    if not any(d.wait_for for d in _pending):
        _disarm()


def _stem(file: str) -> str:
    base = os.path.basename(file)
    if base == "__init__.py":
        return os.path.basename(os.path.dirname(file))
    return base.rsplit(".", 1)[0]


# --- installing ----------------------------------------------------------------------------


def _install(d: DeferredProbe, module: types.ModuleType) -> None:
    """Install ``d`` on ``module``; a failure is the probe's state and a fault, never raised."""
    from . import _probe_resolved

    try:
        d.probe = _probe_resolved(d.target, module, d.at, d.capture, d.name)
        d.state = "installed"
    except Exception as exc:
        d.state = "failed"
        d.error = str(exc)
        from .. import faults

        faults.report(
            "probe",
            d.target,
            f"deferred probe {d.target!r} not installed in {module.__name__}: {exc}",
        )
    _notify(d)


def _notify(d: DeferredProbe) -> None:
    for callback in list(_listeners):
        try:
            callback(d)
        except Exception:
            pass  # a listener's failure must not reach the import


def _take(match: Callable[[DeferredProbe], bool]) -> list[DeferredProbe]:
    """The pending probes ``match`` accepts, no longer pending (each is installed once)."""
    with _lock:
        taken = [d for d in _pending if match(d)]
        for d in taken:
            _pending.remove(d)
            d.state = "installing"
        if taken:
            _refresh()
    return taken


def _module_ran(module: types.ModuleType) -> None:
    name = getattr(module, "__name__", None)
    file = getattr(module, "__file__", None)
    real = os.path.realpath(file) if isinstance(file, str) else None
    for d in _take(lambda d: d.module == name or (d.file is not None and d.file == real)):
        _install(d, module)


class _Loader:
    """The module's own loader, which installs the waiting probes once the module has run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: types.ModuleType) -> None:
        real = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = real  # the module sees its own loader, as without the hook
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = real
        real.exec_module(module)  # raises: the import fails as it would, probes stay pending
        _module_ran(module)


class _Finder:
    """First in :data:`sys.meta_path` while probes wait for a module."""

    _busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _names and fullname.rpartition(".")[2] not in _stems:
            return None  # the whole cost for every other import
        if getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        if fullname not in _names:  # only the stem matched: is it the file?
            origin = spec.origin if spec.has_location else None
            if not origin or all(d.file != os.path.realpath(origin) for d in list(_pending)):
                return spec
        spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


# --- the main script -----------------------------------------------------------------------

_watching = False


def _may_be_main(file: str) -> bool:
    """Can ``file`` be this process's main script (see the module docstring)?"""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-m" or _multiprocessing_helper():
        return True
    main = sys.modules.get("__main__")
    if main is not None and _is_file_of(main, file):
        return True
    return bool(argv0) and os.path.isfile(argv0) and os.path.realpath(argv0) == file


def _arm_main_watcher(d: DeferredProbe) -> None:
    global _watching
    from .static import compiled, top_level_name

    file = d.file
    if file is None:
        main = sys.modules.get("__main__")
        file = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else None)
    try:
        code = compiled(file) if file and os.path.isfile(file) else None
    except ProbeError:
        code = None
    d.wait_for = (top_level_name(code, d.what) if code is not None else None) or (
        d.what.split(".", 1)[0] if isinstance(d.what, str) else None
    )
    if _watching:
        return
    running = _running_main_frame()
    main = sys.modules.get("__main__")
    if running is None and main is not None and hasattr(main, "__file__"):
        d.wait_for = None  # the script's top level is over (or runs in no frame of ours)
        d.error = "the main script is not running its top-level code any more"
        return
    if sys.gettrace() is not None:
        d.wait_for = None
        d.error = "another trace function (sys.settrace) was already set"
        return
    _watching = True
    if running is not None:  # probe(defer=True) called while the script's top level runs
        running.f_trace = _main_line
    sys.settrace(_watch)


def _running_main_frame() -> types.FrameType | None:
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if _is_main_frame(frame):
            return frame
        frame = frame.f_back
    return None


def _disarm() -> None:
    global _watching
    if _watching:
        _watching = False
        if sys.gettrace() is _watch:
            sys.settrace(None)


def _is_main_frame(frame: types.FrameType) -> bool:
    if frame.f_code.co_name != "<module>":
        return False
    name = frame.f_globals.get("__name__")
    if name == "__mp_main__":
        return True
    if name != "__main__":
        return False
    # A spawn child's own __main__ is multiprocessing's -c line: the script comes later.
    return not _multiprocessing_helper()


def _multiprocessing_helper() -> bool:
    """A ``multiprocessing`` spawn child, or a forkserver (whose children are forked from
    it): the parent's script runs in it later, as ``__mp_main__``."""
    if "--multiprocessing-fork" in sys.argv:
        return True
    command = getattr(sys, "orig_argv", ())
    return any("multiprocessing.forkserver" in arg for arg in command[1:4])


def _watch(frame: types.FrameType, event: str, arg: Any) -> Any:
    code = frame.f_code
    if code.co_name != "<module>":
        if code.co_name == "_bootstrap" and code.co_filename.endswith(_MP_PROCESS):
            # A multiprocessing child starts its target: its main module, if it has the
            # parent's script, has run by now. Stop watching for it.
            _stop_waiting_for_main(lambda d: True)
        return None
    if event != "call" or not _is_main_frame(frame):
        return None
    file = os.path.realpath(code.co_filename)
    with _lock:
        mine = [d for d in _pending if d.wait_for and (d.file in (None, file))]
    if not mine:
        # The main program is another script: file probes wait for an import only.
        _stop_waiting_for_main(lambda d: d.file is not None)
        return None
    return _main_line


_MP_PROCESS = os.path.join("multiprocessing", "process.py")


def _stop_waiting_for_main(which: Callable[[DeferredProbe], bool]) -> None:
    with _lock:
        for d in _pending:
            if d.wait_for and which(d):
                d.wait_for = None
        _refresh()


def _main_line(frame: types.FrameType, event: str, arg: Any) -> Any:
    names = frame.f_globals
    file = os.path.realpath(frame.f_code.co_filename)
    ready = _take(lambda d: bool(d.wait_for) and d.file in (None, file) and d.wait_for in names)
    if ready:
        module = _module_of(names)
        for d in ready:
            if module is None:
                d.state, d.error = "failed", "the main module is not in sys.modules"
                _notify(d)
            else:
                _install(d, module)
    if event == "return":
        for d in _take(lambda d: bool(d.wait_for) and d.file in (None, file)):
            d.state = "failed"
            d.error = f"the script's top level ended without defining {d.wait_for!r}"
            _notify(d)
        with _lock:
            if not any(d.wait_for for d in _pending):
                _disarm()
        return None
    return _main_line


def _module_of(names: dict[str, Any]) -> types.ModuleType | None:
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", None) is names:
            return module
    return None
