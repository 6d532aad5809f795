"""AdamW with online merging, the Online Merging Optimizer (OMO; Lu et al. 2024, arXiv 2405.17931): every step's
AdamW update is merged with the SFT task vector tau = theta_SFT - theta_base before it is applied, which steers RLHF
toward the SFT model's direction and cuts the alignment tax. The merge rules are in align/merging.py. Runs with plain
torch, DDP and DeepSpeed ZeRO-3.

One step, per parameter tensor (Alg. 1 of the paper, with torch.optim.AdamW's arithmetic):
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2                      Alg. 1 lines 7-8
    delta = -lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)                 line 9
    theta <- (1 - lr wd) theta                                                        decoupled weight decay
    theta <- theta + (1 - alpha) F(delta) (+) alpha F(tau)                            lines 10-15, Eq. 3 or 5

Decisions where the reference code (QwenLM/online_merging_optimizers) departs from the paper; those about the merge
rule itself (rescaling, sign election, top-p ties) are at the top of align/merging.py:
- tau's random mask (OnDARE). Alg. 1 applies F_R(tau) inside the step loop, a fresh mask every step, so over a run
  every entry of tau pulls a little; the reference masks tau once at initialization, so the same p fraction of
  entries pulls at every step. Both are defensible: `OMOArgs.mask_tau_every_step` (default: the paper). OnTIES's
  top-p mask of tau is deterministic, so it is applied once in both cases.
- Rescaling. The reference OnDARE always divides kept entries by p (its dropout), so its p = 0.01 runs moved about
  as fast as AdamW; the paper's equations (and this default) do not, a ~100x smaller step. `OMOArgs.rescale`.
- `online_step > 1`, the step-K optimizer of Sec. 6.1 (Alg. 2), is not offered: the paper shows it drifts toward
  plain AdamW as K grows, it needs another model-sized buffer, and the reference's version returns from `step()`
  after the first parameter on K-1 of every K steps, so the other parameters are not updated at all.
- Weight decay is decoupled, dense, and kept out of the merge (Alg. 1 has none). It is applied before the update, as
  torch.optim.AdamW does, and the update is torch's, so variant "adamw" (or alpha = 0 with p = 1) is
  torch.optim.AdamW step for step. The reference decays the already-updated parameters and adds eps to sqrt(v)
  before bias correction (the HF AdamW's arithmetic).
- The reference clamps tau and the rescaled update to +-1 (`clip_val`); nothing is clamped here.

ZeRO-3. DeepSpeed's stage-3 optimizer calls this optimizer's step() once per sub-group, on one flat fp32 tensor per
param group: the concatenation, in order, of this rank's partition of each parameter in the sub-group
(`fp32_partitioned_groups_flat`). Partition r of a parameter of N entries is entries [r P, r P + P) of the flattened
parameter, P = ceil(N / world size), padded past N. So each optimizer tensor carries `Segment`s (which parameter,
where in the tensor, where in the parameter) and its tau in the same flat layout: `attach_task_vectors_zero3` builds
them from DeepSpeed's bookkeeping, `attach_task_vectors` for whole parameters (one process, DDP). Random masks hash
each entry's index in the full parameter, and top-p thresholds come from an exact radix select over the full
parameter that all-reduces histograms only, so ZeRO-3 gives the parameters one process gives. Padding is never
updated by the merge. Stage 1/2 (flat partitions that cut across parameters) are not supported.

tau lives in the optimizer state ("tau", with "segments"), so checkpoints carry it and a resumed run needs no base
model: the base weights are read once, to form tau, and can be freed. LoRA does not fit: adapters have no tau.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from align.merging import kth_largest, ondare_merge, onties_merge, random_keep, rescale_factors, reserve_count


@dataclass(frozen=True)
class OMOArgs:
    """Online merging settings; the paper's DPO runs used variant="ondare", reserve_rate=0.01, alpha=1e-7."""

    variant: Literal["adamw", "ondare", "onties"] = "adamw"
    """Merge rule: "adamw" (none), "ondare" (random sparsification, linear merge; the paper's best), "onties"."""
    reserve_rate: float = 0.01
    """p: fraction of the entries of each update, and of tau, kept (the paper's DPO runs: 0.01)."""
    alpha: float = 1e-7
    """Merging weight of tau (the paper searches 1e-4 down to 1e-7 and recommends starting at 1e-7)."""
    rescale: Literal["none", "inverse_p", "l1"] = "none"
    """Kept entries times 1 (the paper), 1/p (DARE; the reference OnDARE always), or to keep the L1 norm."""
    mask_tau_every_step: bool = True
    """OnDARE: draw tau's random mask afresh every step (the paper's Alg. 1), not once at the start (reference)."""
    sign_rule: Literal["weighted", "unweighted"] = "weighted"
    """OnTIES: elect signs from the weighted terms (the paper's Eq. 7) or from F(delta) + F(tau) (reference)."""
    seed: int = 0
    """Seed of OnDARE's random masks (the same on every rank)."""

    def __post_init__(self):
        if not 0 < self.reserve_rate <= 1:
            raise ValueError(f"reserve_rate={self.reserve_rate} must be in (0, 1]")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")


