"""Training losses as pure functions of tensors (see STYLE.md: no distributed calls, no .item(), no configs).

Every loss takes the global number of target tokens of the optimizer step as an argument instead of averaging
over its own micro-batch: summed over all micro-batches of a step, on all ranks, the losses then add up to the
mean over the whole step, however the step is split across ranks and gradient-accumulation steps.
"""

from __future__ import annotations

import torch


def sft_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, num_target_tokens: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token negative log-likelihood over trained tokens, normalised by the step's global token count.

    Args:
        logprobs: [B, T] log p(target_t) from the model.
        loss_mask: [B, T] bool, True where the target is a trained (assistant) token.
        num_target_tokens: trained tokens in the whole optimizer step, summed over ranks and micro-batches.
    Returns:
        (loss, metrics): the loss is this micro-batch's share of the step mean, sum(-logprob * mask) / N; metrics
        hold the detached NLL sum and token count of this micro-batch, for logging.
    """
    mask = loss_mask.to(logprobs.dtype)  # [B, T]
    nll_sum = -(logprobs * mask).sum()
    loss = nll_sum / num_target_tokens
    return loss, {"nll_sum": nll_sum.detach(), "target_tokens": mask.sum().detach()}


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    num_pairs: int | torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss, -log sigmoid(r_chosen - r_rejected - margin), normalised by the step's pairs.

    Args:
        chosen_scores, rejected_scores: [P] scores of this micro-batch's pairs.
        num_pairs: pairs in the whole optimizer step, summed over ranks and micro-batches.
        margin: [P] how much better chosen must score (Llama 2's margin from preference strength); None: 0.
        center_coef: weight of the reward-centering term mean((r_chosen + r_rejected)^2) (Eisenstein et al.
            2023, as TRL's `center_rewards_coefficient`), which pins the scores' mean near zero.
    Returns:
        (loss, metrics): metrics hold detached sums over this micro-batch (loss, correct pairs, ties, margin
        r_chosen - r_rejected), for logging.
    """
    difference = chosen_scores - rejected_scores  # [P]
    per_pair = -torch.nn.functional.logsigmoid(difference - (margin if margin is not None else 0.0))
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_scores + rejected_scores) ** 2
    loss = per_pair.sum() / num_pairs
    metrics = {
        "loss_sum": per_pair.detach().sum(),
        "correct": (difference > 0).sum().detach(),
        "ties": (difference == 0).sum().detach(),
        "margin_sum": difference.detach().sum(),
        "pairs": torch.tensor(float(difference.numel())),
    }
    return loss, metrics
