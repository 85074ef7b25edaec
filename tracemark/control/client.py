"""The client side: find a process's socket, connect, ask.

:func:`connect` says precisely why a process cannot be reached (:class:`Unreachable` with a
``kind``: ``no-process``, ``not-listening``, ``not-python``, ``other-user``), so the CLI can
give one line and a documented exit code.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from . import paths
from .protocol import VERSION, LineReader, decode, encode
from .server import MAX_REPLY

__all__ = ["Client", "Unreachable", "connect", "find_socket"]


class Unreachable(Exception):
    """A process that cannot be controlled; ``kind`` says why (see the module docstring)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _is_python(pid: int) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    if "python" in exe:
        return True
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"libpython" in f.read()
    except OSError:
        return False


def find_socket(pid: int) -> Path:
    """The socket of process ``pid``, or Unreachable saying why there is none."""
    from ..ctf.recovery import pid_alive

    if pid <= 0 or not pid_alive(pid):
        raise Unreachable(f"no process {pid}", "no-process")
    uid = _owner(pid)
    me = os.geteuid()
    if uid is not None and uid != me and me != 0:
        raise Unreachable(
            f"process {pid} belongs to uid {uid}: only that user or root may control it",
            "other-user",
        )
    for directory in paths.candidate_dirs(me if uid is None else uid):
        candidate = paths.socket_path(pid, directory)
        try:
            if os.path.exists(candidate):
                return candidate
        except OSError:
            continue
    if not _is_python(pid):
        raise Unreachable(f"process {pid} is not a Python process", "not-python")
    raise Unreachable(
        f"process {pid} does not listen (start it with TRACEMARK_CONTROL=1 in its "
        "environment, or call tracemark.control.listen())",
        "not-listening",
    )


class Client:
    """One connection to a target."""

    def __init__(self, pid: int, timeout: float = 10.0) -> None:
        self.pid = pid
        self.timeout = timeout
        path = find_socket(pid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except PermissionError:
            sock.close()
            raise Unreachable(f"process {pid}: permission denied on {path}", "other-user") from None
        except OSError as exc:  # a socket left by a process that no longer listens
            sock.close()
            raise Unreachable(
                f"process {pid} does not listen ({path}: {exc.strerror or exc})",
                "not-listening",
            ) from None
        self.sock = sock
        self.reader = LineReader(sock, MAX_REPLY)

    def send(self, op: str, **fields: Any) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(encode({"v": VERSION, "op": op, **fields}))

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None if the target closed the connection."""
        try:
            line = self.reader.readline(self.timeout if timeout is None else timeout)
        except ConnectionResetError:
            return None
        if line is None:
            return None
        return decode(line)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request, return the reply; RuntimeError with the target's reason if not ok."""
        self.send(op, **fields)
        reply = self.receive()
        if reply is None:
            raise ConnectionError(f"process {self.pid} closed the connection")
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error", "refused")))
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(pid: int, timeout: float = 10.0) -> Client:
    """A connection to process ``pid``; :class:`Unreachable` if there is none to be had."""
    return Client(pid, timeout)
