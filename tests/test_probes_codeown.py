"""The marker patcher and dynamic probes share ``func.__code__`` (patcher.suspend/resume).

A function holding a marker statement, patched by the patcher, is probed: the probe fires,
the marker still works (on the plain call path while the probe is installed), results and
tracebacks are unchanged; after unprobe the patcher's variant is back. Also the reverse
order, closures, failing installs, and threads. Every test runs on each probe mechanism this
Python has (sys.monitoring and recompile on 3.12+, recompile on 3.11).
"""

import threading
import traceback

import pytest

import tracemark
from tracemark import probes as P
from tracemark.markers import registry
from tracemark.patching import patcher

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism

SOURCE = """\
import tracemark
m = tracemark.marker('{u}.m', 'v=%d')
seen = []
def f(x):
    y = x * 2
    m(seen.append(x) or x)
    if x < 0:
        raise ValueError(f"neg {{x}}")
    return y + 1
def outer():
    def inner(x):
        m(seen.append(-x) or x)
        return x + 100
    return inner
"""
LINE_MARK = 6  # m(seen.append(x) or x)
LINE_RAISE = 8
LINE_RETURN = 9


@pytest.fixture
def mod(tmp_path, monkeypatch, uniq):
    name = f"codeown_{uniq}"
    (tmp_path / f"{name}.py").write_text(SOURCE.format(u=uniq))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    module.uniq = uniq
    return module


def is_variant(func):
    """True if ``func`` runs a variant the patcher installed (not its original code)."""
    unit = patcher._units.get(id(func.__code__))
    return unit is not None and unit.origin[id(func.__code__)] is not func.__code__


def site_states(mod):
    (info,) = tracemark.markers(f"{mod.uniq}.m")
    return sorted((s.function, s.patched, s.reason) for s in info.sites)


def raised_at(func, *args):
    with pytest.raises(ValueError) as exc:
        func(*args)
    tb = traceback.extract_tb(exc.value.__traceback__)
    return str(exc.value), [(fr.name, fr.lineno) for fr in tb if fr.name == func.__name__]


def listen(pattern):
    got = []
    conn = tracemark.connect(pattern, lambda m, a: got.append((m.name, a)))
    return got, conn


def test_patched_function_probed_at_entry_return_line_then_unprobed(mod, mech):
    original = mod.f.__code__
    assert mod.f(1) == 3  # first inactive run patches the module
    assert is_variant(mod.f) and mod.seen == [1]
    assert site_states(mod) == [("f", True, ""), ("outer.<locals>.inner", True, "")]
    variant = mod.f.__code__
    before = raised_at(mod.f, -1)
    assert mod.seen == [1]  # patched: the inactive marker's arguments are not evaluated

    handles = [
        tracemark.probe(f"{mod.__name__}:f"),
        tracemark.probe(f"{mod.__name__}:f", at="return"),
        tracemark.probe(f"{mod.__name__}:{LINE_RETURN}", capture=["y"]),
    ]
    assert all(h.target.code is original for h in handles)  # served on the original code
    assert patcher.original_code(mod.f) is original
    if mech.name == "sys.monitoring":
        assert mod.f.__code__ is original
    assert not is_variant(mod.f)
    reason = patcher.SUSPENDED
    assert ("f", False, reason) in site_states(mod)
    assert ("outer.<locals>.inner", True, "") in site_states(mod)  # another function: free

    events, conn = listen(f"probe.{mod.__name__}.*")
    assert mod.f(3) == 7
    assert mod.seen == [1, 3]  # plain call path while suspended: correct, not free
    kinds = [(n.rsplit(".", 1)[1], a[:1]) for n, a in events]
    assert kinds == [("entry", (3,)), ("line9", (6,)), ("return", (7,))]
    assert raised_at(mod.f, -1) == before  # same message, same traceback lines
    assert before[1] == [("f", LINE_RAISE)]

    marked, mconn = listen(f"{mod.uniq}.m")
    assert mod.f(4) == 9
    assert [a for _, a in marked] == [(4,)]  # the marker works while probed
    assert mod.f.__code__ is not variant
    tracemark.disconnect(mconn)
    assert not is_variant(mod.f)  # no switch while suspended

    for h in handles[:2]:
        tracemark.unprobe(h)
    assert not is_variant(mod.f)  # one probe is left: still suspended
    tracemark.unprobe(handles[2])
    assert mod.f.__code__ is variant  # the patcher's variant for "inactive" is back
    assert site_states(mod) == [("f", True, ""), ("outer.<locals>.inner", True, "")]
    del events[:]
    mod.seen.clear()
    assert mod.f(5) == 11
    assert mod.seen == [] and events == []  # a jump again, and no probe left behind
    assert raised_at(mod.f, -1) == before
    tracemark.disconnect(conn)


