"""Rejection-sampled preference pairs, the report's offline-RL data (Qwen2.5 report, post-training stage 2): the SFT
model answers each checkable prompt k times, a verifier checks every answer, and answers that pass become chosen
ones, answers that fail rejected ones. Pure apart from reading files: sampling (vLLM) and checking (the verifiers)
are the caller's, so tests can plant responses and verdicts.

    prompts = read_prompt_rows(path)
    pairs, counts = build_pairs(prompts, samples, per_prompt=1, seed=0)   # samples[i]: k `Sample`s of prompts[i]

A prompt whose answers all pass or all fail teaches DPO nothing (no contrast) and yields no pair; it is counted. With
`per_prompt` > 1 a prompt yields up to that many distinct (chosen, rejected) combinations of distinct texts, chosen
so that each answer is reused as little as possible. Every pair row is in TRL's conversational format, which
`align.data.pairs.parse_pair` reads, with provenance: which samples, their verdicts and reasons.

Decontamination helpers: `eval_reference_rows` gives the held-out problems with their reference solutions (the
synthetic tasks regenerate them from the seed), and `content_tokens` the tokens of the messages' text without chat
markup, which is what the LCS rule should compare (see align.data.decontaminate).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from align.data.chat import DataError, check_messages
from align.tasks import FAMILIES, generate_problems, normalize_problem_text


@dataclass(frozen=True)
class Sample:
    """One sampled answer to a prompt and the verifier's verdict on it."""

    text: str
    passed: bool
    reason: str
    finish_reason: str = ""
    """vLLM's: "stop" (end of turn) or "length" (cut at max_tokens)."""


