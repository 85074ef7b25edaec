"""Task identity: which asyncio task fired an event, found on the firing path.

Every event inside an asyncio task shares its thread with every other task of that loop, so
the thread alone cannot say which request an event belongs to. The recorder writes a
``tracemark.task`` event (id, name: :data:`tracemark.ctf.writer.TASK_FIELDS`) before an
event whose task differs from the last one its channel recorded, like the kernel's
``sched_switch``; the layout, and why every packet is self-contained, is stated in
:mod:`tracemark.ctf.writer` ("Task identity").

The firing path (:mod:`.generated`) asks, per event::

    if _aio.running:                    # a loop runs on some thread of the process
        _loop = _aio.loop()             # asyncio's _get_running_loop(), a C call
        _task = _aio.task(_loop)        # asyncio.current_task(loop), a C call
        ...compared with the channel's last task (a weak reference); retask() if it differs
    elif _ch.intask:                    # the channel's last event was in a task
        _ch.retask(None)

Why this design
---------------
* **Outside asyncio it costs two attribute tests, no call.** Even a C call costs ~30 ns
  here, more than the budget (+25 ns per recorded event): so the question "is a loop
  running on this thread?" is only asked while some loop runs in the process.
  :attr:`_Asyncio.running` counts the threads running a loop: asyncio's own
  ``asyncio.events._set_running_loop``, which every ``BaseEventLoop`` calls (by its
  module attribute) when it starts and stops running, is wrapped to count them
  (:func:`install`, once per process, when the first recording starts).
* **asyncio is not imported for it.** ``import _asyncio`` imports the whole of asyncio
  (~30 ms), which a program that does not use it should not pay. If asyncio is not
  imported yet, :func:`install` leaves a finder on ``sys.meta_path`` that wraps
  ``asyncio.events`` right after it is executed, before any loop can run, and then
  removes itself. If asyncio was imported first, loops may already run on threads nobody
  can list: then the count is "unknown" for good, and every event asks (one C call, ~30-60
  ns more; measured in ``benchmarks/RESULTS.md``). Each new packet also checks that the
  wrap happened (an import that bypassed the finder: a task is then missed for at most
  the events of one packet).
* **Loops that do not call asyncio's ``_set_running_loop``** (a loop implementation that
  kept its own reference to the unwrapped function before the recording started) are
  seen as "unknown", like the above, when asyncio was imported first; if not, their tasks
  are not named: a limit, stated here.
* **Task ids are never reused.** ``id(task)`` is reused once a task is freed, and two tasks'
  tracks would merge; the id recorded is a serial number per process (:func:`task_info`),
  kept beside the task in a table keyed by ``id(task)`` whose entries leave with their task
  (a weak reference's callback). The channel holds the last task by a weak reference too:
  tracing does not keep a finished task (its result, its exception) alive.
* **Switches are the slow path** (:meth:`Channel.retask`): a dict look-up, the name, one
  ``struct.pack_into``. Many interleaved tasks pay it at each switch, measured as "a task
  switch before each event".
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import Any

from ..._forksafe import fork_safe_lock
from ...ctf import writer as W

__all__ = ["ASYNCIO", "NO_TASK", "TaskInfo", "install", "task_info"]


def NO_TASK() -> None:
    """What a channel outside every task holds as its last task's weak reference."""
    return None


#: ``_Asyncio.running`` when loops may run that were not counted: never falls to 0.
UNKNOWN = 1 << 60


class _Asyncio:
    """What the firing path reads (see the module docstring)."""

    __slots__ = ("loop", "running", "task")

    def __init__(self) -> None:
        #: Threads running an asyncio loop (UNKNOWN: not known). 0: no event is in a task.
        self.running = 0
        #: () -> this thread's running loop, or None (asyncio's ``_get_running_loop``).
        self.loop: Any = NO_TASK
        #: (loop) -> the loop's current task, or None (``asyncio.current_task``).
        self.task: Any = _arm_task


