"""Integer arithmetic expressions with worked, step-by-step solutions.

Levels, each measurably harder than the one before (operands / operators / parentheses / largest operand):
  1. `a ± b`                               2 operands, 1-2 digits
  2. `a ± b ± c`                           3 operands, 1-2 digits
  3. one 2-digit by 1-digit product, ± c   3 operands, with `*`
  4. a parenthesised sum times a factor    4 operands, with `*` and parentheses
  5. five operands, parentheses and a 3-digit by 1-digit product

The solution has one line per binary operation in evaluation order, worked at the digit level, units first,
then `The answer is \\boxed{N}.` Negative intermediate results are allowed:

    56 - 78: 78 - 56: 8-6=2, 7-5=2, so -22
    -22 + 98: 98 - 22: 8-2=6, 9-2=7, so 76

Why digits: a ~3M-parameter model trained for minutes does not learn to add two-digit numbers in one step (the
units digit of `a + b` stayed at chance after thousands of steps), but it does learn the one-digit table when
each column's two digits sit right before its `=`, and it copies digits reliably.
"""

import random

from align.tasks.problem import Problem

LEVELS = (1, 2, 3, 4, 5)
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# An expression is an int or a tuple (op, left, right).
Expr = int | tuple


def _pm(rng: random.Random) -> str:
    return rng.choice("+-")


def _level1(rng: random.Random) -> Expr:
    return (_pm(rng), rng.randint(1, 99), rng.randint(1, 99))


def _level2(rng: random.Random) -> Expr:
    return (_pm(rng), (_pm(rng), rng.randint(1, 99), rng.randint(1, 99)), rng.randint(1, 99))


def _level3(rng: random.Random) -> Expr:
    product = ("*", rng.randint(10, 99), rng.randint(2, 9))
    if rng.random() < 0.5:
        product = ("*", product[2], product[1])
    other = rng.randint(1, 99)
    return (_pm(rng), product, other) if rng.random() < 0.5 else (_pm(rng), other, product)


def _level4(rng: random.Random) -> Expr:
    def inner() -> Expr:
        return (_pm(rng), rng.randint(1, 50), rng.randint(1, 50))

    factor, addend = rng.randint(2, 9), rng.randint(1, 99)
    form = rng.randrange(4)
    if form == 0:  # (a ± b) * c ± d
        return (_pm(rng), ("*", inner(), factor), addend)
    if form == 1:  # a * (b ± c) ± d
        return (_pm(rng), ("*", factor, inner()), addend)
    if form == 2:  # d ± c * (a ± b)
        return (_pm(rng), addend, ("*", factor, inner()))
    return ("*", inner(), inner())  # (a ± b) * (c ± d)


def _level5(rng: random.Random) -> Expr:
    big = ("*", rng.randint(100, 999), rng.randint(2, 9))
    if rng.random() < 0.5:
        big = ("*", big[2], big[1])
    inner = (_pm(rng), rng.randint(1, 50), rng.randint(1, 50))
    form = rng.randrange(3)
    if form == 0:  # (a ± b) * c ± big
        return (_pm(rng), ("*", inner, rng.randint(2, 9)), big)
    if form == 1:  # big ± c * (a ± b)
        return (_pm(rng), big, ("*", rng.randint(2, 9), inner))
    return (_pm(rng), (_pm(rng), big, inner), rng.randint(1, 99))  # big ± (a ± b) ± c


GENERATORS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def render(expr: Expr) -> str:
    """Writes `expr` with only the parentheses needed to keep its tree (operators are left-associative)."""
    if isinstance(expr, int):
        return str(expr)
    op, left, right = expr
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and PRECEDENCE[right[0]] <= PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_columns(x: int, y: int) -> list[str]:
    """Column addition of x, y >= 0, units first: `7 + 8 = 15`, then `4 + 3 + 1 = 8` (carry added)."""
    xs, ys = _digits(x), _digits(y)
    width = max(len(xs), len(ys))
    xs, ys = xs + [0] * (width - len(xs)), ys + [0] * (width - len(ys))
    columns, carry = [], 0
    for a, b in zip(xs, ys, strict=True):
        total = a + b + carry
        columns.append(f"{a}+{b}+{carry}={total}" if carry else f"{a}+{b}={total}")
        carry = total // 10
    return columns


def _subtract_columns(x: int, y: int) -> list[str]:
    """Column subtraction of x >= y >= 0, units first; a column that borrows shows its digit plus 10
    (`13 - 7 = 6`), and the next column subtracts the borrow (`8 - 4 - 1 = 3`)."""
    xs, ys = _digits(x), _digits(y)
    ys += [0] * (len(xs) - len(ys))
    columns, borrow = [], 0
    for a, b in zip(xs, ys, strict=True):
        top = a + 10 if a - borrow < b else a
        difference = top - b - borrow
        columns.append(f"{top}-{b}-{borrow}={difference}" if borrow else f"{top}-{b}={difference}")
        borrow = int(top > a)
    return columns


def _multiply_columns(x: int, digit: int) -> list[str]:
    """x >= 0 times one digit, units first: `8 * 7 = 56`, then `4 * 7 + 5 = 33` (carry added)."""
    columns, carry = [], 0
    for a in _digits(x):
        product = a * digit + carry
        columns.append(f"{a}*{digit}+{carry}={product}" if carry else f"{a}*{digit}={product}")
        carry = product // 10
    return columns


def _work(a: int, op: str, b: int) -> str:
    """The digit-level working of `a op b` on magnitudes, so each step's digits sit next to it.

    Sums and differences of signed numbers become one unsigned column addition or subtraction (larger
    magnitude first, written out when it is not `a op b` itself); products by one digit go column by column;
    products of two multi-digit numbers are written whole.
    """
    if op == "*":
        x, y = abs(a), abs(b)
        if y >= 10 and x < 10:
            x, y = y, x
        if y >= 10:
            return ""
        columns, plain = _multiply_columns(x, y), (x, y) == (a, b)
        head = "" if plain else f"{x} * {y}: "
        return head + ", ".join(columns)
    signed_b = b if op == "+" else -b
    x, y = abs(a), abs(signed_b)
    if (a >= 0) == (signed_b >= 0):
        unsigned, columns = f"{x} + {y}", _add_columns(x, y)
    else:
        x, y = max(x, y), min(x, y)
        unsigned, columns = f"{x} - {y}", _subtract_columns(x, y)
    plain = unsigned == f"{a} {op} {b}"
    return ("" if plain else f"{unsigned}: ") + ", ".join(columns)


def solve(expr: Expr, steps: list[str]) -> int:
    """Evaluates `expr` bottom-up, left to right, appending one line per operation:
    `47 + 38: 7 + 8 = 15, 4 + 3 + 1 = 8, so 85`."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = solve(left, steps), solve(right, steps)
    value = APPLY[op](a, b)
    right_text = f"({b})" if b < 0 else str(b)
    work = _work(a, op, b)
    steps.append(f"{a} {op} {right_text}: {work}, so {value}" if work else f"{a} {op} {right_text} = {value}")
    return value


def make_problem(level: int, rng: random.Random) -> Problem:
    """Draws one arithmetic problem of the given level from `rng`."""
    expr = GENERATORS[level](rng)
    steps: list[str] = []
    value = solve(expr, steps)
    solution = "\n".join([*steps, f"The answer is \\boxed{{{value}}}."])
    return Problem(
        family="arithmetic",
        difficulty=level,
        prompt=f"What is {render(expr)}?",
        solution=solution,
        answer=str(value),
    )
