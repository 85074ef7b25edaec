"""merge_chunks (tracemark.ctf.reader): the block merge every multi-stream read goes through
is exactly heapq.merge over the streams' events by timestamp: the same order (ties: stream
order), and an exception of a stream surfaces after the same events."""

import heapq
from operator import itemgetter

from hypothesis import given, settings
from hypothesis import strategies as st

from tracemark.ctf.reader import merge_chunks


class Boom(Exception):
    pass


def chunked(events, cuts, fail_after):
    """A stream: its events in lists cut at ``cuts``; raises Boom(name) after
    ``fail_after`` events if that is not None (the events before it come first)."""

    def gen():
        chunk = []
        for i, ev in enumerate(events):
            if fail_after is not None and i == fail_after:
                if chunk:
                    yield chunk
                raise Boom(ev)
            chunk.append(ev)
            if i in cuts:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        if fail_after is not None and fail_after >= len(events):
            raise Boom("end")

    return gen()


def flat(events, fail_after):
    for i, ev in enumerate(events):
        if fail_after is not None and i == fail_after:
            raise Boom(ev)
        yield ev
    if fail_after is not None and fail_after >= len(events):
        raise Boom("end")


def run(iterator):
    out = []
    try:
        for ev in iterator:
            out.append(ev)
    except Boom as exc:
        return out, exc.args
    return out, None


streams = st.lists(
    st.tuples(
        st.lists(st.integers(0, 12), max_size=30).map(sorted),  # timestamps: many ties
        st.sets(st.integers(0, 30)),  # where chunks end
        st.none() | st.integers(0, 31),  # fail after this many events
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(streams)
def test_same_as_heapq_merge(spec):
    events = [[(ts, k, i) for i, ts in enumerate(tss)] for k, (tss, _, _) in enumerate(spec)]
    pairs = list(zip(events, spec, strict=True))
    want = run(heapq.merge(*(flat(e, f) for e, (_, _, f) in pairs), key=itemgetter(0)))
    got = run(merge_chunks([chunked(e, c, f) for e, (_, c, f) in pairs]))
    assert got == want


def test_empty_lists_and_no_sources():
    assert list(merge_chunks([])) == []
    assert list(merge_chunks([iter([[], [(1, "a")], []]), iter([[(0, "b")]])])) == [
        (0, "b"),
        (1, "a"),
    ]
