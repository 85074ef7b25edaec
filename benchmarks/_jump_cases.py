"""The program ``bench_jumps`` runs under callgrind: call one case N times.

``python -m benchmarks._jump_cases CASE N`` warms CASE up (so that the interpreter has
specialised it) and then calls it N times from a function. The cases differ only in what an
inactive marker statement leaves in the function; see :mod:`benchmarks.bench_jumps`.
"""

from __future__ import annotations

import dis
import sys

import tracemark

rx = tracemark.marker("bench.jumps", "len=%d dev=%s")
flag = False


def without(n, dev):
    total = n + 1
    return total


def reassigned(n, dev):
    total = n + 1
    return total


def patched(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def jump_only(n, dev):
    rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


rx_rebound = rx  # the same marker under a name of its own, rebound by _prepare


def rebound(n, dev):
    rx_rebound(len(dev) + n, dev.upper())
    total = n + 1
    return total


def guarded(n, dev):
    if flag:
        rx(len(dev) + n, dev.upper())
    total = n + 1
    return total


def _unguarded(func) -> None:
    """Make ``func``'s patched jump land on the statement after the marker directly, past
    the rebinding guard: what the patch would cost with no guard at all."""
    code = func.__code__
    ins = list(dis.get_instructions(code))
    jump = ins[1]
    assert jump.opname == "JUMP_FORWARD" and jump.offset == 2, jump
    # The guard ends with a jump back to the statement after the marker.
    back = next(
        (i for i in ins if i.opname.startswith("JUMP_BACKWARD") and i.offset > jump.argval), None
    )
    if back is None:
        return  # no guard: a dictionary watcher stands in for it (3.12+, C core)
    raw = bytearray(code.co_code)
    raw[3] = (back.argval - 4) // 2  # JUMP_FORWARD counts code units after itself
    func.__code__ = code.replace(co_code=bytes(raw))


def _prepare() -> None:
    # Same code, new code object: what any __code__ assignment does to the function.
    reassigned.__code__ = reassigned.__code__.replace()
    tracemark.patch(patched)
    tracemark.patch(jump_only)
    _unguarded(jump_only)
    tracemark.patch(rebound)
    # Rebinding the name (to something else and back: storing the same object changes
    # nothing and tells no watcher) puts the guard back for good where a dictionary watcher
    # stood in for it: what a module that rebinds its markers runs.
    globals()["rx_rebound"] = None
    globals()["rx_rebound"] = rx


def _loop(f, n: int) -> None:
    for _ in range(n):
        f(1500, "eth0")


CASES = ("without", "reassigned", "jump_only", "patched", "rebound", "guarded")

if __name__ == "__main__":
    _prepare()
    case, n = sys.argv[1], int(sys.argv[2])
    f = globals()[case]
    _loop(f, 500)  # specialised by now
    _loop(f, n)
