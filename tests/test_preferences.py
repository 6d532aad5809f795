"""Synthetic preference pairs: chosen is the reference, rejected is really worse, and every kind is present."""

import random
from collections import Counter

from align.tasks import TaskDataConfig, build_splits, extract_boxed_answer
from align.tasks.preferences import SUBSETS, mutate_code, passes, preference_pairs, slip_arithmetic
from reward.verifiers import check_task

SMALL = TaskDataConfig(arithmetic_sft=300, code_sft=200, arithmetic_prompts=0, code_prompts=0, eval_per_level=4)


def test_pairs_prefer_the_reference_and_rejected_is_worse():
    splits = build_splits(SMALL, seed=0)
    problems = {p.id: p for p in splits["sft"]}
    pairs = preference_pairs(splits["sft"], seed=0)
    assert len(pairs) == len(splits["sft"])
    counts = Counter(pair["subset"] for pair in pairs)
    assert set(counts) == set(SUBSETS) and min(counts.values()) >= 50, counts
    for pair in pairs:
        problem = problems[pair["id"]]
        row = {"family": problem.family, "answer": problem.answer, "tests": list(problem.tests)}
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == problem.solution and rejected != chosen
        assert pair["prompt"] == [{"role": "user", "content": problem.prompt}]
        if pair["subset"] == "style-concise":  # both right, rejected only padded
            assert problem.solution in rejected and len(rejected) > len(chosen) + 40
        elif problem.family == "arithmetic":
            assert check_task(row, chosen).passed and not check_task(row, rejected).passed
            assert extract_boxed_answer(rejected) == rejected.splitlines()[-2].rsplit(" ", 1)[-1]  # consistent slip
        else:
            code = rejected.removeprefix("```python\n").removesuffix("\n```")
            assert passes(problem.answer, problem.tests) and not passes(code, problem.tests)


def test_same_seed_same_pairs_and_slips_are_small():
    problems = build_splits(SMALL, seed=1)["eval"]
    assert preference_pairs(problems, seed=3) == preference_pairs(problems, seed=3)
    rng = random.Random(0)
    solution = "47 + 38: 7+8=15, 4+3+1=8, so 85\nThe answer is \\boxed{85}."
    for _ in range(20):
        wrong = int(extract_boxed_answer(slip_arithmetic(solution, rng)))
        assert 1 <= abs(wrong - 85) <= 3


def test_mutant_that_fails_no_test_is_not_returned():
    code = "def f(x: int) -> int:\n    return x * 0"
    assert mutate_code(code, ("assert f(0) == 0",), random.Random(0)) is None  # x * 1..5 also gives f(0) == 0
    mutant = mutate_code(code, ("assert f(2) == 0",), random.Random(0))
    assert mutant is not None and not passes(mutant, ("assert f(2) == 0",))
