"""view and stats, as functions over events shaped like the reader's."""

import io
import json
import math
import os
import time
from types import SimpleNamespace

import pytest

from tracemark.cli._common import Style
from tracemark.cli.stats import collect, histogram, render_json, render_text
from tracemark.cli.view import format_event, write_json, write_text
from tracemark.ctf import SCHEMA_VERSION
from tracemark.ctf.reader import Task

T0 = 1_767_225_600_000_000_000  # 2026-01-01 00:00:00 UTC, in ns


def event(ts, name="net.rx", pid=100, tid=7, thread="worker-1", **fields):
    return SimpleNamespace(
        timestamp=ts, name=name, pid=pid, tid=tid, thread=thread, fields=dict(fields)
    )


def clock(ns):
    return time.strftime("%H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}"


def test_a_line_has_time_delta_process_thread_event_and_fields():
    ev = event(T0 + 1_234_567, len=42, dev="eth0", rate=0.5)
    line = format_event(ev, T0 + 1_000_000)
    assert (
        line == f"{clock(T0 + 1_234_567)} +0.000235 [100 worker-1] net.rx len=42 dev=eth0 rate=0.5"
    )
    first = format_event(ev, None)
    assert "+?.??????" in first


def test_values_that_are_not_plain_are_quoted_and_stay_on_one_line():
    ev = event(T0, msg="two\nlines", blob=b"\x00\x01", thread="")
    line = format_event(ev, None)
    assert "\n" not in line
    assert "msg='two\\nlines'" in line and "blob=b'\\x00\\x01'" in line
    assert "[100 7]" in line  # the thread id when the name is unknown


def test_width_cuts_the_fields_not_the_event_name():
    ev = event(T0, text="x" * 200)
    line = format_event(ev, None, width=80)
    assert len(line) == 80 and line.endswith("…") and " net.rx " in line


def test_colour_only_when_asked():
    ev = event(T0, n=1)
    assert "\x1b[" not in format_event(ev, None, style=Style(False))
    assert "\x1b[1;36mnet.rx\x1b[0m" in format_event(ev, None, style=Style(True))


def test_text_deltas_are_to_the_previous_shown_event_and_limit_stops():
    events = [event(T0 + i * 1_000_000, n=i) for i in range(10)]
    out = io.StringIO()
    assert write_text(iter(events), out, limit=3) == 3
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert [line.split()[1] for line in lines] == ["+?.??????", "+0.001000", "+0.001000"]


def test_limit_reads_no_further_than_needed():
    taken = []

    def events():
        for i in range(100):
            taken.append(i)
            yield event(T0 + i, n=i)

    write_text(events(), io.StringIO(), limit=5)
    assert len(taken) <= 6
    write_json(events(), io.StringIO(), limit=0)


def test_json_is_one_strict_object_per_line():
    events = [
        event(T0, len=1, dev="eth0"),
        event(T0 + 5, "odd", blob=b"\xff\x00", x=float("nan"), y=float("-inf"), z=None),
    ]
    out = io.StringIO()
    assert write_json(iter(events), out) == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {
        "timestamp": T0,
        "name": "net.rx",
        "pid": 100,
        "tid": 7,
        "thread": "worker-1",
        "task": None,
        "fields": {"len": 1, "dev": "eth0"},
        "schema": SCHEMA_VERSION,  # on every line: each line stays one event
    }
    second = json.loads(lines[1], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert second["fields"] == {"blob": "ff00", "x": "nan", "y": "-inf", "z": None}
    assert list(first["fields"]) == ["len", "dev"]  # field order kept


def test_json_batches_many_events():
    out = io.StringIO()
    assert write_json((event(T0 + i, n=i) for i in range(3000)), out) == 3000
    assert [json.loads(x)["fields"]["n"] for x in out.getvalue().splitlines()] == list(range(3000))


# -- stats ----------------------------------------------------------------------------------


def sample():
    events = []
    for i in range(1, 101):
        events.append(
            event(T0 + i * 10_000_000, "db.query", rows=i, ms=i / 10, table="t" + str(i % 3))
        )
    for i in range(10):
        events.append(event(T0 + i, "net.rx", len=0 if i < 4 else -i, ok=i % 2 == 0))
    events.sort(key=lambda e: e.timestamp)
    return events


def test_counts_and_exact_percentiles():
    stats = collect(sample())
    db = stats["db.query"]
    assert db.count == 100 and stats["net.rx"].count == 10
    doc = json.loads(render_json(stats, start=T0, end=T0 + 10**9))
    rows = doc["markers"]["db.query"]["fields"]["rows"]
    assert (rows["min"], rows["max"], rows["p50"], rows["p99"]) == (1, 100, 50, 99)
    assert rows["mean"] == 50.5
    assert doc["markers"]["db.query"]["rate"] == 100.0
    ms = doc["markers"]["db.query"]["fields"]["ms"]
    assert ms["type"] == "float" and math.isclose(ms["max"], 10.0)
    table = doc["markers"]["db.query"]["fields"]["table"]
    assert table["distinct"] == 3 and table["top"][0] == {"value": "t1", "count": 34}
    assert doc["events"] == 110


def test_log2_buckets_follow_bpftrace():
    rows = dict(histogram([0, 1, 2, 3, 4, 1023, 1024, -5]))
    assert rows == {
        "(..., 0)": 1,
        "[0]": 1,
        "[1]": 1,
        "[2, 4)": 2,
        "[4, 8)": 1,
        "[8, 16)": 0,
        "[16, 32)": 0,
        "[32, 64)": 0,
        "[64, 128)": 0,
        "[128, 256)": 0,
        "[256, 512)": 0,
        "[512, 1K)": 1,
        "[1K, 2K)": 1,
    }
    floats = dict(histogram([0.3, 0.6, 1.5, 3.0]))
    assert floats == {"[0.25, 0.5)": 1, "[0.5, 1)": 1, "[1, 2)": 1, "[2, 4)": 1}
    assert sum(dict(histogram([1e-300, 1e300])).values()) == 2  # wide spread: no empty rows


def test_every_value_lands_in_exactly_one_bucket():
    import random

    rng = random.Random(3)
    values = [rng.choice([rng.randint(-50, 10**9), rng.random() * 1e6]) for _ in range(2000)]
    assert sum(c for _, c in histogram(values)) == len(values)


def test_text_report_fits_80_columns_and_warns_about_discards():
    text = render_text(
        collect(sample()), path="t", start=T0, end=T0 + 10**9, discarded=7, processes=2, threads=3
    )
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "WARNING: 7 events were discarded" in text
    assert "110 events in 1.00 s from 2 processes, 3 threads" in text
    assert text.index("db.query") < text.index("net.rx")  # busiest first
    assert "rows (int)  min 1  mean 50.5  max 100  p50 50  p99 99" in text
    bars = [line for line in text.splitlines() if line.strip().startswith("[64, 128)")]
    assert bars and bars[0].count("@") == 40  # the largest bucket fills the bar


def test_nan_is_counted_apart():
    stats = collect([event(T0, x=float("nan")), event(T0 + 1, x=2.0)])
    doc = json.loads(render_json(stats))
    x = doc["markers"]["net.rx"]["fields"]["x"]
    assert x["nan"] == 1 and x["min"] == x["max"] == 2.0
    assert "nan 1" in render_text(stats)


def test_empty_input():
    assert "no events" in render_text(collect([]), path="t")
    assert json.loads(render_json(collect([])))["events"] == 0


def test_the_fast_json_path_writes_what_the_json_module_writes():
    import random

    rng = random.Random(5)
    odd_names = ["MainThread", 'with "quotes"', "100%", "ünï\u2028code", "tab\there"]
    values = [0, -1, 2**63 - 1, 1.5, -0.0, 1e-300, 3.0e20, True, False, None, 'a"b\\c\n', "é"]
    events = []
    for i in range(300):
        fields = {f"f{k}": rng.choice(values) for k in range(rng.randint(0, 4))}
        events.append(
            event(T0 + i, rng.choice(["a.b", "c.d"]), thread=rng.choice(odd_names), **fields)
        )
    out = io.StringIO()
    write_json(iter(events), out)
    for line, ev in zip(out.getvalue().rstrip("\n").split("\n"), events, strict=True):
        expected = {
            "timestamp": ev.timestamp,
            "name": ev.name,
            "pid": ev.pid,
            "tid": ev.tid,
            "thread": ev.thread,
            "task": None,
            "fields": ev.fields,
            "schema": SCHEMA_VERSION,
        }
        assert json.loads(line) == expected
        assert line == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))


