"""The Parquet export's columnar path (tracemark/_reader.c decode_columns, used by
tracemark/export/parquet.py for a wide export of markers with int, float, bool and str
fields) writes the dataset the pure path (TRACEMARK_CORE=python: an Event per event) writes:
the same files' contents (rows in the same order per table and process, the same schema and
metadata), the same tables (and ``NAME~2`` numbering), counts and error lines, on traces of
threads, asyncio tasks, a fork child, random values (Hypothesis), damaged copies, and with
small buffers; and it is the path taken (not the Event one)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
pa = pytest.importorskip("pyarrow", reason="pip install '.[test]' (pyarrow, duckdb)")
pq = pytest.importorskip("pyarrow.parquet")

from tracemark.ctf import read_trace  # noqa: E402
from tracemark.ctf import writer as W  # noqa: E402
from tracemark.export import parquet as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    from tracemark import _creader as creader
except ImportError:  # pragma: no cover - a build without the C reader
    creader = None
needs_c = pytest.mark.skipif(creader is None, reason="the C reader is not built")

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, sys, threading, tracemark
    a = tracemark.marker("pqcol.a", i=int, f=float, b=bool, s=str)
    bare = tracemark.marker("pqcol.bare")
    step = tracemark.marker("pqcol.step", n=int, tid=str)
    VALUES = [
        (0, 0.0, False, ""),
        (-5, -1.5, True, 'q " \\\\ nl \\n é 漢 \\U0001F600'),
        (1 << 40, float("nan"), True, "x" * 300),
        (-(1 << 63), float("inf"), False, "\\x00"),
        ((1 << 63) - 1, float("-inf"), True, "last"),
        (8, 5e-324, True, "b"),
    ]

    def work(who, k0):
        for k in range(int(sys.argv[2])):
            i, f, b, s = VALUES[(k + k0) % len(VALUES)]
            a(i ^ k, f, b, s)
            step(k, who)
            if k % 7 == 0:
                bare()

    async def task_body(n):
        step(n, "task")
        await asyncio.sleep(0)
        a(n, 0.5, False, "in a task")

    async def main_task():
        await asyncio.gather(
            asyncio.create_task(task_body(1), name="named"), asyncio.create_task(task_body(2))
        )

    with tracemark.record(sys.argv[1], subbuffer_size=1 << 14, subbuffers=8):
        ts = [threading.Thread(target=work, args=(f"t{j}", j), name=f"w{j}") for j in range(3)]
        for t in ts: t.start()
        asyncio.run(main_task())
        for t in ts: t.join()
        pid = os.fork()
        if pid == 0:
            try:
                other = tracemark.marker("pqcol.child_only", n=float)
                again = tracemark.marker("pqcol.twice", x=float)
                for k in range(50):
                    again(k / 3)
                    other(k * 0.25)
                work("child", 1)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        tracemark.marker("pqcol.twice", x=int)(5)
        work("parent", 2)
    """
)


def _record(dst: Path, program: str, *args: str) -> Path:
    prog = dst.parent / f"{dst.name}.py"
    prog.write_text(program)
    env_ = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(prog), str(dst), *args], check=True, env=env_, timeout=120)
    return dst


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return _record(tmp_path_factory.mktemp("pqcol") / "trace", PROGRAM, "400")


def _dataset(out: Path) -> dict[str, tuple]:
    """Per partition directory: its files' rows concatenated in part order, and the first
    file's schema (its metadata included)."""
    got: dict[str, list] = {}
    for root, _, files in os.walk(out):
        names = [f for f in files if f.endswith(".parquet")]
        assert not [f for f in files if f.endswith(".partial")]
        names.sort(key=lambda f: int(re.search(r"-(\d+)\.parquet$", f).group(1)))
        for f in names:
            got.setdefault(os.path.relpath(root, out), []).append(pq.read_table(Path(root, f)))
    return {k: (pa.concat_tables(v), v[0].schema) for k, v in got.items()}


