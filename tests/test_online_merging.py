"""Online Merging Optimizer (align/merging.py, align/optimizers.py): plain AdamW as the special case alpha = 0, p = 1;
merges worked out by hand; loop references for the merge, the threshold, the hash and a whole step; split invariance
over simulated ranks; resume from a state dict; ZeRO-3 on 2 ranks against one process."""

import importlib.util
import io
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from align.config import parse_config
from align.merging import (
    _mix32,
    kth_largest,
    ondare_merge,
    onties_merge,
    random_keep,
    rescale_factors,
    reserve_count,
)
from align.optimizers import OMOArgs, OnlineMergingAdamW, Segment, attach_task_vectors, mask_key, param_key

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "omo_zero3.py"
ZERO3 = REPO / "recipes" / "configs" / "accelerate" / "zero3.yaml"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def random_tau(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)) for _ in range(n)]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("variant", ["adamw", "ondare", "onties"])
def test_no_merge_weight_and_full_reserve_is_torch_adamw(variant):
    """alpha = 0 and p = 1 keep every entry of the update and none of tau: bit for bit torch.optim.AdamW, with
    decoupled weight decay on the matrices only, over several steps."""
    ours, theirs = tiny_model(), tiny_model()
    merge = OMOArgs(variant=variant, reserve_rate=1.0, alpha=0.0)
    optimizer = OnlineMergingAdamW(decay_groups(ours, 0.1), lr=1e-2, betas=(0.9, 0.95), merge=merge)
    attach_task_vectors(optimizer, ours, random_tau(ours))
    train(ours, optimizer, batches(6))
    train(theirs, torch.optim.AdamW(decay_groups(theirs, 0.1), lr=1e-2, betas=(0.9, 0.95)), batches(6))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ondare_hand_computed():
    """delta = [0.4, -0.2, 0.1, 0.8], tau = [1, 2, -3, 4], p = 1/2, alpha = 1/4; the masks keep delta's entries 0 and
    2, tau's 1 and 2. No rescaling (the paper): F(delta) = [0.4, 0, 0.1, 0], F(tau) = [0, 2, -3, 0], and Eq. 3 gives
    3/4 F(delta) + 1/4 F(tau) = [0.3, 0.5, 0.075 - 0.75, 0] = [0.3, 0.5, -0.675, 0]. Rescaled by 1/p (DARE): twice
    that. Rescaled to keep the L1 norm: delta's factor is 1.5 / 0.5 = 3 and tau's 10 / 5 = 2, so
    3/4 [1.2, 0, 0.3, 0] + 1/4 [0, 4, -6, 0] = [0.9, 1, 0.225 - 1.5, 0] = [0.9, 1, -1.275, 0]."""
    delta, tau = torch.tensor([0.4, -0.2, 0.1, 0.8]), torch.tensor([1.0, 2.0, -3.0, 4.0])
    keep_delta, keep_tau = torch.tensor([True, False, True, False]), torch.tensor([False, True, True, False])

    def merged(rescale):
        s_delta, s_tau = rescale_factors([delta, tau], [keep_delta, keep_tau], 0.5, rescale)
        return ondare_merge(torch.where(keep_delta, delta * s_delta, 0), torch.where(keep_tau, tau * s_tau, 0), 0.25)

    assert_close(merged("none"), torch.tensor([0.3, 0.5, -0.675, 0.0]))
    assert_close(merged("inverse_p"), torch.tensor([0.6, 1.0, -1.35, 0.0]))
    assert_close(merged("l1"), torch.tensor([0.9, 1.0, -1.275, 0.0]))


