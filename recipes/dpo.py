"""Direct preference optimization, the report's offline-RL stage, with the Online Merging Optimizer.

    accelerate launch recipes/dpo.py                          # embedded default: build pairs, AdamW vs OnDARE vs OnTIES
    accelerate launch --config_file recipes/configs/accelerate/zero3.yaml recipes/dpo.py \\
        --model-path SFT_DIR --model-base-path BASE_DIR --data-path pairs.jsonl           # ZeRO-3, 2 ranks
    accelerate launch ... recipes/dpo.py --config recipes/configs/dpo/qwen2.5-7b.yaml --model-path ... --data-path ...

Data: pairs as `prompt` + `chosen` + `rejected` in any format align.data.pairs reads (recipes/build_pairs.py writes
TRL's conversational one), JSONL, Parquet or a saved dataset dir. The policy is trained on the answers' tokens only:
log pi(y|x) is summed over the assistant tokens after the prompt (align.dpo.sequence_logprob_sums). Both answers of a
pair are packed into the same micro-batch, so one forward pass scores them; the loss (align.dpo.DPO_LOSSES, picked
by --loss-type) is normalised by the global number of pairs in each optimizer step.

Reference log-probs. `--ref-mode stored` (the default) scores every pair once with the reference model before
training, into `ref_logps.pt` (or --ref-logps-path; reused when it was made for the same pairs and reference), so no
second model is held while training; `live` keeps the reference in memory (a full copy on every rank, unsharded) and
scores each micro-batch again; `none` is reference-free DPO.

Optimizer: align.optimizers.OnlineMergingAdamW, `--optim-merge-variant adamw | ondare | onties`. OnDARE and OnTIES
merge every update with tau = theta_SFT - theta_base, read from the starting model and --model-base-path one tensor
at a time and kept in the optimizer state (so checkpoints carry it; the base weights are not held).

Without --data-path: the comparison on the synthetic tasks (with no arguments at all, the embedded default). It
builds pairs from the starting SFT model (--model-path, default the embedded default's) with recipes/build_pairs.py
into OUTPUT_DIR/pairs (or reuses them), trains DPO from that model three times, with AdamW, OnDARE and OnTIES
(OUTPUT_DIR/adamw, /ondare, /onties, each a normal run directory), and reports held-out accuracy per family and
difficulty and an alignment-tax measure (the mean log-likelihood per token of the held-out problems' reference
solutions) for SFT and each DPO model: report.md, report.json. The pipeline (align.pipeline) runs it this way from
its own SFT stage.

Why the default's hyperparameters differ from the report's 7B ones (lr 7e-7, one epoch, OnDARE p = 0.01,
alpha = 1e-7; recipes/configs/dpo/qwen2.5-7b.yaml): a 3.4M-parameter model trained for a few hundred steps does not
move at lr 7e-7, and with p = 0.01 and no rescaling (the paper's equations) OnDARE applies 1% of each update, so
nothing visible would happen. The default uses a far larger learning rate, two epochs, p = 0.1 with L1 rescaling
(the reference implementation's `rescale=True`, see align/optimizers.py) and a larger alpha, so that the trade-off
between reward gain and alignment tax can show up on the tiny model. See OptimArgs for the values.

Run directory: `checkpoint-*/` (resumable with --resume), `final/` (a HF model directory transformers and vLLM load),
`ref_logps.pt`, `metrics.jsonl`, `tensorboard/`, `loss.png`, `config.yaml`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from align.checkpoint import latest_checkpoint, read_state
from align.config import parse_config
from align.data import (
    DataError,
    DpoPair,
    collate,
    load_rows,
    plan_epochs,
    plan_micro_batches,
    tokenize_chat,
    tokenize_dpo_pairs,
)
from align.defaults import base_model_dir, sft_model_dir
from align.dpo import DPO_LOSSES, segment_ids_from_lengths, sequence_logprob_sums
from align.engine import TrainEngine
from align.evaluate import evaluate_checkpoints, format_accuracy_table, read_eval_rows
from align.metrics import MetricsLogger, plot_curves, read_metrics
from align.model import copy_tokenizer_files, load_pretrained, save_state_dict
from align.model.io import TaskVectors
from align.optimizers import OMOArgs, OnlineMergingAdamW, attach_task_vectors, attach_task_vectors_zero3
from align.rejection import eval_reference_rows
from align.run import claim_output_dir, param_groups, refuse_other_runs, save_checkpoint
from align.tokenizer import load_tokenizer


def _load_sibling(name: str):
    """Another recipe as a module (recipes/ is not a package, and tests load this file by path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


build_pairs = _load_sibling("build_pairs")


@dataclass(frozen=True)
class ModelArgs:
    path: str = ""
    """Starting policy, usually the SFT model (HF directory). Empty: the embedded default's SFT model."""
    base_path: str = ""
    """The starting model's base, for OnDARE/OnTIES's tau = theta_SFT - theta_base. Empty: the embedded default's
    base model when --model-path is empty too, or in the comparison (no --data-path); required otherwise."""
    ref_path: str = ""
    """Reference model of the DPO loss. Empty: the starting model (the usual choice)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training weights dtype (bfloat16 on GPUs; CPUs without native bf16 are far slower in it)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""


@dataclass(frozen=True)
class DataArgs:
    path: str = ""
    """Preference pairs (JSONL, Parquet or saved dataset dir). Empty: the comparison of `variants`, on pairs built
    from the starting model into OUTPUT_DIR/pairs by recipes/build_pairs.py."""
    max_length: int = 512
    """Longest prompt + answer in tokens; pairs with a longer side are dropped and counted."""
    micro_batch_tokens: int = 1024
    """Token budget of one packed micro-batch (both sides of its pairs); at least 2 x max_length."""

    def __post_init__(self):
        if self.micro_batch_tokens < 2 * self.max_length:
            raise ValueError(f"micro_batch_tokens={self.micro_batch_tokens} < 2 x max_length={self.max_length}: "
                             f"a pair must fit one micro-batch")


@dataclass(frozen=True)
class RefArgs:
    mode: Literal["stored", "live", "none"] = "stored"
    """Reference log-probs: computed once before training ("stored"), by a second model every micro-batch
    ("live"), or none (reference-free DPO)."""
    logps_path: str = ""
    """Stored reference log-probs: read if the file exists (and was made for these pairs and this reference), else
    computed and written there. Empty: OUTPUT_DIR/ref_logps.pt."""


@dataclass(frozen=True)
class LossArgs:
    type: Literal["sigmoid", "ipo", "conservative", "robust"] = "sigmoid"
    """The variant in align.dpo.DPO_LOSSES: DPO, IPO, conservative DPO or robust DPO."""
    beta: float = 0.1
    """KL strength beta (the DPO paper's and TRL's 0.1; for IPO it is tau)."""
    label_smoothing: float = 0.1
    """eps of the conservative and robust variants: the assumed rate of flipped preference labels."""
    ipo_length_normalize: bool = True
    """IPO on per-token log-ratios, as TRL does (the IPO authors confirmed their results used it)."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")


