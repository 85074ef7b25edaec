"""Live control: attach to a running process, trace it, detach, and it is free again.

LTTng's session daemon, for Python processes, in-process. A process opts in with
``TRACEMARK_CONTROL=1`` in its environment (read when tracemark is imported), with
:func:`listen` from code, or :func:`flight` (a flight recorder that ``tracemark snapshot``
writes out). It then listens on a private Unix socket; the CLI (``tracemark ps``, ``list
PID``, ``attach``, ``detach``, ``snapshot``) talks to it. A process that did not opt in has
no thread and no socket.

=================  ==========================================================================
:mod:`.paths`      the private socket directory, its checks, stale sockets, output paths
:mod:`.protocol`   versioned JSON lines, bounded, parsed by ``json`` and nothing else
:mod:`.server`     the daemon thread in ``accept()``, sessions owned by their connection
:mod:`.client`     what the CLI uses to reach a process
=================  ==========================================================================

Security model: only the same user or root (0700 directory owned by the user and not a
symlink, 0600 socket, and ``SO_PEERCRED`` checked on every connection); requests carry data
only (globs, probe specs parsed by :func:`tracemark.probes.parse_spec`, paths checked by
:func:`.paths.check_output_dir`), never code. Ownership: everything a client installs ends
with its connection. Fork: the child does not listen (see :mod:`.server`).
"""

from __future__ import annotations

from .paths import UnsafePath
from .server import flight, listen

__all__ = ["UnsafePath", "flight", "listen"]


def _is_the_cli() -> bool:
    """The ``tracemark`` command itself (``python -m tracemark``, the ``tracemark`` script)
    does not listen: a shell that exports TRACEMARK_CONTROL=1 would list ``tracemark ps``."""
    import os
    import sys

    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "tracemark":
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "tracemark"


def _start_from_environment() -> None:
    """``TRACEMARK_CONTROL`` / ``TRACEMARK_FLIGHT`` at import of tracemark: listen (and keep
    the flight recording). A failure is one line on stderr; the program runs on without."""
    import os
    import sys

    from .. import env

    if _is_the_cli():
        return
    try:
        if env.FLIGHT:
            globs = [g.strip() for g in env.FLIGHT.split(",") if g.strip()]
            flight(globs if len(globs) != 1 else globs[0])
        else:
            listen()
    except Exception as exc:
        sys.stderr.write(f"tracemark: process {os.getpid()} does not listen for control: {exc}\n")
