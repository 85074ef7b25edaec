"""The control protocol: versioned JSON lines over a Unix stream socket.

Every message is one JSON object on one line (UTF-8, ending in ``\\n``), at most
:data:`MAX_MESSAGE` bytes. A request names its operation and the protocol version::

    {"v": 1, "op": "info"}
    {"v": 1, "op": "markers", "pattern": "*"}
    {"v": 1, "op": "attach", "events": ["net.*"], "probes": ["json:loads"],
     "output": "/abs/dir", "mode": "discard", "buffer": 1048576, "live": false}
    {"v": 1, "op": "stop"}                 (on an attached connection: end the session)
    {"v": 1, "op": "detach"}               (end every session of every client)
    {"v": 1, "op": "snapshot", "output": "/abs/dir"}

A reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "why"}``. An attached
connection also receives ``{"op": "progress", "events": N}``, ``{"op": "events", "list":
[...]}`` (live mode) and finally ``{"op": "ended", "reason": ..., "summary": {...}}``.

Guarantees
----------
* **Parsing is json.loads and nothing else**: no pickle, no eval, no object hooks; what is
  not a JSON object with a known ``op``, the right version and fields of the right types is
  rejected (:class:`ProtocolError`) before anything acts on it.
* **Bounded**: a line longer than :data:`MAX_MESSAGE` is an error, and the reader holds at
  most that much per connection; a reader with a deadline (:class:`LineReader`) gives up on
  a peer that sends too slowly (slowloris).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

__all__ = ["MAX_MESSAGE", "VERSION", "LineReader", "ProtocolError", "encode", "parse_request"]

VERSION = 1
#: The largest message, request or reply, in bytes (one line, with its newline).
MAX_MESSAGE = 64 * 1024

OPS = ("info", "markers", "attach", "stop", "detach", "snapshot")

# op -> {field: (types, required)}
_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "info": {},
    "markers": {"pattern": ((str,), False)},
    "attach": {
        "events": ((list,), False),
        "probes": ((list,), False),
        "output": ((str,), True),
        "mode": ((str,), False),
        "buffer": ((int,), False),
        "live": ((bool,), False),
        "progress": ((int, float), False),
    },
    "stop": {},
    "detach": {},
    "snapshot": {"output": ((str,), False)},
}


class ProtocolError(ValueError):
    """A message that is not one the protocol accepts; the text says why."""


def encode(message: dict[str, Any], limit: int = MAX_MESSAGE) -> bytes:
    """One message as a line; ProtocolError if it would exceed ``limit`` bytes."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {limit}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    """A line as a JSON object (any fields); ProtocolError otherwise."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message is a JSON object")
    return obj


def parse_request(line: bytes) -> dict[str, Any]:
    """A checked request: known op, this version, fields of the right types."""
    obj = decode(line)
    if obj.get("v") != VERSION:
        raise ProtocolError(f"protocol version {obj.get('v')!r} not supported (this is {VERSION})")
    op = obj.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise ProtocolError(f"unknown op {op!r}" if isinstance(op, str) else "no op")
    spec = _FIELDS[op]
    for key in obj:
        if key not in spec and key not in ("v", "op"):
            raise ProtocolError(f"{op}: unknown field {key!r}")
    for key, (types, required) in spec.items():
        if key not in obj:
            if required:
                raise ProtocolError(f"{op}: field {key!r} is required")
            continue
        value = obj[key]
        if isinstance(value, bool) and bool not in types:
            raise ProtocolError(f"{op}: field {key!r} has the wrong type")
        if not isinstance(value, types):
            raise ProtocolError(f"{op}: field {key!r} has the wrong type")
        if isinstance(value, list) and not all(isinstance(x, str) for x in value):
            raise ProtocolError(f"{op}: field {key!r} must be a list of strings")
    return obj


class LineReader:
    """Lines from a socket, each shorter than ``limit`` bytes, each within ``timeout``
    seconds of the wait for it starting (None: wait for ever)."""

    def __init__(self, sock: socket.socket, limit: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.limit = limit
        self.buf = b""

    def readline(self, timeout: float | None) -> bytes | None:
        """The next line (without its newline); None at end of stream. Raises
        ProtocolError (too long), TimeoutError (too slow) or OSError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1 :]
                if len(line) >= self.limit:
                    raise ProtocolError(f"message longer than {self.limit} bytes")
                return line
            if len(self.buf) >= self.limit:
                raise ProtocolError(f"message longer than {self.limit} bytes")
            if deadline is None:
                self.sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("message not received in time")
                self.sock.settimeout(left)
            try:
                data = self.sock.recv(min(1 << 20, self.limit - len(self.buf)))
            except TimeoutError:
                raise TimeoutError("message not received in time") from None
            if not data:
                return None
            self.buf += data

    def poll(self, timeout: float) -> bytes | bool | None:
        """A line if one arrives within ``timeout``; False if none did; None at end of stream."""
        try:
            return self.readline(timeout)
        except TimeoutError:
            return False
