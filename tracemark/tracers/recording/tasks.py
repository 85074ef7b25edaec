"""Task identity: which asyncio task fired an event, found on the firing path.

Every event inside an asyncio task shares its thread with every other task of that loop, so
the thread alone cannot say which request an event belongs to. The recorder writes a
``tracemark.task`` event (id, name: :data:`tracemark.ctf.writer.TASK_FIELDS`) before an
event whose task differs from the last one its channel recorded, like the kernel's
``sched_switch``; the layout, and why every packet is self-contained, is stated in
:mod:`tracemark.ctf.writer` ("Task identity").

The firing path (:mod:`.generated`) asks, per event::

    _loop = _ch.loop.running            # this thread's running loop: two attribute loads
    if _loop is None:
        if _ch.intask: _ch.retask(None) # the channel's last event was in a task
    else:
        _task = _aio.task(_loop)        # asyncio.current_task(loop), a C call
        ...compared with the channel's last task (a weak reference); retask() if it differs

Why this design
---------------
* **Outside asyncio it costs attribute loads and tests, no call** (+4 to +15 ns per
  recorded event, medians of paired runs in ``benchmarks/RESULTS.md``). Even a C call costs
  ~30 ns on this machine, more than the budget (+25 ns per recorded event), and asyncio's
  ``_get_running_loop()`` costs far more inside a loop (3.11 makes a ``getpid()`` system
  call each time, to notice forks). So the recorder keeps its own per-thread record of the
  running loop: a :class:`_Slot` per thread (by thread ident), which each channel
  holds (``Channel.loop``, taken when it is made, adopted, and at each new packet).
  asyncio's own ``asyncio.events._set_running_loop``, which every ``BaseEventLoop`` calls
  by its module attribute when it starts and stops running, is wrapped to keep the slot
  of its thread up to date (:func:`install`, once per process, when the first recording
  starts; the wrap stays: one Python call per loop start and stop).
* **asyncio is not imported for it.** ``import _asyncio`` imports the whole of asyncio
  (~30 ms), which a program that does not use it should not pay. If asyncio is not
  imported yet, :func:`install` leaves a finder on ``sys.meta_path`` that wraps
  ``asyncio.events`` right after it is executed, before any loop can run, and then
  removes itself. If asyncio was imported first, the thread that starts the recording asks
  asyncio once whether it runs a loop; but a loop may already run on another thread that
  existed then, unseen: the channels of those threads (only) read an object whose
  ``running`` asks asyncio each time (a Python property and a C call more per event), until
  the thread starts a loop the wrap sees. Threads started later are always seen. Each new
  packet also checks that the wrap happened (an import that bypassed the finder: a task is
  then missed for at most the events of one packet).
* **A limit:** a loop implementation that does not call ``asyncio.events._set_running_loop``
  by the module's attribute when it runs (one that kept its own reference to the function
  before the wrap) is not seen, and events in its tasks are recorded without a task, unless
  its thread is one that asks (above).
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
import threading
import weakref
from typing import Any

from ...ctf import writer as W
from ...markers.dispatch import current_frames

__all__ = ["ASYNCIO", "NO_TASK", "TaskInfo", "install", "task_info", "thread_slot"]


def NO_TASK() -> None:
    """What a channel outside every task holds as its last task's weak reference."""
    return None


class _Asyncio:
    """What the firing path reads (see the module docstring)."""

    __slots__ = ("loop", "task")

    def __init__(self) -> None:
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
_installed = False


class _Slot:
    """One thread's running loop, as the wrapped ``_set_running_loop`` saw it."""

    __slots__ = ("running",)

    def __init__(self, running: Any = None) -> None:
        self.running = running


class _Ask:
    """The slot of a thread that may run a loop nobody saw start: asks asyncio each time."""

    __slots__ = ()

    @property
    def running(self) -> Any:
        return ASYNCIO.loop()


_ASK = _Ask()
#: Thread ident -> its slot (a _Slot, or _ASK). Idents are reused by later threads: a slot
#: left says "no loop" (threads end after their loop stops) or asks; both stay right.
_slots: dict[int, Any] = {}
#: Threads alive when asyncio was found already imported: they may run a loop unseen.
_unseen: frozenset[int] = frozenset()


def thread_slot() -> Any:
    """What a channel of the calling thread reads its running loop from (``.running``)."""
    ident = threading.get_ident()
    slot = _slots.get(ident)
    if slot is None:
        slot = _slots[ident] = _ASK if ident in _unseen else _Slot()
    return slot


def _wrap(events: Any, known: bool) -> None:
    """Keep each thread's slot up to date from now on, by wrapping
    ``events._set_running_loop`` (looked up on the module by every ``BaseEventLoop`` when it
    starts and stops running). ``known``: no loop can be running yet (asyncio.events was
    only just executed); otherwise the threads alive now may run loops unseen."""
    global _unseen
    set_loop = events._set_running_loop

    def _set_running_loop(loop: Any) -> None:
        set_loop(loop)
        ident = threading.get_ident()
        slot = _slots.get(ident)
        if type(slot) is _Slot:
            slot.running = loop
        else:  # new, or a thread that may have run a loop unseen: it is seen now
            _slots[ident] = _Slot(loop)

    _set_running_loop.__wrapped__ = set_loop  # type: ignore[attr-defined]
    _set_running_loop.__doc__ = set_loop.__doc__
    get = ASYNCIO.loop = events._get_running_loop
    if not known:
        me = threading.get_ident()
        alive = {t.ident for t in threading.enumerate()} | set(current_frames())
        _unseen = frozenset(alive - {me})
        for ident in _unseen:
            _slots[ident] = _ASK
        _slots[me] = _Slot(get())  # this thread: asked once
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
            return spec  # loaded in a way not to interfere with: check() wraps it later

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
    """Follow running loops from now on (see the module docstring); once per process."""
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
    finder found it first), wrap it now, as when asyncio was imported first."""
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
