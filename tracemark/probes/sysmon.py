"""The ``sys.monitoring`` mechanism (PEP 669, Python 3.12+).

Guarantees
----------
* **One tool id** for all of tracemark, taken on first use among the free ids 3, 4, 5 and
  then 2 (``sys.monitoring.PROFILER_ID``, which cProfile takes). Ids 0 (debuggers) and 1
  (coverage.py) are never used, so pdb and ``coverage run`` keep working beside probes. When
  the last probe is removed, the id is given back with no event or callback left behind.
* **Local events only on probed code**: ``set_local_events`` on each probed code object,
  with the union of what the enabled probes on it need (``PY_START`` for entry and for return
  durations, ``PY_RETURN``, ``LINE``). Every other code object runs exactly as before.
* **Raise probes** need ``PY_UNWIND``, which ``sys.monitoring`` only has as a global event:
  it is switched on while at least one raise probe is enabled, and its callback returns at
  once for code that is not probed. So, while a raise probe is enabled, every exception
  leaving any function costs one callback; nothing else does.
* **Line events** of lines nobody probes are returned ``DISABLE`` (per location, for our
  tool only); enabling a line probe calls ``sys.monitoring.restart_events()`` so that a line
  disabled earlier fires again. (That restarts other tools' disabled events too: coverage.py
  then sees those lines once more, which it ignores.)
* **Span probes** (``@span`` on a function) use ``PY_START`` for the begin, ``PY_RETURN``
  and ``PY_UNWIND`` for the end: so while one is enabled, like a raise probe, every exception
  leaving any function costs one callback.
* Callbacks fan out internally through dicts that are replaced, never mutated, so a thread
  in a callback sees the old set of probes or the new one.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from .._forksafe import fork_safe_rlock
from ..markers.span import end_raising
from .events import Probe

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["NAME", "SysMonitoring"]

NAME = "sys.monitoring"
_PREFERRED_IDS = (3, 4, 5, 2)

_mon: Any = getattr(sys, "monitoring", None)


class SysMonitoring:
    """Probes served by ``sys.monitoring`` events."""

    name = NAME

    def __init__(self) -> None:
        self._lock = fork_safe_rlock()
        self.tool: int | None = None
        self._enabled: list[Probe] = []
        self._installed = 0
        # code -> probes, per kind of event; replaced whole on every change.
        self._start: dict[types.CodeType, Callable[[], object]] = {}
        self._return: dict[types.CodeType, Callable[[object], object]] = {}
        self._line: dict[types.CodeType, dict[int, tuple[Probe, ...]]] = {}
        self._unwind: dict[types.CodeType, tuple[Probe, ...]] = {}
        self._c_start: Any = None  # the C core's PY_START callback, when in use

    # --- the tool id ---------------------------------------------------------------------------

    def _take_tool(self) -> None:
        if self.tool is not None:
            return
        for tool in _PREFERRED_IDS:
            if _mon.get_tool(tool) is None:
                _mon.use_tool_id(tool, "tracemark")
                break
        else:
            users = ", ".join(f"{i}: {_mon.get_tool(i)}" for i in range(6))
            raise RuntimeError(
                f"cannot install a probe: every sys.monitoring tool id is taken ({users})"
            )
        self.tool = tool
        ev = _mon.events
        _mon.register_callback(tool, ev.PY_START, self._start_callback())
        _mon.register_callback(tool, ev.PY_RETURN, self._on_return)
        _mon.register_callback(tool, ev.LINE, self._on_line)
        _mon.register_callback(tool, ev.PY_UNWIND, self._on_unwind)

    def _start_callback(self) -> Callable[[types.CodeType, int], object]:
        """``_on_start``, or in front of it the C core's callback, which records the entry
        probes that have a C path itself (tracemark/_speedups_probes.c) and calls
        ``_on_start`` for everything else (and whatever it declines)."""
        from .. import env

        speedups: Any = env.speedups()
        self._c_start = None
        if speedups is not None and hasattr(speedups, "StartCallback"):
            self._c_start = speedups.StartCallback(self._on_start)
            return self._c_start
        return self._on_start

    def _free_tool(self) -> None:
        tool, self.tool = self.tool, None
        if tool is None:
            return
        self._c_start = None
        ev = _mon.events
        _mon.set_events(tool, 0)
        for event in (ev.PY_START, ev.PY_RETURN, ev.LINE, ev.PY_UNWIND):
            _mon.register_callback(tool, event, None)
        _mon.free_tool_id(tool)

    # --- what the registry asks ----------------------------------------------------------------

    def check(self, probe: Probe) -> None:
        """Raise if ``probe`` cannot be served (no free tool id); changes no code."""
        with self._lock:
            self._take_tool()

    def abandon(self) -> None:
        """A checked probe was not installed after all: give the tool id back if unused."""
        with self._lock:
            if not self._installed:
                self._free_tool()

    def install(self, probe: Probe) -> None:
        with self._lock:
            self._take_tool()
            self._installed += 1

    def remove(self, probe: Probe) -> None:
        with self._lock:
            self._installed -= 1
            if not self._installed:
                self._free_tool()

    def enable(self, probe: Probe) -> None:
        with self._lock:
            self._enabled.append(probe)
            self._publish(restart=probe.at == "line")

    def disable(self, probe: Probe) -> None:
        with self._lock:
            self._enabled.remove(probe)
            self._publish(restart=False)
            probe.forget_frames()

    def _publish(self, restart: bool) -> None:
        starting: dict[types.CodeType, tuple[Probe, ...]] = {}
        ret: dict[types.CodeType, tuple[Probe, ...]] = {}
        line: dict[types.CodeType, dict[int, tuple[Probe, ...]]] = {}
        unwind: dict[types.CodeType, tuple[Probe, ...]] = {}
        # Span probes first, the outermost decorator first: their ends run in reverse.
        for p in sorted(self._enabled, key=lambda p: -p.order):
            if p.at in ("entry", "return", "span"):
                starting[p.code] = (*starting.get(p.code, ()), p)
            if p.at in ("return", "span"):
                ret[p.code] = (*ret.get(p.code, ()), p)
                unwind[p.code] = (*unwind.get(p.code, ()), p)  # forget the start time
            elif p.at == "line":
                lines = line.setdefault(p.code, {})
                lines[p.line] = (*lines.get(p.line, ()), p)  # type: ignore[index]
            elif p.at == "raise":
                unwind[p.code] = (*unwind.get(p.code, ()), p)
        start = {code: _start_handler(probes) for code, probes in starting.items()}
        returning = {code: _return_handler(probes) for code, probes in ret.items()}
        ev = _mon.events
        wanted: dict[types.CodeType, int] = {}
        for code in start:
            wanted[code] = wanted.get(code, 0) | ev.PY_START
        for code in ret:
            wanted[code] = wanted.get(code, 0) | ev.PY_RETURN
        for code in line:
            wanted[code] = wanted.get(code, 0) | ev.LINE
        before = set(self._start) | set(self._return) | set(self._line) | set(self._unwind)
        # Publish the new tables before switching events on, and switch events off before
        # dropping code from the tables: a callback never finds its code missing by surprise.
        self._start, self._return = start, returning
        if self._c_start is not None:  # code whose only probe has a C path
            fast = {c: ps[0].c_entry for c, ps in starting.items() if len(ps) == 1}
            self._c_start.set_table({c: e for c, e in fast.items() if e is not None})
        self._line, self._unwind = line, unwind
        tool = self.tool
        for code in before - set(wanted):
            _mon.set_local_events(tool, code, 0)
        for code, events in wanted.items():
            _mon.set_local_events(tool, code, events)
        raising = any(p.at in ("raise", "span") for p in self._enabled)
        _mon.set_events(tool, ev.PY_UNWIND if raising else 0)
        if restart:
            _mon.restart_events()

    def serves(self, code: types.CodeType) -> int:
        """The local events this mechanism has switched on for ``code`` (for tests)."""
        return 0 if self.tool is None else _mon.get_local_events(self.tool, code)

    # --- callbacks -----------------------------------------------------------------------------

    def _on_start(self, code: types.CodeType, offset: int) -> None:
        handler = self._start.get(code)
        if handler is not None:
            handler()

    def _on_return(self, code: types.CodeType, offset: int, value: object) -> None:
        handler = self._return.get(code)
        if handler is not None:
            handler(value)

    def _on_line(self, code: types.CodeType, line: int) -> Any:
        lines = self._line.get(code)
        if lines is None:
            return _mon.DISABLE
        probes = lines.get(line)
        if probes is None:
            return _mon.DISABLE
        frame = sys._getframe(1)
        for p in probes:
            p.on_line(frame)
        return None

    def _on_unwind(self, code: types.CodeType, offset: int, exc: BaseException) -> None:
        probes = self._unwind.get(code)
        if probes:
            frame = sys._getframe(1)
            for p in reversed(probes):  # reversed: spans end innermost first
                if p.at == "raise":
                    p.on_raise(frame, exc)
                elif p.at == "span":
                    end_raising(p.end_now, exc)  # so a tracer can tell the span failed
                else:
                    p._starts.pop(id(frame), None)


def _start_handler(probes: tuple[Probe, ...]) -> Callable[[], object]:
    """What ``PY_START`` of one code object runs: as little as its probes need.

    Entry probes that capture nothing fire their marker straight away; only probes that read
    locals or time the call take the frame (``sys._getframe`` makes a frame object, which
    costs more than all the rest).
    """
    if all(p.at in ("entry", "span") and not p.capture for p in probes):
        fires = tuple(p.core.fire for p in probes)  # type: ignore[union-attr]
        if len(fires) == 1:
            return fires[0]

        def fire_all() -> None:
            for fire in fires:
                fire()

        return fire_all
    if len(probes) == 1:  # the emitter finds the frame itself: 0 emit, 1 callback, 2 probed
        p = probes[0]
        return p.emit_caller if p.at in ("entry", "span") else p.start_caller
    calls = tuple(p.start if p.at == "return" else p.emit_frame for p in probes)
    getframe = sys._getframe

    def with_frame() -> None:
        frame = getframe(2)  # 0: this, 1: the PY_START callback, 2: the probed frame
        for call in calls:
            call(frame)

    return with_frame


def _return_handler(probes: tuple[Probe, ...]) -> Callable[[object], object]:
    """What ``PY_RETURN`` of one code object runs: its return probes' emitters."""
    if len(probes) == 1:
        return probes[0].return_caller  # 0: the emitter, 1: the callback, 2: the probed frame
    emits = tuple(p.emit_return for p in reversed(probes))  # spans end innermost first
    getframe = sys._getframe

    def each(value: object) -> None:
        frame = getframe(2)  # 0: this, 1: the PY_RETURN callback, 2: the probed frame
        for emit in emits:
            emit(frame, value)

    return each
