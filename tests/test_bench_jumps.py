"""The instruction-count benchmark's cases are what they say (benchmarks/bench_jumps.py):
its unguarded variant jumps straight to the next statement, on every Python."""

import dis

from benchmarks import _jump_cases as cases


def test_the_jump_only_case_skips_the_marker_and_nothing_else():
    cases._prepare()
    ins = list(dis.get_instructions(cases.jump_only))
    jump = ins[1]
    landing = next(i for i in ins if i.offset == jump.argval)
    body = list(dis.get_instructions(cases.without))
    # It lands on `total = n + 1`: the line after the marker, as the function without it.
    first = next(i for i in body if i.opname != "RESUME")
    assert landing.positions.lineno - jump.positions.lineno == 1
    assert (landing.opname, landing.argval) == (first.opname, first.argval)
    for f in (
        cases.without,
        cases.reassigned,
        cases.jump_only,
        cases.patched,
        cases.rebound,
        cases.guarded,
    ):
        assert f(1500, "eth0") == 1501
    assert cases.reassigned.__code__ is not cases.without.__code__
