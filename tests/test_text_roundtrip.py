"""Round trip of every field type (issue 10): what a marker is fired with is what
:func:`tracemark.ctf.read_trace` and babeltrace2 read back, as :mod:`tracemark.ctf.writer`
documents it: text as it is (NULs kept) with each surrogate as U+FFFD, never a repr;
ints, floats (NaN and -0.0 bit for bit), bools and bytes exactly; an object as its repr.
A value that does not fit its field (an int beyond 64 bits, an int too large for a
double) or an event larger than a sub-buffer is counted as discarded, never raised.

babeltrace2 (2.0.4) is asked about every example whose texts are at most 64 KB: it prints
a text up to its first NUL, floats with ``%g``, and its printing of a text is quadratic
(about 30 s for a 1.75 MB one), so examples with a megabyte text are read back by
tracemark's reader only (recorded into a directory babeltrace2 is not given). Megabyte
bytes values are no problem for it (0.2 s per MB).
"""

import builtins
import itertools
import math
import re
import struct
import subprocess
import threading
import types
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracemark
from tracemark.ctf import read_trace
from tracemark.ctf import writer as W
from tracemark.markers.fields import ReprText

MB = 1 << 20
#: Room for one 1 MB value and some, not for three: larger events are counted as discarded.
SUBBUFFER = 3 * MB
#: Enough sub-buffers for every event of an example, so none waits for the consumer.
SUBBUFFERS = 8
MAX_EVENTS = 5
#: Larger texts are not shown to babeltrace2 (see the module's docstring).
BT_LIMIT = 64 * 1024
TYPES = [int, float, str, bytes, bool, object]


def replaced(text):
    """The oracle of writer.valid_text, written independently: surrogates -> U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


class Shown:
    """An object whose repr is any text (surrogates and NULs too)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


# --- what to fire ------------------------------------------------------------------------------

CHARS = st.one_of(
    st.characters(),  # any code point but surrogates
    st.characters(categories=["Cs"]),  # lone surrogates
    st.sampled_from(["\0", "\U0001f600", "\ufffd", "\\", '"', "'", "?", "\n", "\x1b", "é"]),
)
SMALL_TEXT = st.text(CHARS, max_size=30)
# About 1 MB of UTF-8: a short random unit repeated.
BIG_TEXT = st.text(CHARS, min_size=1, max_size=3).map(
    lambda u: u * (MB // len(u.encode("utf-8", "surrogatepass")))
)
BIG_BYTES = st.binary(min_size=1, max_size=3).map(lambda u: u * (MB // len(u)))


def rarely(big, small):
    """``small`` mostly, ``big`` one time in twelve (megabyte values are slow to compare)."""
    return st.integers(0, 11).flatmap(lambda k: big if k == 0 else small)


TEXT = rarely(BIG_TEXT, st.one_of(SMALL_TEXT, st.just("")))
INT64 = (-(2**63), 2**63 - 1)
VALUES = {
    int: st.one_of(
        st.integers(*INT64),
        st.sampled_from([INT64[0], INT64[1], INT64[0] - 1, INT64[1] + 1, 2**64, 0, -1]),
        st.integers(min_value=2**63, max_value=2**300),  # discarded
        st.integers(min_value=-(2**300), max_value=-(2**63) - 1),  # discarded
        st.booleans(),  # a bool is an int
    ),
    float: st.one_of(
        st.floats(),  # NaN (payloads, signs), infinities, subnormals, -0.0
        st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324]),
        st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]),
        st.integers(-(2**1100), 2**1100),  # an int is a float, unless too large: discarded
    ),
    str: TEXT,
    bytes: st.one_of(rarely(BIG_BYTES, st.binary(max_size=30)), st.binary().map(bytearray)),
    bool: st.booleans(),
    object: st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        TEXT,  # its repr: quotes and escapes
        st.binary(max_size=30),
        st.tuples(st.integers(), SMALL_TEXT),
        TEXT.map(ReprText),  # stored as it is: NULs and surrogates reach the writer
        TEXT.map(Shown),  # a repr with NULs and surrogates
    ),
}


