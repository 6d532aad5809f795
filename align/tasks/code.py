"""Small Python function-writing problems with executable tests.

Levels, measurable in the reference solution:
  1. one `return` over `int` arguments (affine maps, range checks, remainders, clamps)
  2. one `return` that makes one pass over a `list[int]` or a `str` (filter, count, map, replace)
  3. two statements: an intermediate value, then a second step (filter then map then sum, ...)

Each template draws constants from the rng, so there are thousands of distinct prompts per level. Expected
test outputs come from a Python reference written independently of the solution text, so running the
solution against its own asserts really checks it. Each problem's tests start with edge cases at the
template's constants (both sides of a threshold or bound, an empty list where a default is returned), then
random inputs; a problem whose tests all expect the same output is redrawn, so no constant function passes.
"""

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from align.tasks.problem import Problem

LEVELS = (1, 2, 3)


@dataclass(frozen=True)
class Spec:
    """A drawn template before its tests: what to ask, the reference code, and how to make test inputs."""

    signature: str
    """E.g. `sum_if(xs: list[int]) -> int`; the entry point is the part before `(`."""
    task: str
    """Completes "Write a Python function `...` that ..."."""
    body: tuple[str, ...]
    """Reference function body, one statement per line, without indentation."""
    reference: Callable
    """Computes the expected output from the arguments."""
    draw_args: Callable[[random.Random], tuple]
    """Draws one tuple of test arguments."""
    edges: tuple[tuple, ...] = ()
    """Argument tuples tested first: the boundaries an off-by-one solution gets wrong."""


# ---- building blocks shared by templates ------------------------------------------------------------------


def _signed(value: int) -> str:
    """`+ 3` or `- 3`, for code and for text."""
    return f"+ {value}" if value >= 0 else f"- {-value}"


def _plus_minus(value: int) -> str:
    return f"plus {value}" if value >= 0 else f"minus {-value}"


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    """A value in [-hi, -lo] or [lo, hi]."""
    return rng.randint(lo, hi) * rng.choice((1, -1))


def _condition(rng: random.Random) -> tuple[str, str, Callable[[int], bool], tuple[int, ...]]:
    """A predicate on `x`: (text, code, function, values next to its boundary)."""
    t, k = rng.randint(-30, 30), rng.randint(2, 9)
    kind = rng.randrange(8)
    if kind == 0:
        return f"greater than {t}", f"x > {t}", lambda x: x > t, (t - 1, t, t + 1)
    if kind == 1:
        return f"less than {t}", f"x < {t}", lambda x: x < t, (t - 1, t, t + 1)
    if kind == 2:
        return f"at least {t}", f"x >= {t}", lambda x: x >= t, (t - 1, t, t + 1)
    if kind == 3:
        return f"at most {t}", f"x <= {t}", lambda x: x <= t, (t - 1, t, t + 1)
    if kind == 4:
        return f"divisible by {k}", f"x % {k} == 0", lambda x: x % k == 0, (k, k + 1)
    if kind == 5:
        return f"not divisible by {k}", f"x % {k} != 0", lambda x: x % k != 0, (k, k + 1)
    if kind == 6:
        return "even", "x % 2 == 0", lambda x: x % 2 == 0, ()
    return "odd", "x % 2 == 1", lambda x: x % 2 == 1, ()


def _mapping(rng: random.Random) -> tuple[str, str, Callable[[int], int]]:
    """An integer map of `x`: (participle text, code, function)."""
    k = rng.randint(2, 12)
    kind = rng.randrange(4)
    if kind == 0:
        return f"multiplied by {k}", f"x * {k}", lambda x: x * k
    k = rng.randint(1, 20)
    if kind == 1:
        return f"increased by {k}", f"x + {k}", lambda x: x + k
    if kind == 2:
        return f"decreased by {k}", f"x - {k}", lambda x: x - k
    return "squared", "x * x", lambda x: x * x


def _int(rng: random.Random, near: tuple[int, ...] = ()) -> int:
    """A test integer, often one of `near` (values that tell a boundary apart)."""
    if near and rng.random() < 0.4:
        return rng.choice(near)
    return rng.randint(-50, 50)


