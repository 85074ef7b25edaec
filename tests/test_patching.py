"""The patcher preserves semantics and makes inactive marker statements free.

The differential test runs every function of ``patching_corpus`` three ways (unpatched on the
plain call path, patched with the markers inactive, patched with a probe connected) and
requires identical results, exceptions, traceback positions and program trails; the markers'
argument side effects must happen only when active.
"""

from __future__ import annotations

import dis
import inspect
import os
import re
import subprocess
import sys
import traceback

import patching_corpus as corpus
import pytest

import tracemark
from tracemark import env
from tracemark.markers import dispatch, registry
from tracemark.patching import patcher

CORPUS_MARKERS = [registry.lookup(n) for n in ("corpus.mk", "corpus.other", "corpus.modmk")]


def _outcome(func, *args):
    """What a call did: its trail, and its result or its exception with traceback positions."""
    trail: list = []
    try:
        result = ("returned", func(trail, *args))
    except Exception as exc:
        frames = [
            (f.name, f.lineno, f.colno, f.end_colno)
            for f in traceback.extract_tb(exc.__traceback__)
            if f.filename == corpus.__file__
        ]
        result = ("raised", type(exc).__name__, str(exc), frames)
    return result, trail


def _unpatched():
    """Put every function back on its original code and keep the lazy hook quiet."""
    patcher.unpatch_all()
    cores = [*CORPUS_MARKERS, registry.lookup("corpus.inline")]
    for core in cores:
        patcher.set_armed(core, False)
    return cores


def _run_all():
    out = {}
    for name in corpus.CASES:
        corpus.EFFECTS.clear()
        outcome = _outcome(getattr(corpus, name))
        out[name] = (outcome, list(corpus.EFFECTS))
    return out


@pytest.fixture(scope="module")
def three_runs():
    cores = _unpatched()
    plain = _run_all()
    for core in cores:
        patcher.set_armed(core, True)
    sites = tracemark.patch(corpus)
    inactive = _run_all()
    events: list = []
    with tracemark.connect("corpus.*", lambda m, a: events.append((m.name, a))):
        active = _run_all()
    return plain, inactive, active, sites, events


@pytest.mark.parametrize("name", corpus.CASES)
def test_differential(three_runs, name):
    plain, inactive, active, _, _ = three_runs
    (p_outcome, p_effects), (i_outcome, i_effects), (a_outcome, a_effects) = (
        plain[name],
        inactive[name],
        active[name],
    )
    assert i_outcome == p_outcome
    assert a_outcome == p_outcome
    if name != "case_not_a_module":
        assert p_effects, "every case has a marker statement that runs"
    assert a_effects == p_effects  # active: arguments evaluated as written
    if name in corpus.KEPT_CASES:
        assert i_effects == p_effects  # kept on the call path: part of the program
    else:
        # Inactive and patched: arguments never evaluated, but a site whose name now
        # refers to something else calls that.
        assert i_effects == corpus.REBOUND.get(name, [])


def test_every_corpus_site_is_patched(three_runs):
    *_, sites, _ = three_runs
    assert sites
    kept = {s.function: s.reason for s in sites if not s.patched}
    assert set(kept) == set(corpus.KEPT)
    for function, reason in kept.items():
        assert reason.startswith(corpus.KEPT[function]), (function, reason)
    where = {s.where for s in sites}
    statements = re.findall(
        r"^ +(?:mk|rb|other|mod\.mk|tracemark\.mark)\(", inspect.getsource(corpus), re.M
    )
    assert len(where) == len(statements)
    finally_sites = [s for s in sites if s.function == "case_try_finally_return"]
    assert finally_sites[0].copies >= 2  # a finally body is compiled more than once


def test_active_events_match_effects(three_runs):
    _, _, active, _, events = three_runs
    spied = sum(len(effects) for effects in corpus.REBOUND.values())  # calls of `spy`
    assert len(events) == sum(len(effects) for _, effects in active.values()) - spied
    assert {name for name, _ in events} == {
        "corpus.mk",
        "corpus.other",
        "corpus.modmk",
        "corpus.inline",
    }


