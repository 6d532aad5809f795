"""Held-out accuracy per task family and difficulty, with greedy decoding by vLLM and the rule-based verifiers.

    report = evaluate_checkpoint(model_dir, eval_rows)
    reports = evaluate_checkpoints({"SFT": sft_dir, "DPO": dpo_dir}, eval_rows)   # one vLLM child for both
    print(format_accuracy_table({"before": before, "after": report}))
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from align.tokenizer import load_tokenizer
from reward.verifiers import check_task
from rollout.offline import SamplingSpec, generate_many


@dataclass(frozen=True)
class EvalReport:
    """Per-(family, difficulty) counts of held-out problems and of correct greedy answers."""

    correct: dict[str, dict[int, int]]
    total: dict[str, dict[int, int]]
    samples: list[dict]  # a few (prompt, response, verdict) examples for the record
    passed: list[bool]  # per eval row, in the order given: what align.stats.paired_change compares

    def accuracy(self, family: str, difficulty: int) -> float:
        return self.correct[family][difficulty] / self.total[family][difficulty]

    @property
    def overall(self) -> float:
        return sum(c for f in self.correct.values() for c in f.values()) / sum(
            n for f in self.total.values() for n in f.values())

    def to_dict(self) -> dict:
        return {"overall": self.overall, "accuracy": {
            family: {str(d): self.accuracy(family, d) for d in sorted(levels)}
            for family, levels in self.total.items()}, "correct": self.correct, "total": self.total,
            "passed": self.passed}


def read_eval_rows(eval_file: str | Path, per_level: int | None = None) -> list[dict]:
    """Eval rows (see align.tasks), keeping at most `per_level` per (family, difficulty)."""
    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines() if line.strip()]
    if per_level is None:
        return rows
    kept, seen = [], defaultdict(int)
    for row in rows:
        key = (row["family"], row["difficulty"])
        if seen[key] < per_level:
            seen[key] += 1
            kept.append(row)
    return kept


def evaluate_checkpoint(model_dir: str | Path, eval_rows: list[dict], max_new_tokens: int = 256) -> EvalReport:
    """Greedy-decode every eval prompt with vLLM and check the answers."""
    return evaluate_checkpoints({"model": model_dir}, eval_rows, max_new_tokens)["model"]


def evaluate_checkpoints(model_dirs: dict[str, str | Path], eval_rows: list[dict],
                         max_new_tokens: int = 256) -> dict[str, EvalReport]:
    """`evaluate_checkpoint` for several models by name, generated in one vLLM child process."""
    jobs = []
    for model_dir in model_dirs.values():
        tokenizer = load_tokenizer(model_dir)
        jobs.append((model_dir, [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                                 for r in eval_rows]))
    completions = generate_many(jobs, SamplingSpec(n=1, temperature=0.0, max_tokens=max_new_tokens))
    return {name: _score(eval_rows, [c[0].text for c in per_model])
            for name, per_model in zip(model_dirs, completions, strict=True)}


def _score(eval_rows: list[dict], responses: list[str]) -> EvalReport:
    with ThreadPoolExecutor(max_workers=2) as pool:  # code checks wait on child processes
        verdicts = list(pool.map(check_task, eval_rows, responses))
    correct: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    total: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for row, verdict in zip(eval_rows, verdicts, strict=True):
        total[row["family"]][row["difficulty"]] += 1
        correct[row["family"]][row["difficulty"]] += int(verdict.passed)
    samples = [{"prompt": r["prompt"][-1]["content"], "response": text, "passed": v.passed, "reason": v.reason}
               for r, text, v in list(zip(eval_rows, responses, verdicts, strict=True))[:: max(len(eval_rows) // 8, 1)]]
    as_plain = lambda nested: {f: dict(sorted(levels.items())) for f, levels in sorted(nested.items())}  # noqa: E731
    return EvalReport(as_plain(correct), as_plain(total), samples, [v.passed for v in verdicts])


def format_accuracy_table(reports: dict[str, EvalReport]) -> str:
    """A Markdown table: one row per (family, difficulty), one accuracy column per report (e.g. before/after)."""
    names = list(reports)
    first = reports[names[0]]
    lines = ["| family | difficulty | n | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for family, levels in first.total.items():
        for difficulty, n in levels.items():
            cells = [f"{reports[name].accuracy(family, difficulty):.0%}" for name in names]
            lines.append(f"| {family} | {difficulty} | {n} | " + " | ".join(cells) + " |")
    overall = [f"{reports[name].overall:.0%}" for name in names]
    count = sum(n for levels in first.total.values() for n in levels.values())
    lines.append(f"| all | | {count} | " + " | ".join(overall) + " |")
    return "\n".join(lines)
