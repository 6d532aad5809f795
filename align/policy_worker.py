"""GRPO's policy and reference workers: Ray actors that are the ranks of one DeepSpeed ZeRO-3 group.

    group = PolicyWorkerGroup(PolicyArgs(model_path="sft/final", resources=ActorResources(num_actors=2)),
                              total_steps=100)
    metrics = group.train_step(samples, loss)          # one optimizer step on all ranks
    group.sync_weights(rollout.actors, version=1)      # gathered parameter by parameter, sent in buckets
    group.save(directory); group.export(final_dir)

Every rank holds 1/N of the policy's parameters and optimizer state (ZeRO-3), and, when the KL term is on, 1/N of
a frozen reference model wrapped by ZeRO-3 without an optimizer (colocated with the policy, the memory-saving
layout). The driver deals a step's samples into packed micro-batches, the same number per rank (ZeRO-3 gathers
parameters collectively, so every rank must make the same forward/backward calls; a rank short of work runs an
empty micro-batch with its loss multiplied by 0), and passes the step's global completion-token count, which the
loss divides by (align.grpo): the gradient is then the same however the samples are split across ranks.

One policy update per rollout batch: the completions were sampled by the current weights (synced after every
update), so the "old" log-probs of the ratio are this forward pass's own, detached. The ratio is then exactly 1
and the clip inactive, as in TRL's GRPOTrainer with num_iterations=1. vLLM's log-probs of the same tokens come
along to measure the policy/vLLM gap: a sync that silently did nothing shows up there at once.

GPUs: the same code with NCCL instead of gloo and DS_ACCELERATOR unset; not run on the project's CPU machines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
import torch
from ray.util.placement_group import remove_placement_group

from align.actors import ActorResources, DistributedActor, form_process_group, start_actors, zero3_inference_config
from align.data import TokenizedChat, collate, plan_micro_batches, plan_steps
from align.grpo import GRPO_AGGREGATIONS
from align.model import load_pretrained, save_state_dict
from align.model.config import resolve_dtype


@dataclass(frozen=True)
class PolicyArgs:
    """The policy (and reference) workers: model, optimizer, resources."""

    model_path: str = ""
    """Policy start (HF directory); the reference model is the same checkpoint, frozen."""
    resources: ActorResources = field(default_factory=ActorResources)
    """The ranks of the ZeRO-3 group: how many, CPUs and GPUs each, placement."""
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Weights in the forward/backward passes: bfloat16 on GPUs and AMX CPUs (DeepSpeed keeps float32 master
    weights), float32 on CPUs without native bf16; "auto" picks between the two (align.model.config.resolve_dtype):
    recipes/grpo.py resolves it once on the launching machine, a PolicyWorkerGroup built directly on each rank's."""
    lr: float = 1e-5
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (prompt + completion tokens)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass."""
    skip_zero_advantage: bool = True
    """Without a KL term, leave samples whose advantage is exactly 0 (every sample of a zero-variance group) out of
    the forward and backward passes: their loss and its gradient are exactly 0, and the loss is still divided by the
    token (or sequence) count of all samples, so the update is the one training on them would make, for less
    compute. The optimizer steps even when every sample is left out (Adam's moments still move the weights)."""
    collective_timeout_s: float = 1800.0
    """Timeout of the group's collectives (a hung rank fails the step instead of hanging the run)."""


@dataclass(frozen=True)
class LossArgs:
    """GRPO objective (align.grpo)."""

    aggregation: str = "token"
    """"token": mean over all completion tokens of the step (DAPO); "sequence": per-sequence mean (DeepSeekMath)."""
    epsilon_low: float = 0.2
    """Lower clip of the importance ratio."""
    epsilon_high: float = 0.28
    """Upper clip (DAPO's clip-higher; equal to epsilon_low for the paper's symmetric clip)."""
    kl_beta: float = 0.0
    """Coefficient of the k3 KL to the reference (0: no reference model is held)."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by their std (GRPO); False only centres them (Dr. GRPO), so groups whose
    rewards barely differ get small advantages instead of unit-scale ones."""

    def __post_init__(self):
        if self.aggregation not in GRPO_AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: expected one of {sorted(GRPO_AGGREGATIONS)}")


@dataclass(frozen=True)
class TrainSample:
    """One completion with its prompt, ready for the policy loss."""

    token_ids: list[int]
    """Prompt + completion tokens."""
    completion_start: int
    """Index in token_ids of the first completion token."""
    advantage: float
    """Group-normalised advantage (align.grpo.group_advantages)."""
    rollout_logprobs: list[float] = field(default_factory=list)
    """vLLM's log-probs of the completion tokens: the sampling policy's, so the importance ratio's denominator
    (where given; else the policy's own detached log-probs, ratio 1) and the policy/vLLM gap metric."""

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.completion_start


def zero3_training_config(max_grad_norm: float, bf16: bool = False) -> dict:
    """ZeRO-3 with a client optimizer; the step boundary is set per call (see PolicyActor.train_step)."""
    return {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def completion_view(flat: torch.Tensor, samples: Sequence[TrainSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion-token values [N, L] (L the longest completion) and mask [N, L], from a packed row [S] whose
    position t scores token t + 1 of the same sequence (so completion token k is read at position k - 1)."""
    longest = max(s.num_completion_tokens for s in samples)
    index = torch.zeros(len(samples), longest, dtype=torch.long)  # [N, L]
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)  # [N, L]
    offset = 0
    for i, sample in enumerate(samples):
        n = sample.num_completion_tokens
        index[i, :n] = torch.arange(offset + sample.completion_start - 1, offset + len(sample.token_ids) - 1)
        mask[i, :n] = True
        offset += len(sample.token_ids)
    index, mask = index.to(flat.device), mask.to(flat.device)
    return flat[index] * mask, mask  # [N, L]


def split_groups(samples: Sequence[TrainSample], group_size: int, count: int) -> list[list[TrainSample]]:
    """`samples` (whole groups of `group_size`, one after another) as at most `count` mini-batches of whole
    groups, the first ones one group larger when the groups do not divide evenly; none empty."""
    if len(samples) % group_size:
        raise ValueError(f"{len(samples)} samples are not whole groups of {group_size}")
    groups = [list(samples[i:i + group_size]) for i in range(0, len(samples), group_size)]
    count = max(1, min(count, len(groups)))
    size, extra = divmod(len(groups), count)
    out, start = [], 0
    for k in range(count):
        end = start + size + (k < extra)
        out.append([sample for group in groups[start:end] for sample in group])
        start = end
    return out


def sampling_logprobs(logprobs: torch.Tensor, samples: Sequence[TrainSample]) -> torch.Tensor:
    """The importance ratio's denominator [N, L]: each sample's rollout log-probs where it has them, else the
    policy's own (detached; ratio 1). After a sync the two agree to ~1e-6 here (logged as logprob_gap), so on the
    first update of a rollout batch the ratio is 1 and the clip inactive; on the later mini-batches of the same
    rollout batch the policy has moved, and the ratio and its clip act as in PPO."""
    old = logprobs.detach().clone()  # [N, L]
    for i, sample in enumerate(samples):
        if sample.rollout_logprobs:
            n = len(sample.rollout_logprobs)
            old[i, :n] = torch.tensor(sample.rollout_logprobs, dtype=old.dtype, device=old.device)
    return old


def add_step_metrics(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """`total` with `part` added: sums, except ratio_min (min), ratio_max, grad_norm and skipped (max: over ranks
    they are equal, over a step's mini-batches the worst counts) and lr (the latest)."""
    out = dict(total)
    for key, value in part.items():
        if key == "ratio_min":
            out[key] = min(out.get(key, math.inf), value)
        elif key in ("ratio_max", "grad_norm", "skipped"):
            previous = out.get(key, -math.inf)
            # max() would drop a NaN grad_norm (nan > x is False), the very value that must not vanish
            out[key] = math.nan if math.isnan(previous) or math.isnan(value) else max(previous, value)
        elif key == "lr":
            out[key] = value
        else:
            out[key] = out.get(key, 0.0) + value
    return out


class PolicyActor(DistributedActor):
    """One rank of the policy group (a Ray actor through PolicyWorkerGroup)."""

    def __init__(self, args: PolicyArgs, loss: LossArgs, total_steps: int):
        torch.set_num_threads(args.resources.torch_threads)
        self.args, self.loss_args, self.total_steps = args, loss, total_steps
        self.engine = self.reference = None

    def setup(self) -> None:
        """Build the ZeRO-3 engines; every rank at once, after init_process_group."""
        import deepspeed
        from transformers import get_constant_schedule_with_warmup

        from align.run import adamw

        dtype = resolve_dtype(self.args.dtype)
        model = load_pretrained(self.args.model_path, dtype=dtype)
        model.gradient_checkpointing_enable(self.args.gradient_checkpointing)
        self.config = model.config
        optimizer = adamw(model, self.args.lr, self.args.weight_decay, self.args.betas)
        self.schedule = get_constant_schedule_with_warmup(optimizer, self.args.warmup_steps)
        self.engine, self.optimizer, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=zero3_training_config(self.args.max_grad_norm, bf16=dtype == "bfloat16"))
        if self.loss_args.kl_beta:
            reference = load_pretrained(self.args.model_path, dtype=dtype).eval().requires_grad_(False)
            self.reference, *_ = deepspeed.initialize(model=reference, config=zero3_inference_config())
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def train_step(self, micro_batches: list[list[TrainSample]], num_tokens: int, num_sequences: int,
                   poison: bool = False, temperature: float = 1.0) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches, then one optimizer step. Returns metric sums, with
        `skipped` 1.0 when a non-finite gradient norm made DeepSpeed drop the step (weights, optimizer moments and
        the LR schedule are then untouched). `poison` makes the loss NaN (fault injection for tests). Log-probs
        (policy and reference) are of the logits divided by `temperature`, the distribution the samples were drawn
        from."""
        loss_fn = GRPO_AGGREGATIONS[self.loss_args.aggregation]
        normaliser = num_tokens if self.loss_args.aggregation == "token" else num_sequences
        sums: dict[str, float] = {"gap_abs_sum": 0.0, "gap_tokens": 0.0, "entropy_sum": 0.0, "ratio_min": math.inf,
                                  "ratio_max": -math.inf}
        self.engine.train()
        for k, samples in enumerate(micro_batches):
            work = samples or [TrainSample([0, 0], 1, 0.0)]  # an empty micro-batch still joins the collectives
            batch = collate([TokenizedChat(s.token_ids, [True] * len(s.token_ids)) for s in work])
            batch = batch.to(self.engine.device)  # the CPU here; the rank's GPU on GPUs
            layout = batch.layout()
            scored = self.engine(batch.input_ids, layout=layout, target_ids=batch.target_ids, with_entropy=True,
                                 temperature=temperature)
            logprobs, mask = completion_view(scored.logprobs[0], work)  # [N, L]
            ref_logprobs = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_flat = self.reference(batch.input_ids, layout=layout, target_ids=batch.target_ids,
                                              temperature=temperature).logprobs
                ref_logprobs, _ = completion_view(ref_flat[0], work)  # [N, L]
            advantages = torch.tensor([s.advantage for s in work], device=logprobs.device)  # [N]
            loss, parts = loss_fn(logprobs, sampling_logprobs(logprobs, work), ref_logprobs, advantages, mask,
                                  normaliser,
                                  self.loss_args.epsilon_low, self.loss_args.epsilon_high, self.loss_args.kl_beta)
            if not samples:
                loss = loss * 0.0
            if poison:
                loss = loss * float("nan")
            self.engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)
            # DeepSpeed averages gradients over ranks; the loss is already this rank's share of the global sum.
            self.engine.backward(loss * self.world_size)
            if not samples:
                continue
            entropy, _ = completion_view(scored.entropy[0].detach(), work)
            sums["entropy_sum"] += float(entropy.sum())
            for i, s in enumerate(work):
                if s.rollout_logprobs:
                    n = len(s.rollout_logprobs)
                    gap = logprobs[i, :n].detach() - torch.tensor(s.rollout_logprobs, device=logprobs.device)
                    sums["gap_abs_sum"] += float(gap.abs().sum())
                    sums["gap_tokens"] += n
            sums = add_step_metrics(sums, {key: float(value) for key, value in parts.items()})
        # DeepSpeed 0.19's ZeRO-3 drops a step whose global gradient norm is NaN or infinite, in float32 too
        # (stage3.step: is_invalid_grad_norm -> overflow clean-up): the gradients are cleared, nothing updated.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = not math.isfinite(norm)
        if not skipped:
            self.schedule.step()
        sums["grad_norm"] = norm
        sums["skipped"] = float(skipped)
        sums["lr"] = self.schedule.get_last_lr()[0]
        return sums

    def sync_weights(self, rollout_actors: list, version: int, max_bucket_bytes: int, dtype: str) -> dict:
        """Gather parameter by parameter (a collective: every rank calls this) and, on rank 0, send buckets to
        every rollout actor."""
        import deepspeed

        from rollout.weight_sync import RayObjectStoreTransport, sync_weights

        send = self.rank == 0
        stats = sync_weights(self.engine.module.named_parameters(),
                             RayObjectStoreTransport(rollout_actors) if send else None, version, max_bucket_bytes,
                             gather=lambda p: deepspeed.zero.GatheredParameters([p]), dtype=getattr(torch, dtype),
                             send=send)
        return {"seconds": stats.seconds, "bytes": stats.total_bytes} if send else {}

    def save(self, directory: str) -> None:
        """This rank's shards of the model, optimizer and schedule (DeepSpeed's checkpoint layout)."""
        self.engine.save_checkpoint(directory, tag="state", client_state={"schedule": self.schedule.state_dict()})

    def load(self, directory: str) -> None:
        _, client = self.engine.load_checkpoint(directory, tag="state")
        self.schedule.load_state_dict(client["schedule"])

    def export(self, directory: str) -> None:
        """Gather the full weights one parameter at a time and write a HF directory (rank 0). Under bf16 mixed
        precision these are the optimizer's float32 master weights, so no update is rounded away."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        mixed_precision = self.engine.bfloat16_enabled()
        state = {}
        for name, param in self.engine.module.named_parameters():
            if mixed_precision:
                full = safe_get_full_fp32_param(param)  # a collective: every rank calls it
                if self.rank == 0:
                    state[name] = full.detach().cpu().clone()
                continue
            with deepspeed.zero.GatheredParameters([param]):
                if self.rank == 0:
                    state[name] = param.detach().cpu().clone()
        if self.rank == 0:
            save_state_dict(self.config, state, Path(directory))


class PolicyWorkerGroup:
    """`args.resources.num_actors` PolicyActors forming one ZeRO-3 group, called as one. Needs a running Ray."""

    def __init__(self, args: PolicyArgs, loss: LossArgs, total_steps: int):
        self.args, self.loss = args, loss
        self._placement_group, self.actors = start_actors(PolicyActor, args.resources,
                                                          args.resources.accelerator_env(), args, loss, total_steps)
        form_process_group(self.actors, args.collective_timeout_s)
        ray.get([actor.setup.remote() for actor in self.actors])

    def plan(self, samples: Sequence[TrainSample], seed: int) -> list[list[list[TrainSample]]]:
        """Per rank, its micro-batches: packed up to micro_batch_tokens, the same count on every rank."""
        micro = plan_micro_batches([len(s.token_ids) for s in samples], self.args.micro_batch_tokens, seed=seed)
        world = len(self.actors)
        (step,) = plan_steps(micro, world, grad_accum=-(-len(micro) // world),
                             target_tokens=[s.num_completion_tokens for s in samples])
        return [[[samples[i] for i in mb] for mb in step.for_rank(rank)] for rank in range(world)]

    def train_step(self, samples: Sequence[TrainSample], seed: int = 0, poison: bool = False,
                   temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on `samples`, drawn at sampling `temperature`; metric sums over ranks (ratio_min/max
        combined by min/max). `skipped` is 1.0 when the step was dropped for a non-finite gradient; `poison`
        forces that (tests)."""
        num_tokens, num_sequences = sum(s.num_completion_tokens for s in samples), len(samples)
        if self.args.skip_zero_advantage and not self.loss.kl_beta:
            samples = [s for s in samples if s.advantage != 0.0]
        # Nothing left: one empty micro-batch per rank, so every rank still takes the optimizer step.
        per_rank = self.plan(samples, seed) if samples else [[[]] for _ in self.actors]
        results = ray.get([actor.train_step.remote(mbs, num_tokens, num_sequences, poison, temperature)
                           for actor, mbs in zip(self.actors, per_rank, strict=True)])
        total: dict[str, float] = {"zero_advantage_skipped": float(num_sequences - len(samples))}
        for result in results:
            total = add_step_metrics(total, result)
        return total

    def sync_weights(self, rollout_actors: list, version: int, max_bucket_bytes: int = 64 * 2**20,
                     dtype: str = "float32") -> dict:
        results = ray.get([a.sync_weights.remote(rollout_actors, version, max_bucket_bytes, dtype)
                           for a in self.actors])
        return results[0]

    def save(self, directory: str | Path) -> None:
        ray.get([actor.save.remote(str(directory)) for actor in self.actors])

    def load(self, directory: str | Path) -> None:
        ray.get([actor.load.remote(str(directory)) for actor in self.actors])

    def export(self, directory: str | Path) -> None:
        ray.get([actor.export.remote(str(directory)) for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self._placement_group)
        self.actors = []