def test_bulk_collection_counts_what_value_by_value_counting_does(monkeypatch):
    import random

    from tracemark.cli import stats as stats_module

    monkeypatch.setattr(stats_module, "_BATCH", 37)  # many folds, some partial
    rng = random.Random(11)
    pool = [1, -7, 2**70, 0.5, float("nan"), float("inf"), "x", "y", True, None, b"\x00"]
    events = []
    for i in range(2000):
        kind = rng.choice(["plain", "mixed", "sparse"])
        if kind == "plain":
            fields = {"a": rng.randint(0, 10**6), "b": rng.random()}
        elif kind == "mixed":
            fields = {"a": rng.choice(pool), "b": rng.choice(pool)}
        else:
            fields = {"b": rng.random()} if i % 2 else {"c": "only"}
        events.append(event(T0 + i, rng.choice(["m.plain", "m.other"]), **fields))
    got = collect(events)
    for name in ("m.plain", "m.other"):
        mine = [e for e in events if e.name == name]
        assert got[name].count == len(mine)
        for key in ("a", "b", "c"):
            values = [e.fields[key] for e in mine if key in e.fields]
            if not values:
                assert key not in got[name].fields
                continue
            f = got[name].fields[key]
            numbers = sorted(v for v in values if type(v) in (int, float) and v == v)
            assert f.numbers() == numbers
            assert f.nan == sum(1 for v in values if type(v) is float and v != v)
            others = [v for v in values if type(v) not in (int, float)]
            assert sum(f.others.values()) == len(others)
            assert sum(c for _, c in histogram(numbers)) == len(numbers)


