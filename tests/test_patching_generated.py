"""Generated functions: marker statements nested in random control flow, run three ways.

Hypothesis builds function bodies from loops, branches, try/finally, try/except, with, match,
early returns and yields around marker statements; each function must behave the same
unpatched, patched-inactive and patched-active, with argument side effects only when active,
and every marker statement must be patched (the verifier accepted every compiled copy).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import tempfile
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.markers import registry
from tracemark.patching import patcher

_dir = Path(tempfile.mkdtemp(prefix="tracemark-gen-"))
_ids = itertools.count()

HEADER = """\
import contextlib
import tracemark

m = tracemark.marker("gen.m", "v=%r")
EFFECTS = []


def eff(v):
    EFFECTS.append(v)
    return v


"""

LEAVES = [
    "m(eff({k}))",
    "m(eff({k}) if len(trail) % 2 else eff(-{k}))",
    "m(eff([v * {k} for v in range(len(trail) % 3)]))",
    "trail.append({k})",
]


@st.composite
def bodies(draw, depth: int, gen: bool) -> list[str]:
    out: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(0, 9))
        kinds = ["leaf"] * 3 + (["yield"] if gen else []) + ["return"]
        if depth < 3:
            kinds += ["if", "for", "finally", "except", "with", "match"]
        kind = draw(st.sampled_from(kinds))

        def sub() -> list[str]:
            return ["    " + line for line in draw(bodies(depth + 1, gen))]

        if kind == "leaf":
            out.append(draw(st.sampled_from(LEAVES)).format(k=k))
        elif kind == "yield":
            out.append(f"trail.append((yield {k}))")
        elif kind == "return":
            out += [f"if len(trail) > {k}:", f"    return {k}"]
        elif kind == "if":
            out += ["if len(trail) % 2:", *sub(), "else:", *sub()]
        elif kind == "for":
            out += [
                f"for i{depth} in range(2):",
                *sub(),
                f"    if len(trail) > {k}:",
                "        break",
            ]
        elif kind == "finally":
            out += ["try:", *sub(), "finally:", *sub()]
        elif kind == "except":
            out += ["try:", *sub(), f"    raise ValueError({k})", "except ValueError:", *sub()]
        elif kind == "with":
            out += ["with contextlib.nullcontext():", *sub()]
        else:
            out += ["match len(trail) % 3:", "    case 0:", *["    " + x for x in sub()]]
            out += ["    case _:", *["    " + x for x in sub()]]
    return out


def _load(source: str):
    name = f"tracemark_gen_{next(_ids)}"
    path = _dir / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(mod, gen: bool):
    mod.EFFECTS.clear()
    trail: list = []
    try:
        if gen:
            it = mod.f(trail)
            result = [next(it)]
            try:
                while True:
                    result.append(it.send(len(trail)))
            except StopIteration as stop:
                result.append(("stop", stop.value))
        else:
            result = mod.f(trail)
        outcome = ("returned", result)
    except Exception as exc:
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__)[1:]]
        outcome = ("raised", repr(exc), lines)
    return outcome, trail, list(mod.EFFECTS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), gen=st.booleans())
def test_generated_functions_behave_the_same(data, gen):
    body = data.draw(bodies(0, gen))
    if gen:
        body = ["yield -1", *body]
    source = HEADER + "def f(trail):\n" + "".join(f"    {line}\n" for line in body)
    source += "    return len(trail)\n"
    mod = _load(source)
    core = registry.lookup("gen.m")
    patcher.set_armed(core, False)  # no lazy patching: this is the unpatched run
    plain = _run(mod, gen)
    patcher.set_armed(core, True)
    sites = tracemark.patch(mod)
    assert sites == [] or all(s.patched for s in sites), (source, sites)
    assert len(sites) == sum(line.lstrip().startswith("m(") for line in body)
    outcome, trail, effects = _run(mod, gen)
    assert (outcome, trail) == plain[:2], source
    assert effects == []
    with tracemark.connect("gen.m", lambda marker, args: None):
        assert _run(mod, gen) == plain, source
