"""What a stage changed on the same held-out problems, and whether it is more than chance.

Two models answer the same problems; a problem one solves and the other does not is a discordant pair. Under the
null hypothesis that the stage changes nothing but noise, each discordant problem is as likely to be gained as lost,
so the number gained is Binomial(gained + lost, 1/2): the exact McNemar test (McNemar 1947; the exact form avoids
the chi-square approximation, which is poor for the few discordant problems a stage leaves here). Problems both
solve, or neither, say nothing about the difference and do not enter the test.

With several sampled answers per problem the same test applies to each problem's count of right answers: a problem
whose count rose is gained, one whose count fell is lost, and under the null each is as likely as the other (the
sign test, of which McNemar's is the one-answer case). Problems whose count did not change do not enter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedChange:
    """Two models on the same problems: how many right answers each gave, and the problems that changed."""

    problems: int
    """Problems both were evaluated on."""
    solved_before: int
    """Right answers of the first model (with one answer per problem: problems it solved)."""
    solved_after: int
    """Right answers of the second model."""
    gained: int
    """Problems the second model answered right more often (one answer each: solved by it only)."""
    lost: int
    """Problems the second model answered right less often (one answer each: solved by the first only)."""
    p_value: float
    """Two-sided exact McNemar (sign test) p-value, mcnemar_exact_p: 1.0 when no problem changed."""


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 * P(X <= min(gained, lost))), X ~ Binomial(gained + lost, 1/2).

    Example: 5 gained, 0 lost: 2 * (1/2)^5 = 0.0625 (not significant at 5%, though every change went one way);
    9 gained, 1 lost: 2 * (1 + 10) / 2^10 = 0.0215.
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got gained={gained}, lost={lost}")
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def paired_change(before: Sequence[int], after: Sequence[int]) -> PairedChange:
    """Compare two models on the same problems, in the same order: per problem a verdict (bool) or a count of right
    answers out of the same number sampled by each."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} verdicts before but {len(after)} after (not the same problems)")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a > b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if a < b)
    return PairedChange(len(before), int(sum(before)), int(sum(after)), gained, lost, mcnemar_exact_p(gained, lost))


def format_p_value(p: float) -> str:
    """A p-value as a table cell: three decimals, or "<0.001" below that (more digits would claim false precision)."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


__all__ = ["PairedChange", "format_p_value", "mcnemar_exact_p", "paired_change"]
