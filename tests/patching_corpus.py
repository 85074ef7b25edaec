"""Functions using every form a marker statement can take, for the differential test.

Every case is ``case_*(trail)``: it appends what the program does to ``trail`` and returns a
result (or raises). Each marker statement's arguments call :func:`eff` exactly once, which logs
to ``EFFECTS``: the arguments' side effects, which must happen only while the marker is active.
Results never depend on a marker's arguments, so the three runs (unpatched, patched-inactive,
patched-active) must agree on everything but ``EFFECTS``.

Two kinds of statement still run while their marker is inactive, and say so here:
:data:`KEPT` (arguments that bind a name, yield or await: the statement is part of the
program and keeps the plain call path) and :data:`REBOUND` (the name the site calls was
rebound to something else after patching: the site calls that).
"""

# ruff: noqa: B018

import asyncio
import contextlib
import functools
import types

import tracemark
from tracemark.patching import finder

mk = tracemark.marker("corpus.mk", "v=%r")
other = tracemark.marker("corpus.other", "a=%r b=%r")
ns = types.SimpleNamespace()  # not a module: ns.mk(...) must never be resolved
mod = types.ModuleType("corpus_markers")
mod.mk = tracemark.marker("corpus.modmk", "v=%r")
tracemark.marker("corpus.inline", "v=%r")  # declared up front, so patch() resolves it

EFFECTS: list = []


def eff(value):
    EFFECTS.append(value)
    return value


def case_plain(trail):
    mk(eff(1))
    trail.append("after")
    return 42


def case_two_markers(trail):
    other(eff("a"), len(trail))
    mk(eff(2))
    return len(trail)


def case_module_attribute(trail):
    mod.mk(eff(3))
    return "mod"


def case_inline(trail):
    tracemark.mark("corpus.inline", "v=%r", eff(4))
    return "inline"


def case_conditional_args(trail):
    x = len(trail)
    mk(eff(x) if x > 5 else eff(-x))
    return x


def case_comprehension_arg(trail):
    xs = [1, 2, 3]
    mk(eff([y * 2 for y in xs if y]))
    return xs


def case_walrus(trail):
    mk((w := eff(7)) and w)
    return "walrus"


def case_walrus_read_after(trail):
    mk(y := eff(7))  # jumped over, `return y` would read an unbound local (3.12+: a crash)
    return y


def case_walrus_in_try(trail):
    try:
        mk(y := eff(len(trail)))
        trail.append(y)
    except KeyError:
        return None
    return y


def case_walrus_in_comprehension(trail):
    mk(eff([z := v * 2 for v in range(3)]))  # `:=` in a comprehension binds here (PEP 572)
    return z


def case_yield_in_args(trail):
    def g():
        mk(eff((yield 1)))
        yield 2

    it = g()
    return [next(it), it.send("sent"), list(g())]


def case_yield_from_in_args(trail):
    def sub():
        yield "s"
        return "r"

    def g():
        mk(eff((yield from sub())))
        yield "after"

    return list(g())


async def _await_in_args(v):
    mk(eff(await _sleep_value(v)))
    return v


def case_await_in_args(trail):
    return asyncio.run(_await_in_args(3))


