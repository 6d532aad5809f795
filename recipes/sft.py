"""Supervised fine-tuning, stage 1 of Qwen2.5 post-training.

    accelerate launch recipes/sft.py                                   # embedded default, one process
    accelerate launch --config_file recipes/configs/accelerate/zero3.yaml recipes/sft.py      # ZeRO-3, 2 ranks
    accelerate launch ... recipes/sft.py --config recipes/configs/sft/qwen2.5-7b.yaml --model-path M --data-path D

With no arguments it builds the embedded tiny Qwen2.5-architecture model and its synthetic tasks, measures
held-out accuracy per task family and difficulty (greedy decoding with vLLM), fine-tunes on the synthetic chats,
measures again and prints both. Data: chat rows (`messages`) in JSONL, Parquet or a saved dataset directory;
the loss covers assistant tokens only, normalised over the global token count of each optimizer step. Sequences
are packed (padding-free) into micro-batches of at most `data.micro_batch_tokens` tokens.

Output directory: `checkpoint-*/` (resumable with --resume), `final/` (a Hugging Face model directory that
transformers and vLLM load), `metrics.jsonl`, `tensorboard/`, `loss.png`, `config.yaml`, `eval.json`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from align.checkpoint import latest_checkpoint, read_state
from align.config import parse_config
from align.data import DataError, collate, load_rows, plan_epochs, tokenize_dataset
from align.defaults import base_model_dir
from align.engine import TrainEngine
from align.evaluate import evaluate_checkpoints, format_accuracy_table, read_eval_rows
from align.lora import LoraArgs, apply_lora, merged_state_dict
from align.losses import sft_loss
from align.metrics import MetricsLogger, plot_curves
from align.model import copy_tokenizer_files, load_pretrained, save_state_dict
from align.run import adamw, claim_output_dir, refuse_other_runs, save_checkpoint
from align.tokenizer import load_tokenizer


@dataclass(frozen=True)
class ModelArgs:
    path: str = ""
    """Model directory (HF format). Empty: the embedded default's pretrained tiny base (align.defaults, built once
    per machine), copied into OUTPUT_DIR/base-model."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training weights dtype (bfloat16 on GPUs; CPUs without native bf16 are far slower in it)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""


@dataclass(frozen=True)
class DataArgs:
    path: str = ""
    """Chat data (JSONL, Parquet or saved dataset dir). Empty: the embedded default's data/sft.jsonl."""
    eval_path: str = ""
    """Held-out task rows for accuracy (align.tasks format). Empty: the embedded default's data/eval.jsonl."""
    max_length: int = 512
    """Longest training sequence in tokens (with two-stage SFT: the stage-one limit)."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """What to do with sequences over the (longest) limit."""
    micro_batch_tokens: int = 512
    """Token budget of one packed micro-batch (at least the longest limit). The tiny default's 512 (~6 chats)
    buys many small optimizer steps, which it needs to learn to copy digits; real runs pack far more."""
    long_max_length: int = 0
    """Two-stage SFT (the report's long-context recipe) when > max_length: stage one trains on sequences up to
    max_length, stage two mixes those with longer ones up to this limit. 0: one stage."""
    long_fraction: float = 0.5
    """Share of long sequences among stage two's examples (short ones are sampled to make up the rest)."""
    stage_two_epochs: float = 1.0
    """Passes over the long sequences in stage two."""

    @property
    def two_stage(self) -> bool:
        return self.long_max_length > 0

    @property
    def longest(self) -> int:
        return max(self.max_length, self.long_max_length)

    def __post_init__(self):
        if self.micro_batch_tokens < self.longest:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens} < the longest limit {self.longest}")
        if self.two_stage and self.long_max_length <= self.max_length:
            raise ValueError(f"long_max_length={self.long_max_length} must exceed max_length={self.max_length}")
        if not 0 < self.long_fraction <= 1:
            raise ValueError(f"long_fraction={self.long_fraction} must be in (0, 1]")


