"""tracemark list MODULE: modules of editable installs and namespace packages are found
without importing them; literal arguments of the wrong type are errors."""

import io
import os
import subprocess
import sys
import textwrap
import time
import venv
from pathlib import Path

import tracemark
from tracemark.cli._common import EXIT_FOUND_ERRORS, Style
from tracemark.cli.listing import run, scan

ROOT = Path(tracemark.__file__).resolve().parents[1]

# Importing any of these modules would end the test run: finding them must not import them.
BOOM = "raise SystemExit('imported!')\n"


def write(base: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return base


def problems(result) -> list[str]:
    return [f"{Path(p.file).name}:{p.line}: {p.message}" for p in result.problems]


def test_a_namespace_package_is_read_from_every_portion(tmp_path, monkeypatch):
    # nsp has no __init__.py; its portions live in two directories of sys.path.
    write(
        tmp_path,
        {
            "a/nsp/alpha/__init__.py": BOOM
            + "import tracemark\nA = tracemark.marker('ns.a', n=int)\n",
            "b/nsp/beta/use.py": BOOM + "from nsp.alpha import A\nA(1)\nA('x')\n",
            "b/nsp/beta/__init__.py": "",
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    result = scan(["nsp"])
    assert result.files == 3
    assert result.markers["ns.a"].sites == 2  # the import across portions is followed
    assert problems(result) == ["use.py:4: ns.a(n): field 'n' expects int, got str literal 'x'"]
    # A module inside one portion, by its dotted name.
    assert scan(["nsp.beta.use"]).files == 1
    assert "nsp.alpha" not in sys.modules and "nsp" not in sys.modules


def test_a_regular_package_on_the_path_wins_over_namespace_portions(tmp_path, monkeypatch):
    write(
        tmp_path,
        {
            "a/pkg/mod.py": "import tracemark\ntracemark.mark('from.portion')\n",
            "b/pkg/__init__.py": "",
            "b/pkg/mod.py": "import tracemark\ntracemark.mark('from.package')\n",
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    assert set(scan(["pkg"]).markers) == {"from.package"}  # as the import system decides


def editable_site(tmp_path: Path) -> Path:
    """A site directory as setuptools' PEP 660 editable install leaves it (its finder module
    and the .pth that installs it at start-up), for a project outside sys.path."""
    project = write(
        tmp_path / "project",
        {
            "edpkg/__init__.py": BOOM
            + "import tracemark\nQ = tracemark.marker('ed.q', x=int, y=str)\n",
            "edpkg/sub/__init__.py": BOOM,
            "edpkg/sub/m.py": BOOM + "from edpkg import Q\nQ('one', 'two')\nQ(1, y='two')\n",
            "single.py": BOOM + "import tracemark\ntracemark.mark('ed.single')\n",
            "nsroot/part/x.py": BOOM + "import tracemark\ntracemark.mark('ed.ns')\n",
        },
    )
    site = tmp_path / "site"
    finder = f"""
        import sys
        MAPPING: dict[str, str] = {{
            'edpkg': {str(project / "edpkg")!r},
            'single': {str(project / "single.py")!r},
        }}
        NAMESPACES: dict[str, list[str]] = {{'nsroot': [{str(project / "nsroot")!r}]}}
        {BOOM.strip()}
        def install():
            pass
    """
    write(
        site,
        {
            "__editable___edpkg_1_0_finder.py": finder,
            "__editable__.edpkg-1.0.pth": "import __editable___edpkg_1_0_finder; "
            "__editable___edpkg_1_0_finder.install()\n",
        },
    )
    return site


def test_an_editable_install_is_found_through_its_finder_mapping(tmp_path, monkeypatch):
    site = editable_site(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    result = scan(["edpkg"])
    assert result.files == 3
    assert result.markers["ed.q"].sites == 2
    assert problems(result) == ["m.py:3: ed.q(x, y): field 'x' expects int, got str literal 'one'"]
    assert scan(["edpkg.sub.m"]).files == 1  # a submodule, walked from the mapped directory
    assert set(scan(["single"]).markers) == {"ed.single"}  # a mapped single module
    assert set(scan(["nsroot.part.x"]).markers) == {"ed.ns"}  # a namespace of the install
    assert not {"edpkg", "__editable___edpkg_1_0_finder", "single"} & set(sys.modules)


def test_a_pth_path_entry_is_searched(tmp_path, monkeypatch):
    # An editable install made as a path entry (setuptools' src layout, hatch, flit...).
    write(tmp_path, {"src/pthpkg/__init__.py": BOOM + "import tracemark\ntracemark.mark('p.p')\n"})
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "x.pth").write_text(f"# comment\nimport os\n{tmp_path / 'src'}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert set(scan(["pthpkg"]).markers) == {"p.p"}


def test_a_real_pip_install_e_is_found(tmp_path):
    """pip install -e of a flat-layout project (setuptools then writes a finder mapping, not a
    path entry) into a fresh venv; tracemark list runs in that venv's Python."""
    write(
        tmp_path / "proj",
        {
            "pyproject.toml": """
                [build-system]
                requires = ["setuptools>=64"]
                build-backend = "setuptools.build_meta"
                [project]
                name = "tmedflat"
                version = "0.1"
                [tool.setuptools]
                packages = ["tmedflat"]
            """,
            "tmedflat/__init__.py": BOOM
            + "import tracemark\nq = tracemark.marker('flat.q', x=int, y=str)\n"
            "def f():\n    q('one', 'two')\n",
        },
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    t0 = time.monotonic()
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["-e", str(tmp_path / "proj")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert time.monotonic() - t0 < 60
    site = next(env_dir.glob("lib/python*/site-packages"))
    assert list(site.glob("__editable___tmedflat_*_finder.py"))  # the finder kind of install
    proc = subprocess.run(
        [str(python), "-m", "tracemark", "list", "tmedflat"],
        cwd=tmp_path,  # not the project: only the install can find it
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == EXIT_FOUND_ERRORS, proc.stderr
    assert "flat.q(x: int, y: str)" in proc.stdout
    assert "__init__.py:5:7: error: flat.q(x, y): field 'x' expects int, got str literal 'one'" in (
        proc.stderr
    )
    assert "imported!" not in proc.stderr


LITERALS = """
    import tracemark

    a = tracemark.marker("lit.a", x=int, y=str)
    f = tracemark.marker("lit.f", v=float, b=str, raw=bytes)

    def go(name, n):
        a("one", "two")
        a(1, "two")
        a(True, y="ok")
        a(-3, y=None)
        a(x=2.5, y=f"{name}")
        a(f"{name}", name)
        a(n, 3)
        a(*n, 4)
        f(1, b"no", "no")
        f(1.5, "s", b"raw")
        f(float("nan"), "s", bytearray())
        tracemark.mark("lit.m", "k=%d", "str")
        tracemark.mark("lit.m", "k=%d", 7)
"""


def test_literal_arguments_of_the_wrong_type_are_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, {"lit.py": LITERALS}))
    assert problems(scan(["lit.py"])) == [
        "lit.py:8: lit.a(x, y): field 'x' expects int, got str literal 'one'",
        "lit.py:11: lit.a(x, y): field 'y' expects str, got NoneType literal None",
        "lit.py:12: lit.a(x, y): field 'x' expects int, got float literal 2.5",
        "lit.py:13: lit.a(x, y): field 'x' expects int, got str literal (an f-string)",
        "lit.py:14: lit.a(x, y): field 'y' expects str, got int literal 3",
        "lit.py:16: lit.f(v, b, raw): field 'b' expects str, got bytes literal b'no'",
        "lit.py:16: lit.f(v, b, raw): field 'raw' expects bytes, got str literal 'no'",
        "lit.py:19: mark 'lit.m': field 'k' expects int, got str literal 'str'",
    ]
    out, err = io.StringIO(), io.StringIO()
    assert run(["lit.py"], out, err, style=Style(False)) == EXIT_FOUND_ERRORS
    assert "lit.py:8:7: error: lit.a(x, y): field 'x' expects int, got str literal 'one'" in (
        err.getvalue()
    )
    assert err.getvalue().splitlines()[-1] == "3 markers in 1 file; 8 errors"
