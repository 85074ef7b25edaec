"""The control server in a target: nothing without opting in, idle when idle, private."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from control_helpers import ROOT, Target, cli

from tracemark.control import paths

IDLE = """
import json, os, sys, threading
import tracemark
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    if line.strip() == "threads":
        print(json.dumps(sorted(t.name for t in threading.enumerate())), flush=True)
"""


def _switches(pid: int) -> dict[str, int]:
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            total = 0
            for line in f:
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
        out[task] = total
    return out


def _fds(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return found


def test_not_opted_in_gets_nothing(tmp_path):
    with Target(tmp_path, env={"TRACEMARK_CONTROL": ""}, script=IDLE) as t:
        assert t.ask("threads") == ["MainThread"]
        assert not any(f.startswith("socket:") for f in _fds(t.pid))
        assert not paths.socket_path(t.pid).exists()
        r = cli("list", str(t.pid))
        assert r.returncode == 7 and "does not listen" in r.stderr
        assert "TRACEMARK_CONTROL=1" in r.stderr


def test_idle_server_never_wakes_up(tmp_path):
    with Target(tmp_path, script=IDLE) as t:
        assert t.ask("threads") == ["MainThread", "tracemark-control"]
        sock = paths.socket_path(t.pid)
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o700
        time.sleep(0.2)
        before = _switches(t.pid)
        time.sleep(1.0)
        after = _switches(t.pid)
        assert len(before) == 2
        assert after == before  # 0 wake-ups per second in every thread, the server's too


def test_socket_removed_at_exit(tmp_path):
    with Target(tmp_path, script=IDLE) as t:
        sock = paths.socket_path(t.pid)
        assert sock.exists()
        t.proc.stdin.close()
        assert t.proc.wait(10) == 0
        assert not sock.exists()


def test_ps_and_list_pid(tmp_path):
    with Target(tmp_path) as t:
        r = cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        rows = {p["pid"]: p for p in json.loads(r.stdout)["processes"]}
        me = rows[t.pid]
        assert me["markers"] == 2 and me["active"] == 0 and me["probes"] == 0
        assert me["argv"][-1].endswith("target.py") and me["uptime"] >= 0
        r = cli("ps")
        assert r.returncode == 0
        line = next(x for x in r.stdout.splitlines() if x.split()[0] == str(t.pid))
        assert "target.py" in line
        r = cli("list", str(t.pid), "--json")
        assert r.returncode == 0, r.stderr
        ms = {m["name"]: m for m in json.loads(r.stdout)["markers"]}
        assert set(ms) == {"app.tick", "app.other"}
        tick = ms["app.tick"]
        assert tick["fields"] == [["n", "int"]] and tick["active"] is False
        assert tick["where"].endswith("target.py:7")
        assert tick["doc"] == "One tick of the work loop." and tick["declared_at"] == [
            tick["where"]
        ]
        assert [s["mechanism"] for s in tick["sites"]] == ["patched jump"]
        assert tick["bad_arguments"] == 0
        r = cli("list", str(t.pid))
        assert r.returncode == 0
        assert "app.tick  (n: int)  inactive" in r.stdout
        assert "    One tick of the work loop.\n" in r.stdout
        assert "patched jump" in r.stdout


def test_ps_cleans_stale_sockets(tmp_path):
    with Target(tmp_path, script=IDLE) as t:
        sock = paths.socket_path(t.pid)
        t.proc.kill()
        t.proc.wait(10)
        assert sock.exists()  # SIGKILL: nobody removed it
        r = cli("ps", "--json")
        assert r.returncode == 0
        assert t.pid not in [p["pid"] for p in json.loads(r.stdout)["processes"]]
        assert not sock.exists()


# A Python another user can run (ours may live under /root).
OTHER_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(OTHER_PYTHON, os.X_OK),
    reason="needs root (to connect as another user) and a system python",
)
def test_other_uid_is_refused_by_peer_credentials(tmp_path):
    with Target(tmp_path, script=IDLE) as t:
        sock = paths.socket_path(t.pid)
        # Open the file system's door on purpose: the SO_PEERCRED check must still refuse.
        os.chmod(sock.parent, 0o711)
        os.chmod(sock, 0o666)
        try:
            code = (
                "import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
                's.sendall(b\'{"v":1,"op":"info"}\\n\')\n'
                "print(repr(s.recv(100)))\n"
            )
            r = subprocess.run(
                [OTHER_PYTHON, "-c", code, str(sock)],
                capture_output=True,
                text=True,
                timeout=30,
                preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
            )
        finally:
            os.chmod(sock.parent, 0o700)
            os.chmod(sock, 0o600)
        assert r.stdout.strip() in ("b''", ""), r  # closed, nothing said
        assert t.ask("threads") == ["MainThread", "tracemark-control"]


def test_unsafe_directory_means_no_listening(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    (runtime / "tracemark").symlink_to(tmp_path)  # planted
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), TRACEMARK_CONTROL="1", XDG_RUNTIME_DIR=str(runtime)
    )
    r = subprocess.run(
        [sys.executable, "-c", "import threading, tracemark; print(threading.active_count())"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert r.returncode == 0
    assert r.stdout.strip() == "1"
    assert "does not listen for control" in r.stderr and "symlink" in r.stderr
    assert not any(Path(tmp_path).glob("*.sock"))


def test_a_process_under_tracemark_record_listens(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys\nimport tracemark\nm = tracemark.marker('prog.go')\n"
        "print(os.getpid(), flush=True)\nsys.stdin.readline()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRACEMARK_CONTROL", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "tracemark", "record", "-o", str(tmp_path / "t"), str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        pid = int(p.stdout.readline())
        r = cli("list", str(pid), "--json")
        assert r.returncode == 0, r.stderr
        assert [m["name"] for m in json.loads(r.stdout)["markers"]] == ["prog.go"]
        p.stdin.close()
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(30)
        p.stdout.close()
        p.stderr.close()


def test_the_tracemark_command_itself_does_not_listen(tmp_path):
    # A control directory of its own: other processes' sockets (stale ones of pids since
    # reused, on a shared machine) are not this test's business.
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), TRACEMARK_CONTROL="1", XDG_RUNTIME_DIR=str(tmp_path)
    )
    r = subprocess.run(
        [sys.executable, "-m", "tracemark", "ps", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert all(p["argv"][1:3] != ["-m", "tracemark"] for p in json.loads(r.stdout)["processes"])


def _fake_listener(directory: Path, pid: int, *, remove_on_accept: bool):
    """A socket for ``pid`` in ``directory`` that takes one connection and closes it, having
    removed its socket first (a process ending as it was asked) or not (one that hangs up)."""
    import socket
    import threading

    path = paths.socket_path(pid, directory)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        if remove_on_accept:
            os.unlink(path)
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return path


@pytest.mark.parametrize("ends", [True, False])
def test_ps_is_silent_about_a_process_that_ends_as_it_is_asked(tmp_path, ends):
    directory = paths.ensure_private_dir(tmp_path / "tracemark")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_listener(directory, sleeper.pid, remove_on_accept=ends)
        env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(tmp_path))
        r = subprocess.run(
            [sys.executable, "-m", "tracemark", "ps", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 0, r.stderr
    about_it = [line for line in r.stderr.splitlines() if f"process {sleeper.pid}" in line]
    # Ended (its socket gone): not an error. Still there and hanging up (seen as a closed
    # connection or a broken pipe, by timing): said, once.
    if ends:
        assert about_it == []
    else:
        assert len(about_it) == 1 and about_it[0].startswith(
            f"tracemark ps: process {sleeper.pid}: "
        ), r.stderr
    assert all(p["pid"] != sleeper.pid for p in json.loads(r.stdout)["processes"])