def _int_list(near: tuple[int, ...] = ()) -> Callable[[random.Random], tuple]:
    def draw(rng: random.Random) -> tuple:
        values = [rng.choice(near) if near and rng.random() < 0.3 else rng.randint(-30, 30)]
        values += [rng.choice(near) if near and rng.random() < 0.3 else rng.randint(-30, 30)
                   for _ in range(rng.randint(0, 6))]
        return (values,)

    return draw


def _text(chars: str) -> Callable[[random.Random], tuple]:
    """Strings of 0-10 characters, most of them drawn from `chars` so targeted characters occur."""

    def draw(rng: random.Random) -> tuple:
        pool = chars + "".join(rng.sample(string.ascii_lowercase, 4))
        return ("".join(rng.choice(pool) for _ in range(rng.randint(0, 10))),)

    return draw


def _sentence(rng: random.Random) -> tuple:
    letters = "abcdefghilmnoprstu"
    words = ["".join(rng.choices(letters, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 6))]
    return (" ".join(words),)


def _near_list(near: tuple[int, ...]) -> tuple[tuple, ...]:
    """The edge case for a list predicate: one list holding the values around its boundary."""
    return ((list(near),),) if near else ()


def _preimage_list(fn: Callable[[int], int], near: tuple[int, ...]) -> tuple[tuple, ...]:
    """Edge case for "map, then test": the inputs in [-40, 40] whose images land closest to the boundary."""
    if not near:
        return ()
    closest = sorted(range(-40, 41), key=lambda x: (min(abs(fn(x) - v) for v in near), x))
    return ((closest[:3],),)


def _letters(rng: random.Random, n: int) -> list[str]:
    return rng.sample("abcdefghijklmnopqrstuvwxyz", n)


def _ordinal(n: int) -> str:
    return f"{n}nd" if n == 2 else f"{n}rd" if n == 3 else f"{n}th"  # n is 2..5


# ---- level 1: one expression over ints --------------------------------------------------------------------


def _scale_shift(rng: random.Random) -> Spec:
    a, b = _nonzero(rng, 2, 12), _nonzero(rng, 1, 40)
    return Spec(
        "scale_shift(x: int) -> int", f"returns x multiplied by {a}, {_plus_minus(b)}",
        (f"return x * {a} {_signed(b)}",), lambda x: x * a + b, lambda r: (_int(r),),
    )


def _in_range(rng: random.Random) -> Spec:
    lo = rng.randint(-40, 30)
    hi = lo + rng.randint(1, 40)
    return Spec(
        "in_range(x: int) -> bool", f"returns True if x is between {lo} and {hi} inclusive, otherwise False",
        (f"return {lo} <= x <= {hi}",), lambda x: lo <= x <= hi,
        lambda r: (_int(r, (lo - 1, lo, hi, hi + 1)),), ((lo - 1,), (lo,), (hi,), (hi + 1,)),
    )


def _has_remainder(rng: random.Random) -> Spec:
    k = rng.randint(2, 15)
    rem = rng.randrange(k)
    return Spec(
        "has_remainder(n: int) -> bool",
        f"returns True if n divided by {k} leaves remainder {rem}, otherwise False",
        (f"return n % {k} == {rem}",), lambda n: n % k == rem, lambda r: (_int(r, (rem, rem + k, rem + 1)),),
        ((rem,), (rem + 1,), (rem + k,)),
    )


def _clamp(rng: random.Random) -> Spec:
    lo = rng.randint(-40, 30)
    hi = lo + rng.randint(1, 40)
    return Spec(
        "clamp(x: int) -> int", f"returns x, but at least {lo} and at most {hi}",
        (f"return max({lo}, min({hi}, x))",), lambda x: max(lo, min(hi, x)),
        lambda r: (_int(r, (lo - 1, lo, hi, hi + 1)),), ((lo - 1,), (lo,), (hi,), (hi + 1,)),
    )


