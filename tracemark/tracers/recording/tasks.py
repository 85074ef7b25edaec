"""Task identity: which asyncio task fired an event, found on the firing path.

Every event inside an asyncio task shares its thread with every other task of that loop, so
the thread alone cannot say which request an event belongs to. The recorder writes a
``tracemark.task`` event (id, name: :data:`tracemark.ctf.writer.TASK_FIELDS`) before an
event whose task differs from the last one its channel recorded, like the kernel's
``sched_switch``; the layout, and why every packet is self-contained, is stated in
:mod:`tracemark.ctf.writer` ("Task identity").

The firing path (:mod:`.generated`) asks, per event::

    _loop = _aio.loop()                 # a C call: None outside a running event loop
    if _loop is None:
        if _ch.intask: _ch.retask(None)
    else:
        _task = _aio.task(_loop)         # asyncio.current_task(loop), a C call
        ...compared with the channel's last task (a weak reference), retask() if it differs

Why this design
---------------
* **Outside asyncio it costs one C call and two tests** (measured in
  ``benchmarks/RESULTS.md``, "recorded marker" rows): no task is looked up, nothing is
  written. The alternatives cost more or see less: a task factory is per loop and replaced
  by programs that set their own; a ``ContextVar`` read is as dear and says nothing about
  which task; ``sys.monitoring``/``sys.setprofile`` on coroutine resumption taxes every
  await of the program, traced or not.
* **asyncio is not imported for it.** ``import _asyncio`` imports the whole of asyncio
  (~30 ms), which a program that does not use it should not pay when it starts a recording.
  Until asyncio is imported, :attr:`ASYNCIO.loop <_Asyncio.loop>` is a C call that looks
  ``asyncio.tasks`` up in ``sys.modules`` (as cheap as the real question: None means no
  loop can be running); the first event after asyncio's import swaps in
  ``asyncio.events._get_running_loop`` and ``asyncio.current_task`` (whichever, C or pure
  Python, asyncio itself uses), process-wide and once.
* **Task ids are never reused.** ``id(task)`` is reused once a task is freed, and two tasks'
  tracks would merge; the id recorded is a serial number per process (:func:`task_info`),
  kept beside the task in a table keyed by ``id(task)`` whose entries leave with their task
  (a weak reference's callback). The channel holds the last task by a weak reference too:
  tracing does not keep a finished task (its result, its exception) alive.
* **Switches are the slow path** (:meth:`Channel.retask`): a dict look-up, the name, one
  ``struct.pack_into``. Many interleaved tasks pay it at each switch, measured as "recorded
  marker in an asyncio task" with two tasks alternating.
"""

from __future__ import annotations

import functools
import itertools
import sys
import weakref
from typing import Any

from ...ctf import writer as W

__all__ = ["ASYNCIO", "NO_TASK", "TaskInfo", "task_info"]


def NO_TASK() -> None:
    """What a channel outside every task holds as its last task's weak reference."""
    return None


class _Asyncio:
    """The two questions the firing path asks, as attributes swapped once asyncio is
    imported (see the module docstring)."""

    __slots__ = ("loop", "task")

    def __init__(self) -> None:
        #: () -> the running loop, None outside one. Before asyncio is imported: the module
        #: ``asyncio.tasks`` or None (then :attr:`task` arms and answers).
        self.loop: Any = functools.partial(sys.modules.get, "asyncio.tasks")
        #: (loop) -> the loop's current task, None if it runs no task.
        self.task: Any = _arm


def _ready(module: Any) -> bool:
    """Whether ``module`` is imported whole (not still running its top level: importlib
    marks a module's spec ``_initializing`` meanwhile, 3.11 to 3.13)."""
    return module is not None and not getattr(
        getattr(module, "__spec__", None), "_initializing", False
    )


def _arm(_module: Any) -> Any:
    """The first question after asyncio is imported: swap in asyncio's own functions, then
    answer with them. While asyncio is only part-imported no loop can run: None."""
    events = sys.modules.get("asyncio.events")
    tasks = sys.modules.get("asyncio.tasks")
    if not (_ready(events) and _ready(tasks)):
        return None
    get_loop = events._get_running_loop
    current = tasks.current_task
    # loop first: a thread that read the old loop question and now asks the new task one
    # passes a module as the loop, which asyncio answers with None (no task): one event, once.
    ASYNCIO.loop = get_loop
    ASYNCIO.task = current
    loop = get_loop()
    return current(loop) if loop is not None else None


ASYNCIO = _Asyncio()


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
