"""Distributed plumbing for trainers, in one place: one process, DDP, or DeepSpeed ZeRO, as `accelerate launch`
configured it. Trainers see four verbs: `backward(loss, last_in_step)`, `optimizer_step()`, `save`/`load`, and
`gather_state_dict()`; nothing else in a trainer knows which backend runs.

Loss scaling. Trainers normalise each micro-batch's loss by the global token count of its optimizer step, so
the step's gradient is the plain sum over all micro-batches on all ranks. DDP and DeepSpeed average gradients
over ranks; `backward` multiplies the loss by the world size to turn that average back into the sum. DeepSpeed
runs with gradient_accumulation_steps = 1 in its own config and is told where each step ends, so it neither
divides by an accumulation count nor steps early: the last optimizer step of an epoch may have fewer
micro-batches than the others and still gets the right scale.

Every rank must run the same number of forward/backward calls (ZeRO-3 gathers parameters collectively), which
is why the data plan gives every rank the same number of micro-batches per step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs


def use_cpu_cores(local_processes: int) -> None:
    """Give each CPU rank its share of the machine's cores. `accelerate launch` without `--cpu` exports
    OMP_NUM_THREADS=1, which halved the tiny default's throughput on 2 cores; never go below what was asked."""
    share = max(len(os.sched_getaffinity(0)) // max(local_processes, 1), 1)
    if torch.get_num_threads() < share:
        torch.set_num_threads(share)


class TrainEngine:
    """The launch configuration accelerate was started with; after `prepare`, the model, optimizer and LR
    scheduler wrapped for it. Create it first: the main process builds shared files while the others wait."""

    def __init__(self, max_grad_norm: float):
        handlers = []
        if int(os.environ.get("LOCAL_RANK", -1)) >= 0 and not torch.cuda.is_available():
            # accelerate's DeepSpeed launch finds no communication backend without a GPU and silently runs every
            # rank as a lone process; name gloo so the ranks form one group (DS_ACCELERATOR=cpu must be set).
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
        if self.accelerator.device.type == "cpu":
            use_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes)))
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.max_grad_norm = max_grad_norm

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Hand the model, optimizer and schedule to the backend (ZeRO partitions the model here)."""
        if self.deepspeed:
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = 1  # one packed row per micro-batch
            ds_config["gradient_accumulation_steps"] = 1  # step boundaries are set explicitly, see module doc
            ds_config["train_batch_size"] = self.world_size
            ds_config["gradient_clipping"] = self.max_grad_norm
            ds_config.setdefault("zero_allow_untested_optimizer", True)
        self.model, self.optimizer, _ = self.accelerator.prepare(model, optimizer, scheduler)
        # accelerate hands DeepSpeed only DeepSpeed's own schedule classes and turns stepping any other into a
        # no-op; keep the torch schedule and step it ourselves (DeepSpeed reads lr from the same param groups).
        self.scheduler = scheduler
        self.unwrapped = self.accelerator.unwrap_model(self.model)

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def backward(self, loss: torch.Tensor, last_in_step: bool) -> None:
        """Accumulate the gradient of `loss` (already normalised by the step's global token count)."""
        scaled = loss * self.world_size
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last_in_step)
            self.model.backward(scaled)
        elif self.world_size > 1 and not last_in_step:
            with self.model.no_sync():  # DDP: all-reduce only once per step
                scaled.backward()
        else:
            scaled.backward()

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule, zero the gradients. Returns the pre-clip gradient norm."""
        if self.deepspeed:
            self.model.step()  # clips (gradient_clipping), steps the optimizer, zeroes the gradients
            self.scheduler.step()
            norm = self.model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward_context(self):
        """Context for the forward pass (autocast where accelerate configured mixed precision)."""
        return self.accelerator.autocast() if not self.deepspeed else contextlib.nullcontext()

    def sum_across_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (for logging global metrics; every rank must call it)."""
        if self.world_size == 1:
            return values
        summed = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.device), "sum")
        return summed.tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def save(self, directory: str | Path) -> None:
        """Model, optimizer, scheduler and RNG states of every rank (ZeRO shards under DeepSpeed)."""
        self.accelerator.save_state(str(directory), safe_serialization=True)

    def load(self, directory: str | Path) -> None:
        self.accelerator.load_state(str(directory))

    def gather_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full state dict on the main process (None elsewhere), gathering ZeRO-3 partitions one parameter
        at a time so no rank ever holds more than the full model once. Every rank must call it."""
        if not self.deepspeed:
            return {k: v.detach().cpu() for k, v in self.unwrapped.state_dict().items()} if self.is_main else None
        import deepspeed

        state = {}
        for name, param in self.unwrapped.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_main:
                    state[name] = param.detach().cpu().clone()
        return state if self.is_main else None  # a tied lm_head.weight is not a separate parameter: not listed

    def end(self) -> None:
        self.accelerator.end_training()
