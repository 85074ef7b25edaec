"""tracemark.logging.Handler: log records as marker events (issue 13)."""

from __future__ import annotations

import logging

import pytest

import tracemark
import tracemark.logging as tmlog
from tracemark.ctf.reader import read_trace


@pytest.fixture
def logger(uniq):
    # A logger outside logging's tree: no handler of pytest's (which formats every record)
    # sees its records.
    log = logging.Logger(f"app{uniq}.db", logging.DEBUG)
    yield log
    log.handlers.clear()


def test_records_become_events_with_level_message_and_declared_extras(logger, uniq, rec):
    logger.addHandler(tmlog.Handler(extra={"request_id": int, "user": str}))
    tracemark.connect(f"log.app{uniq}.*", rec)
    logger.info("slow query %s took %d ms", "select 1", 12, extra={"request_id": 27})
    logger.debug("plain", extra={"request_id": 28, "user": "ann", "other": 1})
    assert rec.events == [
        (f"log.app{uniq}.db", ("INFO", "slow query select 1 took 12 ms", 27, "")),
        (f"log.app{uniq}.db", ("DEBUG", "plain", 28, "ann")),  # undeclared extras: not kept
    ]
    (info,) = tracemark.markers(f"log.app{uniq}.db")
    assert [(f.name, f.type) for f in info.fields] == [
        ("level", str),
        ("message", str),
        ("request_id", int),
        ("user", str),
    ]
    assert "test_logging_bridge.py" in info.where  # declared where the handler was made


def test_an_exception_is_in_the_message_and_bad_messages_never_raise(logger, uniq, rec):
    logger.addHandler(tmlog.Handler())
    tracemark.connect(f"log.app{uniq}.*", rec)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logger.exception("failed")
    logger.error("%d items", "not a number")  # logging itself would print an error here
    (_, (level, text)), (_, (_, bad)) = rec.events
    assert level == "ERROR" and text.startswith("failed\nTraceback")
    assert text.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "'%d items'" in bad and "not a number" in bad


def test_wrong_extra_type_is_a_counted_fault(logger, uniq, rec):
    logger.addHandler(tmlog.Handler(extra={"n": int}))
    tracemark.connect(f"log.app{uniq}.*", rec)
    with pytest.warns(tracemark.TracemarkWarning):
        logger.info("x", extra={"n": "seven"})
    logger.info("y", extra={"n": 7})
    assert rec.events == [(f"log.app{uniq}.db", ("INFO", "y", 7))]
    (info,) = tracemark.markers(f"log.app{uniq}.db")
    assert info.bad_arguments == 1


def test_inactive_formats_nothing(logger, uniq):
    logger.addHandler(tmlog.Handler())

    class Loud:
        def __str__(self):
            raise AssertionError("formatted while nobody listens")

    logger.info("%s", Loud())  # no probe: the message is never made


def test_marker_names(uniq):
    assert tmlog.marker_name("") == "log.root"
    assert tmlog.marker_name("root") == "log.root"
    assert tmlog.marker_name("my-app.2nd.x y") == "log.my_app._2nd.x_y"
    with pytest.raises(ValueError, match="extra field 'message'"):
        tmlog.Handler(extra={"message": str})
    with pytest.raises(ValueError, match="list"):
        tmlog.Handler(extra={"items": list})


def test_records_land_in_a_trace_in_time_order_with_markers(logger, uniq, tmp_path):
    logger.addHandler(tmlog.Handler())
    step = tracemark.marker(f"{uniq}.step", n=int)
    with tracemark.record(tmp_path / "t", [f"log.app{uniq}.*", f"{uniq}.*"]):
        for i in range(3):
            step(i)
            logger.warning("after step %d", i)
    events = [(e.name, e.fields) for e in read_trace(tmp_path / "t").events()]
    assert events == [
        ev
        for i in range(3)
        for ev in (
            (f"{uniq}.step", {"n": i}),
            (f"log.app{uniq}.db", {"level": "WARNING", "message": f"after step {i}"}),
        )
    ]
