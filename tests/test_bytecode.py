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
