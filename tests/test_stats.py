"""The paired comparison behind the report's stage effects: the exact McNemar test by hand, against an
enumeration of every outcome, and the counting of gained and lost problems."""

import itertools

import pytest

from align.stats import format_p_value, mcnemar_exact_p, paired_change


def test_mcnemar_by_hand():
    """5 gained, 0 lost: 2 * (1/2)^5 = 0.0625. 9 and 1: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024. 3 and 3: the
    doubled tail 2 * (1 + 6 + 15 + 20) / 64 is over 1, capped. Nothing changed: 1."""
    assert mcnemar_exact_p(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact_p(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact_p(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def enumerated_p(gained: int, lost: int) -> float:
    """Reference: the share of all 2^n equally likely gain/loss outcomes of the n discordant problems whose
    imbalance |gained - lost| is at least the observed one."""
    n = gained + lost
    observed = abs(gained - lost)
    outcomes = list(itertools.product((0, 1), repeat=n))
    return sum(abs(2 * sum(o) - n) >= observed for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("gained,lost", [(a, b) for a in range(8) for b in range(8) if a + b <= 12])
def test_mcnemar_equals_enumeration(gained, lost):
    assert mcnemar_exact_p(gained, lost) == pytest.approx(enumerated_p(gained, lost), abs=1e-12)


def test_paired_change_counts():
    before = [True, True, False, False, True, False]
    after = [True, False, True, True, True, False]
    change = paired_change(before, after)
    assert (change.problems, change.solved_before, change.solved_after) == (6, 3, 4)
    assert (change.gained, change.lost) == (2, 1)
    assert change.p_value == mcnemar_exact_p(2, 1) == 1.0
    with pytest.raises(ValueError, match="not the same problems"):
        paired_change([True], [True, False])


def test_paired_change_of_right_answer_counts_is_the_sign_test():
    # Right answers out of 8 per problem: 3 problems up, 1 down, 2 unchanged.
    before = [0, 3, 8, 2, 5, 1]
    after = [2, 3, 8, 6, 4, 4]
    change = paired_change(before, after)
    assert (change.problems, change.solved_before, change.solved_after) == (6, 19, 27)
    assert (change.gained, change.lost) == (3, 1)
    # Sign test by hand: 4 changed, 1 the rarer way: 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16.
    assert change.p_value == pytest.approx(10 / 16)
    # Verdicts are the one-answer case: booleans and 0/1 counts agree.
    flags = [True, False, True, False]
    assert paired_change(flags, flags[::-1]) == paired_change([1, 0, 1, 0], [0, 1, 0, 1])


def test_format_p_value_rounds_to_three_places_and_floors_at_one_in_a_thousand():
    assert format_p_value(0.05312) == "0.053"
    assert format_p_value(1.0) == "1.000"
    assert format_p_value(0.001) == "0.001"
    assert format_p_value(0.00099) == "<0.001"
