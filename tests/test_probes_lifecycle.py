"""Dynamic probes over a long life: removal leaves nothing that fires or grows, probing stays
cheap, and a fork child is never stuck on a lock another thread held (issues 10 and 16)."""

import io
import os
import signal
import threading
import time
import warnings

import probe_shapes as shapes
import pytest

import tracemark
from tracemark import probes as P

pytestmark = pytest.mark.usefixtures("mech")  # every test, on every mechanism


def _fork_and_wait(child, timeout=20.0):
    """Run ``child()`` in a fork child; its exit status (124 if it hung and was killed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 124


# --- fork while another thread holds a lock (issue 10 item 4) ---


@pytest.mark.parametrize("which", ["probes", "mechanism", "printer"])
def test_fork_while_another_thread_holds_a_probe_or_printer_lock(mech, which):
    printer = tracemark.Printer(io.StringIO())
    lock = {"probes": P._lock, "mechanism": mech._lock, "printer": printer._lock}[which]
    held, release = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)

        def child():
            h = tracemark.probe("probe_shapes:plain")  # the probe and mechanism locks
            with tracemark.connect(h.name, printer):  # the printer's lock on each event
                assert shapes.plain(1, 2) == 3
            tracemark.unprobe(h)
            assert "probe.probe_shapes.plain.entry: a=1 b=2" in printer.file.getvalue()

        assert _fork_and_wait(child) == 0
    finally:
        release.set()
        t.join()