def _quadratic(rng: random.Random) -> Spec:
    b, c = _nonzero(rng, 1, 9), _nonzero(rng, 1, 30)
    return Spec(
        "quadratic(x: int) -> int", f"returns x squared, {_plus_minus(b)} times x, {_plus_minus(c)}",
        (f"return x * x {_signed(b)} * x {_signed(c)}",), lambda x: x * x + b * x + c, lambda r: (_int(r),),
    )


def _weighted_sum(rng: random.Random) -> Spec:
    p, q = rng.randint(2, 12), _nonzero(rng, 2, 12)
    return Spec(
        "weighted_sum(a: int, b: int) -> int", f"returns {p} times a, {_plus_minus(q)} times b",
        (f"return {p} * a {_signed(q)} * b",), lambda a, b: p * a + q * b, lambda r: (_int(r), _int(r)),
    )


def _scaled_distance(rng: random.Random) -> Spec:
    k = rng.randint(2, 12)
    return Spec(
        "scaled_distance(a: int, b: int) -> int", f"returns {k} times the absolute difference of a and b",
        (f"return {k} * abs(a - b)",), lambda a, b: k * abs(a - b), lambda r: (_int(r), _int(r)),
    )


# ---- level 2: one pass over a list or a string -------------------------------------------------------------


def _sum_if(rng: random.Random) -> Spec:
    text, code, pred, near = _condition(rng)
    return Spec(
        "sum_if(xs: list[int]) -> int", f"returns the sum of the elements of xs that are {text}",
        (f"return sum(x for x in xs if {code})",), lambda xs: sum(x for x in xs if pred(x)), _int_list(near),
        _near_list(near),
    )


def _count_if(rng: random.Random) -> Spec:
    text, code, pred, near = _condition(rng)
    return Spec(
        "count_if(xs: list[int]) -> int", f"returns how many elements of xs are {text}",
        (f"return sum(1 for x in xs if {code})",), lambda xs: sum(1 for x in xs if pred(x)), _int_list(near),
        _near_list(near),
    )


def _keep_if(rng: random.Random) -> Spec:
    text, code, pred, near = _condition(rng)
    return Spec(
        "keep_if(xs: list[int]) -> list[int]", f"returns the elements of xs that are {text}, in their order",
        (f"return [x for x in xs if {code}]",), lambda xs: [x for x in xs if pred(x)], _int_list(near),
        _near_list(near),
    )


def _any_if(rng: random.Random) -> Spec:
    text, code, pred, near = _condition(rng)
    return Spec(
        "any_if(xs: list[int]) -> bool", f"returns True if some element of xs is {text}, otherwise False",
        (f"return any({code} for x in xs)",), lambda xs: any(pred(x) for x in xs), _int_list(near),
        tuple(([a, b],) for a, b in zip(near, near[1:], strict=False)),
    )


def _first_index(rng: random.Random) -> Spec:
    text, code, pred, near = _condition(rng)
    return Spec(
        "first_index(xs: list[int]) -> int",
        f"returns the index of the first element of xs that is {text}, or -1 if there is none",
        (f"return next((i for i, x in enumerate(xs) if {code}), -1)",),
        lambda xs: next((i for i, x in enumerate(xs) if pred(x)), -1), _int_list(near),
        (([],), *_near_list(near)),
    )


def _map_each(rng: random.Random) -> Spec:
    text, code, fn = _mapping(rng)
    return Spec(
        "map_each(xs: list[int]) -> list[int]", f"returns a list of the elements of xs, each {text}",
        (f"return [{code} for x in xs]",), lambda xs: [fn(x) for x in xs], _int_list(),
    )


def _sum_each(rng: random.Random) -> Spec:
    text, code, fn = _mapping(rng)
    return Spec(
        "sum_each(xs: list[int]) -> int", f"returns the sum of the elements of xs, each {text}",
        (f"return sum({code} for x in xs)",), lambda xs: sum(fn(x) for x in xs), _int_list(),
    )


def _extreme_or(rng: random.Random) -> Spec:
    d = rng.randint(-10, 10)
    word, fn = rng.choice((("largest", max), ("smallest", min)))
    plain = _int_list()
    return Spec(
        f"{word}_or(xs: list[int]) -> int", f"returns the {word} element of xs, or {d} if xs is empty",
        (f"return {fn.__name__}(xs, default={d})",), lambda xs: fn(xs, default=d),
        lambda r: ([],) if r.random() < 0.3 else plain(r), (([],),),
    )