def test_onties_hand_computed():
    """delta = [0.3, -0.1, 0.2, -0.4], tau = [-2, 1, 4, -0.5], p = 1/2 (k = 2 of 4), alpha = 0.1.
    Top-2 thresholds |delta| >= 0.3 and |tau| >= 2: F(delta) = [0.3, 0, 0, -0.4], F(tau) = [-2, 0, 4, 0].
    Weighted terms a = 0.9 F(delta) = [0.27, 0, 0, -0.36], b = 0.1 F(tau) = [-0.2, 0, 0.4, 0].
    Eq. 7: entry 0's signs differ and |0.27| > |-0.2|, so 0.27; entries 2 and 3 have one term: [0.27, 0, 0.4, -0.36].
    The reference's unweighted election, sign(F(delta) + F(tau)) = [-1, 0, 1, -1], keeps b at entry 0 instead:
    [-0.2, 0, 0.4, -0.36]. An exact tie a = 0.25, b = -0.25 gives a + b = 0 (Eq. 7, both indicators true)."""
    delta, tau = torch.tensor([0.3, -0.1, 0.2, -0.4]), torch.tensor([-2.0, 1.0, 4.0, -0.5])
    thresholds = kth_largest([delta, tau], torch.tensor([reserve_count(4, 0.5)] * 2))
    assert_close(thresholds, torch.tensor([0.3, 2.0]))
    sparse_delta, sparse_tau = (torch.where(x.abs() >= t, x, 0) for x, t in zip((delta, tau), thresholds, strict=True))
    assert_close(onties_merge(sparse_delta, sparse_tau, 0.1), torch.tensor([0.27, 0.0, 0.4, -0.36]))
    assert_close(onties_merge(sparse_delta, sparse_tau, 0.1, "unweighted"), torch.tensor([-0.2, 0.0, 0.4, -0.36]))
    assert onties_merge(torch.tensor([0.5]), torch.tensor([-0.5]), 0.5).item() == 0.0


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def eq7(a: float, b: float) -> float:
    """The paper's Eq. 7, literally."""
    if sign(a) == sign(b):
        return a + b
    return a * (abs(a) >= abs(b)) + b * (abs(b) >= abs(a))


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_onties_merge_matches_a_loop(alpha):
    """Random sparse candidates, with exact ties (tau = -delta, so at alpha = 1/2 the terms cancel) and zeros."""
    generator = torch.Generator().manual_seed(3)
    update, tau = torch.randn(200, generator=generator), torch.randn(200, generator=generator)
    update[torch.rand(200, generator=generator) < 0.3] = 0
    tau[torch.rand(200, generator=generator) < 0.3] = 0
    tau[:20] = -update[:20]
    a, b = ((1 - alpha) * update).tolist(), (alpha * tau).tolist()
    assert_close(onties_merge(update, tau, alpha), torch.tensor([eq7(x, y) for x, y in zip(a, b, strict=True)]))
    elected = [sign(u + t) for u, t in zip(update.tolist(), tau.tolist(), strict=True)]
    unweighted = [x * (sign(x) == e) + y * (sign(y) == e) for x, y, e in zip(a, b, elected, strict=True)]
    assert_close(onties_merge(update, tau, alpha, "unweighted"), torch.tensor(unweighted))


def test_kth_largest_matches_a_sort():
    """Segments of several sizes with zeros, repeated values, negatives and a one-entry segment."""
    generator = torch.Generator().manual_seed(4)
    segments = [torch.randn(n, generator=generator) for n in (1, 7, 100, 1000)]
    segments[2][:40] = 0.0
    segments[3][::3] = -0.5
    for p in (0.01, 0.3, 1.0):
        k = torch.tensor([reserve_count(x.numel(), p) for x in segments])
        expected = [sorted(x.abs().tolist(), reverse=True)[kk - 1] for x, kk in zip(segments, k.tolist(), strict=True)]
        assert kth_largest(segments, k).tolist() == expected


def test_hash_matches_a_python_loop():
    """The int64 halves in `_mul32` reproduce exact 32-bit arithmetic (lowbias32 written with Python ints)."""
    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1] + list(range(1000, 1100))
    assert _mix32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


def test_random_keep_rate_independence_and_layout():
    """The kept fraction is p, masks of different keys are independent (overlap p^2), and a slice of the index
    range draws the same entries as the whole parameter does."""
    index = torch.arange(200_000)
    first = random_keep(index, 0.3, mask_key(0, param_key("w"), "update", 1))
    second = random_keep(index, 0.3, mask_key(0, param_key("w"), "update", 2))
    sigma = math.sqrt(0.3 * 0.7 / index.numel())
    assert abs(first.float().mean().item() - 0.3) < 5 * sigma
    assert abs((first & second).float().mean().item() - 0.09) < 5 * sigma
    assert torch.equal(random_keep(index[777:5555], 0.3, mask_key(0, param_key("w"), "update", 1)), first[777:5555])
    assert random_keep(index, 1.0, (5, 6)).all() and not random_keep(index, 0.0, (5, 6)).any()


