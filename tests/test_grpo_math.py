"""GRPO math: hand-computed values, loop references, split invariance, and parity with TRL 1.16 (STYLE.md, 2)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.grpo import GRPO_AGGREGATIONS, group_advantages, grpo_sequence_loss, grpo_token_loss


def test_group_advantages_hand_computed():
    """Groups of G = 3: rewards 0, 3, 6 have mean 3 and unbiased std sqrt((9 + 0 + 9) / 2) = 3, so advantages
    (-3, 0, 3) / (3 + 1e-4); rewards 2, 2, 2 have std 0 and advantages 0 (not 0/0). Unscaled: r - mean."""
    rewards = torch.tensor([0.0, 3.0, 6.0, 2.0, 2.0, 2.0])
    scale = 3 / (3 + 1e-4)
    expected = torch.tensor([-scale, 0.0, scale, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, group_size=3), expected, atol=1e-7)
    assert group_advantages(rewards, 3, scale_rewards=False).tolist() == [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 1).tolist() == [0.0] * 6  # a group of one has nothing to compare with


def test_group_advantages_match_a_loop_and_split_by_group():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(4 * 5, generator=generator, dtype=torch.float64)
    expected = []
    for q in range(4):
        group = rewards[5 * q:5 * q + 5].tolist()
        mean = sum(group) / 5
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (5 - 1))
        expected += [(r - mean) / (std + 1e-4) for r in group]
    advantages = group_advantages(rewards, 5)
    assert torch.allclose(advantages, torch.tensor(expected, dtype=torch.float64))
    # Whole groups on different ranks: the same advantages (groups never straddle ranks).
    assert torch.equal(torch.cat([group_advantages(rewards[:5], 5), group_advantages(rewards[5:], 5)]), advantages)


def clip_case():
    """Completion 0, advantage +1, ratios 1, 1.5, 0.5; completion 1, advantage -2, ratios 0.5, 1.5 and a pad."""
    old = torch.full((2, 3), -1.0)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 1.0]])
    logprobs = (old + ratios.log()).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logprobs, old, torch.tensor([1.0, -2.0]), mask


def test_grpo_clip_hand_computed():
    """eps = 0.2, l_t = -min(rho A, clip(rho, 0.8, 1.2) A):
    completion 0 (A = 1): -min(1, 1) = -1; -min(1.5, 1.2) = -1.2 (clipped high); -min(0.5, 0.8) = -0.5;
    completion 1 (A = -2): -min(-1, -1.6) = 1.6 (clipped low); -min(-3, -2.4) = 3.
    Token mean over 5 tokens: (-1 - 1.2 - 0.5 + 1.6 + 3) / 5 = 0.38. Sequence mean: (-2.7 / 3 + 4.6 / 2) / 2 = 0.7.
    The clipped tokens get no gradient; the others d l_t / d logp_t = -A rho_t."""
    logprobs, old, advantages, mask = clip_case()
    loss, metrics = grpo_token_loss(logprobs, old, None, advantages, mask, num_tokens=5)
    assert math.isclose(loss.item(), 0.38, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_grad = torch.tensor([[-1.0, 0.0, -0.5], [0.0, 2 * 1.5, 0.0]]) / 5
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    assert metrics["clip_high_sum"].item() == 1 and metrics["clip_low_sum"].item() == 1
    assert metrics["clipped_sum"].item() == 2 and metrics["tokens"].item() == 5
    assert math.isclose(metrics["ratio_sum"].item(), 5.0, rel_tol=1e-6)
    assert math.isclose(metrics["ratio_min"].item(), 0.5, rel_tol=1e-6)
    assert math.isclose(metrics["ratio_max"].item(), 1.5, rel_tol=1e-6)
    assert "kl_sum" not in metrics
    loss, _ = grpo_sequence_loss(logprobs, old, None, advantages, mask, num_sequences=2)
    assert math.isclose(loss.item(), 0.7, rel_tol=1e-6)
    # Clip-higher (DAPO): eps_high = 0.6 lets ratio 1.5 with A > 0 through: -1.2 becomes -1.5, loss 1.6 / 5.
    loss, metrics = grpo_token_loss(logprobs, old, None, advantages, mask, 5, epsilon_low=0.2, epsilon_high=0.6)
    assert math.isclose(loss.item(), 0.32, rel_tol=1e-6)
    assert metrics["clip_high_sum"].item() == 0


def test_grpo_k3_kl_hand_computed():
    """One token with A = 0 (no policy term): ref - logp = ln 2 gives k3 = 2 - ln 2 - 1 = 1 - ln 2, and with
    beta = 1/2 the loss is (1 - ln 2) / 2; d k3 / d logp = 1 - exp(ref - logp) = -1, so the gradient is -1/2.
    A second token with ref = logp has k3 = 0."""
    logprobs = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-2.0 + math.log(2.0), -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = grpo_token_loss(logprobs, logprobs.detach(), ref, torch.zeros(1), mask, num_tokens=1, beta=0.5)
    assert math.isclose(loss.item(), (1 - math.log(2.0)) / 2, rel_tol=1e-6)
    assert math.isclose(metrics["kl_sum"].item(), 1 - math.log(2.0), rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(grad, torch.tensor([[-0.5, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_token_loss(logprobs, logprobs.detach(), None, torch.zeros(1), mask, 1, beta=0.5)


def random_rollout(n=6, t=7, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(n, t, generator=generator, dtype=dtype)
    logprobs = old + 0.4 * torch.randn(n, t, generator=generator, dtype=dtype)  # ratios roughly 0.5 to 2
    ref = old + 0.3 * torch.randn(n, t, generator=generator, dtype=dtype)
    advantages = torch.randn(n, generator=generator, dtype=dtype)
    lengths = torch.randint(1, t + 1, (n,), generator=generator)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0, :2] = False  # a row whose completion starts late (e.g. a tool output masked out)
    return logprobs, old, ref, advantages, mask


def loop_reference(logprobs, old, ref, advantages, mask, eps_low, eps_high, beta):
    """Per-token loss l_t with math, one token at a time, and the two aggregations."""
    token_total, sequence_total, tokens = 0.0, 0.0, 0
    for i in range(len(logprobs)):
        row, count = 0.0, 0
        for t in range(len(logprobs[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logprobs[i][t] - old[i][t])
            a = advantages[i]
            loss = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            d = ref[i][t] - logprobs[i][t]
            loss += beta * (math.exp(d) - d - 1)
            row, count = row + loss, count + 1
        token_total, tokens = token_total + row, tokens + count
        sequence_total += row / max(count, 1)
    return token_total / tokens, sequence_total / len(logprobs)


def test_grpo_losses_match_a_loop():
    logprobs, old, ref, advantages, mask = random_rollout(dtype=torch.float64)
    expected_token, expected_sequence = loop_reference(logprobs.tolist(), old.tolist(), ref.tolist(),
                                                       advantages.tolist(), mask.tolist(), 0.2, 0.28, 0.04)
    args = logprobs, old, ref, advantages, mask
    loss, _ = grpo_token_loss(*args, int(mask.sum()), epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    assert math.isclose(loss.item(), expected_token, rel_tol=1e-9)
    loss, _ = grpo_sequence_loss(*args, len(mask), epsilon_low=0.2, epsilon_high=0.28, beta=0.04)
    assert math.isclose(loss.item(), expected_sequence, rel_tol=1e-9)


@pytest.mark.parametrize("name", sorted(GRPO_AGGREGATIONS))
def test_grpo_losses_are_split_invariant(name):
    """Two ranks x two accumulation steps of uneven micro-batches (3, 1, 2, 2 completions), each normalised by the
    step's global count, add up to the whole step's loss, gradients and metric sums. Normalising each micro-batch
    by its own count instead (TRL's "bnpo" per micro-batch) would not."""
    logprobs, old, ref, advantages, mask = random_rollout(n=8, seed=2)
    logprobs.requires_grad_()
    normaliser = int(mask.sum()) if name == "token" else len(mask)

    def run(s, count=normaliser):
        return GRPO_AGGREGATIONS[name](logprobs[s], old[s], ref[s], advantages[s], mask[s], count,
                                       epsilon_low=0.2, epsilon_high=0.28, beta=0.1)

    whole, whole_metrics = run(slice(0, 8))
    (grad_whole,) = torch.autograd.grad(whole, logprobs)
    slices = [slice(a, b) for a, b in zip([0, 3, 4, 6], [3, 4, 6, 8], strict=True)]
    parts = [run(s) for s in slices]
    total = sum(loss for loss, _ in parts)
    (grad_parts,) = torch.autograd.grad(total, logprobs)
    assert torch.allclose(total, whole, atol=1e-6)
    assert torch.allclose(grad_parts, grad_whole, atol=1e-6)
    for key in ("loss_sum", "kl_sum", "clip_low_sum", "clip_high_sum", "clipped_sum", "ratio_sum", "tokens",
                "sequences"):
        assert torch.allclose(sum(m[key] for _, m in parts).double(), whole_metrics[key].double(), atol=1e-5), key
    assert torch.equal(min(m["ratio_min"] for _, m in parts), whole_metrics["ratio_min"])
    assert torch.equal(max(m["ratio_max"] for _, m in parts), whole_metrics["ratio_max"])
    if name == "token":
        local = sum(run(s, int(mask[s].sum()))[0] for s in slices) / len(slices)
        assert not torch.allclose(local, whole, atol=1e-3)


# Parity with TRL 1.16. The loss is GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), a method reading
# ~20 trainer attributes; we call that real method on a stand-in `self` holding only those, whose
# `_get_per_token_logps_and_entropies` returns our per-token log-probs (so gradients flow back to them). The
# advantages are computed inline in the 400-line GRPOTrainer._generate_and_score_completions, which needs the
# whole generation pipeline: there we transcribe TRL's lines (its "sum_then_normalize" branch, one reward
# function) and call TRL's own `nanstd` from trl/trainer/utils.py.


def trl_grpo(loss_type, logprobs, old, ref, advantages, mask, beta, eps_low, eps_high, num_items_in_batch=None,
             grad_accum=1, max_completion_length=None):
    """TRL 1.16's GRPO loss on one micro-batch, and its logged metrics (one process, token-level ratios)."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    n, t = mask.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=max_completion_length,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch))}
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_group_advantages_match_trl(scale_rewards):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (4 * 6,), generator=generator).float()  # discrete, so some groups are all equal
    rewards[:6] = 1.0
    num_generations = 6
    # Transcribed from TRL 1.16 GRPOTrainer._generate_and_score_completions (multi_objective_aggregation=
    # "sum_then_normalize", scale_rewards "group" or "none"):
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    expected = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        expected = expected / (std_rewards + 1e-4)
    ours = group_advantages(rewards, num_generations, scale_rewards=scale_rewards != "none")
    assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize(("trl_loss_type", "beta"), [("dapo", 0.0), ("dapo", 0.04), ("grpo", 0.04), ("bnpo", 0.04),
                                                     ("dr_grpo", 0.04)])
def test_grpo_loss_matches_trl(trl_loss_type, beta):
    """One micro-batch per step: TRL "dapo" and "bnpo" = ours token-level over the step's tokens, "dr_grpo" = ours
    token-level over N * max_completion_length, "grpo" = ours sequence-level. Loss, gradient and the logged KL and
    clip fractions agree; clip-higher on (eps 0.2 / 0.28)."""
    logprobs, old, ref, advantages, mask = random_rollout(n=6, t=7, seed=4)
    theirs_in = logprobs.clone().requires_grad_()
    theirs, logged = trl_grpo(trl_loss_type, theirs_in, old, ref, advantages, mask, beta, 0.2, 0.28,
                              max_completion_length=7)
    (grad_theirs,) = torch.autograd.grad(theirs, theirs_in)

    ours_in = logprobs.clone().requires_grad_()
    tokens = int(mask.sum())
    if trl_loss_type == "grpo":
        loss, metrics = grpo_sequence_loss(ours_in, old, ref, advantages, mask, len(mask), 0.2, 0.28, beta)
    else:
        loss, metrics = grpo_token_loss(ours_in, old, ref, advantages, mask,
                                        6 * 7 if trl_loss_type == "dr_grpo" else tokens, 0.2, 0.28, beta)
    (grad_ours,) = torch.autograd.grad(loss, ours_in)
    assert torch.allclose(loss, theirs, atol=1e-6)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)
    if beta:  # TRL logs the KL only when it is in the loss; we log it whenever a reference is given
        assert math.isclose(metrics["kl_sum"].item() / tokens, logged["kl"][0], abs_tol=1e-6)
    assert math.isclose(metrics["clip_low_sum"].item() / tokens, logged["clip_ratio/low_mean"][0], abs_tol=1e-6)
    assert math.isclose(metrics["clip_high_sum"].item() / tokens, logged["clip_ratio/high_mean"][0], abs_tol=1e-6)
    assert math.isclose(metrics["clipped_sum"].item() / tokens, logged["clip_ratio/region_mean"][0], abs_tol=1e-6)
    assert metrics["clipped_sum"].item() > 0  # the case exercises the clip


@pytest.mark.parametrize(("trl_loss_type", "aggregation"), [("dapo", "token"), ("grpo", "sequence")])
def test_grpo_accumulation_matches_trl(trl_loss_type, aggregation):
    """Two accumulation steps of 4 completions each: TRL's per-micro-batch losses ("dapo" with the generation
    batch's token count, "grpo" dividing by the accumulation steps) add up to ours over the whole step."""
    logprobs, old, ref, advantages, mask = random_rollout(n=8, t=6, seed=5)
    halves = (slice(0, 4), slice(4, 8))
    theirs = sum(trl_grpo(trl_loss_type, logprobs[s], old[s], ref[s], advantages[s], mask[s], 0.04, 0.2, 0.2,
                          num_items_in_batch=int(mask.sum()), grad_accum=2)[0] for s in halves)
    normaliser = int(mask.sum()) if aggregation == "token" else len(mask)
    ours, _ = GRPO_AGGREGATIONS[aggregation](logprobs, old, ref, advantages, mask, normaliser, beta=0.04)
    assert torch.allclose(ours, theirs, atol=1e-6)
