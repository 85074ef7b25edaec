"""Targets for the tests of tracemark.control: Python processes that listen, driven over
stdin (one command a line, one JSON answer a line), always killed at the end of the test."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TARGET = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import tracemark
    from tracemark import probes
    from tracemark.tracers.recording import lifecycle

    tick = tracemark.marker("app.tick", "n=%d", doc="One tick of the work loop.")
    other = tracemark.marker("app.other", "label=%s")

    def work(n):
        tick(n)
        return n * 2

    def side(n):
        other(str(n))
        return n

    def compute(x, y):
        return x * y + 1

    ORIG = {}  # the code each function runs at the first "state" (patched by then)
    results = []
    stop = False

    def loop():
        n = 0
        while not stop:
            results.append(work(n) + side(n) + compute(n, 3))
            n += 1
            time.sleep(0.0005)

    worker = threading.Thread(target=loop, name="worker", daemon=True)
    worker.start()

    def state():
        while not ORIG and len(results) < 2:
            time.sleep(0.01)  # every function ran once: the patcher has done its work
        if not ORIG:
            ORIG.update(work=work.__code__, side=side.__code__, compute=compute.__code__)
        ms = tracemark.markers("app.*")
        return {
            "pid": os.getpid(),
            "same": {k: globals()[k].__code__ is v for k, v in ORIG.items()},
            "equal": {k: globals()[k].__code__ == v for k, v in ORIG.items()},
            "active": sorted(m.name for m in tracemark.markers() if m.active),
            "mechanisms": sorted({s.mechanism for m in ms for s in m.sites}),
            "probes": len(probes.probes()),
            "recordings": len(lifecycle.active),
            "threads": sorted(t.name for t in threading.enumerate()),
            "results_ok": all(r == 2 * i + i + 3 * i + 1 for i, r in enumerate(list(results))),
            "results": len(results),
        }

    def child_report(w):
        import tracemark.control.server as srv
        from tracemark.control import paths
        own = paths.socket_path(os.getpid()).exists()
        threads = sorted(t.name for t in threading.enumerate())
        tracemark.control.listen()
        after = paths.socket_path(os.getpid()).exists()
        st = state()
        os.write(w, json.dumps({"own_before": own, "threads": threads, "own_after": after,
                                "server_pid": srv.server().pid, "state": st}).encode() + b"\\n")

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "state":
            print(json.dumps(state()), flush=True)
        elif cmd == "fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    child_report(w)
                    time.sleep(0.3)
                finally:
                    os._exit(0)
            os.close(w)
            data = b""
            while not data.endswith(b"\\n"):
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
            os.waitpid(pid, 0)
            rep = json.loads(data or b"{}")
            rep["child"] = pid
            print(json.dumps(rep), flush=True)
        elif cmd == "exit":
            stop = True
            worker.join()
            break
    """
)


class Target:
    """A listening Python process running TARGET (or ``script``)."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        script: str = TARGET,
        preexec_fn: Any = None,
        python: str = sys.executable,
    ) -> None:
        path = tmp / "target.py"
        path.write_text(script)
        if preexec_fn is not None:
            os.chmod(tmp, os.stat(tmp).st_mode & 0o777 | 0o755)  # another user runs it
            os.chmod(path, 0o644)
        full = dict(os.environ)
        full["PYTHONPATH"] = str(ROOT)
        full["TRACEMARK_CONTROL"] = "1"
        full.update(env or {})
        self.proc = subprocess.Popen(
            [python, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=full,
            cwd=tmp,
            preexec_fn=preexec_fn,
        )
        self.pid = self.proc.pid
        first = self.read(timeout=30)
        self.uid = os.stat(f"/proc/{self.pid}").st_uid
        assert first.get("ready") == self.pid, first

    def read(self, timeout: float = 10) -> dict[str, Any]:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        assert ready, "the target did not answer in time"
        line = out.readline()
        assert line, f"the target ended (exit code {self.proc.poll()})"
        return json.loads(line)

    def ask(self, cmd: str, timeout: float = 10) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def state(self) -> dict[str, Any]:
        return self.ask("state")

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if predicate(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.02)

    def exit(self, timeout: float = 10) -> int:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"exit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        # A killed target leaves its socket (the CLI cleans such stale ones): not ours to keep.
        from tracemark.control import paths

        for d in paths.candidate_dirs(getattr(self, "uid", os.geteuid())):
            paths.socket_path(self.pid, d).unlink(missing_ok=True)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def cli(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``python -m tracemark ARGS``; its output as text."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("TRACEMARK_CONTROL", None)
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def popen_cli(*args: str, **kwargs: Any) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("TRACEMARK_CONTROL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tracemark", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
