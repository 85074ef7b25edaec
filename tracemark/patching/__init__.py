"""Zero-cost inactive markers: jump over marker statements by rewriting code objects.

An inactive marker statement inside a function (``rx(len(pkt), dev)``, ``mod.rx(...)``,
``tracemark.mark("a.b", "%d", x)``) costs about one jump once its function is patched, and
its arguments are not evaluated. The kernel patches a NOP into a JMP; here each function gets
a variant of its code object in which the first instruction of every inactive marker
statement is a forward jump past the statement, and ``func.__code__`` is swapped to the
variant for the set of markers active now.

Layout
------
* :mod:`.bytecode`: every version-specific fact about CPython bytecode (3.11-3.13): reading
  instructions and positions, finding each compiled copy of a statement, writing the guarded
  jump, parsing and extending the exception and location tables, verifying a variant.
* :mod:`.finder`: marker statements from the function's source (``ast``), mapped to
  instructions by their exact source span; which statements must keep running, and what
  guards each jump.
* :mod:`.patcher`: the policy (lazy on first run, :func:`patch` on demand, switching on
  connect/disconnect), the variant cache, and the per-site report in ``tracemark.markers()``.

Guarantees
----------
* Semantics are preserved: a patched function returns, raises, yields and awaits exactly as
  the original, with the same line numbers in tracebacks, ``inspect.getsource`` and ``dis``
  output; an inactive marker statement's arguments are not evaluated (as if it were absent).
* Every variant is verified before it is installed; a site that cannot be patched safely
  (module level, lambdas, exec'd code, a free-threaded build, ``TRACEMARK_NOPATCH=1``, a
  statement the verifier rejects) keeps the plain call path and says why in
  ``tracemark.markers()[i].sites``.
* A statement whose arguments are part of the program -- they bind a name (``:=``, also in a
  comprehension) or ``yield`` / ``yield from`` / ``await`` -- is never jumped over: it keeps
  the plain call path, and its site says why. Lambdas, comprehensions and generator
  expressions without them are patched (they bind in their own scope; PEP 709 comprehensions
  restore what they bind).
* A site calls whatever its name refers to when it runs: the jump is guarded by the name
  (the global, builtin or closure variable ``rx`` of ``rx(...)``), so rebinding it after
  patching, even while the marker is inactive, runs the statement as written. For
  ``mod.rx(...)`` and ``tracemark.mark(...)`` only ``mod`` / ``tracemark`` is guarded: an
  assignment to ``mod.rx`` is not noticed while ``rx`` is inactive (details in
  :mod:`.patcher`). The guard costs a few ns per inactive statement (a name load and an
  identity test).
* A call that starts after ``connect()`` returns runs code in which the marker is live;
  frames already running keep the code they started with.
* Dynamic probes and the patcher never fight over ``__code__``: a probed function is
  *suspended* (:func:`suspend`, :func:`resume`, :func:`original_code`; the protocol is in
  :mod:`.patcher`), runs its original code while a probe is installed, and gets its variant
  back when the last probe is removed.
"""

from __future__ import annotations

from .patcher import *  # noqa: F403  (the patcher's public names are this package's)
from .patcher import __all__ as __all__
