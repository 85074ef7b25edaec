"""tracemark record: how the program is run and how recording reaches every Python process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracemark
from tracemark.cli import _boot
from tracemark.cli._common import CliError
from tracemark.cli.record import SITE_DIR, default_dir, environment, parse_size, program_argv

ROOT = Path(tracemark.__file__).resolve().parents[1]


def test_program_argv_accepts_a_command_a_script_or_a_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.py").write_text("pass\n")
    assert program_argv(None, ["--", "python3", "app.py", "-x"]) == ["python3", "app.py", "-x"]
    assert program_argv(None, ["app.py", "-x"]) == [sys.executable, "app.py", "-x"]
    assert program_argv("http.server", ["8000"]) == [sys.executable, "-m", "http.server", "8000"]
    with pytest.raises(CliError) as info:
        program_argv(None, ["./nope"])
    assert info.value.code == 127
    with pytest.raises(CliError) as info:
        program_argv(None, [])
    assert info.value.code == 2


def test_sizes():
    assert parse_size("4096") == 4096
    assert parse_size("256K") == 256 << 10
    assert parse_size("4MiB") == 4 << 20
    assert parse_size("1g") == 1 << 30
    with pytest.raises(CliError):
        parse_size("4 lots")


def test_default_dirs_are_new_timestamped_and_named_after_the_program(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = default_dir([sys.executable, "serve.py", "--port", "1"], now=0)
    assert first.parent == Path("tracemark-traces")
    assert first.name.endswith("-serve") and first.name[:8].isdigit()
    first.mkdir(parents=True)
    second = default_dir([sys.executable, "serve.py"], now=0)
    assert second != first and second.name == first.name + "-2"
    assert default_dir([sys.executable, "-m", "pkg.mod"], now=0).name.endswith("-pkg.mod")


def test_the_environment_carries_the_settings_and_puts_the_bootstrap_first(tmp_path):
    env = environment(
        tmp_path / "t",
        ["net.*", "db.*"],
        "overwrite",
        1 << 20,
        ["json:loads"],
        {"PYTHONPATH": "/x"},
    )
    assert env["PYTHONPATH"] == f"{SITE_DIR}{os.pathsep}/x"
    assert env["TRACEMARK_RECORD_DIR"] == str((tmp_path / "t").resolve())
    settings = _boot.settings(env)
    assert settings == {
        "path": str((tmp_path / "t").resolve()),
        "events": ["net.*", "db.*"],
        "kwargs": {"mode": "overwrite", "subbuffer_size": 1 << 18, "subbuffers": 4},
        "probes": ["json:loads"],
    }
    assert _boot.settings({}) is None


def test_boot_starts_one_recording_with_the_settings(monkeypatch):
    calls, installed = [], []

    class FakeRecording:
        def stop(self):
            calls.append("stop")

    def record(path, events, **kwargs):
        calls.append((path, events, kwargs))
        return FakeRecording()

    monkeypatch.setattr(tracemark, "record", record)
    monkeypatch.setattr(
        tracemark.probes, "install_spec", lambda spec, defer=False: installed.append((spec, defer))
    )
    monkeypatch.setattr(_boot, "recording", None)
    monkeypatch.setenv("TRACEMARK_RECORD_DIR", "/tmp/x")
    monkeypatch.setenv("TRACEMARK_RECORD_EVENTS", "net.*")
    monkeypatch.setenv("TRACEMARK_RECORD_PROBES", "json:loads\nos:getcwd")
    monkeypatch.delenv("TRACEMARK_RECORD_MODE", raising=False)
    monkeypatch.delenv("TRACEMARK_RECORD_BUFFER", raising=False)
    _boot.start()
    _boot.start()  # once per process
    assert calls == [("/tmp/x", "net.*", {"mode": "discard"})]
    assert installed == [("json:loads", True), ("os:getcwd", True)]  # deferred if not imported
    _boot._stop()
    assert calls[-1] == "stop" and _boot.recording is None


def test_the_bootstrap_chains_to_the_sites_own_sitecustomize(tmp_path):
    user_site = tmp_path / "site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text(
        "import sys\nsys.stderr.write('user site ran\\n')\n"
    )
    env = environment(tmp_path / "trace", [], "discard", None, [], {"PYTHONPATH": str(user_site)})
    env["PATH"] = os.environ["PATH"]
    script = textwrap.dedent(
        f"""
        import sys, sitecustomize
        print(sitecustomize.__file__)
        print({str(SITE_DIR)!r} in sys.path)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "user site ran" in proc.stderr
    file, ours_on_path = proc.stdout.split()
    assert Path(file) == user_site / "sitecustomize.py"
    assert ours_on_path == "False"


