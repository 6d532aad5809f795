"""DPO training throughput: this project's recipe (`recipes/dpo.py`) against TRL's `DPOTrainer` on the same job.

The same job on both sides: the same model directory (the embedded tiny default's architecture, random weights, unless
--model-path; TRL loads it as transformers' Qwen2ForCausalLM), the same preference pairs (the first --pairs rows of
its `data/pairs.jsonl`: correct against slipped worked solutions, working code against mutants, concise against
padded answers, in TRL's conversational format), about the same pairs per optimizer step (--pairs-per-step), no
gradient accumulation, the sigmoid DPO loss with beta 0.1, the same AdamW settings and LR schedule shape (the
recipe's defaults), float32, one process, the same threads, and reference log-probs precomputed before training on
both sides (ours: `--ref-mode stored`; TRL: `precompute_ref_log_probs=True`); neither holds a reference model while
training.

Batching, each side's own way:
- ours: pairs packed padding-free (both answers of a pair in the same row) into one micro-batch of
  --pairs-per-step x the mean pair length tokens, so a step holds about --pairs-per-step pairs (the measured mean is
  reported); both answers of all the step's pairs are scored by one forward pass.
- TRL: `per_device_train_batch_size` = --pairs-per-step pairs, chosen and rejected concatenated into one batch of
  2 x pairs rows, right-padded to the longest (`padding_free=True` is "temporarily unavailable" in TRL 1.16: it
  warns and falls back to padding, so padding is what TRL runs), SDPA attention.

Measured per optimizer step, skipping the first WARMUP_STEPS, as total pairs / total time (and real tokens / time):
- ours: `pairs_per_s` and `pairs_per_step` of each step from the recipe's `metrics.jsonl` (logged every step; its
  clock covers collate, forward, backward and the optimizer step, not logging or checkpointing);
- TRL: a `TrainerCallback` times on_step_begin -> on_step_end (forward, backward, clip, optimizer and scheduler step;
  Trainer collates the batch before on_step_begin, so TRL's clock leaves data loading out), and a `training_step`
  override counts each batch's pairs and real tokens (attention_mask).
The time to precompute the reference log-probs is reported apart (TRL's happens inside the trainer's constructor,
with its tokenization: `prepare_s`).

Each system runs in its own subprocess (its peak resident memory is its own, read with wait4). Other processes on
the cores distort the comparison (see benchmarks/sft.py); the script waits for an idle machine and warns.

    python benchmarks/dpo.py [--quick] [--steps 16] [--pairs-per-step 16] [--model-path DIR] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import (
    BUSY_CORES,
    REPO,
    add_worker_option,
    in_subprocess,
    load_script,
    machine_description,
    package_version,
    print_result,
    run_process,
    write_report,
)

RECIPE = REPO / "recipes" / "dpo.py"
WARMUP_STEPS = 2
"""Steps left out of the averages on every side (allocator warm-up, first-call kernel selection)."""
BETA = 0.1
MAX_LENGTH = 512
"""Longest prompt + answer: the recipe drops longer pairs, so the pair file keeps only pairs that fit (TRL would
truncate them)."""


def load_recipe():
    return load_script("dpo_recipe", RECIPE)


# --- workers (each in its own subprocess) ---------------------------------------------------------------------------


def run_trl(model_path: str, data_path: str, output_dir: str, settings: dict, threads: int) -> dict:
    """TRL's DPOTrainer on the same pairs with `settings` (a DPOConfig's arguments), timed per optimizer step."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.seconds, self.pairs, self.tokens, self.slots, self.losses, self.accuracies = [], [], [], [], [], []
            self._tic = 0.0

        def count(self, inputs) -> None:
            self.pairs.append(int(inputs["input_ids"].shape[0]) // 2)  # [2B, L]: chosen rows, then rejected rows
            self.tokens.append(int(inputs["attention_mask"].sum()))
            self.slots.append(int(inputs["input_ids"].numel()))

        def on_step_begin(self, args, state, control, **kwargs):
            self._tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._tic)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.accuracies.append(float(logs.get("rewards/accuracies", float("nan"))))

    class MeteredDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            meter.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    meter = StepMeter()
    rows = datasets.load_dataset("json", data_files=data_path, split="train")
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tic = time.perf_counter()
    trainer = MeteredDPOTrainer(model=model, args=DPOConfig(output_dir=output_dir, **settings), train_dataset=rows,
                                processing_class=tokenizer, callbacks=[meter])
    prepare_s = time.perf_counter() - tic
    trainer.train()
    return {"step_s": meter.seconds, "step_pairs": meter.pairs, "step_tokens": meter.tokens,
            "step_slots": meter.slots, "first_loss": meter.losses[0], "last_loss": meter.losses[-1],
            "last_accuracy": meter.accuracies[-1], "prepare_s": prepare_s,
            "precomputed": "ref_chosen_logps" in trainer.train_dataset.column_names,
            "padding_free": trainer.padding_free, "optimizer": trainer.args.optim,
            "torch_threads": torch.get_num_threads()}