class Segment(NamedTuple):
    """One parameter's entries inside an optimizer tensor: the whole parameter, or this rank's ZeRO-3 partition."""

    key: int
    """Stable id of the parameter (CRC-32 of its name), which names its random masks."""
    start: int
    """Position of the first entry in the flattened optimizer tensor."""
    length: int
    """Entries held (padding excluded; may be 0)."""
    offset: int
    """Position of the first entry in the flattened full parameter."""
    numel: int
    """Entries of the full parameter."""


def param_key(name: str) -> int:
    return zlib.crc32(name.encode())


def mask_key(*parts: Any) -> tuple[int, int]:
    """Two 32-bit words for `random_keep`, from (seed, parameter, candidate, step); the same in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


class OnlineMergingAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW whose update is merged with the SFT task vector at every step (see the module docstring).

    Give each parameter its task vector before the first step, with `attach_task_vectors` (one process, DDP) or
    `attach_task_vectors_zero3` (after deepspeed.initialize). Variant "adamw" needs none.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        merge: OMOArgs = OMOArgs(),
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.merge = merge
        # Adds a tensor over the ranks that share each parameter (ZeRO-3's all-reduce); None while parameters are whole.
        self.sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._merge_rule = {
            "adamw": None,
            "ondare": functools.partial(ondare_merge, alpha=merge.alpha),
            "onties": functools.partial(onties_merge, alpha=merge.alpha, sign_rule=merge.sign_rule),
        }[merge.variant]

    @torch.no_grad()
    def set_task_vector(self, tensor: torch.Tensor, tau: torch.Tensor, segments: list[Segment]) -> None:
        """Attach tau to one optimizer tensor, in that tensor's layout (`segments` say which parameter entries it
        holds). Every rank calls it for the same tensors in the same order: OnTIES's thresholds span ranks."""
        if self._merge_rule is None:
            return
        tau = tau.detach().reshape(-1).to(tensor, copy=True)  # [numel]
        if self.merge.variant == "onties" or not self.merge.mask_tau_every_step:
            tau = self._sparsify(tau, segments, "tau", step=0)  # F(tau) is the same at every step: apply it once
        self.state[tensor]["tau"] = tau.view_as(tensor)
        self.state[tensor]["segments"] = [tuple(s) for s in segments]  # plain tuples survive load_state_dict

    def _sparsify(self, flat: torch.Tensor, segments: list[Segment], candidate: str, step: int) -> torch.Tensor:
        """F(x) of the entries `flat` holds: F_R (Eq. 4) for OnDARE, F_T (Eq. 6) for OnTIES; zero on padding."""
        m = self.merge
        pieces = [flat[s.start : s.start + s.length] for s in segments]
        if m.variant == "ondare":  # Eq. 4: Bernoulli(p) per entry, hashed from its index in the full parameter
            keeps = [
                random_keep(torch.arange(s.offset, s.offset + s.length, device=flat.device), m.reserve_rate,
                            mask_key(m.seed, s.key, candidate, step))
                for s in segments
            ]
        else:  # Eq. 6: |x| among the top p of the full parameter
            k = torch.tensor([reserve_count(s.numel, m.reserve_rate) for s in segments], device=flat.device)
            thresholds = kth_largest(pieces, k, self.sum_across_ranks)  # [S] over whole parameters
            keeps = [x.float().abs() >= t for x, t in zip(pieces, thresholds, strict=True)]
        scales = rescale_factors(pieces, keeps, m.reserve_rate, m.rescale, self.sum_across_ranks)  # [S]
        sparse = torch.zeros_like(flat)
        for s, x, keep, scale in zip(segments, pieces, keeps, scales, strict=True):
            sparse[s.start : s.start + s.length] = torch.where(keep, x * scale, 0)
        return sparse

    def _adamw_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Decay p (decoupled) and return AdamW's update delta, with torch.optim.AdamW's arithmetic."""
        state = self.state[p]
        if "step" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step, (beta1, beta2), grad = state["step"], group["betas"], p.grad
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)  # Alg. 1 line 7
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # line 8
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])  # line 9, bias-corrected
        update = torch.zeros_like(p, memory_format=torch.contiguous_format)  # flat views follow the segments
        return update.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """theta <- (1 - lr wd) theta + merge(F(delta), F(tau)) for every tensor with a gradient (Alg. 1)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._merge_rule is not None and "tau" not in self.state[p]:
                    raise RuntimeError("a parameter has no task vector: call attach_task_vectors(_zero3) first")
                update = self._adamw_update(p, group)
                if self._merge_rule is not None:
                    update = self._merged(p, update)
                p.add_(update)
        return loss

    def _merged(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        segments, step = [Segment(*s) for s in state["segments"]], state["step"]
        tau = state["tau"].view(-1)
        if self.merge.variant == "ondare" and self.merge.mask_tau_every_step:
            tau = self._sparsify(tau, segments, "tau", step)
        sparse_update = self._sparsify(update.view(-1), segments, "update", step)
        return self._merge_rule(sparse_update, tau).view_as(p)  # Eq. 3 (OnDARE) or Eq. 5 and 7 (OnTIES)


def attach_task_vectors(
    optimizer: OnlineMergingAdamW, model: torch.nn.Module, task_vectors: Mapping[str, torch.Tensor]
) -> None:
    """One process or DDP: give every parameter of `optimizer` its task vector theta_SFT - theta_base.

    Args:
        model: the unwrapped model, whose parameter names key `task_vectors`.
        task_vectors: full-shaped tau by parameter name; a dict, or a lazy Mapping to hold one tensor at a time.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            optimizer.set_task_vector(p, task_vectors[name], [Segment(param_key(name), 0, p.numel(), 0, p.numel())])


def attach_task_vectors_zero3(
    zero_optimizer: Any, model: torch.nn.Module, task_vectors: Mapping[str, torch.Tensor]
) -> None:
    """DeepSpeed ZeRO-3, after deepspeed.initialize, on every rank: give each flat fp32 partition its slice of tau.

    Args:
        zero_optimizer: DeepSpeed's stage-3 optimizer wrapping an OnlineMergingAdamW (`engine.model.optimizer` of
            align.engine.TrainEngine; the optimizer deepspeed.initialize returns).
        model: the unwrapped module (`engine.unwrapped`), whose parameter names key `task_vectors`.
        task_vectors: full-shaped tau by parameter name, formed before partitioning (or read lazily); each rank keeps
            only its partition.
    Uses DeepSpeed 0.19's stage-3 bookkeeping: `fp16_groups` (parameters per sub-group), `fp32_partitioned_groups_flat`
    and the sub-groups' process groups.
    """
    import deepspeed.comm as dist

    if not hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        raise TypeError(f"{type(zero_optimizer).__name__} is not DeepSpeed's ZeRO stage-3 optimizer")
    groups = set(zero_optimizer.sub_group_process_groups)
    if len(groups) != 1:
        raise NotImplementedError("parameters partitioned over different process groups")
    process_group = groups.pop()

    def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=process_group)
        return t

    optimizer: OnlineMergingAdamW = zero_optimizer.optimizer
    optimizer.sum_across_ranks = sum_across_ranks
    names = {id(p): name for name, p in model.named_parameters()}
    rank = dist.get_rank(group=process_group)
    for params, flat in zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat, strict=True):
        tau, segments, start = torch.zeros_like(flat), [], 0  # [partition numel of the sub-group]
        for param in params:
            size, name = param.partition_numel(), names[id(param)]
            offset = rank * size
            length = max(0, min(size, param.ds_numel - offset))
            tau[start : start + length] = task_vectors[name].reshape(-1)[offset : offset + length]
            segments.append(Segment(param_key(name), start, length, offset, param.ds_numel))
            start += size
        if start != flat.numel():
            raise RuntimeError(f"sub-group partitions hold {start} entries, the fp32 partition {flat.numel()}")
        optimizer.set_task_vector(flat, tau, segments)