def test_the_fast_text_path_writes_what_format_event_writes():
    import random

    rng = random.Random(9)
    values = [
        0,
        -3,
        2**80,
        0.1,
        float("nan"),
        "plain",
        "two words",
        "a\nb",
        "50%",
        b"\x01",
        True,
        None,
    ]
    events = []
    ts = T0
    for _ in range(400):
        ts += rng.choice([1, 999, 10**9 + 7])
        fields = {f"f{k}": rng.choice(values) for k in range(rng.randint(0, 3))}
        thread = rng.choice(["MainThread", "", "100% busy"])
        ev = event(ts, rng.choice(["a.b", "c%d"]), thread=thread, **fields)
        ev.task = rng.choice([None, Task(1, "req-1"), Task(2, "50%\nodd"), Task(3, "")])
        events.append(ev)
    out = io.StringIO()
    write_text(iter(events), out)
    expected, previous = [], None
    for ev in events:
        expected.append(format_event(ev, previous))
        previous = ev.timestamp
    assert out.getvalue().split("\n")[:-1] == expected
    shown = {line.split("] ")[0].split(" [")[1] for line in expected}
    assert {"100 MainThread req-1", "100 7 #3", "100 100% busy 50%\\nodd"} <= shown


def test_stats_trust_field_names_only_for_markers_declared_one_way(tmp_path):
    """Two programs recorded into one directory declare ``sh.m`` with other fields: its
    rows are checked one by one (no shape); ``sh.one``'s are trusted, with the same figures
    as checking them."""
    import subprocess
    import sys

    from tracemark.cli.stats import shapes_of
    from tracemark.ctf import read_trace

    prog = (
        "import sys, tracemark\n"
        "one = tracemark.marker('sh.one', k=int)\n"
        "m = tracemark.marker('sh.m', **{sys.argv[2]: int})\n"
        "with tracemark.record(sys.argv[1]):\n"
        "    for i in range(100):\n"
        "        m(i); one(i * 2)\n"
    )
    for sub, field_name in (("a", "x"), ("b", "y")):
        subprocess.run(
            [sys.executable, "-c", prog, str(tmp_path / sub), field_name], check=True, timeout=60
        )
    trace = read_trace(tmp_path)
    shapes = shapes_of(trace)
    assert shapes["sh.one"] == ("k",) and "sh.m" not in shapes
    trusted = collect(trace.events(), shapes=shapes)
    checked = collect(trace.events())
    assert trusted["sh.one"].shape == ("k",) and trusted["sh.m"].shape is None
    for name in ("sh.one", "sh.m"):
        assert render_json({name: trusted[name]}) == render_json({name: checked[name]})
    assert set(trusted["sh.m"].fields) == {"x", "y"}
    assert trusted["sh.m"].fields["x"].numbers() == list(range(100))


def test_the_mean_is_never_an_error():
    from tracemark.cli.stats import mean

    assert math.isnan(mean([-math.inf, 1.0, math.inf]))
    assert mean([math.inf, 1.0]) == math.inf and mean([-math.inf, 10**400]) == -math.inf
    assert mean([1e308, 1e308]) == 1e308  # the sum overflows a float, the mean does not
    assert mean([10**400, 10**400 + 2]) == 10**400 + 1  # beyond a float: the exact int mean
    assert mean([10**400, 1.5]) == (10**400 + 1) // 2
    assert mean([1, 2]) == 1.5


@pytest.mark.parametrize("core", ["c", "python"])
def test_stats_of_a_field_with_inf_and_minus_inf(tmp_path, core):
    """Both infinities in one float field: the mean is nan (said, in text and JSON), never a
    traceback; the C reader and the pure one say the same."""
    import subprocess
    import sys

    import tracemark

    m = tracemark.marker("statsinf.x", x=float)
    with tracemark.record(tmp_path / "t", "statsinf.*"):
        for v in (1.0, math.inf, -math.inf, math.nan, 2.5):
            m(v)
    env = {**os.environ, "TRACEMARK_CORE": "python"} if core == "python" else os.environ

    def stats(*more):
        proc = subprocess.run(
            [sys.executable, "-m", "tracemark", "stats", str(tmp_path / "t"), *more],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    x = json.loads(stats("--json"))["markers"]["statsinf.x"]["fields"]["x"]
    assert (x["min"], x["mean"], x["max"], x["nan"], x["count"]) == ("-inf", "nan", "inf", 1, 5)
    assert "min -inf  mean nan  max inf" in stats()
