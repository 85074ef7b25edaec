"""``tracemark spans`` and ``tracemark stats --by``, on traces recorded here from small programs
(a threaded server, recursion, spans left open, ends without a begin), checked against the
reader's own timestamps."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import tracemark
from tracemark.cli import main
from tracemark.cli import spans as spans_mod
from tracemark.ctf import read_trace

ROOT = Path(tracemark.__file__).resolve().parents[1]

req_begin = tracemark.marker("req.begin", endpoint=str)
req_end = tracemark.marker("req.end", status=int)
query_begin = tracemark.marker("db.query.begin", table=str)
query_end = tracemark.marker("db.query.end")
db_row = tracemark.marker("db.row", n=int)
render = tracemark.marker("render", size=int)
rec_begin = tracemark.marker("fact.begin", n=int)
rec_end = tracemark.marker("fact.end")
after = tracemark.marker("after", step=str)

ENDPOINTS = ("/users", "/orders", "/items")


def handle(i: int, slow: bool = False) -> None:
    req_begin(ENDPOINTS[i % 3])
    query_begin("users" if i % 2 else "orders")
    time.sleep(0.03 if slow else 0.001)
    db_row(i)
    query_end()
    render(100 + i)
    req_end(200)


def worker(k: int) -> None:
    for i in range(4):
        handle(k * 4 + i, slow=(k, i) == (1, 2))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """3 threads handling 4 requests each; request 6 (thread s1, /users) is slow."""
    path = tmp_path_factory.mktemp("server") / "trace"
    with tracemark.record(str(path)):
        threads = [threading.Thread(target=worker, args=(k,), name=f"s{k}") for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return path


def run(capsys, *args):
    code = main(["spans" if args[0] != "stats" else "stats", *args[args[0] == "stats" :]])
    out, err = capsys.readouterr()
    return code, out, err


def spans_json(capsys, trace, *more):
    code, out, err = run(capsys, str(trace), "--json", *more)
    assert code == 0, err
    return json.loads(out)


def durations(trace, span):
    """Durations (ns) of the ``span`` spans of ``trace`` paired by hand, per thread, from
    the reader's timestamps (the programs here never nest a span in itself but for fact)."""
    open_: dict = {}
    found = []
    for ev in read_trace(str(trace)).events():
        key = (ev.pid, ev.tid)
        if ev.name == f"{span}.begin":
            open_.setdefault(key, []).append(ev.timestamp)
        elif ev.name == f"{span}.end":
            found.append(ev.timestamp - open_[key].pop())
    return found


def nearest_rank(values, p):
    values = sorted(values)
    return values[max(1, math.ceil(p / 100 * len(values))) - 1]


def test_per_name_figures_are_the_readers_own(capsys, server):
    doc = spans_json(capsys, server)
    for span in ("req", "db.query"):
        expected = durations(server, span)
        figures = doc["names"][span]
        assert figures["count"] == len(expected) == 12
        assert figures["unfinished"] == 0
        assert figures["p50_ns"] == nearest_rank(expected, 50)
        assert figures["p99_ns"] == nearest_rank(expected, 99)
        assert figures["max_ns"] == max(expected) >= 30_000_000
    assert doc["spans"] == 24 and doc["unfinished"] == 0 and doc["ends_without_begin"] == {}
    assert doc["events"] == 12 * 6 and doc["complete"] is True


