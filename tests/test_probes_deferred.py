"""``--probe`` on the program's own code and on modules imported later (deferred probes), the
check before the program runs, and what the summary says about probes never installed.

Real ``tracemark record`` runs on small programs written to tmp_path, read back with
``read_trace``; each runs under every probe mechanism this Python has (TRACEMARK_PROBES).
"""

import importlib
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import MECHANISMS

import tracemark
from tracemark import probes as P
from tracemark.ctf import read_trace
from tracemark.probes import deferred as D

ROOT = Path(tracemark.__file__).resolve().parents[1]

APP = """\
import sys

import helper


def main(n):
    total = n + 1
    return helper.double(total)


class Shop:
    def buy(self, item, qty=1):
        price = len(item) * qty
        return price


if __name__ == "__main__":
    open("ran", "w").close()
    main(4)
    Shop().buy("tea", qty=3)
    if "--late" in sys.argv:
        import late

        late.work(7)
"""

HELPER = """\
def double(x):
    return 2 * x
"""

LATE = """\
import os


def work(k):
    seen = k * 10
    return seen


broken = len  # bound by assignment: the check before the run cannot see it is not Python
"""


@pytest.fixture
def app(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "helper.py").write_text(HELPER)
    (tmp_path / "late.py").write_text(LATE)
    return tmp_path


def record(cwd, *args, mech=None, program=("app.py",)):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mech:
        env["TRACEMARK_PROBES"] = mech
    return subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", "trace", *args, "--"]
        + [sys.executable, *program],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def events(cwd):
    return [(e.name, e.fields, e.pid) for e in read_trace(str(cwd / "trace")).events()]


def line_of(path, text):
    return next(n for n, t in enumerate(Path(path).read_text().splitlines(), 1) if text in t)


# --- the program's own code --------------------------------------------------------------


@pytest.mark.parametrize("mech", MECHANISMS)
def test_main_functions_and_methods_are_probed(app, mech):
    proc = record(app, "--probe", "__main__:main", "--probe", "__main__:Shop.buy%return", mech=mech)
    assert proc.returncode == 0, proc.stderr
    got = [(n, f) for n, f, _ in events(app)]
    assert ("probe.__main__.main.entry", {"n": 4}) in got
    ret = next(f for n, f in got if n == "probe.__main__.Shop.buy.return")
    assert ret["value"] == 9 and ret["duration_ns"] >= 0
    assert "never installed" not in proc.stderr


@pytest.mark.parametrize("mech", MECHANISMS)
def test_script_paths_relative_and_absolute_lines_and_functions(app, mech):
    line = line_of(app / "app.py", "price = len(item)")
    proc = record(
        app,
        "--probe",
        "app.py:main{n}",
        "--probe",
        f"{app / 'app.py'}:{line}{{item,qty}}",
        "--probe",
        "helper.py:double%return",
        mech=mech,
    )
    assert proc.returncode == 0, proc.stderr
    got = [(n, f) for n, f, _ in events(app)]
    assert ("probe.__main__.main.entry", {"n": 4}) in got
    assert (f"probe.__main__.Shop.buy.line{line}", {"item": "tea", "qty": 3}) in got
    assert any(n == "probe.helper.double.return" and f["value"] == 10 for n, f in got)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_python_dash_m_module_is_main(app, mech):
    pkg = app / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text(
        "def run(x):\n    return x + 1\n\n\nif __name__ == '__main__':\n    run(41)\n"
    )
    proc = record(app, "--probe", "__main__:run%return", mech=mech, program=("-m", "pkg.tool"))
    assert proc.returncode == 0, proc.stderr
    got = [(n, f["value"]) for n, f, _ in events(app) if n.endswith(".return")]
    assert got == [("probe.__main__.run.return", 42)]


@pytest.mark.parametrize("mech", MECHANISMS)
def test_a_module_imported_later_gets_its_deferred_probe(app, mech):
    line = line_of(app / "late.py", "return seen")
    proc = record(
        app,
        "--probe",
        "late:work",
        "--probe",
        f"late.py:{line}{{seen}}",  # a file, not the script: imported later too
        mech=mech,
        program=("app.py", "--late"),
    )
    assert proc.returncode == 0, proc.stderr
    assert [(n, f) for n, f, _ in events(app)] == [
        ("probe.late.work.entry", {"k": 7}),
        (f"probe.late.work.line{line}", {"seen": 70}),
    ]