async def _aiter(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def _async_comprehension_in_args():
    mk(eff([v async for v in _aiter(2)]))
    return "ok"


def case_async_comprehension_in_args(trail):
    return asyncio.run(_async_comprehension_in_args())


def case_lambda_arg(trail):
    mk(eff((lambda q: q * 2)(3)))
    mk(eff((lambda: (w := 4) + w)()))  # `:=` in a lambda binds in the lambda
    return "lambda"


def case_generator_expression_arg(trail):
    mk(eff(sum(v for v in range(4))))
    return "genexp"


def case_comprehension_shadows_a_local(trail):
    y = len(trail) + 1
    # 3.12+ inlines the comprehension (PEP 709): its `y` is saved, stored inside the
    # statement and restored after it, and `return y` reads it unchecked. Skipping the whole
    # statement leaves `y` as it was: patched.
    mk(eff([y for y in range(2)]))
    return y


def spy(v):
    EFFECTS.append(("spy", v))


rb = mk  # rebound by case_rebound_global while patched


def _calls_rb(v):
    rb(eff(v))
    return v


def case_rebound_global(trail):
    global rb
    out = [_calls_rb("marker")]
    rb = spy
    try:
        out.append(_calls_rb("spied"))  # the site calls what `rb` names now
    finally:
        rb = mk
    out.append(_calls_rb("marker again"))
    return out


def case_nested_calls(trail):
    mk(eff(sorted({"b": 1, "a": 2}.items(), key=lambda kv: kv[1])))
    return 1


def case_try_finally_return(trail):
    try:
        trail.append("body")
        return "returned"
    finally:
        mk(eff("finally"))
        trail.append("finally")


def case_try_finally_raise(trail):
    try:
        trail.append("body")
        raise KeyError("boom")
    finally:
        mk(eff("finally"))


def case_try_except(trail):
    try:
        mk(eff("try"))
        {}["missing"]
    except KeyError as exc:
        mk(eff("except"))
        trail.append(repr(exc))
    else:
        mk(eff("else"))
    return "handled"


def case_marker_last_in_try(trail):
    try:
        trail.append(1)
        mk(eff("last"))
    except ValueError:
        return "no"
    return "yes"


def case_nested_finally(trail):
    for i in range(3):
        try:
            try:
                if i == 1:
                    continue
                if i == 2:
                    break
            finally:
                mk(eff(i))
        finally:
            other(eff(i), i)
            trail.append(i)
    return i


def case_with(trail):
    with contextlib.suppress(ZeroDivisionError):
        mk(eff("with"))
        1 / 0
    with contextlib.ExitStack() as stack:
        stack.callback(trail.append, "exit")
        mk(eff("stack"))
    return "with"


def case_loops(trail):
    total = 0
    for i in range(5):
        mk(eff(i))
        if i == 3:
            break
        total += i
    n = 0
    while n < 3:
        n += 1
        mk(eff(n))
        if n == 2:
            continue
    else:
        mk(eff("else"))
    return total, n


def case_match(trail):
    out = []
    for cmd in (("go", 3), ("stop",), 5):
        match cmd:
            case ("go", n):
                mk(eff(n))
                out.append(n)
            case ("stop",):
                mk(eff("stop"))
            case _:
                mk(eff("other"))
    return out


def case_raise_after(trail):
    mk(eff("before"))
    trail.append("x")
    return 1 / 0


def case_raise_in_nested(trail):
    def inner(k):
        mk(eff(k))
        return {}[k]

    return inner("nope")


def case_closure(trail):
    count = 0

    def bump():
        nonlocal count
        mk(eff(count))
        count += 1
        return count

    bump()
    bump()
    return count, [f() for f in [bump]]


def make_counter(start):
    def counter():
        mk(eff(start))
        return start + 1

    return counter


def case_factory(trail):
    return [make_counter(i)() for i in range(3)]


def case_recursion(trail):
    def fact(n):
        mk(eff(n))
        return 1 if n <= 1 else n * fact(n - 1)

    return fact(6)


def _logged(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@_logged
def decorated(x):
    mk(eff(x))
    return x * 3


def case_decorated(trail):
    return decorated(5)


class Thing:
    def __init__(self):
        self._v = 1

    def method(self, a):
        mk(eff(a))
        return a + self._v

    @staticmethod
    def static(a):
        mk(eff(a))
        return -a

    @classmethod
    def klass(cls, a):
        mk(eff(a))
        return cls.__name__, a

    @property
    def value(self):
        mk(eff("get"))
        return self._v

    @value.setter
    def value(self, v):
        mk(eff(v))
        self._v = v


def case_methods(trail):
    t = Thing()
    t.value = 9
    return t.method(2), Thing.static(3), Thing.klass(4), t.value


class SubThing(Thing):
    def method(self, a):
        mk(eff(a))  # the function has a __class__ cell (super())
        return super().method(a) * 2


def case_super(trail):
    return SubThing().method(4)


def gen(n):
    for i in range(n):
        mk(eff(i))
        got = yield i
        if got:
            mk(eff(got))
            yield got * 10
    try:
        yield "last"
    finally:
        mk(eff("gen-finally"))


def case_generator(trail):
    g = gen(3)
    out = [next(g), g.send(None), g.send(7), next(g), next(g)]
    try:
        g.throw(ValueError("in"))
    except ValueError as exc:
        out.append(str(exc))
    out.append(list(gen(2)))
    return out


def case_generator_return(trail):
    def g():
        mk(eff("g"))
        yield 1
        return "done"

    it = g()
    next(it)
    try:
        next(it)
    except StopIteration as stop:
        return stop.value


async def _sleep_value(v):
    await asyncio.sleep(0)
    return v


async def coro(v):
    mk(eff(v))
    x = await _sleep_value(v + 1)
    mk(eff(x))
    return x * 2


def case_coroutine(trail):
    return asyncio.run(coro(1))


async def agen(n):
    for i in range(n):
        mk(eff(i))
        yield i
        await asyncio.sleep(0)
    mk(eff("end"))


async def _consume():
    out = [v async for v in agen(3)]
    g = agen(5)
    out.append(await g.asend(None))
    await g.aclose()
    return out


def case_async_generator(trail):
    return asyncio.run(_consume())


def case_not_a_module(trail):
    ns.mk = lambda v: trail.append(("ns", v))
    ns.mk(1)  # looks like mod.mk(...) but ns is not a module: never jumped over
    return trail[-1]


CASES = sorted(name for name in globals() if name.startswith("case_"))

#: Statements kept on the plain call path whatever their marker's state: the qualified name
#: of the function holding them -> the reason ``tracemark.markers()`` gives.
KEPT = {
    "case_walrus": finder.BINDS,
    "case_walrus_read_after": finder.BINDS,
    "case_walrus_in_try": finder.BINDS,
    "case_walrus_in_comprehension": finder.BINDS,
    "case_yield_in_args.<locals>.g": finder.SUSPENDS,
    "case_yield_from_in_args.<locals>.g": finder.SUSPENDS,
    "_await_in_args": finder.SUSPENDS,
    "_async_comprehension_in_args": finder.SUSPENDS,
}

#: The cases whose kept statements run while inactive (their effects are the plain run's).
KEPT_CASES = {
    "case_walrus",
    "case_walrus_read_after",
    "case_walrus_in_try",
    "case_walrus_in_comprehension",
    "case_yield_in_args",
    "case_yield_from_in_args",
    "case_await_in_args",
    "case_async_comprehension_in_args",
}

#: Effects a patched, inactive run still has because a name was rebound after patching.
REBOUND = {"case_rebound_global": ["spied", ("spy", "spied")]}