@dataclass(frozen=True)
class OptimArgs:
    lr: float = 5e-5
    """Peak learning rate (after warm-up). The report's 7B run used 7e-7; the tiny default needs far more to move
    within its few dozen steps (measured on it: at 2e-5 the implicit reward margin stayed below 0.1; at 1e-4
    held-out accuracy fell by 4 points)."""
    min_lr: float = 5e-6
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (biases and norms never). 0: DPO should stay near its reference."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    epochs: float = 2.0
    """Passes over the pairs (the report: one; the tiny default has few pairs)."""
    grad_accum: int = 4
    """Micro-batches per rank per optimizer step."""
    merge: OMOArgs = field(default_factory=lambda: OMOArgs(reserve_rate=0.1, alpha=1e-3, rescale="l1"))
    """Online merging: variant adamw, ondare or onties, reserve rate p, alpha, rescaling (align.optimizers.OMOArgs).
    The tiny default: p = 0.1 with L1 rescaling (kept entries carry the full update's L1 norm, for the random and
    the top-p mask alike) and alpha = 1e-3, so alpha * tau stays well below one step's update. Measured: alpha =
    0.05 (or 1/p rescaling of OnTIES's top-p entries) moves the model far along tau each step and wrecks it."""


@dataclass(frozen=True)
class BuildArgs:
    """The embedded default: how recipes/build_pairs.py builds its pairs (into OUTPUT_DIR/pairs)."""

    max_prompts: int = 0
    """Use only the first this many prompts (0: all)."""
    sampling: build_pairs.SamplingArgs = field(default_factory=build_pairs.SamplingArgs)
    pairs: build_pairs.PairArgs = field(default_factory=lambda: build_pairs.PairArgs(per_prompt=2))
    """Two pairs per prompt: a second distinct combination costs no sampling and doubles the few hundred pairs."""
    decontamination: build_pairs.DecontaminationArgs = field(default_factory=build_pairs.DecontaminationArgs)