def test_sites_in_markers_report(three_runs):
    info = {m.name: m for m in tracemark.markers("corpus.*")}
    sites = [s for s in info["corpus.mk"].sites if s.function not in corpus.KEPT]
    assert sites and all(s.patched and s.mechanism == "patched jump" for s in sites)
    kept = [s for s in info["corpus.mk"].sites if s.function in corpus.KEPT]
    assert kept and all(s.mechanism == "plain call" and s.reason for s in kept)
    assert any(s.function == "Thing.method" for s in sites)
    assert all(s.where.startswith(corpus.__file__ + ":") for s in sites)


def test_tools_still_read_patched_code(three_runs):
    func = corpus.case_plain
    assert func.__code__ is not patcher._units[id(func.__code__)].origin[id(func.__code__)]
    assert inspect.getsource(func).startswith("def case_plain(trail):")
    text = dis.Bytecode(func).dis()
    assert "JUMP_FORWARD" in text
    assert inspect.signature(corpus.decorated) == inspect.signature(corpus.decorated.__wrapped__)
    lines = [line for _, _, line in func.__code__.co_lines() if line]
    assert min(lines) == func.__code__.co_firstlineno


def test_nested_function_objects_made_later_are_patched(three_runs):
    counter = corpus.make_counter(5)
    unit = patcher._units[id(counter.__code__)]
    assert counter.__code__ is not unit.origin[id(counter.__code__)]  # made from the variant
    corpus.EFFECTS.clear()
    assert counter() == 6
    assert corpus.EFFECTS == []
    got = []
    with tracemark.connect("corpus.mk", lambda m, a: got.append(a)):
        assert counter() == 6  # an existing closure was switched too
        assert corpus.make_counter(1)() == 2  # and new ones are made live
    assert got == [(5,), (1,)]
    corpus.EFFECTS.clear()
    assert counter() == 6
    assert corpus.EFFECTS == []


def test_running_frame_keeps_its_code(three_runs):
    g = corpus.gen(3)
    assert next(g) == 0  # suspended in the inactive variant
    got = []
    with tracemark.connect("corpus.mk", lambda m, a: got.append(a)):
        corpus.EFFECTS.clear()
        assert next(g) == 1  # still the code it started with: marker jumped over
        assert corpus.EFFECTS == []
        assert next(corpus.gen(1)) == 0  # a new generator runs the live code
    assert got == [(0,)]


