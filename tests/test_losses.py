"""Losses: hand-computed values, a loop reference, and split invariance (STYLE.md, point 2)."""

import math

import torch

from align.losses import sft_loss


def test_sft_loss_hand_computed():
    """Tokens with p = 1/2, 1/4 and (masked out) 1/8; the step has 4 target tokens in all.
    loss = (ln 2 + ln 4) / 4 = 3 ln 2 / 4."""
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.125]]))
    mask = torch.tensor([[True, True, False]])
    loss, metrics = sft_loss(logprobs, mask, num_target_tokens=4)
    assert math.isclose(loss.item(), 3 * math.log(2) / 4, rel_tol=1e-6)
    assert metrics["target_tokens"].item() == 2
    assert math.isclose(metrics["nll_sum"].item(), 3 * math.log(2), rel_tol=1e-6)


def test_sft_loss_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 7, generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.4
    expected = 0.0
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                expected -= logprobs[b, t].item()
    loss, _ = sft_loss(logprobs, mask, num_target_tokens=int(mask.sum()))
    assert math.isclose(loss.item(), expected / int(mask.sum()), rel_tol=1e-6)


def test_sft_loss_is_split_invariant():
    """Two ranks x two accumulation steps of uneven micro-batches add up to the whole step's mean, gradients too."""
    generator = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(1, 40, generator=generator)).requires_grad_()
    mask = torch.rand(1, 40, generator=generator) > 0.3
    total = int(mask.sum())
    whole, _ = sft_loss(logprobs, mask, total)
    (grad_whole,) = torch.autograd.grad(whole, logprobs)
    cuts = [0, 5, 19, 31, 40]  # four micro-batches of different sizes
    parts = [sft_loss(logprobs[:, a:b], mask[:, a:b], total)[0] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    (grad_parts,) = torch.autograd.grad(sum(parts), logprobs)
    assert torch.allclose(sum(parts), whole)
    assert torch.allclose(grad_parts, grad_whole)
