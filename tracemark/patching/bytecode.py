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
* :func:`rewrite`: the variant the patcher installs: each span jumped over, through a
  *guard* appended after the code when the span has one (:class:`Guard`: the statement still
  runs if the callee's name no longer refers to the marker). Appending leaves every existing
  offset, location and exception entry as it was.
* :func:`verify`: checks a rewritten code object against its original before anyone may run
  it, and raises :class:`VerifyError` saying why not; among other things, that no code that
  still runs reads a local that only the skipped code stores (``:=``: 3.12+ reads it with an
  unchecked ``LOAD_FAST``, a crash when it is unbound).

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
from types import CodeType
from typing import Any, NamedTuple

from .._frozen import frozen

__all__ = [
    "ExceptionEntry",
    "Guard",
    "Instr",
    "Skip",
    "VerifyError",
    "exception_table",
    "instructions",
    "jump_over",
    "rewrite",
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


@frozen
class Instr:
    """One instruction; ``size`` counts its ``EXTENDED_ARG``-free unit and its caches."""

    offset: int
    size: int
    opcode: int
    opname: str
    arg: int | None
    target: int | None  # jump target offset, for jumps
    position: Position
    argval: Any = None  # dis's view of the argument (a name for LOAD_GLOBAL / LOAD_DEREF)

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
            Instr(
                ins.offset,
                end - ins.offset,
                ins.opcode,
                ins.opname,
                ins.arg,
                target,
                position,
                ins.argval,
            )
        )
    return out


# --- the exception table ----------------------------------------------------------------------


@frozen
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


# --- the guarded jump --------------------------------------------------------------------------


class Guard(NamedTuple):
    """The jump over a statement is taken only while ``name`` still refers to ``expected``.

    ``scope`` says where the name is read: ``"global"`` (globals, then builtins: the
    ``LOAD_GLOBAL`` the statement itself uses) or ``"free"`` (a closure cell: ``LOAD_DEREF``).
    """

    scope: str
    name: str
    expected: Any


class Skip(NamedTuple):
    """One compiled copy of a statement to jump over; guarded unless ``guard`` is None."""

    start: int
    end: int
    guard: Guard | None = None


CACHE = dis.opmap["CACHE"]
LOAD_CONST = dis.opmap["LOAD_CONST"]
LOAD_GLOBAL = dis.opmap["LOAD_GLOBAL"]
LOAD_DEREF = dis.opmap["LOAD_DEREF"]
IS_OP = dis.opmap["IS_OP"]
# 3.11 has directional conditional jumps (POP_JUMP_FORWARD_IF_FALSE); 3.12 and 3.13 have
# POP_JUMP_IF_FALSE, forward only. Its argument counts 2-byte units from the end of its
# caches (3.13: one cache unit; 3.11/3.12: none). On 3.13 it needs an exact bool: IS_OP
# makes one.
POP_JUMP_IF_FALSE = dis.opmap.get("POP_JUMP_FORWARD_IF_FALSE", dis.opmap.get("POP_JUMP_IF_FALSE"))
# 3.11-3.13: a backward jump that does not check the eval breaker, so it cannot raise (no
# signal handler, no async exception runs on it); no caches.
JUMP_BACKWARD_NO_INTERRUPT = dis.opmap["JUMP_BACKWARD_NO_INTERRUPT"]
_GUARD_LOADS = {"global": LOAD_GLOBAL, "free": LOAD_DEREF}


def _caches(op: int) -> int:
    """Cache units after ``op``: ``dis._inline_cache_entries`` is a list by opcode on
    3.11/3.12 and a dict by name on 3.13 (private, but it is the interpreter's own table)."""
    table = dis._inline_cache_entries  # type: ignore[attr-defined]
    if isinstance(table, dict):
        return table.get(dis.opname[op], 0) or 0
    return table[op]


def _units(op: int, arg: int) -> list[tuple[int, int]]:
    """``(opcode, arg)`` units of one instruction: EXTENDED_ARG prefixes, itself, caches."""
    prefixes = []
    rest = arg >> 8
    while rest:
        prefixes.insert(0, (EXTENDED_ARG, rest & 0xFF))
        rest >>= 8
    return [*prefixes, (op, arg & 0xFF), *[(CACHE, 0)] * _caches(op)]


def _jump(op: int, at: int, target: int) -> list[tuple[int, int]]:
    """A relative jump at ``at`` to ``target``: forward, or backward for
    JUMP_BACKWARD_NO_INTERRUPT (3.11-3.13: the argument counts units from the end of the
    instruction's caches).

    The size only grows: a forward jump whose prefix brings its target within one byte
    (256 units away without it, 255 with it) keeps the prefix, as ``EXTENDED_ARG 0``, rather
    than alternating between the two sizes forever."""
    size = len(_units(op, 0))
    while True:
        after = at + 2 * size
        delta = (after - target if op == JUMP_BACKWARD_NO_INTERRUPT else target - after) // 2
        if delta < 0:
            raise VerifyError(f"no room for a jump from {at} to {target}")
        units = _units(op, delta)
        if len(units) <= size:
            return [(EXTENDED_ARG, 0)] * (size - len(units)) + units
        size = len(units)


def _pack(units: Iterable[tuple[int, int]]) -> bytes:
    return bytes(b for unit in units for b in unit)


# The location table (co_linetable), 3.11-3.13 (PEP 657, Objects/locations.md): entries of
# 1-8 code units; first byte 0x80 | code << 3 | (units - 1). Code 15: no location; 14: long
# form (signed line delta, end line delta, column + 1, end column + 1); 13: line only (signed
# delta); 10-12: one line form (delta = code - 10, column, end column bytes); 0-9: short form
# (one byte). Varints are 6 bits a byte, least significant first, 0x40 = more follows.


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 63) << shift
        shift += 6
        if not b & 64:
            return value, i


