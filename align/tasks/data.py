"""Problem pools, disjoint splits and their JSONL files.

For every (family, level) one seeded stream of distinct problems (distinct by normalized prompt) is cut in
order into eval, then RL prompts, then SFT. So the splits never share a problem, and the eval set depends
only on the seed and `eval_per_level`: growing the training splits does not change it.
"""

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from align.files import write_jsonl_atomic
from align.tasks import arithmetic, code
from align.tasks.preferences import preference_pairs
from align.tasks.problem import Problem


@dataclass(frozen=True)
class Family:
    """A task family: its levels and how to draw one problem of a level."""

    levels: tuple[int, ...]
    make_problem: Callable[[int, random.Random], Problem]


FAMILIES: dict[str, Family] = {
    "arithmetic": Family(arithmetic.LEVELS, arithmetic.make_problem),
    "code": Family(code.LEVELS, code.make_problem),
}
SPLITS = ("sft", "prompts", "eval")


@dataclass(frozen=True)
class TaskDataConfig:
    """Sizes of the synthetic splits, sized by default for minutes of CPU training of a tiny model."""

    families: tuple[str, ...] = ("arithmetic", "code")
    """Task families to include (keys of FAMILIES)."""
    arithmetic_sft: int = 3000
    """SFT chat rows of the arithmetic family."""
    code_sft: int = 2000
    """SFT chat rows of the code family."""
    arithmetic_prompts: int = 600
    """RL / rejection-sampling prompt rows of the arithmetic family."""
    code_prompts: int = 400
    """RL / rejection-sampling prompt rows of the code family."""
    eval_per_level: int = 50
    """Held-out eval rows per family and difficulty level."""
    arithmetic_sft_mix: tuple[float, ...] = (0.5, 0.3, 0.12, 0.05, 0.03)
    """Relative weight of arithmetic levels 1..5 in SFT (weighted towards easy)."""
    code_sft_mix: tuple[float, ...] = (0.4, 0.35, 0.25)
    """Relative weight of code levels 1..3 in SFT."""
    arithmetic_prompt_mix: tuple[float, ...] = (0.1, 0.2, 0.25, 0.25, 0.2)
    """Relative weight of arithmetic levels 1..5 in RL prompts (weighted to where rewards vary)."""
    code_prompt_mix: tuple[float, ...] = (0.2, 0.4, 0.4)
    """Relative weight of code levels 1..3 in RL prompts."""

    def __post_init__(self):
        for name in self.families:
            if name not in FAMILIES:
                raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        for name, family in FAMILIES.items():
            for split in ("sft", "prompt"):
                mix = getattr(self, f"{name}_{split}_mix")
                if len(mix) != len(family.levels) or min(mix) < 0 or sum(mix) <= 0:
                    raise ValueError(f"{name}_{split}_mix needs {len(family.levels)} weights >= 0, got {mix}")

    def level_counts(self, family: str, split: str) -> dict[int, int]:
        """Rows per level of `family` in `split`, from the mix (largest remainder, so they sum exactly)."""
        levels = FAMILIES[family].levels
        if split == "eval":
            return dict.fromkeys(levels, self.eval_per_level)
        total = getattr(self, f"{family}_{split}")
        mix = getattr(self, f"{family}_{'sft' if split == 'sft' else 'prompt'}_mix")
        exact = [total * w / sum(mix) for w in mix]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(mix)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        return dict(zip(levels, counts, strict=True))


def generate_problems(family: str, difficulty: int, n: int, seed: int = 0) -> list[Problem]:
    """The first `n` distinct problems (by normalized prompt) of a seeded stream.

    Calls with a smaller `n` return a prefix, so a split cut first from the stream does not depend on the
    sizes of the splits cut after it.
    """
    make = FAMILIES[family].make_problem
    rng = random.Random(f"{family}:{difficulty}:{seed}")  # str seeds hash with sha512: stable across runs
    seen: dict[str, Problem] = {}
    for _ in range(100 * n + 1000):
        if len(seen) == n:
            break
        problem = make(difficulty, rng)
        seen.setdefault(problem.key, problem)
    if len(seen) < n:
        raise ValueError(f"only {len(seen)} distinct {family} level-{difficulty} problems found, asked {n}")
    return list(seen.values())