def _drop_char(rng: random.Random) -> Spec:
    (c,) = _letters(rng, 1)
    return Spec(
        "drop_char(s: str) -> str", f"returns s with every {c!r} removed",
        (f"return s.replace({c!r}, '')",), lambda s: s.replace(c, ""), _text(c * 3),
    )


def _swap_char(rng: random.Random) -> Spec:
    c1, c2 = _letters(rng, 2)
    return Spec(
        "swap_char(s: str) -> str", f"returns s with every {c1!r} replaced by {c2!r}",
        (f"return s.replace({c1!r}, {c2!r})",), lambda s: s.replace(c1, c2), _text(c1 * 3 + c2),
    )


def _count_char(rng: random.Random) -> Spec:
    (c,) = _letters(rng, 1)
    return Spec(
        "count_char(s: str) -> int", f"returns how many times {c!r} occurs in s",
        (f"return s.count({c!r})",), lambda s: s.count(c), _text(c * 3),
    )


def _every_kth(rng: random.Random) -> Spec:
    k = rng.randint(2, 5)
    return Spec(
        "every_kth(s: str) -> str", f"returns every {_ordinal(k)} character of s, starting with the first",
        (f"return s[::{k}]",), lambda s: s[::k], _text(""), (("".join(_letters(rng, 11)),),),
    )


def _repeat_join(rng: random.Random) -> Spec:
    k, sep = rng.randint(2, 5), rng.choice("-+|,:; ")
    return Spec(
        "repeat_join(s: str) -> str", f"returns {k} copies of s joined by {sep!r}",
        (f"return {sep!r}.join([s] * {k})",), lambda s: sep.join([s] * k), _text(""),
    )


# ---- level 3: two steps -----------------------------------------------------------------------------------


def _sum_mapped_if(rng: random.Random) -> Spec:
    ctext, ccode, pred, near = _condition(rng)
    mtext, mcode, fn = _mapping(rng)
    return Spec(
        "sum_mapped_if(xs: list[int]) -> int",
        f"returns the sum of the elements of xs that are {ctext}, each {mtext}",
        (f"kept = [x for x in xs if {ccode}]", f"return sum({mcode} for x in kept)"),
        lambda xs: sum(fn(x) for x in xs if pred(x)), _int_list(near), _near_list(near),
    )


def _map_then_keep(rng: random.Random) -> Spec:
    ctext, ccode, pred, near = _condition(rng)
    mtext, mcode, fn = _mapping(rng)
    return Spec(
        "map_then_keep(xs: list[int]) -> list[int]",
        f"takes each element of xs {mtext} and returns, in order, those results that are {ctext}",
        (f"mapped = [{mcode} for x in xs]", f"return [x for x in mapped if {ccode}]"),
        lambda xs: [y for y in map(fn, xs) if pred(y)], _int_list(), _preimage_list(fn, near),
    )


def _count_mapped_if(rng: random.Random) -> Spec:
    ctext, ccode, pred, near = _condition(rng)
    mtext, mcode, fn = _mapping(rng)
    return Spec(
        "count_mapped_if(xs: list[int]) -> int", f"returns how many elements of xs are {ctext} once {mtext}",
        (f"mapped = [{mcode} for x in xs]", f"return sum(1 for x in mapped if {ccode})"),
        lambda xs: sum(1 for y in map(fn, xs) if pred(y)), _int_list(), _preimage_list(fn, near),
    )


def _extreme_if(rng: random.Random) -> Spec:
    ctext, ccode, pred, near = _condition(rng)
    d = rng.randint(-10, 10)
    word, fn = rng.choice((("largest", max), ("smallest", min)))
    return Spec(
        f"{word}_if(xs: list[int]) -> int",
        f"returns the {word} element of xs that is {ctext}, or {d} if there is none",
        (f"kept = [x for x in xs if {ccode}]", f"return {fn.__name__}(kept, default={d})"),
        lambda xs: fn((x for x in xs if pred(x)), default=d), _int_list(near), (([],), *_near_list(near)),
    )


