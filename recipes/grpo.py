"""Online RL with GRPO on Ray, stage 3 of Qwen2.5 post-training.

    python recipes/grpo.py                                  # starts a local Ray; embedded default
    ray start --head --dashboard-host 127.0.0.1
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python recipes/grpo.py
    python recipes/grpo.py --config recipes/configs/grpo/qwen2.5-7b.yaml --policy-model-path SFT --data-prompts-path P

Roles, each a group of Ray actors with the resources the config gives it: vLLM rollout workers sample
`rollout.n` (8) completions per query; the reward workers score them with the verifiers and/or a reward model;
the policy workers, one DeepSpeed ZeRO-3 group, hold the policy and (with a KL term) the frozen reference, and
train on the group-normalised advantages (align.grpo); after every update the weights go to the rollout workers
in bounded buckets (rollout.weight_sync). Queries are picked by the variance of their rewards, highest first
(rollout.scheduler), as the report orders them.

With no arguments: the embedded default's SFT model (built once per machine if missing), its RL prompts, the
task verifiers plus the default reward model, and held-out accuracy before and after.

Output directory: `checkpoint-*/` (policy shards, optimizer, scheduler state, step; --resume), `final/` (a HF
directory), `metrics.jsonl`, `tensorboard/`, `curves.png`, `config.yaml`, `eval.json` (greedy held-out accuracy
before and after), `eval_sampled.json` (sampled, on the levels trained on).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from align.actors import ActorResources, retry_after_restarts
from align.checkpoint import latest_checkpoint, publish_checkpoint, read_state, remove_stale_staging, staging_dir
from align.config import config_to_dict, parse_config, save_config
from align.defaults import base_model_dir, reward_model_dir, sft_model_dir
from align.evaluate import (
    EvalSuite,
    evaluate_suites,
    format_accuracy_table,
    format_change,
    read_eval_rows,
    sampled_spec,
)
from align.grpo import group_advantages
from align.metrics import MetricsLogger, plot_curves
from align.model import copy_tokenizer_files
from align.model.config import resolve_dtype
from align.policy_worker import LossArgs, PolicyArgs, PolicyWorkerGroup, TrainSample, add_step_metrics, split_groups
from align.run import refuse_other_runs
from align.tasks import select_levels
from align.tokenizer import generation_prompt_ids, load_tokenizer
from reward.worker import RewardRequest, RewardWorkerArgs, RewardWorkerGroup
from rollout.scheduler import QueryScheduler, SchedulerConfig, reward_variance
from rollout.vllm_worker import RolloutLost, RolloutSampling, RolloutWorkerArgs, RolloutWorkerGroup


@dataclass(frozen=True)
class DataArgs:
    prompts_path: str = ""
    """RL prompt rows (align.tasks format: `prompt` messages plus what the verifiers need). Empty: the default's."""
    levels: tuple[str, ...] = ("arithmetic:3", "arithmetic:4", "code:3")
    """Keep only the prompt rows of these "family:difficulty" levels (empty: all rows). The default's are the levels
    the SFT model solves sometimes (6-40% greedy): their groups have reward variance to learn from, where the easy
    levels' groups are mostly all-correct and arithmetic 5's all-wrong."""
    max_prompts: int = 0
    """Then use the first N prompt rows (0: all). The default's 460 hard-level rows take the first 7-8 of 15 steps
    of 64 queries to visit once; the later steps replay the queries of highest known reward variance."""
    eval_path: str = ""
    """Held-out rows for accuracy before and after. Empty: the default's data/eval.jsonl; 'none': skip."""
    eval_per_level: int = 50
    """Eval problems per task family and difficulty (the default's eval set has 50; at 25 one problem is 4 points,
    which hides a level's change in the noise)."""
    eval_samples: int = 16
    """Also sample this many answers per held-out problem of the levels trained on, at the rollout temperature, and
    report the fraction right before and after (eval_sampled.json): how often the policy's own samples are right,
    which is what the reward trains (0: greedy accuracy only). More answers make each problem's count less noisy:
    the default run's +3 points gave p 0.053 with 8, 0.027 with 16 and 0.003 with 32 (2026-12-07)."""


