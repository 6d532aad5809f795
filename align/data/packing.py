"""Padding-free micro-batches: whole examples laid end to end in one row, grouped into optimizer steps.

Our decoder takes a packed row plus a `PackedLayout` and attends within each sequence only, so a micro-batch
costs its real tokens and nothing for padding. Three pure steps, each testable alone:

1. `plan_micro_batches` groups example indices into micro-batches of at most `max_tokens` tokens;
2. `plan_steps` groups micro-batches into optimizer steps across ranks and accumulation, and counts each
   step's trained tokens;
3. `collate` turns one micro-batch's examples into tensors.

Loss normalisation (the reason `StepPlan.global_target_tokens` exists): a step's loss is the mean NLL over all
its trained tokens, whichever rank and accumulation slot they land in. Each micro-batch therefore contributes
`masked_nll_sum / global_target_tokens`, and those contributions sum to the step's mean with no communication;
normalising per micro-batch or per rank instead would weight tokens of sparse micro-batches more (verl's
"token-mean" aggregation with a global count, and OpenRLHF's tests/test_loss_aggregation.py, do the same).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from align.data.chat import TokenizedChat
from align.model import PackedLayout

PACKING_WINDOW = 1024
"""Examples packed together by `plan_micro_batches` (see there): large enough that bins fill well, small
enough that micro-batches mix examples from the whole shuffled dataset."""


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch: `len(lengths)` sequences packed into a single row of T = sum(lengths) tokens."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, 0..len-1 within each sequence
    target_ids: torch.Tensor  # [1, T] long, the next token of the same sequence; 0 at each sequence's last token
    loss_mask: torch.Tensor  # [1, T] bool, True where target_ids[t] is a trained token
    lengths: tuple[int, ...]  # [num_seqs] tokens per sequence, in packed order

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def layout(self) -> PackedLayout:
        """Where the sequences start and end, on the batch's device, for the decoder's packed attention."""
        return PackedLayout.from_lengths(list(self.lengths), device=self.input_ids.device)

    def to(self, device: torch.device | str) -> PackedBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            target_ids=self.target_ids.to(device),
            loss_mask=self.loss_mask.to(device),
        )


def collate(examples: Sequence[TokenizedChat]) -> PackedBatch:
    """Pack `examples` end to end into one row.

    Position t predicts token t+1 of the same sequence, so target_ids[t] = input_ids[t+1] and
    loss_mask[t] = example.loss_mask[t+1]; a sequence's last position has no next token (target 0, not
    trained), which is also what stops one sequence's last token from learning the next one's first.
    """
    if not examples:
        raise ValueError("collate needs at least one example (an empty micro-batch has nothing to pack)")
    input_ids, position_ids, target_ids, loss_mask = [], [], [], []
    for example in examples:
        n = len(example)
        if n == 0:
            raise ValueError("cannot pack an example with no tokens")
        input_ids += example.input_ids
        position_ids += range(n)
        target_ids += [*example.input_ids[1:], 0]
        loss_mask += [*example.loss_mask[1:], False]
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        target_ids=torch.tensor([target_ids], dtype=torch.long),
        loss_mask=torch.tensor([loss_mask], dtype=torch.bool),
        lengths=tuple(len(example) for example in examples),
    )


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, seed: int, window: int = PACKING_WINDOW
) -> list[list[int]]:
    """Group example indices into micro-batches of at most `max_tokens` tokens; every index appears once.

    Shuffle the indices with `seed`, cut them into windows of `window` examples, and pack each window by
    first-fit decreasing (longest first, each into the first micro-batch with room, else a new one); then
    shuffle the micro-batches. First-fit decreasing fills bins far better than first-fit in arrival order
    (long examples placed last strand half-empty bins); doing it per window keeps it cheap and lets the seed
    decide which examples share a micro-batch, so each epoch's seed gives new mixtures. The final shuffle
    undoes the "long examples in the first bins of each window" order that FFD leaves.

    Args:
        lengths: tokens per example. An example longer than max_tokens is an error: truncate or drop first
            (`fit_to_length`).
        max_tokens: token budget of one micro-batch (one packed row).
        seed: the same seed and lengths give the same plan.
        window: examples packed together; larger fills slightly better and costs O(window * bins) time.

    Returns:
        Micro-batches, each a list of example indices.
    """
    if max_tokens < 1 or window < 1:
        raise ValueError(f"max_tokens={max_tokens} and window={window} must be positive")
    for index, length in enumerate(lengths):
        if not 1 <= length <= max_tokens:
            raise ValueError(
                f"example {index} has {length} tokens; each needs 1..max_tokens={max_tokens} (truncate or drop first)"
            )
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bins: list[list[int]] = []
    for begin in range(0, len(order), window):
        # sorted() is stable, so ties keep their shuffled order and the plan stays a function of the seed.
        chunk = sorted(order[begin : begin + window], key=lambda i: lengths[i], reverse=True)
        window_bins: list[list[int]] = []
        room: list[int] = []  # room[b]: tokens still free in window_bins[b]
        for index in chunk:
            b = next((b for b, free in enumerate(room) if free >= lengths[index]), len(window_bins))
            if b == len(window_bins):
                window_bins.append([])
                room.append(max_tokens)
            window_bins[b].append(index)
            room[b] -= lengths[index]
        bins += window_bins
    rng.shuffle(bins)
    return bins


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: which examples each rank packs into each of its accumulation micro-batches.

    Every rank has the same number of micro-batches (collectives must line up: each backward and the optimizer
    step happen on all ranks together). An empty micro-batch `()` only occurs in a dataset's last step; the
    trainer must still take part in the collectives for it (e.g. a forward on any batch with the loss
    multiplied by 0).
    """

    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]  # [world_size][accumulation slots][examples]
    global_target_tokens: int
    """Trained target tokens in the whole step, all ranks and slots: the denominator of every micro-batch's
    loss, `masked_nll_sum / global_target_tokens`. Data-parallel engines average gradients over ranks, so the
    trainer multiplies its loss by world_size to turn that average into this sum."""

    @property
    def world_size(self) -> int:
        return len(self.micro_batches)

    def for_rank(self, rank: int) -> tuple[tuple[int, ...], ...]:
        return self.micro_batches[rank]


