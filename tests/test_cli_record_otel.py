"""``tracemark record --otel [ENDPOINT]``: the recorded program also sends live to an
OpenTelemetry collector (tests/otlp_collector.py decodes what arrives), the CTF recording
goes on as before, and the summary says what was sent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from otlp_collector import Collector

import tracemark
from tracemark.cli.record import split_argv
from tracemark.ctf import read_trace

ROOT = Path(tracemark.__file__).resolve().parents[1]

APP = """
import multiprocessing as mp, os
import tracemark

job = tracemark.span("app.job", n=int)
tick = tracemark.marker("app.tick", n=int)

def work(n):
    with job(n):
        tick(n)
    return os.getpid()

if __name__ == "__main__":
    for n in range(10):
        work(n)
    with mp.get_context("fork").Pool(2) as pool:
        pids = set(pool.map(work, range(100, 110), chunksize=1))
        pool.close()
        pool.join()
    print("workers", len(pids))
"""


def record(tmp_path, *args, env=None, pre="", program=APP):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(program))
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = str(ROOT)
    base.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None) if env is None else None
    code = f"{pre}\nimport sys\nfrom tracemark.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", code, "record",
         "-o", str(tmp_path / "trace"), *args, str(app)],
        capture_output=True,
        text=True,
        env=base,
        timeout=120,
    )  # fmt: skip


def test_record_otel_sends_live_and_records_as_before(tmp_path):
    with Collector() as c:
        out = record(tmp_path, "--otel", c.endpoint)
        spans = c.spans()
    assert out.returncode == 0, out.stderr
    # Live: every span of every process (the parent and its fork workers), with its event.
    assert sorted({a.key: a.value for a in s.attributes}["n"].int_value for s in spans) == [
        *range(10),
        *range(100, 110),
    ]
    assert all([e.name for e in s.events] == ["app.tick"] for s in spans)
    # The CTF recording is as it would be without --otel.
    counts = Counter(ev.name for ev in read_trace(str(tmp_path / "trace")).events())
    assert counts == {"app.job.begin": 20, "app.job.end": 20, "app.tick": 20}
    # The summary adds up what each process sent.
    assert f"20 spans sent live to {c.endpoint}" in out.stderr, out.stderr
    assert ": 20 sent, 20 span events" in out.stderr and "NOT sent" not in out.stderr


def test_bare_otel_takes_the_endpoint_from_the_environment_and_warns_of_losses(tmp_path):
    with Collector() as c:
        c.fail(400)  # refused: nothing arrives, and the summary says so
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=c.endpoint)
        out = record(tmp_path, "--otel", env=env)
        assert c.attempts >= 1 and c.spans() == []
    assert out.returncode == 0, out.stderr
    assert f"spans sent live to {c.endpoint}" in out.stderr, out.stderr
    assert "WARNING: OpenTelemetry: 20 spans NOT sent (20 refused or failed" in out.stderr


FORK_EXIT = """
import os
import tracemark

job = tracemark.span("app.job", n=int)
with job(1):
    pass
pid = os.fork()
if pid == 0:
    with job(2):  # queued in the child's bridge, never sent: os._exit skips every hook
        pass
    os._exit(0)
os.waitpid(pid, 0)
print("child", pid)
"""


def test_a_child_ending_by_os_exit_is_named_in_the_summary_not_lost_silently(tmp_path):
    with Collector() as c:
        out = record(tmp_path, "--otel", c.endpoint, program=FORK_EXIT)
        spans = c.spans()
    assert out.returncode == 0, out.stderr
    child = out.stdout.split()[-1]
    # The parent's span arrived; the child's did not, and the summary says which process.
    assert [{a.key: a.value for a in s.attributes}["n"].int_value for s in spans] == [1]
    assert f"OpenTelemetry: 1 span sent live to {c.endpoint} from 1 process: 1 sent" in out.stderr
    assert (
        f"WARNING: OpenTelemetry: 1 process ({child}) ended without stopping the bridge"
        in out.stderr
    ), out.stderr
    assert "NOT sent" in out.stderr
    # The CTF recording has both spans: its ring outlives os._exit.
    counts = Counter(ev.name for ev in read_trace(str(tmp_path / "trace")).events())
    assert counts == {"app.job.begin": 2, "app.job.end": 2}


def test_record_otel_without_opentelemetry_is_exit_5_naming_the_extra(tmp_path):
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    out = record(tmp_path, "--otel", "http://127.0.0.1:9", pre=blocker)
    assert out.returncode == 5
    assert "pip install 'tracemark[otel]'" in out.stderr
    assert not (tmp_path / "trace").exists()  # nothing ran, nothing was created


def test_otel_takes_a_url_but_never_the_program():
    assert split_argv(["--otel", "http://c:4318", "app.py", "-x"]) == (
        ["--otel", "http://c:4318"],
        ["app.py", "-x"],
    )
    assert split_argv(["--otel", "app.py"]) == (["--otel"], ["app.py"])
    assert split_argv(["--otel=http://c:4318", "app.py"]) == (["--otel=http://c:4318"], ["app.py"])
