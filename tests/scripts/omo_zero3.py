"""Train a small MLP with the Online Merging Optimizer, for tests/test_online_merging.py.

    accelerate launch --config_file recipes/configs/accelerate/zero3.yaml tests/scripts/omo_zero3.py VARIANT OUT

runs it under DeepSpeed ZeRO-3 through align.engine.TrainEngine (each of 2 ranks takes one micro-batch per step) and
writes the gathered parameters to OUT; `train_single(variant)` is the same run in one process, accumulating both
micro-batches. The parameter sizes are odd, so the last rank's partitions are padded, and small sub-groups split each
param group into several flat fp32 tensors.
"""

from __future__ import annotations

import sys

import torch

from align.optimizers import OMOArgs, OnlineMergingAdamW, attach_task_vectors

STEPS, MICRO_BATCHES, LR, WEIGHT_DECAY = 4, 2, 1e-2, 0.1
MERGES = {
    "ondare": OMOArgs(variant="ondare", reserve_rate=0.5, alpha=0.3, rescale="inverse_p", seed=7),
    "onties": OMOArgs(variant="onties", reserve_rate=0.3, alpha=0.3, rescale="l1"),
}


def build() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """The model (its initial weights play theta_SFT), tau = theta_SFT - theta_base, and batches[step][micro]."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    tau = {name: 0.05 * torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    batches = [
        [(torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(MICRO_BATCHES)]
        for _ in range(STEPS)
    ]
    return model, tau, batches


def param_groups(model: torch.nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def micro_loss(model, batch, total_rows: int) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum() / total_rows  # each micro-batch's share of the step mean


def train_single(variant: str) -> dict[str, torch.Tensor]:
    model, tau, batches = build()
    optimizer = OnlineMergingAdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), merge=MERGES[variant])
    attach_task_vectors(optimizer, model, tau)
    for step in batches:
        for batch in step:
            micro_loss(model, batch, 4 * MICRO_BATCHES).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_zero3(variant: str, out: str) -> None:
    from align.engine import TrainEngine
    from align.optimizers import attach_task_vectors_zero3

    engine = TrainEngine(max_grad_norm=1e9)  # no clipping
    assert engine.deepspeed and engine.world_size == MICRO_BATCHES
    engine.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["sub_group_size"] = 15
    model, tau, batches = build()
    optimizer = OnlineMergingAdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), merge=MERGES[variant])
    engine.prepare(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    zero = engine.model.optimizer
    assert len(zero.fp32_partitioned_groups_flat) == 3  # [w0], [w2], [b0, b2]: one flat tensor holds two
    attach_task_vectors_zero3(zero, engine.unwrapped, tau)
    del tau  # each rank keeps only its partition
    for step in batches:
        engine.backward(micro_loss(engine.model, step[engine.rank], 4 * MICRO_BATCHES), last_in_step=True)
        engine.optimizer_step()
    state = engine.gather_state_dict()
    if engine.is_main:
        torch.save(state, out)
    engine.barrier()  # as the recipes do: no rank tears the group down while another still uses it
    engine.end()


if __name__ == "__main__":
    train_zero3(sys.argv[1], sys.argv[2])
