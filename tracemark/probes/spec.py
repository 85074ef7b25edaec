"""The probe SPEC: one probe in one command-line word (``tracemark record --probe SPEC``).

Syntax::

    SPEC    = TARGET [ "%" AT ] [ "{" CAPTURE { "," CAPTURE } "}" ]
    TARGET  = module ":" qualname      json:loads   json.decoder:JSONDecoder.decode
            | module ":" LINE          json.decoder:353
            | path/to/file.py ":" LINE app/db.py:120
    AT      = entry | return | line | raise       (default: entry, or line for a LINE target)
    CAPTURE = name or dotted path, a local of the function: rows, req.url

Examples: ``json:loads``, ``json:loads%return``, ``app/db.py:120{rows,sql}``,
``http.client:HTTPConnection.request{method,url}``, ``app.views:save%raise{user.id}``.
Spaces around the punctuation are allowed. A bad spec is a ValueError saying what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Spec", "format_spec", "parse_spec"]

_SPEC = re.compile(
    r"\s*(?P<target>[^%{}\s][^%{}]*?)\s*"
    r"(?:%\s*(?P<at>[^{}\s]*)\s*)?"
    r"(?:\{(?P<capture>[^{}]*)\}\s*)?\Z"
)
_AT = ("entry", "return", "line", "raise")
_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z")

SYNTAX = "TARGET[%entry|%return|%line|%raise][{name,obj.attr,...}]"


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC: the arguments of :func:`tracemark.probe`."""

    target: str
    at: str
    capture: tuple[str, ...] | None


def parse_spec(text: str) -> Spec:
    """Parse one SPEC (see the module docstring); ValueError with the reason if it is bad."""
    if not isinstance(text, str):
        raise ValueError(f"a probe spec is a str like 'json:loads%return', not {text!r}")
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(f"bad probe spec {text!r}: expected {SYNTAX}")
    target = m["target"]
    left, sep, right = target.rpartition(":")
    if not sep or not left.strip() or not right.strip():
        raise ValueError(
            f"bad probe spec {text!r}: the target must be 'module:qualname' or "
            f"'path/to/file.py:LINE', got {target!r}"
        )
    is_line = right.strip().isdigit()
    at = m["at"]
    if at is None:
        at = "line" if is_line else "entry"
    elif at not in _AT:
        raise ValueError(
            f"bad probe spec {text!r}: after '%' comes one of {', '.join(_AT)}, not {at!r}"
        )
    if is_line and at != "line":
        raise ValueError(f"bad probe spec {text!r}: a LINE target takes '%line' (or nothing)")
    if not is_line and at == "line":
        raise ValueError(f"bad probe spec {text!r}: '%line' needs a target ending in ':LINE'")
    capture = None
    if m["capture"] is not None:
        names = [c.strip() for c in m["capture"].split(",")]
        bad = [c for c in names if not _NAME.match(c)]
        if bad or not names:
            raise ValueError(
                f"bad probe spec {text!r}: inside {{...}} come names or dotted paths separated "
                f"by commas, like {{rows,req.url}}; {bad[0]!r} is not one"
            )
        capture = tuple(names)
    return Spec(target.strip(), at, capture)


def format_spec(target: str, at: str, capture: tuple[str, ...] | None) -> str:
    """The SPEC text of a parsed spec (what :func:`parse_spec` reads back to the same)."""
    default = "line" if target.rpartition(":")[2].strip().isdigit() else "entry"
    text = target if at == default else f"{target}%{at}"
    return text + ("{" + ",".join(capture) + "}" if capture else "")