@dataclass(frozen=True)
class RolloutArgs:
    # Two engines of one thread each, not one of two: a tiny model's decoding is mostly the engine's own Python
    # (scheduling, sampling), which one engine runs on one core while the other waits. 16 queries x 8 x 128
    # tokens from the default SFT model: 3.6 s against 5.3 s per call (AMD EPYC, 2 cores, 2026-12-06).
    resources: ActorResources = field(default_factory=lambda: ActorResources(num_actors=2, num_cpus=0.25))
    """The vLLM rollout actors (a step's queries are split across them), their CPUs and GPUs."""
    n: int = 8
    """Completions per query (the GRPO group; Qwen2.5 samples 8)."""
    temperature: float = 1.0
    """Sampling temperature; the policy's log-probs are taken at it too (logits / T), as the samples' are."""
    max_tokens: int = 256
    """Longest completion."""
    ignore_eos: bool = False
    """Sample exactly max_tokens tokens, past the end-of-turn token (fixed-length benchmarks)."""
    max_model_len: int = 1024
    """Longest prompt + completion the engines accept."""
    dtype: str = "auto"
    """Engine dtype and the weights synced to it: float32, bfloat16, or auto, which is bfloat16 where the launching
    machine multiplies it natively (a GPU, a CPU with AMX), else float32 (align.model.config.resolve_dtype)."""
    kv_cache_memory_bytes: int | None = 256 * 2**20
    """KV cache per engine; None sizes it from gpu_memory_utilization (GPUs)."""
    gpu_memory_utilization: float = 0.5
    """With kv_cache_memory_bytes None: the fraction of device memory vLLM takes."""
    sync_bucket_mb: int = 64
    """Largest weight-sync bucket."""
    max_restarts: int = 3
    """Times Ray restarts a rollout actor that died; the step's weights are re-synced to it and the call retried."""
    compile_sampler: bool = True
    """torch.compile vLLM's sampler helpers in the rollout engines (faster sampling after a one-off compile)."""


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO on Ray with vLLM rollouts and a DeepSpeed ZeRO-3 policy."""

    output_dir: str = "outputs/grpo"
    """Run directory: checkpoints, final model, metrics, plots."""
    resume: bool = False
    """Continue the run in OUTPUT_DIR from its latest checkpoint."""
    seed: int = 0
    """Seed of sampling, packing and the embedded default."""
    steps: int = 15
    """Rollout batches (each trained on with `mini_batches` optimizer steps)."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch: its groups split into this many mini-batches, one update each (verl's
    ppo_mini_batch_size, TRL's steps_per_generation). From the second on the policy has moved since sampling, so
    the importance ratio to the rollout's log-probs and its clip are active; the compute is that of one update."""
    queries_per_step: int = 64
    """Queries per rollout batch (samples per step = queries x rollout.n). With 16, two thirds of the groups
    zero-variance left ~5 informative groups per update, and those noisy steps flipped digit facts on levels not
    trained on; 64 give ~20."""
    save_every: int = 10
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    ray_address: str = ""
    """Ray cluster to join; empty: RAY_ADDRESS if set (ray job submit sets it), else a local Ray."""
    max_skipped_steps: int = 3
    """Steps in a row dropped for a non-finite gradient before the run stops (its checkpoints stay as they were)."""
    inject_nan_steps: tuple[int, ...] = ()
    """Fault injection, for tests: the losses of these steps (1-based) are made NaN, so the steps are dropped."""
    scoring_pass: bool = False
    """Before training, sample and score one group per prompt with the starting policy and seed the scheduler's
    reward-variance estimates from them (the report orders queries by the variance of their scores), so the first
    batches already favour queries whose rewards vary. Skipped on --resume (the estimates are in the checkpoint)."""
    default_reward_model: bool = True
    """With reward.model_path empty: also score with the embedded default's reward model."""
    data: DataArgs = field(default_factory=DataArgs)
    # The phases of a step run one after another, so the policy may use every core while the rollout waits.
    policy: PolicyArgs = field(default_factory=lambda: PolicyArgs(
        lr=5e-5, micro_batch_tokens=8192, dtype="auto", resources=ActorResources(torch_threads=2)))
    loss: LossArgs = field(default_factory=LossArgs)
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    # "gated": the reward model ranks correct answers only; summed, it alone drives the all-wrong groups and the
    # policy learned to cut its working short (reward.worker.model_term_if_passed).
    reward: RewardWorkerArgs = field(default_factory=lambda: RewardWorkerArgs(
        verifiers=("task",), model_weight=0.2, model_score_norm="batch", combination="gated",
        resources=ActorResources(num_cpus=0.5, torch_threads=2)))
    # Prioritised replay: once every query has an estimate, each batch takes the queries of highest reward
    # variance. With revisit="epoch" (the report's order over passes) the second pass must visit every query again,
    # two thirds of them zero-variance (README, "What the default run does").
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(revisit="batch"))


