"""Switching patched sites on and off while 8 threads call the patched functions."""

from __future__ import annotations

import sys
import threading
import time

import pytest

import tracemark
from tracemark.patching import patcher


@pytest.fixture
def worker_module(tmp_path, monkeypatch, uniq):
    src = tmp_path / f"thr_{uniq}.py"
    src.write_text(
        "import tracemark\n"
        f"a = tracemark.marker('{uniq}.a', 'token=%d')\n"
        f"b = tracemark.marker('{uniq}.b', 'token=%d')\n"
        "def work(token, xs):\n"
        "    total = 0\n"
        "    for x in xs:\n"
        "        a(token)\n"
        "        total += x\n"
        "    try:\n"
        "        return total\n"
        "    finally:\n"
        "        b(token)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    (site_a, site_b) = sorted(tracemark.patch(mod), key=lambda s: s.marker)
    assert site_a.patched and site_b.patched
    return mod


def test_eight_threads_call_while_sites_switch(worker_module, uniq):
    received = {"a": set(), "b": set()}
    lock = threading.Lock()

    def probe(marker, args):
        with lock:
            received[marker.name[-1]].add(args[0])

    # Odd epochs run from connect() returning to disconnect() being called; a call that starts
    # and ends in one odd epoch must be traced by the markers live in it.
    epoch = [0]
    live_in: dict[int, str] = {}
    must_see = {"a": set(), "b": set()}
    errors: list = []
    stop = threading.Event()
    tokens = iter(range(10**9))
    xs = [1, 2, 3]

    def call():
        try:
            while not stop.is_set():
                token = next(tokens)
                before = epoch[0]
                if worker_module.work(token, xs) != 6:
                    errors.append(("wrong result", token))
                if before == epoch[0] and before % 2:
                    for k in live_in[before]:
                        must_see[k].add(token)
        except BaseException as exc:  # pragma: no cover - would be the failure
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=call) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for i in range(60):
            name = "ab"[i % 2]
            conn = tracemark.connect(f"{uniq}.{name}" if i % 3 else f"{uniq}.*", probe)
            live_in[epoch[0] + 1] = name if i % 3 else "ab"
            epoch[0] += 1
            time.sleep(0.002)
            epoch[0] += 1
            tracemark.disconnect(conn)
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    assert errors == []
    assert must_see["a"] and must_see["b"]
    assert must_see["a"] <= received["a"]  # every call that started while live was traced
    assert must_see["b"] <= received["b"]
    unit = patcher._units[id(worker_module.work.__code__)]
    assert worker_module.work.__code__ is unit.mapping()[id(unit.root)]  # back to inactive


def test_a_loop_running_unpatched_code_looks_once_per_switch(tmp_path, monkeypatch, uniq):
    """A frame that started before its function was patched runs the original code to its
    end, firing the (inactive) marker through the plain path each iteration: the patcher
    looks for function objects holding that code once per switch, not once per iteration,
    and never searches the heap."""
    src = tmp_path / f"loop_{uniq}.py"
    src.write_text(
        "import tracemark\n"
        f"a = tracemark.marker('{uniq}.a', 'i=%d')\n"
        "def loop(n, during):\n"
        "    for i in range(n):\n"
        "        a(i)\n"
        "        if i == 0:\n"
        "            during()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(src.stem)
    heap, looks = [], []
    real_near = patcher._near

    def near(frame, code):
        if code.co_name == "loop":
            looks.append(code)
        return real_near(frame, code)

    monkeypatch.setattr(patcher.gc, "get_referrers", lambda *objs: heap.append(objs) or [])
    monkeypatch.setattr(patcher, "_near", near)

    def during():  # the loop is running its original code now: switch it twice
        with tracemark.connect(f"{uniq}.a", lambda marker, args: None):
            pass
        assert mod.loop.__code__ is not original  # patched meanwhile

    original = mod.loop.__code__
    mod.loop(500, during)
    assert heap == []  # no nested code: not even the switch searches
    assert 1 <= len(looks) <= 3  # once per switch (two), not ~500; the module found `loop`
