"""GRPO math as pure functions: group-normalised advantages and the clipped policy loss with a k3 KL penalty.

GRPO (Shao et al. 2024, DeepSeekMath, eq. 3) samples a group of G completions per query, scores them, and uses
each completion's reward normalised within its group as the advantage of every one of its tokens (outcome
supervision, section 4.1.2). The loss per token is PPO's clipped surrogate plus beta times a KL estimate to the
reference policy:

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL3_t,   rho_t = pi(o_t) / pi_old(o_t)
    KL3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                              (k3, DeepSeekMath eq. 4)

k3 is Schulman's unbiased, always non-negative estimator of KL(pi || pi_ref) from samples of pi ("Approximating
KL Divergence", 2020). How we depart from eq. 3, and why:

- Asymmetric clip (DAPO, Yu et al. 2025, "clip-higher"): eps_high may exceed eps_low (DAPO uses 0.2 / 0.28), so
  low-probability tokens with positive advantage can grow more before their gradient is clipped. eps_high =
  eps_low is the paper's clip.
- Two aggregations, as named functions (`GRPO_AGGREGATIONS`): `grpo_sequence_loss` is eq. 3 (mean over each
  completion's tokens, then over completions); `grpo_token_loss` is DAPO's token-level mean over all tokens of the
  step, which does not down-weight the tokens of long completions.
- Global normalisers are passed in (the step's token or completion count, over all ranks and accumulation slots),
  as in align/losses.py, so the micro-batch losses of a step add up to the step's loss with no communication.
  TRL's equivalents: ours token-level = TRL loss_type="dapo" (and "dr_grpo" with num_tokens = N * max length,
  "bnpo" with one micro-batch per step); ours sequence-level = TRL "grpo".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGE_EPS = 1e-4
"""Added to the group std before dividing, as TRL 1.16 (GRPOTrainer._generate_and_score_completions)."""


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """Advantages (r - mean_group(r)) / (std_group(r) + eps), one per completion (DeepSeekMath section 4.1.2).

    The std is the unbiased sample estimator (Bessel's correction, divisor G - 1: torch.std's default, and TRL's
    `nanstd`); a group of one has advantage 0. eps = 1e-4 as TRL. With scale_rewards=False the advantage is only
    centred, r - mean (Dr. GRPO, Liu et al. 2025, argues the std division biases updates toward groups with
    nearly equal rewards, both too easy and too hard queries; TRL scale_rewards="none").

    Args:
        rewards: [N] one reward per completion, the G completions of each query contiguous (N = num_queries * G).
        group_size: G, completions per query.
        scale_rewards: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std.
    Returns:
        [N] advantages, detached from the rewards' graph.
    """
    grouped = rewards.detach().reshape(-1, group_size)  # [Q, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [Q, G]
    if scale_rewards:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)  # [Q, 1]
        centred = centred / (std + eps)  # [Q, G]
    return centred.reshape(-1)  # [N]


def _per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss l_t [N, T] (zero off the mask) and detached sums over masked tokens."""
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("a KL coefficient beta != 0 needs ref_logprobs")
    ratio = torch.exp(logprobs - old_logprobs)  # [N, T]
    adv = advantages[:, None]  # [N, 1]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
    zeros = torch.zeros_like(per_token)  # [N, T]
    metrics = {}
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - logprobs  # [N, T]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [N, T], k3 estimator
        per_token = per_token + beta * kl  # [N, T]
        metrics["kl_sum"] = torch.where(mask, kl, zeros).detach().sum()
    per_token = torch.where(mask, per_token, zeros)  # [N, T]; where, not *, so inf/nan off the mask cannot leak

    ratio_d = ratio.detach()  # [N, T]
    # Tokens whose gradient the clip removes: ratio below 1 - eps_low with A < 0, or above 1 + eps_high with A > 0.
    low = (ratio_d < 1 - epsilon_low) & (adv < 0) & mask  # [N, T]
    high = (ratio_d > 1 + epsilon_high) & (adv > 0) & mask  # [N, T]
    metrics.update(
        clip_low_sum=low.sum(),
        clip_high_sum=high.sum(),
        clipped_sum=(low | high).sum(),
        ratio_sum=torch.where(mask, ratio_d, zeros).sum(),
        ratio_min=torch.where(mask, ratio_d, torch.full_like(ratio_d, float("inf"))).min(),
        ratio_max=torch.where(mask, ratio_d, torch.full_like(ratio_d, float("-inf"))).max(),
        loss_sum=per_token.detach().sum(),
        tokens=mask.sum(),
        sequences=torch.tensor(float(mask.shape[0])),
    )
    return per_token, metrics


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: int | torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss averaged over every completion token of the step (DAPO's token-level aggregation).

    loss = sum over this micro-batch's masked tokens of l_t, divided by num_tokens (see the module docstring).

    Args:
        logprobs: [N, T] log pi(o_t) under the policy being trained (with grad).
        old_logprobs: [N, T] the same under the policy that sampled the completions (no grad).
        ref_logprobs: [N, T] the same under the reference, or None (then beta must be 0 and no KL is logged).
        advantages: [N] one per completion (`group_advantages`), shared by its tokens.
        mask: [N, T] bool, True at completion tokens that are trained.
        num_tokens: masked tokens in the whole optimizer step, summed over ranks and micro-batches.
        epsilon_low, epsilon_high: clip range [1 - eps_low, 1 + eps_high] of the ratio (TRL epsilon, epsilon_high).
        beta: KL coefficient (TRL's default 0.0; DeepSeekMath used 0.04).
    Returns:
        (loss, metrics): metrics are detached sums over this micro-batch's masked tokens: loss_sum, kl_sum (with a
        reference), clip_low_sum, clip_high_sum, clipped_sum (tokens), ratio_sum, tokens, sequences; and
        ratio_min, ratio_max (reduce those with min / max, not sum).
    """
    per_token, metrics = _per_token_loss(
        logprobs, old_logprobs, ref_logprobs, advantages, mask, epsilon_low, epsilon_high, beta
    )
    return per_token.sum() / num_tokens, metrics


def grpo_sequence_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_sequences: int | torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss as DeepSeekMath eq. 3: mean over each completion's tokens, then over completions.

    loss = sum over this micro-batch's completions of (sum_t l_t / |o_i|), divided by num_sequences, the
    completions in the whole step; |o_i| is clamped to >= 1 so an all-masked row adds 0.

    Args: as `grpo_token_loss`, with num_sequences (completions in the step) in place of num_tokens.
    Returns: as `grpo_token_loss`.
    """
    per_token, metrics = _per_token_loss(
        logprobs, old_logprobs, ref_logprobs, advantages, mask, epsilon_low, epsilon_high, beta
    )
    per_sequence = per_token.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # [N]
    return per_sequence.sum() / num_sequences, metrics


GrpoLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

GRPO_AGGREGATIONS: dict[str, GrpoLoss] = {
    "token": grpo_token_loss,
    "sequence": grpo_sequence_loss,
}
"""The loss aggregations by name; the sixth argument is the step's global count of what the variant averages
over (tokens for "token", completions for "sequence")."""
