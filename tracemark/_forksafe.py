"""Locks that a fork child gets back unlocked.

Only the forking thread survives a fork. A lock that another thread held at that moment stays
held forever in the child, and the child's first ``probe()``, ``connect()`` or printed line
waits on it for good. A lock made here is reset in the child (``os.register_at_fork``), like
the locks of :mod:`logging` handlers::

    _lock = fork_safe_rlock()           # a module's lock: one line
    self._lock = fork_safe_lock()       # an instance's lock: the same

Every lock of the package is made here (``tests/test_fork_locks.py`` lists them, and fails on
one it does not know); a lock made any other way must say why it needs no reset.

The objects are the ordinary ``threading`` locks (no wrapper, nothing slower): they are kept
in a weak set and, in the child, reinitialised in place (``_at_fork_reinit``, what
``threading`` and ``logging`` themselves use), so every reference to them stays valid.

Guarantees and limits
---------------------
* In a fork child every such lock that another thread held is free before any other
  ``after_in_child`` hook of the package runs: hooks run in the order they were registered,
  and this one is registered on the package's import (by :mod:`tracemark.faults`), before
  all others. So the recorder's own fork hook can take its locks.
* An :func:`fork_safe_rlock` that the *forking* thread itself held is left as it is: that
  thread goes on in the child and releases it as usual.
* A plain :func:`fork_safe_lock` has no owner to ask: forking while the same thread holds it
  leaves it free in the child, where the thread's own release then raises. Use an RLock
  where a fork may happen inside the locked block.
* The data a lock guards is whatever the holder left it in: code that resets a lock this way
  must keep its data consistent by single assignments (tracemark's tables are replaced, not
  mutated in place, for this reason and for the firing threads).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["fork_safe_lock", "fork_safe_rlock"]

_locks: weakref.WeakSet[Any] = weakref.WeakSet()


def fork_safe_lock() -> Any:
    """A ``threading.Lock`` that a fork child gets back unlocked."""
    lock = threading.Lock()
    _locks.add(lock)
    return lock


def fork_safe_rlock() -> Any:
    """A ``threading.RLock`` that a fork child gets back unlocked, unless the forking thread
    holds it itself."""
    lock = threading.RLock()
    _locks.add(lock)
    return lock


def _reinit_in_child() -> None:
    for lock in list(_locks):
        owned = getattr(lock, "_is_owned", None)
        if owned is not None and owned():
            continue  # held by the thread that forked: it releases it itself
        lock._at_fork_reinit()


os.register_at_fork(after_in_child=_reinit_in_child)