def _arm_task(loop: Any) -> Any:
    """``asyncio.current_task(loop)``, swapped in on first use: ``asyncio.tasks`` (which a
    running loop has imported) need not be imported when ``asyncio.events`` is wrapped."""
    tasks = sys.modules.get("asyncio.tasks")
    current = getattr(tasks, "current_task", None)
    if current is None or getattr(getattr(tasks, "__spec__", None), "_initializing", False):
        return None  # asyncio still importing (3.11-3.13 mark it so): no task can run yet
    ASYNCIO.task = current
    return current(loop)


ASYNCIO = _Asyncio()
_lock = fork_safe_lock()
_installed = False


def _count(delta: int) -> None:
    with _lock:
        ASYNCIO.running += delta


def _wrap(events: Any, known: bool) -> None:
    """Count the threads running a loop from now on, by wrapping ``events._set_running_loop``
    (looked up on the module by every ``BaseEventLoop`` when it starts and stops running).
    ``known``: no loop can be running yet (asyncio.events was only just executed)."""
    get, set_loop = events._get_running_loop, events._set_running_loop

    def _set_running_loop(loop: Any) -> None:
        before = get()
        if before is None and loop is not None:
            _count(1)  # counted before it runs: no event of the loop is missed
        set_loop(loop)
        if before is not None and loop is None:
            _count(-1)  # after it stopped

    _set_running_loop.__wrapped__ = set_loop  # type: ignore[attr-defined]
    _set_running_loop.__doc__ = set_loop.__doc__
    ASYNCIO.loop = get
    with _lock:
        if not known:
            ASYNCIO.running = UNKNOWN
    events._set_running_loop = _set_running_loop


class _Finder:
    """A ``sys.meta_path`` finder that only watches ``asyncio.events``: it lets the other
    finders find it, and wraps it right after it is executed (:func:`_wrap`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "asyncio.events":
            return None
        _remove_finder()
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is not None:
                spec = find(name, path, target)
                if spec is not None:
                    break
        loader = getattr(spec, "loader", None)
        execute = getattr(loader, "exec_module", None)
        if execute is None:
            return spec  # found in a way not to interfere with: counted "unknown" below

        def exec_module(module: Any) -> None:
            execute(module)
            _wrap(module, known=True)

        # The loader object is this module's own (path finders make one per module).
        loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec


_finder = _Finder()


def _remove_finder() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Count running loops from now on (see the module docstring); once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    events = sys.modules.get("asyncio.events")
    if events is not None:
        _wrap(events, known=False)
    else:
        sys.meta_path.insert(0, _finder)


def check() -> None:
    """Each new packet: if asyncio was imported without the finder wrapping it (another
    finder found it first), wrap it now, its loops counted as "unknown"."""
    if _installed and ASYNCIO.loop is NO_TASK:
        events = sys.modules.get("asyncio.events")
        if events is not None and not getattr(
            getattr(events, "__spec__", None), "_initializing", False
        ):
            _remove_finder()
            _wrap(events, known=False)


class TaskInfo:
    """What the recorder knows of one task: its serial id, its name as recorded, and a weak
    reference to it (what a channel compares the current task with)."""

    __slots__ = ("__weakref__", "id", "name", "name_bytes", "ref")

    def __init__(self, task: Any, serial: int) -> None:
        self.id = serial
        self.name = ""
        self.name_bytes = b""
        key = id(task)
        this = weakref.ref(self)

        def forget(_ref: Any) -> None:
            # Runs while the task is freed, before its id can be anyone else's.
            if _known.get(key) is this():
                _known.pop(key, None)

        self.ref = weakref.ref(task, forget)

    def name_of(self, task: Any) -> bytes:
        """The task's name as a packet stores it (renamed tasks are seen at their next
        switch)."""
        try:
            name = task.get_name()
        except Exception:  # a task subclass whose get_name raises: recorded without a name
            name = ""
        if name != self.name:
            self.name = name
            self.name_bytes = W.thread_name_bytes(str(name))
        return self.name_bytes


#: id(task) -> its TaskInfo, while the task lives.
_known: dict[int, TaskInfo] = {}
_serials = itertools.count(1)


def task_info(task: Any) -> TaskInfo:
    """The :class:`TaskInfo` of a live ``task``, made the first time it is seen."""
    info = _known.get(id(task))
    if info is None or info.ref() is not task:
        info = _known[id(task)] = TaskInfo(task, next(_serials))
    return info