def main(cfg: GRPOConfig) -> None:
    out = Path(cfg.output_dir)
    refuse_other_runs(out, cfg.resume)
    # "auto" precision is decided here, once, so the policy and the engines agree; config.yaml records the choice.
    cfg = replace(cfg, policy=replace(cfg.policy, dtype=resolve_dtype(cfg.policy.dtype)),
                  rollout=replace(cfg.rollout, dtype=resolve_dtype(cfg.rollout.dtype)))

    # --- models and data ------------------------------------------------------------------------------------
    policy_path = cfg.policy.model_path or str(sft_model_dir(cfg.seed))
    def default_data(name: str) -> Path:
        return base_model_dir(cfg.seed) / "data" / name

    prompts_path = Path(cfg.data.prompts_path) if cfg.data.prompts_path else default_data("prompts.jsonl")
    eval_path = None if cfg.data.eval_path == "none" else (
        Path(cfg.data.eval_path) if cfg.data.eval_path else default_data("eval.jsonl"))
    reward_args = cfg.reward
    if not reward_args.model_path and cfg.default_reward_model:
        reward_args = replace(reward_args, model_path=str(reward_model_dir(cfg.seed)))
    rows = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
    rows = select_levels(rows, cfg.data.levels, str(prompts_path))
    rows = rows[:cfg.data.max_prompts] if cfg.data.max_prompts else rows
    if not rows:
        raise ValueError(f"{prompts_path}: no prompt rows")
    tokenizer = load_tokenizer(policy_path)
    prompt_ids = generation_prompt_ids(tokenizer, (r["prompt"] for r in rows))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    save_config(cfg, out / "config.yaml")
    eval_rows = read_eval_rows(eval_path, cfg.data.eval_per_level) if eval_path else []
    resume_from = latest_checkpoint(out) if cfg.resume else None

    # --- workers --------------------------------------------------------------------------------------------
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        try:
            ray.init(address="auto")  # a cluster `ray start` started on this machine
        except ConnectionError:  # none: a local Ray for this run only, without the dashboard clusters use
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)
    # The three groups start at once: each waits for its actors to import vLLM or DeepSpeed and load a model, and
    # their waits overlap.
    tic = time.perf_counter()
    with ThreadPoolExecutor(max_workers=3) as pool:
        starting_rollout = pool.submit(RolloutWorkerGroup, RolloutWorkerArgs(
            model_path=policy_path, resources=cfg.rollout.resources, dtype=cfg.rollout.dtype,
            max_model_len=cfg.rollout.max_model_len, kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, seed=cfg.seed,
            max_restarts=cfg.rollout.max_restarts, compile_sampler=cfg.rollout.compile_sampler))
        starting_rewarder = pool.submit(RewardWorkerGroup, reward_args)
        starting_policy = pool.submit(PolicyWorkerGroup, replace(cfg.policy, model_path=policy_path), cfg.loss,
                                      cfg.steps)
        rollout, rewarder, policy = starting_rollout.result(), starting_rewarder.result(), starting_policy.result()
    print(f"workers ready in {time.perf_counter() - tic:.0f} s")
    scheduler = QueryScheduler(len(rows), cfg.scheduler)

    start_step = 0
    if resume_from is not None:
        policy.load(resume_from / "policy")
        state = read_state(resume_from)
        start_step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        sync_rollout(policy, rollout, start_step, cfg.rollout)
        print(f"resumed from {resume_from} at step {start_step}/{cfg.steps}")
    elif cfg.scoring_pass:
        score_all_queries(scheduler, partial(
            roll_out_and_score, rollout=rollout, rewarder=rewarder, prompt_ids=prompt_ids, rows=rows,
            sampling=rollout_sampling(cfg.rollout, seed=cfg.seed * 1_000_003 - 1), version=0, tally=new_tally(),
            resync=partial(sync_rollout, policy, rollout, 0, cfg.rollout)), chunk=4 * cfg.queries_per_step,
            output=out / "scoring_pass.json")
    logger = MetricsLogger(out, resume_step=start_step)

    # --- loop -----------------------------------------------------------------------------------------------
    progress = tqdm(total=cfg.steps, initial=start_step, desc="grpo", unit="step")
    skipped_in_a_row = 0
    for step in range(start_step, cfg.steps):
        step_begin = time.perf_counter()
        tally = new_tally()  # every group, dropped ones too
        sampling = rollout_sampling(cfg.rollout, seed=cfg.seed * 1_000_003 + step)

        scheduled = scheduler.collect(cfg.queries_per_step, partial(
            roll_out_and_score, rollout=rollout, rewarder=rewarder, prompt_ids=prompt_ids, rows=rows,
            sampling=sampling, version=step, tally=tally,
            resync=partial(sync_rollout, policy, rollout, step, cfg.rollout)))
        samples = []
        for (batch, k), rewards in zip(scheduled.payloads, scheduled.rewards, strict=True):
            advantages = group_advantages(rewards, cfg.rollout.n, scale_rewards=cfg.loss.scale_rewards)
            for j in range(cfg.rollout.n):
                index = k * cfg.rollout.n + j
                prompt, completion = batch.prompt_token_ids[k], batch.completion_token_ids[index]
                samples.append(TrainSample(prompt + completion, len(prompt), float(advantages[j]),
                                           batch.logprobs[index]))

        tic = time.perf_counter()
        parts: dict[str, float] = {}
        for k, mini_batch in enumerate(split_groups(samples, cfg.rollout.n, cfg.mini_batches) if samples else []):
            parts = add_step_metrics(parts, policy.train_step(
                mini_batch, seed=cfg.seed * 7919 + step + 1_000_003 * k, poison=step + 1 in cfg.inject_nan_steps,
                temperature=cfg.rollout.temperature))
        seconds_train = time.perf_counter() - tic
        tic = time.perf_counter()
        tally["rollout_restarts"] += sync_rollout(policy, rollout, step + 1, cfg.rollout)
        seconds_sync = time.perf_counter() - tic

        kept_rewards = scheduled.rewards.flatten()
        tokens = parts.get("tokens", 0.0)
        record = {
            "reward_mean": tally["reward_sum"] / tally["samples"],
            "reward_std_kept": float(kept_rewards.std()) if kept_rewards.numel() > 1 else float("nan"),
            "accuracy": tally["passed"] / tally["samples"],
            "zero_variance_fraction": scheduled.num_zero_variance / max(scheduled.num_rollouts, 1),
            "trained_samples": len(samples),
            # of those, left out of the passes: zero advantage, zero gradient (PolicyArgs.skip_zero_advantage)
            "zero_advantage_skipped": parts.get("zero_advantage_skipped", 0.0),
            "response_length": tally["completion_tokens"] / tally["samples"],
            "kl": parts.get("kl_sum", float("nan")) / max(tokens, 1.0),
            "entropy": parts.get("entropy_sum", float("nan")) / max(tokens, 1.0),
            "clip_fraction": parts.get("clipped_sum", float("nan")) / max(tokens, 1.0),
            "logprob_gap": parts.get("gap_abs_sum", float("nan")) / max(parts.get("gap_tokens", 0.0), 1.0),
            "grad_norm": parts.get("grad_norm", float("nan")),
            "skipped": parts.get("skipped", 0.0),  # 1: a non-finite gradient, the update was dropped
            "lr": parts.get("lr", float("nan")),
            "tokens_per_s": tally["completion_tokens"] / max(tally["seconds_rollout"], 1e-9),  # generated, per s
            "seconds_rollout": tally["seconds_rollout"],
            "seconds_reward": tally["seconds_reward"],
            "seconds_train": seconds_train,
            "seconds_sync": seconds_sync,
            "seconds_step": time.perf_counter() - step_begin,  # wall: the phases plus scheduling and packing
            "rollout_restarts": tally["rollout_restarts"],
        }
        logger.log(step + 1, record)
        progress.update(1)
        skipped_in_a_row = skipped_in_a_row + 1 if record["skipped"] else 0
        if skipped_in_a_row:
            progress.write(f"step {step + 1}: non-finite gradient norm, update dropped ({skipped_in_a_row} in a row)")
        if skipped_in_a_row > cfg.max_skipped_steps:
            raise FloatingPointError(f"{skipped_in_a_row} steps in a row had a non-finite gradient; stopped at step "
                                     f"{step + 1}, the checkpoints in {out} are those of the last good steps")
        progress.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}",
                             zero_var=f"{record['zero_variance_fraction']:.2f}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            save_checkpoint(policy, scheduler, out, step + 1, cfg)
    progress.close()

    # --- export and evaluate --------------------------------------------------------------------------------
    final_dir = out / "final"
    policy.export(final_dir)
    copy_tokenizer_files(policy_path, final_dir)
    logger.close()
    plot_curves(out / "metrics.jsonl", out / "curves.png",
                ("reward_mean", "accuracy", "zero_variance_fraction", "kl", "entropy", "logprob_gap"),
                title=f"GRPO: {cfg.output_dir}")
    for group in (rollout, rewarder, policy):
        group.close()
    print(f"exported {final_dir}")
    if eval_rows:
        evaluate_before_after(policy_path, final_dir, eval_rows, cfg, out)


