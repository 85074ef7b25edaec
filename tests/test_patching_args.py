"""Marker statements whose arguments are part of the program: ``:=``, ``yield``, ``await``.

Jumping over ``m(y := next(it))`` skips the store, and code compiled after it reads ``y``
with an unchecked load (3.12+: a segfault). Such statements keep the plain call path and
say why. Every program here runs in a subprocess on the running interpreter (a crash is a
failed test, not a crashed suite), and is compared with its ``TRACEMARK_NOPATCH=1`` run.
Lambdas and comprehensions without ``:=`` create their own scope: they are patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracemark.patching import finder

TIMEOUT = 60


def _run(path: Path, *, nopatch: bool = False, mode: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEMARK_")}
    if nopatch:
        env["TRACEMARK_NOPATCH"] = "1"
    if mode:
        env["GEN_MODE"] = mode
    return subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        cwd=path.parent,
    )


def _both(tmp_path: Path, source: str) -> tuple[str, str]:
    """stdout of the program patched and under TRACEMARK_NOPATCH=1; each must exit 0."""
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(source))
    out = []
    for nopatch in (False, True):
        proc = _run(path, nopatch=nopatch)
        assert proc.returncode == 0, (nopatch, proc.returncode, proc.stderr[-2000:])
        out.append(proc.stdout)
    return out[0], out[1]


def test_walrus_read_after_the_statement(tmp_path):
    # 3.12.1 / 3.13.0: SIGSEGV before the fix; 3.11: UnboundLocalError.
    patched, plain = _both(
        tmp_path,
        """\
        import tracemark
        m = tracemark.marker("t.m", v=int)
        def f(it):
            m(y := next(it))
            return y
        print(f(iter([1])), f(iter([2])), f(iter([3])))
        (site,) = tracemark.markers("t.m")[0].sites
        print(site.patched, site.reason)
        """,
    )
    assert plain.splitlines()[0] == "1 2 3"
    assert patched.splitlines() == ["1 2 3", "False arguments bind a name (:=)"]


def test_walrus_inside_try_except(tmp_path):
    patched, plain = _both(
        tmp_path,
        """\
        import tracemark
        m = tracemark.marker("t.m", v=int)
        def f(it):
            try:
                m(y := next(it))
            except StopIteration:
                return "empty"
            return y
        tracemark.patch(f)
        print(f(iter([1])), f(iter([])), f(iter([3])))
        """,
    )
    assert patched == plain == "1 empty 3\n"


def test_walrus_in_a_comprehension_binds_the_enclosing_scope(tmp_path):
    patched, plain = _both(
        tmp_path,
        """\
        import tracemark
        m = tracemark.marker("t.m", v=int)
        def f(n):
            m(len([last := i for i in range(n)]))
            return last
        tracemark.patch(f)
        print(f(3), f(5))
        print([s.reason for s in tracemark.markers("t.m")[0].sites])
        """,
    )
    assert plain.splitlines()[0] == patched.splitlines()[0] == "2 4"
    assert patched.splitlines()[1] == repr([finder.BINDS])


def test_yield_in_arguments_keeps_the_generator(tmp_path):
    patched, plain = _both(
        tmp_path,
        """\
        import tracemark
        m = tracemark.marker("t.m", v=int)
        def g():
            m((yield 1))
            yield 2
        def h():
            m((yield from g()))
            yield 3
        tracemark.patch(g); tracemark.patch(h)
        print(list(g()), list(h()), list(g()), list(h()))
        print(sorted({s.reason for s in tracemark.markers("t.m")[0].sites}))
        """,
    )
    assert plain.splitlines()[0] == patched.splitlines()[0] == "[1, 2] [1, 2, 3] [1, 2] [1, 2, 3]"
    assert patched.splitlines()[1] == repr([finder.SUSPENDS])


def test_await_in_arguments(tmp_path):
    patched, plain = _both(
        tmp_path,
        """\
        import asyncio
        import tracemark
        m = tracemark.marker("t.m", v=int)
        seen = []
        async def val(v):
            seen.append(v)
            await asyncio.sleep(0)
            return v
        async def f():
            m(await val(1))
            m(len([x async for x in agen()]))
            return seen
        async def agen():
            yield 1
        tracemark.patch(f)
        print(asyncio.run(f()), asyncio.run(f()))
        print(sorted({s.reason for s in tracemark.markers("t.m")[0].sites}))
        """,
    )
    assert plain.splitlines()[0] == patched.splitlines()[0] == "[1, 1] [1, 1]"
    assert patched.splitlines()[1] == repr([finder.SUSPENDS])


@pytest.mark.parametrize(
    "args",
    [
        "eff(1)",
        "(lambda q: q + 1)(eff(1))",
        "(lambda: (w := eff(1)))()",  # := inside a lambda binds in the lambda
        "[eff(v) for v in range(2)]",
        "sum(eff(v) for v in range(2))",
        "{v: eff(v) for v in range(2)}",
    ],
)
def test_own_scope_arguments_are_patched(tmp_path, args):
    patched, plain = _both(
        tmp_path,
        f"""\
        import tracemark
        m = tracemark.marker("t.m", "v=%r")
        log = []
        def eff(v):
            log.append(v)
            return v
        def f(v):
            x = v
            m({args})
            return x
        tracemark.patch(f)
        print(f(1), f(2), len(log))
        print([s.patched for s in tracemark.markers("t.m")[0].sites])
        """,
    )
    assert patched.splitlines() == ["1 2 0", "[True]"]
    assert plain.splitlines()[0].startswith("1 2 ")


def test_refusal_reasons():
    import ast

    def call(src):
        return ast.parse(src).body[0].value

    assert finder.refusal(call("m(y := 1)")) == finder.BINDS
    assert finder.refusal(call("m([y := v for v in r])")) == finder.BINDS
    assert finder.refusal(call("m(k=(y := 1))")) == finder.BINDS
    assert finder.refusal(call("m(lambda a=(y := 1): a)")) == finder.BINDS  # default: here
    assert finder.refusal(call("m((yield))")) == finder.SUSPENDS
    assert finder.refusal(call("m((yield from g))")) == finder.SUSPENDS
    assert finder.refusal(call("m(await a)")) == finder.SUSPENDS
    assert finder.refusal(call("m([x async for x in a])")) == finder.SUSPENDS
    assert finder.refusal(call("m(lambda: (y := 1))")) == ""
    assert finder.refusal(call("m([v for v in r], lambda: 1)")) == ""


# --- generated programs ----------------------------------------------------------------------

HEADER = """\
import asyncio, inspect, json, os, sys
import tracemark
from tracemark.markers import registry
from tracemark.patching import patcher

