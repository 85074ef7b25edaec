"""Interop: babeltrace2, the reference CTF reader, reads what the recorder writes.

One trace is made in a child process: three threads firing every field type, a fork child,
and a second recording in the same directory whose buffers overflow (discarded events).
babeltrace2 must read the whole directory and agree with what was fired (names, values,
thread, process), in time order, warn about exactly the discarded events, and agree with
:func:`tracemark.ctf.read_trace` to the nanosecond.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tracemark.ctf import read_trace

MAKE_TRACE = r"""
import json, os, sys, threading, tracemark
out = sys.argv[1]
every = tracemark.marker("interop.every", i=int, s=str, f=float, b=bytes, t=bool, o=object)
fmt = tracemark.marker("interop.fmt", "n=%d name=%s")
small = tracemark.marker("interop.small", k=int)
fired = []  # (pid, thread, name, values) in firing order per thread

def values_for(i, who):
    return (
        i * 7919 - 2**62, f"{who} #{i} é", i / 3 - 1e6, bytes([i % 256, 0, 255]), i % 2 == 0,
        (who, i),
    )

with tracemark.record(out, "interop.every") as rec:
    def work(k):
        name = threading.current_thread().name
        for i in range(300):
            v = values_for(i, name)
            every(*v)
    threads = [threading.Thread(target=work, args=(k,), name=f"worker-{k}") for k in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    pid = os.fork()
    if pid == 0:
        for i in range(5):
            every(*values_for(i, "child"))
        sys.exit(0)  # a normal exit: atexit flushes the child's sub-trace
    os.waitpid(pid, 0)

# A second recording into the same directory, with buffers too small to keep up.
rec2 = tracemark.record(out, "interop.[fs]*", subbuffer_size=4096, subbuffers=2)
fmt(1, "one")
with rec2.consumer.stalled():  # the consumer writes nothing meanwhile
    for i in range(2000):
        small(i)
summary = rec2.stop()
print(json.dumps({"child": pid, "discarded": summary.discarded, "recorded2": summary.recorded}))
"""


def values_for(i, who):
    # the same values as MAKE_TRACE fires
    return (
        i * 7919 - 2**62,
        f"{who} #{i} é",
        i / 3 - 1e6,
        bytes([i % 256, 0, 255]),
        i % 2 == 0,
        repr((who, i)),
    )


LINE = re.compile(
    r"\[(?P<s>\d+)\.(?P<ns>\d{9})\] \(\+[^)]*\) [^ ]+ (?P<name>[\w.]+): "
    r"\{ event_count = \d+, tid = (?P<tid>\d+), pid = (?P<pid>\d+), "
    r'thread_name = "(?P<thread>[^"]*)" \}, '
    r"\{ (?P<fields>.*) \}$"
)


def parse_fields(text):
    """babeltrace2's pretty field text -> {name: str}, top level only."""
    out, depth, start, key = {}, 0, 0, None
    in_string = False
    i = 0
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        elif c == "=" and depth == 0 and key is None:
            key = text[start:i].strip()
            start = i + 1
        elif c == "," and depth == 0:
            out[key] = text[start:i].strip()
            key, start = None, i + 1
        i += 1
    out[key] = text[start:].strip()
    return out


def unquote(text):
    assert text.startswith('"') and text.endswith('"')
    return re.sub(r"\\(.)", r"\1", text[1:-1])


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "trace"
    out = subprocess.run(
        [sys.executable, "-c", MAKE_TRACE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return path, json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def babeltrace(trace_dir):
    path, _ = trace_dir
    exe = shutil.which("babeltrace2")
    assert exe, "babeltrace2 is needed (make test installs it)"
    out = subprocess.run(
        [exe, "--clock-seconds", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    # babeltrace2 2.0.4 prints discarded-events warnings on stderr, events on stdout.
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING:")]
    events = []
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        assert m, f"babeltrace2 printed a line this test cannot parse: {line!r}"
        events.append(
            {
                "ts": int(m["s"]) * 1_000_000_000 + int(m["ns"]),
                "name": m["name"],
                "pid": int(m["pid"]),
                "tid": int(m["tid"]),
                "thread": m["thread"],
                "fields": parse_fields(m["fields"]),
            }
        )
    return events, warnings


def test_babeltrace_reads_every_subtrace_in_time_order(trace_dir, babeltrace):
    path, info = trace_dir
    events, _ = babeltrace
    assert len({p.name for p in path.iterdir()}) == 3  # parent twice, and the fork child
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)
    counts = {}
    for e in events:
        counts[e["name"]] = counts.get(e["name"], 0) + 1
    assert counts["interop.every"] == 3 * 300 + 5
    assert counts["interop.small"] == info["recorded2"] - 1  # and the one fmt event
    assert counts["interop.fmt"] == 1


def test_babeltrace_sees_the_values_fired_per_thread_and_process(trace_dir, babeltrace):
    _, info = trace_dir
    events, _ = babeltrace
    every = [e for e in events if e["name"] == "interop.every"]
    by_thread = {}
    for e in every:
        by_thread.setdefault((e["pid"], e["thread"]), []).append(e)
    child = [k for k in by_thread if k[0] == info["child"]]
    assert child == [(info["child"], "MainThread")]
    assert sorted(t for _, t in by_thread if _ != info["child"]) == [
        "worker-0",
        "worker-1",
        "worker-2",
    ]
    for (pid, thread), evs in by_thread.items():
        who = "child" if pid == info["child"] else thread
        assert len({e["tid"] for e in evs}) == 1
        for n, e in enumerate(evs):
            i, s, f, b, t, o = values_for(n, who)
            fields = e["fields"]
            assert int(fields["i"]) == i
            assert unquote(fields["s"]) == s
            assert math.isclose(float(fields["f"]), f, rel_tol=1e-5)
            assert int(fields["_b_len"]) == len(b)
            shown = ", ".join(f"[{k}] = 0x{x:X}" for k, x in enumerate(b))
            assert fields["b"] == f"[ {shown} ]"
            assert fields["t"] == f'( "{str(t).lower()}" : container = {int(t)} )'
            assert unquote(fields["o"]) == o


def test_babeltrace_warns_about_exactly_the_discarded_events(trace_dir, babeltrace):
    _, info = trace_dir
    events, warnings = babeltrace
    assert info["discarded"] > 0
    counted = [int(re.search(r"discarded (\d+) events", w)[1]) for w in warnings]
    assert sum(counted) == info["discarded"]
    assert all("/stream_0" in w for w in warnings)
    ks = [int(e["fields"]["k"]) for e in events if e["name"] == "interop.small"]
    assert ks == list(range(len(ks)))  # the oldest were kept, the newest dropped
    assert len(ks) + info["discarded"] == 2000


def test_babeltrace_and_the_reader_agree_to_the_nanosecond(trace_dir, babeltrace):
    path, info = trace_dir
    events, _ = babeltrace
    trace = read_trace(path)
    ours = [(ev.timestamp, ev.name, ev.pid, ev.tid, ev.thread) for ev in trace.events()]
    theirs = [(e["ts"], e["name"], e["pid"], e["tid"], e["thread"]) for e in events]
    assert sorted(ours) == sorted(theirs)
    assert [o[0] for o in ours] == [t[0] for t in theirs]
    assert trace.discarded == info["discarded"]


def test_babeltrace_reads_a_snapshot_with_lost_packets(tmp_path):
    code = textwrap.dedent(
        """
        import sys, tracemark
        m = tracemark.marker("snap.m", i=int)
        rec = tracemark.record(sys.argv[1], mode="overwrite", subbuffer_size=4096, subbuffers=2)
        for i in range(3000):
            m(i)
        print(rec.snapshot())
        rec.stop()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    snap = out.stdout.strip()
    bt = subprocess.run(["babeltrace2", snap], capture_output=True, text=True, timeout=60)
    assert bt.returncode == 0, bt.stderr
    got = [int(line.rsplit("i = ", 1)[1].rstrip(" }")) for line in bt.stdout.splitlines()]
    assert got == list(range(got[0], 3000)) and got[0] > 0
    assert [ev.fields["i"] for ev in read_trace(snap).events()] == got


NESTED = r"""
import signal, sys, tracemark
main = tracemark.marker("nest.main", i=int, s=str)
nested = tracemark.marker("nest.inner", k=int)
def handler(signum, frame):
    nested(1)
signal.signal(signal.SIGALRM, handler)
with tracemark.record(sys.argv[1], subbuffer_size=1 << 16, subbuffers=64) as rec:
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    for i in range(20000):
        main(i, "x" * (i % 7))
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(rec.summary.recorded, rec.summary.discarded)
"""


def test_babeltrace_reads_the_streams_of_nested_events(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", NESTED, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    recorded, discarded = map(int, out.stdout.split())
    assert discarded == 0
    bt = subprocess.run(["babeltrace2", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bt.returncode == 0, bt.stderr
    lines = bt.stdout.splitlines()
    assert len(lines) == recorded == len(list(read_trace(tmp_path).events()))
    mains = [int(line.rsplit("i = ", 1)[1].split(",")[0]) for line in lines if "nest.main" in line]
    assert mains == list(range(20000))
    assert any("nest.inner" in line for line in lines)


def test_babeltrace_reads_text_with_nul_up_to_it_and_stays_in_step(tmp_path):
    """str and object fields are length-prefixed UTF-8 (text sequences, CTF 1.8 §4.2.3): a NUL
    inside is kept (the project's reader gives it back whole); babeltrace2 shows the text up
    to it and, reading by the length, decodes the fields after it correctly."""
    code = textwrap.dedent(
        """
        import sys, tracemark
        m = tracemark.marker("nul.m", s=str, after=int, o=object)
        with tracemark.record(sys.argv[1]):
            m("a\\0b", 1, "\\0")
            m("plain", 2, None)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    bt = subprocess.run(
        ["babeltrace2", "--clock-seconds", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bt.returncode == 0, bt.stderr
    fields = [parse_fields(LINE.match(line)["fields"]) for line in bt.stdout.splitlines()]
    assert [(unquote(f["s"]), f["after"], unquote(f["o"])) for f in fields] == [
        ("a", "1", "'\\x00'"),
        ("plain", "2", "None"),
    ]
    assert [ev.fields["s"] for ev in read_trace(tmp_path).events()] == ["a\0b", "plain"]


# Field names TSDL cannot spell: non-ASCII (Python identifiers may be) and the three that
# become TSDL keywords with the leading underscore. Every other TSDL keyword as a field name.
NAMES = r"""
import sys, tracemark
kw = ["align", "struct", "int", "enum", "event", "string", "integer", "typealias", "typedef",
      "variant", "signed", "floating_point", "stream", "trace", "env", "clock", "callsite",
      "const", "char", "void", "unsigned", "Bool", "Complex", "Imaginary", "len", "x_len"]
a = tracemark.marker("names.a", città=int, größe=str, ñ_x=bytes, 𓀀x=float, plain=int)
b = tracemark.marker("names.b", "größe=%d ärger=%s")
k = tracemark.marker("names.kw", **{n: int for n in kw})
ks = tracemark.marker("names.kws", **{n: str for n in kw})
with tracemark.record(sys.argv[1]):
    a(7, "groß", b"\x01", 1.5, 9)
    b(3, "viel")
    k(*range(len(kw)))
    ks(*kw)
"""


def test_babeltrace_reads_fields_whose_names_tsdl_cannot_spell(tmp_path):
    """Non-ASCII names and Bool/Complex/Imaginary made babeltrace2 refuse the whole trace;
    they are written escaped (``città`` -> ``0citt_u00e0``) and read back as they were."""
    out = subprocess.run(
        [sys.executable, "-c", NAMES, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    bt = subprocess.run(
        ["babeltrace2", "--clock-seconds", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bt.returncode == 0, bt.stderr
    lines = bt.stdout.splitlines()
    assert len(lines) == 4
    got = {}
    for line in lines:
        m = LINE.match(line)
        assert m, line
        got[m["name"]] = parse_fields(m["fields"])
    a = got["names.a"]
    assert a["0citt_u00e0"] == "7"
    assert unquote(a["0gr_u00f6_u00dfe"]) == "groß"
    assert a["0_u00f1__x"] == "[ [0] = 0x1 ]"
    assert float(a["0_U00013000x"]) == 1.5
    assert a["plain"] == "9"
    assert got["names.b"]["0gr_u00f6_u00dfe"] == "3"
    assert unquote(got["names.b"]["0_u00e4rger"]) == "viel"
    kw = got["names.kw"]
    assert list(kw.values()) == [str(i) for i in range(26)]
    assert list(kw)[:3] == ["align", "struct", "int"]
    assert list(kw)[21:24] == ["0Bool", "0Complex", "0Imaginary"]
    kws = {n: unquote(v) for n, v in got["names.kws"].items() if not n.startswith("_")}
    assert kws["0Bool"] == "Bool" and kws["align"] == "align" and kws["x_len"] == "x_len"

    events = {ev.name: ev for ev in read_trace(tmp_path).events()}
    assert events["names.a"].fields == {
        "città": 7,
        "größe": "groß",
        "ñ_x": b"\x01",
        "𓀀x": 1.5,
        "plain": 9,
    }
    assert events["names.b"].fields == {"größe": 3, "ärger": "viel"}
    assert list(events["names.kw"].fields.values()) == list(range(26))
    assert list(events["names.kw"].fields) == list(events["names.kws"].fields.values())
    assert events["names.kws"].fields["Bool"] == "Bool"


ANY = r"""
import sys, tracemark
from tracemark.markers.fields import ReprText
m = tracemark.marker("any.v", v="any", after=int)
class Odd:
    def __repr__(self): return "Odd(1)"
with tracemark.record(sys.argv[1], "any.*"):
    for i, v in enumerate([None, True, -5, 2.5, "GET", b"\x01\xff", Odd(), 1 << 64]):
        m(v, i)
"""


def test_babeltrace_reads_every_kind_of_an_any_value(tmp_path):
    """An ``any`` field is a variant selected by its enum tag: babeltrace2 reads each kind
    as what it is, and stays in step (the int after it is right every time)."""
    out = subprocess.run(
        [sys.executable, "-c", ANY, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    bt = subprocess.run(["babeltrace2", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bt.returncode == 0, bt.stderr
    lines = bt.stdout.splitlines()
    assert len(lines) == 8
    got = []
    for line in lines:
        m = re.search(
            r'_v_tag = \( "_(\w+)" : container = (\d) \), v = \{ (.*) \}, after = (\d+) \}$', line
        )
        assert m, line
        got.append((m[1], int(m[2]), m[3], int(m[4])))
    assert got == [
        ("none", 0, "{ }", 0),
        ("bool", 1, '( "true" : container = 1 )', 1),
        ("int", 2, "-5", 2),
        ("float", 3, "2.5", 3),
        ("str", 4, '{ len = 3, text = "GET" }', 4),
        ("bytes", 5, "{ len = 2, data = [ [0] = 0x1, [1] = 0xFF ] }", 5),
        ("repr", 6, '{ len = 6, text = "Odd(1)" }', 6),
        ("repr", 6, '{ len = 20, text = "18446744073709551616" }', 7),
    ]
    values = [ev.fields["v"] for ev in read_trace(tmp_path).events()]
    assert values == [None, True, -5, 2.5, "GET", b"\x01\xff", "Odd(1)", str(1 << 64)]