@dataclass
class LevelCounts:
    """What happened to the prompts of one (family, difficulty)."""

    prompts: int = 0
    all_pass: int = 0
    """Prompts whose samples all passed: no rejected answer, no pair."""
    all_fail: int = 0
    """Prompts whose samples all failed: no chosen answer, no pair."""
    pairs: int = 0
    samples: int = 0
    passed: int = 0
    """Samples that passed (the pass rate of the sampling policy is passed / samples)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class PairCounts:
    """Counts per (family, difficulty), and of pairs dropped afterwards (decontamination), by the same keys."""

    levels: dict[tuple[str, int], LevelCounts] = field(default_factory=lambda: defaultdict(LevelCounts))

    def total(self) -> LevelCounts:
        total = LevelCounts()
        for counts in self.levels.values():
            for key, value in vars(counts).items():
                setattr(total, key, getattr(total, key) + value)
        return total

    def to_dict(self) -> dict:
        return {"by_level": {f"{family}/{level}": c.to_dict() for (family, level), c in sorted(self.levels.items())},
                "total": self.total().to_dict()}


def read_prompt_rows(path: str | Path) -> list[dict]:
    """Prompt rows (align.tasks' prompts.jsonl format) from JSONL, checked: `id`, `family` (one the verifiers know),
    `difficulty`, `prompt` (a message list ending with a user turn) and what the family's verifier needs.

    Raises:
        DataError: `"{path}: row {i}: field '{field}': {problem}"`, or naming the file when it is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for index, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: row {index}: not JSON ({error.msg})") from error
        rows.append(check_prompt_row(row, str(path), index))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def check_prompt_row(row, source: str, index: int) -> dict:
    """One prompt row, checked (see `read_prompt_rows`); returns it unchanged."""

    def fail(name: str, problem: str) -> DataError:
        return DataError(f"{source}: row {index}: field '{name}': {problem}")

    if not isinstance(row, Mapping):
        raise DataError(f"{source}: row {index}: expected an object, got {type(row).__name__}")
    for name, kind in (("id", str), ("family", str), ("difficulty", int)):
        if row.get(name) is None:
            raise fail(name, "missing")
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            raise fail(name, f"expected {kind.__name__}, got {type(row[name]).__name__}")
    if row["family"] not in FAMILIES:
        raise fail("family", f"{row['family']!r} has no verifier; known: {', '.join(sorted(FAMILIES))}")
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise fail("prompt", "missing" if prompt is None else "expected a non-empty list of messages")
    check_messages(prompt, "prompt", fail)
    if prompt[-1]["role"] != "user":
        raise fail("prompt", f"must end with a user turn, ends with {prompt[-1]['role']!r}")
    if row["family"] == "arithmetic" and not isinstance(row.get("answer"), str):
        raise fail("answer", "missing" if row.get("answer") is None else "expected a string")
    if row["family"] == "code":
        tests = row.get("tests")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise fail("tests", "missing" if tests is None else "expected a non-empty list of strings")
    return dict(row)


def _distinct(indices: Sequence[int], samples: Sequence[Sample]) -> list[int]:
    """The first sample index of each distinct text."""
    seen: dict[str, int] = {}
    for i in indices:
        seen.setdefault(samples[i].text, i)
    return list(seen.values())


def select_pairs(passed: Sequence[int], failed: Sequence[int], limit: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up to `limit` distinct (chosen, rejected) index combinations, each new one reusing its chosen and rejected
    answers as little as possible (the first min(|passed|, |failed|) share no answer); ties broken by `rng`."""
    passed, failed = list(passed), list(failed)
    rng.shuffle(passed)
    rng.shuffle(failed)
    uses_chosen, uses_rejected = dict.fromkeys(passed, 0), dict.fromkeys(failed, 0)
    remaining = [(c, r) for c in passed for r in failed]
    picked: list[tuple[int, int]] = []
    while remaining and len(picked) < limit:
        best = min(remaining, key=lambda cr: uses_chosen[cr[0]] + uses_rejected[cr[1]])  # first of the ties
        remaining.remove(best)
        picked.append(best)
        uses_chosen[best[0]] += 1
        uses_rejected[best[1]] += 1
    return picked


def _verdict(sample: Sample, index: int) -> dict:
    return {"sample": index, "passed": sample.passed, "reason": sample.reason, "finish_reason": sample.finish_reason}


def pairs_for_prompt(row: Mapping, samples: Sequence[Sample], per_prompt: int, seed: int) -> list[dict]:
    """The pair rows one prompt gives (none when its samples all pass or all fail).

    Each row: `prompt` (messages), `chosen` / `rejected` (one assistant message each), `subset` (the family, as
    RewardBench names sections), the prompt row's `id`, `family`, `difficulty`, `answer`, `tests`, `entry_point`
    (so a verifier can re-check the pair), and `provenance`: the sample indices, verdicts and reasons of both
    answers, and how many of the k samples passed.
    """
    if per_prompt < 1:
        raise ValueError(f"per_prompt={per_prompt} must be >= 1")
    passed = _distinct([i for i, s in enumerate(samples) if s.passed], samples)
    failed = _distinct([i for i, s in enumerate(samples) if not s.passed], samples)
    rng = random.Random(f"{seed}:{row['id']}")  # per prompt: the choice does not depend on the prompts' order
    rows = []
    for c, r in select_pairs(passed, failed, per_prompt, rng):
        rows.append({
            "id": row["id"], "family": row["family"], "difficulty": row["difficulty"], "subset": row["family"],
            "prompt": [dict(m) for m in row["prompt"]],
            "chosen": [{"role": "assistant", "content": samples[c].text}],
            "rejected": [{"role": "assistant", "content": samples[r].text}],
            "answer": row.get("answer", ""), "tests": list(row.get("tests") or []),
            "entry_point": row.get("entry_point", ""),
            "provenance": {"samples": len(samples), "passed": sum(s.passed for s in samples),
                           "chosen": _verdict(samples[c], c), "rejected": _verdict(samples[r], r)},
        })
    return rows


def build_pairs(
    rows: Sequence[Mapping], samples: Sequence[Sequence[Sample]], per_prompt: int = 1, seed: int = 0
) -> tuple[list[dict], PairCounts]:
    """Pair rows for every prompt (in prompt order) and the counts per (family, difficulty).

    Args:
        rows: prompt rows (see `read_prompt_rows`).
        samples: samples[i] are the k checked answers to rows[i].
        per_prompt: most pairs per prompt (distinct chosen/rejected combinations).
        seed: which combinations are picked, per prompt.
    """
    if len(rows) != len(samples):
        raise ValueError(f"{len(rows)} prompt rows but samples for {len(samples)}")
    pairs, counts = [], PairCounts()
    for row, answers in zip(rows, samples, strict=True):
        level = counts.levels[(row["family"], row["difficulty"])]
        level.prompts += 1
        level.samples += len(answers)
        level.passed += sum(a.passed for a in answers)
        if all(a.passed for a in answers):
            level.all_pass += 1
        elif not any(a.passed for a in answers):
            level.all_fail += 1
        made = pairs_for_prompt(row, answers, per_prompt, seed)
        level.pairs += len(made)
        pairs += made
    return pairs, counts


def format_counts_table(counts: PairCounts, dropped: Mapping[tuple[str, int], int] | None = None) -> str:
    """Markdown: per (family, difficulty) the prompts, the pass rate of the samples, all-pass and all-fail prompts,
    pairs made, pairs dropped by decontamination (`dropped`, by the same keys) and kept."""
    dropped = dropped or {}
    lines = ["| family | difficulty | prompts | pass rate | all pass | all fail | pairs | dropped | kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def line(name: str, level: str, c: LevelCounts, drop: int) -> str:
        rate = f"{c.passed / c.samples:.0%}" if c.samples else "-"
        return (f"| {name} | {level} | {c.prompts} | {rate} | {c.all_pass} | {c.all_fail} | {c.pairs} | {drop} | "
                f"{c.pairs - drop} |")

    for (family, level), c in sorted(counts.levels.items()):
        lines.append(line(family, str(level), c, dropped.get((family, level), 0)))
    lines.append(line("all", "", counts.total(), sum(dropped.values())))
    return "\n".join(lines)


def eval_reference_rows(eval_rows: Sequence[Mapping], seed: int, source: str = "eval rows") -> list[dict]:
    """Chat rows (`messages`: the prompt, then the reference solution) for held-out problems, e.g. to decontaminate
    against or to score a model's likelihood of reference answers.

    Rows of the synthetic tasks (align.tasks' eval.jsonl) carry no solution: it is regenerated from the tasks'
    seeded problem stream and matched by `id`. Other rows need a `solution` string, or are chat rows with
    `messages` already.

    Raises:
        DataError: naming the row whose solution is neither in the row nor regenerated with `seed`.
    """
    wanted: dict[tuple[str, int], int] = defaultdict(int)
    for row in eval_rows:
        if "messages" not in row and row.get("family") in FAMILIES:
            wanted[(row["family"], row["difficulty"])] += 1
    solutions = {}
    for (family, level), count in wanted.items():  # eval is each stream's first problems (align.tasks.data)
        solutions.update({p.id: p.solution for p in generate_problems(family, level, count, seed)})
    references = []
    for index, row in enumerate(eval_rows):
        if "messages" in row:
            references.append(dict(row))
            continue
        solution = row.get("solution") or solutions.get(row.get("id"))
        if not isinstance(solution, str):
            raise DataError(f"{source}: row {index}: field 'id': {row.get('id')!r} is not a synthetic task problem "
                            f"of seed {seed}, and the row has no 'solution' string")
        references.append({"id": row.get("id"), "family": row.get("family"), "difficulty": row.get("difficulty"),
                           "messages": [*row["prompt"], {"role": "assistant", "content": solution}]})
    return references


def content_tokens(messages: Sequence[Mapping], tokenizer) -> list[int]:
    """Token ids of the messages' contents, each tokenized alone and laid end to end: the text, not the chat markup
    every conversation shares (which would count towards any LCS)."""
    return [t for m in messages for t in tokenizer(m["content"], add_special_tokens=False)["input_ids"]]


def prompt_key(messages: Sequence[Mapping]) -> str:
    """The last user message, normalized as align.tasks keeps its splits disjoint (same key: same problem)."""
    return normalize_problem_text(next(m["content"] for m in reversed(messages) if m["role"] == "user"))
