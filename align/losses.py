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
