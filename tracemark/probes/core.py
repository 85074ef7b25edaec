"""Which mechanism serves dynamic probes, chosen in one place, with the reason.

* ``sys.monitoring`` (:mod:`.sysmon`) where it exists (``PYBEHAVIOR.sys_monitoring``, Python
  3.12+): per-code-object events, no code is changed, any function with bytecode can be
  probed (source or not).
* ``recompile`` (:mod:`.recompile`) otherwise (Python 3.11): the function's code is compiled
  again from its source with the probe calls added and swapped in through ``__code__``.

``TRACEMARK_PROBES=recompile`` or ``=sys.monitoring`` overrides the choice (the test suite
uses it to run both mechanisms on 3.12+); asking for ``sys.monitoring`` where it does not
exist falls back to ``recompile`` and :data:`REASON` says why.
"""

from __future__ import annotations

import os

from ..env import PYBEHAVIOR
from . import recompile, sysmon

__all__ = ["REASON", "choose"]

#: Why the current mechanism was chosen (for ``tracemark.markers()`` and error messages).
REASON = ""


def choose(requested: str | None = None) -> recompile.Recompile | sysmon.SysMonitoring:
    """A new mechanism object: ``requested``, or ``$TRACEMARK_PROBES``, or the default."""
    global REASON
    want = (requested or os.environ.get("TRACEMARK_PROBES", "")).strip().lower()
    if want not in ("", sysmon.NAME, recompile.NAME):
        raise ValueError(
            f"unknown probe mechanism {want!r}: choose {sysmon.NAME!r} or {recompile.NAME!r}"
        )
    if want == recompile.NAME:
        REASON = f"{recompile.NAME}: requested (TRACEMARK_PROBES={want})"
        return recompile.Recompile()
    if PYBEHAVIOR.sys_monitoring:
        REASON = f"{sysmon.NAME}: " + ("requested" if want else "available (Python 3.12+)")
        return sysmon.SysMonitoring()
    REASON = f"{recompile.NAME}: sys.monitoring isn't available in this version"
    return recompile.Recompile()