def _rows(table) -> list:
    """The rows, a NaN as the string "nan" (pyarrow's equals says NaN != NaN)."""
    return [
        {k: "nan" if isinstance(v, float) and v != v else v for k, v in row.items()}
        for row in table.to_pylist()
    ]


def _export(trace: Path, out: Path, monkeypatch, core: str, columnar=None, **kw):
    """export_parquet with the C reader (core "c") or the pure one, asserting the columnar
    path is taken when ``columnar`` (by default: with the C reader) and not otherwise."""
    taken = []
    real = P._columnar

    def spy(*a, **k):
        taken.append(True)
        return real(*a, **k)

    monkeypatch.setattr(P, "_columnar", spy)
    if core == "python":
        monkeypatch.setenv("TRACEMARK_CORE", "python")
    else:
        monkeypatch.delenv("TRACEMARK_CORE", raising=False)
    try:
        result = P.export_parquet(trace, out, **kw)
    finally:
        monkeypatch.undo()
    assert bool(taken) == (core == "c" if columnar is None else columnar)
    return result


def _same_exports(trace: Path, tmp: Path, monkeypatch, **kw):
    a = _export(trace, tmp / "c", monkeypatch, "c", **kw)
    b = _export(trace, tmp / "py", monkeypatch, "python", **kw)
    assert (a.events, a.tables, a.pids) == (b.events, b.tables, b.pids)
    assert sorted(a.errors) == sorted(b.errors)
    da, db = _dataset(tmp / "c"), _dataset(tmp / "py")
    assert da.keys() == db.keys()
    for k in da:
        (ta, sa), (tb, sb) = da[k], db[k]
        assert sa.equals(sb, check_metadata=True), k
        assert _rows(ta) == _rows(tb), k
        ts = ta.column("timestamp").to_pylist()
        assert ts == sorted(ts)
    return a, da


@needs_c
def test_the_columnar_path_writes_what_the_event_path_writes(trace, tmp_path, monkeypatch):
    r, data = _same_exports(trace, tmp_path, monkeypatch)
    assert r.events == sum(
        1 for ev in read_trace(trace).events()
    )  # task events are bookkeeping, not rows
    assert len(r.pids) == 2 and not r.errors
    # the child's other declarations: a table of their own, numbered in order of first rows
    assert {"pqcol.child_only", "pqcol.twice", "pqcol.twice~2"} <= set(r.tables)
    tasks = set()
    for k, (t, _) in data.items():
        if k.startswith("pqcol.step/"):
            tasks.update(t.column("task").to_pylist())
    assert {"named", None} <= tasks and any(x and x.startswith("Task-") for x in tasks)


@needs_c
def test_small_buffers_and_few_open_files(trace, tmp_path, monkeypatch):
    r, _ = _same_exports(
        trace, tmp_path, monkeypatch, row_group_rows=3, buffered_rows=10, open_files=2
    )
    assert r.row_groups > 100 and len(r.files) > len(r.tables)


def _damage(src: Path, dst: Path, rng: random.Random) -> None:
    shutil.copytree(src, dst)
    subs = sorted(p for p in dst.iterdir() if (p / "metadata").exists())
    victim = rng.choice(sorted(rng.choice(subs).glob("stream_*")))
    blob = bytearray(victim.read_bytes())
    how = rng.choice(["cut", "flip", "id", "u32", "count"])
    if how == "cut":
        del blob[rng.randrange(W.PACKET_FIXED_SIZE, len(blob)) :]
    elif how == "flip":
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(W.PACKET_FIXED_SIZE + 64, len(blob))] ^= 1 << rng.randrange(8)
    elif how == "count":
        at = W.OFF_COUNT
        blob[at : at + 4] = (int.from_bytes(blob[at : at + 4], "little") + 1).to_bytes(4, "little")
    else:
        at = rng.randrange(W.PACKET_FIXED_SIZE + 64, len(blob) - 4)
        blob[at : at + 4] = rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 2, 1 << 20]).to_bytes(4, "little")
    victim.write_bytes(bytes(blob))


