"""tracemark.control.paths: the private directory, stale sockets, output paths."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from tracemark.control import paths


def test_directory_is_made_private(tmp_path):
    d = paths.ensure_private_dir(tmp_path / "ctl")
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    assert paths.ensure_private_dir(d) == d  # found again: checked, accepted


def test_symlink_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "ctl"
    link.symlink_to(real)
    with pytest.raises(paths.UnsafePath, match="symlink"):
        paths.ensure_private_dir(link)


def test_open_directory_is_refused(tmp_path):
    d = tmp_path / "ctl"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(paths.UnsafePath, match="mode 755"):
        paths.ensure_private_dir(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
def test_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(paths.UnsafePath, match="owned by uid 65534"):
        paths.ensure_private_dir(d)


def test_default_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths.socket_dir().name == f"tracemark-{os.geteuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert paths.socket_dir() == tmp_path / "tracemark"
    other = tmp_path / "other"
    other.mkdir()
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(other))  # not ours: not used
        assert paths.socket_dir().name == "tracemark-0"


def test_stale_sockets_are_ignored_then_cleaned(tmp_path):
    d = paths.ensure_private_dir(tmp_path / "ctl")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    dead_pid = int(dead.stdout)
    s1 = socket.socket(socket.AF_UNIX)
    s1.bind(str(paths.socket_path(dead_pid, d)))
    s2 = socket.socket(socket.AF_UNIX)
    s2.bind(str(paths.socket_path(os.getpid(), d)))
    (d / "notes.txt").write_text("not a socket")
    try:
        assert paths.listening(d) == [(os.getpid(), paths.socket_path(os.getpid(), d))]
        assert paths.clean_stale(d) == [dead_pid]
        assert not paths.socket_path(dead_pid, d).exists()
        assert paths.socket_path(os.getpid(), d).exists() and (d / "notes.txt").exists()
    finally:
        s1.close()
        s2.close()


def test_a_socket_whose_pid_was_reused_is_cleaned_once_settled(tmp_path):
    # SIGKILL leaves the socket file; when its pid belongs to another process later, only a
    # refused connection tells. A young socket may be one not listening *yet*: kept.
    d = paths.ensure_private_dir(tmp_path / "ctl")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    listener = socket.socket(socket.AF_UNIX)
    deaf = socket.socket(socket.AF_UNIX)
    try:
        deaf.bind(str(paths.socket_path(live.pid, d)))  # bound, never listening
        listener.bind(str(paths.socket_path(os.getpid(), d)))
        listener.listen()
        assert paths.clean_stale(d) == []  # both young
        old = time.time() - 2 * paths.SETTLE_SECONDS
        for pid in (live.pid, os.getpid()):
            os.utime(paths.socket_path(pid, d), (old, old))
        assert paths.clean_stale(d) == [live.pid]
        assert [pid for pid, _ in paths.listening(d)] == [os.getpid()]
    finally:
        live.kill()
        live.wait()
        deaf.close()
        listener.close()


def test_output_dir_checks(tmp_path):
    with pytest.raises(paths.UnsafePath, match="not absolute"):
        paths.check_output_dir("relative/dir")
    with pytest.raises(paths.UnsafePath, match=r"'\.\.'"):
        paths.check_output_dir(str(tmp_path) + "/a/../b")
    made = paths.check_output_dir(str(tmp_path / "a" / "b"))
    assert made.is_dir()
    mine = tmp_path / "mine"
    mine.symlink_to(made)
    assert paths.check_output_dir(str(mine / "c")).is_dir()  # our own link: followed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another user's symlink")
def test_output_dir_through_a_foreign_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "planted"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)
    with pytest.raises(paths.UnsafePath, match="symlink owned by uid 65534"):
        paths.check_output_dir(str(link / "trace"))
    assert not (target / "trace").exists()
