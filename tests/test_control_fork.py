"""fork() in a listening target: the child does not listen unless it asks to, never on the
parent's socket, and keeps no client's session."""

from __future__ import annotations

import time

from control_helpers import Target, cli, popen_cli, stop

from tracemark.control import paths
from tracemark.control.client import connect


def test_fork_child_does_not_serve_the_parents_socket(tmp_path):
    with Target(tmp_path) as t:
        p = popen_cli(
            "attach",
            str(t.pid),
            "-e",
            "app.*",
            "--probe",
            "__main__:compute",
            "-o",
            str(tmp_path / "o"),
        )
        try:
            t.wait_for(lambda s: s["recordings"] == 1 and s["probes"] == 1)
            rep = t.ask("fork", timeout=30)
            child = rep["child"]
            assert rep["own_before"] is False  # no socket of its own until it asks
            assert "tracemark-control" not in rep["threads"]
            assert "tracemark-control-client" not in rep["threads"]
            assert rep["own_after"] is True and rep["server_pid"] == child
            # The parent's client's session is not the child's: ended there.
            assert rep["state"]["recordings"] == 0 and rep["state"]["probes"] == 0
            assert rep["state"]["active"] == []
            # The parent goes on: still attached, still answering on its socket.
            st = t.state()
            assert st["recordings"] == 1 and st["probes"] == 1
            for _ in range(20):
                with connect(t.pid) as c:
                    assert c.request("info")["pid"] == t.pid
            assert paths.socket_path(t.pid).exists()
            # The child left by os._exit(): its socket is stale, ignored, cleaned by the CLI.
            assert child not in [pid for pid, _ in paths.listening()]
            assert child in paths.clean_stale()
        finally:
            stop(p, sig=2)
        time.sleep(0.1)
        r = cli("list", str(t.pid))
        assert r.returncode == 0
