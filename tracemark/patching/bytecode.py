"""Everything tracemark knows about CPython bytecode, in one place.

This module is the only one that depends on how a CPython version lays out bytecode. Each rule
says, next to the code, the versions it was checked on; ``tests/test_bytecode.py`` proves each
one on 3.11, 3.12 and 3.13.

What it provides
----------------
* :func:`instructions`: the instructions of a code object (offset, size, opcode, argument,
  jump target, source position), caches folded into the instruction that owns them.
* :func:`statement_spans`: where a source statement ``f(...)`` was compiled to, as
  ``(start, end)`` offset pairs, one per compiled copy (a ``finally`` body is compiled up to
  three times). The rule: a copy ends right after a ``POP_TOP`` whose position is exactly the
  statement's span, and starts at the first of the unbroken run of instructions before it whose
  positions lie inside the span.
* :func:`jump_over`: the bytes of a code object with each span's first instruction(s) replaced
  by a forward jump to the span's end (``EXTENDED_ARG`` prefixes when the jump is long). The
  rest of the statement stays where it was, so offsets, the line table and the exception table
  stay valid.
* :func:`verify`: checks a rewritten code object against its original before anyone may run
  it, and raises :class:`VerifyError` saying why not.

Why a span is found this way (three traps, each a segfault when missed):

* a statement can be compiled more than once (``finally`` bodies on the normal, ``return`` and
  exception paths), so every ``POP_TOP`` carrying the statement's exact span ends one copy;
* code of the statement can be laid out far from it (the exception handler of an inlined
  comprehension, the ``CLEANUP_THROW`` of an ``await``, at the end of the function, 3.12+), so
  a span is not "every offset whose position lies inside the statement";
* an instruction after the statement can carry its position (the ``RETURN_VALUE`` after an
  inlined ``finally`` body), so the end is not "the last offset with that position".
"""

from __future__ import annotations

import dis
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import CodeType

__all__ = [
    "ExceptionEntry",
    "Instr",
    "VerifyError",
    "exception_table",
    "instructions",
    "jump_over",
    "statement_spans",
    "verify",
]

Position = tuple[int | None, int | None, int | None, int | None]

# Opcode numbers differ between versions (JUMP_FORWARD is 110 on 3.11/3.12 and 79 on 3.13):
# always go through dis.opmap.
NOP = dis.opmap["NOP"]
EXTENDED_ARG = dis.opmap["EXTENDED_ARG"]
JUMP_FORWARD = dis.opmap["JUMP_FORWARD"]
POP_TOP = dis.opmap["POP_TOP"]

# Jumps: 3.11 lists them in hasjrel (relative, forward and backward); 3.12 and 3.13 also have
# hasjump. hasjabs is empty on 3.11-3.13 but kept for completeness.
_JUMPS = frozenset(dis.hasjrel) | frozenset(dis.hasjabs) | frozenset(getattr(dis, "hasjump", ()))

# Instructions after which control never falls through to the next one (3.11-3.13). Anything
# missing here is treated as falling through: that only makes the verifier stricter.
_NO_FALLTHROUGH = frozenset(
    dis.opmap[name]
    for name in (
        "RETURN_VALUE",
        "RETURN_CONST",  # 3.12+
        "RAISE_VARARGS",
        "RERAISE",
        "JUMP_FORWARD",
        "JUMP_BACKWARD",
        "JUMP_BACKWARD_NO_INTERRUPT",
    )
    if name in dis.opmap
)


@dataclass(frozen=True)
class Instr:
    """One instruction; ``size`` counts its ``EXTENDED_ARG``-free unit and its caches."""

    offset: int
    size: int
    opcode: int
    opname: str
    arg: int | None
    target: int | None  # jump target offset, for jumps
    position: Position

    @property
    def end(self) -> int:
        return self.offset + self.size


def instructions(code: CodeType) -> list[Instr]:
    """The instructions of ``code`` in offset order, each with its caches folded in.

    ``dis.get_instructions`` hides caches on 3.13 and (by default) on 3.11/3.12, so an
    instruction's size is the distance to the next one. ``EXTENDED_ARG`` appears as an
    instruction of its own on 3.11-3.13; the jump targets dis reports (``argval``) are byte
    offsets on all three.
    """
    raw = list(dis.get_instructions(code))
    total = len(code.co_code)
    out = []
    for i, ins in enumerate(raw):
        end = raw[i + 1].offset if i + 1 < len(raw) else total
        pos = ins.positions
        position = (
            (pos.lineno, pos.end_lineno, pos.col_offset, pos.end_col_offset)
            if pos
            else (
                None,
                None,
                None,
                None,
            )
        )
        target = ins.argval if ins.opcode in _JUMPS and isinstance(ins.argval, int) else None
        out.append(
            Instr(ins.offset, end - ins.offset, ins.opcode, ins.opname, ins.arg, target, position)
        )
    return out


