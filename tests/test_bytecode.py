"""The version-specific rules of tracemark.patching.bytecode, proven on this Python.

Each test names the trap it guards against; the suite runs on 3.11, 3.12 and 3.13.
"""

from __future__ import annotations

import importlib
import textwrap

import pytest

import tracemark
from tracemark import env
from tracemark.patching import bytecode
from tracemark.patching.bytecode import VerifyError


def _load(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def _statement(func, line, col=4):
    """(instructions, span, copies) of the expression statement on source line ``line``."""
    instrs = bytecode.instructions(func.__code__)
    spans = {
        i.position
        for i in instrs
        if i.opcode == bytecode.POP_TOP and i.position[0] == line and i.position[2] == col
    }  # the statement's own POP_TOP starts where the statement does
    (span,) = spans
    handlers = [e.target for e in bytecode.exception_table(func.__code__)]
    return instrs, span, bytecode.statement_spans(instrs, span, handlers)


def _patched(func, copies):
    code = func.__code__
    raw = bytecode.jump_over(code, bytecode.instructions(code), copies)
    return code.replace(co_code=raw)


SOURCE = """\
import tracemark
rx = tracemark.marker("{p}.rx", "v=%r")
log = []

def eff(v):
    log.append(v)
    return v

def fin(x):
    try:
        return x
    finally:
        rx(eff(1))

def comp(xs):
    rx(eff([x for x in xs]))
    return len(xs)

async def aw(a):
    rx(eff(await a))
    return 1

def branch(c):
    if c:
        rx(eff(1))
    rx(eff(2))
    return c
"""


@pytest.fixture
def mod(tmp_path, monkeypatch, uniq):
    return _load(tmp_path, monkeypatch, f"bc_{uniq}", SOURCE.format(p=uniq))


def test_finally_body_is_compiled_once_per_path(mod):
    # Trap 1: every copy is a site. 3.11-3.13 emit the finally body on the return path and on
    # the exception path.
    instrs, span, copies = _statement(mod.fin, 13, 8)
    assert len(copies) >= 2
    by = {i.offset: i for i in instrs}
    for _, end in copies:
        assert by[end - 2].opcode == bytecode.POP_TOP and by[end - 2].position == span
    variant = _patched(mod.fin, copies)
    bytecode.verify(mod.fin.__code__, variant, copies)
    mod.fin.__code__ = variant
    assert mod.fin(5) == 5
    assert mod.log == []


def test_instruction_after_the_statement_can_carry_its_position(mod):
    # Trap 3: the RETURN_VALUE after the inlined finally body has the statement's position,
    # so the copy must end at the POP_TOP, not at the last instruction with that position.
    instrs, span, copies = _statement(mod.fin, 13, 8)
    by = {i.offset: i for i in instrs}
    after = [by[end] for _, end in copies if end in by]
    assert any(i.position[:2] == span[:2] and i.opcode != bytecode.POP_TOP for i in after)


def test_code_laid_out_far_from_the_statement(mod):
    # Trap 2: the comprehension's exception handler (3.12+) and the await's CLEANUP_THROW
    # (3.12+) carry the statement's position but lie outside its span.
    for func, line, far in (
        (mod.comp, 16, env.PYBEHAVIOR.inlined_comprehensions),
        (mod.aw, 20, env.PYBEHAVIOR.await_cleanup_at_end),
    ):
        instrs, span, copies = _statement(func, line)
        assert len(copies) == 1
        (start, end) = copies[0]
        outside = [
            i for i in instrs if bytecode._inside(i.position, span) and not start <= i.offset < end
        ]
        assert bool(outside) == far
        bytecode.verify(func.__code__, _patched(func, copies), copies)


def test_long_jumps_use_extended_arg(tmp_path, monkeypatch, uniq):
    args = ", ".join(f"eff({i})" for i in range(150))
    source = SOURCE.format(p=uniq) + f"\ndef long():\n    rx([{args}])\n    return 7\n"
    mod = _load(tmp_path, monkeypatch, f"long_{uniq}", source)
    _, _, copies = _statement(mod.long, source.count("\n") - 1)
    ((start, end),) = copies
    assert (end - start) // 2 > 255  # needs at least one EXTENDED_ARG
    variant = _patched(mod.long, copies)
    assert variant.co_code[start] == bytecode.EXTENDED_ARG
    bytecode.verify(mod.long.__code__, variant, copies)
    (site,) = tracemark.patch(mod.long)
    assert site.patched
    assert mod.long() == 7
    assert mod.log == []


def test_jump_writer_sizes():
    assert bytecode._jump_units(0, 2 + 2 * 255) == [(bytecode.JUMP_FORWARD, 255)]
    assert bytecode._jump_units(0, 4 + 2 * 256) == [
        (bytecode.EXTENDED_ARG, 1),
        (bytecode.JUMP_FORWARD, 0),
    ]
    with pytest.raises(VerifyError):
        bytecode._jump_units(10, 8)


@pytest.mark.parametrize(
    "op", [bytecode.POP_JUMP_IF_FALSE, bytecode.JUMP_FORWARD, bytecode.JUMP_BACKWARD_NO_INTERRUPT]
)
def test_jumps_land_on_their_target_across_the_one_byte_limit(op):
    # A forward jump 256 units away needs a prefix, after which it is 255 away: the writer
    # must settle on one size (it once alternated forever), and the jump must land.
    back = op == bytecode.JUMP_BACKWARD_NO_INTERRUPT
    for units in range(250, 262):
        at, target = (2 * 600, 2 * (600 - units)) if back else (0, 2 * units)
        raw = bytecode._pack(bytecode._jump(op, at, target))
        arg, k = 0, 0
        while raw[k] == bytecode.EXTENDED_ARG:
            arg, k = arg << 8 | raw[k + 1], k + 2
        assert raw[k] == op
        arg = arg << 8 | raw[k + 1]
        after = at + k + 2 + 2 * bytecode._caches(op)
        assert after == at + len(raw)
        assert (after - 2 * arg if back else after + 2 * arg) == target, units


def test_exception_table_matches_dis(mod):
    import dis

    seen = 0
    for func in (mod.fin, mod.comp, mod.aw):
        ours = [
            (e.start, e.end, e.target, e.depth, e.lasti)
            for e in bytecode.exception_table(func.__code__)
        ]
        theirs = [
            (e.start, e.end, e.target, e.depth, e.lasti)
            for e in dis._parse_exception_table(func.__code__)
        ]
        assert ours == theirs
        seen += len(ours)
    assert seen


# --- the verifier rejects bad variants -----------------------------------------------------


def test_verifier_accepts_the_real_thing(mod):
    _, _, copies = _statement(mod.branch, 26)
    bytecode.verify(mod.branch.__code__, _patched(mod.branch, copies), copies)


def test_verifier_rejects_a_jump_landing_elsewhere(mod):
    _, _, copies = _statement(mod.branch, 26)
    ((start, _),) = copies
    raw = bytearray(_patched(mod.branch, copies).co_code)
    raw[start + 1] -= 1  # one unit short: into the middle of the statement
    with pytest.raises(VerifyError, match="lands on"):
        bytecode.verify(
            mod.branch.__code__, mod.branch.__code__.replace(co_code=bytes(raw)), copies
        )


def test_verifier_rejects_a_span_not_ending_after_pop_top(mod):
    instrs, _, copies = _statement(mod.branch, 26)
    ((start, end),) = copies
    call = max(i.offset for i in instrs if i.offset < end - 2)
    bad = [(start, call)]
    with pytest.raises(VerifyError, match="POP_TOP"):
        bytecode.verify(mod.branch.__code__, _patched(mod.branch, bad), bad)


def test_verifier_rejects_a_stack_mismatch(mod):
    instrs, _, copies = _statement(mod.branch, 26)
    ((start, end),) = copies
    second = next(i.offset for i in instrs if i.offset > start)  # skips the callee's load
    bad = [(second, end)]
    with pytest.raises(VerifyError, match="stack"):
        bytecode.verify(mod.branch.__code__, _patched(mod.branch, bad), bad)


def test_verifier_rejects_a_span_entered_from_outside(mod):
    # From the first marker statement to the end of the second: the `if` jumps into it.
    _, _, first = _statement(mod.branch, 25, 8)
    _, _, second = _statement(mod.branch, 26)
    bad = [(first[0][0], second[0][1])]
    with pytest.raises(VerifyError, match="reachable"):
        bytecode.verify(mod.branch.__code__, _patched(mod.branch, bad), bad)


def test_verifier_rejects_bytes_changed_elsewhere(mod):
    _, _, copies = _statement(mod.branch, 26)
    raw = bytearray(_patched(mod.branch, copies).co_code)
    raw[2] = bytecode.NOP  # the `if c` test
    raw[3] = 0
    with pytest.raises(VerifyError, match="outside"):
        bytecode.verify(
            mod.branch.__code__, mod.branch.__code__.replace(co_code=bytes(raw)), copies
        )


def test_verifier_rejects_changed_tables(mod):
    _, _, copies = _statement(mod.branch, 26)
    variant = _patched(mod.branch, copies).replace(co_names=("x", *mod.branch.__code__.co_names))
    with pytest.raises(VerifyError, match="co_names"):
        bytecode.verify(mod.branch.__code__, variant, copies)


# --- locals that only the skipped code stores ------------------------------------------------

BINDING = """\
import tracemark
rx = tracemark.marker("{p}.rx", "v=%r")

def walrus(it):
    rx(y := next(it))
    return y

def comp(n):
    y = n
    rx([y for y in range(3)])
    rx([y for y in range(2)])
    return y
"""


def test_verifier_rejects_reading_a_local_the_jump_leaves_unbound(tmp_path, monkeypatch, uniq):
    # Independent of the finder's rule: 3.12+ reads `y` with an unchecked LOAD_FAST.
    mod = _load(tmp_path, monkeypatch, f"bind_{uniq}", BINDING.format(p=uniq))
    _, _, copies = _statement(mod.walrus, 5)
    with pytest.raises(VerifyError, match="reads y"):
        bytecode.verify(mod.walrus.__code__, _patched(mod.walrus, copies), copies)


def test_verifier_accepts_inlined_comprehension_variables(tmp_path, monkeypatch, uniq):
    # PEP 709 (3.12+): `y` is saved, stored and restored inside each statement; skipping one
    # or both leaves it as it was.
    mod = _load(tmp_path, monkeypatch, f"bind2_{uniq}", BINDING.format(p=uniq))
    _, _, first = _statement(mod.comp, 10)
    _, _, second = _statement(mod.comp, 11)
    for copies in (first, second, first + second):
        bytecode.verify(mod.comp.__code__, _patched(mod.comp, copies), copies)
    mod.comp.__code__ = _patched(mod.comp, first + second)
    assert mod.comp(7) == 7


# --- the guarded jump ------------------------------------------------------------------------


def _guarded(func, line, col=4):
    code = func.__code__
    instrs, _, copies = _statement(func, line, col)
    guard = bytecode.Guard("global", "rx", func.__globals__["rx"])
    skips = [bytecode.Skip(s, e, guard) for s, e in copies]
    return code, skips, bytecode.rewrite(code, instrs, skips)


def test_guarded_variant_layout(mod):
    code, skips, variant = _guarded(mod.branch, 26)
    bytecode.verify(code, variant, skips)
    assert len(variant.co_code) > len(code.co_code)  # the trampoline is appended
    assert variant.co_consts[-1] is mod.rx
    assert variant.co_code[: len(code.co_code)] != code.co_code
    # Every appended instruction is located in the statement (tracebacks, line events).
    lines = {pos[0] for pos in list(variant.co_positions())[len(code.co_code) // 2 :]}
    assert lines == {26}
    mod.branch.__code__ = variant
    assert mod.branch(1) == 1
    assert mod.log == [1]  # the unguarded first statement ran; the guarded one skipped
    mod.rx = lambda v: mod.log.append(("rebound", v))
    assert mod.branch(0) == 0
    assert mod.log == [1, 2, ("rebound", 2)]


def test_guarded_variant_in_finally_copies(mod):
    code, skips, variant = _guarded(mod.fin, 13, 8)
    assert len(skips) >= 2  # one trampoline per compiled copy
    bytecode.verify(code, variant, skips)
    mod.fin.__code__ = variant
    assert mod.fin(3) == 3 and mod.log == []


def test_verifier_rejects_a_tampered_trampoline(mod):
    code, skips, variant = _guarded(mod.branch, 26)
    raw = bytearray(variant.co_code)
    n = len(code.co_code)
    raw[n + 1] ^= 2  # the guard's LOAD_GLOBAL now reads another name (or pushes a NULL)
    with pytest.raises(VerifyError, match="trampoline"):
        bytecode.verify(code, variant.replace(co_code=bytes(raw)), skips)
    other = bytecode.Guard("global", "rx", object())
    with pytest.raises(VerifyError, match="expected object"):
        bytecode.verify(code, variant, [s._replace(guard=other) for s in skips])
    with pytest.raises(VerifyError, match="no trampoline"):
        bytecode.verify(code, variant.replace(co_code=variant.co_code + b"\x09\x00"), skips)
    # In a finally body, the trampoline needs the statement's exception handler.
    code, skips, variant = _guarded(mod.fin, 13, 8)
    assert len(variant.co_exceptiontable) > len(code.co_exceptiontable)
    bare = variant.replace(co_exceptiontable=code.co_exceptiontable)
    with pytest.raises(VerifyError, match="exception handler"):
        bytecode.verify(code, bare, skips)
