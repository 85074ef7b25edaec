"""A fork taken while another thread holds any lock of tracemark never hangs the child (issue 10).

Every lock of the package is named once, in :data:`LOCKS`, by where it lives. For each one a
thread holds it while the main thread forks; the child then probes a function, connects a
probe to a marker and fires it, records into a directory of its own and stops, stops the
recording it inherited from the parent, and exits 0. The parent kills a child that has not
ended within :data:`TIMEOUT` (the test fails) and reads both recordings back.

:func:`test_every_lock_of_the_package_is_listed` walks every lock reachable from tracemark's
modules, classes and live objects: a lock added later without the fork-safe helper
(:mod:`tracemark._forksafe`), or without a line in :data:`LOCKS`, fails it.
"""

import gc
import importlib
import io
import os
import pkgutil
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import probe_shapes as shapes
import pytest

import tracemark
from tracemark import _forksafe, faults
from tracemark import probes as P
from tracemark.control import server as control_server
from tracemark.ctf import read_trace
from tracemark.env import PYBEHAVIOR
from tracemark.markers import registry
from tracemark.probes import recompile, sysmon

TIMEOUT = 20.0


class World:
    """What holds the package's locks in a running program: a recording, a printer, the
    probe mechanisms. Every lock getter in LOCKS takes one of these."""

    def __init__(self, directory: Path, uniq: str) -> None:
        self.uniq = uniq
        self.marker = tracemark.marker(f"{uniq}.m", who=str, i=int)
        self.printer = tracemark.Printer(io.StringIO())
        self.recording = tracemark.record(directory, f"{uniq}.*")
        self.marker("parent", 0)  # the forking thread has a channel in it at fork time
        self._mechanisms: dict[str, object] = {}

    def mechanism(self, name: str):
        """The mechanism ``name``, serving probes from now on where this Python has it."""
        if name == sysmon.NAME and not PYBEHAVIOR.sys_monitoring:
            found = self._mechanisms.setdefault(name, sysmon.SysMonitoring())  # listed only
        else:
            P._use(name)
            found = self._mechanisms[name] = P.mechanism()
        assert found.name == name
        return found

    def close(self) -> None:
        if self.recording.summary is None:
            self.recording.stop()
        P._use(None)  # back to this process's default mechanism


#: Every lock of the package, by where it lives: ``module.name`` or ``module.Class.attribute``.
LOCKS: dict[str, Callable[[World], object]] = {
    "tracemark.markers.registry._lock": lambda w: registry._lock,
    "tracemark.control.server._lock": lambda w: control_server._lock,
    "tracemark.faults._lock": lambda w: faults._lock,
    "tracemark.probes._lock": lambda w: P._lock,
    "tracemark.probes.deferred._lock": lambda w: P._deferred._lock,
    "tracemark.probes.sysmon.SysMonitoring._lock": lambda w: w.mechanism(sysmon.NAME)._lock,
    "tracemark.probes.recompile.Recompile._lock": lambda w: w.mechanism(recompile.NAME)._lock,
    "tracemark.tracers.printer.Printer._lock": lambda w: w.printer._lock,
    "tracemark.tracers.recording.consumer.Consumer.lock": lambda w: w.recording.consumer.lock,
    "tracemark.tracers.recording.session.Recording._reg_lock": lambda w: w.recording._reg_lock,
    "tracemark.tracers.recording.session.Recording._stop_lock": lambda w: w.recording._stop_lock,
}

#: Locks that need no reset in a fork child, and why.
NOT_A_MUTEX = {
    # The consumer's wake-up: held while the consumer has nothing to do, released by a
    # producer to wake it. Nobody waits on it but the consumer thread, which a fork child
    # does not have; the child's recording makes a new one with its new consumer.
    "tracemark.tracers.recording.consumer.Consumer._wakeup",
    # The demo program's own lock (the traced program's business, like any program's).
    "tracemark.demo.shop.PriceCache.lock",
}

#: The locks a fork child can actually be left with on this Python (sys.monitoring: 3.12+).
FORKED = [
    name
    for name in LOCKS
    if PYBEHAVIOR.sys_monitoring or name != "tracemark.probes.sysmon.SysMonitoring._lock"
]


@pytest.fixture
def world(tmp_path, uniq):
    w = World(tmp_path / "parent", uniq)
    try:
        yield w
    finally:
        w.close()