# --- the exception table ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExceptionEntry:
    """``[start, end)`` byte offsets are covered by the handler at ``target``."""

    start: int
    end: int
    target: int
    depth: int
    lasti: bool


def _varints(data: bytes, i: int) -> tuple[int, int]:
    # 3.11-3.13: 6 bits per byte, most significant chunk first, bit 0x40 says "more follows";
    # bit 0x80 marks the first byte of an entry.
    b = data[i]
    value = b & 63
    while b & 64:
        i += 1
        b = data[i]
        value = (value << 6) | (b & 63)
    return value, i + 1


def exception_table(code: CodeType) -> list[ExceptionEntry]:
    """Parse ``co_exceptiontable`` (format of 3.11-3.13; values are in 2-byte code units)."""
    data = code.co_exceptiontable
    out = []
    i = 0
    while i < len(data):
        start, i = _varints(data, i)
        length, i = _varints(data, i)
        target, i = _varints(data, i)
        dl, i = _varints(data, i)
        out.append(
            ExceptionEntry(start * 2, (start + length) * 2, target * 2, dl >> 1, bool(dl & 1))
        )
    return out


# --- finding a statement ----------------------------------------------------------------------


def _inside(pos: Position, span: Position) -> bool:
    line, end_line, col, end_col = pos
    if line is None or end_line is None or col is None or end_col is None:
        return False
    return (line, col) >= (span[0], span[2]) and (end_line, end_col) <= (span[1], span[3])


def statement_spans(
    instrs: Sequence[Instr], span: Position, handlers: Iterable[int] = ()
) -> list[tuple[int, int]]:
    """Every compiled copy of the expression statement whose source span is ``span``, as
    ``(start, end)`` offsets: the jump goes at ``start`` and lands on ``end``.

    Rules (3.11, 3.12 and 3.13):

    * the ``POP_TOP`` that discards an expression statement's value carries exactly the
      statement's span; a copy ends right after the first such ``POP_TOP`` that normal flow
      from its start reaches through the statement's own instructions (instructions whose
      position lies inside the span);
    * a copy starts at an instruction of the statement that is entered from outside it: the
      instruction laid out before it is not part of the statement, or cannot fall into it
      (a return, raise or jump), and no jump laid out earlier inside the statement leads to
      it (that would make it a branch of the statement, not an entry: 3.12+ lays out the
      ``else`` arm of ``f(a if c else b)`` after the function's return, right after the
      RERAISE that ends another copy);
    * exception handlers (``handlers``: their offsets) are never copies, even when they
      carry the statement's position and flow back into it (3.13: an ``await``'s
      ``CLEANUP_THROW`` jumps back to its ``END_SEND``).
    """
    handlers = set(handlers)
    inside = [_inside(x.position, span) for x in instrs]
    index = {x.offset: k for k, x in enumerate(instrs)}
    out = []
    for k, ins in enumerate(instrs):
        if not inside[k] or (ins.opcode == POP_TOP and ins.position == span):
            continue
        if k and inside[k - 1] and instrs[k - 1].opcode not in _NO_FALLTHROUGH:
            continue  # falls in from the statement's previous instruction
        if ins.offset in handlers:
            continue
        if any(inside[j] and instrs[j].target == ins.offset for j in range(k)):
            continue  # a branch of the statement
        end = _first_pop_top(instrs, inside, index, k, span)
        if end is not None and end > ins.offset:
            out.append((ins.offset, end))
    return out


def _first_pop_top(
    instrs: Sequence[Instr], inside: list[bool], index: dict[int, int], k: int, span: Position
) -> int | None:
    """The end of the statement's POP_TOP nearest in layout that normal flow from
    ``instrs[k]`` reaches through the statement's own instructions."""
    found = []
    seen = set()
    work = [k]
    while work:
        j = work.pop()
        if j in seen:
            continue
        seen.add(j)
        ins = instrs[j]
        if ins.opcode == POP_TOP and ins.position == span:
            found.append(ins.end)
            continue
        for nxt, _ in _successors(ins):
            n = index.get(nxt)
            if n is not None and inside[n]:
                work.append(n)
    return min(found) if found else None


# --- writing the jump -------------------------------------------------------------------------