# --- what must be read back --------------------------------------------------------------------

DISCARDED = object()


def recorded(ftype, value):
    """The value the reader must give back for ``value`` fired in a ``ftype`` field, or
    DISCARDED when it does not fit."""
    if ftype is int:
        return int(value) if INT64[0] <= value <= INT64[1] else DISCARDED
    if ftype is float:
        try:
            return float(value)
        except OverflowError:
            return DISCARDED
    if ftype is str:
        return replaced(value)
    if ftype is bytes:
        return bytes(value)
    if ftype is bool:
        return value
    return replaced(value if type(value) is ReprText else repr(value))


def payload_size(ftypes, values):
    fixed = {int: 8, float: 8, bool: 1}
    size = W.EVENT_HEADER.size + 8  # and the event's "n"
    for t, v in zip(ftypes, values, strict=True):
        size += fixed[t] if t in fixed else 4 + len(v if t is bytes else v.encode())
    return size


def room():
    """The largest event a sub-buffer holds on this thread (writer's packet layout)."""
    name = W.thread_name_bytes(threading.current_thread().name)
    return SUBBUFFER - W.PACKET_FIXED_SIZE - len(name) - 1 - W.END_SIZE


def same(ftype, got, want):
    if ftype is float:  # bit for bit: NaN payloads and signs, -0.0
        return type(got) is float and struct.pack("<d", got) == struct.pack("<d", want)
    return type(got) is type(want) and got == want


# --- babeltrace2's text -------------------------------------------------------------------------

BT_LINE = re.compile(r"\[[^\]]*\] \([^)]*\) \S+ (?P<name>\S+): \{ [^}]* \}, \{ (?P<fields>.*) \}")
BT_FIELD = re.compile(
    r'(?P<key>\w+) = (?P<value>"(?:[^"\\]|\\.)*"'  # a text
    r"|\[ (?:\[\d+\] = 0x[0-9A-F]+(?:, | ))*\]"  # bytes
    r'|\( "\w+" : container = \d+ \)'  # a bool
    r"|[^,\s]+)(?:, |\Z)",  # a number
    re.DOTALL,
)
BT_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
BT_ESCAPES.update(v="\v", **{"0": "\0"})


def bt_unquote(text):
    def one(m):
        e = m[1]
        return chr(int(e[1:], 16)) if e[0] == "x" else BT_ESCAPES.get(e, e)

    return re.sub(r"\\(x[0-9a-f]{2}|.)", one, text[1:-1], flags=re.DOTALL)


def bt_fields(text):
    out, pos = {}, 0
    while pos < len(text):
        m = BT_FIELD.match(text, pos)
        assert m, f"babeltrace2 printed fields this test cannot parse: {text[pos : pos + 200]!r}"
        out[m["key"]] = m["value"]
        pos = m.end()
    return out


def bt_show(ftype, value):
    """What babeltrace2 prints for a recorded ``value`` of ``ftype``."""
    if ftype is float:
        if math.isnan(value):
            return "-nan" if math.copysign(1, value) < 0 else "nan"
        return f"{value:g}"
    if ftype is bool:
        return f'( "{str(value).lower()}" : container = {int(value)} )'
    if ftype is bytes:
        items = ", ".join(f"[{i}] = 0x{b:X}" for i, b in enumerate(value))
        return f"[ {items} ]" if value else "[ ]"
    return str(value)


