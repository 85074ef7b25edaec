"""The printer: one readable line per event, to a stream or a logger."""

import io
import logging
import re
import threading

import pytest

import tracemark


def test_printer_line_has_time_thread_name_and_text(uniq):
    out = io.StringIO()
    rx = tracemark.marker(f"{uniq}.rx", "len=%d dev=%s")
    tx = tracemark.marker(f"{uniq}.tx", length=int, dev=str)
    with tracemark.connect(f"{uniq}.*", tracemark.Printer(out)):
        rx(42, "eth0")
        tx(7, "my dev")
    lines = out.getvalue().splitlines()
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d\.\d{{6}} \[MainThread\] {uniq}\.rx: len=42 dev=eth0", lines[0]
    )
    assert lines[1].endswith(f"[MainThread] {uniq}.tx: length=7 dev='my dev'")


def test_printer_names_the_firing_thread(uniq):
    out = io.StringIO()
    m = tracemark.marker(f"{uniq}.m", "i=%d")
    with tracemark.connect(f"{uniq}.m", tracemark.Printer(out)):
        threads = [threading.Thread(target=m, args=(i,), name=f"worker-{i}") for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = sorted(out.getvalue().splitlines(), key=lambda s: s.split()[-1])
    assert [line.split()[1] for line in lines] == [f"[worker-{i}]" for i in range(4)]


def test_printer_to_a_logger(uniq, caplog):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    logger = logging.getLogger(f"trace.{uniq}")
    with (
        caplog.at_level(logging.INFO, logger=logger.name),
        tracemark.connect(f"{uniq}.m", tracemark.Printer(logger=logger)),
    ):
        m(5)
    assert [r.getMessage() for r in caplog.records] == [f"{uniq}.m: n=5"]


def test_printer_defaults_to_stderr(uniq, capsys):
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    with tracemark.connect(f"{uniq}.m", tracemark.Printer()):
        m(1)
    assert capsys.readouterr().err.endswith(f"{uniq}.m: n=1\n")


def test_a_traced_logger_inside_the_printer_does_not_loop(uniq, caplog):
    """The printer logs; a probe on the logging path fires a marker; nothing recurses."""
    m = tracemark.marker(f"{uniq}.m", "n=%d")
    logged = tracemark.marker(f"{uniq}.logged", "msg=%s")
    logger = logging.getLogger(f"trace.{uniq}")

    class Traced(logging.Handler):
        def emit(self, record):
            logged(record.getMessage())

    logger.addHandler(Traced())
    with caplog.at_level(logging.INFO, logger=logger.name):
        tracemark.connect(f"{uniq}.*", tracemark.Printer(logger=logger))
        with pytest.warns(tracemark.TracemarkWarning, match="fired from inside a probe"):
            m(1)
    assert [r.getMessage() for r in caplog.records] == [f"{uniq}.m: n=1"]
    assert tracemark.markers(f"{uniq}.logged")[0].dropped_nested == 1