def run_record(tmp_path, *program):
    return subprocess.run(
        [sys.executable, "-m", "tracemark", "record", "-o", str(tmp_path / "t"), "--", *program],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_programs_exit_code_is_returned(tmp_path):
    proc = run_record(tmp_path, sys.executable, "-c", "import sys; print('out'); sys.exit(3)")
    assert proc.returncode == 3
    assert proc.stdout == "out\n"  # the summary goes to stderr


def test_a_program_killed_by_a_signal_is_128_plus_n(tmp_path):
    proc = run_record(tmp_path, sys.executable, "-c", "import os; os.kill(os.getpid(), 9)")
    assert proc.returncode == 137


def test_an_existing_trace_is_never_overwritten(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "metadata").write_text("")
    proc = run_record(tmp_path, sys.executable, "-c", "pass")
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_the_programs_own_options_are_left_to_it():
    from tracemark.cli.record import split_argv

    assert split_argv(["-o", "d", "-m", "pkg", "--port", "80"]) == (
        ["-o", "d", "-m", "pkg"],
        ["--port", "80"],
    )
    assert split_argv(["-e", "a.*", "--", "python", "-X", "dev"]) == (
        ["-e", "a.*"],
        ["python", "-X", "dev"],
    )
    assert split_argv(["--mode=overwrite", "app.py", "-o", "x"]) == (
        ["--mode=overwrite"],
        ["app.py", "-o", "x"],
    )
    assert split_argv(["-mpkg", "-v"]) == (["-mpkg"], ["-v"])
    assert split_argv(["--top", "3"]) == (["--top", "3"], [])


def test_a_probe_that_fails_to_install_is_one_line_and_recording_goes_on(monkeypatch, capsys):
    calls = []

    class FakeRecording:
        def stop(self):
            calls.append("stop")

    def install_spec(spec, defer=False):
        if spec == "bad:spec":
            raise ValueError("no module named 'bad'")
        calls.append(spec)

    monkeypatch.setattr(tracemark, "record", lambda *a, **k: FakeRecording())
    monkeypatch.setattr(tracemark.probes, "install_spec", install_spec)
    monkeypatch.setattr(_boot, "recording", None)
    monkeypatch.setenv("TRACEMARK_RECORD_DIR", "/tmp/x")
    monkeypatch.setenv("TRACEMARK_RECORD_PROBES", "bad:spec\njson:loads")
    _boot.start()
    assert _boot.recording is not None and calls == ["json:loads"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tracemark: --probe bad:spec not installed in") and "'bad'" in line
    _boot._stop()


def test_probe_specs_are_checked_before_the_program_starts():
    from tracemark.cli.record import check_probe_specs

    check_probe_specs(["json:loads", "json:loads%return{s}"])
    with pytest.raises(CliError) as info:
        check_probe_specs(["json:loads{s"])
    assert info.value.code == 2 and "json:loads{s" in info.value.message


def test_a_glob_no_process_declared_a_marker_for_is_a_warning(tmp_path):
    # The parent declares app.parent, its fork child app.child: a glob either one matched is
    # fine; one nobody matched is said, with the closest names the processes had.
    code = (
        "import os, tracemark\n"
        "tracemark.marker('app.parent', n=int)(1)\n"
        "if os.fork() == 0:\n"
        "    tracemark.marker('app.child', n=int)(2)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracemark",
            "record",
            "-o",
            str(tmp_path / "t"),
            "-e",
            "app.child",
            "-e",
            "app.parnet",
            "-e",
            "nothing.*",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line.strip() for line in proc.stderr.splitlines() if "matched no marker" in line]
    assert warnings == [
        "WARNING: -e 'app.parnet' matched no marker the program declared; closest: app.parent",
        "WARNING: -e 'nothing.*' matched no marker the program declared",
    ], proc.stderr


def test_a_python_script_that_does_not_exist_is_an_error_before_anything_is_made(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app.py").write_text("pass\n")
    for argv in (["python3", "nosuch.py"], ["python", "-u", "-X", "dev", "nosuch.py", "app.py"]):
        with pytest.raises(CliError, match=r"nosuch\.py: no such file") as info:
            program_argv(None, argv)
        assert info.value.code == 127
    for fine in (
        ["python3", "-X", "dev", "app.py"],
        ["python3", "-c", "pass", "nosuch.py"],
        ["python3", "-m", "json.tool", "nosuch.py"],
        ["python3", "-"],
    ):
        assert program_argv(None, fine) == fine
    proc = run_record(tmp_path, "python3", "nosuch.py")
    assert proc.returncode == 127 and "nosuch.py: no such file" in proc.stderr
    assert not (tmp_path / "t").exists()  # no trace directory of nothing
    proc = run_record(tmp_path, sys.executable, "-c", "pass")  # no markers, no -e: no warning
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr


def test_record_waits_for_processes_still_ending_but_not_for_a_daemon(monkeypatch):
    """After the program, ``record`` waits RECORDINGS_GRACE for processes still recording;
    each one that ends starts the grace again (a loaded forkserver's workers end seconds
    apart), up to RECORDINGS_GRACE_MAX; a daemon that goes on recording is not waited for
    longer than the grace. (A clock of its own: no test waits for real.)"""
    from types import SimpleNamespace

    from tracemark.cli import record
    from tracemark.ctf import recovery

    now = [0.0]
    fake_time = SimpleNamespace(
        monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    monkeypatch.setattr(record, "time", fake_time)

    def live_until(ends: dict[str, float]) -> None:
        now[0] = 0.0
        monkeypatch.setattr(recovery, "pending", lambda d: list(ends))
        monkeypatch.setattr(recovery, "is_live", lambda s: now[0] < ends[s])
        record._wait_for_recordings(Path("trace"), 3.0)

    live_until({"daemon": float("inf")})
    assert 3.0 <= now[0] < 3.1
    live_until({f"worker{k}": 2.0 * (k + 1) for k in range(5)})  # the last ends at 10 s
    assert 10.0 <= now[0] < 10.1
    live_until({f"worker{k}": 2.5 * (k + 1) for k in range(10)})  # the last would at 25 s
    assert now[0] == pytest.approx(record.RECORDINGS_GRACE_MAX, abs=0.1)
    live_until({})
    assert now[0] == 0.0
