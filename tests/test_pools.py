"""Process pools under ``tracemark record``: every event a worker fired is in the trace,
whatever ends the pool (``close()`` + ``join()``, ``terminate()``, ``with Pool(...)``, which
terminates, executor shutdown), for every start method, and nothing hangs.

Each test runs one program under ``tracemark record`` that makes a pool 50 times; workers
count what they fired in a side file (one per worker process), and the trace must hold
exactly as many events. ``Pool.terminate()`` sends SIGTERM to workers that may be anywhere:
waiting for a task, inside a marker, or stopping their recording in multiprocessing's
finalizers. What they could not write goes to the ring files, which ``tracemark record``
recovers once the program has ended.
"""

import json
import subprocess
import sys
import textwrap

import pytest

RUNS = 50

APP = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing as mp, os, sys, tracemark
    m = tracemark.marker("pool.ev", chunk=int, k=int)
    SIDE = sys.argv[3]

    def f(chunk):
        m(chunk, 0)
        m(chunk, 1)
        with open(os.path.join(SIDE, str(os.getpid())), "a") as fh:
            fh.write("2\\n")
        return chunk

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        how, runs = sys.argv[2], int(sys.argv[4])
        for run in range(runs):
            chunks = range(run * 20, run * 20 + 20)
            if how == "with":
                with ctx.Pool(2) as pool:
                    pool.map(f, chunks)
            elif how == "terminate":
                pool = ctx.Pool(2)
                pool.map(f, chunks)
                pool.terminate()
                pool.join()
            elif how == "close":
                pool = ctx.Pool(2)
                pool.map(f, chunks)
                pool.close()
                pool.join()
            else:
                with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
                    list(ex.map(f, chunks))
    """
)


@pytest.mark.parametrize("how", ["close", "terminate", "with", "executor"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_workers_lose_nothing(tmp_path, method, how):
    (tmp_path / "app.py").write_text(APP)
    side = tmp_path / "side"
    side.mkdir()
    trace = tmp_path / "trace"
    cmd = [sys.executable, "-m", "tracemark", "record", "-o", str(trace), "--"]
    cmd += [sys.executable, str(tmp_path / "app.py"), method, how, str(side), str(RUNS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fired = sum(int(line) for p in side.iterdir() for line in p.read_text().split())
    assert fired == 2 * 20 * RUNS
    stats = subprocess.run(
        [sys.executable, "-m", "tracemark", "stats", "--json", str(trace)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["events"] == fired, proc.stderr
    assert doc["discarded"] == 0
    assert "recover" not in stats.stderr  # tracemark record recovered every dead worker


def test_an_in_process_recording_recovers_its_terminated_workers(tmp_path):
    """Without ``tracemark record``: ``with Pool()`` terminates fork workers that inherited
    the recording; the parent's ``stop()`` recovers what they left in their rings."""
    script = textwrap.dedent(
        """
        import multiprocessing as mp, sys, tracemark
        from tracemark.ctf import read_trace
        from tracemark.ctf.recovery import pending
        m = tracemark.marker("ip.ev", k=int)
        def f(k):
            m(k)
            return k
        if __name__ == "__main__":
            with tracemark.record(sys.argv[1], "ip.*"):
                for run in range(20):
                    with mp.get_context("fork").Pool(2) as pool:
                        pool.map(f, range(run * 10, run * 10 + 10))
            got = sorted(e.fields["k"] for e in read_trace(sys.argv[1]).events())
            print(got == list(range(200)), len(pending(sys.argv[1])))
        """
    )
    (tmp_path / "app.py").write_text(script)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "app.py"), str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"]
