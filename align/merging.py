"""Merge rules of the Online Merging Optimizer (Lu et al. 2024, "Online Merging Optimizers for Boosting Rewards and
Mitigating Tax in Alignment", arXiv 2405.17931) as pure functions of tensors (see STYLE.md: no distributed calls,
no .item(), no configs).

At every step the optimizer merges AdamW's update delta with the SFT task vector tau = theta_SFT - theta_base and
adds the result to the parameters (the relaxed online merge, Eq. 2):

    OnDARE, Eq. 3:  theta_t = theta_{t-1} + (1 - alpha) F_R(delta) + alpha F_R(tau)
                    F_R keeps each entry with probability p, the reserve rate (Eq. 4)
    OnTIES, Eq. 5:  theta_t = theta_{t-1} + (1 - alpha) F_T(delta) (+)sign alpha F_T(tau)
                    F_T keeps the top-p fraction of a parameter's entries by magnitude (Eq. 6) and (+)sign is the
                    sign consensus of Eq. 7

A parameter may be split over ranks (ZeRO-3 partitions), yet every function here gives each element the same result
it gets when the parameter is whole, and none communicates:
- `random_keep` draws Eq. 4's Bernoulli mask from a counter-based hash of the element's index in the full parameter,
  not from a generator's stream, so every rank draws exactly its own entries of the whole parameter's mask (on CPU
  and GPU alike). A torch.Generator yields its numbers in order: a rank could get its slice only by drawing them all.
- `kth_largest` finds the exact top-p threshold of a split parameter from [segments, 256] histograms that the
  caller's `sum_across_ranks` adds up (an all-reduce; identity on one process), never from the values themselves.

Choices where the paper and its reference code (QwenLM/online_merging_optimizers) differ, made here:
- Rescaling. The paper drops the rescaling of kept entries (end of Sec. 4.2: it "harms the numeric stabilities");
  the reference OnDARE masks with dropout, which always divides kept entries by p, and can also rescale to the L1
  norm. `rescale_factors` offers all three ("none", the paper's; "inverse_p", DARE's and the reference OnDARE's;
  "l1", the reference's `rescale=True`), for both candidates alike.
- Sign election. Eq. 7 compares the *weighted* terms a = (1 - alpha) F(delta) and b = alpha F(tau): where their
  signs differ, the larger of |a|, |b| survives. The reference elects the sign of the unweighted F(delta) + F(tau),
  so with alpha = 1e-7 a kept tau entry (far larger than one step's delta) vetoes a kept update entry of the other
  sign while adding almost nothing itself. Both are `onties_merge(sign_rule=...)`; "weighted" follows the paper.
- Top-p keeps every entry with |x| >= the k-th largest |x|, k = max(1, round(p * numel)) per parameter tensor: ties
  at the threshold are all kept (so no layout can change which are), and k >= 1 (the reference skips the masking
  when p * numel < 1). The reference's exact-k argsort breaks ties arbitrarily. Ties are real at AdamW's first
  step, whose |delta| = lr |g| / (|g| + eps) all sit just below lr: where |g| >> eps they round to the same float
  (in bf16 most do), and all of those are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), in halves so that no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with full avalanche (C. Wellons' `lowbias32`), on int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_keep(index: torch.Tensor, p: float, key: tuple[int, int]) -> torch.Tensor:
    """Eq. 4's mask: each entry kept with probability p, independently, drawn as a hash of (key, index).

    Args:
        index: [N] int64 positions of the entries in the flattened full parameter (each < 2**32).
        p: reserve rate, the probability of keeping an entry.
        key: two 32-bit words naming the draw (seed, parameter, candidate, step); other keys give independent masks.
    Returns:
        [N] bool, True where the entry is kept: the same for an index whichever piece of the parameter it is in.
    """
    bits = _mix32(_mix32((index + key[0]) & _M32) ^ key[1])  # [N] uniform on [0, 2**32)
    return bits < round(p * 2**32)


def _digit_counts(bits: torch.Tensor, prefix: torch.Tensor, shift: int) -> torch.Tensor:
    """Histogram of the 8 bits at `shift` over the entries whose higher bits equal those of `prefix`."""
    if shift < 24:
        bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
    return torch.bincount((bits >> shift) & 255, minlength=256)  # [256]


def kth_largest(
    pieces: Sequence[torch.Tensor],
    k: torch.Tensor,
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The exact k-th largest |x| of each of S segments (parameters), each possibly split into pieces over ranks.

    A radix select on float32 bit patterns, which order as the values do for |x| >= 0: four passes each count, per
    value of the next 8 bits, the entries whose higher bits match the digits found so far, and pick the digit where
    the count from the top reaches k. Ranks exchange these [S, 256] counts only.

    Args:
        pieces: S tensors, this rank's entries of each segment (any shape, possibly empty).
        k: [S] int64, which largest to find (1 = the largest), from 1 to the segment's total number of entries.
        sum_across_ranks: adds a tensor over the ranks holding the segments (an all-reduce); None on one process.
    Returns:
        [S] float32 thresholds; for a whole tensor x, torch.topk(x.abs().flatten(), k).values[-1].
    """
    bits = [x.detach().float().abs().reshape(-1).view(torch.int32) for x in pieces]  # |x| as ordered integers
    remaining = k.clone()  # [S] rank of the target among the entries still matching the prefix
    prefix = torch.zeros_like(k)  # [S] bits of the target found so far
    for shift in (24, 16, 8, 0):
        counts = torch.stack([_digit_counts(b, prefix[s], shift) for s, b in enumerate(bits)])  # [S, 256]
        if sum_across_ranks is not None:
            counts = sum_across_ranks(counts)
        at_or_above = counts.flip(1).cumsum(1).flip(1)  # [S, 256] matching entries whose digit is >= d
        digit = (at_or_above >= remaining[:, None]).sum(1) - 1  # [S] largest d with at_or_above[d] >= remaining
        remaining = remaining - (at_or_above - counts).gather(1, digit[:, None]).squeeze(1)  # drop those above d
        prefix = prefix | (digit << shift)
    return prefix.to(torch.int32).view(torch.float32)