# --- checked before the program runs ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("__main__:mian", "defines no function 'mian'; did you mean 'main'?"),
        ("__main__:Shop.by", "did you mean 'Shop.buy'?"),
        ("app.py:2", "line 2 has no code inside a function"),
        ("app.py:main{totl}", "'totl' is not a local variable of main"),
        ("helpr:double", "there is no module named 'helpr'; did you mean 'helper'?"),
        ("helper:doubel", "did you mean 'double'?"),
        ("json.decodr:x", "did you mean 'json.decoder'"),
        ("nope.py:3", "there is no file 'nope.py'"),
    ],
)
def test_a_probe_that_cannot_exist_fails_before_the_program_runs(app, spec, says):
    proc = record(app, "--probe", spec)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "--probe-optional" in proc.stderr
    assert not (app / "ran").exists()  # the program never started
    assert not (app / "trace").exists()  # and nothing was created


def test_checking_does_not_import_the_probed_package(app):
    pkg = app / "noisy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("open('imported', 'w').close()\n")
    (pkg / "mod.py").write_text("def f():\n    pass\n")
    proc = record(app, "--probe", "noisy.mod:g")
    assert proc.returncode == 2 and "defines no function 'g'" in proc.stderr
    assert not (app / "imported").exists()


def test_probe_optional_warns_runs_and_the_summary_says_why(app):
    proc = record(app, "--probe-optional", "--probe", "__main__:mian", "--probe", "__main__:main")
    assert proc.returncode == 0, proc.stderr
    assert (app / "ran").exists()
    assert "warning: --probe __main__:mian: cannot probe" in proc.stderr  # before it ran
    assert re.search(
        r"WARNING: --probe __main__:mian was never installed: the script's top level ended "
        r"without defining 'mian'",
        proc.stderr,
    )
    assert [n for n, _, _ in events(app)] == ["probe.__main__.main.entry"]


def test_summary_lists_deferred_probes_never_installed_and_failed(app):
    # late is never imported (no --late); late:broken passes the static check (bound by an
    # assignment) and fails when late is imported by the second run: the import works.
    proc = record(app, "--probe", "late:work")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: --probe late:work was never installed: module 'late' was never imported" in (
        proc.stderr
    )
    (app / "trace").rename(app / "trace1")
    proc = record(
        app, "--probe", "late:broken", "--probe", "late:work", program=("app.py", "--late")
    )
    assert proc.returncode == 0, proc.stderr  # the import of late succeeded, work(7) ran
    assert re.search(
        r"WARNING: --probe late:broken was never installed: .*without Python bytecode", proc.stderr
    )
    assert "late:work was never installed" not in proc.stderr
    assert [n for n, _, _ in events(app)] == ["probe.late.work.entry"]


def test_summary_columns_stay_aligned_with_long_probe_names(app):
    # A name longer than 50 characters (a probe's are: module, class, method, "entry") used
    # to push its count out of the column: the width was capped at 50.
    (app / "long.py").write_text(
        "import tracemark\n\n"
        "class AVeryLongClassNameForAProbeTargetThatIsLong:\n"
        "    def an_equally_long_method_name_to_probe(self):\n        return 1\n\n"
        "short = tracemark.marker('app.short')\n"
        "wordy = tracemark.marker('app.' + 'a_marker_name_well_beyond_fifty_characters_' * 2)\n"
        "for _ in range(3):\n"
        "    AVeryLongClassNameForAProbeTargetThatIsLong().an_equally_long_method_name_to_probe()\n"
        "    short()\n"
        "wordy()\n"
    )
    long = (
        "__main__:AVeryLongClassNameForAProbeTargetThatIsLong.an_equally_long_method_name_to_probe"
    )
    proc = record(app, "--probe", long, program=("long.py",))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stderr.splitlines() if re.match(r"  \S+ +\d+$", line)]
    assert max(len(r.split()[0]) for r in rows) > 60, proc.stderr
    assert len({len(r) for r in rows}) == 1, rows  # the counts end in one column
    assert sorted(r.split()[0] for r in rows) == [
        "app." + "a_marker_name_well_beyond_fifty_characters_" * 2,
        "app.short",
        "probe.__main__.AVeryLongClassNameForAProbeTargetThatIsLong."
        "an_equally_long_method_name_to_probe.entry",
    ]


# --- child processes ------------------------------------------------------------------------