@needs_c
def test_damaged_copies_export_alike(trace, tmp_path, monkeypatch):
    rng = random.Random(15)
    damaged = 0
    for i in range(30):
        d = tmp_path / f"d{i}"
        _damage(trace, d / "t", rng)
        r, _ = _same_exports(d / "t", d, monkeypatch)
        damaged += bool(r.errors)
        shutil.rmtree(d)
    assert damaged > 10


VALUES = textwrap.dedent(
    """
    import json, sys, threading, tracemark
    plan = json.loads(open(sys.argv[2]).read())
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    markers = [tracemark.marker(f"pqcol.h{k}", **{f: kinds[t] for f, t in fields})
               for k, fields in enumerate(plan["markers"])]
    def run(rows):
        for k, values in rows:  # a float field's "nan", "inf", "-inf": that float
            markers[k](*[float(v) if t == "float" else v
                         for (_, t), v in zip(plan["markers"][k], values)])
    with tracemark.record(sys.argv[1], subbuffer_size=1 << 12, subbuffers=64):
        ts = [threading.Thread(target=run, args=(rows,)) for rows in plan["threads"]]
        for t in ts: t.start()
        for t in ts: t.join()
    """
)

_KIND_VALUES = {
    "int": st.integers(-(1 << 63), (1 << 63) - 1),
    "float": st.floats(allow_nan=False) | st.sampled_from(["nan", "inf", "-inf"]),
    "bool": st.booleans(),
    "str": st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
}


@st.composite
def _plans(draw):
    markers = draw(
        st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from(["a", "b", "c", "pid", "tid"]),
                    st.sampled_from(list(_KIND_VALUES)),
                ),
                max_size=4,
                unique_by=lambda f: f[0],
            ),
            min_size=1,
            max_size=3,
        )
    )

    def row():
        k = draw(st.integers(0, len(markers) - 1))
        return [k, [draw(_KIND_VALUES[t]) for _, t in markers[k]]]

    threads = [
        [row() for _ in range(draw(st.integers(0, 30)))] for _ in range(draw(st.integers(1, 3)))
    ]
    return {"markers": markers, "threads": threads}


@needs_c
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=_plans())
def test_random_markers_and_values_export_alike(tmp_path_factory, plan):
    import json

    d = tmp_path_factory.mktemp("h")
    (d / "plan.json").write_text(json.dumps(plan))
    trace = _record(d / "t", VALUES, str(d / "plan.json"))
    with pytest.MonkeyPatch.context() as mp:
        r, _ = _same_exports(trace, d, mp, row_group_rows=7, buffered_rows=11)
    assert r.events == sum(len(t) for t in plan["threads"])


def _rows_of_columns(sub, classes: dict, tasks: list) -> dict:
    """decode_columns' columns as rows: name -> [(timestamp, task, values), ...]."""
    from array import array

    rows: dict[str, list] = {}
    for eid, (count, _first, ts, task, *values) in classes.items():
        if not count:  # its only event failed the time check: none given
            assert ts == task == b""
            continue
        name, fields = sub.meta.events[eid]
        cols = []
        for (_, kind), v in zip(fields, values, strict=True):
            if kind == "str":
                offsets, text = array("i", v[0]), v[1]
                cols.append([text[offsets[k] : offsets[k + 1]].decode() for k in range(count)])
            elif kind == "bool":
                cols.append([bool(x) for x in v])
            else:
                cols.append([repr(x) for x in array("q" if kind == "int" else "d", v)])
        got = rows.setdefault(name, [])
        for k, (t, i) in enumerate(zip(array("q", ts), array("i", task), strict=True)):
            got.append((t, tasks[i], tuple(c[k] for c in cols)))
    return rows


def _rows_of_events(events) -> dict:
    rows: dict[str, list] = {}
    for ev in events:
        values = tuple(repr(v) if type(v) in (int, float) else v for v in ev.fields.values())
        rows.setdefault(ev.name, []).append((ev.timestamp, ev.task, values))
    return rows