def babeltrace(path):
    """{event "n": its fields as babeltrace2 prints them}, and its stderr."""
    out = subprocess.run(["babeltrace2", str(path)], capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    events = {}
    for raw in out.stdout.split(b"\n")[:-1]:  # not splitlines(): text may hold U+2028
        line = raw.decode()  # strictly: what was recorded is valid UTF-8
        m = BT_LINE.fullmatch(line)
        assert m, f"babeltrace2 printed a line this test cannot parse: {line[:300]!r}"
        fields = bt_fields(m["fields"])
        n = int(fields["n"])
        assert n not in events
        events[n] = fields
    return events


def check_babeltrace(path, expected):
    """babeltrace2 shows every event of ``expected`` ({n: (types, values)}) as recorded."""
    events = babeltrace(path)
    assert sorted(events) == sorted(expected)
    for n, (ftypes, values) in expected.items():
        fields = events[n]
        assert len(fields) == 1 + len(ftypes) + sum(t in (str, bytes, object) for t in ftypes)
        for i, (t, v) in enumerate(zip(ftypes, values, strict=True)):
            shown = fields[f"f{i}"]
            where = f"event {n} field f{i} ({t.__name__}) = {v!r}: babeltrace2 shows {shown!r}"
            if t in (str, object):
                assert int(fields[f"_f{i}_len"]) == len(v.encode()), where
                assert bt_unquote(shown) == v.split("\0", 1)[0], where  # up to the first NUL
            else:
                if t is bytes:
                    assert int(fields[f"_f{i}_len"]) == len(v), where
                assert shown == bt_show(t, v), where


# --- the round trip -----------------------------------------------------------------------------

_markers = {}


def marker_for(uniq, ftypes):
    """One marker per type signature: an int "n" (to find the event in babeltrace2's
    output), then fields f0, f1, ... of ``ftypes``."""
    key = (uniq, ftypes)
    if key not in _markers:
        name = f"{uniq}.sig_" + "_".join(t.__name__ for t in ftypes)
        fields = {"n": int, **{f"f{i}": t for i, t in enumerate(ftypes)}}
        _markers[key] = tracemark.marker(name, **fields)
    return _markers[key]


@st.composite
def examples(draw):
    """A field signature and a few events' values for it."""
    ftypes = tuple(draw(st.lists(st.sampled_from(TYPES), max_size=6)))
    events = draw(
        st.lists(st.tuples(*(VALUES[t] for t in ftypes)), min_size=1, max_size=MAX_EVENTS)
    )
    return ftypes, events


def test_every_field_type_round_trips_through_the_reader_and_babeltrace2(tmp_path, uniq):
    counter = itertools.count()
    for_babeltrace = {}  # n -> (types, recorded values)
    limit = room()

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(examples())
    def round_trip(example):
        ftypes, events = example
        m = marker_for(uniq, ftypes)
        fired = []
        for values in events:
            want = tuple(recorded(t, v) for t, v in zip(ftypes, values, strict=True))
            if DISCARDED not in want and payload_size(ftypes, want) > limit:
                want = (DISCARDED,)  # too large for a sub-buffer
            fired.append((next(counter), values, want))
        big = any(
            len(v.encode()) > BT_LIMIT for _, _, want in fired for v in want if isinstance(v, str)
        )
        with warnings.catch_warnings():  # the faults are reported once, as warnings
            warnings.simplefilter("ignore", tracemark.TracemarkWarning)
            rec = tracemark.record(
                tmp_path / ("big" if big else "bt"),
                m.name,
                subbuffer_size=SUBBUFFER,
                subbuffers=SUBBUFFERS,
            )
            try:
                for n, values, _ in fired:
                    m(n, *values)
            finally:
                summary = rec.stop()

        kept = [(n, want) for n, _, want in fired if DISCARDED not in want]
        assert (summary.recorded, summary.discarded) == (len(kept), len(fired) - len(kept))
        trace = read_trace(summary.trace_path)
        assert trace.discarded == len(fired) - len(kept)  # visible in the trace itself
        got = [ev.fields for ev in trace.events()]
        assert [f["n"] for f in got] == [n for n, _ in kept]
        for fields, (n, want) in zip(got, kept, strict=True):
            assert list(fields) == ["n", *(f"f{i}" for i in range(len(ftypes)))]
            for i, t in enumerate(ftypes):
                assert same(t, fields[f"f{i}"], want[i]), (n, i, fields[f"f{i}"], want[i])
            if not big:
                for_babeltrace[n] = (ftypes, want)

    round_trip()
    assert len(for_babeltrace) > 50  # most examples are small enough for babeltrace2
    check_babeltrace(tmp_path / "bt", for_babeltrace)


# --- the reported case, and the slow path's cost ------------------------------------------------


def test_text_with_nul_and_a_lone_surrogate_is_recorded_as_that_text(tmp_path, uniq):
    m = tracemark.marker(f"{uniq}.m", n=int, f0=str, f1=object, f2=object)
    with tracemark.record(tmp_path, f"{uniq}.*") as rec:
        m(0, "a\x00b\udc80", ReprText("<x\x00\udc80>"), Shown("\ud800\x00\U0001f600"))
        m(1, "\udc80\x00", "a\x00b\udc80", None)  # a str in an object field: its repr
    assert (rec.summary.recorded, rec.summary.discarded) == (2, 0)
    want = [
        {"n": 0, "f0": "a\x00b\ufffd", "f1": "<x\x00\ufffd>", "f2": "\ufffd\x00\U0001f600"},
        {"n": 1, "f0": "\ufffd\x00", "f1": "'a\\x00b\\udc80'", "f2": "None"},
    ]
    assert [ev.fields for ev in read_trace(tmp_path).events()] == want
    types_ = (str, object, object)
    check_babeltrace(tmp_path, {e["n"]: (types_, (e["f0"], e["f1"], e["f2"])) for e in want})


def test_the_slow_path_compiles_nothing_and_makes_no_struct_per_event(tmp_path, uniq, monkeypatch):
    """Text with surrogates is packed by the packer of its field types, compiled once, with
    the Structs the fast path made for the same lengths."""
    m = tracemark.marker(f"{uniq}.m", s=str, o=object, k=int)
    made, compiled = [], []
    real_struct, real_compile = struct.Struct, builtins.compile

    def counting_struct(fmt):
        made.append(fmt)
        return real_struct(fmt)

    def counting_compile(*args, **kwargs):
        compiled.append(args[1] if len(args) > 1 else kwargs.get("filename"))
        return real_compile(*args, **kwargs)

    proxy = types.ModuleType("struct")
    proxy.__dict__.update(vars(struct))
    proxy.Struct = counting_struct
    clean = "x\ufffd" * 2345  # lengths no other test uses: its Struct is made here
    with warnings.catch_warnings():
        warnings.simplefilter("error", tracemark.TracemarkWarning)  # no fault to report
        with tracemark.record(tmp_path, f"{uniq}.*") as rec:
            monkeypatch.setattr(W, "struct", proxy)
            monkeypatch.setattr(builtins, "compile", counting_compile)
            m(clean, ReprText(clean), -1)  # the fast path
            fast_made = len(made)
            m(clean.replace("\ufffd", "\udc80"), Shown(clean.replace("\ufffd", "\ud800")), 0)
            assert len(made) == fast_made  # the slow path used the fast path's Struct
            warm = len(compiled)  # at most the packer of (str, object, int), once ever
            for k in range(1, 1000):
                surrogate = chr(0xD800 + k)
                m(clean.replace("\ufffd", surrogate), Shown(clean.replace("\ufffd", surrogate)), k)
            assert (len(made), len(compiled)) == (fast_made, warm)
            monkeypatch.undo()
    assert fast_made <= 1 and warm <= 1, (made, compiled)
    assert (rec.summary.recorded, rec.summary.discarded) == (1001, 0)
    events = list(read_trace(tmp_path).events())
    assert [ev.fields["k"] for ev in events] == list(range(-1, 1000))
    assert all(ev.fields["s"] == ev.fields["o"] == clean for ev in events)
