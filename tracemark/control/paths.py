"""Where control sockets live, and the checks that keep them private.

Layout: one directory per user, ``$XDG_RUNTIME_DIR/tracemark/`` when that variable names a
directory the user owns, else ``tracemark-<uid>`` in the system's temporary directory
(``/tmp/tracemark-0``). Each listening process has ``<pid>.sock`` there.

Guarantees
----------
* **The directory is private or not used.** It is created 0700; whether new or found, it is
  opened with ``O_NOFOLLOW | O_DIRECTORY`` and its ``fstat`` must say: a directory, owned by
  this user, no permission bit for group or others. Anything else (a symlink planted in
  ``/tmp``, a directory of another user, one made group-readable) is an
  :class:`UnsafePath` naming what is wrong, and nothing listens.
* **The socket is 0600** and created inside that directory only (so between ``bind`` and
  ``chmod`` nobody else can reach it anyway).
* **Stale sockets are recognised by pid**: a ``<pid>.sock`` whose process is gone (a
  SIGKILLed target leaves one) is ignored by :func:`listening` and removed by
  :func:`clean_stale`, which the CLI calls.
* **Output directories** asked for by a client (:func:`check_output_dir`) must be absolute,
  and no component may be a symlink owned by someone other than this user or root: a
  client cannot make the target write through a link planted by a third user.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = [
    "UnsafePath",
    "check_output_dir",
    "clean_stale",
    "ensure_private_dir",
    "listening",
    "socket_dir",
    "socket_path",
]

SUFFIX = ".sock"


class UnsafePath(OSError):
    """A control directory or output path that fails the privacy checks (the reason says why)."""


def socket_dir(uid: int | None = None) -> Path:
    """The control directory of user ``uid`` (default: this process's effective uid)."""
    me = os.geteuid()
    uid = me if uid is None else uid
    runtime = os.environ.get("XDG_RUNTIME_DIR") if uid == me else f"/run/user/{uid}"
    if runtime:
        try:
            st = os.stat(runtime)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                return Path(runtime) / "tracemark"
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / f"tracemark-{uid}"


def candidate_dirs(uid: int) -> list[Path]:
    """Where a process of user ``uid`` may have put its socket: its runtime directory (when
    it had one) and the temporary one; this user's own directory first."""
    found = [socket_dir(uid)]
    for other in (
        Path(f"/run/user/{uid}") / "tracemark",
        Path(tempfile.gettempdir()) / f"tracemark-{uid}",
    ):
        if other not in found:
            found.append(other)
    return found


def ensure_private_dir(path: Path | None = None) -> Path:
    """Create (0700) or check this user's control directory; return it. UnsafePath if it
    is not a directory of ours that only we can enter."""
    path = socket_dir() if path is None else path
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UnsafePath(
            f"{path}: not a directory we can use (a symlink?): {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{path}: owned by uid {st.st_uid}, not by us ({os.geteuid()})")
    if st.st_mode & 0o077:
        raise UnsafePath(f"{path}: mode {stat.S_IMODE(st.st_mode):o} lets others in (must be 700)")
    return path


def socket_path(pid: int, directory: Path | None = None) -> Path:
    return (socket_dir() if directory is None else directory) / f"{pid}{SUFFIX}"


def pid_of(path: Path) -> int | None:
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else ""
    return int(stem) if stem.isdigit() else None


def _alive(pid: int) -> bool:
    from ..ctf.recovery import pid_alive

    return pid_alive(pid)


def listening(directory: Path | None = None) -> list[tuple[int, Path]]:
    """``(pid, socket)`` of every process with a socket in ``directory`` that is alive,
    sorted by pid (stale sockets are skipped, not removed: see :func:`clean_stale`)."""
    directory = socket_dir() if directory is None else directory
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        p = directory / name
        pid = pid_of(p)
        if pid is not None and _alive(pid):
            found.append((pid, p))
    return sorted(found)


#: A socket younger than this that refuses connections may be one whose process has bound
#: it and not yet called listen(): left alone.
SETTLE_SECONDS = 5.0


def _nobody_listens(p: Path) -> bool:
    """True when connecting to the socket ``p`` is refused for good: its process died and
    its pid now belongs to another process (a socket left by SIGKILL), or it stopped
    listening. Only the CLI calls this (a connection it opens is closed at once)."""
    import socket
    import time

    try:
        if time.time() - os.lstat(p).st_mtime < SETTLE_SECONDS:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(p))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def clean_stale(directory: Path | None = None) -> list[int]:
    """Remove the sockets (and flight recorder directories) of processes that are gone,
    and sockets nobody listens on any more (their pid reused: :func:`_nobody_listens`);
    return their pids."""
    directory = socket_dir() if directory is None else directory
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        p = directory / name
        if name.startswith("flight-") and name[7:].isdigit() and not _alive(int(name[7:])):
            import shutil

            shutil.rmtree(p, ignore_errors=True)  # a flight recorder its process left
            continue
        pid = pid_of(p)
        if pid is None or (_alive(pid) and not _nobody_listens(p)):
            continue
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                os.unlink(p)
                removed.append(pid)
        except OSError:
            pass
    return sorted(removed)


def check_output_dir(path: str) -> Path:
    """The directory a client asked the target to record into, checked (see the module
    docstring) and created; UnsafePath or OSError if it cannot be used."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise UnsafePath(f"output directory {path!r} is not a path")
    p = Path(path)
    if not p.is_absolute():
        raise UnsafePath(f"output directory {path!r} is not absolute")
    if ".." in p.parts:
        raise UnsafePath(f"output directory {path!r} has '..' in it")
    me = os.geteuid()
    current = Path(p.anchor)
    for part in p.parts[1:]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break  # the rest is created below, by us
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (me, 0):
            raise UnsafePath(f"{current}: a symlink owned by uid {st.st_uid}, not followed")
    p.mkdir(parents=True, exist_ok=True)
    if not p.resolve().is_dir():
        raise UnsafePath(f"{path}: not a directory")
    return p
