"""10,000 fuzzed, malformed, oversized and slow messages against a live target at work:
its results stay right, its memory bounded, every connection is answered or closed."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

from control_helpers import Target

from tracemark.control import paths
from tracemark.control.protocol import MAX_MESSAGE

MESSAGES = 10_000
SLOW = 8  # slowloris connections held open meanwhile


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _message(rng: random.Random, out: str) -> bytes:
    kind = rng.randrange(12)
    valid = {"v": 1, "op": rng.choice(["info", "markers", "detach", "snapshot", "stop"])}
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\n"
    if kind == 1:
        return b"x" * (MAX_MESSAGE + rng.randrange(1, 5000))  # oversized, no newline
    if kind == 2:
        return b"[" * rng.randrange(1, 60000) + b"\n"  # nested past the recursion limit
    if kind == 3:
        return (
            json.dumps(
                {"v": 1, "op": rng.choice(["eval", "exec", "pickle", "", "x" * 50])}
            ).encode()
            + b"\n"
        )
    if kind == 4:
        return json.dumps({"v": rng.choice([0, 2, "1", None, 1.0]), "op": "info"}).encode() + b"\n"
    if kind == 5:  # a valid request with a wrongly typed or unknown field
        bad = dict(
            valid, **{rng.choice(["pattern", "output", "zz"]): rng.choice([1, [], {}, None])}
        )
        return json.dumps(bad).encode() + b"\n"
    if kind == 6:  # attach with garbage
        return (
            json.dumps(
                {
                    "v": 1,
                    "op": "attach",
                    "output": rng.choice(["rel", "", "/a/../b", out]),
                    "probes": [rng.choice(["os:system", "x", "__import__('os')", "{"])],
                    "mode": rng.choice(["discard", "bogus"]),
                }
            ).encode()
            + b"\n"
        )
    if kind == 7:
        return json.dumps(valid).encode()[: rng.randrange(1, 20)]  # cut short, then closed
    if kind == 8:
        return b"\n"
    if kind == 9:
        return json.dumps([valid]).encode() + b"\n"
    if kind == 10:
        return (json.dumps({"v": 1, "op": "markers", "pattern": "[" * 1000}) + "\n").encode()
    return json.dumps(valid).encode() + b"\n"


def _send_one(path: str, data: bytes) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the target closed first (an oversized message): that is an answer too
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                return "closed"
            got += chunk
        reply = json.loads(got.splitlines()[0])
        assert isinstance(reply, dict) and "ok" in reply, reply
        return "answered"
    except ConnectionResetError:
        return "closed"
    finally:
        s.close()


def test_fuzz_against_a_working_target(tmp_path):
    with Target(tmp_path) as t:
        path = str(paths.socket_path(t.pid))
        before = t.state()
        rss_before = _rss_kib(t.pid)
        rng = random.Random(1234)
        messages = [_message(rng, str(tmp_path / "fuzz-out")) for _ in range(MESSAGES)]

        slow = []
        for _ in range(SLOW):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(b'{"v":1,')  # and never more
            slow.append(s)

        outcomes: dict[str, int] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()
        chunks = [messages[i::6] for i in range(6)]

        def run(chunk):
            try:
                for m in chunk:
                    r = _send_one(path, m)
                    with lock:
                        outcomes[r] = outcomes.get(r, 0) + 1
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
        started = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not errors, errors[:3]
        assert sum(outcomes.values()) == MESSAGES, outcomes
        assert outcomes.get("answered", 0) > MESSAGES // 2, outcomes

        # The slow ones were dropped by the per-message read timeout.
        for s in slow:
            s.settimeout(max(1.0, 10 - (time.monotonic() - started)))
            try:
                data = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                data = b"timeout"
            assert data == b"" or b"not received in time" in data, data
            s.close()

        # A connection's thread ends just after its last reply: give the last ones a moment.
        expected = ["MainThread", "tracemark-control", "worker"]
        after = t.wait_for(lambda s: s["threads"] == expected, timeout=10)
        assert after["results_ok"] and after["results"] > before["results"]
        assert after["recordings"] == 0 and after["probes"] == 0 and after["active"] == []
        assert after["same"] == before["same"]
        assert after["threads"] == expected
        assert _rss_kib(t.pid) - rss_before < 40 * 1024, (rss_before, _rss_kib(t.pid))