def test_lazy_patching_on_first_inactive_run(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"lazy_{uniq}.py"
    src.write_text(
        "import tracemark\n"
        f"m = tracemark.marker('{uniq}.m', 'v=%d')\n"
        "seen = []\n"
        "def f(x):\n"
        "    m(seen.append(x) or x)\n"
        "    return x + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    original = mod.f.__code__
    assert mod.f(1) == 2
    assert mod.seen == [1]  # first run: plain call path, arguments evaluated
    assert mod.f.__code__ is not original  # ... and the function is patched now
    assert mod.f(2) == 3
    assert mod.seen == [1]
    (info,) = tracemark.markers(f"{uniq}.m")
    assert [(s.where, s.patched) for s in info.sites] == [(f"{src}:5", True)]


def test_lazy_patching_finds_methods_wrapped_functions_and_closures(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"lazy2_{uniq}.py"
    src.write_text(
        "import functools\n"
        "import tracemark\n"
        f"m = tracemark.marker('{uniq}.m', 'v=%d')\n"
        "seen = []\n"
        "def deco(f):\n"
        "    @functools.wraps(f)\n"
        "    def wrapper(*a):\n"
        "        return f(*a)\n"
        "    return wrapper\n"
        "class K:\n"
        "    @property\n"
        "    def p(self):\n"
        "        m(seen.append('p') or 1)\n"
        "        return 'p'\n"
        "@deco\n"
        "def wrapped(x):\n"
        "    m(seen.append('w') or x)\n"
        "    return x\n"
        "def outer():\n"
        "    def inner():\n"
        "        m(seen.append('i') or 2)\n"
        "        return 'i'\n"
        "    return inner\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    inner = mod.outer()
    for _ in range(2):
        assert (mod.K().p, mod.wrapped(3), inner(), mod.outer()()) == ("p", 3, "i", "i")
    # The first site to run patched its whole module: `wrapped` (found through __wrapped__)
    # never ran its marker's arguments. The closure made before that ran them once, and was
    # found then (through its code) and switched.
    assert mod.seen == ["p", "i"]
    (info,) = tracemark.markers(f"{uniq}.m")
    assert sorted(s.function for s in info.sites if s.patched) == [
        "K.p",
        "outer.<locals>.inner",
        "wrapped",
    ]


def test_inline_mark_declared_after_its_function_was_analysed(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"late_{uniq}.py"
    src.write_text(
        "import tracemark\n"
        f"m = tracemark.marker('{uniq}.m', 'v=%d')\n"
        "seen = []\n"
        "def g():\n"
        "    m(1)\n"
        "def f():\n"
        f"    tracemark.mark('{uniq}.late', 'v=%d', seen.append(1) or 1)\n"
        "    return 'f'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    mod.g()  # patches the module; f has no resolvable statement yet
    original = mod.f.__code__
    assert mod.f() == "f"  # declares the name, fires inactive: f is looked at again
    assert mod.f.__code__ is not original
    assert (mod.f(), mod.seen) == ("f", [1])
    (info,) = tracemark.markers(f"{uniq}.late")
    assert [s.patched for s in info.sites] == [True]


def test_unpatchable_sites_say_why(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"unp_{uniq}.py"
    src.write_text(
        "import tracemark\n"
        f"m = tracemark.marker('{uniq}.m', 'v=%d')\n"
        "m(1)\n"
        "lam = lambda: m(2)\n"
        "lam()\n"
        "class K:\n"
        "    m(3)\n"
        "ns = {'m': m}\n"
        "exec(compile('def e():\\n    m(4)\\n', '<string>', 'exec'), ns)\n"
        "ns['e']()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(src.stem)
    (info,) = tracemark.markers(f"{uniq}.m")
    reasons = {s.where.rsplit(":", 1)[1]: s.reason for s in info.sites}
    assert reasons["3"] == "module level"
    assert reasons["4"] == "lambda"
    assert reasons["7"] == "class body or exec'd code"
    assert reasons["2"] == "exec'd code (no source)"
    assert not any(s.patched for s in info.sites)


def test_tracemark_internal_callers_are_not_sites(uniq):
    m = tracemark.marker(f"{uniq}.m", "v=%d")
    ns = {"m": m}
    exec(compile("def emit(v):\n    m(v)\n", "<tracemark probe>", "exec"), ns)
    ns["emit"](1)
    (info,) = tracemark.markers(f"{uniq}.m")
    assert info.sites == ()  # a probe mechanism's emitter is not a place in the user's code


def test_code_replaced_by_someone_else_is_left_alone(uniq, tmp_path, monkeypatch):
    src = tmp_path / f"other_{uniq}.py"
    src.write_text(
        f"import tracemark\nm = tracemark.marker('{uniq}.m', 'v=%d')\n"
        "def f():\n    m(1)\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    tracemark.patch(mod)
    theirs = (lambda: 2).__code__.replace(co_name="f")
    mod.f.__code__ = theirs  # another tool swapped in its own code
    with tracemark.connect(f"{uniq}.m", lambda m, a: None):
        assert mod.f.__code__ is theirs
    assert mod.f.__code__ is theirs


def test_hook_switches_itself_off_and_rearms(uniq):
    m = tracemark.marker(f"{uniq}.m", "v=%d")
    code = compile(f"for i in range({patcher.HOOK_BUDGET + 5}): m(i)", "<loop>", "exec")
    exec(code, {"m": m})
    core = registry.core_of(m)
    assert core.namespace["_probes"] == ()  # nothing left to learn: the plain path is bare
    with tracemark.connect(f"{uniq}.m", lambda m, a: None):
        pass
    assert core.namespace["_probes"] is dispatch.ARMED


def test_refusals(monkeypatch, uniq, tmp_path):
    src = tmp_path / f"ref_{uniq}.py"
    src.write_text(
        f"import tracemark\nm = tracemark.marker('{uniq}.m', 'v=%d')\ndef f():\n    m(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    original = mod.f.__code__
    monkeypatch.setattr(env, "PYBEHAVIOR", env.PYBEHAVIOR._replace(free_threaded=True))
    (site,) = tracemark.patch(mod)
    assert (site.patched, site.reason) == (False, "free-threaded build")
    assert mod.f.__code__ is original
    monkeypatch.undo()


def test_nopatch_environment_variable(tmp_path):
    src = tmp_path / "np_mod.py"
    src.write_text(
        "import tracemark\nm = tracemark.marker('np.m', 'v=%d')\ndef f():\n    m(1)\n"
        "code = f.__code__\nf(); f()\n"
        "assert f.__code__ is code\n"
        "print([s.reason for s in tracemark.markers('np.m')[0].sites])\n"
    )
    env_vars = {"TRACEMARK_NOPATCH": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(src)],
        capture_output=True,
        text=True,
        env={**os.environ, **env_vars},
        check=True,
    )
    assert out.stdout.strip() == "['TRACEMARK_NOPATCH=1']"


def test_closure_variables_holding_other_markers(uniq):
    def make(name):
        m = tracemark.marker(name, "v=%d")

        def inner(x):
            m(x)
            return x

        return inner

    a, b = make(f"{uniq}.a"), make(f"{uniq}.b")
    original = b.__code__
    (site,) = tracemark.patch(a)
    assert site.patched and site.marker == f"{uniq}.a"
    tracemark.patch(b)
    assert b.__code__ is original  # same code, another marker in the cell: not shared
    got = []
    with tracemark.connect(f"{uniq}.b", lambda m, args: got.append(m.name)):
        assert (a(1), b(2)) == (1, 2)
    with tracemark.connect(f"{uniq}.*", lambda m, args: got.append(m.name)):
        assert (a(1), b(2)) == (1, 2)
    assert got == [f"{uniq}.b", f"{uniq}.a", f"{uniq}.b"]


# --- rebinding the name a site calls -----------------------------------------------------------


def _prog(tmp_path, source):
    path = tmp_path / "rebind_prog.py"
    path.write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEMARK_")}
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_rebinding_a_global_after_patching_calls_the_new_callee(tmp_path):
    out = _prog(
        tmp_path,
        "import tracemark\n"
        "m = tracemark.marker('rb.m', 'v=%d')\n"
        "log = m\n"
        "got = []\n"
        "def spy(v):\n"
        "    got.append(v)\n"
        "def f(x):\n"
        "    log(x)\n"
        "    return x\n"
        "f(1); f(2)\n"  # the first run patches f
        "assert tracemark.markers('rb.m')[0].sites[0].patched\n"
        "log = spy\n"
        "f(3); f(4)\n"
        "log = m\n"
        "f(5)\n"
        "print(got)\n",
    )
    assert out == "[3, 4]\n"


def test_rebinding_a_closure_variable_calls_the_new_callee(uniq):
    m = tracemark.marker(f"{uniq}.m", "v=%d")
    got = []
    target = m

    def f(x):
        target(x)
        return x

    (site,) = tracemark.patch(f)
    assert site.patched
    assert f(1) == 1 and got == []
    target = got.append  # read by f through its cell
    assert f(2) == 2
    assert got == [2]


def test_rebinding_to_another_marker(uniq):
    a = tracemark.marker(f"{uniq}.a", "v=%d")
    b = tracemark.marker(f"{uniq}.b", "v=%d")
    current = a
    events = []

    def f(x):
        current(x)
        return x

    tracemark.patch(f)
    with tracemark.connect(f"{uniq}.b", lambda marker, args: events.append(args)):
        f(1)  # `a` is inactive: skipped
        current = b  # read by f through its cell
        f(2)  # `b` is live and the site now calls it
    assert events == [(2,)]


def test_deleted_global_raises_from_the_statement(tmp_path):
    out = _prog(
        tmp_path,
        "import traceback, tracemark\n"
        "m = tracemark.marker('rb.m', 'v=%d')\n"
        "log = m\n"
        "def f(x):\n"
        "    try:\n"
        "        log(x)\n"
        "    except NameError as e:\n"
        "        return 'caught', e.__traceback__.tb_lineno\n"
        "    return 'ran'\n"
        "tracemark.patch(f)\n"
        "print(f(1))\n"
        "del log\n"
        "print(f(2))\n",
    )
    # The guard reads the name as the statement would: same error, handler, line.
    assert out == "ran\n('caught', 6)\n"
