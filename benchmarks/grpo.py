"""GRPO step time and generation throughput: `recipes/grpo.py` against TRL's `GRPOTrainer` on the same job, our
rollout actors against raw `vllm.LLM.generate`, and the weight sync's share of a step.

The same job on both trainers: the same model directory (the embedded default's SFT model when it is built, else
the tiny architecture with random weights; --model-path for another), the same RL prompts (the first --queries x
steps rows of its data/prompts.jsonl, in order), 8 completions per query, exactly --completion-tokens tokens per
completion (ours: `ignore_eos`; TRL: `min_new_tokens`), temperature 1, the task verifier as the only reward, one
policy update per rollout batch (TRL: `num_iterations=1`, `steps_per_generation=1`), token-level loss (DAPO) with
clip 0.2 / 0.28, no KL term and no reference model, AdamW (lr 1e-6, betas 0.9 / 0.99, no weight decay, grad norm
1.0, constant LR), the same threads, and the same precision (--dtype):
- float32 (default): float32 weights and arithmetic everywhere.
- bfloat16: mixed precision, float32 master weights and optimizer, bfloat16 matrix products. Ours: the policy's
  DeepSpeed bf16 mode (`--policy-dtype bfloat16`) and a bfloat16 vLLM engine synced in bfloat16; TRL: its `bf16`
  option (autocast in training) with transformers' `generate` under the same autocast. On CPUs with AMX bf16
  matrix products run ~10x faster than float32 (measured on an Intel Xeon); elsewhere they may be slower.

Each side its own way:
- ours: the real recipe in a subprocess: one vLLM rollout actor per core (in-process engines of one torch thread
  each, the recipe's default: a tiny model's decoding is mostly engine overhead, which two engines overlap), the
  reward actor, a one-rank
  ZeRO-3 policy actor, weights synced to vLLM after every update; every queried group trained (zero-variance
  groups kept, as TRL keeps them: `--scheduler-zero-variance deprioritize`, uniform order). Their samples have
  zero advantage and, without a KL term, zero gradient: the policy leaves them out of its forward and backward
  passes (`PolicyArgs.skip_zero_advantage`; the loss's token count still includes them, so the update is the same
  as TRL's, which computes them). The table gives their share.
- TRL: `GRPOTrainer` with its default generation (transformers' `generate` on the training model, padded
  batches). TRL's vLLM colocate mode fails on this CPU (it loads weights with `model.load_weights`, which vLLM's
  CPU backend rejects), so its vLLM paths are not compared here.

Both trainers run --rounds times, alternating (ours first in odd rounds, TRL first in even ones): this VM's speed
drifts over minutes, and one run of each, one after the other, measured our step at 7.5 s and 13.3 s in two
benchmarks 20 minutes apart while TRL's stayed at 22-23 s. Each side's steps are pooled over its runs; every
run's mean and each round's ratio are in the JSON and the table.

Measured, skipping the first WARMUP_STEPS steps: seconds per step (ours: the recipe's `seconds_step`, the wall
time of one loop iteration: rollout, reward, train, sync; TRL: a `TrainerCallback` from on_step_begin to
on_step_end, which covers its generation, reward, loss, backward and optimizer step) and generated tokens per
second of step time. Start-up (Ray, engines, the trainer's constructor) is reported apart. Each step by phase,
both sides: ours from the recipe's clocks (rollout, reward, train, weight sync); TRL's generation (`_generate`) and
reward (`_calculate_rewards`) timed in a subclass, the rest of its step counted as training (log-prob passes, loss,
backward, optimizer step). Their quotient bounds the speed-up: TRL's step over ours without its generation.

Rollout against raw vLLM: the same requests (Q prompts x 8 samples x --completion-tokens tokens, per-prompt
seeds, log-probs of the sampled tokens) through our `RolloutWorkerGroup` (one actor) and through `vllm.LLM.generate`
in a plain process with the same engine settings; best of --repeats calls in each of --rollout-rounds runs per
side, the sides alternating (the VM's speed drifts). Target: within 10%.
Weight sync: the recipe's `seconds_sync` over `seconds_step`. Target: < 5%.

    python benchmarks/grpo.py [--quick] [--rounds 2] [--steps 6] [--queries 16] [--completion-tokens 128]
        [--model-path DIR] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import (
    BUSY_CORES,
    REPO,
    add_worker_option,
    in_subprocess,
    machine_description,
    package_version,
    print_result,
    run_process,
    write_report,
)

RECIPE = REPO / "recipes" / "grpo.py"
WARMUP_STEPS = 1
"""Steps left out of the averages on both sides (allocator warm-up, first-call kernel selection)."""
GROUP = 8
LR = 1e-6
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 256 * 2**20


def prompt_ids(model_path: str, rows: list[dict]) -> list[list[int]]:
    from align.tokenizer import generation_prompt_ids, load_tokenizer

    return generation_prompt_ids(load_tokenizer(model_path), (r["prompt"] for r in rows))


# --- workers (each in its own subprocess) ---------------------------------------------------------------------------


def run_trl(model_path: str, prompts_path: str, output_dir: str, steps: int, queries: int, tokens: int,
            threads: int, dtype: str) -> dict:
    """TRL's GRPOTrainer on the same prompts, verifier reward and update rule, timed per optimizer step."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward.verifiers import check_task

    torch.set_num_threads(threads)

    class StepMeter(TrainerCallback):
        """Wall time per optimizer step, and the part of it spent in TRL's generation and reward functions."""

        def __init__(self):
            self.seconds: list[float] = []
            self.generate_s: list[float] = []
            self.reward_s: list[float] = []
            self.phase = {"generate": 0.0, "reward": 0.0}
            self._tic = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.phase = {"generate": 0.0, "reward": 0.0}
            self._tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._tic)
            self.generate_s.append(self.phase["generate"])
            self.reward_s.append(self.phase["reward"])

    meter = StepMeter()

    class PhaseTimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation (`_generate`) and reward (`_calculate_rewards`) calls timed; the rest
        of a step is its training: log-prob passes, loss, backward, optimizer step."""

        def _generate(self, prompts):
            tic = time.perf_counter()
            try:
                with self.accelerator.autocast():  # with bf16: generation in the precision of training
                    return super()._generate(prompts)
            finally:
                meter.phase["generate"] += time.perf_counter() - tic

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            tic = time.perf_counter()
            try:
                return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            finally:
                meter.phase["reward"] += time.perf_counter() - tic

    lengths: list[int] = []

    def task_reward(prompts, completions, completion_ids, family, answer, tests, entry_point, **_) -> list[float]:
        lengths.extend(len(c) for c in completion_ids)
        return [float(check_task({"family": f, "answer": a, "tests": t, "entry_point": e},
                                 c[0]["content"]).passed)
                for c, f, a, t, e in zip(completions, family, answer, tests, entry_point, strict=True)]

    rows = datasets.load_dataset("json", data_files=prompts_path, split="train")
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = GRPOConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=queries * GROUP, num_generations=GROUP,
        steps_per_generation=1, num_iterations=1, max_completion_length=tokens,
        generation_kwargs={"min_new_tokens": tokens}, temperature=1.0, beta=0.0, loss_type="dapo", epsilon=0.2,
        epsilon_high=0.28, learning_rate=LR, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, shuffle_dataset=False, use_cpu=True,
        bf16=dtype == "bfloat16",
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0)
    tic = time.perf_counter()
    trainer = PhaseTimedGRPOTrainer(model=model, reward_funcs=task_reward, args=config, train_dataset=rows,
                                    processing_class=tokenizer, callbacks=[meter])
    setup_s = time.perf_counter() - tic
    trainer.train()
    return {"step_s": meter.seconds, "generate_s": meter.generate_s, "reward_s": meter.reward_s,
            "completion_lengths": lengths, "setup_s": setup_s,
            "torch_threads": torch.get_num_threads()}


def sampling_requests(tokens: int):
    from rollout.vllm_worker import RolloutSampling

    return RolloutSampling(n=GROUP, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=17)


def run_rollout_actor(model_path: str, prompts: list[list[int]], tokens: int, repeats: int, threads: int,
                      dtype: str) -> dict:
    """Our RolloutWorkerGroup (one actor, `threads` torch threads) on the requests: seconds per call."""
    import ray

    from align.actors import ActorResources
    from rollout.vllm_worker import RolloutWorkerArgs, RolloutWorkerGroup

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    group = RolloutWorkerGroup(RolloutWorkerArgs(
        model_path=model_path, resources=ActorResources(num_cpus=threads, torch_threads=threads), dtype=dtype,
        max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES))
    sampling = sampling_requests(tokens)
    seconds = []
    for _ in range(repeats + 1):  # the first call warms up
        tic = time.perf_counter()
        batch = group.generate(prompts, sampling, policy_version=0)
        seconds.append(time.perf_counter() - tic)
    group.close()
    ray.shutdown()
    return {"call_s": seconds[1:], "tokens": sum(len(c) for c in batch.completion_token_ids)}


def run_raw_vllm(model_path: str, prompts: list[list[int]], tokens: int, repeats: int, threads: int,
                 dtype: str) -> dict:
    """vllm.LLM.generate in this process, the engine configured as our actors configure theirs."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rollout.vllm_worker import sample_seed

    llm = LLM(model=model_path, dtype=dtype, max_model_len=MAX_MODEL_LEN, enforce_eager=True,
              kv_cache_memory_bytes=KV_CACHE_BYTES, seed=0, logprobs_mode="processed_logprobs",
              enable_chunked_prefill=False, max_num_batched_tokens=max(MAX_MODEL_LEN, 4096))
    sampling = sampling_requests(tokens)
    params = [SamplingParams(n=GROUP, temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0,
                             seed=sample_seed(sampling.seed, i)) for i in range(len(prompts))]
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    seconds = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds.append(time.perf_counter() - tic)
    return {"call_s": seconds[1:], "tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)}


def worker(spec: dict) -> None:
    kind = spec.pop("kind")
    result = {"trl": run_trl, "rollout_actor": run_rollout_actor, "raw_vllm": run_raw_vllm}[kind](**spec)
    print_result(result)


# --- the driver -----------------------------------------------------------------------------------------------------


def run_ours(model_path: Path, prompts_path: Path, output_dir: Path, steps: int, queries: int, tokens: int,
             threads: int, dtype: str, max_wait: float) -> dict:
    """The real recipe in a subprocess, its per-step clocks read from metrics.jsonl."""
    command = [
        sys.executable, str(RECIPE), "--policy-model-path", str(model_path), "--data-prompts-path",
        str(prompts_path), "--data-levels", "", "--data-eval-path", "none", "--no-default-reward-model",
        "--output-dir", str(output_dir),
        "--steps", str(steps), "--queries-per-step", str(queries), "--rollout-n", str(GROUP),
        "--rollout-max-tokens", str(tokens), "--rollout-ignore-eos", "--rollout-max-model-len", str(MAX_MODEL_LEN),
        # the recipe's default: one single-threaded vLLM engine per core
        "--rollout-resources-num-actors", str(threads), "--rollout-resources-num-cpus", str(0.5 / threads),
        "--rollout-resources-torch-threads", "1", "--policy-resources-torch-threads", str(threads),
        "--reward-resources-torch-threads", str(threads), "--policy-lr", str(LR), "--policy-betas", "0.9,0.99",
        "--loss-epsilon-low", "0.2", "--loss-epsilon-high", "0.28", "--loss-kl-beta", "0",
        "--scheduler-order", "uniform", "--scheduler-revisit", "epoch", "--scheduler-zero-variance", "deprioritize",
        "--save-every", "0", "--policy-dtype", dtype, "--rollout-dtype", dtype,
    ]
    tic = time.perf_counter()
    _, stats = run_process(command, threads, max_wait)
    wall = time.perf_counter() - tic
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    if len(records) != steps:
        raise RuntimeError(f"the recipe logged {len(records)} steps, expected {steps}")
    return {**stats, "step_s": [r["seconds_step"] for r in records],
            "sync_s": [r["seconds_sync"] for r in records], "rollout_s": [r["seconds_rollout"] for r in records],
            "train_s": [r["seconds_train"] for r in records], "reward_s": [r["seconds_reward"] for r in records],
            "completion_lengths_mean": [r["response_length"] for r in records],
            "trained_samples": [r["trained_samples"] for r in records],
            "zero_advantage_skipped": [r.get("zero_advantage_skipped", 0.0) for r in records],
            "setup_s": wall - sum(r["seconds_step"] for r in records), "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{WARMUP_STEPS + 2} steps, 4 queries (a smoke run)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer, warm-up included")
    parser.add_argument("--queries", type=int, default=16, help="queries per step (x 8 completions)")
    parser.add_argument("--completion-tokens", type=int, default=128, help="tokens per completion, exactly")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating (steps pooled)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per run of the rollout comparison")
    parser.add_argument("--rollout-rounds", type=int, default=3,
                        help="runs of each side of the rollout comparison, alternating (best call of all counts)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of both trainers (see above)")
    parser.add_argument("--model-path", help="HF model directory with data/prompts.jsonl (default: see above)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait before each run for other processes to leave the cores (0: never)")
    parser.add_argument("--output", default="benchmarks/results/grpo.json")
    add_worker_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    steps, queries = (WARMUP_STEPS + 2, 4) if args.quick else (args.steps, args.queries)
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    rounds = 1 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    tokens, threads, dtype = args.completion_tokens, args.threads, args.dtype

    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        tmp = Path(tmp)
        model_path, source, model_note = choose_model(args.model_path, tmp)
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        rows = rows[:steps * queries]
        prompts_path = tmp / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

        def run_side(name: str, round_index: int) -> dict:
            if name == "ours":
                return run_ours(model_path, prompts_path, tmp / f"ours-{round_index}", steps, queries, tokens,
                                threads, dtype, args.max_wait)
            trl = dict(kind="trl", model_path=str(model_path), prompts_path=str(prompts_path),
                       output_dir=str(tmp / f"trl-{round_index}"), steps=steps, queries=queries, tokens=tokens,
                       threads=threads, dtype=dtype)
            return in_subprocess(__file__, trl, threads, args.max_wait)

        def run_and_print(name: str, round_index: int) -> dict:
            run = run_side(name, round_index)
            print_run(f"{name}, round {round_index + 1}/{rounds}", run)
            return run

        runs = alternating(["ours", "trl"], rounds, run_and_print)
        requests = prompt_ids(str(model_path), rows[:queries])
        rollout = compare_rollouts(dict(model_path=str(model_path), prompts=requests, tokens=tokens,
                                        repeats=args.repeats, threads=threads, dtype=dtype),
                                   args.rollout_rounds, threads, args.max_wait)
    load["end"] = os.getloadavg()

    summary = summarise(runs, rollout, queries, tokens)
    table = markdown_table(summary)
    print("\n" + table)
    # Ray's actors are not the driver's children, so their CPU counts as "foreign": only the one-process runs
    # (TRL, raw vLLM) are checked for other load; every run starts on an idle machine (max_wait).
    warnings = [f"{name}: other processes used {run['foreign_cores']:.2f} cores on average while it ran; rerun on "
                "an idle machine" for name, run in (("trl", summary["trl"]), ("raw_vllm", rollout["raw_vllm"]))
                if run["foreign_cores"] > BUSY_CORES]
    for warning in warnings:
        print(f"WARNING: {warning}")
    report = {
        "benchmark": "grpo", "date": time.strftime("%Y-%m-%d"), "machine": machine_description(threads),
        "load_average_1_5_15": load, "warnings": warnings, "model": model_note, "steps": steps,
        "warmup_steps_skipped": WARMUP_STEPS, "queries_per_step": queries, "completions_per_query": GROUP,
        "completion_tokens": tokens, "dtype": dtype, "rounds": rounds,
        "peer": f"trl {package_version('trl')} GRPOTrainer, default generation (transformers "
                f"{package_version('transformers')} generate; TRL's vLLM colocate mode fails on the CPU)",
        "ours_command": runs["ours"][0]["command"], "summary": summary, "table": table,
        "per_step": {name: [run["step_s"] for run in side] for name, side in runs.items()},
        "rollout_calls": {name: run["call_s"] for name, run in rollout.items()},
    }
    write_report(args.output, report)


def choose_model(model_path: str | None, tmp: Path) -> tuple[Path, Path, str]:
    """(model directory, prompt rows, description): --model-path with its data/prompts.jsonl; else the embedded
    default's SFT model with its base's prompts if this machine has built them; else the tiny architecture with
    random weights (speed does not depend on what the weights know: completion lengths are fixed)."""
    if model_path:
        return Path(model_path).resolve(), Path(model_path) / "data" / "prompts.jsonl", model_path
    from align.defaults import cache_dir, stage_name

    sft, base = (cache_dir() / stage_name(stage, 0) for stage in ("sft", "base"))
    if (sft / "final" / "config.json").is_file() and (base / "data" / "prompts.jsonl").is_file():
        return sft / "final", base / "data" / "prompts.jsonl", f"embedded default SFT model ({sft.name})"
    from align.tiny import build_tiny

    tiny = build_tiny(tmp / "model", seed=0)
    return tiny, tiny / "data" / "prompts.jsonl", "embedded tiny architecture, random weights (seed 0)"


def alternating(names: list[str], rounds: int, run: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """`run(name, round_index)` for every name in every round, the order reversed every other round (this VM's
    speed drifts over minutes): each name's runs, in order."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names[::1 if round_index % 2 == 0 else -1]:
            runs[name].append(run(name, round_index))
    return runs


def compare_rollouts(spec: dict, rounds: int, threads: int, max_wait: float) -> dict[str, dict]:
    """Our rollout actor and raw vLLM on the same requests, each once per round, in alternating order; their
    calls pooled per kind. This VM's speed drifts by 10-20% over minutes, more than the difference measured, so
    one run of each, one after the other, can show either ahead."""
    calls = alternating(["rollout_actor", "raw_vllm"], rounds,
                        lambda kind, _: in_subprocess(__file__, dict(kind=kind, **spec), threads, max_wait))
    return {kind: {"call_s": [s for run in runs for s in run["call_s"]], "tokens": runs[0]["tokens"],
                   "foreign_cores": max(run["foreign_cores"] for run in runs)} for kind, runs in calls.items()}


def timed(runs: list[dict], key: str) -> list[float]:
    """A per-step series of every run, the warm-up steps left out, pooled."""
    return [value for run in runs for value in run[key][WARMUP_STEPS:]]


def summarise(runs: dict[str, list[dict]], rollout: dict, queries: int, tokens: int) -> dict:
    """Each trainer's runs pooled (mean over all their timed steps), each run's and each round's figures beside."""
    generated = queries * GROUP * tokens
    summary = {}
    for name, side in runs.items():
        step_s = statistics.mean(timed(side, "step_s"))
        summary[name] = {"step_s": step_s, "generated_tokens_per_s": generated / step_s,
                         "setup_s": statistics.mean(run["setup_s"] for run in side),
                         "foreign_cores": max(run["foreign_cores"] for run in side),
                         "step_s_per_run": [statistics.mean(timed([run], "step_s")) for run in side]}
    ours = runs["ours"]
    summary["ours"].update(
        sync_share=sum(timed(ours, "sync_s")) / sum(timed(ours, "step_s")),
        phase_share={phase: sum(timed(ours, f"{phase}_s")) / sum(timed(ours, "step_s"))
                     for phase in ("rollout", "reward", "train", "sync")},
        zero_advantage_share=sum(timed(ours, "zero_advantage_skipped")) / sum(timed(ours, "trained_samples")))
    # Seconds per step by phase, both sides: where the speed-up comes from, and how far it could go.
    ours_phases = {phase: statistics.mean(timed(ours, f"{key}_s")) for phase, key in
                   (("generation", "rollout"), ("reward", "reward"), ("training", "train"), ("weight sync", "sync"))}
    ours_phases["other"] = summary["ours"]["step_s"] - sum(ours_phases.values())
    trl = runs["trl"]
    trl_phases = {"generation": statistics.mean(timed(trl, "generate_s")),
                  "reward": statistics.mean(timed(trl, "reward_s"))}
    trl_phases["training"] = summary["trl"]["step_s"] - sum(trl_phases.values())
    summary["ours"]["phase_s"], summary["trl"]["phase_s"] = ours_phases, trl_phases
    for name, run in rollout.items():
        summary[name] = {"call_s": min(run["call_s"]), "tokens_per_s": run["tokens"] / min(run["call_s"]),
                         "tokens": run["tokens"], "foreign_cores": run["foreign_cores"]}
    summary["ratios"] = {
        "step_speedup_over_trl": summary["trl"]["step_s"] / summary["ours"]["step_s"],
        "step_speedup_over_trl_per_round": [trl_s / ours_s for ours_s, trl_s in zip(
            summary["ours"]["step_s_per_run"], summary["trl"]["step_s_per_run"], strict=True)],
        "rollout_over_raw_vllm": summary["rollout_actor"]["tokens_per_s"] / summary["raw_vllm"]["tokens_per_s"],
        # The speed-up if our generation took no time at all: an upper bound set by the rest of our step.
        "step_speedup_bound_free_generation": summary["trl"]["step_s"] / (
            summary["ours"]["step_s"] - ours_phases["generation"]),
    }
    return summary


def markdown_table(s: dict) -> str:
    ours, trl, ratios = s["ours"], s["trl"], s["ratios"]
    actor, raw = s["rollout_actor"], s["raw_vllm"]
    lines = [
        "| GRPO | ours | TRL GRPOTrainer | ours / TRL |",
        "|---|---:|---:|---:|",
        f"| seconds per step | {ours['step_s']:.2f} | {trl['step_s']:.2f} | {ratios['step_speedup_over_trl']:.2f}x "
        "faster |",
        f"| generated tokens/s | {ours['generated_tokens_per_s']:.0f} | {trl['generated_tokens_per_s']:.0f} | "
        f"{ours['generated_tokens_per_s'] / trl['generated_tokens_per_s']:.2f}x |",
        f"| start-up s | {ours['setup_s']:.1f} | {trl['setup_s']:.1f} | |",
        *[f"| seconds per step, round {i + 1} | {o:.2f} | {t:.2f} | {r:.2f}x |" for i, (o, t, r) in enumerate(zip(
            ours["step_s_per_run"], trl["step_s_per_run"], ratios["step_speedup_over_trl_per_round"], strict=True))],
        "",
        "| rollout, same requests | our RolloutWorkerGroup | raw vllm.LLM.generate | ours / raw |",
        "|---|---:|---:|---:|",
        f"| tokens/s (best call) | {actor['tokens_per_s']:.0f} | {raw['tokens_per_s']:.0f} | "
        f"{ratios['rollout_over_raw_vllm']:.3f} |",
        "",
        "| our step, share of wall time | rollout | reward | train | weight sync |",
        "|---|---:|---:|---:|---:|",
        "| | " + " | ".join(f"{100 * ours['phase_share'][p]:.1f}%" for p in ("rollout", "reward", "train", "sync"))
        + " |",
        "",
        "| seconds per step, by phase | ours | TRL GRPOTrainer | TRL / ours |",
        "|---|---:|---:|---:|",
    ]
    for phase, seconds in ours["phase_s"].items():
        peer = trl["phase_s"].get(phase)
        peer_cells = f"{peer:.2f} | {peer / seconds:.2f}x" if peer is not None else " | "
        lines.append(f"| {phase} | {seconds:.2f} | {peer_cells} |")
    lines.append(f"| speed-up bound if our generation were free | | | "
                 f"{ratios['step_speedup_bound_free_generation']:.2f}x |")
    lines += ["", f"Samples with zero advantage, left out of our training passes (their gradient is zero; TRL trains "
              f"on them): {100 * ours['zero_advantage_share']:.0f}%."]
    return "\n".join(lines)


def print_run(name: str, run: dict) -> None:
    print(f"{name}: {len(run['step_s'])} steps, {statistics.mean(run['step_s'][WARMUP_STEPS:]):.2f} s per step "
          f"after warm-up (other processes used {run['foreign_cores']:.2f} cores meanwhile)", flush=True)


if __name__ == "__main__":
    main()
