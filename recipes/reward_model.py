"""Reward-model training with the Bradley-Terry loss (the report's reward model for online RL).

(Named reward_model.py, not reward.py: a recipe is run as a script, its directory goes first on sys.path, and a
recipes/reward.py would shadow the `reward` package for every recipe.)

    accelerate launch recipes/reward_model.py                                # embedded default, one process
    accelerate launch --config_file recipes/configs/accelerate/zero3.yaml recipes/reward_model.py   # ZeRO-3
    accelerate launch ... recipes/reward_model.py --model-path SFT_DIR --data-path P.jsonl --data-eval-path E.jsonl

With no arguments it starts from the embedded default's SFT model (built once per machine if missing, see
align.defaults) and trains on the synthetic preference pairs (correct against wrong answers, concise against
padded); it measures held-out pair accuracy, trains, and measures
again. Data: pairs as `prompt` + `chosen` + `rejected` (strings or message lists), optional `margin` and `subset`
(see align.data.pairs), in JSONL, Parquet or a saved dataset directory. Both answers of a pair are packed into the
same micro-batch; the loss is normalised over the global number of pairs in each optimizer step.

Output directory: `checkpoint-*/` (resumable with --resume), `final/` (loads in transformers as
`Qwen2ForSequenceClassification`, num_labels=1), `metrics.jsonl`, `tensorboard/`, `loss.png`, `config.yaml`,
`eval.json`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from align.checkpoint import latest_checkpoint, read_state
from align.config import parse_config
from align.data import DataError, TokenizedChat, collate, load_rows, plan_epochs, tokenize_pairs
from align.defaults import base_model_dir, sft_model_dir
from align.engine import TrainEngine
from align.losses import bradley_terry_loss
from align.metrics import MetricsLogger, plot_curves
from align.model import copy_tokenizer_files
from align.run import adamw, claim_output_dir, refuse_other_runs, save_checkpoint
from align.tokenizer import load_tokenizer
from reward.evaluate import PairAccuracy, evaluate_pairs
from reward.model import load_reward_model, save_reward_model


@dataclass(frozen=True)
class ModelArgs:
    path: str = ""
    """Start from this model directory (an SFT checkpoint, usually). Empty: the embedded default's SFT model
    (align.defaults: built once per machine by recipes/sft.py), with the default data beside its base model."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training weights dtype (bfloat16 on GPUs; CPUs without native bf16 are far slower in it)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""


@dataclass(frozen=True)
class DataArgs:
    path: str = ""
    """Training pairs (JSONL, Parquet or saved dataset dir). Empty: the embedded default's data/pairs.jsonl."""
    eval_path: str = ""
    """Held-out pairs for accuracy. Empty: the embedded default's data/pairs_eval.jsonl; 'none': no evaluation."""
    max_length: int = 512
    """Longest conversation in tokens; pairs with a longer side are dropped and counted."""
    micro_batch_tokens: int = 1024
    """Token budget of one packed micro-batch (both sides of its pairs); at least 2 x max_length."""

    def __post_init__(self):
        if self.micro_batch_tokens < 2 * self.max_length:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens} < 2 x max_length={self.max_length}: "
                             f"a pair must fit one micro-batch")


@dataclass(frozen=True)
class OptimArgs:
    lr: float = 3e-4
    """Peak learning rate (after warm-up)."""
    min_lr: float = 3e-5
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
    """Passes over the pairs (fractions allowed)."""
    grad_accum: int = 1
    """Micro-batches per rank per optimizer step."""


@dataclass(frozen=True)
class LossArgs:
    center_coef: float = 0.0
    """Reward-centering weight: adds coef * (r_chosen + r_rejected)^2 (TRL's center_rewards_coefficient)."""
    use_margin: bool = True
    """Subtract the data's `margin` column from the score difference when the rows have one."""


@dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward-model training of a Qwen2.5 model."""

    output_dir: str = "outputs/reward"
    """Run directory: checkpoints, final model, metrics, plots."""
    resume: bool = False
    """Continue the run in OUTPUT_DIR from its latest checkpoint."""
    seed: int = 0
    """Seed of the data order, the score head's initialisation and the embedded default."""
    save_every: int = 200
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
    loss: LossArgs = field(default_factory=LossArgs)