@pytest.mark.parametrize("every_step", [True, False])
def test_ondare_zero_gradient_step_adds_alpha_masked_tau(every_step):
    """A zero gradient makes AdamW's update 0, so a step adds exactly alpha F_R(tau): tau where `random_keep` fires
    for the parameter's key. The mask is drawn afresh each step (Alg. 1) or once (the reference code)."""
    model = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(4000))})
    tau = torch.randn(4000, generator=torch.Generator().manual_seed(5))
    merge = OMOArgs(variant="ondare", reserve_rate=0.25, alpha=0.5, mask_tau_every_step=every_step, seed=3)
    optimizer = OnlineMergingAdamW(model.parameters(), lr=0.1, weight_decay=0.0, merge=merge)
    attach_task_vectors(optimizer, model, {"w": tau})
    masks = []
    for step in (1, 2):
        model["w"].data.zero_()
        model["w"].grad = torch.zeros(4000)
        optimizer.step()
        keep = random_keep(torch.arange(4000), 0.25, mask_key(3, param_key("w"), "tau", step if every_step else 0))
        assert torch.equal(model["w"].detach(), torch.where(keep, 0.5 * tau, 0))
        masks.append(keep)
    assert abs(masks[0].float().mean().item() - 0.25) < 0.03
    assert torch.equal(masks[0], masks[1]) != every_step


def reference_step(theta, grad, m, v, t, tau, merge, name, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1):
    """Alg. 1 for one parameter, entry by entry in Python floats (rescale "none", sign rule "weighted")."""
    (b1, b2), n, alpha, p = betas, len(theta), merge.alpha, merge.reserve_rate
    m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grad, strict=True)]
    v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grad, strict=True)]
    delta = [-lr / (1 - b1**t) * mi / (math.sqrt(vi / (1 - b2**t)) + eps) for mi, vi in zip(m, v, strict=True)]
    theta = [(1 - lr * wd) * x for x in theta]
    if merge.variant == "ondare":
        keep_d = random_keep(torch.arange(n), p, mask_key(merge.seed, param_key(name), "update", t)).tolist()
        keep_t = random_keep(torch.arange(n), p, mask_key(merge.seed, param_key(name), "tau", t)).tolist()
        candidates = zip(delta, tau, keep_d, keep_t, strict=True)
        merged = [(1 - alpha) * d * kd + alpha * x * kt for d, x, kd, kt in candidates]
    else:
        k = reserve_count(n, p)
        top_d, top_t = (sorted(map(abs, xs), reverse=True)[k - 1] for xs in (delta, tau))
        candidates = zip(delta, tau, strict=True)
        merged = [eq7((1 - alpha) * d * (abs(d) >= top_d), alpha * x * (abs(x) >= top_t)) for d, x in candidates]
    return [x + u for x, u in zip(theta, merged, strict=True)], m, v