m = tracemark.marker("gen.args", "v=%r")
EFFECTS = []


def eff(v):
    EFFECTS.append(v)
    return v


async def aval(v):
    await asyncio.sleep(0)
    return v


def sub(v):
    got = yield v
    return (v, got)

"""

FOOTER = """

def drive(f):
    trail = []
    EFFECTS.clear()
    try:
        r = f(trail)
        if inspect.isgenerator(r):
            out = []
            try:
                v = next(r)
                while True:
                    out.append(v)
                    v = r.send(len(out))
            except StopIteration as stop:
                out.append(("stop", stop.value))
            r = out
        elif inspect.iscoroutine(r):
            r = asyncio.run(r)
        res = ["returned", repr(r)]
    except Exception as exc:
        res = ["raised", type(exc).__name__, str(exc)]
    return [res, repr(trail), repr(EFFECTS)]


mode = os.environ.get("GEN_MODE", "plain")
funcs = [v for k, v in sorted(globals().items()) if k.startswith("f_")]
report = {}
if mode == "unpatched":
    patcher.set_armed(registry.lookup("gen.args"), False)
    report["runs"] = [[drive(f) for f in funcs]]
elif mode == "patched":
    tracemark.patch(sys.modules[__name__])
    report["runs"] = [[drive(f) for f in funcs] for _ in range(2)]
    with tracemark.connect("gen.args", lambda marker, args: None):
        report["active"] = [drive(f) for f in funcs]
    report["sites"] = sorted(
        [s.function, s.where.rsplit(":", 1)[1], s.patched, s.reason]
        for s in tracemark.markers("gen.args")[0].sites
    )
else:
    report["runs"] = [[drive(f) for f in funcs]]