@dataclass(frozen=True)
class EvalArgs:
    per_level: int = 25
    """The embedded default: held-out problems per task family and difficulty for accuracy."""
    max_new_tokens: int = 256
    """Longest generated answer."""
    tax_per_level: int = 50
    """The embedded default: held-out reference solutions per family and difficulty for the alignment-tax measure."""


@dataclass(frozen=True)
class DPOConfig:
    """DPO of a Qwen2.5 model, optionally with the Online Merging Optimizer."""

    output_dir: str = "outputs/dpo"
    """Run directory: checkpoints, final model, metrics, plots (the embedded default: its sub-runs and report)."""
    resume: bool = False
    """Continue the run in OUTPUT_DIR from its latest checkpoint (the default: each unfinished sub-run)."""
    seed: int = 0
    """Seed of the data order and of the embedded default."""
    save_every: int = 200
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 10
    """Optimizer steps between metric records."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit); for smoke runs and tests."""
    variants: tuple[str, ...] = ("adamw", "ondare", "onties")
    """The comparison (no --data-path): the optimizers compared, each a sub-run from the same SFT model."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    ref: RefArgs = field(default_factory=RefArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    build: BuildArgs = field(default_factory=BuildArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in ("adamw", "ondare", "onties")]
        if unknown or not self.variants:
            raise ValueError(f"variants={self.variants}: each must be adamw, ondare or onties")

    @property
    def compares_variants(self) -> bool:
        return not self.data.path


def main(cfg: DPOConfig) -> None:
    if cfg.compares_variants:
        run_default(cfg)
    else:
        train(cfg)


# --- one DPO run --------------------------------------------------------------------------------------------------


def train(cfg: DPOConfig) -> Path:
    """One DPO run into cfg.output_dir; returns its final/ directory."""
    out = Path(cfg.output_dir)
    engine = TrainEngine(max_grad_norm=cfg.optim.max_grad_norm)
    refuse_other_runs(out, cfg.resume)

    # --- model and data (checked before the output directory is claimed) ----------------------------------
    if not cfg.data.path:
        raise ValueError("data.path is required for one run (the comparison builds its own pairs)")
    model_dir = Path(cfg.model.path) if cfg.model.path else sft_model_dir(cfg.seed)
    ref_dir = Path(cfg.model.ref_path) if cfg.model.ref_path else model_dir
    merging = cfg.optim.merge.variant != "adamw"
    base_dir = Path(cfg.model.base_path) if cfg.model.base_path else None
    if base_dir is None and not cfg.model.path and merging:
        base_dir = base_model_dir(cfg.seed)
    if merging and base_dir is None:
        raise ValueError(f"model.base_path is required with --optim-merge-variant {cfg.optim.merge.variant} "
                         f"(its task vector is theta_SFT - theta_base)")
    data_path = Path(cfg.data.path)
    model = load_pretrained(model_dir, dtype=cfg.model.dtype)
    tokenizer = load_tokenizer(model_dir)
    pairs, dropped = tokenize_dpo_pairs(load_rows(data_path), tokenizer, cfg.data.max_length, str(data_path))
    if not pairs:
        raise DataError(f"{data_path}: no pair fits max_length={cfg.data.max_length}")
    task_vectors = TaskVectors(model_dir, base_dir, model) if merging else None  # checks shapes now
    if engine.is_main:
        print(f"data: {len(pairs) + dropped} pairs from {data_path}: {len(pairs)} kept, {dropped} dropped as longer "
              f"than {cfg.data.max_length} tokens; {sum(len(p) for p in pairs)} tokens")
        claim_output_dir(out, cfg)
    engine.barrier()
    resume_from = latest_checkpoint(out) if cfg.resume else None
    steps = plan_epochs([len(p) for p in pairs], [1] * len(pairs), range(len(pairs)), cfg.optim.epochs,
                        max_tokens=cfg.data.micro_batch_tokens, world_size=engine.world_size,
                        grad_accum=cfg.optim.grad_accum, seed=cfg.seed)  # a "target" is a pair: loss over pairs
    steps = steps[: cfg.max_steps] if cfg.max_steps else steps

    # --- reference: stored log-probs (scored before training) or a live model -------------------------------
    ref_logps, ref_model = None, None
    if cfg.ref.mode == "stored":
        path = Path(cfg.ref.logps_path) if cfg.ref.logps_path else out / "ref_logps.pt"
        reference = model if ref_dir == model_dir else load_pretrained(ref_dir, dtype=cfg.model.dtype)
        ref_logps = stored_reference_logps(path, reference, ref_dir, pairs, cfg, engine)  # [N, 2]
        del reference
    elif cfg.ref.mode == "live":
        ref_model = load_pretrained(ref_dir, dtype=cfg.model.dtype).to(engine.device).eval().requires_grad_(False)

    # --- optimizer (tau attached before ZeRO-3 partitions the model, or after for DeepSpeed's flat tensors) ----
    model.gradient_checkpointing_enable(cfg.model.gradient_checkpointing)
    model_config = model.config
    o = cfg.optim
    optimizer = OnlineMergingAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, merge=o.merge)
    if task_vectors is not None and not engine.deepspeed:
        attach_task_vectors(optimizer, model, task_vectors)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, o.warmup_steps, len(steps), min_lr=o.min_lr)
    engine.prepare(model, optimizer, scheduler)
    if task_vectors is not None and engine.deepspeed:
        attach_task_vectors_zero3(engine.model.optimizer, engine.unwrapped, task_vectors)
    del task_vectors

    # --- resume -------------------------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        engine.load(resume_from)  # optimizer state included, tau with it
        start_step = read_state(resume_from)["step"]
        if engine.is_main:
            print(f"resumed from {resume_from} at step {start_step}/{len(steps)}")
    logger = MetricsLogger(out, resume_step=start_step) if engine.is_main else None

    # --- train --------------------------------------------------------------------------------------------
    loss_fn = DPO_LOSSES[cfg.loss.type]
    sums = ("loss_sum", "chosen_rewards_sum", "rejected_rewards_sum", "reward_correct", "reward_margin_sum",
            "pairs", "chosen_logp_sum", "tokens")
    window = dict.fromkeys((*sums, "seconds", "grad_norm", "steps"), 0.0)
    engine.model.train()
    progress = tqdm(total=len(steps), initial=start_step, desc="dpo", unit="step", disable=not engine.is_main)
    for step_index in range(start_step, len(steps)):
        plan = steps[step_index]
        tic = time.perf_counter()
        slots = plan.for_rank(engine.rank)
        for slot_index, pair_ids in enumerate(slots):
            # An empty slot (only in the last step) still runs forward/backward: ZeRO-3 gathers collectively.
            ids = list(pair_ids or (0,))
            batch = collate([s for i in ids for s in (pairs[i].chosen, pairs[i].rejected)]).to(engine.device)
            segments = segment_ids_from_lengths(batch.lengths, engine.device)  # [1, T]: chosen 0, rejected 1, ...
            with engine.forward_context():
                scored = engine.model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
            policy = sequence_logprob_sums(scored.logprobs, batch.loss_mask, segments, 2 * len(ids))  # [2P]
            if ref_logps is not None:
                ref = ref_logps[ids].to(engine.device)  # [P, 2]
            elif ref_model is not None:
                ref = score_pairs(ref_model, batch, segments)  # [P, 2]
            else:
                ref = None
            lengths = sequence_logprob_sums(batch.loss_mask.float(), batch.loss_mask, segments, 2 * len(ids))  # [2P]
            loss, parts = loss_fn(policy[0::2].float(), policy[1::2].float(),
                                  None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                                  plan.global_target_tokens, beta=cfg.loss.beta,
                                  **loss_kwargs(cfg.loss, lengths[0::2], lengths[1::2]))
            if not pair_ids:
                loss = loss * 0.0
            engine.backward(loss, last_in_step=slot_index == len(slots) - 1)
            if pair_ids:
                for key in sums[:6]:
                    window[key] += float(parts[key])
                window["chosen_logp_sum"] += float(policy[0::2].detach().sum())
                window["tokens"] += batch.input_ids.numel()
        window["grad_norm"] += engine.optimizer_step()
        window["seconds"] += time.perf_counter() - tic
        window["steps"] += 1
        step = step_index + 1
        progress.update(1)

        if step % cfg.log_every == 0 or step == len(steps):
            totals = dict(zip(sums, engine.sum_across_ranks([window[k] for k in sums]), strict=True))
            n = max(totals["pairs"], 1.0)
            record = {
                "loss": totals["loss_sum"] / n,
                "rewards_chosen": totals["chosen_rewards_sum"] / n,  # beta (log pi - log pi_ref), implicit reward
                "rewards_rejected": totals["rejected_rewards_sum"] / n,
                "reward_accuracy": totals["reward_correct"] / n,
                "reward_margin": totals["reward_margin_sum"] / n,
                "logp_chosen": totals["chosen_logp_sum"] / n,
                "lr": engine.learning_rate,
                "grad_norm": window["grad_norm"] / window["steps"],
                "tokens_per_s": totals["tokens"] / window["seconds"],  # all ranks' tokens over one rank's time
                "pairs_per_s": totals["pairs"] / window["seconds"],
                "pairs_per_step": totals["pairs"] / window["steps"],
            }
            if logger:
                logger.log(step, record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['reward_accuracy']:.2f}",
                                     margin=f"{record['reward_margin']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window = dict.fromkeys(window, 0.0)
        if (cfg.save_every and step % cfg.save_every == 0) or step == len(steps):
            save_checkpoint(engine, out, step, cfg, cfg.keep_last)
    progress.close()

    # --- export -------------------------------------------------------------------------------------------
    final_dir = out / "final"
    state = engine.gather_state_dict()
    if engine.is_main:
        save_state_dict(model_config, state, final_dir)
        copy_tokenizer_files(model_dir, final_dir)
        logger.close()
        plot_curves(out / "metrics.jsonl", out / "loss.png",
                    ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "lr"),
                    title=f"DPO ({cfg.loss.type}, {cfg.optim.merge.variant}): {cfg.output_dir}")
        print(f"exported {final_dir}")
    engine.barrier()
    engine.end()
    return final_dir


def loss_kwargs(args: LossArgs, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> dict:
    """The keyword arguments of DPO_LOSSES[args.type] beyond the shared ones, from LossArgs and the answers' token
    counts."""
    if args.type == "ipo" and args.ipo_length_normalize:
        return {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    if args.type in ("conservative", "robust"):
        return {"label_smoothing": args.label_smoothing}
    return {}


@torch.no_grad()
def score_pairs(model: torch.nn.Module, batch, segments: torch.Tensor) -> torch.Tensor:
    """[P, 2] summed answer log-probs (chosen, rejected) of a packed batch of pairs, without gradients."""
    scored = model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
    sums = sequence_logprob_sums(scored.logprobs, batch.loss_mask, segments, len(batch.lengths))  # [2P]
    return sums.float().view(-1, 2)


def pairs_fingerprint(pairs: list[DpoPair], ref_dir: Path, dtype: str) -> dict:
    """What stored reference log-probs were computed from: the pairs' tokens and masks, the reference's weight
    files (path, size, mtime) and the dtype."""
    digest = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            digest.update(torch.tensor(side.input_ids, dtype=torch.int32).numpy().tobytes())
            digest.update(torch.tensor(side.loss_mask, dtype=torch.bool).numpy().tobytes())
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ref_dir.glob("*.safetensors"))
    return {"pairs": digest.hexdigest(), "count": len(pairs), "reference": str(ref_dir.resolve()),
            "weights": weights, "dtype": dtype}


def stored_reference_logps(path: Path, reference: torch.nn.Module, ref_dir: Path, pairs: list[DpoPair],
                           cfg: DPOConfig, engine: TrainEngine) -> torch.Tensor:
    """[N, 2] reference log-probs of every pair (chosen, rejected): read from `path` if it was made for these pairs
    and this reference, else scored now (each rank a share of the micro-batches, summed over ranks) and saved."""
    fingerprint = pairs_fingerprint(pairs, ref_dir, cfg.model.dtype)
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"{path}: reference log-probs of other pairs or another reference model; remove it or "
                             f"pass another --ref-logps-path")
        if engine.is_main:
            print(f"reference log-probs: read {path}")
        return saved["logps"]
    tic = time.perf_counter()
    logps = torch.zeros(len(pairs), 2, dtype=torch.float64)  # [N, 2]; float64 so the sum over ranks is exact
    micro = plan_micro_batches([len(p) for p in pairs], cfg.data.micro_batch_tokens, seed=cfg.seed)
    reference.eval()
    for ids in tqdm(micro[engine.rank :: engine.world_size], desc="reference log-probs", unit="batch",
                    disable=not engine.is_main):
        batch = collate([s for i in ids for s in (pairs[i].chosen, pairs[i].rejected)])
        logps[ids] = score_pairs(reference, batch, segment_ids_from_lengths(batch.lengths)).double()
    if engine.world_size > 1:
        logps = engine.accelerator.reduce(logps.to(engine.device), "sum").cpu()
    logps = logps.float()
    if engine.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        torch.save({"logps": logps, "fingerprint": fingerprint}, staging)
        os.replace(staging, path)
        print(f"reference log-probs: {len(pairs)} pairs scored in {time.perf_counter() - tic:.0f} s, saved to {path}")
    engine.barrier()
    return logps


# --- the comparison (the embedded default): pairs, three optimizers, evaluation -----------------------------------


def run_default(cfg: DPOConfig) -> None:
    """Build pairs, train DPO with each of cfg.variants from the same SFT model, and compare them, on the synthetic
    tasks' prompts and held-out problems."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the comparison runs in one process; pass --data-path (and --model-path) for one run "
                         "to train on several ranks")
    out = Path(cfg.output_dir)
    refuse_other_runs(out, cfg.resume)
    tic = time.perf_counter()
    sft_dir = Path(cfg.model.path) if cfg.model.path else sft_model_dir(cfg.seed)
    if cfg.model.path and not cfg.model.base_path and set(cfg.variants) - {"adamw"}:
        raise ValueError("model.base_path is required with --model-path for OnDARE/OnTIES (tau = theta_SFT - "
                         "theta_base)")
    base_dir = Path(cfg.model.base_path) if cfg.model.base_path else base_model_dir(cfg.seed)
    task_data = base_model_dir(cfg.seed) / "data"  # the synthetic tasks the comparison is measured on
    out.mkdir(parents=True, exist_ok=True)
    claim_output_dir(out, cfg)

    pairs_dir = out / "pairs"
    if (pairs_dir / "pairs.jsonl").is_file():
        print(f"pairs: reusing {pairs_dir / 'pairs.jsonl'}")
    else:
        b = cfg.build
        build_pairs.main(build_pairs.BuildPairsConfig(
            output_dir=str(pairs_dir), model_path=str(sft_dir), seed=cfg.seed, max_prompts=b.max_prompts,
            sampling=b.sampling, pairs=b.pairs, decontamination=b.decontamination))
    build_seconds = time.perf_counter() - tic

    finals, train_seconds = {}, {}
    for variant in cfg.variants:
        run_dir = out / variant
        finals[variant] = run_dir / "final"
        if cfg.resume and (finals[variant] / "config.json").is_file():
            print(f"{variant}: finished earlier, {finals[variant]}")
            continue
        started = time.perf_counter()
        train(replace(
            cfg, output_dir=str(run_dir),
            model=replace(cfg.model, path=str(sft_dir), base_path=str(base_dir)),
            data=replace(cfg.data, path=str(pairs_dir / "pairs.jsonl")),
            ref=replace(cfg.ref, logps_path=cfg.ref.logps_path or str(pairs_dir / "ref_logps.pt")),
            optim=replace(cfg.optim, merge=replace(cfg.optim.merge, variant=variant))))
        train_seconds[variant] = time.perf_counter() - started

    # --- compare: held-out accuracy and the alignment tax ------------------------------------------------------
    eval_file = task_data / "eval.jsonl"
    models = {"SFT": sft_dir, **{f"DPO-{VARIANT_NAMES[v]}": finals[v] for v in cfg.variants}}
    eval_rows = read_eval_rows(eval_file, cfg.eval.per_level)
    started = time.perf_counter()
    accuracy = evaluate_checkpoints(models, eval_rows, cfg.eval.max_new_tokens)
    tax_rows = eval_reference_rows(read_eval_rows(eval_file, cfg.eval.tax_per_level), cfg.seed, str(eval_file))
    tax = {name: reference_likelihood(path, tax_rows, cfg) for name, path in models.items()}
    eval_seconds = time.perf_counter() - started

    pair_stats = json.loads((pairs_dir / "stats.json").read_text())
    training = {v: read_metrics(out / v / "metrics.jsonl")[-1] for v in cfg.variants}
    report_md = format_report(cfg, accuracy, tax, pair_stats, training,
                              {"build pairs": build_seconds, **{f"train {v}": s for v, s in train_seconds.items()},
                               "evaluate": eval_seconds, "total": time.perf_counter() - tic})
    (out / "report.md").write_text(report_md)
    (out / "report.json").write_text(json.dumps({
        "accuracy": {name: r.to_dict() for name, r in accuracy.items()}, "reference_likelihood": tax,
        "pairs": {k: pair_stats[k] for k in ("prompts", "pairs", "pairs_before_decontamination", "counts")},
        "training_last_record": training, "seconds": {"build_pairs": build_seconds, "train": train_seconds,
                                                     "evaluate": eval_seconds, "total": time.perf_counter() - tic},
        "models": {name: str(path) for name, path in models.items()}}, indent=2) + "\n")
    print("\n" + report_md)


