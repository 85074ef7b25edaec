"""tracemark attach / detach: a session records, ends, and leaves the target as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from control_helpers import Target, cli, popen_cli, stop

from tracemark.ctf import read_trace


def _names(path):
    return {ev.name for ev in read_trace(str(path)).events()}


def _inactive(st):
    return st["active"] == [] and st["probes"] == 0 and st["recordings"] == 0


def test_attach_records_then_target_is_as_before(tmp_path):
    with Target(tmp_path) as t:
        before = t.state()
        assert before["mechanisms"] == ["patched jump"]
        out = tmp_path / "trace"
        r = cli(
            "attach",
            str(t.pid),
            "-e",
            "app.tick",
            "--probe",
            "__main__:compute{x}",
            "-o",
            str(out),
            "--duration",
            "0.5",
        )
        assert r.returncode == 0, r.stderr
        assert "tracemark attach:" in r.stderr and "ended: stopped by the client" in r.stderr
        assert "probe.__main__.compute.entry" in r.stderr and "app.tick" in r.stderr
        assert _names(out) == {"app.tick", "probe.__main__.compute.entry"}
        after = t.state()
        # Exactly as before: every function back to its code object, markers patched again.
        assert after["same"] == {"work": True, "side": True, "compute": True}
        assert after["mechanisms"] == ["patched jump"]
        assert _inactive(after), after
        assert after["results_ok"] and after["results"] > before["results"]
        assert "tracemark-control-client" not in after["threads"]


def test_attach_json_summary_and_target_exit(tmp_path):
    with Target(tmp_path) as t:
        p = popen_cli("attach", str(t.pid), "-e", "app.*", "-o", str(tmp_path / "o"), "--json")
        try:
            time.sleep(1.0)
            assert t.exit() == 0  # the target ends: the attach ends with it, cleanly
            out, err = p.communicate(timeout=30)
        finally:
            stop(p)
        assert p.returncode == 0, err
        summary = json.loads(out.splitlines()[-1])["summary"]
        assert summary["reason"] == "the target is exiting"
        assert summary["recorded"] > 0
        assert _names(tmp_path / "o") == {"app.tick", "app.other"}


def test_client_sigkilled_target_cleans_up_within_a_second(tmp_path):
    with Target(tmp_path) as t:
        out = tmp_path / "trace"
        p = popen_cli(
            "attach", str(t.pid), "-e", "app.*", "--probe", "__main__:compute", "-o", str(out)
        )
        try:
            st = t.wait_for(lambda s: s["recordings"] == 1 and s["probes"] == 1)
            assert st["active"], st
            time.sleep(0.3)
            p.kill()
            killed = time.monotonic()
            st = t.wait_for(_inactive, timeout=1.0)
            assert time.monotonic() - killed < 1.0 + 0.3  # (+ one state round trip)
            assert _inactive(st), st
            assert st["same"]["compute"] and st["mechanisms"] == ["patched jump"]
        finally:
            stop(p)
        # What was recorded is flushed: a complete trace, no ring files left.
        assert not list(out.rglob(".ring"))
        assert {"app.tick", "probe.__main__.compute.entry"} <= _names(out)


def test_ctrl_c_ends_attach_with_a_summary(tmp_path):
    with Target(tmp_path) as t:
        p = popen_cli("attach", str(t.pid), "-e", "app.tick", "-o", str(tmp_path / "o"))
        try:
            t.wait_for(lambda s: s["recordings"] == 1)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
        finally:
            stop(p)
        assert p.returncode == 0, err
        assert "app.tick" in err and "stopped by the client" in err
        assert _inactive(t.state())


def test_two_clients_each_own_their_recording(tmp_path):
    with Target(tmp_path) as t:
        a = popen_cli("attach", str(t.pid), "-e", "app.tick", "-o", str(tmp_path / "a"), "--json")
        b = popen_cli("attach", str(t.pid), "-e", "app.other", "-o", str(tmp_path / "b"), "--json")
        try:
            t.wait_for(lambda s: s["recordings"] == 2)
            time.sleep(0.3)
            a.send_signal(signal.SIGINT)
            a.communicate(timeout=30)
            st = t.wait_for(lambda s: s["recordings"] == 1)
            assert st["recordings"] == 1 and st["active"] == ["app.other"]  # b goes on
            time.sleep(0.2)
            b.send_signal(signal.SIGINT)
            b.communicate(timeout=30)
        finally:
            stop(a)
            stop(b)
        assert _names(tmp_path / "a") == {"app.tick"}
        assert _names(tmp_path / "b") == {"app.other"}
        assert _inactive(t.state())


def test_detach_ends_every_session(tmp_path):
    (tmp_path / "u").mkdir()
    with Target(tmp_path) as t, Target(tmp_path / "u") as u:
        procs = [
            popen_cli("attach", str(t.pid), "-o", str(tmp_path / "a")),
            popen_cli("attach", str(t.pid), "-e", "app.other", "-o", str(tmp_path / "b")),
            popen_cli("attach", str(u.pid), "-o", str(tmp_path / "c")),
        ]
        try:
            t.wait_for(lambda s: s["recordings"] == 2)
            u.wait_for(lambda s: s["recordings"] == 1)
            r = cli("detach", str(t.pid), "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"detached": {str(t.pid): 2}}
            for p in procs[:2]:
                _, err = p.communicate(timeout=30)
                assert p.returncode == 0 and "detached by tracemark detach" in err, err
            assert _inactive(t.state())
            assert u.state()["recordings"] == 1  # another process: untouched
            r = cli("detach", "--all")
            assert r.returncode == 0, r.stderr
            assert f"process {u.pid}: 1 session detached" in r.stdout
            procs[2].communicate(timeout=30)
            assert _inactive(u.state())
        finally:
            for p in procs:
                stop(p)


def test_target_killed_while_attached(tmp_path):
    with Target(tmp_path) as t:
        out = tmp_path / "trace"
        p = popen_cli("attach", str(t.pid), "-e", "app.*", "-o", str(out))
        try:
            t.wait_for(lambda s: s["recordings"] == 1)
            time.sleep(0.5)
            t.proc.kill()
            _, err = p.communicate(timeout=30)
        finally:
            stop(p)
        assert p.returncode == 9, err
        assert f"process {t.pid} died while attached" in err
        assert "recovered" in err
        assert {"app.tick", "app.other"} <= _names(out)


def test_live_prints_events_like_view_with_filter(tmp_path):
    with Target(tmp_path) as t:
        r = cli(
            "attach",
            str(t.pid),
            "-e",
            "app.tick",
            "--live",
            "--filter",
            "n % 10 == 3",
            "--duration",
            "0.6",
            "-o",
            str(tmp_path / "o"),
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines, r.stderr
        for line in lines:
            assert f"[{t.pid} worker] app.tick n=" in line
            assert int(line.rsplit("n=", 1)[1]) % 10 == 3
        r = cli(
            "attach",
            str(t.pid),
            "-e",
            "app.other",
            "--live",
            "--json",
            "--duration",
            "0.4",
            "-o",
            str(tmp_path / "j"),
        )
        assert r.returncode == 0, r.stderr
        docs = [json.loads(x) for x in r.stdout.splitlines()]
        assert docs[-1]["summary"]["recorded"] >= len(docs) - 1 > 0
        assert {d["name"] for d in docs[:-1]} == {"app.other"}
        assert all(isinstance(d["fields"]["label"], str) for d in docs[:-1])
        assert _inactive(t.state())


def test_refused_requests_say_why(tmp_path):
    with Target(tmp_path) as t:
        r = cli("attach", str(t.pid), "--probe", "no_such_module:f", "-o", str(tmp_path / "o"))
        assert r.returncode == 6, r.stderr
        assert "refused" in r.stderr and "no_such_module" in r.stderr
        r = cli("attach", str(t.pid), "--probe", "bad spec{", "-o", str(tmp_path / "o"))
        assert r.returncode == 2
        assert _inactive(t.state())


@pytest.mark.parametrize("pid", ["1", "999999999"])
def test_unreachable_processes(pid):
    r = cli("attach", pid)
    assert r.returncode == 7
    assert len(r.stderr.splitlines()) == 1


def test_attach_overwrite_mode_with_a_small_buffer(tmp_path):
    with Target(tmp_path) as t:
        out = tmp_path / "o"
        r = cli(
            "attach",
            str(t.pid),
            "-e",
            "app.tick",
            "--mode",
            "overwrite",
            "--buffer",
            "64K",
            "-o",
            str(out),
            "--duration",
            "0.5",
        )
        assert r.returncode == 0, r.stderr
        events = list(read_trace(str(out)).events())
        assert events and {e.name for e in events} == {"app.tick"}
        r = cli("attach", str(t.pid), "--buffer", "1K", "-o", str(tmp_path / "p"))
        assert r.returncode == 2 and "at least 16K" in r.stderr
        r = cli("attach", str(t.pid), "-o", str(out))  # not empty
        assert r.returncode == 2 and "not an empty directory" in r.stderr
        assert _inactive(t.state())


def test_a_process_that_is_not_python():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = cli("attach", str(sleeper.pid))
        assert r.returncode == 7
        assert (
            r.stderr == f"tracemark attach: error: process {sleeper.pid} is not a Python process\n"
        )
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_detach_all_passes_over_a_process_that_hangs_up(tmp_path):
    # A process exiting while detach --all goes round has nothing left to detach: said, not
    # an error. Here the "process" is this test, listening on its own pid's socket and
    # closing every connection at once.
    import socket as _socket

    from tracemark.control import paths

    path = paths.socket_path(os.getpid(), paths.ensure_private_dir())
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    srv.settimeout(0.1)
    stopping = threading.Event()

    def hang_up():  # ends when told: no thread of this test outlives it
        while not stopping.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    th = threading.Thread(target=hang_up, daemon=True)
    th.start()
    try:
        with Target(tmp_path) as t:
            r = cli("detach", "--all")
            assert r.returncode == 0, r.stderr
            assert f"process {t.pid}: 0 sessions detached" in r.stdout
            assert f"process {os.getpid()}" in r.stderr  # said
    finally:
        stopping.set()
        th.join(10)
        srv.close()
        path.unlink(missing_ok=True)
    assert not th.is_alive()