def _read_svarint(data: bytes, i: int) -> tuple[int, int]:
    value, i = _read_varint(data, i)
    return (-(value >> 1) if value & 1 else value >> 1), i


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 64:
        out.append(64 | (value & 63))
        value >>= 6
    out.append(value)
    return bytes(out)


def _write_svarint(value: int) -> bytes:
    return _write_varint((-value << 1) | 1 if value < 0 else value << 1)


def _last_line(code: CodeType) -> int:
    """The line the location table's state machine holds after its last entry."""
    data = code.co_linetable
    line = code.co_firstlineno
    i = 0
    while i < len(data):
        kind = (data[i] >> 3) & 15
        i += 1
        if kind == 15:
            continue
        if kind in (13, 14):
            delta, i = _read_svarint(data, i)
            line += delta
            if kind == 14:
                for _ in range(3):
                    _, i = _read_varint(data, i)
        elif kind >= 10:
            line += kind - 10
            i += 2
        else:
            i += 1
    return line


def _locations(line: int, entries: Iterable[tuple[int, Position]]) -> tuple[bytes, int]:
    """Location-table bytes for ``(units, position)`` entries following a table whose state
    is ``line``; returns them and the state after them."""
    out = bytearray()
    for units, pos in entries:
        while units:
            n = min(units, 8)
            units -= n
            first, end_line, col, end_col = pos
            if first is None:
                out.append(0x80 | 15 << 3 | (n - 1))
            elif col is None or end_col is None or end_line is None:
                out.append(0x80 | 13 << 3 | (n - 1))
                out += _write_svarint(first - line)
                line = first
            else:
                out.append(0x80 | 14 << 3 | (n - 1))
                out += _write_svarint(first - line)
                out += _write_varint(end_line - first)
                out += _write_varint(col + 1)
                out += _write_varint(end_col + 1)
                line = first
    return bytes(out), line