print(json.dumps(report))
"""

# Argument expressions: (template, kinds of function it may appear in, refusal or "").
ARGS = [
    ("eff({k})", "sga", ""),
    ("(w{k} := eff({k}))", "sga", finder.BINDS),
    ("[w{k} := eff(v) for v in range(2)]", "sga", finder.BINDS),
    ("(yield {k})", "g", finder.SUSPENDS),
    ("(yield from sub({k}))", "g", finder.SUSPENDS),
    ("await aval({k})", "a", finder.SUSPENDS),
    ("(lambda q: q + {k})(eff({k}))", "sga", ""),
    ("(lambda: (z := eff({k})))()", "sga", ""),
    ("[eff(v) * {k} for v in range(2)]", "sga", ""),
    ("[x for x in range({k})]", "sga", ""),  # x is also a local of the function (PEP 709)
    ("sum(eff(v) for v in range({k}))", "sga", ""),
]

# Control-flow shapes around the statement (``{s}``): lines, indented by four per level.
SHAPES = [
    ["{s}"],
    ["if len(trail) % 2:", "    {s}", "else:", "    trail.append('else')"],
    ["if not trail:", "    {s}", "else:", "    {s}"],
    ["for i in range(2):", "    {s}", "    trail.append(i)"],
    ["while len(trail) < 2:", "    trail.append('w')", "    {s}"],
    [
        "try:",
        "    {s}",
        "    raise ValueError('v')",
        "except ValueError as e:",
        "    trail.append(str(e))",
    ],
    ["try:", "    trail.append('t')", "finally:", "    {s}"],
    ["try:", "    {s}", "except KeyError:", "    pass", "else:", "    trail.append('else')"],
    ["with contextlib.nullcontext():", "    {s}"],
]


@st.composite
def programs(draw, index: int) -> tuple[str, list[tuple[str, str]]]:
    """One function ``f_<index>``; returns its source and [(its name, expected reason)]."""
    kind = draw(st.sampled_from("sga"))  # sync, generator, async
    choices = [a for a in ARGS if kind in a[1]]
    template, _, reason = draw(st.sampled_from(choices))
    k = draw(st.integers(1, 3))
    args = template.format(k=k)
    shape = draw(st.sampled_from(SHAPES))
    nested = kind == "s" and draw(st.booleans())
    name = f"f_{index:02d}"
    head = "async def" if kind == "a" else "def"
    body = ["x = len(trail)"]
    body += [line.format(s=f"m({args})") for line in shape]
    if "w{k}" in template:  # read what := bound: unbound if the statement did not run
        body += [f"trail.append(w{k})"]
    body += ["trail.append(x)"]
    if kind == "g":
        body += ["trail.append((yield 'last'))"]
    body += ["return len(trail)"]
    if nested:
        inner = ["def inner(trail):", *("    " + line for line in body), "return inner(trail)"]
        body = inner
    lines = [f"{head} {name}(trail):", *("    " + line for line in body)]
    owner = f"{name}.<locals>.inner" if nested else name
    return "\n".join(lines) + "\n\n", [(owner, reason)]


@st.composite
def batches(draw) -> tuple[str, list[tuple[str, str]]]:
    parts = [draw(programs(i)) for i in range(draw(st.integers(4, 8)))]
    source = HEADER.replace("import asyncio,", "import asyncio, contextlib,")
    source += "\n".join(p[0] for p in parts) + FOOTER
    return source, [e for p in parts for e in p[1]]


_gen_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"tracemark-args-{os.getpid()}"


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=batches())
def test_generated_arguments_behave_the_same(batch):
    source, expected = batch
    _gen_dir.mkdir(exist_ok=True)
    path = _gen_dir / "gen_args_prog.py"
    path.write_text(source)
    reports = {}
    for mode, nopatch in (("unpatched", False), ("patched", False), ("plain", True)):
        proc = _run(path, nopatch=nopatch, mode=mode)
        assert proc.returncode == 0, (mode, proc.returncode, proc.stderr[-3000:], source)
        reports[mode] = json.loads(proc.stdout)
    plain = reports["plain"]["runs"][0]  # TRACEMARK_NOPATCH=1
    unpatched = reports["unpatched"]["runs"][0]
    patched = reports["patched"]
    assert unpatched == plain, source
    for run in patched["runs"]:
        # results, exceptions, generator outputs and trails; the effects differ (skipped)
        assert [r[:2] for r in run] == [r[:2] for r in plain], source
    assert patched["active"] == plain, source  # active: every argument evaluated
    sites = {function: (patched_, reason) for function, _, patched_, reason in patched["sites"]}
    for owner, reason in expected:
        assert sites[owner] == (not reason, reason), (owner, source)