VARIANT_NAMES = {"adamw": "AdamW", "ondare": "OnDARE", "onties": "OnTIES"}


@torch.no_grad()
def reference_likelihood(model_dir: Path, rows: list[dict], cfg: DPOConfig) -> dict:
    """The alignment-tax measure: mean log-likelihood per answer token of held-out reference solutions (chat rows),
    overall and per family, under the model in `model_dir` (higher: closer to the SFT data's answers)."""
    model = load_pretrained(model_dir, dtype=cfg.model.dtype).eval()
    tokenizer = load_tokenizer(model_dir)
    examples, families = [], []
    for row in rows:
        example = tokenize_chat(row["messages"], tokenizer)
        if len(example) <= cfg.data.max_length:
            examples.append(example)
            families.append(row["family"])
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for ids in plan_micro_batches([len(e) for e in examples], cfg.data.micro_batch_tokens, seed=0):
        batch = collate([examples[i] for i in ids])
        scored = model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
        segments = segment_ids_from_lengths(batch.lengths)
        sums = sequence_logprob_sums(scored.logprobs, batch.loss_mask, segments, len(ids))  # [S]
        counts = sequence_logprob_sums(batch.loss_mask.float(), batch.loss_mask, segments, len(ids))  # [S]
        for i, s, n in zip(ids, sums.tolist(), counts.tolist(), strict=True):
            for key in (families[i], "all"):
                totals[key][0] += s
                totals[key][1] += n
    return {key: s / n for key, (s, n) in sorted(totals.items())}


