"""Pairing begin and end events into spans (tracemark.analysis.pairing)."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from tracemark.analysis import Begin, End, Instant, Pairing, span_kind


class Ev(NamedTuple):
    timestamp: int
    name: str
    pid: int = 1
    tid: int = 1
    task: str = ""


def pair(events):
    p = Pairing()
    return list(p.pair(events)), p


def test_span_kinds():
    assert span_kind("db.query.begin") == ("begin", "db.query")
    assert span_kind("db.query.end") == ("end", "db.query")
    assert span_kind("probe.json.loads.entry") == ("begin", "probe.json.loads")
    assert span_kind("probe.json.loads.return") == ("end", "probe.json.loads")
    assert span_kind("net.rx") is None
    assert span_kind(".begin") is None
    assert span_kind("begin") is None


def test_nested_spans_pair_with_durations_and_depths():
    items, p = pair(
        [
            Ev(10, "req.begin"),
            Ev(12, "db.begin"),
            Ev(15, "log"),
            Ev(20, "db.end"),
            Ev(30, "req.end"),
        ]
    )
    ends = [(i.span, i.duration, i.depth) for i in items if isinstance(i, End)]
    assert ends == [("db", 8, 1), ("req", 20, 0)]
    assert [i.depth for i in items if isinstance(i, Instant)] == [2]
    assert p.unmatched == p.unfinished == 0


def test_threads_and_tasks_are_tracks_of_their_own():
    items, _ = pair(
        [
            Ev(1, "a.begin", task="t1"),
            Ev(2, "a.begin", task="t2"),
            Ev(3, "a.end", task="t1"),
            Ev(4, "a.begin", tid=2),
            Ev(6, "a.end", task="t2"),
            Ev(9, "a.end", tid=2),
        ]
    )
    assert [(i.begin.timestamp, i.duration) for i in items if isinstance(i, End)] == [
        (1, 2),
        (2, 4),
        (4, 5),
    ]


def test_an_end_without_a_begin_is_not_paired_and_counted():
    items, p = pair([Ev(1, "a.begin"), Ev(2, "b.end"), Ev(3, "a.end")])
    ends = [i for i in items if isinstance(i, End)]
    assert ends[0].begin is None and ends[0].duration is None and ends[0].span == "b"
    assert ends[1].span == "a" and ends[1].duration == 2
    assert p.unmatched == 1


def test_spans_left_open_are_closed_unfinished_never_dropped():
    items, p = pair(
        [
            Ev(1, "a.begin"),
            Ev(2, "b.begin"),
            Ev(5, "x"),
            Ev(7, "a.end"),
            Ev(8, "c.begin"),
            Ev(9, "y"),
        ]
    )
    ends = [(i.span, i.timestamp, i.unfinished) for i in items if isinstance(i, End)]
    # b is closed by a's end (it was open inside a); c at its track's last event.
    assert ends == [("b", 7, True), ("a", 7, False), ("c", 9, True)]
    assert p.unfinished == 2


def test_recursion_pairs_innermost_first():
    items, _ = pair([Ev(1, "f.begin"), Ev(2, "f.begin"), Ev(3, "f.end"), Ev(6, "f.end")])
    assert [(i.begin.timestamp, i.depth) for i in items if isinstance(i, End)] == [(2, 1), (1, 0)]


@st.composite
def programs(draw):
    """Well-nested spans on a few tracks, interleaved: what a correct program records."""
    events, t = [], 0
    stacks = {k: [] for k in range(draw(st.integers(1, 4)))}
    expected = []
    for _ in range(draw(st.integers(0, 60))):
        track = draw(st.sampled_from(sorted(stacks)))
        stack = stacks[track]
        t += draw(st.integers(0, 3))
        if stack and draw(st.booleans()):
            name, start = stack.pop()
            events.append(Ev(t, f"{name}.end", tid=track))
            expected.append((track, name, start, t, False))
        else:
            name = draw(st.sampled_from(["a", "b", "c"]))
            stack.append((name, t))
            events.append(Ev(t, f"{name}.begin", tid=track))
    return events, stacks, expected


@given(programs())
def test_well_nested_programs_pair_exactly(program):
    events, stacks, expected = program
    items, p = pair(events)
    got = [
        (i.begin.tid, i.span, i.begin.timestamp, i.timestamp, i.unfinished)
        for i in items
        if isinstance(i, End) and not i.unfinished
    ]
    assert got == expected
    left = sum(len(s) for s in stacks.values())
    assert p.unfinished == left and p.unmatched == 0
    assert sum(isinstance(i, Begin) for i in items) == sum(isinstance(i, End) for i in items)


def test_a_begin_without_a_declared_partner_is_an_instant():
    """An entry probe without a return probe, or a .begin marker whose .end the trace does not
    declare, are not spans that never end; an exception leaving a probed call (%raise) ends
    its entry span."""
    declared = {"f.entry", "g.entry", "g.return", "g.raise", "x.begin", "h.raise"}
    items, p = pair_declared(
        [
            Ev(1, "f.entry"),
            Ev(2, "x.begin"),
            Ev(3, "g.entry"),
            Ev(5, "g.raise"),
            Ev(6, "h.raise"),
        ],
        declared,
    )
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["Instant", "Instant", "Begin", "End", "Instant"]
    assert items[3].duration == 2 and not items[3].unfinished
    assert p.unfinished == p.unmatched == 0


def pair_declared(events, declared):
    p = Pairing(declared)
    return list(p.pair(events)), p
