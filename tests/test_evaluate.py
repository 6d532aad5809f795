"""Held-out scoring keeps each problem's verdict in order, which the report's paired stage comparison needs."""

from align.evaluate import _score


def test_score_keeps_per_problem_verdicts_in_order():
    rows = [{"family": "arithmetic", "difficulty": level, "answer": answer,
             "prompt": [{"role": "user", "content": f"What is {answer}?"}]}
            for level, answer in ((1, "5"), (1, "7"), (2, "-3"))]
    report = _score(rows, ["The answer is \\boxed{5}.", "The answer is \\boxed{8}.", "The answer is \\boxed{-3}."])
    assert report.passed == [True, False, True]
    assert report.correct == {"arithmetic": {1: 1, 2: 1}} and report.total == {"arithmetic": {1: 2, 2: 1}}
    assert report.to_dict()["passed"] == [True, False, True]