def test_the_slowest_request_comes_first_with_its_tree(capsys, server):
    doc = spans_json(capsys, server, "--top", "3")
    assert doc["candidates"] == 12  # the requests: outermost spans only
    slowest = doc["slowest"]
    assert len(slowest) == 3
    assert [s["name"] for s in slowest] == ["req"] * 3
    assert slowest[0]["duration_ns"] == max(durations(server, "req"))
    assert slowest[0]["duration_ns"] >= slowest[1]["duration_ns"] >= slowest[2]["duration_ns"]
    top = slowest[0]
    assert top["thread"] == "s1" and top["fields"] == {"endpoint": "/users", "status": 200}
    assert top["offset_ns"] == 0 and top["events"] == 3 and top["not_kept"] == 0
    query, rendered = top["children"]
    assert (query["kind"], query["name"], query["fields"]) == (
        "span",
        "db.query",
        {"table": "orders"},
    )
    assert query["duration_ns"] >= 30_000_000
    assert 0 < query["offset_ns"] < query["offset_ns"] + query["duration_ns"] <= top["duration_ns"]
    (row,) = query["children"]
    assert (row["kind"], row["name"], row["fields"]) == ("event", "db.row", {"n": 6})
    assert rendered["kind"] == "event" and rendered["fields"] == {"size": 106}
    assert rendered["offset_ns"] == rendered["timestamp"] - top["start"]


def test_text_waterfall(capsys, server):
    code, out, err = run(capsys, str(server), "--top", "1")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[1] == "  72 events, 24 spans of 2 names"
    assert lines[3] == "slowest spans: 1 of 12 outermost spans (times in ms)"
    head = lines[5]
    assert head.startswith("#1 req  ") and "[" in head and " s1]" in head
    assert head.endswith("endpoint=/users status=200")
    body = lines[6:11]
    assert body[0].split() == ["offset", "duration"]
    assert body[1].split()[0] == "0.000" and body[1].split()[2:] == [
        "req",
        "endpoint=/users",
        "status=200",
    ]
    assert body[2].split()[2:] == ["db.query", "table=orders"]
    assert float(body[2].split()[1]) >= 30.0
    assert body[3].split()[1:] == ["-", "db.row", "n=6"]
    assert body[4].split()[1:] == ["-", "render", "size=106"]
    # indented by depth: db.query one level in, db.row two.
    assert body[2].index("db.query") == body[1].index("req") + 2
    assert body[3].index("db.row") == body[1].index("req") + 4
    table = lines[-3:]
    assert table[0].split()[:6] == ["span", "count", "unfinished", "p50", "p99", "max"]
    assert [row.split()[:3] for row in table[1:]] == [["db.query", "12", "0"], ["req", "12", "0"]]


def test_by_endpoint(capsys, server):
    doc = spans_json(capsys, server, "--by", "endpoint", "--top", "0")
    assert doc["slowest"] == [] and doc["by"] == "endpoint"
    req = doc["names"]["req"]
    assert {g["value"]: g["count"] for g in req["groups"]} == dict.fromkeys(ENDPOINTS, 4)
    users = next(g for g in req["groups"] if g["value"] == "/users")
    assert users["max_ns"] == max(durations(server, "req"))
    assert req["other"] is None and req["ungrouped"] == 0
    query = doc["names"]["db.query"]
    assert query["groups"] == [] and query["ungrouped"] == 12  # no endpoint field: not grouped
    code, out, _ = run(capsys, str(server), "--by", "endpoint", "--top", "0")
    assert code == 0
    rows = {" ".join(line.split()[:2]): line.split()[2:4] for line in out.splitlines()[3:]}
    assert rows["req endpoint=/users"] == ["4", "0"]
    assert "db.query (no field endpoint)" in out


def test_by_a_field_of_the_end_event_and_of_the_other_span(capsys, server):
    doc = spans_json(capsys, server, "--by", "table", "--top", "0")
    groups = {g["value"]: g["count"] for g in doc["names"]["db.query"]["groups"]}
    assert groups == {"orders": 6, "users": 6}
    doc = spans_json(capsys, server, "--by", "status", "--top", "0")
    assert [(g["value"], g["count"]) for g in doc["names"]["req"]["groups"]] == [(200, 12)]


