"""Losses: hand-computed values, a loop reference, and split invariance (STYLE.md, point 2)."""

import math

import torch

from align.losses import bradley_terry_loss, sft_loss


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


def test_bradley_terry_hand_computed():
    """Pairs with r_c - r_r = ln 3 (p = 3/4) and 0 (p = 1/2, a tie), margin 0; the step has 4 pairs.
    loss = (-ln 3/4 - ln 1/2) / 4."""
    chosen, rejected = torch.tensor([math.log(3.0), 1.0]), torch.tensor([0.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected, num_pairs=4)
    assert math.isclose(loss.item(), (-math.log(0.75) - math.log(0.5)) / 4, rel_tol=1e-6)
    assert metrics["correct"].item() == 1 and metrics["ties"].item() == 1
    assert math.isclose(metrics["margin_sum"].item(), math.log(3.0), rel_tol=1e-6)
    # A margin of ln 3 turns the first pair into a coin flip: -ln sigmoid(0) = ln 2.
    loss, _ = bradley_terry_loss(chosen[:1], rejected[:1], num_pairs=1, margin=torch.tensor([math.log(3.0)]))
    assert math.isclose(loss.item(), math.log(2.0), rel_tol=1e-6)
    # Centering adds coef * (r_c + r_r)^2 per pair: 0.5 * (1 + 1)^2 = 2 for the tie.
    loss, _ = bradley_terry_loss(chosen[1:], rejected[1:], num_pairs=1, center_coef=0.5)
    assert math.isclose(loss.item(), math.log(2.0) + 2.0, rel_tol=1e-6)


def test_bradley_terry_matches_trl_reward_trainer_formula_and_splits():
    # TRL 1.16 RewardTrainer.compute_loss: -logsigmoid(r_c - r_r - margin).mean()
    #   + center_rewards_coefficient * mean((r_c + r_r) ** 2), over one batch.
    generator = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(8, generator=generator) for _ in range(3))
    trl = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean() + 0.01 * torch.mean(
        (chosen + rejected) ** 2)
    ours, _ = bradley_terry_loss(chosen, rejected, num_pairs=8, margin=margin, center_coef=0.01)
    assert torch.allclose(ours, trl, atol=1e-6)
    # The same step split into micro-batches of 3, 3 and 2 pairs adds up to the same loss.
    parts = [bradley_terry_loss(chosen[s], rejected[s], 8, margin[s], 0.01)[0] for s in (slice(0, 3),
             slice(3, 6), slice(6, 8))]
    assert torch.allclose(sum(parts), trl, atol=1e-6)
