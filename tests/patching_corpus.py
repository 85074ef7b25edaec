"""Functions using every form a marker statement can take, for the differential test.

Every case is ``case_*(trail)``: it appends what the program does to ``trail`` and returns a
result (or raises). Each marker statement's arguments call :func:`eff` exactly once, which logs
to ``EFFECTS``: the arguments' side effects, which must happen only while the marker is active.
Results never depend on a marker's arguments, so the three runs (unpatched, patched-inactive,
patched-active) must agree on everything but ``EFFECTS``.
"""

# ruff: noqa: B018

import asyncio
import contextlib
import functools
import types

import tracemark

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
    mk(eff(await _sleep_value(v)))
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