def build_splits(config: TaskDataConfig, seed: int = 0) -> dict[str, list[Problem]]:
    """Split name -> problems. Eval is ordered by family and level; training splits are shuffled."""
    splits: dict[str, list[Problem]] = {name: [] for name in SPLITS}
    for family in config.families:
        for level in FAMILIES[family].levels:
            sizes = {split: config.level_counts(family, split)[level] for split in ("eval", "prompts", "sft")}
            pool = generate_problems(family, level, sum(sizes.values()), seed)
            for split, size in sizes.items():
                splits[split] += pool[:size]
                pool = pool[size:]
    for split in ("sft", "prompts"):
        random.Random(f"shuffle:{split}:{seed}").shuffle(splits[split])
    return splits


def sft_row(problem: Problem) -> dict:
    """A chat row in TRL / OpenRLHF format; no system message, the chat template supplies Qwen's default."""
    return {
        "id": problem.id,
        "family": problem.family,
        "difficulty": problem.difficulty,
        "messages": [
            {"role": "user", "content": problem.prompt},
            {"role": "assistant", "content": problem.solution},
        ],
    }


def prompt_row(problem: Problem) -> dict:
    """A prompt row for RL, rejection sampling and eval, with what a verifier needs."""
    return {
        "id": problem.id,
        "family": problem.family,
        "difficulty": problem.difficulty,
        "prompt": [{"role": "user", "content": problem.prompt}],
        "answer": problem.answer,
        "tests": list(problem.tests),
        "entry_point": problem.entry_point,
    }


def select_levels(rows: Sequence[Mapping], levels: Sequence[str], source: str) -> list[Mapping]:
    """The rows whose "family:difficulty" (e.g. "code:3") is in `levels`, in order; every row if `levels` is empty.
    A row without a family or difficulty raises, naming `source`, the row and the field."""
    if not levels:
        return list(rows)
    wanted = set()
    for level in levels:
        family, _, difficulty = level.partition(":")
        if not difficulty.isdigit():
            raise ValueError(f"level {level!r}: expected family:difficulty, e.g. 'code:3'")
        wanted.add((family, int(difficulty)))
    kept = []
    for index, row in enumerate(rows):
        for name in ("family", "difficulty"):
            if name not in row:
                raise ValueError(f"{source} row {index}: field {name!r} missing (rows are picked by family:difficulty;"
                                 " an empty level list keeps them all)")
        if (row["family"], row["difficulty"]) in wanted:
            kept.append(row)
    return kept


def write_task_data(
    output_dir: str | Path, config: TaskDataConfig = TaskDataConfig(), seed: int = 0
) -> dict[str, Path]:
    """Writes sft.jsonl, prompts.jsonl and eval.jsonl into `output_dir`, and reward-model preference pairs:
    pairs.jsonl from the SFT problems, pairs_eval.jsonl from the eval problems (held out). Returns name -> path.

    Deterministic: the same config and seed give byte-identical files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = build_splits(config, seed)
    for split, problems in splits.items():
        paths[split] = output_dir / f"{split}.jsonl"
        to_row = sft_row if split == "sft" else prompt_row
        write_jsonl_atomic(paths[split], [to_row(p) for p in problems])
    for name, split in (("pairs", "sft"), ("pairs_eval", "eval")):
        paths[name] = output_dir / f"{name}.jsonl"
        write_jsonl_atomic(paths[name], preference_pairs(splits[split], seed))
    return paths


def corpus_texts(config: TaskDataConfig = TaskDataConfig(), seed: int = 0) -> Iterator[str]:
    """Prompts and reference solutions of the training splits (sft, prompts), e.g. to train a tokenizer.

    Eval problems are left out, so nothing about them leaks, even into the vocabulary.
    """
    splits = build_splits(config, seed)
    for split in ("sft", "prompts"):
        for problem in splits[split]:
            yield problem.prompt
            yield problem.solution
