"""Errors of the machine (too many open files, disk full, permission denied) are said as
such, with exit code 5, never as a corrupt trace (exit 4) nor a traceback."""

import errno
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracemark
from tracemark._environment import environment_error
from tracemark.cli import main
from tracemark.cli._common import EXIT_CODES_HELP, EXIT_ENVIRONMENT
from tracemark.ctf import TraceError

ROOT = Path(tracemark.__file__).resolve().parents[1]

MAKE = """
import sys, threading, tracemark
m = tracemark.marker("many.ev", k=int)
go = threading.Event()
def work(k):
    m(k)
    go.wait()
with tracemark.record(sys.argv[1], "many.*", subbuffer_size=4096):
    ts = [threading.Thread(target=work, args=(k,)) for k in range(40)]
    for t in ts: t.start()
    go.set()
    for t in ts: t.join()
"""

# Runs the command once unlimited (so every module it needs is imported: an import under
# the limit would fail first), then again with RLIMIT_NOFILE lowered to argv[1].
LIMITED = """
import contextlib, io, resource, sys
from tracemark.cli import main
limit, argv = int(sys.argv[1]), sys.argv[2:]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(argv)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    trace = tmp_path_factory.mktemp("many") / "trace"
    subprocess.run([sys.executable, "-c", MAKE, str(trace)], check=True, timeout=120)
    assert len(list(trace.glob("*/stream_*"))) == 40
    return trace


COMMANDS = [
    ["view"],
    ["stats"],
    ["spans"],
    ["export", "--format", "chrome", "-o", "{out}/t.json"],
    ["export", "--format", "perfetto", "-o", "{out}/t.pftrace"],
    ["export", "--format", "chrome", "--jobs", "2", "-o", "{out}/j.json"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:4:2]))
@pytest.mark.parametrize("limit", [3, 4])  # none left at all; one left (the reader's own)
def test_too_many_open_files_is_said_as_such(many, tmp_path, command, limit):
    argv = [c.format(out=tmp_path) for c in command]
    argv.insert(1, str(many))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIMITED), str(limit), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode == 0:  # the command needed no more files than the limit leaves
        assert limit > 3, proc.stderr
        return
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert "Too many open files [EMFILE]" in line
    assert f"may open {limit} files" in line and "ulimit -n" in line
    assert str(many) in line or str(tmp_path) in line  # the path it concerns
    assert "corrupt" not in proc.stderr and "Traceback" not in proc.stderr


def test_no_fd_left_view_fails_with_exit_5(many):
    # The case above with no file left always fails: make sure it is not passed over.
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LIMITED), "3", "view", str(many)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == EXIT_ENVIRONMENT, proc.stderr


class _FullDisk(io.BufferedWriter):
    """A file on a disk that fills after its first 4 KiB."""

    def write(self, data):
        if self.tell() + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return super().write(data)


def test_a_full_disk_while_exporting_is_said_as_such(many, tmp_path, monkeypatch, capsys):
    # (simulated: a real full disk needs a mount; writing to /dev/full is not the same, the
    # export would write beside it and rename)
    import tracemark.export

    def full_open(path, mode="r", buffering=-1, **kwargs):
        assert "b" in mode
        return _FullDisk(io.FileIO(path, mode.replace("b", "")), max(buffering, 1024))

    monkeypatch.setattr(tracemark.export, "open", full_open, raising=False)
    out = tmp_path / "t.json"
    code = main(["export", str(many), "--format", "chrome", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_ENVIRONMENT, err
    assert "No space left on device [ENOSPC]" in err and "disk" in err
    assert "corrupt" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half file left


def _denied(real_open, part):
    def fake_open(path, *args, **kwargs):
        if part in os.fspath(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize("command", [["view"], ["stats"], ["export", "-f", "chrome", "-o", "x"]])
def test_permission_denied_on_a_stream_is_said_as_such(
    many, tmp_path, monkeypatch, capsys, command
):
    # (tests may run as root, whom chmod does not stop: the refusal is made here)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "open", _denied(os.open, "stream_"))
    code = main([command[0], str(many), *command[1:]])
    err = capsys.readouterr().err
    assert code == EXIT_ENVIRONMENT, err
    assert "stream_" in err and "Permission denied [EACCES]" in err and "ls -l" in err
    assert "corrupt" not in err


def test_record_into_a_directory_it_may_not_create(tmp_path, monkeypatch, capsys):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code = main(["record", "-o", str(tmp_path / "t"), "--", sys.executable, "-c", "pass"])
    err = capsys.readouterr().err
    assert code == EXIT_ENVIRONMENT, err
    assert f"{tmp_path / 't'}: Permission denied [EACCES]" in err


def test_a_corrupt_trace_is_still_corrupt(many, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(many, copy)
    stream = next(copy.glob("*/stream_*"))
    stream.write_bytes(b"\xff" * 64)
    code = main(["view", str(copy)])
    err = capsys.readouterr().err
    assert code == 4 and "corrupt trace" in err and "[E" not in err


def test_the_machine_is_found_behind_a_trace_error():
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files", "f")
        except OSError:
            raise TraceError("f", 0, "cannot read stream: Too many open files") from None
    except TraceError as exc:
        found = environment_error(exc)
    assert found is not None and found.errno == errno.EMFILE
    assert environment_error(TraceError("f", 0, "bad magic")) is None
    assert environment_error(OSError(errno.ENOENT, "No such file")) is None
    assert f"{EXIT_ENVIRONMENT}    the machine" in EXIT_CODES_HELP