def format_report(cfg: DPOConfig, accuracy: dict, tax: dict, pair_stats: dict, training: dict,
                  seconds: dict) -> str:
    """The default run's report: pairs, accuracy table, alignment tax, training summary, timings (Markdown)."""
    names = list(accuracy)
    m = cfg.optim.merge
    lines = [
        "# DPO on the embedded default: AdamW against online merging",
        "",
        f"Pairs: {pair_stats['pairs']} from {pair_stats['prompts']} prompts "
        f"({pair_stats['pairs_before_decontamination'] - pair_stats['pairs']} dropped by decontamination).",
        f"DPO ({cfg.loss.type}, beta {cfg.loss.beta}), lr {cfg.optim.lr}, {cfg.optim.epochs} epochs; "
        f"merging p = {m.reserve_rate}, alpha = {m.alpha}, rescale {m.rescale}.",
        "",
        "## Pairs per family and difficulty",
        "",
        pair_stats["table"],
        "",
        "## Held-out accuracy (greedy)",
        "",
        format_accuracy_table(accuracy),
        "",
        "## Alignment tax: mean log-likelihood per token of held-out reference solutions",
        "",
        "| family | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in tax[names[0]]:
        lines.append(f"| {key} | " + " | ".join(f"{tax[n][key]:.3f}" for n in names) + " |")
    lines.append("| change from SFT (all) | " + " | ".join(f"{tax[n]['all'] - tax['SFT']['all']:+.3f}" for n in names)
                 + " |")
    lines += ["", "## Last training record", "",
              "| variant | loss | reward accuracy | reward margin | chosen reward | rejected reward |",
              "|---|---:|---:|---:|---:|---:|"]
    for variant, r in training.items():
        lines.append(f"| {VARIANT_NAMES[variant]} | {r['loss']:.3f} | {r['reward_accuracy']:.2f} | "
                     f"{r['reward_margin']:.3f} | {r['rewards_chosen']:.3f} | {r['rewards_rejected']:.3f} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    config = parse_config(DPOConfig, description=__doc__)
    try:
        main(config)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        # Bad input (pair rows, model directory, output directory): one line naming the file, no traceback.
        sys.exit(f"error: {error}")