def evaluate_before_after(start: str | Path, trained: Path, eval_rows: list[dict], cfg: GRPOConfig, out: Path) -> None:
    """Held-out accuracy of the start and trained policies, greedy on every eval row (eval.json) and, with
    data.eval_samples, sampled at the rollout temperature on the levels trained on (eval_sampled.json); printed as
    tables with the paired change beneath each."""
    files = {"eval.json": EvalSuite(eval_rows)}
    sampled_rows = select_levels(eval_rows, cfg.data.levels, "eval rows")
    if cfg.data.eval_samples and sampled_rows:
        files["eval_sampled.json"] = EvalSuite(sampled_rows, sampled_spec(
            cfg.data.eval_samples, cfg.rollout.temperature, cfg.rollout.max_tokens, seed=cfg.seed))
    # Both models and both suites in one vLLM process: its import alone costs ~16 s here.
    results = evaluate_suites({"before GRPO": start, "after GRPO": trained}, list(files.values()))
    for (file, suite), reports in zip(files.items(), results, strict=True):
        what = "greedy" if suite.sampling.n == 1 else (
            f"{suite.sampling.n} samples per problem at temperature {suite.sampling.temperature:g}, the levels "
            f"trained on; the fraction right")
        print(f"\nheld-out accuracy ({what}):\n" + format_accuracy_table(reports))
        print(format_change(reports["before GRPO"], reports["after GRPO"]))
        (out / file).write_text(json.dumps({k: v.to_dict() for k, v in reports.items()}, indent=2))