@pytest.mark.parametrize(
    ("expr", "names", "listed"),
    [
        ('name == "db.query"', {"db.query": 12}, 3),
        ('endpoint == "/orders"', {"req": 4}, 3),
        ("duration > 20", {"req": 1, "db.query": 1}, 1),  # the query: in the req's tree
        ('thread == "s2" and table == "users"', {"db.query": 2}, 2),
        ('fields["status"] == 200 and not unfinished', {"req": 12}, 3),
    ],
)
def test_filters_select_spans(capsys, server, expr, names, listed):
    doc = spans_json(capsys, server, "--filter", expr, "--top", "3")
    assert {k: v["count"] for k, v in doc["names"].items()} == names
    assert len(doc["slowest"]) == listed and doc["filter"] == expr
    if expr.startswith("duration"):
        assert doc["slowest"][0]["children"][0]["name"] == "db.query"


def test_a_filter_on_duration_agrees_with_the_reader(capsys, server):
    cut = sorted(durations(server, "db.query"))[5]
    doc = spans_json(
        capsys, server, "--filter", f"name == 'db.query' and duration >= {cut / 1e6!r}"
    )
    assert doc["names"]["db.query"]["count"] == 12 - 5


@pytest.mark.parametrize(("expr", "column"), [("duratio > 2", 0), ("duration >> 2", 9)])
def test_bad_filters_are_one_line_and_exit_2(capsys, server, expr, column):
    code, out, err = run(capsys, str(server), "--filter", expr)
    assert code == 2 and out == ""
    first, shown, caret = err.splitlines()
    assert first.startswith(f"tracemark spans: error: bad --filter at column {column + 1}:")
    assert shown == f"  {expr}"
    assert caret == "  " + " " * column + "^"


def fact(n: int) -> int:
    rec_begin(n)
    try:
        return 1 if n <= 1 else n * fact(n - 1)
    finally:
        rec_end()


def test_recursion_nests_a_span_in_itself(capsys, tmp_path):
    with tracemark.record(str(tmp_path / "t")):
        fact(5)
        fact(3)
    doc = spans_json(capsys, tmp_path / "t")
    assert doc["names"]["fact"]["count"] == 8 and doc["candidates"] == 2
    node, depth = doc["slowest"][0], 0
    while node["children"]:
        (node,) = node["children"]
        depth += 1
    assert depth == 4 and node["fields"] == {"n": 1}
    assert doc["slowest"][0]["fields"] == {"n": 5} and doc["slowest"][1]["fields"] == {"n": 3}


def test_spans_left_open_are_unfinished_and_ends_without_begin_are_counted(capsys, tmp_path):
    def raises():
        query_begin("boom")
        raise ValueError("no end for this span")

    def thread_body():
        req_begin("/left-open")
        render(1)

    with tracemark.record(str(tmp_path / "t")):
        try:
            raises()
        except ValueError:
            after("caught")
        t = threading.Thread(target=thread_body, name="quitter")
        t.start()
        t.join()
        query_end()  # ends the query left open by the exception
        query_end()  # and this one has no begin
        req_end(500)  # no begin on this thread either
    events = list(read_trace(str(tmp_path / "t")).events())
    doc = spans_json(capsys, tmp_path / "t")
    assert doc["unfinished"] == 1 and doc["spans"] == 2
    assert doc["ends_without_begin"] == {"db.query.end": 1, "req.end": 1}
    assert doc["names"]["req"] == {
        "count": 0,
        "unfinished": 1,
        "p50_ns": None,
        "p99_ns": None,
        "max_ns": None,
    }
    assert doc["names"]["db.query"]["count"] == 1
    left = next(s for s in doc["slowest"] if s["name"] == "req")
    begin = next(e for e in events if e.name == "req.begin")
    last = next(e for e in events if e.name == "render")  # the thread's last event
    assert left["unfinished"] and left["duration_ns"] == last.timestamp - begin.timestamp
    assert [c["name"] for c in left["children"]] == ["render"]
    code, out, _ = run(capsys, str(tmp_path / "t"))
    assert code == 0
    assert "2 ends without a begin: db.query.end 1, req.end 1" in out
    assert "1 unfinished (closed at their thread's last event)" in out
    assert "UNFINISHED: closed at its thread's last event" in out
    assert "(unfinished)" in out


