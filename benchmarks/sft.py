"""SFT training throughput: this project's recipe (`recipes/sft.py`) against TRL's `SFTTrainer` on the same job,
plus the model FLOP utilisation (MFU) of each against this machine's measured float32 matmul rate.

The same job on every side: the same model directory (the embedded tiny default unless --model-path), the same chat
rows (its `data/sft.jsonl`), about the same tokens per optimizer step (--tokens), no gradient accumulation, the same
optimizer settings and LR schedule shape (the recipe's defaults), float32, one process, the same number of threads.
TRL runs in two configurations, each in `trl_settings`:
- "packed", TRL's recommended fast path: `packing=True, packing_strategy="bfd", padding_free=True`, one best-fit-
  decreasing row of `max_length` = --tokens tokens per step. With SDPA (flash-attn has no CPU build) transformers
  turns the packed row's position_ids into a dense [T, T] block-diagonal mask, so attention costs T^2, not sum l^2.
- "padded": `packing=False`, batches of round(--tokens / mean sequence length) sequences padded to the longest, with
  `train_sampling_strategy="group_by_length"` to keep padding low. On CPUs this is TRL's faster configuration.
Both use `assistant_only_loss=True` (TRL swaps in its Qwen2.5 training template with `{% generation %}` markers)
and `loss_type="nll"` (the fused LM head, no full logits).

Measured per optimizer step, skipping the first WARMUP_STEPS, as total real tokens / total time:
- ours: `tokens_per_s` of each step from the recipe's `metrics.jsonl` (logged every step; its clock covers collate,
  forward, backward and optimizer step, not logging or checkpointing). Each step's tokens are recomputed from the
  recipe's own data plan for the same config.
- TRL: a `TrainerCallback` times on_step_begin -> on_step_end (forward, backward, clip, optimizer and scheduler
  step; Trainer fetches and collates the batch before on_step_begin, so TRL's clock leaves data loading out), and a
  `training_step` override counts each batch's real tokens (attention_mask, else every token of the packed row).

FLOPs per real token (a convention, the same for every system, so MFU ratios equal throughput ratios):
6 * N_matmul + 12 * layers * (heads * head_dim) * S, where N_matmul counts the weights used in matmuls (attention
and MLP projections and the LM head; the embedding lookup is not a matmul, the head is counted even when tied) and
S is the token-weighted mean sequence length (sum l^2 / sum l: each sequence attends only within itself). The
attention term follows PaLM (appendix B), which counts the causally masked half too; work a system spends on
padding or masked-out attention is not counted. MFU = achieved FLOP/s / the rate of a 2048 x 2048 @ 2048 x 2048
float32 matmul with the same threads: the fastest call of about 2 s of calls before and again after the training
runs (on the project's shared 2-core VMs the median rate drifts by 10-25% between measurements; the fastest call
is the rate the machine demonstrably reaches, so MFU errs low).

Each system runs in its own subprocess (its peak resident memory is its own, read with wait4). Other processes on
the cores distort the comparison badly (see `contention_warnings`); the script warns when it sees them.

    python benchmarks/sft.py [--quick] [--steps 16] [--tokens 4096] [--model-path DIR] [--output FILE.json]
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

RECIPE = REPO / "recipes" / "sft.py"
WARMUP_STEPS = 2
"""Steps left out of the averages on every side (allocator warm-up, first-call kernel selection)."""
MATMUL_SIZE = 2048
MATMUL_SPREAD = 0.2
"""Warn when the matmul rates measured before and after the runs differ by more than this fraction."""
PEERS = {"trl": "TRL packed", "trl_padded": "TRL padded"}
NO_RATIO = ("padding_fraction", "foreign_cores")
PER_STEP_KEYS = ("step_s", "step_tokens", "step_slots", "step_targets", "wall_step_s")


# --- workers (each in its own subprocess) ---------------------------------------------------------------------------


def run_matmul(threads: int, seconds: float = 2.0) -> dict:
    """float32 [n, n] @ [n, n] at 2 n^3 FLOPs a call: the machine's achievable dense rate with these threads."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
    for _ in range(2):
        a @ b
    rates, begin = [], time.perf_counter()
    while time.perf_counter() - begin < seconds or len(rates) < 3:
        tic = time.perf_counter()
        a @ b
        rates.append(2 * MATMUL_SIZE**3 / (time.perf_counter() - tic) / 1e9)
    rates.sort()
    return {"gflops_median": rates[len(rates) // 2], "gflops_best": rates[-1], "calls": len(rates)}


def packed_settings(tokens: int, batch_size: int, max_length: int) -> dict:
    """One best-fit-decreasing packed row of `tokens` tokens per step, padding-free (TRL's recommended path)."""
    return dict(per_device_train_batch_size=1, max_length=tokens, packing=True, packing_strategy="bfd",
                padding_free=True)


def padded_settings(tokens: int, batch_size: int, max_length: int) -> dict:
    """`batch_size` whole sequences per step, padded to the longest, batches grouped by length."""
    return dict(per_device_train_batch_size=batch_size, max_length=max_length, packing=False, padding_free=False,
                train_sampling_strategy="group_by_length")


TRL_VARIANTS = {"trl": packed_settings, "trl_padded": padded_settings}


def trl_settings(variant: str, steps: int, tokens: int, batch_size: int, max_length: int) -> dict:
    """SFTConfig arguments: the variant's batching plus what every variant shares with our recipe's defaults."""
    optim = load_recipe().OptimArgs()
    return dict(
        **TRL_VARIANTS[variant](tokens, batch_size, max_length),
        # the same job as ours
        max_steps=steps, gradient_accumulation_steps=1, assistant_only_loss=True, loss_type="nll", seed=0,
        learning_rate=optim.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": optim.min_lr},
        warmup_steps=optim.warmup_steps, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1], max_grad_norm=optim.max_grad_norm,
        # float32 on the CPU, no recomputation (SFTConfig defaults to bf16 and gradient checkpointing)
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        # no eval, no saving, log every step, no worker processes, no trackers
        eval_strategy="no", save_strategy="no", logging_steps=1, dataloader_num_workers=0, report_to=[],
        disable_tqdm=True,
    )


def run_trl(model_path: str, data_path: str, output_dir: str, settings: dict, threads: int) -> dict:
    """TRL's SFTTrainer on the same rows with `settings` (an SFTConfig's arguments), timed per optimizer step."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens, self.slots, self.targets, self.losses, self.ends = [], [], [], [], [], []
            self._tic = 0.0

        def count(self, inputs) -> None:
            mask = inputs.get("attention_mask")  # absent when padding-free: the packed row has no padding
            self.tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            self.slots.append(int(inputs["input_ids"].numel()))  # [B, L]
            self.targets.append(int((inputs["labels"][:, 1:] != -100).sum()))  # trained next-token targets

        def on_step_begin(self, args, state, control, **kwargs):
            self._tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.seconds.append(self.ends[-1] - self._tic)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class MeteredSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            meter.count(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    meter = StepMeter()
    rows = datasets.load_dataset("json", data_files=data_path, split="train").select_columns(["messages"])
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tic = time.perf_counter()
    trainer = MeteredSFTTrainer(model=model, args=SFTConfig(output_dir=output_dir, **settings), train_dataset=rows,
                                processing_class=tokenizer, callbacks=[meter])
    prepare_s = time.perf_counter() - tic
    trainer.train()
    return {
        "step_s": meter.seconds, "step_tokens": meter.tokens, "step_slots": meter.slots,
        "step_targets": meter.targets, "wall_step_s": [b - a for a, b in zip(meter.ends, meter.ends[1:], strict=False)],
        "first_loss": meter.losses[0], "last_loss": meter.losses[-1], "prepare_s": prepare_s,
        "training_template": trainer.chat_template is not None, "optimizer": trainer.args.optim,
        "torch_threads": torch.get_num_threads(),
    }


def recipe_plan(model_path: str, data_path: str, steps: int, tokens: int, max_length: int) -> dict:
    """Tokens and trained targets of each optimizer step the recipe runs, and the data's mean and token-weighted
    mean sequence length."""
    from align.data import load_rows, tokenize_dataset
    from align.tokenizer import load_tokenizer

    recipe = load_recipe()
    cfg = recipe.SFTConfig(max_steps=steps, data=recipe.DataArgs(path=data_path, max_length=max_length,
                                                                 micro_batch_tokens=tokens))
    examples, _ = tokenize_dataset(load_rows(data_path), load_tokenizer(model_path), cfg.data.longest,
                                   cfg.data.overflow, source=data_path)  # as the recipe tokenizes
    plan = recipe.plan_all_steps(examples, cfg, world_size=1)
    lengths = [len(e) for e in examples]
    step_tokens = [sum(len(examples[i]) for mb in p.for_rank(0) for i in mb) for p in plan]
    return {
        "step_tokens": step_tokens, "step_slots": step_tokens, "step_targets": [p.global_target_tokens for p in plan],
        "mean_length": sum(lengths) / len(lengths), "mean_context": sum(n * n for n in lengths) / sum(lengths),
    }


def worker(spec: dict) -> None:
    kind = spec.pop("kind")
    result = {"matmul": run_matmul, "trl": run_trl, "plan": recipe_plan}[kind](**spec)
    print_result(result)


# --- driver ---------------------------------------------------------------------------------------------------------


def load_recipe():
    """recipes/sft.py as a module (recipes/ is not a package): its config defaults and its data plan."""
    return load_script("sft_recipe", RECIPE)


def run_ours(model_path: Path, data_path: Path, output_dir: Path, steps: int, tokens: int, max_length: int,
             threads: int, max_wait: float) -> dict:
    """The real recipe in a subprocess; each step's tokens come from the recipe's own plan for the same config."""
    command = [
        sys.executable, str(RECIPE), "--model-path", str(model_path), "--data-path", str(data_path),
        "--output-dir", str(output_dir), "--eval-enabled", "false", "--max-steps", str(steps), "--log-every", "1",
        "--save-every", "0", "--data-micro-batch-tokens", str(tokens), "--data-max-length", str(max_length),
    ]
    _, stats = run_process(command, threads, max_wait)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    plan = in_subprocess(__file__, dict(kind="plan", model_path=str(model_path), data_path=str(data_path),
                                        steps=steps, tokens=tokens, max_length=max_length), threads)
    if len(records) != len(plan["step_tokens"]):
        raise RuntimeError(f"recipe logged {len(records)} steps, its plan has {len(plan['step_tokens'])}")
    return {
        **plan, **stats, "step_s": [n / r["tokens_per_s"] for n, r in zip(plan["step_tokens"], records, strict=True)],
        "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "command": " ".join(command[1:]),
    }


def flops_per_token(model_path: Path, mean_context: float) -> dict:
    """6 * N_matmul + 12 * layers * attention width * S (see the module docstring)."""
    c = json.loads((model_path / "config.json").read_text())
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q_width, kv_width = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    per_layer = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * c["intermediate_size"]
    matmul_params = layers * per_layer + vocab * hidden  # LM head counted even when tied to the embedding
    dense, attention = 6 * matmul_params, 12 * layers * q_width * mean_context
    return {"matmul_params": matmul_params, "dense": dense, "attention": attention, "total": dense + attention,
            "mean_context": mean_context}


def summarise(run: dict, flops: float, peak_gflops: float) -> dict:
    """Total real tokens / total time over the steps after WARMUP_STEPS."""
    seconds, tokens, slots, targets = (run[k][WARMUP_STEPS:] for k in
                                       ("step_s", "step_tokens", "step_slots", "step_targets"))
    tokens_per_s = sum(tokens) / sum(seconds)
    per_step = sorted(n / s for n, s in zip(tokens, seconds, strict=True))
    return {
        "tokens_per_s": tokens_per_s, "tokens_per_s_median_step": per_step[len(per_step) // 2],
        "step_s": sum(seconds) / len(seconds), "timed_steps": len(seconds),
        "tokens_per_step": sum(tokens) / len(tokens), "targets_per_step": sum(targets) / len(targets),
        "padding_fraction": 1 - sum(tokens) / sum(slots),
        "achieved_gflops": tokens_per_s * flops / 1e9, "mfu": tokens_per_s * flops / (peak_gflops * 1e9),
        "peak_rss_mb": run["peak_rss_mb"], "foreign_cores": run["foreign_cores"],
        "waited_for_idle_s": run["waited_for_idle_s"], "first_loss": run["first_loss"], "last_loss": run["last_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{WARMUP_STEPS + 2} steps each (a smoke run)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per system, warm-up included")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--max-length", type=int, default=1024, help="longest sequence (longer ones are truncated)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--model-path", help="HF model directory with data/sft.jsonl (default: the tiny model)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait before each run for other processes to leave the cores (0: never)")
    parser.add_argument("--output", default="benchmarks/results/sft.json")
    add_worker_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    steps = WARMUP_STEPS + 2 if args.quick else args.steps
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    load = {"start": os.getloadavg()}  # before anything of ours runs
    wait = args.max_wait
    runs, settings = {}, {}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        tmp = Path(tmp)
        if args.model_path:
            model_path = Path(args.model_path).resolve()
        else:
            from align.tiny import build_tiny

            model_path = build_tiny(tmp / "model", seed=0)
        data_path = model_path / "data" / "sft.jsonl"
        matmul = {"before": in_subprocess(__file__, dict(kind="matmul", threads=args.threads), args.threads, wait)}
        print(f"matmul fp32 {MATMUL_SIZE}^3: {matmul['before']['gflops_median']:.1f} GFLOP/s", flush=True)
        runs["ours"] = run_ours(model_path, data_path, tmp / "ours", steps, args.tokens, args.max_length,
                                args.threads, wait)
        print_run("ours", runs["ours"])
        batch_size = max(1, round(args.tokens / runs["ours"]["mean_length"]))
        for name in PEERS:
            settings[name] = trl_settings(name, steps, args.tokens, batch_size, args.max_length)
            spec = dict(kind="trl", model_path=str(model_path), data_path=str(data_path), output_dir=str(tmp / name),
                        settings=settings[name], threads=args.threads)
            runs[name] = in_subprocess(__file__, spec, args.threads, wait)
            print_run(PEERS[name], runs[name])
        matmul["after"] = in_subprocess(__file__, dict(kind="matmul", threads=args.threads), args.threads, wait)
        flops = flops_per_token(model_path, runs["ours"]["mean_context"])
    load["end"] = os.getloadavg()

    peak_gflops = max(m["gflops_best"] for m in matmul.values())
    summary = {name: summarise(run, flops["total"], peak_gflops) for name, run in runs.items()}
    ratios = {
        peer: {k: summary["ours"][k] / summary[peer][k] for k in ("tokens_per_s", "mfu", "step_s", "peak_rss_mb")}
        for peer in PEERS
    }
    loss = {
        "ours": "assistant turns: content + <|im_end|> (the recipe's mask), mean over the step's trained tokens",
        "trl": "assistant_only_loss=True with TRL's Qwen2.5 training template ({% generation %} markers: content, "
               "<|im_end|> and the newlines either side), mean over the step's trained tokens",
    }
    table = markdown_table(summary)
    print("\n" + table)
    print(f"\nFLOPs/token {flops['total'] / 1e6:.2f} M (6N {flops['dense'] / 1e6:.2f} M with N = "
          f"{flops['matmul_params'] / 1e6:.2f} M matmul weights, attention {flops['attention'] / 1e6:.2f} M at mean "
          f"context {flops['mean_context']:.0f}); matmul peak {peak_gflops:.1f} GFLOP/s "
          f"(fastest call; medians before {matmul['before']['gflops_median']:.1f}, after "
          f"{matmul['after']['gflops_median']:.1f}); "
          f"load average {load['start'][0]:.2f} -> {load['end'][0]:.2f}")
    print(f"loss: ours {loss['ours']}; TRL {loss['trl']}")
    warnings = contention_warnings(summary, matmul)
    for warning in warnings:
        print(f"WARNING: {warning}")
    report = {
        "benchmark": "sft", "date": time.strftime("%Y-%m-%d"), "machine": machine_description(args.threads),
        "load_average_1_5_15": load, "warnings": warnings, "steps": steps, "warmup_steps_skipped": WARMUP_STEPS,
        "tokens_per_step_budget": args.tokens, "model": str(args.model_path or "embedded tiny default (seed 0)"),
        "throughput": "total real tokens / total time over the timed steps (padding not counted)",
        "peer": f"trl {package_version('trl')} SFTTrainer, transformers {package_version('transformers')} "
                "Qwen2ForCausalLM (sdpa; packed rows get a block-diagonal mask from position_ids)",
        "loss": loss, "trl_settings": settings, "trl_padded_batch_size": batch_size,
        "trl_optimizer": runs["trl"]["optimizer"], "trl_training_template_swapped_in": runs["trl"]["training_template"],
        "trl_prepare_dataset_s": {peer: runs[peer]["prepare_s"] for peer in PEERS},
        "ours_command": runs["ours"]["command"], "matmul_gflops": matmul, "peak_gflops_used": peak_gflops,
        "flops_per_token": flops, "summary": summary, "ratios_ours_over_peer": ratios, "table": table,
        "per_step": {
            name: {k: run[k] for k in PER_STEP_KEYS if k in run} for name, run in runs.items()
        },
    }
    write_report(args.output, report)


def print_run(name: str, run: dict) -> None:
    seconds, tokens = run["step_s"][WARMUP_STEPS:], run["step_tokens"][WARMUP_STEPS:]
    print(f"{name}: {len(run['step_s'])} steps, {sum(tokens) / sum(seconds):.0f} tok/s after warm-up "
          f"(other processes used {run['foreign_cores']:.2f} cores meanwhile)", flush=True)


def contention_warnings(summary: dict, matmul: dict) -> list[str]:
    """Other processes on the cores skew the comparison: an OpenMP thread that loses its core stalls every parallel
    region, so the system running more, smaller kernels per step loses most (5x swings seen on 2 cores)."""
    warnings = [
        f"{name}: other processes used {run['foreign_cores']:.2f} cores on average while it ran; rerun on an idle "
        "machine" for name, run in summary.items() if run["foreign_cores"] > BUSY_CORES
    ]
    rates = [m["gflops_median"] for m in matmul.values()]
    if min(rates) < (1 - MATMUL_SPREAD) * max(rates):
        warnings.append(f"matmul rate moved from {rates[0]:.1f} to {rates[-1]:.1f} GFLOP/s during the run: the "
                        "machine's load changed; rerun on an idle machine")
    return warnings


def markdown_table(summary: dict) -> str:
    ours = summary["ours"]
    rows = [
        ("training tokens/s", "tokens_per_s", "{:.0f}"),
        ("tokens/s of the median step", "tokens_per_s_median_step", "{:.0f}"),
        ("MFU (fp32 matmul peak)", "mfu", "{:.1%}"), ("achieved GFLOP/s", "achieved_gflops", "{:.1f}"),
        ("seconds per step", "step_s", "{:.2f}"),
        ("real tokens per step", "tokens_per_step", "{:.0f}"),
        ("trained tokens per step", "targets_per_step", "{:.0f}"),
        ("padding (share of slots)", "padding_fraction", "{:.1%}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("other processes' cores during run", "foreign_cores", "{:.2f}"),
    ]
    header = " | ".join(["ours", *PEERS.values(), *(f"ours / {label}" for label in PEERS.values())])
    lines = [f"| SFT, {ours['timed_steps']} timed steps | {header} |", "|---" + "|---:" * (1 + 2 * len(PEERS)) + "|"]
    for label, key, fmt in rows:
        values = [fmt.format(summary[name][key]) for name in ("ours", *PEERS)]
        ratios = [f"{ours[key] / summary[peer][key]:.2f}x" if key not in NO_RATIO else "-" for peer in PEERS]
        lines.append(f"| {label} | {' | '.join(values + ratios)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