def _jump_units(start: int, target: int) -> list[tuple[int, int]]:
    """``(opcode, arg)`` units of a forward jump from ``start`` to ``target``.

    3.11-3.13: JUMP_FORWARD's argument counts 2-byte units from the instruction after it (it
    has no caches); an argument over 255 needs one EXTENDED_ARG per extra byte, before it.
    """
    prefixes = 0
    while True:
        after = start + 2 * (prefixes + 1)
        delta = (target - after) // 2
        if delta < 0:
            raise VerifyError(f"no room for a jump from {start} to {target}")
        needed = 0
        while delta >> (8 * (needed + 1)):
            needed += 1
        if needed <= prefixes:
            break
        prefixes = needed
    units = [(EXTENDED_ARG, (delta >> (8 * k)) & 0xFF) for k in range(prefixes, 0, -1)]
    units.append((JUMP_FORWARD, delta & 0xFF))
    return units


def jump_over(code: CodeType, instrs: Sequence[Instr], spans: Iterable[tuple[int, int]]) -> bytes:
    """``co_code`` with every ``(start, end)`` span entered by a jump straight to ``end``.

    The jump overwrites whole instructions from ``start`` (their caches included) and pads the
    rest of them with NOPs, so every following instruction stays where it was and the bytes
    still decode as instructions (dis, quickening and 3.12+ instrumentation walk them).
    """
    raw = bytearray(code.co_code)
    by_offset = {ins.offset: ins for ins in instrs}
    for start, end in spans:
        units = _jump_units(start, end)
        stop = start
        while stop < start + 2 * len(units):
            stop = by_offset[stop].end
        if stop > end:
            raise VerifyError(f"statement at {start} is too short for a jump")
        for k in range(start, stop, 2):
            raw[k], raw[k + 1] = NOP, 0
        for k, (op, arg) in enumerate(units):
            raw[start + 2 * k], raw[start + 2 * k + 1] = op, arg
    return bytes(raw)


# --- verifying a variant ----------------------------------------------------------------------


class VerifyError(Exception):
    """A rewritten code object that must not run; the message says why."""


def _successors(ins: Instr) -> Iterator[tuple[int, bool]]:
    """Normal control flow out of ``ins``: ``(offset, is_jump)``."""
    if ins.target is not None:
        yield ins.target, True
    if ins.opcode not in _NO_FALLTHROUGH:
        yield ins.end, False


def _stack_effect(ins: Instr, jump: bool) -> int:
    # dis.stack_effect is the compiler's own table (3.11-3.13), so depths agree with what
    # the compiler assumed, including its view of FOR_ITER/END_FOR on 3.12+.
    arg = ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None
    return dis.stack_effect(ins.opcode, arg, jump=jump)


def _handler(table: Sequence[ExceptionEntry], off: int) -> tuple[int, int, bool] | None:
    for e in table:
        if e.start <= off < e.end:
            return e.target, e.depth, e.lasti
    return None


def _same_tail(
    by_offset: dict[int, Instr], table: Sequence[ExceptionEntry], a: int, b: int
) -> bool:
    """True if the code from ``a`` and from ``b`` is the same straight-line block up to a
    return or raise: a copy the compiler made of an exit block (3.12+ duplicates small exit
    blocks, ``return x`` after an ``if``, for each predecessor)."""
    for _ in range(32):
        x, y = by_offset.get(a), by_offset.get(b)
        if x is None or y is None or x.target is not None or y.target is not None:
            return False
        if (x.opcode, x.arg, x.position) != (y.opcode, y.arg, y.position):
            return False
        if _handler(table, a) != _handler(table, b):
            return False
        if x.opcode in _NO_FALLTHROUGH:
            return True
        a, b = x.end, y.end
    return False


def _check_depth(
    by_offset: dict[int, Instr],
    table: Sequence[ExceptionEntry],
    start: int,
    end: int,
    span: Position,
) -> None:
    """Every normal path from ``start`` stays in the statement and reaches its end with the
    stack as it was at ``start`` (an expression statement leaves nothing behind).

    A path may branch into statement code laid out elsewhere (3.12+ puts the ``else`` arm of
    a conditional expression after the function's return, ending in a copy of what follows
    the statement). Such a path's exit must be followed by the same code as ``end``, so that
    jumping to ``end`` is jumping to the same continuation.
    """
    depth = {start: 0}
    work = [start]
    exits: dict[int, set[int]] = {}
    while work:
        off = work.pop()
        ins = by_offset[off]
        if ins.opcode == POP_TOP and ins.position == span:
            exits.setdefault(ins.end, set()).add(depth[off] - 1)
            continue
        for nxt, is_jump in _successors(ins):
            d = depth[off] + _stack_effect(ins, is_jump)
            if d < 0:
                raise VerifyError(f"stack underflow at offset {off} inside the statement")
            target = by_offset.get(nxt)
            if target is None or not (start <= nxt < end or _inside(target.position, span)):
                raise VerifyError(f"control leaves the statement from offset {off} to {nxt}")
            if nxt in depth:
                if depth[nxt] != d:
                    raise VerifyError(f"inconsistent stack depth at offset {nxt}")
                continue
            depth[nxt] = d
            work.append(nxt)
    if end not in exits:
        raise VerifyError(f"no path through the statement reaches {end}")
    for exit_, depths in exits.items():
        if depths != {0}:
            raise VerifyError(f"stack depth after the statement is {sorted(depths)}, not 0")
        if exit_ != end and not _same_tail(by_offset, table, exit_, end):
            raise VerifyError(f"the statement continues at {exit_} with other code than at {end}")