def test_an_end_without_begin_inside_a_span_is_shown_in_its_tree(capsys, tmp_path):
    with tracemark.record(str(tmp_path / "t")):
        req_begin("/x")
        rec_end()  # nothing began fact here
        req_end(200)
    doc = spans_json(capsys, tmp_path / "t")
    (child,) = doc["slowest"][0]["children"]
    assert child["kind"] == "end_without_begin" and child["name"] == "fact.end"
    assert doc["ends_without_begin"] == {"fact.end": 1} and doc["names"]["req"]["count"] == 1
    code, out, _ = run(capsys, str(tmp_path / "t"))
    assert code == 0 and "fact.end (end without a begin)" in out


# -- bounded memory -------------------------------------------------------------------------


def ev(ts, name, tid=1, **fields):
    return SimpleNamespace(timestamp=ts, name=name, pid=1, tid=tid, thread="t", fields=fields)


def test_a_tree_is_capped_and_says_what_it_lost(monkeypatch):
    monkeypatch.setattr(spans_mod, "TREE_CAP", 5)
    events = [ev(0, "req.begin", endpoint="/a")]
    events += [ev(i, "tick", i=i) for i in range(1, 4)]  # 3 kept
    events += [ev(4, "db.query.begin", table="t")]  # 1 kept, room for 1 more
    events += [ev(5 + i, "db.row", n=i) for i in range(10)]  # under the query: its own cap
    events += [ev(20, "db.query.end"), ev(21, "tick", i=99), ev(22, "req.end", status=1)]
    report = spans_mod.collect(iter(events))
    (root,) = report.slowest
    assert root.events == 3 + 1 + 10 + 1
    assert root.kept <= 5
    query = root.children[3]
    assert query.name == "db.query" and query.children == [] and query.events == 10
    assert root.children[-1].fields == {"i": 99}  # a later marker still fits
    text = spans_mod.render_text(report)
    assert "tree cut: 10 of 15 not kept" in text
    assert "... 10 events not kept (tree cap)" in text
    assert text.count("not kept (tree cap)") == 1  # said once, where it happened


def test_memory_stays_bounded_on_a_long_span():
    def events():
        yield ev(0, "main.begin")
        for i in range(1, 200_000):
            yield ev(i, "tick", i=i)
        yield ev(200_000, "main.end")

    report = spans_mod.collect(events(), top=1)
    (root,) = report.slowest
    assert root.events == 199_999 and root.kept == spans_mod.TREE_CAP
    assert len(root.children) == spans_mod.TREE_CAP


def test_listed_spans_are_never_nested_and_the_heap_keeps_the_slowest():
    events, t = [], 0
    for i in range(50):
        events.append(ev(t, "req.begin", endpoint=str(i)))
        events.append(ev(t + 1, "db.query.begin", table="x"))
        events.append(ev(t + 2 + i, "db.query.end"))
        events.append(ev(t + 3 + i, "req.end", status=0))
        t += 1000
    report = spans_mod.collect(iter(events), top=3)
    assert [n.fields["endpoint"] for n in report.slowest] == ["49", "48", "47"]
    pick = spans_mod.collect(iter(events), top=2, predicate=lambda s: s.name == "db.query")
    assert [n.name for n in pick.slowest] == ["db.query"] * 2 and pick.candidates == 50
    assert [n.duration for n in pick.slowest] == [50, 49]


# -- stats --by ------------------------------------------------------------------------------


