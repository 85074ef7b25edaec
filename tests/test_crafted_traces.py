"""Crafted trace directories: ``view`` and ``stats`` (and the reader under them) never hang,
never read without bound and never show a traceback; every refusal is one line and exit 4.

Subprocess tests have timeouts: a hang fails the test instead of stalling the suite.
"""

import contextlib
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.cli import main
from tracemark.ctf import TraceError, read_trace
from tracemark.ctf import reader as R
from tracemark.ctf import writer as W


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid trace: two threads, every field type, a few packets each."""
    path = tmp_path_factory.mktemp("crafted") / "good"
    m = tracemark.marker("crafted.m", i=int, s=str, f=float, b=bytes, t=bool, o=object)

    def work():
        for i in range(60):
            m(i, f"s{i}", i / 2, bytes([i % 256]), bool(i % 2), None)

    with tracemark.record(path, "crafted.*", subbuffer_size=4096, subbuffers=8):
        t = threading.Thread(target=work, name="other")
        t.start()
        work()
        t.join()
    return path


def clone(good, tmp_path):
    dst = tmp_path / "t"
    shutil.copytree(good, dst)
    sub = next(p for p in dst.iterdir() if (p / "metadata").exists())
    return dst, sub


def cli(*argv, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "tracemark", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_refused(out, command, what):
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"tracemark {command}: error: corrupt trace: ")
    assert re.search(what, lines[0]), lines[0]


@pytest.mark.parametrize("command", ["view", "stats"])
def test_a_fifo_named_metadata_does_not_hang(good, tmp_path, command):
    dst, sub = clone(good, tmp_path)
    (sub / "metadata").unlink()
    os.mkfifo(sub / "metadata")
    assert_refused(cli(command, str(dst)), command, "metadata is not a regular file")


@pytest.mark.parametrize("command", ["view", "stats"])
def test_metadata_linked_to_dev_zero_is_not_read_forever(good, tmp_path, command):
    dst, sub = clone(good, tmp_path)
    (sub / "metadata").unlink()
    (sub / "metadata").symlink_to("/dev/zero")
    assert_refused(cli(command, str(dst)), command, "metadata is not a regular file")


def test_metadata_beyond_the_size_limit_is_refused(good, tmp_path):
    dst, sub = clone(good, tmp_path)
    with open(sub / "metadata", "r+b") as f:  # sparse: no disk used
        f.truncate(R.METADATA_LIMIT + 1)
    assert_refused(cli("view", str(dst)), "view", "larger than 64 MiB")


@pytest.mark.parametrize("command", ["view", "stats"])
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_stream_that_is_not_a_file_does_not_hang(good, tmp_path, command, kind):
    dst, sub = clone(good, tmp_path)
    stream = next(sub.glob("stream_*"))
    stream.unlink()
    if kind == "fifo":
        os.mkfifo(stream)
    else:
        stream.symlink_to("/dev/zero")
    assert_refused(cli(command, str(dst)), command, "stream is not a regular file")


def edit_metadata(sub, old, new, count=1):
    text = (sub / "metadata").read_text()
    assert old in text
    (sub / "metadata").write_text(text.replace(old, new, count))


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        ("freq = 1000000000;", f"freq = {'9' * 5000};", "clock"),
        ("\tid = 1;\n\tstream_id = 0;", f"\tid = {'1' * 5000};\n\tstream_id = 0;", "event id"),
        ("\tid = 1;\n\tstream_id = 0;", "\tid = 4294967296;\n\tstream_id = 0;", "event id"),
        ("vpid = ", f"vpid = {'7' * 5000};\n\tx = ", "env vpid"),
        ("offset = ", f"offset = {'5' * 5000};\n\tx_ = ", "clock"),
    ],
)
@pytest.mark.parametrize("command", ["view", "stats"])
def test_huge_numbers_in_the_metadata_are_refused(good, tmp_path, command, old, new, what):
    dst, sub = clone(good, tmp_path)
    edit_metadata(sub, old, new)
    assert_refused(cli(command, str(dst)), command, what)


def test_a_bad_escape_in_an_event_name_is_read_as_written(good, tmp_path):
    """``\\xZZ`` is no hex escape: like an unknown escape it stands for its character."""
    dst, sub = clone(good, tmp_path)
    edit_metadata(sub, 'name = "crafted.m"', 'name = "crafted\\xZZ.m"')
    out = cli("view", "--limit", "1", str(dst))
    assert out.returncode == 0, out.stderr
    assert " craftedxZZ.m " in out.stdout


def test_escapes_in_strings_round_trip_as_utf8():
    for text in ["plain", "é\u2028\x1b]0;x\x07", 'q"b\\s\nn', "\ud800"]:
        assert R._unquote(W._quote(text)) == W.clean_text(text)
    assert R._unquote('"a\\"') is None  # ends inside an escape


def test_a_packet_larger_than_the_limit_is_refused_before_it_is_read(good, tmp_path):
    dst, sub = clone(good, tmp_path)
    stream = next(sub.glob("stream_*"))
    size = R.PACKET_LIMIT + 4096
    with open(stream, "r+b") as f:
        f.seek(W.HEADER.size + 16)
        f.write(struct.pack("<QQ", size * 8, size * 8))
        f.truncate(size)  # sparse, so the file holds the whole packet
    with pytest.raises(TraceError, match="packet_size is beyond 1024 MiB"):
        read_trace(dst)


# -- mutations of a valid trace ----------------------------------------------------------------

_NUMBERS = st.sampled_from([0, 1, 7, 8, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])


def _mutate_metadata(text, data):
    how = data.draw(st.sampled_from(["number", "insert", "delete", "duplicate", "escape"]))
    if how == "number":
        spots = list(re.finditer(r"\d+", text))
        m = data.draw(st.sampled_from(spots))
        number = data.draw(st.one_of(_NUMBERS.map(str), st.just("9" * 5000), st.just("-1")))
        return text[: m.start()] + number + text[m.end() :]
    pos = data.draw(st.integers(0, len(text)))
    if how == "insert":
        junk = data.draw(st.sampled_from(['"', "\\", "\\x", "\\xZZ", "\n", "é", "\0", "{", ";"]))
        return text[:pos] + junk + text[pos:]
    if how == "escape":
        return text.replace('name = "crafted.m"', 'name = "crafted\\xZ"')
    end = data.draw(st.integers(pos, min(len(text), pos + 200)))
    if how == "delete":
        return text[:pos] + text[end:]
    return text[:end] + text[pos:end] + text[end:]


def _mutate_stream(blob, data):
    """Set a packet-context or event field to an extreme value, or cut/flip bytes."""
    blob = bytearray(blob)
    if len(blob) < W.PACKET_FIXED_SIZE + 8:  # cut already
        return bytes(blob)
    how = data.draw(st.sampled_from(["u64", "u32", "cut", "flip"]))
    if how == "u64":  # timestamps, content_size, packet_size, seq, discarded, count, tid, pid
        at = W.HEADER.size + 8 * data.draw(st.integers(0, 8))
        value = data.draw(_NUMBERS)
        struct.pack_into("<Q", blob, at, value)
    elif how == "u32":  # an event id or a sequence length, somewhere in the first packet
        at = data.draw(st.integers(W.PACKET_FIXED_SIZE, min(len(blob), 4096) - 4))
        struct.pack_into("<I", blob, at, data.draw(_NUMBERS) % 2**32)
    elif how == "cut":
        del blob[data.draw(st.integers(0, len(blob))) :]
    else:
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(blob)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_traces_give_events_or_one_line_exit_4(good, tmp_path_factory, data):
    dst, sub = clone(good, tmp_path_factory.mktemp("mut"))
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            meta = sub / "metadata"
            meta.write_text(_mutate_metadata(meta.read_text(), data))
        else:
            stream = data.draw(st.sampled_from(sorted(sub.glob("stream_*"))))
            stream.write_bytes(_mutate_stream(stream.read_bytes(), data))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        for command in ("view", "stats"):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([command, str(dst)])
            assert code in (0, 4), err.getvalue()
            if code == 4:
                (line,) = err.getvalue().splitlines()
                assert line.startswith(f"tracemark {command}: error: corrupt trace: ")
        try:
            trace = read_trace(dst)
            list(trace.events())
            assert trace.start is None or trace.start <= trace.end
        except TraceError:
            pass
    except _Hang:
        pytest.fail("reading a mutated trace took more than 20 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- field names in the metadata ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("0citt_u00e0", "città"),  # escaped, as the writer spells it
        ("città", "città"),  # raw, as tracemark wrote it before escaping
        ("0Bool", "Bool"),
    ],
)
def test_field_keys_are_read_back_as_the_names_they_spell(good, tmp_path, key, name):
    dst, sub = clone(good, tmp_path)
    edit_metadata(sub, "tm_int _i;", f"tm_int _{key};")
    ev = next(iter(read_trace(dst).events()))
    assert next(iter(ev.fields)) == name


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("0abc", "field name '0abc' is not valid"),  # not the canonical spelling of abc
        ("0_u00zz", "is not valid"),
        ("Bool", "field name 'Bool' is not valid"),  # _Bool is a TSDL keyword
        ("s", "field 's' declared twice"),
        ("0_u0073", "is not valid"),  # 's' escaped: not canonical
    ],
)
def test_field_keys_that_no_name_gives_are_refused(good, tmp_path, key, what):
    dst, sub = clone(good, tmp_path)
    edit_metadata(sub, "tm_int _i;", f"tm_int _{key};")
    with pytest.raises(TraceError, match=what):
        read_trace(dst)
