"""Issue 6: the cost of dynamic probes, against the usual ways of watching a function.

Run: ``python -m benchmarks.run probes``.

Every row calls a function of two arguments in a loop; each case switches its tool on only
while its own row is being timed (``sys.setprofile``, viztracer and a bare ``sys.monitoring``
callback slow down every call while on), and the rows are timed interleaved, so noise hits
them alike. Ratios are to the unprobed function, with no probe installed anywhere.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

import tracemark
from tracemark import probes
from tracemark.env import PYBEHAVIOR

from .harness import Case, _best, _loop, table

TITLE = "Dynamic probes: cost per call of a probed function"
BASELINE = "unprobed f(a, b), no probe anywhere"
_HERE = sys.modules[__name__]


def target(a, b):
    return a


def elsewhere(a, b):
    return b


def entry_args(a, b):
    return a


def entry_bare(a, b):
    return a


def returned(a, b):
    return a


def recorded(a, b):
    return a


def recorded_one(a, b):
    return a


def monitored(a, b):
    return a


def profiled(a, b):
    return a


def vizzed(a, b):
    return a


def _noop(marker, args):
    pass


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _probes_elsewhere() -> Iterator[None]:
    hs = [probes.probe(f"{__name__}:elsewhere", at=at) for at in ("entry", "return", "raise")]
    conn = tracemark.connect("probe.*.elsewhere.*", _noop)
    try:
        yield
    finally:
        tracemark.disconnect(conn)
        for h in hs:
            probes.unprobe(h)


def _probed(func: str, glob: str, **kw: object) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def on() -> Iterator[None]:
        h = probes.probe(f"{__name__}:{func}", **kw)
        conn = tracemark.connect(glob, _noop)
        try:
            yield
        finally:
            tracemark.disconnect(conn)
            probes.unprobe(h)

    return on


def _recording(
    func: str = "recorded", **kw: object
) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def on() -> Iterator[None]:
        h = probes.probe(f"{__name__}:{func}", **kw)
        with tempfile.TemporaryDirectory() as tmp:
            rec = tracemark.record(os.path.join(tmp, "trace"), f"probe.*.{func}.*")
            try:
                yield
            finally:
                rec.stop()
                probes.unprobe(h)

    return on


@contextlib.contextmanager
def _bare_monitoring() -> Iterator[None]:
    mon = sys.monitoring
    tool = next(i for i in (5, 4, 3, 2) if mon.get_tool(i) is None)
    mon.use_tool_id(tool, "bench")
    mon.register_callback(tool, mon.events.PY_START, lambda code, offset: None)
    mon.set_local_events(tool, monitored.__code__, mon.events.PY_START)
    try:
        yield
    finally:
        mon.set_local_events(tool, monitored.__code__, 0)
        mon.register_callback(tool, mon.events.PY_START, None)
        mon.free_tool_id(tool)


@contextlib.contextmanager
def _profiling() -> Iterator[None]:
    def profiler(frame, event, arg):
        pass

    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.setprofile(None)


def _viztracer():
    try:
        from viztracer import VizTracer
    except ImportError:
        return None

    @contextlib.contextmanager
    def on() -> Iterator[None]:
        tracer = VizTracer(verbose=0, tracer_entries=2_000_000)
        tracer.start()
        try:
            yield
        finally:
            tracer.stop()
            tracer.clear()

    return on


def report(number: int = 100_000, repeat: int = 7) -> str:
    ns = {name: getattr(_HERE, name) for name in dir(_HERE) if not name.startswith("_")}
    rows: list[tuple[Case, Callable[[], contextlib.AbstractContextManager]]] = [
        (Case(BASELINE, "target(1, 2)", ns), _nothing),
        (
            Case("unprobed f(a, b), probes active elsewhere", "target(1, 2)", ns, "target 1.00x"),
            _probes_elsewhere,
        ),
        (
            Case("entry probe (arguments), no-op consumer", "entry_args(1, 2)", ns),
            _probed("entry_args", "probe.*.entry_args.*"),
        ),
        (
            Case("entry probe, capture=[], no-op consumer", "entry_bare(1, 2)", ns, "no values"),
            _probed("entry_bare", "probe.*.entry_bare.*", capture=[]),
        ),
        (
            Case("return probe (value, duration), no-op", "returned(1, 2)", ns),
            _probed("returned", "probe.*.returned.*", at="return"),
        ),
        (
            Case("entry probe recorded to CTF (tracemark.record)", "recorded(1, 2)", ns),
            _recording(),
        ),
        (
            Case(
                "entry probe recorded, one captured argument",
                "recorded_one(1, 2)",
                ns,
                f"core: {tracemark.env.core()[0]}",
            ),
            _recording("recorded_one", capture=["a"]),
        ),
        (Case("sys.setprofile, no-op profiler", "profiled(1, 2)", ns), _profiling),
    ]
    if PYBEHAVIOR.sys_monitoring:
        rows.insert(
            -1,
            (
                Case("bare sys.monitoring PY_START callback", "monitored(1, 2)", ns, "the floor"),
                _bare_monitoring,
            ),
        )
    viz = _viztracer()
    if viz is not None:
        rows.append((Case("viztracer tracing the call", "vizzed(1, 2)", ns), viz))
    runs = {c.name: _loop(c.stmt, c.namespace) for c, _ in rows}
    empty = _loop("pass", {})
    best = {c.name: float("inf") for c, _ in rows}
    base = float("inf")
    for _ in range(repeat):
        base = min(base, _best(empty, number, 1))
        for case, switch in rows:
            with switch():
                best[case.name] = min(best[case.name], _best(runs[case.name], number, 1))
    results = {name: max(t - base, 0.0) for name, t in best.items()}
    cases = [c for c, _ in rows]
    mechanism = probes.mechanism().name
    title = f"{TITLE} (mechanism: {mechanism})"
    text = table(title, cases, results, BASELINE)
    if viz is None:
        text += "\nviztracer is not installed: its row is missing.\n"
    if not PYBEHAVIOR.sys_monitoring:
        text += "\nNo sys.monitoring on this Python: no bare-callback row.\n"
    return text + "\n" + _import_report(max(number // 50, 500), repeat)


IMPORT_BASELINE = "import a small module, no deferred probe"


def _import_report(number: int, repeat: int) -> str:
    """Deferred probes: what an import costs while one waits (the import hook's lookup),
    and once every deferred probe is installed (the hook is gone: nothing)."""
    import importlib

    from tracemark.probes import deferred

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "_tm_bench_small.py"), "w") as f:
            f.write("X = 1\n\n\ndef f(a):\n    return a\n\n\nclass C:\n    pass\n")
        with open(os.path.join(tmp, "_tm_bench_later.py"), "w") as f:
            f.write("def g():\n    pass\n")
        sys.path.insert(0, tmp)
        importlib.invalidate_caches()
        ns = {"_pop": sys.modules.pop, "_import": importlib.import_module}
        stmt = "_pop('_tm_bench_small', None); _import('_tm_bench_small')"

        @contextlib.contextmanager
        def pending() -> Iterator[None]:
            d = probes.probe("_tm_bench_later:g", defer=True)
            assert deferred._finder in sys.meta_path
            try:
                yield
            finally:
                probes.unprobe(d)

        @contextlib.contextmanager
        def installed() -> Iterator[None]:
            d = probes.probe("_tm_bench_later:g", defer=True)
            importlib.import_module("_tm_bench_later")
            assert d.state == "installed" and deferred._finder not in sys.meta_path
            try:
                yield
            finally:
                probes.unprobe(d)
                sys.modules.pop("_tm_bench_later", None)

        ns["_find"] = deferred._finder.find_spec
        rows = [
            (Case(IMPORT_BASELINE, stmt, ns), _nothing),
            (Case("the same, a deferred probe pending elsewhere", stmt, ns, "hook on"), pending),
            (
                Case("the same, every deferred probe installed", stmt, ns, "hook removed"),
                installed,
            ),
            (
                Case(
                    "the hook alone: find_spec of a module no probe waits for",
                    "_find('_tm_bench_small')",
                    ns,
                    "what row 2 adds",
                ),
                pending,
            ),
        ]
        try:
            runs = {c.name: _loop(c.stmt, c.namespace) for c, _ in rows}
            best = {c.name: float("inf") for c, _ in rows}
            empty, base = _loop("pass", {}), float("inf")
            for _ in range(repeat):
                base = min(base, _best(empty, number * 100, 1))
                for case, switch in rows:
                    with switch():
                        n = number if case.stmt.startswith("_pop") else number * 100
                        best[case.name] = min(best[case.name], _best(runs[case.name], n, 1))
        finally:
            sys.path.remove(tmp)
            sys.modules.pop("_tm_bench_small", None)
    title = "Deferred probes: cost of an import while one is pending"
    results = {name: max(t - base, 0.0) for name, t in best.items()}
    return table(title, [c for c, _ in rows], results, IMPORT_BASELINE)
