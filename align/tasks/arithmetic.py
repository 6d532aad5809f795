"""Integer arithmetic expressions with worked, step-by-step solutions.

Levels, each measurably harder than the one before (operands / operators / parentheses / largest operand):
  1. `a ± b`                               2 operands, 1-2 digits
  2. `a ± b ± c`                           3 operands, 1-2 digits
  3. one 2-digit by 1-digit product, ± c   3 operands, with `*`
  4. a parenthesised sum times a factor    4 operands, with `*` and parentheses
  5. five operands, parentheses and a 3-digit by 1-digit product

The solution has one line per binary operation in evaluation order (`48 * 2 = 96`), then
`The answer is \\boxed{N}.` Negative intermediate results are allowed.
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


def solve(expr: Expr, steps: list[str]) -> int:
    """Evaluates `expr` bottom-up, left to right, appending one `a op b = c` line per operation."""
    if isinstance(expr, int):
        return expr
    op, left, right = expr
    a, b = solve(left, steps), solve(right, steps)
    value = APPLY[op](a, b)
    right_text = f"({b})" if b < 0 else str(b)
    steps.append(f"{a} {op} {right_text} = {value}")
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