def _drop_reverse(rng: random.Random) -> Spec:
    (c,) = _letters(rng, 1)
    return Spec(
        "drop_reverse(s: str) -> str", f"removes every {c!r} from s and returns the result reversed",
        (f"kept = s.replace({c!r}, '')", "return kept[::-1]"), lambda s: s.replace(c, "")[::-1], _text(c * 3),
    )


def _swap_upper(rng: random.Random) -> Spec:
    c1, c2 = _letters(rng, 2)
    return Spec(
        "swap_upper(s: str) -> str",
        f"replaces every {c1!r} in s by {c2!r} and returns the result in upper case",
        (f"swapped = s.replace({c1!r}, {c2!r})", "return swapped.upper()"),
        lambda s: s.replace(c1, c2).upper(), _text(c1 * 3 + c2),
    )


def _count_words(rng: random.Random) -> Spec:
    n = rng.randint(1, 6)
    word, op, cmp = rng.choice((("more", ">", int.__gt__), ("fewer", "<", int.__lt__)))
    return Spec(
        f"count_{'long' if op == '>' else 'short'}_words(s: str) -> int",
        f"returns how many space-separated words of s have {word} than {n} letters",
        ("words = s.split()", f"return sum(1 for w in words if len(w) {op} {n})"),
        lambda s: sum(1 for w in s.split() if cmp(len(w), n)), _sentence,
    )


def _join_long_words(rng: random.Random) -> Spec:
    n, sep = rng.randint(1, 5), rng.choice("-+|,:; ")
    return Spec(
        "join_long_words(s: str) -> str",
        f"returns the space-separated words of s that have more than {n} letters, joined by {sep!r}",
        (f"words = [w for w in s.split() if len(w) > {n}]", f"return {sep!r}.join(words)"),
        lambda s: sep.join(w for w in s.split() if len(w) > n), _sentence,
    )


TEMPLATES: dict[int, tuple[Callable[[random.Random], Spec], ...]] = {
    1: (_scale_shift, _in_range, _has_remainder, _clamp, _quadratic, _weighted_sum, _scaled_distance),
    2: (_sum_if, _count_if, _keep_if, _any_if, _first_index, _map_each, _sum_each, _extreme_or, _drop_char,
        _swap_char, _count_char, _every_kth, _repeat_join),
    3: (_sum_mapped_if, _map_then_keep, _count_mapped_if, _extreme_if, _drop_reverse, _swap_upper,
        _count_words, _join_long_words),
}


def _draw_tests(spec: Spec, rng: random.Random) -> tuple[tuple[str, ...], int]:
    """3-5 asserts on distinct inputs, edges first; also returns how many distinct outputs they expect."""
    name = spec.signature.split("(")[0]
    n = max(rng.randint(3, 5), min(5, len(spec.edges) + 1))  # room for the edges and one random case
    edges = list(spec.edges)
    rng.shuffle(edges)
    cases: dict[str, object] = {}
    for i in range(20 * n):
        args = edges[i] if i < min(len(edges), n - 1) else spec.draw_args(rng)
        call = f"{name}({', '.join(repr(a) for a in args)})"
        cases.setdefault(call, spec.reference(*args))
        if len(cases) == n:
            break
    tests = tuple(f"assert {call} == {expected!r}" for call, expected in cases.items())
    return tests, len({repr(v) for v in cases.values()})


def make_problem(level: int, rng: random.Random) -> Problem:
    """Draws one code problem of the given level from `rng`."""
    while True:
        spec = rng.choice(TEMPLATES[level])(rng)
        tests, distinct_outputs = _draw_tests(spec, rng)
        if len(tests) >= 3 and distinct_outputs >= 2:  # otherwise a constant function would pass
            break
    code = "\n".join([f"def {spec.signature}:", *(f"    {line}" for line in spec.body)])
    return Problem(
        family="code",
        difficulty=level,
        prompt=f"Write a Python function `{spec.signature}` that {spec.task}.",
        solution=f"```python\n{code}\n```",
        answer=code,
        tests=tests,
        entry_point=spec.signature.split("(")[0],
    )