def test_probe_first_then_marker_runs_inactive_and_connects(mod, mech):
    original = mod.f.__code__
    h = tracemark.probe(f"{mod.__name__}:f", at="return")
    events, conn = listen(f"probe.{mod.__name__}.*")
    for x in (1, 2):
        assert mod.f(x) == 2 * x + 1
    assert mod.seen == [1, 2]  # not patched while the probe is installed
    assert not is_variant(mod.f)
    assert [a[0] for _, a in events] == [3, 5]
    assert site_states(mod)[0] == ("f", False, patcher.SUSPENDED)
    assert tracemark.patch(mod) and not is_variant(mod.f)  # explicit patching waits too

    marked, mconn = listen(f"{mod.uniq}.m")
    assert mod.f(6) == 13
    assert marked == [(f"{mod.uniq}.m", (6,))]
    assert [a[0] for _, a in events] == [3, 5, 13]
    tracemark.disconnect(mconn)

    tracemark.unprobe(h)
    assert mod.f.__code__ is not original and is_variant(mod.f)
    mod.seen.clear()
    assert mod.f(7) == 15 and mod.seen == []
    assert [a[0] for _, a in events] == [3, 5, 13]
    tracemark.disconnect(conn)


def test_marker_switching_while_probed_then_unprobe_installs_the_current_variant(mod, mech):
    mod.f(1)
    inactive = mod.f.__code__
    assert is_variant(mod.f)
    h = tracemark.probe(f"{mod.__name__}:f")
    events, conn = listen(f"probe.{mod.__name__}.*")
    marked, mconn = listen(f"{mod.uniq}.m")
    assert mod.f(2) == 5
    assert events == [(f"probe.{mod.__name__}.f.entry", (2,))]
    tracemark.unprobe(h)  # the marker is active now: the code to run keeps the statement
    assert mod.f.__code__ is not inactive
    assert mod.f(3) == 7
    assert marked == [(f"{mod.uniq}.m", (2,)), (f"{mod.uniq}.m", (3,))]
    assert len(events) == 1
    tracemark.disconnect(mconn)
    assert mod.f.__code__ is inactive  # switching works again after the probe is gone
    mod.seen.clear()
    assert mod.f(4) == 9 and mod.seen == []
    tracemark.disconnect(conn)


def test_closures_are_served_on_the_original_nested_code(mod, mech):
    early = mod.outer()
    assert early(1) == 101  # patches outer and the closure
    assert is_variant(early) and is_variant(mod.outer)
    h = tracemark.probe(f"{mod.__name__}:outer.<locals>.inner")
    assert not is_variant(early) and not is_variant(mod.outer)
    events, conn = listen(f"probe.{mod.__name__}.*")
    late = mod.outer()
    assert late(2) == 102 and early(3) == 103
    got = [a for _, a in events]
    if mech.name == "sys.monitoring":
        assert got == [(2,), (3,)]  # events on the original nested code reach both
    else:
        assert got == [(2,)]  # recompile: closures made before keep their code (its limit)
    tracemark.unprobe(h)
    assert is_variant(early) and is_variant(mod.outer)
    assert is_variant(late) or late.__code__ is not early.__code__
    mod.seen.clear()
    assert mod.outer()(4) == 104 and early(5) == 105 and mod.seen == []
    tracemark.disconnect(conn)


