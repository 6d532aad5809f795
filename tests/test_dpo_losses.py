"""DPO losses: hand-computed values, a loop reference, split invariance, and parity with TRL 1.16 (STYLE.md, 2)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.dpo import (
    DPO_LOSSES,
    cdpo_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    robust_dpo_loss,
    segment_ids_from_lengths,
    sequence_logprob_sums,
)

LN3 = math.log(3.0)


def test_sequence_logprob_sums_packed_and_padded():
    """Sequences of lengths 3, 2, 1 packed in one row; masked-out positions (one of them -inf) add nothing.
    Sums: seq 0 = -1 - 2 = -3 (its first token is prompt), seq 1 = -4 - 5 = -9, seq 2 = 0 (no completion)."""
    logprobs = torch.tensor([[-0.5, -1.0, -2.0, -4.0, -5.0, -float("inf")]])
    mask = torch.tensor([[False, True, True, True, True, False]])
    segments = segment_ids_from_lengths([3, 2, 1])
    assert segments.tolist() == [[0, 0, 0, 1, 1, 2]]
    sums = sequence_logprob_sums(logprobs, mask, segments, num_sequences=3)
    assert sums.tolist() == [-3.0, -9.0, 0.0]
    assert sequence_logprob_sums(mask.float(), mask, segments, 3).tolist() == [2.0, 2.0, 0.0]  # lengths
    # The same sequences padded to [3, 3], one per row.
    padded = torch.tensor([[-0.5, -1.0, -2.0], [-4.0, -5.0, 7.0], [-float("inf"), 7.0, 7.0]])
    padded_mask = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    assert sequence_logprob_sums(padded, padded_mask).tolist() == [-3.0, -9.0, 0.0]
    with pytest.raises(ValueError, match="num_sequences"):
        sequence_logprob_sums(logprobs, mask, segments)


def test_sequence_logprob_sums_gradient_is_the_mask():
    logprobs = torch.randn(1, 6).requires_grad_()
    mask = torch.tensor([[False, True, True, True, True, False]])
    sums = sequence_logprob_sums(logprobs, mask, segment_ids_from_lengths([3, 2, 1]), 3)
    (grad,) = torch.autograd.grad(sums.sum(), logprobs)
    assert torch.equal(grad, mask.float())


def pairs_hand():
    """Pair 0: h_c = ln 3, h_r = -ln 3, so with beta = 1/2, beta h = ln 3 and sigmoid(beta h) = 3/4.
    Pair 1: everything equal, h = 0, a tie (sigmoid = 1/2)."""
    policy_chosen = torch.tensor([-2.0 + LN3, -1.0])
    policy_rejected = torch.tensor([-4.0 - LN3, -1.0])
    ref_chosen = torch.tensor([-2.0, -1.0])
    ref_rejected = torch.tensor([-4.0, -1.0])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_dpo_sigmoid_hand_computed():
    """Pairs of `pairs_hand`, beta = 1/2, step of 4 pairs: loss = (-ln 3/4 - ln 1/2) / 4 = (ln 4/3 + ln 2) / 4.
    Rewards beta h_c = (ln 3) / 2 and 0, beta h_r = -(ln 3) / 2 and 0: one correct pair, margin ln 3."""
    loss, metrics = dpo_sigmoid_loss(*pairs_hand(), num_pairs=4, beta=0.5)
    assert math.isclose(loss.item(), (math.log(4 / 3) + math.log(2)) / 4, rel_tol=1e-6)
    assert math.isclose(metrics["loss_sum"].item(), math.log(4 / 3) + math.log(2), rel_tol=1e-6)
    assert math.isclose(metrics["chosen_rewards_sum"].item(), LN3 / 2, rel_tol=1e-6)
    assert math.isclose(metrics["rejected_rewards_sum"].item(), -LN3 / 2, rel_tol=1e-6)
    assert metrics["reward_correct"].item() == 1 and metrics["pairs"].item() == 2
    assert math.isclose(metrics["reward_margin_sum"].item(), LN3, rel_tol=1e-6)


def test_reference_free_drops_the_reference():
    """Reference-free, h = log pi(y_c) - log pi(y_r): policy -1 vs -1 - 2 ln 3, beta = 1/2: beta h = ln 3, so the
    loss is ln 4/3; the same as passing a reference of zeros."""
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-1.0 - 2 * LN3])
    loss, metrics = dpo_sigmoid_loss(chosen, rejected, None, None, num_pairs=1, beta=0.5)
    assert math.isclose(loss.item(), math.log(4 / 3), rel_tol=1e-6)
    assert math.isclose(metrics["chosen_rewards_sum"].item(), -0.5, rel_tol=1e-6)
    zeros = torch.zeros(1)
    assert torch.equal(loss, dpo_sigmoid_loss(chosen, rejected, zeros, zeros, 1, beta=0.5)[0])
    with pytest.raises(ValueError, match="both"):
        dpo_sigmoid_loss(chosen, rejected, zeros, None, 1)


def test_ipo_hand_computed():
    """beta = 1/4, so the target 1 / (2 beta) = 2. Summed: h_c = 4, h_r = -4, h = 8: loss (8 - 2)^2 = 36.
    Length-normalised with 2 chosen and 4 rejected tokens: 4/2 - (-4/4) = 3, loss (3 - 2)^2 = 1."""
    args = torch.tensor([-6.0]), torch.tensor([-12.0]), torch.tensor([-10.0]), torch.tensor([-8.0])
    loss, metrics = ipo_loss(*args, num_pairs=1, beta=0.25)
    assert math.isclose(loss.item(), 36.0, rel_tol=1e-6)
    loss, metrics = ipo_loss(*args, num_pairs=1, beta=0.25, chosen_lengths=torch.tensor([2]),
                             rejected_lengths=torch.tensor([4]))
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-6)
    assert math.isclose(metrics["reward_margin_sum"].item(), 0.25 * 8, rel_tol=1e-6)  # rewards stay summed


def test_cdpo_and_robust_hand_computed():
    """Pair 0 of `pairs_hand` (sigmoid(beta h) = 3/4, sigmoid(-beta h) = 1/4), eps = 1/4:
    cDPO = -(3/4) ln(3/4) - (1/4) ln(1/4) = (3/4) ln(4/3) + (1/4) ln 4;
    rDPO = (-(3/4) ln(3/4) + (1/4) ln(1/4)) / (1 - 1/2) = 2 ((3/4) ln(4/3) - (1/4) ln 4). At eps = 0 both are DPO."""
    pair = [x[:1] for x in pairs_hand()]
    loss, _ = cdpo_loss(*pair, num_pairs=1, beta=0.5, label_smoothing=0.25)
    assert math.isclose(loss.item(), 0.75 * math.log(4 / 3) + 0.25 * math.log(4), rel_tol=1e-6)
    loss, _ = robust_dpo_loss(*pair, num_pairs=1, beta=0.5, label_smoothing=0.25)
    assert math.isclose(loss.item(), 2 * (0.75 * math.log(4 / 3) - 0.25 * math.log(4)), rel_tol=1e-6)
    dpo, _ = dpo_sigmoid_loss(*pair, num_pairs=1, beta=0.5)
    for fn in (cdpo_loss, robust_dpo_loss):
        assert torch.allclose(fn(*pair, num_pairs=1, beta=0.5, label_smoothing=0.0)[0], dpo)
        with pytest.raises(ValueError, match="label_smoothing"):
            fn(*pair, num_pairs=1, label_smoothing=0.5)


def test_robust_dpo_is_unbiased_under_label_flips():
    """Chowdhury et al. 2024: if a label is flipped with probability eps, E[rDPO] = the clean DPO loss, i.e.
    (1 - eps) rDPO(h) + eps rDPO(-h) = -log sigmoid(beta h); cDPO's expectation is not the clean loss."""
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=generator) for _ in range(4))
    eps = 0.2
    clean, _ = dpo_sigmoid_loss(pc, pr, rc, rr, num_pairs=6, beta=0.7)
    right, _ = robust_dpo_loss(pc, pr, rc, rr, num_pairs=6, beta=0.7, label_smoothing=eps)
    flipped, _ = robust_dpo_loss(pr, pc, rr, rc, num_pairs=6, beta=0.7, label_smoothing=eps)
    assert torch.allclose((1 - eps) * right + eps * flipped, clean, atol=1e-6)
    right, _ = cdpo_loss(pc, pr, rc, rr, num_pairs=6, beta=0.7, label_smoothing=eps)
    flipped, _ = cdpo_loss(pr, pc, rr, rc, num_pairs=6, beta=0.7, label_smoothing=eps)
    assert not torch.allclose((1 - eps) * right + eps * flipped, clean, atol=1e-3)


