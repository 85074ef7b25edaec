"""Schema versioning (issue 15): every sub-trace's metadata names the tracer (LTTng's env keys)
and the trace schema version; the reader reads the versions it knows (a trace without the
key is schema 1) and refuses a newer one with a TraceError that says "upgrade tracemark";
the CLI says it in one line (exit 3); ``view --json`` and every export carry the version."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tracemark
from tracemark.cli import main
from tracemark.ctf import SCHEMA_VERSION, SchemaError, TraceError, read_trace
from tracemark.ctf.schema import OLDEST_READ, SCHEMA_KEY
from tracemark.export import export


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    m = tracemark.marker("schema_test.ev", n=int, s=str)
    path = tmp_path_factory.mktemp("schema") / "trace"
    with tracemark.record(path):
        for i in range(5):
            m(i, f"v{i}")
    return path


@pytest.fixture
def small(recorded, tmp_path):
    """A copy of one small recording, each test's own to change."""
    return shutil.copytree(recorded, tmp_path / "trace")


def _metadata(trace: Path) -> Path:
    (meta,) = trace.rglob("metadata")
    return meta


def _set_schema(trace: Path, value: str | None) -> None:
    meta = _metadata(trace)
    text = meta.read_text()
    line = re.compile(rf"\t{SCHEMA_KEY} = [^\n]*;\n")
    assert line.search(text)
    text = line.sub("" if value is None else f"\t{SCHEMA_KEY} = {value};\n", text)
    meta.write_text(text)


def test_the_env_names_the_tracer_and_the_schema(small):
    (sub,) = read_trace(small).subtraces
    major, minor, patch = (int(p) for p in tracemark.__version__.split(".")[:3])
    assert sub.env["tracer_name"] == "tracemark"
    assert (sub.env["tracer_major"], sub.env["tracer_minor"], sub.env["tracer_patchlevel"]) == (
        major,
        minor,
        patch,
    )
    assert sub.env["tracemark_version"] == tracemark.__version__
    assert sub.env[SCHEMA_KEY] == SCHEMA_VERSION == sub.schema
    # CTF 1.8 env values are integers or strings: the version is an integer literal.
    assert f"\t{SCHEMA_KEY} = {SCHEMA_VERSION};\n" in _metadata(small).read_text()


def test_babeltrace2_reads_the_env(small):
    exe = shutil.which("babeltrace2")
    assert exe, "babeltrace2 is needed (make test installs it)"
    out = subprocess.run(
        [exe, "-c", "sink.text.details", str(small)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(rf"{SCHEMA_KEY}: {SCHEMA_VERSION}\b", out.stdout), out.stdout[:2000]
    assert "tracer_name: tracemark" in out.stdout


def test_a_trace_without_the_key_is_schema_1_and_reads_the_same(small):
    before = [tuple(ev) for ev in read_trace(small).events()]
    _set_schema(small, None)
    (sub,) = read_trace(small).subtraces
    assert SCHEMA_KEY not in sub.env and sub.schema == 1
    assert [tuple(ev) for ev in read_trace(small).events()] == before


@pytest.mark.parametrize("value", [str(OLDEST_READ), str(SCHEMA_VERSION)])
def test_every_known_version_reads(small, value):
    _set_schema(small, value)
    assert read_trace(small).subtraces[0].schema == int(value)


def test_a_newer_schema_is_refused_saying_upgrade(small):
    newer = SCHEMA_VERSION + 1
    _set_schema(small, str(newer))
    with pytest.raises(SchemaError) as info:
        read_trace(small)
    exc = info.value
    assert isinstance(exc, TraceError)  # callers catching TraceError see it
    text = str(exc)
    assert str(_metadata(small)) in text
    assert f"schema version {newer}" in text
    assert f"up to {SCHEMA_VERSION}" in text and "upgrade tracemark" in text


def test_a_newer_schema_is_refused_before_its_layout(small):
    """A newer schema may lay its trace out differently: still "upgrade", not "not ours"."""
    meta = _metadata(small)
    _set_schema(small, str(SCHEMA_VERSION + 7))
    meta.write_text(meta.read_text().replace("packet.context := struct", "packet.ctx := struct"))
    with pytest.raises(SchemaError, match="upgrade tracemark"):
        read_trace(small)


@pytest.mark.parametrize("value", ['"one"', "0", "-3"])
def test_a_schema_that_is_not_a_version_is_a_corrupt_trace_not_a_newer_one(small, value, capsys):
    _set_schema(small, value)
    with pytest.raises(TraceError, match=SCHEMA_KEY) as caught:
        read_trace(small)
    assert not isinstance(caught.value, SchemaError)  # nothing to upgrade: damage
    code = main(["view", str(small)])
    err = capsys.readouterr().err
    assert code == 4 and "corrupt trace" in err and "upgrade" not in err, err


@pytest.mark.parametrize(
    "argv",
    [["view"], ["view", "--json"], ["stats"], ["export", "-f", "chrome", "-o", "{out}"]],
)
def test_the_cli_says_upgrade_in_one_line(small, tmp_path, capsys, argv):
    _set_schema(small, str(SCHEMA_VERSION + 1))
    argv = [a.replace("{out}", str(tmp_path / "x.json")) for a in argv]
    code = main([argv[0], str(small), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "upgrade tracemark" in lines[0], err
    assert "corrupt" not in err and "Traceback" not in err


def test_view_json_names_the_schema_on_every_line(small):
    out = subprocess.run(
        [sys.executable, "-m", "tracemark", "view", "--json", str(small)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5
    for line in lines:
        obj = json.loads(line)
        assert obj["schema"] == SCHEMA_VERSION and obj["name"].endswith(".ev")


def test_view_json_of_a_schema_1_trace_without_the_key(small):
    from tracemark.cli.view import write_json

    _set_schema(small, None)
    trace = read_trace(small)
    from tracemark.ctf.schema import exported_schema

    out = io.StringIO()
    write_json(trace.events(), out, schema=exported_schema(trace.subtraces))
    assert {json.loads(x)["schema"] for x in out.getvalue().splitlines()} == {1}


@pytest.mark.parametrize("fast", [True, False])
def test_chrome_other_data_names_the_schema(small, tmp_path, fast):
    out = tmp_path / "t.json"
    export(small, out, "chrome", fast=fast)
    other = json.loads(out.read_text())["otherData"]
    assert other["tracemark_schema"] == SCHEMA_VERSION
    assert other["tracemark_version"] == tracemark.__version__


@pytest.mark.parametrize("fast", [True, False])
def test_perfetto_trace_metadata_names_the_schema(small, tmp_path, fast):
    pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")
    out = tmp_path / "t.pftrace"
    export(small, out, "perfetto", fast=fast)
    trace = pb.Trace()
    trace.ParseFromString(out.read_bytes())
    meta = {
        m.name: (m.int_value if m.HasField("int_value") else m.string_value)
        for p in trace.packet
        if p.HasField("chrome_events")
        for m in p.chrome_events.metadata
    }
    assert meta["tracemark_schema"] == SCHEMA_VERSION
    assert meta["tracemark_version"] == tracemark.__version__
    assert meta["tracemark_trace"] == str(small)
    first_event = next(i for i, p in enumerate(trace.packet) if p.HasField("track_event"))
    assert next(i for i, p in enumerate(trace.packet) if p.HasField("chrome_events")) < first_event