def _write_entry(start: int, end: int, target: int, depth: int, lasti: bool) -> bytes:
    """One exception table entry (the format :func:`exception_table` reads)."""
    out = bytearray()
    for k, value in enumerate((start // 2, (end - start) // 2, target // 2, depth << 1 | lasti)):
        chunks = [value & 63]
        value >>= 6
        while value:
            chunks.insert(0, value & 63)
            value >>= 6
        for j, c in enumerate(chunks):
            out.append(c | (64 if j < len(chunks) - 1 else 0) | (128 if j == 0 and k == 0 else 0))
    return bytes(out)


def _trampoline_head(guard: Guard, load_arg: int, const: int, at: int, end: int) -> list:
    """The guard, laid out at ``at``: load the name, compare it with the expected object,
    jump back to ``end`` if it is the same, fall through (to the statement's copy) if not."""
    head = _units(_GUARD_LOADS[guard.scope], load_arg) + _units(LOAD_CONST, const)
    head += _units(IS_OP, 0)
    back_at = at + 2 * (len(head) + 1 + _caches(POP_JUMP_IF_FALSE))
    back = _jump(JUMP_BACKWARD_NO_INTERRUPT, back_at, end)
    # Skips exactly the jump back (a few units: never needs an EXTENDED_ARG).
    return head + _units(POP_JUMP_IF_FALSE, len(back)) + back


def _guard_load_arg(code: CodeType, instrs: Sequence[Instr], skip: Skip) -> int:
    """The argument of the guard's load: 3.11-3.13 encode LOAD_GLOBAL's as ``namei << 1 |
    push_null`` (the guard pushes no NULL); LOAD_DEREF's is an index into the frame's
    "fast locals" (3.11+): taken from the statement's own load of the name."""
    guard = skip.guard
    assert guard is not None
    if guard.scope == "global":
        if guard.name not in code.co_names:
            raise VerifyError(f"the guard's name {guard.name!r} is not in co_names")
        return code.co_names.index(guard.name) << 1
    for ins in instrs:
        in_statement = skip.start <= ins.offset < skip.end
        if in_statement and ins.opcode == LOAD_DEREF and ins.argval == guard.name:
            return ins.arg  # type: ignore[return-value]
    raise VerifyError(f"the statement does not read the closure variable {guard.name!r}")


def rewrite(code: CodeType, instrs: Sequence[Instr], skips: Sequence[Skip]) -> CodeType:
    """``code`` with every skip jumped over: the variant the patcher installs.

    An unguarded skip is :func:`jump_over`'s plain forward jump. A guarded one jumps to a
    *trampoline* appended after the last instruction (nothing before it moves)::

        start:  JUMP_FORWARD T            (over the statement's first instruction(s))
                ...                       the rest of the statement, unchanged
        end:    ...                       what follows the statement
        T:      LOAD_GLOBAL name | LOAD_DEREF name
                LOAD_CONST  expected
                IS_OP 0
                POP_JUMP_IF_FALSE S
                JUMP_BACKWARD_NO_INTERRUPT end    <- the name is still the marker: skipped
        S:      <copy of the instructions the jump overwrote, start..R>
                JUMP_BACKWARD_NO_INTERRUPT R      <- it is not: the statement runs

    The copied instructions are the statement's callee load (and on 3.11/3.12 the PUSH_NULL
    before a LOAD_DEREF): never jumps, so they run the same anywhere. The trampoline gets the
    statement's positions in the location table (tracebacks and line events name the
    statement) and the exception handler of ``start`` (a NameError from the load is handled
    where the original's would be). Constants the guards compare with are appended to
    ``co_consts``. The stack depth the guard needs (2) is below what the statement itself
    needs (the callee and its NULL), so ``co_stacksize`` holds.
    """
    raw = bytearray(jump_over(code, instrs, [s[:2] for s in skips if s.guard is None]))
    consts = list(code.co_consts)
    table = exception_table(code)
    by_offset = {ins.offset: ins for ins in instrs}
    tail = bytearray()
    entries = bytearray()
    locations: list[tuple[int, Position]] = []
    base = len(raw)
    for skip in sorted(skips, key=lambda s: s.start):
        guard = skip.guard
        if guard is None:
            continue
        start, end = skip.start, skip.end
        const = next((k for k, c in enumerate(consts) if c is guard.expected), None)
        if const is None:
            const = len(consts)
            consts.append(guard.expected)
        at = base + len(tail)
        units = _jump_units(start, at)
        stop = start
        while stop < start + 2 * len(units):
            stop = by_offset[stop].end
        if stop >= end:
            raise VerifyError(f"statement at {start} is too short for a guarded jump")
        copied = [by_offset[o] for o in sorted(by_offset) if start <= o < stop]
        if any(ins.target is not None for ins in copied):
            raise VerifyError(f"the instructions a guarded jump at {start} overwrites jump")
        for k in range(start, stop, 2):
            raw[k], raw[k + 1] = NOP, 0
        for k, (op, arg) in enumerate(units):
            raw[start + 2 * k], raw[start + 2 * k + 1] = op, arg
        head = _trampoline_head(guard, _guard_load_arg(code, instrs, skip), const, at, end)
        copy_at = at + 2 * len(head)
        back_at = copy_at + (stop - start)
        back = _jump(JUMP_BACKWARD_NO_INTERRUPT, back_at, stop)
        tail += _pack(head) + code.co_code[start:stop] + _pack(back)
        where = by_offset[start].position
        locations.append((len(head), where))
        locations += [(ins.size // 2, ins.position) for ins in copied]
        locations.append((len(back), where))
        handler = _handler(table, start)
        if handler is not None:
            entries += _write_entry(at, base + len(tail), *handler)
    if not tail:
        return code.replace(co_code=bytes(raw))
    lines, _ = _locations(_last_line(code), locations)
    return code.replace(
        co_code=bytes(raw + tail),
        co_consts=tuple(consts),
        co_linetable=code.co_linetable + lines,
        co_exceptiontable=code.co_exceptiontable + bytes(entries),
    )


# --- locals a skipped statement stores -------------------------------------------------------

# Which instructions read or write a local's binding, by localsplus index (the argument of
# every *_FAST and *_DEREF instruction, 3.11-3.13). 3.13 fuses pairs into one instruction
# whose argument holds two 4-bit indices (first << 4 | second).
#
# Reads that assume the local is bound, or fail if it is not:
# * LOAD_FAST: 3.11 checks and raises UnboundLocalError; 3.12 and 3.13 do not check at all
#   (the compiler emits it only where it proved the local bound): reading a local left
#   unbound there is a crash.
# * LOAD_FAST_CHECK (3.12+), DELETE_FAST, LOAD_DEREF, DELETE_DEREF raise when unbound: no
#   crash, but not what the original did either.
# * LOAD_FAST_AND_CLEAR (3.12+, PEP 709 comprehensions) accepts an unbound local: not a read.
_READS = {
    name: parts
    for name, parts in {
        "LOAD_FAST": (None,),
        "LOAD_FAST_CHECK": (None,),
        "DELETE_FAST": (None,),
        "LOAD_DEREF": (None,),
        "DELETE_DEREF": (None,),
        "LOAD_FAST_LOAD_FAST": (4, 0),  # 3.13
        "STORE_FAST_LOAD_FAST": (0,),  # 3.13: stores arg >> 4, then loads arg & 15
    }.items()
    if name in dis.opmap
}
# Writes: whatever changes whether (or to what) a local is bound.
_WRITES = {
    name: parts
    for name, parts in {
        "STORE_FAST": (None,),
        "DELETE_FAST": (None,),
        "STORE_DEREF": (None,),
        "DELETE_DEREF": (None,),
        "LOAD_FAST_AND_CLEAR": (None,),  # 3.12+: clears it
        "STORE_FAST_STORE_FAST": (4, 0),  # 3.13
        "STORE_FAST_LOAD_FAST": (4,),  # 3.13
    }.items()
    if name in dis.opmap
}


def _locals_of(ins: Instr, table: dict[str, tuple[int | None, ...]]) -> list[int]:
    parts = table.get(ins.opname)
    if parts is None or ins.arg is None:
        return []
    return [ins.arg if shift is None else (ins.arg >> shift) & 15 for shift in parts]


def _check_bindings(
    code: CodeType, instrs: Sequence[Instr], before: set[int], after: set[int]
) -> None:
    """Reject a variant in which code that still runs can read a local that only code the
    variant no longer runs may have stored (``:=`` in a marker's arguments; PEP 709 inlines
    comprehensions on 3.12+, and their iteration variables are stored in the statement, but
    restored after it: see below).

    ``before``/``after``: offsets reachable in the original / in the variant.
    """
    dead = [ins for ins in instrs if ins.offset in before and ins.offset not in after]
    # A local the skipped code saves with LOAD_FAST_AND_CLEAR is the iteration variable of a
    # comprehension inlined by PEP 709 (3.12+): the compiler restores it on every exit (the
    # normal one and its exception handler), so skipping the comprehension leaves it as it
    # was. The only other store of that name the statement could hold is a ``:=`` outside
    # the comprehension, which the finder never lets through.
    saved = {
        i for ins in dead if ins.opname == "LOAD_FAST_AND_CLEAR" for i in _locals_of(ins, _WRITES)
    }
    skipped = {i for ins in dead for i in _locals_of(ins, _WRITES)} - saved
    if not skipped:
        return
    for ins in instrs:
        if ins.offset in after:
            read = skipped.intersection(_locals_of(ins, _READS))
            if read:
                name = getattr(code, "_varname_from_oparg", str)  # 3.11+: CPython's own
                which = sorted(name(i) for i in read)
                raise VerifyError(
                    f"{ins.opname} at offset {ins.offset} reads {', '.join(which)}, which "
                    "only the jumped-over code stores"
                )


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
) -> int:
    """Every normal path from ``start`` stays in the statement and reaches its end with the
    stack as it was at ``start`` (an expression statement leaves nothing behind). Returns
    the most the statement pushes above the depth at ``start``.

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
    return max(depth.values())


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
    return _decode_jump_at(raw, start)[0]


def _decode_jump_at(raw: bytes, start: int) -> tuple[int, int]:
    """The target of the forward jump at ``start``, and the offset after it."""
    arg = 0
    k = start
    while raw[k] == EXTENDED_ARG:
        arg = (arg << 8) | raw[k + 1]
        k += 2
    if raw[k] != JUMP_FORWARD:
        raise VerifyError(f"offset {start} does not hold a forward jump")
    return k + 2 + 2 * ((arg << 8) | raw[k + 1]), k + 2


def _check_trampoline(
    original: CodeType,
    variant: CodeType,
    skip: Skip,
    at: int,
    stop: int,
    span: Position,
    by_offset: dict[int, Instr],
    seen: dict[str, Any],
) -> int:
    """Check the guarded trampoline at ``at`` for ``skip`` (laid out as :func:`rewrite`
    documents); ``stop`` ends what the jump at ``skip.start`` overwrote. Returns its end.
    ``seen``: what every trampoline of one variant reads, decoded once for all of them (a
    function with many markers would decode its variant once per marker)."""
    guard = skip.guard
    assert guard is not None
    start, end = skip.start, skip.end
    if not seen:
        seen["mine"] = {ins.offset: ins for ins in instructions(variant)}
        seen["table"] = exception_table(original)
        seen["vtable"] = exception_table(variant)
        seen["positions"] = list(variant.co_positions())
    mine = seen["mine"]
    seq = []
    off = at
    for _ in range(5):
        ins = mine.get(off)
        if ins is None:
            raise VerifyError(f"the trampoline at {at} is cut short")
        if ins.opcode == EXTENDED_ARG:  # fold prefixes: dis lists them on their own
            nxt = ins.end
            while mine[nxt].opcode == EXTENDED_ARG:
                nxt = mine[nxt].end
            ins = mine[nxt]
        seq.append(ins)
        off = ins.end
    load, const, is_op, cond, back = seq
    expected_arg_ok = load.arg is not None and (guard.scope != "global" or not load.arg & 1)
    if load.opcode != _GUARD_LOADS.get(guard.scope) or load.argval != guard.name:
        raise VerifyError(f"the trampoline at {at} does not load {guard.name!r}")
    if not expected_arg_ok:
        raise VerifyError(f"the trampoline at {at} pushes a NULL with {guard.name!r}")
    if const.opcode != LOAD_CONST or const.argval is not guard.expected:
        raise VerifyError(f"the trampoline at {at} does not compare with the expected object")
    if is_op.opcode != IS_OP or is_op.arg != 0:
        raise VerifyError(f"the trampoline at {at} does not test identity")
    if cond.opcode != POP_JUMP_IF_FALSE or cond.target != back.end:
        raise VerifyError(f"the trampoline at {at} does not branch to its copy")
    if back.opcode != JUMP_BACKWARD_NO_INTERRUPT or back.target != end:
        raise VerifyError(f"the trampoline at {at} does not jump back to {end}")
    copy_at = back.end
    copy_end = copy_at + (stop - start)
    if variant.co_code[copy_at:copy_end] != original.co_code[start:stop]:
        raise VerifyError(f"the trampoline at {at} does not hold the overwritten instructions")
    ret = mine.get(copy_end)
    while ret is not None and ret.opcode == EXTENDED_ARG:
        ret = mine.get(ret.end)
    if ret is None or ret.opcode != JUMP_BACKWARD_NO_INTERRUPT or ret.target != stop:
        raise VerifyError(f"the trampoline at {at} does not return to {stop}")
    table = seen["table"]
    handler = _handler(table, start)
    for ins in by_offset.values():
        if start <= ins.offset < stop:
            if ins.target is not None:
                raise VerifyError(f"the overwritten instruction at {ins.offset} is a jump")
            if _handler(table, ins.offset) != handler:
                raise VerifyError(f"the overwritten instructions at {start} change handler")
        if ins.target is not None and start < ins.target < stop:
            raise VerifyError(f"offset {ins.offset} jumps into the overwritten {start}..{stop}")
    if any(start < e.target < stop for e in table):
        raise VerifyError(f"an exception handler starts inside {start}..{stop}")
    vtable = seen["vtable"]
    positions = seen["positions"]
    for off in range(at, ret.end, 2):
        if _handler(vtable, off) != handler:
            raise VerifyError(f"offset {off} of the trampoline has another exception handler")
        if not _inside(tuple(positions[off // 2]), span):  # type: ignore[arg-type]
            raise VerifyError(f"offset {off} of the trampoline is not located in the statement")
    return ret.end


def verify(original: CodeType, variant: CodeType, spans: Sequence[tuple[int, int]]) -> None:
    """Raise :class:`VerifyError` unless ``variant`` is ``original`` with exactly ``spans``
    jumped over, safely.

    ``spans`` are ``(start, end)`` pairs or :class:`Skip`s (guarded when their ``guard`` is
    set). Checks, for each: the bytes at ``start`` are a forward jump whose target is ``end``
    (unguarded) or a trampoline after the original code that is exactly what :func:`rewrite`
    documents (guarded); ``end`` is an instruction boundary; the stack depth at ``end``
    equals the depth at ``start`` on every path; and, with the jumps taken, no instruction
    inside ``(start, end)`` can be reached, neither by a jump nor through an exception
    handler from outside, and no code that still runs reads a local that only the skipped
    code stores. Everything else (bytes outside the rewritten instructions, constants other
    than nested code, names, line and exception tables) must be unchanged; the trampolines
    only append bytes, constants, locations and exception entries.
    """
    skips = [s if isinstance(s, Skip) else Skip(*s) for s in spans]
    raw_old, raw_new = original.co_code, variant.co_code
    n = len(raw_old)
    guarded = any(s.guard is not None for s in skips)
    if len(raw_new) < n or (len(raw_new) != n and not guarded):
        raise VerifyError("the variant's bytecode has another length")
    for attr in ("co_names", "co_varnames", "co_freevars", "co_cellvars", "co_argcount"):
        if getattr(original, attr) != getattr(variant, attr):
            raise VerifyError(f"the variant's {attr} differs")
    if original.co_stacksize != variant.co_stacksize:
        raise VerifyError("the variant's co_stacksize differs")
    same = bytes.startswith if guarded else bytes.__eq__
    if not same(variant.co_linetable, original.co_linetable):
        raise VerifyError("the variant's line table differs")
    if not same(variant.co_exceptiontable, original.co_exceptiontable):
        raise VerifyError("the variant's exception table differs")
    old_consts, new_consts = original.co_consts, variant.co_consts
    if len(new_consts) < len(old_consts) or any(
        a is not b and not (isinstance(a, CodeType) and isinstance(b, CodeType))
        for a, b in zip(old_consts, new_consts, strict=False)  # appended ones are the guards'
    ):
        raise VerifyError("the variant's constants differ")
    instrs = instructions(original)
    by_offset = {ins.offset: ins for ins in instrs}
    table = exception_table(original)
    jumps = {}
    touched = bytearray(n)
    tail = n
    seen: dict[str, Any] = {}
    for skip in sorted(skips, key=lambda s: s.start):
        start, end = skip.start, skip.end
        if start not in by_offset or (end not in by_offset and end != n):
            raise VerifyError(f"span {start}..{end} does not start and end on instructions")
        target, after = _decode_jump_at(raw_new, start)
        pop_top = by_offset.get(end - 2)
        if pop_top is None or pop_top.opcode != POP_TOP:
            raise VerifyError(f"span {start}..{end} does not end after a POP_TOP")
        if skip.guard is None:
            if target != end:
                raise VerifyError(f"the jump at {start} lands on {target}, not {end}")
        else:
            stop = start
            while stop < after:
                stop = by_offset[stop].end
            if target < n or stop >= end:
                raise VerifyError(f"the guarded jump at {start} does not reach a trampoline")
            if target != tail:
                raise VerifyError(f"the trampoline of {start} is not where it belongs")
            tail = _check_trampoline(
                original, variant, skip, target, stop, pop_top.position, by_offset, seen
            )
        if _check_depth(by_offset, table, start, end, pop_top.position) < 2 and skip.guard:
            raise VerifyError(f"the statement at {start} has no stack room for its guard")
        jumps[start] = end
        for k in range(start, end):
            touched[k] = 1
    if tail != len(raw_new):
        raise VerifyError(f"bytes {tail}..{len(raw_new)} after the code belong to no trampoline")
    for k in range(n):
        if raw_old[k] != raw_new[k] and not touched[k]:
            raise VerifyError(f"byte {k} changed outside the jumped-over statements")
    live = _reachable(instrs, table, jumps)
    for start, end, _ in skips:
        entered = [off for off in live if start < off < end]
        if entered:
            raise VerifyError(
                f"offset {min(entered)} inside the statement at {start}..{end} is still "
                "reachable (a jump or an exception handler enters it from outside)"
            )
    _check_bindings(original, instrs, _reachable(instrs, table, {}), live)