@pytest.mark.parametrize("variant", ["ondare", "onties"])
def test_optimizer_matches_a_loop_over_entries(variant):
    """Three steps on one 300-entry parameter against `reference_step`. eps = 1e-3 spreads step 1's update magnitudes,
    lr |g| / (|g| + eps), wider than float32 rounding; at eps = 1e-8 they all round to about lr, and float32 ties
    at the top-p threshold (all kept) would differ from the float64 loop's exact k."""
    generator = torch.Generator().manual_seed(6)
    merge = OMOArgs(variant=variant, reserve_rate=0.2, alpha=0.3, seed=1)
    theta, tau = torch.randn(300, generator=generator), 0.01 * torch.randn(300, generator=generator)
    model = torch.nn.ParameterDict({"w": torch.nn.Parameter(theta.clone())})
    optimizer = OnlineMergingAdamW([{"params": [model["w"]], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                                   eps=1e-3, merge=merge)
    attach_task_vectors(optimizer, model, {"w": tau})
    expected, m, v = theta.tolist(), [0.0] * 300, [0.0] * 300
    for t in (1, 2, 3):
        grad = 1e-3 * torch.randn(300, generator=generator)
        model["w"].grad = grad
        optimizer.step()
        expected, m, v = reference_step(expected, grad.tolist(), m, v, t, tau.tolist(), merge, "w", eps=1e-3)
        assert_close(model["w"].detach(), torch.tensor(expected), rtol=1e-5, atol=1e-7)


SHAPES = {"w0": (7, 5), "b0": (7,), "w2": (3, 7), "b2": (3,)}
SUB_GROUPS = [["w0"], ["w2"], ["b0", "b2"]]  # as ZeRO-3 splits the decayed and the undecayed group (sub_group_size)


def zero3_layout(full: dict[str, torch.Tensor], rank: int, world: int) -> tuple[list[torch.Tensor], list[list]]:
    """Rank `rank`'s flat tensors as ZeRO-3 lays them out (fp32_partitioned_groups_flat): per sub-group, each
    parameter's entries [r P, r P + P), P = ceil(N / world), zero-padded; and their segments."""
    flats, segments = [], []
    for names in SUB_GROUPS:
        pieces, segs, start = [], [], 0
        for name in names:
            n = full[name].numel()
            size = -(-n // world)
            offset, length = rank * size, max(0, min(size, n - rank * size))
            piece = torch.zeros(size)
            piece[:length] = full[name].reshape(-1)[offset : offset + length]
            pieces.append(piece)
            segs.append(Segment(param_key(name), start, length, offset, n))
            start += size
        flats.append(torch.cat(pieces))
        segments.append(segs)
    return flats, segments


def gather(per_rank: list[list[torch.Tensor]], segments: list[list[list[Segment]]]) -> dict[str, torch.Tensor]:
    full = {name: torch.zeros(shape).reshape(-1) for name, shape in SHAPES.items()}
    names = {param_key(name): name for name in SHAPES}
    for flats, rank_segments in zip(per_rank, segments, strict=True):
        for flat, segs in zip(flats, rank_segments, strict=True):
            for s in segs:
                full[names[s.key]][s.offset : s.offset + s.length] = flat[s.start : s.start + s.length]
    return {name: full[name].reshape(shape) for name, shape in SHAPES.items()}


def run_ranks(world: int, fn) -> list:
    """Run fn(rank, sum_across_ranks) on `world` threads whose sum_across_ranks adds a tensor over all of them."""
    barrier, slots, results, errors = threading.Barrier(world, timeout=60), [None] * world, [None] * world, []

    def sum_across_ranks_of(rank):
        def sum_across_ranks(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()
            return total
        return sum_across_ranks

    def target(rank):
        try:
            results[rank] = fn(rank, sum_across_ranks_of(rank))
        except BaseException as error:  # noqa: B036 - re-raised below; abort so the other rank does not wait
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("merge", [
    OMOArgs(variant="ondare", reserve_rate=0.4, alpha=0.3, rescale="inverse_p", seed=2),
    OMOArgs(variant="ondare", reserve_rate=0.4, alpha=0.3, mask_tau_every_step=False),
    OMOArgs(variant="onties", reserve_rate=0.3, alpha=0.3, rescale="l1"),
    OMOArgs(variant="onties", reserve_rate=0.3, alpha=0.3, sign_rule="unweighted"),
], ids=["ondare-inverse_p", "ondare-tau-once", "onties-l1", "onties-unweighted"])
def test_partitioned_over_two_ranks_equals_one_process(merge):
    """Split invariance without DeepSpeed: two simulated ranks, each stepping its padded ZeRO-3 partitions (one flat
    tensor holds two parameters) with histograms and norms added across ranks, end where one process ends."""
    generator = torch.Generator().manual_seed(7)
    theta = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    tau = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    grads = [{name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()} for _ in range(3)]

    model = torch.nn.ParameterDict({name: torch.nn.Parameter(x.clone()) for name, x in theta.items()})
    groups = [{"params": [model["w0"], model["w2"]], "weight_decay": 0.1},
              {"params": [model["b0"], model["b2"]], "weight_decay": 0.0}]
    optimizer = OnlineMergingAdamW(groups, lr=1e-2, merge=merge)
    attach_task_vectors(optimizer, model, tau)
    for step_grads in grads:
        for name, p in model.items():
            p.grad = step_grads[name]
        optimizer.step()

    def rank_run(rank, sum_across_ranks):
        flats, segments = zero3_layout(theta, rank, 2)
        taus, _ = zero3_layout(tau, rank, 2)
        rank_optimizer = OnlineMergingAdamW([{"params": flats[:2], "weight_decay": 0.1},
                                             {"params": flats[2:], "weight_decay": 0.0}], lr=1e-2, merge=merge)
        rank_optimizer.sum_across_ranks = sum_across_ranks
        for flat, flat_tau, segs in zip(flats, taus, segments, strict=True):
            rank_optimizer.set_task_vector(flat, flat_tau, segs)
        for step_grads in grads:
            for flat, grad in zip(flats, zero3_layout(step_grads, rank, 2)[0], strict=True):
                flat.grad = grad
            rank_optimizer.step()
        return flats, segments

    results = run_ranks(2, rank_run)
    gathered = gather([flats for flats, _ in results], [segments for _, segments in results])
    for name, p in model.items():
        assert_close(gathered[name], p.detach(), rtol=1e-6, atol=1e-7)


def test_state_dict_carries_tau_so_a_resumed_run_needs_no_base():
    """Two steps, a checkpoint through torch.save, two more steps in a fresh optimizer given no task vectors: the
    same as four steps straight."""
    merge = OMOArgs(variant="ondare", reserve_rate=0.3, alpha=0.2)
    straight, first = tiny_model(), tiny_model()
    for model in (straight, first):
        model.optimizer = OnlineMergingAdamW(decay_groups(model, 0.1), lr=1e-2, merge=merge)
        attach_task_vectors(model.optimizer, model, random_tau(model))
    train(straight, straight.optimizer, batches(4))
    train(first, first.optimizer, batches(4)[:2])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = tiny_model()
    resumed.load_state_dict(checkpoint["model"])
    optimizer = OnlineMergingAdamW(decay_groups(resumed, 0.1), lr=1e-2, merge=merge)
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, optimizer, batches(4)[2:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_merging_step_without_task_vectors_fails():
    model = tiny_model()
    optimizer = OnlineMergingAdamW(model.parameters(), merge=OMOArgs(variant="onties"))
    with pytest.raises(RuntimeError, match="task vector"):
        train(model, optimizer, batches(1))


@dataclass(frozen=True)
class RecipeWithMerging:
    merge: OMOArgs = field(default_factory=OMOArgs)
    """Online merging."""


def test_omo_args_nest_in_a_recipe_config():
    cfg = parse_config(RecipeWithMerging, ["--merge-variant", "onties", "--merge-alpha", "1e-4"])
    assert cfg.merge == OMOArgs(variant="onties", alpha=1e-4)
    for bad in ({"reserve_rate": 0.0}, {"reserve_rate": 1.5}, {"alpha": -1e-7}):
        with pytest.raises(ValueError):
            OMOArgs(**bad)


def load_script():
    spec = importlib.util.spec_from_file_location("omo_zero3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ondare", "onties"])
def test_zero3_two_ranks_match_one_process(variant, tmp_path):
    """DeepSpeed ZeRO-3 over 2 gloo ranks (padded partitions, 3 sub-groups, one micro-batch per rank) through
    TrainEngine and attach_task_vectors_zero3 ends with the parameters of one process accumulating both."""
    out = tmp_path / "zero3.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3), str(SCRIPT),
               variant, str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    zero3, single = torch.load(out), load_script().train_single(variant)
    assert zero3.keys() == single.keys()
    for name, p in single.items():
        assert_close(zero3[name], p, rtol=1e-6, atol=1e-7, msg=name)