def worker(spec: dict) -> None:
    kind = spec.pop("kind")
    result = {"trl": run_trl}[kind](**spec)
    print_result(result)


# --- driver ---------------------------------------------------------------------------------------------------------


def trl_settings(steps: int, pairs_per_step: int) -> dict:
    """DPOConfig arguments: the same job as ours (see the module docstring)."""
    recipe = load_recipe()
    optim = recipe.OptimArgs()
    return dict(
        per_device_train_batch_size=pairs_per_step, gradient_accumulation_steps=1, max_steps=steps, seed=0,
        loss_type=["sigmoid"], beta=BETA, max_length=MAX_LENGTH, precompute_ref_log_probs=True,
        precompute_ref_batch_size=pairs_per_step, padding_free=False,
        learning_rate=optim.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": optim.min_lr},
        warmup_steps=optim.warmup_steps, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1], max_grad_norm=optim.max_grad_norm,
        # float32 on the CPU, no recomputation (DPOConfig defaults to bf16 and gradient checkpointing)
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_steps=1, dataloader_num_workers=0, report_to=[],
        disable_tqdm=True,
    )


def write_pairs(model_path: Path, out: Path, count: int) -> dict:
    """The first `count` pairs of the model's data/pairs.jsonl that fit MAX_LENGTH, as TRL conversational rows;
    returns their mean tokens per pair (both sides, as the recipe tokenizes them)."""
    from align.data import load_rows, tokenize_dpo_pairs
    from align.tokenizer import load_tokenizer

    source = model_path / "data" / "pairs.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    tokenizer = load_tokenizer(model_path)
    kept, lengths = [], []
    for row in rows:
        row = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        pairs, dropped = tokenize_dpo_pairs([row], tokenizer, MAX_LENGTH, str(source))
        if not dropped:
            kept.append(row)
            lengths.append(len(pairs[0]))
        if len(kept) == count:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    load_rows(out)  # readable as the recipe reads it
    return {"pairs": len(kept), "mean_pair_tokens": sum(lengths) / len(lengths)}


def run_ours(model_path: Path, data_path: Path, output_dir: Path, steps: int, micro_batch_tokens: int,
             threads: int, max_wait: float) -> dict:
    """The real recipe in a subprocess, one packed micro-batch per optimizer step."""
    command = [
        sys.executable, str(RECIPE), "--model-path", str(model_path), "--data-path", str(data_path),
        "--output-dir", str(output_dir), "--max-steps", str(steps), "--log-every", "1", "--save-every", "0",
        "--optim-epochs", "1", "--optim-grad-accum", "1", "--data-max-length", str(MAX_LENGTH),
        "--data-micro-batch-tokens", str(micro_batch_tokens), "--loss-beta", str(BETA), "--ref-mode", "stored",
    ]
    stdout, stats = run_process(command, threads, max_wait)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    ref_line = next((line for line in stdout.splitlines() if "reference log-probs:" in line and "scored" in line), "")
    return {
        **stats, "step_s": [r["pairs_per_step"] / r["pairs_per_s"] for r in records],
        "step_pairs": [r["pairs_per_step"] for r in records],
        "step_tokens": [r["tokens_per_s"] * r["pairs_per_step"] / r["pairs_per_s"] for r in records],
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
        "last_accuracy": records[-1]["reward_accuracy"], "reference_scoring": ref_line.strip(),
        "command": " ".join(command[1:]),
    }


