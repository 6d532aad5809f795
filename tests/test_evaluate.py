"""Held-out scoring keeps each problem's verdict (or count of right answers) in order, which the report's paired
stage comparison needs."""

import pytest

from align.evaluate import EvalSuite, _score, evaluate_suites, read_eval_rows, sampled_spec
from align.tasks import TaskDataConfig, select_levels
from align.tiny import build_tiny
from reward.verifiers import check_task
from rollout.offline import SamplingSpec, generate_batches

ROWS = [{"family": "arithmetic", "difficulty": level, "answer": answer,
         "prompt": [{"role": "user", "content": f"What is {answer}?"}]}
        for level, answer in ((1, "5"), (1, "7"), (2, "-3"))]


def boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def test_score_keeps_per_problem_verdicts_in_order():
    report = _score(ROWS, [[boxed("5")], [boxed("8")], [boxed("-3")]])
    assert report.passed == [True, False, True]
    assert report.correct == {"arithmetic": {1: 1, 2: 1}} and report.total == {"arithmetic": {1: 2, 2: 1}}
    assert report.to_dict()["passed"] == [True, False, True]
    assert (report.answers_per_problem, report.temperature) == (1, 0.0)


def test_sampled_score_counts_right_answers_per_problem():
    answers = [[boxed("5"), boxed("5"), boxed("6")], [boxed("8"), boxed("1"), "no answer"],
               [boxed("-3"), boxed("3"), boxed("-3")]]
    report = _score(ROWS, answers, sampled_spec(3, 1.0))
    assert report.passed == [2, 0, 2]
    # Accuracy is over answers: level 1 has 2 of 6 right, level 2 2 of 3.
    assert report.correct == {"arithmetic": {1: 2, 2: 2}} and report.total == {"arithmetic": {1: 6, 2: 3}}
    assert report.accuracy("arithmetic", 1) == 2 / 6 and report.overall == 4 / 9
    assert report.to_dict()["answers_per_problem"] == 3 and report.to_dict()["temperature"] == 1.0


def test_each_distinct_answer_to_a_problem_is_checked_once(monkeypatch):
    import align.evaluate
    checked = []
    def counting_check(row, text):
        checked.append((row["answer"], text))
        return check_task(row, text)
    monkeypatch.setattr(align.evaluate, "check_task", counting_check)
    # The same text under two problems is two checks: whether it is right depends on the problem.
    answers = [[boxed("5"), boxed("5"), boxed("6"), boxed("5")], [boxed("5"), boxed("7"), boxed("7"), boxed("5")],
               [boxed("-3")] * 4]
    report = _score(ROWS, answers, sampled_spec(4, 1.0))
    assert sorted(checked) == sorted([("5", boxed("5")), ("5", boxed("6")), ("7", boxed("5")), ("7", boxed("7")),
                                      ("-3", boxed("-3"))])
    assert report.passed == [3, 2, 4]
    assert report.correct == {"arithmetic": {1: 5, 2: 4}} and report.total == {"arithmetic": {1: 8, 2: 4}}


@pytest.mark.slow
def test_greedy_and_sampled_suites_in_one_vllm_child(tmp_path):
    """Real vLLM on a random tiny model: each suite gets its own sampling, every answer is checked."""
    tasks = TaskDataConfig(arithmetic_sft=4, code_sft=2, arithmetic_prompts=2, code_prompts=2, eval_per_level=2)
    model = build_tiny(tmp_path / "tiny", seed=0, tasks=tasks)
    rows = read_eval_rows(model / "data" / "eval.jsonl")
    hard = select_levels(rows, ("arithmetic:3",), "eval")
    greedy, sampled = evaluate_suites({"a": model, "b": model}, [
        EvalSuite(rows, SamplingSpec(n=1, temperature=0.0, max_tokens=16)), EvalSuite(hard, sampled_spec(4, 1.0, 16))])
    assert greedy["a"].passed == greedy["b"].passed and len(greedy["a"].passed) == len(rows)
    assert sum(sum(levels.values()) for levels in greedy["a"].total.values()) == len(rows)
    assert sampled["a"].total == {"arithmetic": {3: 4 * len(hard)}} and len(sampled["a"].passed) == len(hard)
    assert sampled["a"].answers_per_problem == 4 and sampled["a"].temperature == 1.0
    # Greedy decoding is deterministic; four samples at T 1 from a random model are not all one text.
    (texts,) = [[c.text for c in per_prompt] for per_prompt in
                generate_batches([(model, [(["hello"], sampled_spec(4, 1.0, 16))])])[0][0]]
    assert len(texts) == 4 and len(set(texts)) > 1
