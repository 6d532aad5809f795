"""Direct preference losses (DPO and variants) as pure functions of summed sequence log-probs.

Every loss takes, per preference pair, the completion log-prob log pi(y|x) summed over the completion's tokens,
under the policy and under the frozen reference, for the chosen and the rejected completion ([P] each). With the
log-ratios h_c = log pi(y_c|x) - log pi_ref(y_c|x) and h_r likewise, h = h_c - h_r is what every variant scores:

- `dpo_sigmoid_loss`: -log sigmoid(beta h), Rafailov et al. 2023, eq. 7.
- `ipo_loss`: (h - 1 / (2 beta))^2, Azar et al. 2023 ("A General Theoretical Paradigm...", eq. 17, beta = tau);
  optionally on per-token averages of h_c and h_r (see there: TRL does this, the paper does not say).
- `cdpo_loss`: conservative DPO, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (Mitchell 2023, "A
  note on DPO with noisy preferences"): the DPO loss against labels smoothed by eps.
- `robust_dpo_loss`: robust DPO, (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
  (Chowdhury et al. 2024, "Provably Robust DPO"): unbiased for labels flipped with probability eps, and
  what TRL 1.16 calls loss_type="robust". cDPO and rDPO differ only in the sign of the eps term and the divisor.

Reference-free DPO: pass ref_chosen = ref_rejected = None and the log-ratios are the policy log-probs alone
(the reference is a uniform model, as TRL's `reference_free`). `DPO_LOSSES` names the variants in one place.

Normalisation as in align/losses.py: each loss divides by `num_pairs`, the pair count of the whole optimizer step
(all ranks, all accumulation slots), so the micro-batch losses of a step add up to the step's mean pair loss.

Implicit rewards (Rafailov et al. 2023, section 5) are beta h_c and beta h_r; their accuracy (r_c > r_r) and margin
are logged as detached sums. For IPO they are beta times the summed (not length-averaged) log-ratios, as TRL logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def sequence_logprob_sums(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """Sum per-token log-probs over each sequence's completion tokens.

    Args:
        logprobs: [B, T] log p(target_t) from the model (packed: B = 1).
        mask: [B, T] bool, True where target_t is a completion (trained) token.
        segment_ids: [B, T] long, the index in 0..S-1 of the sequence each position belongs to (packed rows); None:
            each row is one sequence (padded layout), S = B.
        num_sequences: S, required with segment_ids (passed in, not read off the tensor, to avoid a device sync).
    Returns:
        [S] summed log-probs. The completion lengths for `ipo_loss` are the same call on mask.float().
    """
    masked = torch.where(mask, logprobs, torch.zeros_like(logprobs))  # [B, T]; where, so -inf off-mask is harmless
    if segment_ids is None:
        return masked.sum(dim=-1)  # [B]
    if num_sequences is None:
        raise ValueError("num_sequences is required with segment_ids")
    sums = torch.zeros(num_sequences, dtype=logprobs.dtype, device=logprobs.device)  # [S]
    return sums.index_add(0, segment_ids.reshape(-1), masked.reshape(-1))  # [S]


def segment_ids_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """[1, sum(lengths)] long: sequence i's positions hold i (the layout of align.data.packing.PackedBatch)."""
    counts = torch.tensor(list(lengths), dtype=torch.long, device=device)  # [S]
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)[None]  # [1, T]


