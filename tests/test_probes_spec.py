"""The probe SPEC of ``tracemark record --probe SPEC``: parser and installer."""

import json

import probe_shapes as shapes
import pytest

import tracemark
from tracemark import probes as P
from tracemark.probes import Spec, install_spec, parse_spec


@pytest.fixture(autouse=True)
def _no_probes_left():
    yield
    for p in P.probes():
        P.unprobe(p)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("json:loads", Spec("json:loads", "entry", None)),
        ("json:loads%return", Spec("json:loads", "return", None)),
        ("json:loads%raise{s}", Spec("json:loads", "raise", ("s",))),
        ("app/db.py:120{rows,sql}", Spec("app/db.py:120", "line", ("rows", "sql"))),
        ("app/db.py:120%line{rows}", Spec("app/db.py:120", "line", ("rows",))),
        ("json.decoder:353", Spec("json.decoder:353", "line", None)),
        (
            " http.client:HTTPConnection.request { method , req.url } ",
            Spec("http.client:HTTPConnection.request", "entry", ("method", "req.url")),
        ),
        ("m:outer.<locals>.inner%return", Spec("m:outer.<locals>.inner", "return", None)),
    ],
)
def test_good_specs(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "bad probe spec"),
        ("json", "the target must be"),
        (":loads", "the target must be"),
        ("json:", "the target must be"),
        ("json:loads%exit", "after '%' comes one of entry, return, line, raise, not 'exit'"),
        ("json:loads%", "not ''"),
        ("json:loads{s", "bad probe spec"),
        ("json:loads{}", "'' is not one"),
        ("json:loads{s,,x}", "'' is not one"),
        ("json:loads{1x}", "'1x' is not one"),
        ("json:loads{s}%return", "bad probe spec"),
        ("app.py:12%return", "a LINE target takes '%line'"),
        ("json:loads%line", "'%line' needs a target ending in ':LINE'"),
    ],
)
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        parse_spec(text)
    assert repr(text) in str(info.value) or not text


def test_install_spec_installs_a_working_probe(rec):
    h = install_spec("json:loads%return")
    assert isinstance(h, tracemark.Probe) and h.name == "probe.json.loads.return"
    tracemark.connect("probe.json.*", rec)
    json.loads("7")
    assert rec.events == [(h.name, (7, rec.events[0][1][1]))]


def test_install_spec_line_with_captures(rec):
    with open(shapes.__file__) as f:
        line = next(n for n, t in enumerate(f, 1) if "line probe with locals" in t)
    h = install_spec(f"{shapes.__file__}:{line}{{rows,sql}}")
    tracemark.connect(h.name, rec)
    shapes.handle(None, "q")
    assert rec.events == [(h.name, ("['q', 'q']", "q"))]


def test_install_spec_errors_are_value_errors_and_install_nothing():
    for bad in ("json:loads%exit", "json:lods", "probe_shapes:plain{nope}", "builtins:len"):
        with pytest.raises(ValueError):
            install_spec(bad)
    assert P.probes() == []
