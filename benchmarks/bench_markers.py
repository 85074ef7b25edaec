"""Issue 2: the cost of firing a marker, inactive and active, against the usual alternatives.

Run: ``python -m benchmarks.run markers``.
"""

from __future__ import annotations

import logging

import tracemark

from .harness import Case

TITLE = "Marker core: firing cost (plain call path, no patching)"
BASELINE = "empty Python function call f(n, dev)"


def cases() -> list[Case]:
    def empty(n, dev):
        pass

    def empty_any(*args, **kwargs):
        pass

    def noop_probe(marker, args):
        pass

    rx = tracemark.marker("bench.rx", "len=%d dev=%s")
    active = tracemark.marker("bench.active", "len=%d dev=%s")
    tracemark.connect("bench.active", noop_probe)

    log = logging.getLogger("bench.disabled")
    log.setLevel(logging.WARNING)
    ns = {
        "n": 1500,
        "dev": "eth0",
        "flag": False,
        "empty": empty,
        "empty_any": empty_any,
        "rx": rx,
        "active": active,
        "tracemark": tracemark,
        "log": log,
    }
    out = [
        Case("`if flag:` guard (flag off)", "if flag: empty(n, dev)", ns),
        Case(BASELINE, "empty(n, dev)", ns),
        Case(
            "empty function f(*args, **kwargs)",
            "empty_any(n, dev)",
            ns,
            "a signature that accepts any call, as a marker's must",
        ),
        Case("inactive marker rx(n, dev)", "rx(n, dev)", ns, "plain call path (not patched)"),
        Case(
            "inactive tracemark.mark(name, fmt, n, dev)",
            'tracemark.mark("bench.inline", "len=%d dev=%s", n, dev)',
            ns,
        ),
        Case("logging.debug, logger disabled", 'log.debug("len=%d dev=%s", n, dev)', ns),
        Case("active marker, one no-op probe", "active(n, dev)", ns, "target: < 150 ns"),
        Case("active marker fired by keyword", "active(len=n, dev=dev)", ns, "slow path"),
    ]
    try:
        import blinker
    except ImportError:
        out.append(Case("blinker send(), no receivers", "pass", ns, "blinker not installed"))
    else:
        quiet = blinker.Signal()
        loud = blinker.Signal()
        loud.connect(lambda sender, **kw: None)
        ns.update(quiet=quiet, loud=loud)
        out.append(Case("blinker send(), no receivers", "quiet.send(n, dev=dev)", ns))
        out.append(Case("blinker send(), one receiver", "loud.send(n, dev=dev)", ns))
    return out