def _reachable(
    instrs: Sequence[Instr], table: Sequence[ExceptionEntry], jumps: dict[int, int]
) -> set[int]:
    """Offsets reachable from the entry when each ``jumps`` start goes straight to its end."""
    by_offset = {ins.offset: ins for ins in instrs}
    seen: set[int] = set()
    work = [instrs[0].offset] if instrs else []
    while work:
        off = work.pop()
        if off in seen or off not in by_offset:
            continue
        seen.add(off)
        if off in jumps:
            work.append(jumps[off])
            continue
        ins = by_offset[off]
        work.extend(nxt for nxt, _ in _successors(ins))
        for entry in table:  # 3.11-3.13: any covered instruction may jump to the handler
            if entry.start <= off < entry.end:
                work.append(entry.target)
    return seen


def _decode_jump(raw: bytes, start: int) -> int:
    arg = 0
    k = start
    while raw[k] == EXTENDED_ARG:
        arg = (arg << 8) | raw[k + 1]
        k += 2
    if raw[k] != JUMP_FORWARD:
        raise VerifyError(f"offset {start} does not hold a forward jump")
    return k + 2 + 2 * ((arg << 8) | raw[k + 1])


def verify(original: CodeType, variant: CodeType, spans: Sequence[tuple[int, int]]) -> None:
    """Raise :class:`VerifyError` unless ``variant`` is ``original`` with exactly ``spans``
    jumped over, safely.

    Checks, for each ``(start, end)``: the bytes at ``start`` are a forward jump whose target
    is ``end``; ``end`` is an instruction boundary; the stack depth at ``end`` equals the depth
    at ``start`` on every path; and, with the jumps in place, no instruction inside
    ``(start, end)`` can be reached, neither by a jump nor through an exception handler from
    outside. Everything else (bytes outside the rewritten instructions, constants other than
    nested code, names, line and exception tables) must be unchanged.
    """
    raw_old, raw_new = original.co_code, variant.co_code
    if len(raw_old) != len(raw_new):
        raise VerifyError("the variant's bytecode has another length")
    for attr in ("co_names", "co_varnames", "co_freevars", "co_cellvars", "co_argcount"):
        if getattr(original, attr) != getattr(variant, attr):
            raise VerifyError(f"the variant's {attr} differs")
    if original.co_linetable != variant.co_linetable:
        raise VerifyError("the variant's line table differs")
    if original.co_exceptiontable != variant.co_exceptiontable:
        raise VerifyError("the variant's exception table differs")
    instrs = instructions(original)
    by_offset = {ins.offset: ins for ins in instrs}
    table = exception_table(original)
    jumps = {}
    touched = bytearray(len(raw_old))
    for start, end in spans:
        if start not in by_offset or (end not in by_offset and end != len(raw_old)):
            raise VerifyError(f"span {start}..{end} does not start and end on instructions")
        target = _decode_jump(raw_new, start)
        if target != end:
            raise VerifyError(f"the jump at {start} lands on {target}, not {end}")
        pop_top = by_offset.get(end - 2)
        if pop_top is None or pop_top.opcode != POP_TOP:
            raise VerifyError(f"span {start}..{end} does not end after a POP_TOP")
        _check_depth(by_offset, table, start, end, pop_top.position)
        jumps[start] = end
        for k in range(start, end):
            touched[k] = 1
    for k in range(len(raw_old)):
        if raw_old[k] != raw_new[k] and not touched[k]:
            raise VerifyError(f"byte {k} changed outside the jumped-over statements")
    live = _reachable(instrs, table, jumps)
    for start, end in spans:
        entered = [off for off in live if start < off < end]
        if entered:
            raise VerifyError(
                f"offset {min(entered)} inside the statement at {start}..{end} is still "
                "reachable (a jump or an exception handler enters it from outside)"
            )