def rollout_sampling(args: RolloutArgs, seed: int) -> RolloutSampling:
    return RolloutSampling(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens,
                           ignore_eos=args.ignore_eos, seed=seed)


def new_tally() -> dict[str, float]:
    """The counts and times roll_out_and_score adds to."""
    return dict.fromkeys(("seconds_rollout", "seconds_reward", "samples", "passed", "reward_sum",
                          "completion_tokens", "rollout_restarts"), 0.0)


def roll_out_and_score(query_ids: list[int], rollout: RolloutWorkerGroup, rewarder: RewardWorkerGroup,
                       prompt_ids: list[list[int]], rows: list[dict], sampling: RolloutSampling, version: int,
                       tally: dict[str, float], resync: Callable[[], int]):
    """The scheduler's rollout callback: sample `sampling.n` completions per query and score them, adding times
    and counts to `tally`. A rollout actor lost mid-call is restarted by Ray; `resync()` then sends it the policy's
    weights and the call is retried. Returns one payload per query, (batch, k) with its group at completions
    k*n .. k*n+n-1, and the rewards [Q, n]."""
    tic = time.perf_counter()
    batch, restarts = retry_after_restarts(
        lambda: rollout.generate([prompt_ids[q] for q in query_ids], sampling, policy_version=version),
        lost=lambda error: isinstance(error, RolloutLost), recover=resync, max_retries=rollout.args.max_restarts,
        what=f"rollout (re-syncing policy version {version})")
    tally["rollout_restarts"] += restarts
    tally["seconds_rollout"] += time.perf_counter() - tic
    tic = time.perf_counter()
    requests = [RewardRequest(prompt=rows[q]["prompt"], response=batch.text[k], task=rows[q])
                for k, q in enumerate(q for q in query_ids for _ in range(sampling.n))]
    scored = rewarder.score(requests)
    tally["seconds_reward"] += time.perf_counter() - tic
    tally["samples"] += len(requests)
    tally["reward_sum"] += float(scored.reward.sum())
    tally["completion_tokens"] += sum(len(c) for c in batch.completion_token_ids)
    if scored.verifier_pass is not None:
        tally["passed"] += float(scored.verifier_pass.float().sum())
    return [(batch, k) for k in range(len(query_ids))], scored.reward.view(len(query_ids), sampling.n)