def plan_steps(
    micro_batches: Sequence[Sequence[int]], world_size: int, grad_accum: int, target_tokens: Sequence[int]
) -> list[StepPlan]:
    """Group micro-batches into optimizer steps of world_size * grad_accum micro-batches each.

    Within a step, micro-batch k goes to rank k % world_size, slot k // world_size. The last step may have
    fewer micro-batches; it is kept (dropping it would lose data silently) with fewer accumulation slots,
    ceil(remaining / world_size), dealt the same way, so ranks differ by at most one micro-batch and the
    shorter ones are padded with empty micro-batches `()`. Its loss is normalised by its own token count like
    any step; only its gradient is made of fewer tokens.

    Args:
        micro_batches: example indices per micro-batch, e.g. from `plan_micro_batches`.
        world_size: data-parallel ranks.
        grad_accum: micro-batches per rank per step.
        target_tokens: trained target tokens per example (`TokenizedChat.num_targets`), indexed like the
            examples in micro_batches.
    """
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size={world_size} and grad_accum={grad_accum} must be positive")
    per_step = world_size * grad_accum
    steps = []
    for begin in range(0, len(micro_batches), per_step):
        chunk = [tuple(mb) for mb in micro_batches[begin : begin + per_step]]
        slots = -(-len(chunk) // world_size)
        chunk += [()] * (slots * world_size - len(chunk))
        ranks = tuple(tuple(chunk[slot * world_size + rank] for slot in range(slots)) for rank in range(world_size))
        total = sum(target_tokens[i] for mb in chunk for i in mb)
        if total == 0:  # every micro-batch would divide by it
            raise ValueError(f"step {len(steps)} has no target tokens; drop examples without targets first")
        steps.append(StepPlan(micro_batches=ranks, global_target_tokens=total))
    return steps


def plan_epochs(
    lengths: Sequence[int],
    target_tokens: Sequence[int],
    subset: Sequence[int],
    epochs: float,
    max_tokens: int,
    world_size: int,
    grad_accum: int,
    seed: int,
) -> list[StepPlan]:
    """Optimizer steps for `epochs` passes over the examples in `subset`, each epoch packed with its own seed.

    A fractional last epoch keeps that fraction of its steps (at least one). Indices in the returned plans refer
    to the full example list, as `lengths` and `target_tokens` do.
    """
    if not subset:
        return []
    steps: list[StepPlan] = []
    for epoch in range(math.ceil(epochs)):
        local = plan_micro_batches([lengths[i] for i in subset], max_tokens, seed=seed * 1000 + epoch)
        micro = [[subset[j] for j in mb] for mb in local]
        epoch_steps = plan_steps(micro, world_size, grad_accum, target_tokens)
        fraction = min(epochs - epoch, 1.0)
        steps += epoch_steps[: max(1, round(len(epoch_steps) * fraction))]
    return steps
