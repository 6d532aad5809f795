"""Pair accuracy of a reward model: score chosen and rejected of each pair, count chosen > rejected.

Scoring packs sequences padding-free up to a token budget per forward pass (no padding, no [T, T] mask), the
same path training uses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from align.data import TokenizedPair
from align.model import PackedLayout
from reward.model import Qwen2RewardModel


@torch.no_grad()
def score_sequences(model: Qwen2RewardModel, sequences: Sequence[Sequence[int]], max_tokens: int = 4096,
                    progress: bool = False) -> torch.Tensor:
    """Scores [len(sequences)], packing consecutive sequences into forward passes of at most max_tokens tokens
    (a longer sequence goes alone)."""
    model.eval()
    device = next(model.parameters()).device
    scores, batch, batch_tokens = [], [], 0
    bar = tqdm(total=len(sequences), desc="scoring", unit="seq", disable=not progress)

    def flush():
        ids = torch.tensor([[t for s in batch for t in s]], device=device)
        scores.append(model(ids, layout=PackedLayout.from_lengths([len(s) for s in batch], device=device)).float())
        bar.update(len(batch))

    for sequence in sequences:
        if batch and batch_tokens + len(sequence) > max_tokens:
            flush()
            batch, batch_tokens = [], 0
        batch.append(list(sequence))
        batch_tokens += len(sequence)
    if batch:
        flush()
    bar.close()
    return torch.cat(scores) if scores else torch.zeros(0)


@dataclass(frozen=True)
class PairAccuracy:
    """How often chosen outscored rejected, overall and per subset."""

    pairs: int
    correct: int
    ties: int
    mean_margin: float
    """Mean of r_chosen - r_rejected."""
    by_subset: dict[str, tuple[int, int]]
    """subset -> (correct, pairs)."""

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.pairs, 1)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "pairs": self.pairs, "correct": self.correct, "ties": self.ties,
                "mean_margin": self.mean_margin,
                "by_subset": {k: {"accuracy": c / n, "correct": c, "pairs": n} for k, (c, n) in self.by_subset.items()}}


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, subsets: Sequence[str | None]) -> PairAccuracy:
    """Accuracy from scores; a tie (equal scores) counts as wrong and is reported."""
    difference = (chosen - rejected).tolist()
    by_subset: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d, subset in zip(difference, subsets, strict=True):
        entry = by_subset[subset or "all"]
        entry[0] += d > 0
        entry[1] += 1
    return PairAccuracy(
        pairs=len(difference), correct=sum(d > 0 for d in difference), ties=sum(d == 0 for d in difference),
        mean_margin=sum(difference) / max(len(difference), 1),
        by_subset={k: (c, n) for k, (c, n) in sorted(by_subset.items())},
    )


def evaluate_pairs(model: Qwen2RewardModel, pairs: Sequence[TokenizedPair], max_tokens: int = 4096,
                   progress: bool = False) -> PairAccuracy:
    scores = score_sequences(model, [s for p in pairs for s in (p.chosen_ids, p.rejected_ids)], max_tokens, progress)
    return pair_accuracy(scores[0::2], scores[1::2], [p.subset for p in pairs])