def score_all_queries(scheduler: QueryScheduler, roll_out: Callable, chunk: int, output: Path) -> None:
    """The scoring pass: one group per query, `chunk` queries per rollout call, into the scheduler's estimates;
    what it found (time, mean reward, groups with zero reward variance) is printed and written to `output`."""
    tic = time.perf_counter()
    ids = list(range(scheduler.num_queries))
    rewards = []
    for start in tqdm(range(0, len(ids), chunk), desc="scoring pass", unit="chunk"):
        rewards.append(roll_out(ids[start:start + chunk])[1])
    rewards = torch.cat(rewards)  # [Q, G]
    scheduler.seed_estimates(ids, rewards)
    zero = scheduler.config.is_zero_variance(reward_variance(rewards))  # [Q]
    summary = {"queries": len(ids), "seconds": time.perf_counter() - tic, "reward_mean": float(rewards.mean()),
               "zero_variance_fraction": float(zero.double().mean())}
    output.write_text(json.dumps(summary, indent=2) + "\n")
    tqdm.write(f"scoring pass: {len(ids)} queries in {summary['seconds']:.0f} s, reward mean "
               f"{summary['reward_mean']:.3f}, {summary['zero_variance_fraction']:.0%} of groups with zero variance")


def sync_rollout(policy: PolicyWorkerGroup, rollout: RolloutWorkerGroup, version: int, args: RolloutArgs) -> int:
    """The policy's weights to every rollout actor, as `version`. A rollout actor that dies mid-sync is restarted
    by Ray (the policy ranks stay in step, see rollout.weight_sync.sync_weights): wait for it, sync again. Returns
    the number of such restarts."""
    def lost(error: Exception) -> bool:
        return isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, ray.exceptions.RayActorError)

    def wait_for_restart() -> int:
        rollout.wait_until_ready()
        return 0

    _, restarts = retry_after_restarts(
        lambda: policy.sync_weights(rollout.actors, version, args.sync_bucket_mb * 2**20, args.dtype),
        lost=lost, recover=wait_for_restart, max_retries=args.max_restarts, what="weight sync")
    return restarts


def save_checkpoint(policy: PolicyWorkerGroup, scheduler: QueryScheduler, out: Path, step: int,
                    cfg: GRPOConfig) -> None:
    """Policy shards (every rank) and the scheduler's priorities, published atomically (align.checkpoint)."""
    staging = staging_dir(out, step)
    staging.mkdir(parents=True, exist_ok=True)
    policy.save(staging / "policy")
    save_config(cfg, staging / "config.yaml")
    publish_checkpoint(out, step, {"step": step, "scheduler": scheduler.state_dict(),
                                   "config": config_to_dict(cfg)}, cfg.keep_last)


if __name__ == "__main__":
    config = parse_config(GRPOConfig, description=__doc__)
    torch.manual_seed(config.seed)
    try:
        main(config)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
