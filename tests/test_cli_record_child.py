"""``tracemark record`` and a child Python that has no tracemark of its own (issue 16)."""

import os
import subprocess
import textwrap
import venv

import pytest

from tracemark.cli import _boot
from tracemark.cli.record import environment
from tracemark.ctf import read_trace

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(_boot.__file__)))

CHILD = textwrap.dedent(
    """
    import sys
    try:
        import leaky_pkg
        print("leaked")
    except ImportError:
        print("isolated")
    print(repr(sys.path))
    import tracemark
    tracemark.mark("child.hello", "n=%d", 7)
    """
)


def test_a_child_python_without_tracemark_sees_nothing_else_of_the_recording_one(tmp_path):
    # The recording interpreter's tracemark "installed" in a site-packages holding another
    # package too, as a pip install would leave it.
    site = tmp_path / "site-packages"
    (site / "leaky_pkg").mkdir(parents=True)
    (site / "leaky_pkg" / "__init__.py").write_text("")
    (site / "tracemark").symlink_to(PACKAGE, target_is_directory=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = str(env_dir / "bin" / "python")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    plain_env = {"PATH": os.environ["PATH"]}
    probe = subprocess.run(
        [python, "-c", "import tracemark"], env=plain_env, capture_output=True, cwd=tmp_path
    )
    if probe.returncode == 0:
        pytest.skip("the base interpreter has tracemark installed")
    untraced = subprocess.run(
        [python, "-c", "import sys; print(repr(sys.path))"],
        env=plain_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )

    trace = tmp_path / "trace"
    trace.mkdir()
    env = environment(trace, ["child.*"], "discard", None, [], plain_env)
    env[_boot.ENV_HOME] = str(site)
    proc = subprocess.run(
        [python, str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    verdict, path = proc.stdout.splitlines()
    assert verdict == "isolated"
    expected = eval(untraced.stdout)
    expected[0] = str(tmp_path)  # a script's directory instead of -c's ""
    assert eval(path) == expected  # nothing added, nothing left of ours
    events = [(e.name, dict(e.fields)) for e in read_trace(str(trace)).events()]
    assert events == [("child.hello", {"n": 7})]  # and it is recorded