def test_a_probe_that_fails_to_install_leaves_patching_as_it_was(mod, mech):
    mod.f(1)
    variant = mod.f.__code__
    registry.declare(f"{mod.uniq}.taken", None, {"zz": int})
    with pytest.raises(P.ProbeError):
        tracemark.probe(f"{mod.__name__}:f", name=f"{mod.uniq}.taken")
    assert mod.f.__code__ is variant
    assert patcher._held == {} and patcher._suspended_codes == {}
    assert site_states(mod)[0] == ("f", True, "")


def test_suspend_is_counted_and_never_overwrites_foreign_code(mod):
    mod.f(1)
    variant = mod.f.__code__
    original = patcher.original_code(mod.f)
    assert original is not variant
    assert patcher.suspend(mod.f) is original and patcher.suspend(mod.f) is original
    assert mod.f.__code__ is original
    assert patcher.resume(mod.f) is True and mod.f.__code__ is original
    theirs = original.replace(co_consts=(*original.co_consts, "theirs"))
    mod.f.__code__ = theirs  # a debugger, a mock
    assert patcher.resume(mod.f) is True
    assert mod.f.__code__ is theirs  # not ours: left as they made it
    assert patcher.resume(mod.f) is False
    mod.f.__code__ = original
    tracemark.patch(mod)
    assert mod.f.__code__ is variant
    with pytest.raises(TypeError):
        patcher.suspend(len)


def test_threads_call_while_probes_come_and_go_and_the_marker_switches(mod, mech):
    mod.f(1)
    stop = threading.Event()
    errors = []
    calls = [0] * 3

    def worker(i):
        while not stop.is_set():
            x = calls[i] = calls[i] + 1
            try:
                if mod.f(x) != 2 * x + 1 or mod.outer()(x) != x + 100:
                    errors.append(x)
                mod.f(-x)
            except ValueError as exc:
                if str(exc) != f"neg {-x}":
                    errors.append(exc)
            except Exception as exc:  # pragma: no cover - the failure we look for
                errors.append(exc)

    probe_events, conn = listen(f"probe.{mod.__name__}.*")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(40):
            hs = [tracemark.probe(f"{mod.__name__}:f", at=("entry", "return")[n % 2])]
            if n % 3 == 0:
                hs.append(tracemark.probe(f"{mod.__name__}:{LINE_RETURN}", capture=["y"]))
            mconn = tracemark.connect(f"{mod.uniq}.m", lambda m, a: None) if n % 2 else None
            for h in hs:
                tracemark.unprobe(h)
            if mconn is not None:
                tracemark.disconnect(mconn)
    finally:
        stop.set()
        for t in threads:
            t.join()
    tracemark.disconnect(conn)
    assert errors == []
    assert all(calls)
    for name, args in probe_events:
        assert name.rsplit(".", 1)[1] in ("entry", "return", "line9"), name
        assert type(args[0]) is int
    assert P.probes() == [] and patcher._held == {}
    assert is_variant(mod.f) and site_states(mod)[0] == ("f", True, "")


def test_a_closure_patched_on_its_own_is_suspended_through_its_parent(mod, mech):
    inner = mod.outer()
    tracemark.patch(inner)  # the closure's code gets a unit of its own; outer is not analysed
    assert is_variant(inner) and not is_variant(mod.outer)
    h = tracemark.probe(f"{mod.__name__}:outer.<locals>.inner")
    assert inner.__code__ is h.target.code  # the original nested code, where events are
    assert ("outer.<locals>.inner", False, patcher.SUSPENDED) in site_states(mod)
    mod.seen.clear()
    assert inner(1) == 101 and mod.seen == [-1]  # plain call path while suspended
    tracemark.unprobe(h)
    assert is_variant(inner)
    mod.seen.clear()
    assert inner(2) == 102 and mod.seen == []