def _held_by_another_thread(lock):
    """Hold ``lock`` in a new thread until the returned event is set; returns (event, thread)."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(2 * TIMEOUT)

    t = threading.Thread(target=holder, name="lock-holder")
    t.start()
    assert held.wait(10)
    return release, t


def _fork(child: Callable[[], None], errors: Path) -> int:
    """Run ``child()`` in a fork child; its exit status, 124 if it outlived TIMEOUT (killed).
    A child that raises writes its traceback to ``errors`` and exits 1."""
    with warnings.catch_warnings():
        # 3.12+ warns that forking a process with threads may deadlock the child: making sure
        # it does not is the point here.
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            errors.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 124


def _in_the_child(w: World, out: Path) -> None:
    """Probe, connect, fire, record, report a fault: each of these takes locks of the list."""
    h = tracemark.probe("probe_shapes:plain")
    child = tracemark.marker(f"{w.uniq}.child", i=int)
    with (
        tracemark.record(out, [f"{w.uniq}.child", h.name]) as rec,
        tracemark.connect(f"{w.uniq}.child", w.printer),
    ):
        child(1)
        w.marker("child", 1)  # the inherited recording: a new channel in the child
        assert shapes.plain(1, 2) == 3
    assert (rec.summary.recorded, rec.summary.discarded, rec.summary.lost) == (2, 0, 0)
    tracemark.unprobe(h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", faults.TracemarkWarning)
        faults.report("test-fork", w.uniq, "reported in the child")
    assert faults.counts()["test-fork", w.uniq] == 1
    assert f"{w.uniq}.child: i=1" in w.printer.file.getvalue()
    w.recording.stop()  # its stop lock and consumer lock, as a child's exit does


@pytest.mark.parametrize("where", FORKED)
def test_a_fork_child_runs_while_another_thread_holds_the_lock(world, where, tmp_path):
    lock = LOCKS[where](world)
    out, errors = tmp_path / "child", tmp_path / "child-error.txt"
    release, holder = _held_by_another_thread(lock)
    try:
        status = _fork(lambda: _in_the_child(world, out), errors)
    finally:
        release.set()
        holder.join()
    failure = errors.read_text() if errors.exists() else ""
    assert status != 124, f"the fork child hung while another thread held {where}"
    assert status == 0, failure

    evs = list(read_trace(out).events())
    assert len({ev.pid for ev in evs}) == 1 and evs[0].pid != os.getpid()
    child_pid = evs[0].pid
    assert [ev.name for ev in evs] == [f"{world.uniq}.child", "probe.probe_shapes.plain.entry"]
    assert evs[0].fields == {"i": 1}
    assert (evs[1].fields["a"], evs[1].fields["b"]) == (1, 2)  # captured values keep their type
    world.marker("parent", 2)
    world.recording.stop()
    me, u = os.getpid(), world.uniq
    inherited = [(ev.pid, ev.name, ev.fields) for ev in read_trace(tmp_path / "parent").events()]
    assert sorted(inherited, key=repr) == sorted(
        [
            (me, f"{u}.m", {"who": "parent", "i": 0}),
            (child_pid, f"{u}.child", {"i": 1}),
            (child_pid, f"{u}.m", {"who": "child", "i": 1}),
            (me, f"{u}.m", {"who": "parent", "i": 2}),
        ],
        key=repr,
    )


# --- the list is complete ----------------------------------------------------------------------

_LOCK_TYPES = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading._PyRLock,
    threading.Condition,
    threading.Semaphore,
    threading.Event,
    threading.Barrier,
)


def _tracemark_class(cls: type) -> type | None:
    """The first class of tracemark's in ``cls``'s MRO (a program may subclass Printer)."""
    for c in cls.__mro__:
        if c.__module__ == "tracemark" or c.__module__.startswith("tracemark."):
            return c
    return None


def _attributes(obj: object) -> list[tuple[str, object]]:
    """``obj``'s attributes (``__dict__`` and slots), with the items of those that are
    containers one level down."""
    found = []
    try:
        found += list(object.__getattribute__(obj, "__dict__").items())
    except (AttributeError, TypeError):
        pass
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            try:
                found.append((name, object.__getattribute__(obj, name)))
            except (AttributeError, TypeError):
                pass
    more = []
    for name, value in found:
        if isinstance(value, dict):
            more += [(f"{name}[]", v) for v in list(value.values())]
        elif isinstance(value, list | tuple | set | frozenset):
            more += [(f"{name}[]", v) for v in list(value)]
    return found + more


def _reachable_locks() -> dict[int, tuple[object, set[str]]]:
    """id -> (lock, the places it is found at): module globals, class attributes and the
    attributes of every live object of a tracemark class."""
    for info in pkgutil.walk_packages(tracemark.__path__, "tracemark."):
        if not info.name.endswith("__main__"):  # runs the command line
            importlib.import_module(info.name)
    gc.collect()
    found: dict[int, tuple[object, set[str]]] = {}

    def add(place: str, value: object) -> None:
        if isinstance(value, _LOCK_TYPES):
            found.setdefault(id(value), (value, set()))[1].add(place)

    for name, module in list(sys.modules.items()):
        if name != "tracemark" and not name.startswith("tracemark."):
            continue
        for attr, value in _attributes(module):
            add(f"{name}.{attr}", value)
            if isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    add(f"{name}.{value.__qualname__}.{cattr}", cvalue)
    for obj in gc.get_objects():
        if isinstance(obj, type | types.ModuleType):
            continue
        cls = _tracemark_class(type(obj))
        if cls is not None:
            for attr, value in _attributes(obj):
                add(f"{cls.__module__}.{cls.__qualname__}.{attr}", value)
    return found


def test_every_lock_of_the_package_is_listed(world):
    listed = {where: get(world) for where, get in LOCKS.items()}
    reachable = _reachable_locks()
    fork_safe = {id(lock) for lock in list(_forksafe._locks)}

    # Every lock anywhere in the package is in the list (or known not to need a reset).
    unknown = sorted(
        sorted(places)
        for _, places in reachable.values()
        if not places & (set(LOCKS) | NOT_A_MUTEX)
    )
    assert not unknown, f"locks not in LOCKS (make them with tracemark._forksafe): {unknown}"
    # Each listed lock lives where its name says, and is reset in a fork child.
    for where, lock in listed.items():
        assert where in reachable[id(lock)][1], (where, reachable[id(lock)][1])
        assert id(lock) in fork_safe, f"{where} is not made by tracemark._forksafe"
    # Every lock the helper resets is at a listed place (none hides in a closure or a local).
    for key in fork_safe:
        assert key in reachable and reachable[key][1] & set(LOCKS), reachable.get(key)