def test_stats_by_groups_a_marker_and_leaves_the_others_alone(capsys, server):
    code, out, err = run(capsys, "stats", str(server), "--by", "endpoint")
    assert code == 0, err
    assert "req.begin  12 events" in out and "by endpoint: 3 groups" in out
    for endpoint in ENDPOINTS:
        assert f"  endpoint={endpoint}  4 events" in out
    assert "db.row  12 events" in out and "(no field 'endpoint': not grouped)" in out
    code, out, err = run(capsys, "stats", str(server), "--by", "table", "--json")
    doc = json.loads(out)
    begin = doc["markers"]["db.query.begin"]
    assert begin["grouped"] and {g["value"]: g["count"] for g in begin["groups"]} == {
        "orders": 6,
        "users": 6,
    }
    assert "table" not in begin["groups"][0]["fields"]  # the same value throughout a group
    row = doc["markers"]["db.row"]
    assert not row["grouped"] and row["ungrouped"] == 12 and row["fields"]["n"]["max"] == 11


def test_stats_by_has_a_group_cap_and_says_how_many_more(capsys, tmp_path, monkeypatch):
    from tracemark.cli import _groups

    monkeypatch.setattr(_groups, "GROUP_CAP", 4)
    with tracemark.record(str(tmp_path / "t")):
        for i in range(10):
            db_row(i % 7)
    code, out, _ = run(capsys, "stats", str(tmp_path / "t"), "--by", "n")
    assert code == 0
    assert "by n: 7 groups" in out
    assert "other values (3 more groups beyond the first 4)  3 events" in out
    code, out, _ = run(capsys, "stats", str(tmp_path / "t"), "--by", "n", "--json")
    row = json.loads(out)["markers"]["db.row"]
    assert sum(g["count"] for g in row["groups"]) + row["other"]["count"] == 10
    assert row["other"]["values"] == 3 and row["other"]["values_exact"]


# -- through the command line, as a user runs it ---------------------------------------------


def tm(*args):
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_command_line(server):
    proc = tm("spans", str(server), "--top", "1", "--by", "endpoint")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "#1 req" in proc.stdout and "req endpoint=/users" in proc.stdout
    proc = tm("spans", "--help")
    assert proc.returncode == 0 and "duration (ms, float)" in proc.stdout
    proc = tm("spans", str(server / "nope"))
    assert proc.returncode == 3 and proc.stderr.startswith("tracemark spans: error:")


def test_a_truncated_stream_is_exit_4_like_view(server, tmp_path):
    copy = tmp_path / "trace"
    shutil.copytree(server, copy)
    stream = max(copy.rglob("stream_*"), key=lambda p: p.stat().st_size)
    data = stream.read_bytes()
    stream.write_bytes(data[:-10])  # inside the last packet (half might be a packet's end)
    for command in ("spans", "view"):
        proc = tm(command, str(copy))
        assert proc.returncode == 4
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"tracemark {command}: error: corrupt trace: {stream}")
        assert "offset" in line and "Traceback" not in proc.stderr


def test_damage_part_way_reports_what_was_read_then_exit_4(tmp_path):
    with tracemark.record(str(tmp_path / "t"), subbuffer_size=4096):
        for _ in range(300):
            req_begin("/before")
            req_end(200)
        req_begin("CORRUPTME")
        for _ in range(300):
            req_end(200)
    stream = max((tmp_path / "t").rglob("stream_*"), key=lambda p: p.stat().st_size)
    data = bytearray(stream.read_bytes())
    at = data.find(b"CORRUPTME")
    data[at : at + 9] = b"\xff" * 9  # not UTF-8: the reader stops there
    stream.write_bytes(bytes(data))
    proc = tm("spans", str(tmp_path / "t"), "--json")
    assert proc.returncode == 4
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"tracemark spans: error: corrupt trace: {stream}")
    doc = json.loads(proc.stdout)
    assert doc["complete"] is False and doc["names"]["req"]["count"] == 300
    proc = tm("spans", str(tmp_path / "t"))
    assert "the trace is damaged: only the events before it are here" in proc.stdout
