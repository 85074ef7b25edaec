"""Errors of the machine, told apart from errors of a trace.

A trace read or written while the process has no file descriptor left (EMFILE), the system
none (ENFILE), the disk no space (ENOSPC, EDQUOT), or the user no permission (EACCES, EPERM,
EROFS) fails for a reason that has nothing to do with the trace's bytes: saying "corrupt
trace" would send the user to repair a trace that is fine. :func:`environment_error` finds
such an OSError behind any exception (the reader turns a failed read into a TraceError, whose
``__context__`` keeps the OSError), so every reader and writer of traces asks the same
question and the CLI reports it as what it is (the OS error, the path, what to do).
"""

from __future__ import annotations

import errno

__all__ = ["ENVIRONMENT_ERRNOS", "environment_error", "hint"]

#: errno values that say something about the machine, never about a trace's contents.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOMEM")
    if hasattr(errno, name)
)


def environment_error(exc: BaseException | None) -> OSError | None:
    """The OSError with an errno of :data:`ENVIRONMENT_ERRNOS` that ``exc`` is or was raised
    from or while handling (a few links deep), or None."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def hint(exc: OSError) -> str:
    """What to do about ``exc`` (one of :data:`ENVIRONMENT_ERRNOS`), in a few words."""
    if exc.errno == errno.EMFILE:
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            return f"this process may open {soft} files: raise the limit (ulimit -n)"
        except (ImportError, OSError, ValueError):
            return "raise the limit of open files (ulimit -n)"
    if exc.errno == errno.ENFILE:
        return "the system's table of open files is full (fs.file-max): close some programs"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "the disk (or quota) is full: free some space or use another directory"
    if exc.errno == errno.EROFS:
        return "the file system is read-only: use another directory"
    if exc.errno == errno.ENOMEM:
        return "out of memory"
    return "permission denied: check the owner and mode of the path (ls -l)"