def fuzz_columns(trace_path: str, n: int, seed: int) -> int:
    """decode_columns and decode on ``n`` mutated packets of the trace: the same rows per
    marker (in order), the same walk (pos, last, n) and the same error; returns how many
    were damaged. (The AddressSanitizer run below calls it too.)"""
    import creader_fuzz as fz

    from tracemark import env as tm_env

    module = tm_env.reader()[0]
    rng = random.Random(seed)
    corpus = fz.packets(trace_path)
    damaged = 0
    for i in range(n):
        stream, p, data = rng.choice(corpus)
        q, blob = fz.mutate(rng, p, data) if i else (p, data)
        layout = stream.sub.c_layout
        a = module.decode_columns(layout, blob, q.start, q.content_end, q.ts_begin, q.ts_end)
        b = module.decode(
            layout, blob, q.start, q.content_end, q.ts_begin, q.ts_end, q.pid, q.tid,
            q.thread, None, None, 1 << 30,
        )  # fmt: skip
        assert a[1:4] == b[1:4] and a[5] == b[5], (i, a[1:], b[1:])
        assert _rows_of_columns(stream.sub, a[0], a[4]) == _rows_of_events(b[0]), i
        damaged += a[5] is not None
    return damaged


@needs_c
def test_decode_columns_gives_decodes_rows_and_errors(trace, monkeypatch):
    monkeypatch.delenv("TRACEMARK_CORE", raising=False)
    assert fuzz_columns(str(trace), 1500, 3) > 300


@needs_c
def test_decode_columns_runs_clean_under_address_sanitizer(trace, tmp_path):
    import sysconfig

    import test_creader as tc

    libasan = tc._asan_runtime()
    if libasan is None:
        pytest.skip("no compiler with AddressSanitizer (libasan.so) here")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    so = tmp_path / ("_creader" + sysconfig.get_config_var("EXT_SUFFIX"))
    sources = [str(ROOT / "tracemark" / n) for n in ("_reader.c", "_reader_json.c")]
    made = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
         f"-I{sysconfig.get_paths()['include']}", *sources, "-o", str(so)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=address: {made.stderr[-500:]}")
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tracemark._creader', {str(so)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "sys.modules['tracemark._creader'] = mod\n"
        "import tracemark.env\n"
        "assert tracemark.env.reader()[0] is mod\n"
        "import test_parquet_columns as t\n"
        f"print(t.fuzz_columns({str(trace)!r}, 1500, 5), 'damaged')\n"
    )
    environ = {
        **os.environ,
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)]),
        "PYTHONMALLOC": "malloc",
    }
    environ.pop("TRACEMARK_CORE", None)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environ, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ERROR: AddressSanitizer" not in run.stderr
    assert run.stdout.endswith(" damaged\n")


@needs_c
def test_what_the_columnar_path_declines(trace, monkeypatch):
    """A name declared again with other fields in one process (the recorder renames such a
    marker, a hand-made trace need not), a field kind without a column here, an unknown
    declaration: the Event path's."""
    from tracemark.export.walker import open_streams

    monkeypatch.delenv("TRACEMARK_CORE", raising=False)

    def declines(change) -> bool:
        subs, _ = open_streams(trace)
        change(subs[0].meta.events)
        declared = {}
        for sub in subs:
            for eid, (name, fields) in sub.meta.events.items():
                if eid != sub.task_event_id:
                    declared.setdefault((sub.pid, name, tuple(f for f, _ in fields)), fields)
        return not P._columnar_layouts(subs, declared)

    assert not declines(lambda events: None)
    assert declines(lambda events: events.__setitem__(900, ("pqcol.a", (("z", "int"),))))
    assert declines(lambda events: events.__setitem__(901, ("pqcol.new", (("z", "bytes"),))))
    assert declines(lambda events: events.__setitem__(902, ("pqcol.new", (("z", "any"),))))
    assert declines(
        lambda events: events.__setitem__(903, ("pqcol.new", (("z", "int"), ("z", "int"))))
    )