CHILDREN = """\
import multiprocessing as mp
import sys


def in_child(tag):
    import late

    late.work(len(tag))


if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        p = mp.get_context(method).Process(target=in_child, args=(method,))
        p.start()
        p.join()
        assert p.exitcode == 0
"""


@pytest.mark.parametrize("mech", MECHANISMS)
def test_fork_spawn_and_forkserver_children_get_main_and_deferred_probes(app, mech):
    (app / "kids.py").write_text(CHILDREN)
    proc = record(
        app,
        "--probe",
        "__main__:in_child",
        "--probe",
        "late:work%return",
        mech=mech,
        program=("kids.py",),
    )
    assert proc.returncode == 0, proc.stderr
    got = events(app)
    entries = {f["tag"]: pid for n, f, pid in got if n == "probe.__main__.in_child.entry"}
    returns = {pid: f["value"] for n, f, pid in got if n == "probe.late.work.return"}
    assert set(entries) == {"fork", "spawn", "forkserver"}
    assert returns == {entries["fork"]: 40, entries["spawn"]: 50, entries["forkserver"]: 100}
    assert "never installed" not in proc.stderr


# --- the API: tracemark.probe(..., defer=True) -----------------------------------------------


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A directory on sys.path for modules made by a test; they are forgotten after it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for d in D.deferred():
        P.unprobe(d)
    for name in set(sys.modules) - before:
        del sys.modules[name]
    assert D._finder not in sys.meta_path


def test_deferred_api_installs_on_import_and_removes_its_hook(modules, mech, rec, uniq):
    (modules / f"{uniq}a.py").write_text("def f(x):\n    return x\n")
    d = tracemark.probe(f"{uniq}a:f", defer=True)
    assert isinstance(d, tracemark.DeferredProbe) and d.state == "pending"
    assert D._finder in sys.meta_path
    module = importlib.import_module(f"{uniq}a")
    assert d.state == "installed" and isinstance(d.probe, tracemark.Probe)
    assert D._finder not in sys.meta_path  # nothing pending: imports cost nothing more
    assert type(module.__loader__).__name__ == "SourceFileLoader"  # its own loader
    assert module.__spec__.loader is module.__loader__
    tracemark.connect(d.probe.name, rec)
    module.f(5)
    assert rec.events == [(f"probe.{uniq}a.f.entry", (5,))]
    assert tracemark.unprobe(d) and d.probe.installed is False


def test_a_loaded_module_is_probed_at_once(mech):
    h = tracemark.probe("json:loads", defer=True)
    assert isinstance(h, tracemark.Probe) and h.installed
    tracemark.unprobe(h)


def test_a_failure_never_breaks_the_import_and_is_a_counted_fault(modules, uniq):
    (modules / f"{uniq}b.py").write_text("g = len\n\ndef f():\n    return 1\n")
    bad = tracemark.probe(f"{uniq}b:g", defer=True)
    ok = tracemark.probe(f"{uniq}b:f", at="return", defer=True)
    with pytest.warns(tracemark.faults.TracemarkWarning, match="without Python bytecode"):
        module = importlib.import_module(f"{uniq}b")
    assert module.f() == 1
    assert bad.state == "failed" and "without Python bytecode" in bad.error
    assert ok.state == "installed"
    assert tracemark.faults.counts()[("probe", f"{uniq}b:g")] == 1


def test_an_import_that_raises_keeps_the_probe_pending(modules, uniq):
    path = modules / f"{uniq}c.py"
    path.write_text("raise ImportError('not today')\n")
    d = tracemark.probe(f"{uniq}c:f", defer=True)
    with pytest.raises(ImportError, match="not today"):
        importlib.import_module(f"{uniq}c")
    assert d.state == "pending"
    path.write_text("def f():\n    return 2\n")
    importlib.invalidate_caches()
    sys.modules.pop(f"{uniq}c", None)
    importlib.import_module(f"{uniq}c")
    assert d.state == "installed"


def test_cancel_a_pending_probe(modules, uniq):
    d = tracemark.probe(f"{uniq}d:f", defer=True)
    assert tracemark.unprobe(d) and d.state == "cancelled"
    assert D._finder not in sys.meta_path and not tracemark.unprobe(d)


