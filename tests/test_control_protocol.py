"""tracemark.control.protocol: JSON lines, checked, bounded, never code."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tracemark.control import protocol as P


def req(**kw):
    return json.dumps({"v": 1, **kw}).encode()


def test_known_requests_parse():
    assert P.parse_request(req(op="info"))["op"] == "info"
    r = P.parse_request(req(op="attach", output="/x", events=["a.*"], probes=["json:loads"]))
    assert r["events"] == ["a.*"]


@pytest.mark.parametrize(
    "line, why",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"op"', "JSON object"),
        (json.dumps({"op": "info"}).encode(), "version"),
        (json.dumps({"v": 2, "op": "info"}).encode(), "version"),
        (req(op="exec"), "unknown op"),
        (req(op="__import__('os').system('id')"), "unknown op"),
        (req(), "no op"),
        (req(op="info", extra=1), "unknown field"),
        (req(op="attach"), "required"),
        (req(op="attach", output=1), "wrong type"),
        (req(op="attach", output="/x", live="yes"), "wrong type"),
        (req(op="attach", output="/x", buffer=True), "wrong type"),
        (req(op="attach", output="/x", events=[1]), "list of strings"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100000, "not JSON"),
        (b'{"v":1,"op":"info","__class__":{"py/object":"os.system"}}', "unknown field"),
    ],
)
def test_bad_requests_are_refused(line, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.parse_request(line)


def test_encode_limit():
    with pytest.raises(P.ProtocolError):
        P.encode({"x": "a" * P.MAX_MESSAGE})
    assert P.encode({"op": "x"}).endswith(b"\n")


def _pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_reader_lines_and_end():
    a, b = _pair()
    with a, b:
        b.sendall(b'{"a":1}\n{"b":2}\n')
        b.shutdown(socket.SHUT_WR)
        r = P.LineReader(a)
        assert r.readline(1) == b'{"a":1}'
        assert r.readline(1) == b'{"b":2}'
        assert r.readline(1) is None


def test_reader_refuses_oversized_lines_without_holding_them():
    a, b = _pair()
    with a, b:
        t = threading.Thread(target=lambda: b.sendall(b"x" * (P.MAX_MESSAGE * 3)), daemon=True)
        t.start()
        r = P.LineReader(a)
        with pytest.raises(P.ProtocolError, match="longer"):
            r.readline(5)
        assert len(r.buf) <= P.MAX_MESSAGE
        a.close()
        t.join(5)


def test_reader_deadline_is_per_message_slowloris():
    a, b = _pair()
    with a, b:
        r = P.LineReader(a)

        def drip():
            for _ in range(20):
                try:
                    b.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            r.readline(0.3)  # a byte every 50 ms does not extend the deadline
        assert time.monotonic() - started < 0.6
        t.join(5)