def loop_reference(name, pc, pr, rc, rr, beta, eps, lc, lr):
    """Each variant's per-pair formula written out with math, one pair at a time."""
    total = 0.0
    for i in range(len(pc)):
        hc, hr = pc[i] - rc[i], pr[i] - rr[i]
        z = beta * (hc - hr)
        log_sig, log_sig_neg = -math.log1p(math.exp(-z)), -math.log1p(math.exp(z))
        if name == "sigmoid":
            total += -log_sig
        elif name == "ipo":
            total += (hc / max(lc[i], 1) - hr / max(lr[i], 1) - 1 / (2 * beta)) ** 2
        elif name == "conservative":
            total += -(1 - eps) * log_sig - eps * log_sig_neg
        elif name == "robust":
            total += (-(1 - eps) * log_sig + eps * log_sig_neg) / (1 - 2 * eps)
    return total / len(pc)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_dpo_losses_match_a_loop(name):
    generator = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-5 * torch.rand(7, generator=generator, dtype=torch.float64) for _ in range(4))
    lc, lr = (torch.randint(0, 9, (7,), generator=generator) for _ in range(2))  # 0 lengths: clamped to 1
    extra = {"ipo": {"chosen_lengths": lc, "rejected_lengths": lr}, "conservative": {"label_smoothing": 0.15},
             "robust": {"label_smoothing": 0.15}}.get(name, {})
    loss, metrics = DPO_LOSSES[name](pc, pr, rc, rr, 7, beta=0.3, **extra)
    expected = loop_reference(name, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.3, 0.15, lc.tolist(),
                              lr.tolist())
    assert math.isclose(loss.item(), expected, rel_tol=1e-9)
    assert math.isclose(metrics["loss_sum"].item(), 7 * expected, rel_tol=1e-9)
    correct = sum(0.3 * (pc[i] - rc[i]) > 0.3 * (pr[i] - rr[i]) for i in range(7))
    assert metrics["reward_correct"].item() == correct


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_dpo_losses_are_split_invariant(name):
    """Two ranks x two accumulation steps of uneven micro-batches (3, 1, 4, 2 pairs), each normalised by the
    step's 10 pairs, add up to the whole step's loss, gradients and metric sums too."""
    generator = torch.Generator().manual_seed(2)
    pc, pr = (-5 * torch.rand(10, generator=generator) for _ in range(2))
    pc.requires_grad_(), pr.requires_grad_()
    rc, rr = (-5 * torch.rand(10, generator=generator) for _ in range(2))
    lc, lr = (torch.randint(1, 9, (10,), generator=generator) for _ in range(2))

    def run(s):
        extra = {"ipo": {"chosen_lengths": lc[s], "rejected_lengths": lr[s]}}.get(name, {})
        return DPO_LOSSES[name](pc[s], pr[s], rc[s], rr[s], 10, beta=0.2, **extra)

    whole, whole_metrics = run(slice(0, 10))
    grads_whole = torch.autograd.grad(whole, (pc, pr))
    cuts = [0, 3, 4, 8, 10]
    parts = [run(slice(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    total = sum(loss for loss, _ in parts)
    grads_parts = torch.autograd.grad(total, (pc, pr))
    assert torch.allclose(total, whole, atol=1e-6)
    for g_parts, g_whole in zip(grads_parts, grads_whole, strict=True):
        assert torch.allclose(g_parts, g_whole, atol=1e-6)
    for key, value in whole_metrics.items():
        assert torch.allclose(sum(m[key] for _, m in parts).float(), value.float(), atol=1e-5), key


# Parity with TRL 1.16: DPOTrainer._compute_loss is a method reading ~15 attributes of the trainer, and the loss is
# computed inline there (there is no separate `dpo_loss` in 1.16). We call that real method on a stand-in `self`
# holding only those attributes, with a stand-in model whose output carries the per-token log-probs TRL reads
# (`log_probs`, zero off the completion as TRL's fused head gives for labels -100) and the logging fields. Reference
# log-probs go in precomputed (`precompute_ref_logps=True`), as TRL's `ref_chosen_logps` / `ref_rejected_logps`.


def trl_dpo(loss_type, beta, label_smoothing, per_token_logps, completion_mask, ref_chosen, ref_rejected):
    """TRL 1.16's DPO loss and logged metrics. per_token_logps [2P, T-1] (chosen rows first, then rejected, as
    TRL's batch), completion_mask [2P, T]; TRL shifts the mask by one for the per-token log-probs."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    shift_mask = completion_mask[:, 1:]
    output = SimpleNamespace(
        log_probs=per_token_logps * shift_mask, entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps), is_top1=torch.zeros_like(shift_mask, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {
        "input_ids": torch.zeros_like(completion_mask, dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kwargs: output, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def padded_pairs(num_pairs=5, length=9, seed=3):
    """Per-token log-probs [2P, T-1] and a completion mask [2P, T]: a prompt of 1-3 tokens, a completion of 1-5."""
    generator = torch.Generator().manual_seed(seed)
    logps = -2 * torch.rand(2 * num_pairs, length - 1, generator=generator)
    mask = torch.zeros(2 * num_pairs, length, dtype=torch.long)
    for row in range(2 * num_pairs):
        start = int(torch.randint(1, 4, (1,), generator=generator))
        mask[row, start:start + int(torch.randint(1, 6, (1,), generator=generator))] = 1
    ref = -8 * torch.rand(2 * num_pairs, generator=generator)
    return logps, mask, ref


@pytest.mark.parametrize(("trl_name", "ours", "smoothing"), [
    ("sigmoid", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.2)])
def test_dpo_matches_trl_dpo_trainer(trl_name, ours, smoothing):
    """Same per-token log-probs into TRL's _compute_loss and into ours (sequence_logprob_sums + the loss): same loss,
    same gradient, same logged rewards. TRL's IPO divides h_c, h_r by the completion lengths: we pass them."""
    logps, mask, ref = padded_pairs()
    theirs_in = logps.clone().requires_grad_()
    theirs, logged = trl_dpo(trl_name, 0.3, smoothing, theirs_in, mask, *ref.chunk(2))
    (grad_theirs,) = torch.autograd.grad(theirs, theirs_in)

    ours_in = logps.clone().requires_grad_()
    shift_mask = mask[:, 1:].bool()
    policy_chosen, policy_rejected = sequence_logprob_sums(ours_in, shift_mask).chunk(2)  # [P] each
    extra = {}
    if ours == "ipo":
        lengths_chosen, lengths_rejected = shift_mask.sum(dim=1).chunk(2)
        extra = {"chosen_lengths": lengths_chosen, "rejected_lengths": lengths_rejected}
    elif smoothing:
        extra = {"label_smoothing": smoothing}
    loss, metrics = DPO_LOSSES[ours](policy_chosen, policy_rejected, *ref.chunk(2), num_pairs=5, beta=0.3, **extra)
    (grad_ours,) = torch.autograd.grad(loss, ours_in)

    assert torch.allclose(loss, theirs, atol=1e-6)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)
    assert math.isclose(metrics["chosen_rewards_sum"].item() / 5, logged["rewards/chosen"][0], abs_tol=1e-6)
    assert math.isclose(metrics["rejected_rewards_sum"].item() / 5, logged["rewards/rejected"][0], abs_tol=1e-6)
    assert math.isclose(metrics["reward_correct"].item() / 5, logged["rewards/accuracies"][0], abs_tol=1e-6)
    assert math.isclose(metrics["reward_margin_sum"].item() / 5, logged["rewards/margins"][0], abs_tol=1e-5)


def test_reference_free_and_cdpo_against_trl():
    """TRL 1.16 has neither a reference-free switch nor cDPO, so we check them through TRL's sigmoid loss:
    reference-free = TRL with zero reference log-probs; cDPO(h) = (1 - eps) DPO(h) + eps DPO(-h), the latter being
    TRL's sigmoid loss on the pairs with chosen and rejected swapped."""
    logps, mask, ref = padded_pairs(seed=4)
    chosen, rejected = sequence_logprob_sums(logps, mask[:, 1:].bool()).chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    free, _ = dpo_sigmoid_loss(chosen, rejected, None, None, num_pairs=5, beta=0.3)
    zeros = torch.zeros(5)
    assert torch.allclose(free, trl_dpo("sigmoid", 0.3, 0.0, logps, mask, zeros, zeros)[0], atol=1e-6)

    swap = torch.cat([logps[5:], logps[:5]]), torch.cat([mask[5:], mask[:5]])
    eps = 0.1
    expected = (1 - eps) * trl_dpo("sigmoid", 0.3, 0.0, logps, mask, ref_chosen, ref_rejected)[0] + eps * trl_dpo(
        "sigmoid", 0.3, 0.0, *swap, ref_rejected, ref_chosen)[0]
    ours, _ = cdpo_loss(chosen, rejected, ref_chosen, ref_rejected, num_pairs=5, beta=0.3, label_smoothing=eps)
    assert torch.allclose(ours, expected, atol=1e-6)