def main(cfg: RewardConfig) -> None:
    out = Path(cfg.output_dir)
    engine = TrainEngine(max_grad_norm=cfg.optim.max_grad_norm)
    refuse_other_runs(out, cfg.resume)

    # --- model and data (checked before the output directory is claimed) ----------------------------------
    if cfg.model.path:
        model_dir, default_data = Path(cfg.model.path), Path(cfg.model.path) / "data"
    else:  # the report's pipeline: the reward model starts from the SFT model
        if engine.is_main:
            sft_model_dir(cfg.seed)
        engine.barrier()
        model_dir, default_data = sft_model_dir(cfg.seed), base_model_dir(cfg.seed) / "data"
    data_path = Path(cfg.data.path) if cfg.data.path else default_data / "pairs.jsonl"
    eval_path = None if cfg.data.eval_path == "none" else (
        Path(cfg.data.eval_path) if cfg.data.eval_path else default_data / "pairs_eval.jsonl")
    model = load_reward_model(model_dir, dtype=cfg.model.dtype, seed=cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    pairs, stats = tokenize_pairs(load_rows(data_path), tokenizer, cfg.data.max_length, source=str(data_path))
    if not pairs:
        raise DataError(f"{data_path}: no pair fits max_length={cfg.data.max_length}")
    eval_pairs = tokenize_pairs(load_rows(eval_path), tokenizer, cfg.data.max_length, str(eval_path))[0] \
        if eval_path else []
    if engine.is_main:
        print(f"data: {stats.rows} pairs from {data_path}: {stats.kept} kept, {stats.dropped_too_long} dropped as "
              f"longer than {cfg.data.max_length} tokens; {stats.tokens} tokens")
        claim_output_dir(out, cfg)
    engine.barrier()
    resume_from = latest_checkpoint(out) if cfg.resume else None
    steps = plan_epochs([len(p.chosen_ids) + len(p.rejected_ids) for p in pairs], [1] * len(pairs),
                        range(len(pairs)), cfg.optim.epochs, max_tokens=cfg.data.micro_batch_tokens,
                        world_size=engine.world_size, grad_accum=cfg.optim.grad_accum, seed=cfg.seed)
    steps = steps[: cfg.max_steps] if cfg.max_steps else steps
    model.model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model_config = model.config
    before = evaluate_pairs(model, eval_pairs) if eval_pairs and engine.is_main and resume_from is None else None
    optimizer = adamw(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, cfg.optim.warmup_steps, len(steps),
                                                            min_lr=cfg.optim.min_lr)
    engine.prepare(model, optimizer, scheduler)

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
    window = dict.fromkeys(("loss_sum", "correct", "margin_sum", "pairs", "tokens", "seconds", "grad_norm",
                            "steps"), 0.0)
    progress = tqdm(total=len(steps), initial=start_step, desc="reward", unit="step", disable=not engine.is_main)
    for step_index in range(start_step, len(steps)):
        plan = steps[step_index]
        tic = time.perf_counter()
        slots = plan.for_rank(engine.rank)
        for slot_index, pair_ids in enumerate(slots):
            # An empty slot (only in the last step) still runs forward/backward: ZeRO-3 gathers collectively.
            chosen_pairs = [pairs[i] for i in (pair_ids or (0,))]
            sequences = [TokenizedChat(ids, [False] * len(ids)) for p in chosen_pairs
                         for ids in (p.chosen_ids, p.rejected_ids)]
            batch = collate(sequences).to(engine.device)  # chosen, rejected, chosen, rejected, ...
            with engine.forward_context():
                scores = engine.model(batch.input_ids, layout=batch.layout())
            margin = torch.tensor([p.margin for p in chosen_pairs], device=scores.device) \
                if cfg.loss.use_margin else None
            loss, parts = bradley_terry_loss(scores[0::2].float(), scores[1::2].float(), plan.global_target_tokens,
                                             margin, cfg.loss.center_coef)
            if not pair_ids:
                loss = loss * 0.0
            engine.backward(loss, last_in_step=slot_index == len(slots) - 1)
            if pair_ids:
                for key in ("loss_sum", "correct", "margin_sum", "pairs"):
                    window[key] += float(parts[key])
                window["tokens"] += batch.input_ids.numel()
        window["grad_norm"] += engine.optimizer_step()
        window["seconds"] += time.perf_counter() - tic
        window["steps"] += 1
        step = step_index + 1
        progress.update(1)

        if step % cfg.log_every == 0 or step == len(steps):
            loss_sum, correct, margin_sum, n_pairs, tokens = engine.sum_across_ranks(
                [window["loss_sum"], window["correct"], window["margin_sum"], window["pairs"], window["tokens"]])
            record = {
                "loss": loss_sum / max(n_pairs, 1.0),
                "accuracy": correct / max(n_pairs, 1.0),
                "margin": margin_sum / max(n_pairs, 1.0),
                "lr": engine.learning_rate,
                "grad_norm": window["grad_norm"] / window["steps"],
                "tokens_per_s": tokens / window["seconds"],
            }
            if logger:
                logger.log(step, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
            window = dict.fromkeys(window, 0.0)
        if (cfg.save_every and step % cfg.save_every == 0) or step == len(steps):
            save_checkpoint(engine, out, step, cfg, cfg.keep_last)
    progress.close()

    # --- export and evaluate -------------------------------------------------------------------------------
    final_dir = out / "final"
    state = engine.gather_state_dict()
    if engine.is_main:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        save_reward_model(model_config, state, final_dir, pad_token_id=pad_id)
        copy_tokenizer_files(model_dir, final_dir)
        logger.close()
        plot_curves(out / "metrics.jsonl", out / "loss.png", ("loss", "accuracy", "margin", "lr"),
                    title=f"Reward model: {cfg.output_dir}")
        print(f"exported {final_dir}")
        if eval_pairs:
            after = evaluate_pairs(load_reward_model(final_dir), eval_pairs)
            reports = {"before": before, "after training": after} if before else {"after training": after}
            print(f"\nheld-out pair accuracy ({eval_path}):\n" + format_pair_table(reports))
            (out / "eval.json").write_text(json.dumps({k: v.to_dict() for k, v in reports.items()}, indent=2))
    engine.barrier()
    engine.end()


def format_pair_table(reports: dict[str, PairAccuracy]) -> str:
    """Markdown table: one row per subset and overall, one column per report."""
    names = list(reports)
    subsets = sorted({s for r in reports.values() for s in r.by_subset})
    lines = ["| subset | pairs | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    first = reports[names[0]]
    for subset in subsets:
        cells = [f"{r.by_subset[subset][0] / r.by_subset[subset][1]:.1%}" for r in reports.values()]
        lines.append(f"| {subset} | {first.by_subset[subset][1]} | " + " | ".join(cells) + " |")
    lines.append(f"| all | {first.pairs} | " + " | ".join(f"{r.accuracy:.1%}" for r in reports.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    config = parse_config(RewardConfig, description=__doc__)
    try:
        main(config)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        # Bad input (data rows, model directory, output directory): one line naming the file, no traceback.
        sys.exit(f"error: {error}")