def _log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_c, h_r), each [P]; the reference is dropped (reference-free DPO) when both ref tensors are None."""
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("pass both reference log-probs, or neither (reference-free)")
    if ref_chosen is None:
        return policy_chosen, policy_rejected
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def _finish(
    per_pair: torch.Tensor, chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float, num_pairs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the step's mean loss, and detached metric sums for logging."""
    chosen_rewards = beta * chosen_ratio.detach()  # [P]
    rejected_rewards = beta * rejected_ratio.detach()  # [P]
    metrics = {
        "loss_sum": per_pair.detach().sum(),
        "chosen_rewards_sum": chosen_rewards.sum(),
        "rejected_rewards_sum": rejected_rewards.sum(),
        "reward_correct": (chosen_rewards > rejected_rewards).sum(),
        "reward_margin_sum": (chosen_rewards - rejected_rewards).sum(),
        "pairs": torch.tensor(float(per_pair.numel())),
    }
    return per_pair.sum() / num_pairs, metrics


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    num_pairs: int | torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO, -log sigmoid(beta h) per pair (Rafailov et al. 2023, eq. 7), normalised by the step's pairs.

    Args:
        policy_chosen, policy_rejected: [P] summed completion log-probs under the policy (with grad).
        ref_chosen, ref_rejected: [P] the same under the reference; both None for reference-free DPO.
        num_pairs: pairs in the whole optimizer step, summed over ranks and micro-batches.
        beta: strength of the KL constraint to the reference (0.1 as in the paper and TRL).
    Returns:
        (loss, metrics): metrics hold detached sums over this micro-batch: loss_sum, chosen_rewards_sum,
        rejected_rewards_sum, reward_correct (pairs with r_c > r_r), reward_margin_sum, pairs.
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    per_pair = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))  # [P]
    return _finish(per_pair, chosen_ratio, rejected_ratio, beta, num_pairs)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    num_pairs: int | torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO, (h - 1 / (2 beta))^2 per pair (Azar et al. 2023, eq. 17 with tau = beta), over the step's pairs.

    The paper's h is a difference of sequence log-ratios. Summed over tokens, h grows with the completion length
    and so does the squared loss; TRL 1.16 (DPOTrainer._compute_loss, loss_type="ipo") therefore divides h_c and
    h_r by their completion token counts (clamped to >= 1), saying the IPO authors confirmed their results use
    that form. Pass chosen_lengths and rejected_lengths ([P] completion token counts) to do the same; leave them
    None for the paper's summed form.

    Args: as `dpo_sigmoid_loss`, plus chosen_lengths, rejected_lengths: [P] token counts, or None.
    Returns: as `dpo_sigmoid_loss` (rewards are beta times the summed log-ratios, whatever the lengths).
    """
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both completion lengths, or neither")
    if chosen_lengths is None:
        delta = chosen_ratio - rejected_ratio  # [P]
    else:
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)  # [P]
    per_pair = (delta - 1 / (2 * beta)) ** 2  # [P]
    return _finish(per_pair, chosen_ratio, rejected_ratio, beta, num_pairs)


def cdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    num_pairs: int | torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Conservative DPO (Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) per pair.

    The DPO cross-entropy against a soft label: the preference is right with probability 1 - eps. Unlike DPO its
    minimum is finite (at sigmoid(beta h) = 1 - eps), so it stops pushing h once the pair is ranked confidently.
    eps = 0 is `dpo_sigmoid_loss`. (TRL 1.16 no longer smooths its "sigmoid" loss; its "robust" is rDPO.)

    Args: as `dpo_sigmoid_loss`, plus label_smoothing: eps in [0, 0.5).
    Returns: as `dpo_sigmoid_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen_ratio - rejected_ratio)  # [P]
    per_pair = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # [P]
    return _finish(per_pair, chosen_ratio, rejected_ratio, beta, num_pairs)


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    num_pairs: int | torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Robust DPO (Chowdhury et al. 2024): (-(1 - eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps).

    With labels flipped at random with probability eps, its expectation over the flip is the clean DPO loss
    (unbiased), where cDPO's is a smoothed one. TRL 1.16's loss_type="robust" with label_smoothing = eps.

    Args: as `dpo_sigmoid_loss`, plus label_smoothing: eps in [0, 0.5).
    Returns: as `dpo_sigmoid_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen_ratio - rejected_ratio)  # [P]
    per_pair = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )  # [P]
    return _finish(per_pair, chosen_ratio, rejected_ratio, beta, num_pairs)


DpoLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

DPO_LOSSES: dict[str, DpoLoss] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "conservative": cdpo_loss,
    "robust": robust_dpo_loss,
}
"""The DPO variants by name (a recipe config picks one); all share the first five arguments."""
