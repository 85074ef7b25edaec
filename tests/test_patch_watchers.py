"""What the C core does for a patched function (tracemark/_speedups_patching.c, and
``_watch`` in tracemark/patching/patcher.py), stated as guarantees:

* a patched function keeps a specialisation version, so its callers' ``CALL`` stays
  specialised (3.13 clears it on every ``__code__`` assignment and never renews it);
* on 3.12+ a dictionary watcher on the module's globals stands in for the rebinding guard:
  the patched jump is bare, and the guard comes back, before the rebinding statement ends,
  when a watched name is rebound, deleted or the globals are cleared;
* where the watcher cannot see (3.11, the pure core, other globals running the same code, a
  name found in builtins) the guard stays.

Each program runs in a fresh interpreter, on the core under test.
"""

from __future__ import annotations

import dis
import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tracemark import env

WATCHERS = sys.version_info >= (3, 12)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C_BUILT = importlib.util.find_spec("tracemark._speedups") is not None

PRELUDE = """\
import dis, sys, tracemark
from tracemark.patching import patcher

def guarded(func):
    # A guarded jump's trampoline loads the marker's name again after the function's end.
    ins = list(dis.get_instructions(func))
    return any(i.opname.startswith("JUMP_BACKWARD") for i in ins)
"""


def _run(source: str, core: str) -> str:
    """Run the program from a file (the patcher reads the source of what it patches)."""
    env_ = {k: v for k, v in os.environ.items() if not k.startswith("TRACEMARK_")}
    env_["PYTHONPATH"] = ROOT
    if core == "python":
        env_["TRACEMARK_CORE"] = "python"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PRELUDE + textwrap.dedent(source))
    try:
        proc = _subprocess_run(f.name, env_)
    finally:
        os.unlink(f.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]  # nothing unraisable, not even at exit
    return proc.stdout


def _subprocess_run(path: str, env_: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, path],
        capture_output=True,
        text=True,
        env=env_,
        timeout=60,
    )


CORES = ["c", "python"] if C_BUILT else ["python"]


def _watched(core: str) -> bool:
    return WATCHERS and core == "c"


@pytest.mark.skipif(not C_BUILT, reason="the C core is not built (test_speedups says why)")
def test_a_patched_function_keeps_a_specialisation_version():
    out = _run(
        """
        import tracemark._speedups as s
        rx = tracemark.marker("w.v", "n=%d")
        def f(n):
            rx(n)
            return n
        def plain(n):
            return n
        tracemark.patch(f)
        plain.__code__ = plain.__code__.replace()
        for _ in range(100):  # warm: 3.11 and 3.12 give versions when a call specialises
            f(1); plain(1)
        print(s.function_version(f) != 0, s.function_version(plain) != 0)
        """,
        "c",
    )
    # 3.13 never renews a version after a plain __code__ assignment; the patch's does.
    assert out.split() == ["True", "False" if sys.version_info[:2] == (3, 13) else "True"]


@pytest.mark.parametrize("core", CORES)
def test_the_guard_is_dropped_only_where_a_watcher_sees_the_name(core):
    out = _run(
        """
        rx = tracemark.marker("w.g", "n=%d")
        def f(n):
            rx(n)
            return n
        tracemark.patch(f)
        print(guarded(f), f(3))
        """,
        core,
    )
    assert out.split() == [str(not _watched(core)), "3"]


@pytest.mark.parametrize("core", CORES)
def test_rebinding_deleting_and_clearing_bring_the_guard_back(core):
    out = _run(
        """
        rx = tracemark.marker("w.r", "n=%d")
        got = []
        def spy(n):
            got.append(n)
        def f(n):
            rx(n)
            return n
        tracemark.patch(f)
        f(1)
        rx = spy
        f(2)
        print(guarded(f), got)
        rx = tracemark.marker("w.r", "n=%d")  # the same marker again
        f(3)
        del rx
        try:
            f(4)
        except NameError:
            print("NameError")
        """,
        core,
    )
    assert out.splitlines() == ["True [2]", "NameError"]


@pytest.mark.parametrize("core", CORES)
def test_other_globals_of_the_module_do_not_disturb_the_watcher(core):
    out = _run(
        """
        rx = tracemark.marker("w.o", "n=%d")
        counter = 0
        def f(n):
            global counter
            rx(n)
            counter += 1
            return n
        tracemark.patch(f)
        for i in range(10_000):
            f(i)
        globals()["other"] = 1
        print(counter, guarded(f))
        """,
        core,
    )
    assert out.split() == ["10000", str(not _watched(core))]


@pytest.mark.parametrize("core", CORES)
def test_the_same_code_run_with_other_globals_keeps_its_guard(core):
    out = _run(
        """
        import types
        rx = tracemark.marker("w.x", "n=%d")
        def f(n):
            rx(n)
            return n
        tracemark.patch(f)
        got = []
        g = types.FunctionType(f.__code__, {"rx": got.append, "__builtins__": __builtins__})
        tracemark.patch(g)
        print(g(7), got, guarded(f), guarded(g))
        """,
        core,
    )
    assert out.split() == ["7", "[7]", "True", "True"]


@pytest.mark.parametrize("core", CORES)
def test_a_call_running_when_the_name_is_rebound(core):
    # The watcher's limit, documented in patcher.py: a call already running keeps the
    # code it started with (as after connect()); the guard saw the new name at once.
    out = _run(
        """
        rx = tracemark.marker("w.run", "n=%d")
        got = []
        def gen():
            global rx
            for i in range(3):
                rx(i)
                yield i
        tracemark.patch(gen)
        it = gen()
        next(it)
        rx = got.append
        list(it)
        list(gen())  # a call that starts after the rebinding calls the new object
        print(got)
        """,
        core,
    )
    assert out.strip() == ("[0, 1, 2]" if _watched(core) else "[1, 2, 0, 1, 2]")


@pytest.mark.parametrize("core", CORES)
def test_a_fork_child_sees_its_own_rebinding(core):
    out = _run(
        """
        import os
        rx = tracemark.marker("w.fork", "n=%d")
        got = []
        def f(n):
            rx(n)
            return n
        tracemark.patch(f)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            rx = got.append
            f(5)
            os.write(w, repr(got).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(r, 100).decode(), guarded(f) == (sys.version_info < (3, 12) or
              tracemark.env.core()[0] == "python"))
        """,
        core,
    )
    assert out.split() == ["[5]", "True"]


def test_the_benchmark_case_with_the_watcher_is_the_bare_jump():
    """The patched case of benchmarks/bench_jumps.py on this core: bare jump where watched."""
    from benchmarks import _jump_cases as cases

    cases._prepare()
    bare = not any(
        i.opname.startswith("JUMP_BACKWARD") for i in dis.get_instructions(cases.patched)
    )
    assert bare == (WATCHERS and env.core()[0] == "c")
    assert any(i.opname.startswith("JUMP_BACKWARD") for i in dis.get_instructions(cases.rebound))
