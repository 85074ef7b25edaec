"""Targets of other users: root may control them, others get a clear refusal (exit 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from control_helpers import ROOT, Target, cli

from tracemark.ctf import read_trace

NOBODY = 65534
#: A Python that another user can run (ours may live under /root, closed to others).
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to run a process as another user) and a system python",
)


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def shared():
    """A directory the other user can read and write (pytest's tmp_path is root's only),
    holding a copy of the package under ``pkg/``: the checkout may be in a directory the
    other user cannot enter (a CI clone under mktemp -d is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="tracemark-users-"))
    os.chmod(d, 0o777)
    shutil.copytree(
        ROOT / "tracemark", d / "pkg" / "tracemark", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in (d / "pkg").rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(d / "pkg", 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_root_attaches_to_another_users_process(shared):
    env = {"XDG_RUNTIME_DIR": "", "HOME": str(shared), "PYTHONPATH": str(shared / "pkg")}
    with Target(shared, env=env, preexec_fn=_as_nobody, python=SYSTEM_PYTHON) as t:
        assert os.stat(f"/proc/{t.pid}").st_uid == NOBODY
        sock_dir = Path(tempfile.gettempdir()) / f"tracemark-{NOBODY}"
        st = os.lstat(sock_dir)
        assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o700
        r = cli("list", str(t.pid), "--json")
        assert r.returncode == 0, r.stderr
        assert {m["name"] for m in json.loads(r.stdout)["markers"]} == {"app.tick", "app.other"}
        out = shared / "trace"
        r = cli("attach", str(t.pid), "-e", "app.tick", "-o", str(out), "--duration", "0.4")
        assert r.returncode == 0, r.stderr
        assert {ev.name for ev in read_trace(str(out)).events()} == {"app.tick"}
        assert os.stat(next(out.glob("*-0"))).st_uid == NOBODY  # the target wrote it
        st = t.state()
        assert st["recordings"] == 0 and st["active"] == []


def test_another_user_is_refused_with_exit_code_8(tmp_path, shared):
    with Target(tmp_path) as t:  # ours (root's)
        env = dict(os.environ, PYTHONPATH=str(shared / "pkg"))
        env.pop("TRACEMARK_CONTROL", None)
        r = subprocess.run(
            [SYSTEM_PYTHON, "-m", "tracemark", "attach", str(t.pid), "-o", str(shared / "o")],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=shared,
            preexec_fn=_as_nobody,
        )
        assert r.returncode == 8, r.stderr
        assert r.stderr.strip() == (
            f"tracemark attach: error: process {t.pid} belongs to uid 0: only that user or "
            "root may control it"
        )
        assert t.state()["recordings"] == 0
