"""``import tracemark`` is cheap and its namespace is the public API.

What the import loads is checked by module name in a fresh interpreter (a timing would be
noise on a shared machine; benchmarks/bench_import.py measures it): the heavy standard
modules stay out until something needs them, and come in when it does.
"""

import json
import subprocess
import sys

import pytest

import tracemark
from tracemark._frozen import FrozenInstanceError, frozen

# What import tracemark must not load: dataclasses pulls in inspect, which pulls in ast, dis
# and tokenize; the patcher's bytecode and source analysis, the recorder, CTF, probes, CLI.
HEAVY = [
    "dataclasses",
    "inspect",
    "ast",
    "dis",
    "textwrap",
    "sysconfig",
    "tracemark.patching.bytecode",
    "tracemark.patching.finder",
    "tracemark.tracers.recording",
    "tracemark.ctf",
    "tracemark.probes",
    "tracemark.cli",
]


def _loaded(code: str) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys\n{code}\nimport json\nprint(json.dumps(list(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_loads_no_heavy_module():
    before = _loaded("")
    after = _loaded("import tracemark")
    assert "tracemark.markers.dispatch" in after
    assert [m for m in HEAVY if m in after and m not in before] == []


def test_heavy_modules_come_in_when_used():
    code = (
        "import tracemark\n"
        "m = tracemark.marker('imp.cost', v=int)\n"
        "def f():\n    m(1)\n"
        "tracemark.patch(f)\n"
        "with tracemark.connect('imp.*', lambda marker, args: None): f()\n"
    )
    after = _loaded(code)
    assert {"tracemark.patching.bytecode", "tracemark.patching.finder", "dis", "ast"} <= after
    assert not {"dataclasses", "inspect"} & after  # patching needs neither


def test_patching_works_after_lazy_load():
    src = "import tracemark\nm = tracemark.marker('imp.lazy', v=int)\ndef f():\n    m(1)\n"
    code = (
        f"exec(compile({src!r}, 'imp_lazy_mod.py', 'exec'))\n"
        "import linecache\n"
        f"linecache.cache['imp_lazy_mod.py'] = (1, None, {src!r}.splitlines(True), 'x')\n"
        "sites = tracemark.patch(f)\n"
        "print([(s.marker, s.patched) for s in sites])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "('imp.lazy', True)" in out


def test_dir_is_the_public_api():
    assert dir(tracemark) == sorted([*tracemark.__all__, "control", "__version__"])
    for name in ("annotations", "Any", "_Any", "env", "patching", "_registry"):
        assert name not in dir(tracemark)
    for name in tracemark.__all__:  # every name listed is there
        assert getattr(tracemark, name) is not None


def test_frozen_behaves_as_a_frozen_value():
    @frozen
    class P:
        a: int
        b: str = "x"

    p = P(1)
    assert (p.a, p.b) == (1, "x")
    assert p == P(1, "x") == P(a=1, b="x")
    assert p != P(2)
    assert hash(p) == hash(P(1, "x"))
    assert repr(p) == "test_frozen_behaves_as_a_frozen_value.<locals>.P(a=1, b='x')"
    assert p._replace(b="y") == P(1, "y")
    with pytest.raises(FrozenInstanceError):
        p.a = 2
    with pytest.raises(AttributeError):
        del p.b
    with pytest.raises(TypeError):
        P()
    with pytest.raises(TypeError):
        P(1, "x", 3)
    match p:
        case P(1, b):
            assert b == "x"
        case _:
            pytest.fail("positional match")


def test_frozen_refuses_a_default_before_a_required_field():
    with pytest.raises(TypeError, match="without a default"):

        @frozen
        class Q:
            a: int = 1
            b: str


def test_public_values_are_frozen():
    tracemark.marker("imp.info", v=int)
    (info,) = [m for m in tracemark.markers() if m.name == "imp.info"]
    assert info.fields == (tracemark.Field("v", int),)
    with pytest.raises(AttributeError):
        info.name = "other"
    assert info._replace(doc="d").doc == "d"