def test_threads_importing_at_once_install_each_probe_once(modules, mech, rec, uniq):
    names = [f"{uniq}t{i}" for i in range(4)]
    for name in names:
        (modules / f"{name}.py").write_text("import time\ntime.sleep(0.01)\ndef f():\n    pass\n")
    handles = [tracemark.probe(f"{n}:f", defer=True) for n in names]
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        importlib.import_module(names[i % 4])  # two threads per module

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.state for d in handles] == ["installed"] * 4
    assert len({d.probe.name for d in handles}) == 4  # one probe each, no "_2" duplicates
    tracemark.connect(f"probe.{uniq}*", rec)
    for n in names:
        sys.modules[n].f()
    assert sorted(e[0] for e in rec.events) == sorted(f"probe.{n}.f.entry" for n in names)


# Forking with threads alive is the case under test (a program's threads, tracemark's own):
# Python 3.12+'s warning about it is expected here.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_child_installs_what_it_imports(modules, mech, uniq):
    (modules / f"{uniq}e.py").write_text("def f():\n    return 3\n")
    d = tracemark.probe(f"{uniq}e:f", defer=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import, report the state, leave at once
        try:
            importlib.import_module(f"{uniq}e")
            os.write(w, f"{d.state} {D._finder in sys.meta_path}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert said == "installed False"
    assert d.state == "pending" and D._finder in sys.meta_path  # the parent is unchanged


def test_reload_keeps_the_probe_on_the_first_functions(modules, mech, rec, uniq):
    (modules / f"{uniq}r.py").write_text("def f():\n    return 1\n")
    d = tracemark.probe(f"{uniq}r:f", defer=True)
    module = importlib.import_module(f"{uniq}r")
    first = module.f
    tracemark.connect(d.probe.name, rec)
    importlib.reload(module)  # documented: new function objects are not probed
    module.f()
    first()
    assert rec.events == [(d.probe.name, ())]


def test_main_targets_need_a_main_program(tmp_path):
    from tracemark.probes.static import check

    with pytest.raises(ValueError, match="not a Python script or module"):
        check("__main__:f", main=None)
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("def f(a):\n    return a\n"))
    assert check("__main__:f", ["a"], main=str(script)) == f"{script}:f"


SELF = """\
import json
import sys

import tracemark

got = []
tracemark.connect("probe.*", lambda m, a: got.append((m.name, a)))
d = tracemark.probe("__main__:later", defer=True)  # not defined yet: the script defines it
e = tracemark.probe("json:dumps", defer=True)  # loaded: installed at once
assert d.state == "pending" and isinstance(e, tracemark.Probe), (d, e)


def later(x):
    return x


later(5)
assert d.state == "installed" and sys.gettrace() is None, d
print(got)
"""


@pytest.mark.parametrize("mech", MECHANISMS)
def test_a_script_defers_a_probe_on_its_own_function_while_it_runs(tmp_path, mech):
    (tmp_path / "self.py").write_text(SELF)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACEMARK_PROBES": mech}
    done = subprocess.run(
        [sys.executable, "self.py"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('probe.__main__.later.entry', (5,))]"


def test_a_module_loaded_under_another_name_counts_as_loaded():
    d = D.DeferredProbe("os.path:join", "entry", None, None)  # os.path is posixpath
    assert D.loaded_module(d) is sys.modules["os.path"]


def test_a_probe_asked_for_while_another_thread_imports_its_module(modules, mech, uniq):
    # The import is past the hook (none was there): the probe waits for it, then installs.
    (modules / f"{uniq}slow.py").write_text(
        "import builtins\nbuiltins._tm_started.set()\nbuiltins._tm_go.wait(10)\n"
        "def f():\n    return 4\n"
    )
    import builtins

    builtins._tm_started, builtins._tm_go = threading.Event(), threading.Event()
    try:
        t = threading.Thread(target=importlib.import_module, args=(f"{uniq}slow",))
        t.start()
        assert builtins._tm_started.wait(10)
        threading.Timer(0.2, builtins._tm_go.set).start()
        h = tracemark.probe(f"{uniq}slow:f", defer=True)
        t.join()
    finally:
        del builtins._tm_started, builtins._tm_go
    assert isinstance(h, tracemark.Probe) and h.installed
    tracemark.unprobe(h)


def test_a_module_can_defer_a_probe_on_itself(modules, mech, rec, uniq):
    (modules / f"{uniq}own.py").write_text(
        "import tracemark\n\ndef f():\n    return 1\n\n"
        f"h = tracemark.probe('{uniq}own:f', defer=True)\n"
    )
    module = importlib.import_module(f"{uniq}own")
    assert isinstance(module.h, tracemark.Probe) and module.h.installed
    tracemark.unprobe(module.h)