def reserve_count(numel: int, p: float) -> int:
    """Entries the top-p sparsification keeps of a parameter with `numel` entries (Eq. 6), at least one."""
    return max(1, min(numel, round(p * numel)))


def rescale_factors(
    pieces: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    p: float,
    rescale: Literal["none", "inverse_p", "l1"],
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Factor by which each segment's kept entries are multiplied after sparsification.

    Args:
        pieces, keeps: S tensors each, this rank's entries of each segment and their keep masks.
        p: reserve rate.
        rescale: "none" (the paper: 1), "inverse_p" (DARE: 1 / p, unbiased for the random mask), or "l1" (the
            reference code: ||x||_1 / ||kept x||_1 of the whole segment, so sparsifying keeps the L1 norm).
        sum_across_ranks: as in `kth_largest`; "l1" adds the per-segment norms over ranks.
    Returns:
        [S] float32 factors.
    """
    if rescale == "none":
        return torch.ones(len(pieces))
    if rescale == "inverse_p":
        return torch.full((len(pieces),), 1.0 / p)
    norms = torch.stack(  # [S, 2] float64: ||x||_1 and ||kept x||_1 of this rank's pieces
        [torch.stack([x.double().abs().sum(), torch.where(m, x, 0).double().abs().sum()])
         for x, m in zip(pieces, keeps, strict=True)]
    )
    if sum_across_ranks is not None:
        norms = sum_across_ranks(norms)
    return (norms[:, 0] / norms[:, 1].clamp_min(torch.finfo(torch.float64).tiny)).float()


def ondare_merge(sparse_update: torch.Tensor, sparse_tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """OnDARE's consensus, a linear combination (Eq. 3): (1 - alpha) F_R(delta) + alpha F_R(tau).

    Args:
        sparse_update: [N] F_R(delta), the AdamW update after `random_keep` (and rescaling).
        sparse_tau: [N] F_R(tau), the task vector after its own mask.
        alpha: merging weight of the task vector.
    Returns:
        [N] the delta to add to the parameters.
    """
    return (1 - alpha) * sparse_update + alpha * sparse_tau


def onties_merge(
    sparse_update: torch.Tensor,
    sparse_tau: torch.Tensor,
    alpha: float,
    sign_rule: Literal["weighted", "unweighted"] = "weighted",
) -> torch.Tensor:
    """OnTIES's sign consensus of a = (1 - alpha) F_T(delta) and b = alpha F_T(tau) (Eq. 5 and 7).

    Eq. 7: a (+)sign b = a + b where sign(a) = sign(b), else a I(|a| >= |b|) + b I(|b| >= |a|). This is TIES's
    election on the weighted terms: the elected sign is sign(a + b) and only terms of that sign are summed (a zero
    term is dropped, and an exact tie a = -b gives 0, as Eq. 7 does). With sign_rule="unweighted" the elected sign
    is that of F_T(delta) + F_T(tau) instead, as in the reference code.

    Args:
        sparse_update: [N] F_T(delta), the AdamW update after the top-p mask.
        sparse_tau: [N] F_T(tau), the task vector after its top-p mask.
        alpha: merging weight of the task vector.
        sign_rule: which sum elects the sign, see above.
    Returns:
        [N] the delta to add to the parameters.
    """
    a, b = (1 - alpha) * sparse_update, alpha * sparse_tau
    elected = torch.sign(a + b) if sign_rule == "weighted" else torch.sign(sparse_update + sparse_tau)  # [N]
    return torch.where(torch.sign(a) == elected, a, 0) + torch.where(torch.sign(b) == elected, b, 0)