@dataclass(frozen=True)
class OptimArgs:
    lr: float = 7e-4
    """Peak learning rate (after warm-up). The tiny default measured: 5e-4 to 1e-3 learn to copy operands within
    ~500 steps, 2e-3 and above stall on the copying plateau for thousands."""
    min_lr: float = 7e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    epochs: float = 2.0
    """Passes over the data (fractions allowed). The tiny default from its base, on 200 fresh level-1 and 100
    level-2 arithmetic problems: 1.5 epochs 93.5% / 81%, 2 epochs 95% / 78% and better code (~7.5 min here)."""
    grad_accum: int = 1
    """Micro-batches per rank per optimizer step."""


@dataclass(frozen=True)
class EvalArgs:
    enabled: bool = True
    """Measure held-out accuracy before and after training."""
    per_level: int = 50
    """Eval problems per task family and difficulty (the default's eval split holds 50)."""
    max_new_tokens: int = 256
    """Longest generated answer (level-5 arithmetic solutions run to ~205 tokens)."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning of a Qwen2.5 model."""

    output_dir: str = "outputs/sft"
    """Run directory: checkpoints, final model, metrics, plots."""
    resume: bool = False
    """Continue the run in OUTPUT_DIR from its latest checkpoint."""
    seed: int = 0
    """Seed of the data order and of the embedded default."""
    save_every: int = 500
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 10
    """Optimizer steps between metric records."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit); for smoke runs and tests."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)


def main(cfg: SFTConfig) -> None:
    out = Path(cfg.output_dir)
    engine = TrainEngine(max_grad_norm=cfg.optim.max_grad_norm)
    refuse_other_runs(out, cfg.resume)

    # --- model and data (checked before the output directory is claimed) ----------------------------------
    model_dir = Path(cfg.model.path) if cfg.model.path else out / "base-model"
    if not cfg.model.path and engine.is_main and not (model_dir / "config.json").is_file():
        shutil.copytree(base_model_dir(cfg.seed), model_dir)  # the run directory keeps the model it started from
    engine.barrier()
    data_path = Path(cfg.data.path) if cfg.data.path else model_dir / "data" / "sft.jsonl"
    eval_path = Path(cfg.data.eval_path) if cfg.data.eval_path else model_dir / "data" / "eval.jsonl"
    model = load_pretrained(model_dir, dtype=cfg.model.dtype)
    tokenizer = load_tokenizer(model_dir)
    examples, stats = tokenize_dataset(load_rows(data_path), tokenizer, cfg.data.longest, cfg.data.overflow,
                                       source=str(data_path))
    if engine.is_main:
        print(f"data: {stats.rows} rows from {data_path}: {stats.kept} kept, {stats.truncated} truncated, "
              f"{stats.dropped_too_long} dropped as too long, {stats.dropped_no_target} with no assistant tokens; "
              f"{stats.tokens} tokens, {stats.target_tokens} trained")
        claim_output_dir(out, cfg)
    engine.barrier()
    resume_from = latest_checkpoint(out) if cfg.resume else None
    steps = plan_all_steps(examples, cfg, engine.world_size)
    model.gradient_checkpointing_enable(cfg.model.gradient_checkpointing)
    model_config = model.config
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    optimizer = adamw(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.optim.warmup_steps, len(steps),
                                                            min_lr=cfg.optim.min_lr)
    engine.prepare(model, optimizer, scheduler)

    eval_rows = read_eval_rows(eval_path, cfg.eval.per_level) if cfg.eval.enabled else []

    # --- resume -------------------------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        engine.load(resume_from)
        start_step = read_state(resume_from)["step"]
        if engine.is_main:
            print(f"resumed from {resume_from} at step {start_step}/{len(steps)}")
    logger = MetricsLogger(out, resume_step=start_step) if engine.is_main else None

    # --- train --------------------------------------------------------------------------------------------
    engine.model.train()
    window = {"nll_sum": 0.0, "target_tokens": 0.0, "tokens": 0, "seconds": 0.0, "grad_norm": 0.0, "steps": 0}
    progress = tqdm(total=len(steps), initial=start_step, desc="sft", unit="step", disable=not engine.is_main)
    for step_index in range(start_step, len(steps)):
        plan = steps[step_index]
        tic = time.perf_counter()
        slots = plan.for_rank(engine.rank)
        for slot_index, example_ids in enumerate(slots):
            # An empty slot (only in the last step) still runs forward/backward: ZeRO-3 gathers collectively.
            batch = collate([examples[i] for i in (example_ids or (0,))]).to(engine.device)
            with engine.forward_context():
                scored = engine.model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
            loss, parts = sft_loss(scored.logprobs, batch.loss_mask, plan.global_target_tokens)
            if not example_ids:
                loss = loss * 0.0
            engine.backward(loss, last_in_step=slot_index == len(slots) - 1)
            if example_ids:
                window["nll_sum"] += float(parts["nll_sum"])
                window["target_tokens"] += float(parts["target_tokens"])
                window["tokens"] += batch.input_ids.numel()
        window["grad_norm"] += engine.optimizer_step()
        window["seconds"] += time.perf_counter() - tic
        window["steps"] += 1
        step = step_index + 1
        progress.update(1)

        if step % cfg.log_every == 0 or step == len(steps):
            nll_sum, target_tokens, tokens = engine.sum_across_ranks(
                [window["nll_sum"], window["target_tokens"], window["tokens"]])
            record = {
                "loss": nll_sum / max(target_tokens, 1.0),  # mean over every trained token of the window's steps
                "lr": engine.learning_rate,
                "grad_norm": window["grad_norm"] / window["steps"],
                "tokens_per_s": tokens / window["seconds"],
            }
            if logger:
                logger.log(step, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
            window = dict.fromkeys(window, 0.0)
        if (cfg.save_every and step % cfg.save_every == 0) or step == len(steps):
            save_checkpoint(engine, out, step, cfg, cfg.keep_last)
    progress.close()

    # --- export and evaluate -------------------------------------------------------------------------------
    final_dir = out / "final"
    state = engine.gather_state_dict()
    if engine.is_main:
        if cfg.lora.enabled:  # merge the adapters: the export is a plain checkpoint, no peft needed to load it
            state = merged_state_dict(model_dir, cfg.lora, state, cfg.model.dtype)
        save_state_dict(model_config, state, final_dir)
        copy_tokenizer_files(model_dir, final_dir)
        logger.close()
        plot_curves(out / "metrics.jsonl", out / "loss.png", ("loss", "lr", "grad_norm", "tokens_per_s"),
                    title=f"SFT: {cfg.output_dir}")
        print(f"exported {final_dir}")
        if eval_rows:  # both models in one vLLM process: its import alone costs ~16 s here
            reports = evaluate_checkpoints({"before": model_dir, "after SFT": final_dir}, eval_rows,
                                           cfg.eval.max_new_tokens)
            print("\nheld-out accuracy (greedy):\n" + format_accuracy_table(reports))
            (out / "eval.json").write_text(json.dumps({k: v.to_dict() for k, v in reports.items()}, indent=2))
    engine.barrier()
    engine.end()


def plan_all_steps(examples, cfg: SFTConfig, world_size: int):
    """Optimizer steps for the whole run. Two-stage SFT: stage one on the short examples, then stage two on the
    long ones mixed with a sample of short ones (`data.long_fraction` of stage two being long)."""
    lengths = [len(e) for e in examples]
    targets = [e.num_targets for e in examples]
    plan = partial(plan_epochs, lengths, targets, max_tokens=cfg.data.micro_batch_tokens, world_size=world_size,
                   grad_accum=cfg.optim.grad_accum)
    if not cfg.data.two_stage:
        steps = plan(range(len(examples)), cfg.optim.epochs, seed=cfg.seed)
    else:
        short = [i for i, n in enumerate(lengths) if n <= cfg.data.max_length]
        long = [i for i, n in enumerate(lengths) if n > cfg.data.max_length]
        wanted_short = round(len(long) * (1 - cfg.data.long_fraction) / cfg.data.long_fraction)
        mixed = long + random.Random(cfg.seed).sample(short, min(wanted_short, len(short)))
        steps = plan(short, cfg.optim.epochs, seed=cfg.seed) + plan(mixed, cfg.data.stage_two_epochs, seed=cfg.seed + 1)
    return steps[: cfg.max_steps] if cfg.max_steps else steps


if __name__ == "__main__":
    config = parse_config(SFTConfig, description=__doc__)
    try:
        main(config)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        # Bad input (data rows, model directory, output directory): one line naming the file, no traceback.
        sys.exit(f"error: {error}")