def summarise(run: dict) -> dict:
    """Totals over the steps after WARMUP_STEPS."""
    seconds, pairs, tokens = (run[k][WARMUP_STEPS:] for k in ("step_s", "step_pairs", "step_tokens"))
    slots = run.get("step_slots", run["step_tokens"])[WARMUP_STEPS:]
    per_step = sorted(p / s for p, s in zip(pairs, seconds, strict=True))
    return {
        "pairs_per_s": sum(pairs) / sum(seconds), "pairs_per_s_median_step": per_step[len(per_step) // 2],
        "tokens_per_s": sum(tokens) / sum(seconds), "step_s": sum(seconds) / len(seconds),
        "pairs_per_step": sum(pairs) / len(pairs), "tokens_per_step": sum(tokens) / len(tokens),
        "padding_fraction": 1 - sum(tokens) / sum(slots), "timed_steps": len(seconds),
        "peak_rss_mb": run["peak_rss_mb"], "foreign_cores": run["foreign_cores"],
        "first_loss": run["first_loss"], "last_loss": run["last_loss"],
    }


PEER = "TRL DPOTrainer"
ROWS = [("pairs/s", "pairs_per_s", "{:.1f}"), ("pairs/s of the median step", "pairs_per_s_median_step", "{:.1f}"),
        ("real tokens/s", "tokens_per_s", "{:.0f}"), ("seconds per step", "step_s", "{:.2f}"),
        ("pairs per step", "pairs_per_step", "{:.1f}"), ("real tokens per step", "tokens_per_step", "{:.0f}"),
        ("padding (share of slots)", "padding_fraction", "{:.1%}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("other processes' cores during run", "foreign_cores", "{:.2f}")]
NO_RATIO = ("padding_fraction", "foreign_cores", "pairs_per_step")


def markdown_table(summary: dict) -> str:
    ours, peer = summary["ours"], summary["trl"]
    lines = [f"| DPO, {ours['timed_steps']} timed steps | ours | {PEER} | ours / TRL |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        ratio = "-" if key in NO_RATIO else f"{ours[key] / peer[key]:.2f}x"
        lines.append(f"| {label} | {fmt.format(ours[key])} | {fmt.format(peer[key])} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{WARMUP_STEPS + 2} steps each (a smoke run)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per system, warm-up included")
    parser.add_argument("--pairs-per-step", type=int, default=16, help="preference pairs per optimizer step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model-path", help="HF model directory with data/pairs.jsonl (default: the tiny model)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait before each run for other processes to leave the cores (0: never)")
    parser.add_argument("--output", default="benchmarks/results/dpo.json")
    add_worker_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    steps = WARMUP_STEPS + 2 if args.quick else args.steps
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        tmp = Path(tmp)
        if args.model_path:
            model_path = Path(args.model_path).resolve()
        else:
            from align.tiny import build_tiny

            model_path = build_tiny(tmp / "model", seed=0)
        data_path = tmp / "pairs.jsonl"
        # Enough pairs for every step of both sides (ours packs a little more or less than pairs-per-step).
        data = write_pairs(model_path, data_path, count=int(steps * args.pairs_per_step * 1.3) + 8)
        micro_batch_tokens = max(2 * MAX_LENGTH, round(args.pairs_per_step * data["mean_pair_tokens"]))
        runs = {"ours": run_ours(model_path, data_path, tmp / "ours", steps, micro_batch_tokens, args.threads,
                                 args.max_wait)}
        print_run("ours", runs["ours"])
        settings = trl_settings(steps, args.pairs_per_step)
        runs["trl"] = in_subprocess(__file__, dict(
            kind="trl", model_path=str(model_path), data_path=str(data_path), output_dir=str(tmp / "trl"),
            settings=settings, threads=args.threads), args.threads, args.max_wait)
        print_run(PEER, runs["trl"])
    load["end"] = os.getloadavg()

    summary = {name: summarise(run) for name, run in runs.items()}
    ratios = {k: summary["ours"][k] / summary["trl"][k] for k in ("pairs_per_s", "tokens_per_s", "step_s",
                                                                   "peak_rss_mb")}
    table = markdown_table(summary)
    print("\n" + table)
    print(f"\nload average {load['start'][0]:.2f} -> {load['end'][0]:.2f}; ours: {runs['ours']['reference_scoring']}; "
          f"TRL prepare (tokenize + reference log-probs) {runs['trl']['prepare_s']:.1f} s")
    warnings = [f"{name}: other processes used {s['foreign_cores']:.2f} cores on average while it ran; rerun on an "
                "idle machine" for name, s in summary.items() if s["foreign_cores"] > BUSY_CORES]
    if not runs["trl"]["precomputed"]:
        warnings.append("TRL did not precompute the reference log-probs")
    for warning in warnings:
        print(f"WARNING: {warning}")
    report = {
        "benchmark": "dpo", "date": time.strftime("%Y-%m-%d"), "machine": machine_description(args.threads),
        "load_average_1_5_15": load, "warnings": warnings, "steps": steps, "warmup_steps_skipped": WARMUP_STEPS,
        "pairs_per_step_asked": args.pairs_per_step, "ours_micro_batch_tokens": micro_batch_tokens, "data": data,
        "model": str(args.model_path or "embedded tiny default architecture (random weights, seed 0)"),
        "throughput": "total pairs (and real tokens) / total time over the timed steps",
        "peer": f"trl {package_version('trl')} DPOTrainer, transformers {package_version('transformers')} "
                "Qwen2ForCausalLM (sdpa, right-padded batches; TRL 1.16's padding_free falls back to padding)",
        "trl_settings": settings, "trl_padding_free": runs["trl"]["padding_free"],
        "trl_precomputed_ref_logps": runs["trl"]["precomputed"], "trl_prepare_s": runs["trl"]["prepare_s"],
        "ours_reference_scoring": runs["ours"]["reference_scoring"], "ours_command": runs["ours"]["command"],
        "summary": summary, "ratios_ours_over_trl": ratios, "table": table,
        "per_step": {name: {k: run[k] for k in ("step_s", "step_pairs", "step_tokens")} for name, run in runs.items()},
    }
    write_report(args.output, report)


def print_run(name: str, run: dict) -> None:
    seconds, pairs = run["step_s"][WARMUP_STEPS:], run["step_pairs"][WARMUP_STEPS:]
    print(f"{name}: {len(run['step_s'])} steps, {sum(pairs) / sum(seconds):.1f} pairs/s after warm-up "
          f"(other processes used {run['foreign_cores']:.2f} cores meanwhile)", flush=True)


if __name__ == "__main__":
    main()
