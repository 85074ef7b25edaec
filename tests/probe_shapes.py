"""Functions of every shape, probed by tests/test_probes*.py (a module with a source file)."""

import functools


def plain(a, b=2, *rest, key=None, **extra):
    total = a + b + sum(rest)
    if key is not None:
        total += len(key)
    return total


def fails(n):
    x = n * 2
    raise ValueError(f"bad {x}")  # the line a traceback must name


def calls_fails(n):
    return fails(n) + 1


def with_doc(a):
    """A docstring that must stay the docstring."""
    return a


def no_return(items):
    items.append(1)


def recursive(n):
    if n <= 1:
        return 1
    return n * recursive(n - 1)


def loop(n):
    acc = 0
    for i in range(n):
        acc += i  # line probe here: once per iteration
    return acc


def early(n):
    if n < 0:
        return "negative"
    try:
        return "small" if n < 10 else "big"
    finally:
        n = 0


class Shapes:
    factor = 3

    def __init__(self, base):
        self.base = base

    def method(self, x):
        return self.base + x * self.factor

    @staticmethod
    def static(x):
        return x - 1

    @classmethod
    def klass(cls, x):
        return cls.factor * x

    @property
    def prop(self):
        return self.base * 2

    def uses_super(self):
        return super().__repr__()[:1]


class Sub(Shapes):
    def method(self, x):
        return super().method(x) + 1


def outer(k):
    def inner(v):
        return v + k

    return inner


def gen(n):
    total = 0
    for i in range(n):
        total += i
        yield i
    return total


async def coro(n):
    return n * 2


async def agen(n):
    for i in range(n):
        yield i
    return


async def awaits(n):
    first = await coro(n)
    return first + await coro(1)


def decorator(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@decorator
def decorated(x, y=1):
    return x * y


def catches(n):
    try:
        fails(n)
    except ValueError as exc:
        return str(exc)


class Request:
    def __init__(self, url):
        self.url = url

    def __repr__(self):
        return f"Request({self.url!r})" + "x" * 500


def handle(req, sql):
    rows = [sql] * 2
    count = len(rows)  # line probe with locals
    late = count + 1
    return late


def module_level_marker():
    pass


CONSTANT = 1 + 1
