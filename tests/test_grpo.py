"""recipes/grpo.py end to end with real Ray, vLLM and DeepSpeed ZeRO-3 on a tiny model: a 2-rank policy run
that syncs weights every step, resume, and the same recipe submitted as a Ray job to a loopback head."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.tasks import TaskDataConfig
from align.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "grpo.py"
SMALL_TASKS = TaskDataConfig(arithmetic_sft=40, code_sft=20, arithmetic_prompts=12, code_prompts=8,
                             eval_per_level=2)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("grpo") / "tiny", seed=0, tasks=SMALL_TASKS)


def grpo_args(tiny_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    # A random-init policy answers nothing right, so the verifier alone would give only zero-variance groups:
    # the reward model (here the random init with a score head) makes rewards vary, as a real RM does. Summed: the
    # default "gated" combination would count the model's score only for answers that pass, i.e. never here.
    return ["--policy-model-path", str(tiny_dir), "--data-prompts-path", str(tiny_dir / "data" / "prompts.jsonl"),
            "--data-levels", "", "--data-eval-path", "none", "--no-default-reward-model",
            "--reward-model-path", str(tiny_dir),
            "--reward-model-weight", "1.0", "--reward-combination", "sum", "--queries-per-step", "3",
            "--rollout-n", "4", "--rollout-max-tokens", "24", "--rollout-max-model-len", "256",
            "--policy-micro-batch-tokens", "256", "--output-dir", str(output_dir),
            "--rollout-resources-num-actors", "1", "--rollout-resources-num-cpus", "0.5",  # one engine: less memory
            # float32 on any CPU: the sync checks' 1e-3 log-prob tolerance is a float32 statement
            "--policy-dtype", "float32", "--rollout-dtype", "float32", *extra]


def run(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_zero3_run_syncs_resumes_and_exports(tiny_dir, tmp_path):
    out = tmp_path / "run"
    common = grpo_args(tiny_dir, out, "--policy-resources-num-actors", "2", "--policy-resources-num-cpus", "0.5",
                       "--policy-lr", "1e-3", "--loss-kl-beta", "0.05", "--save-every", "2",
                       "--rollout-temperature", "0.7")  # the policy's log-probs must be taken at T as vLLM's are
    run([sys.executable, str(RECIPE), *common, "--steps", "2", "--scoring-pass"])
    first = metrics(out)
    assert [r["step"] for r in first] == [1, 2]
    for record in first:
        for key in ("reward_mean", "accuracy", "kl", "entropy", "clip_fraction", "zero_variance_fraction",
                    "logprob_gap", "seconds_rollout", "seconds_reward", "seconds_train", "seconds_sync"):
            assert key in record, key
    # Step 2's completions were sampled by vLLM after the sync of step 1's update (lr 1e-3 moves the weights):
    # its log-probs equal the 2-rank ZeRO-3 policy's own, so the sync really loaded the new weights.
    assert first[1]["logprob_gap"] < 1e-3, first[1]
    assert first[1]["kl"] > 0  # the policy moved away from the frozen reference
    state = json.loads((out / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["scheduler"]["counts"]["groups"] == 6
    # The scoring pass gave every prompt an estimate before the first step (visits count training groups only).
    scoring = json.loads((out / "scoring_pass.json").read_text())
    assert scoring["queries"] == len(state["scheduler"]["estimate"]) == 20
    assert None not in state["scheduler"]["estimate"] and sum(state["scheduler"]["visits"]) == 6

    run([sys.executable, str(RECIPE), *common, "--steps", "3", "--resume"])
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["logprob_gap"] < 1e-3  # the resumed policy's weights were synced before sampling
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert (out / "curves.png").is_file()


def test_nan_steps_are_dropped_and_repeated_nans_stop_the_run(tiny_dir, tmp_path):
    out = tmp_path / "nan"
    args = grpo_args(tiny_dir, out, "--policy-lr", "1e-3", "--steps", "4", "--save-every", "1", "--keep-last", "5",
                     "--inject-nan-steps", "2,3,4", "--max-skipped-steps", "2")
    proc = subprocess.run([sys.executable, str(RECIPE), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "3 steps in a row had a non-finite gradient" in proc.stderr, proc.stderr[-3000:]
    records = metrics(out)
    assert [(r["step"], r["skipped"]) for r in records] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert all(r["lr"] == records[0]["lr"] for r in records)  # a dropped step does not advance the schedule
    # The run stopped before checkpointing step 4; steps 2 and 3 changed nothing: the fp32 master weights and
    # Adam moments of their checkpoints are step 1's, bit for bit.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-0000000{k}" for k in (1, 2, 3)]
    def optimizer_state(step: int) -> dict:
        (shard,) = (out / f"checkpoint-0000000{step}" / "policy" / "state").glob("*optim_states.pt")
        return torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    first, last = optimizer_state(1), optimizer_state(3)
    flat_first, flat_last = first["fp32_flat_groups"], last["fp32_flat_groups"]
    assert all(torch.equal(a, b) for a, b in zip(flat_first, flat_last, strict=True))
    moments = lambda state: [t for s in state["optimizer_state_dict"]["state"].values()  # noqa: E731
                             for t in s.values() if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(moments(first), moments(last), strict=True))


def test_a_killed_rollout_actor_is_restarted_and_the_run_finishes(tiny_dir, tmp_path):
    out = tmp_path / "killed"
    args = grpo_args(tiny_dir, out, "--policy-lr", "1e-3", "--steps", "3")
    proc = subprocess.Popen([sys.executable, str(RECIPE), *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        # Step 1 is done; kill the vLLM engine's actor process as an OOM killer or a lost node would.
        victims = subprocess.run(["pgrep", "-f", "^ray::RolloutActor"], capture_output=True, text=True).stdout.split()
        assert len(victims) == 1, victims
        os.kill(int(victims[0]), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-5000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sum(r["rollout_restarts"] for r in records) == 1, stderr[-3000:]
    # The restarted engine came back with the starting weights; step 2 sampled from the re-synced step-1 policy
    # (lr 1e-3 moves it far from the start), so its log-probs match the policy's.
    assert all(r["logprob_gap"] < 1e-3 for r in records[1:]), records
    assert (out / "final" / "model.safetensors").is_file()


def test_refuses_to_overwrite_another_run(tiny_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    proc = subprocess.run([sys.executable, str(RECIPE), *grpo_args(tiny_dir, out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "holds another run" in proc.stderr


def test_ray_job_submit_on_a_loopback_head(tiny_dir, tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    head = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
                           "--dashboard-port", "8265", "--disable-usage-stats"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        # The job runs in a copy of the working dir on the cluster; its output directory is an absolute path here.
        work = tmp_path / "job"
        shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__"))
        out = tmp_path / "out"
        submit = [ray_cli, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", str(work),
                  "--no-wait", "--", "python", "recipes/grpo.py", *grpo_args(tiny_dir, out, "--steps", "1")]
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout).group(0)  # the CLI colours its output
        deadline, status = time.time() + 900, ""
        while time.time() < deadline:
            status = subprocess.run([ray_cli, "job", "status", "--address", "http://127.0.0.1:8265", job_id],
                                    env=env, capture_output=True, text=True, timeout=120).stdout  # "... succeeded"
            if any(word in status.lower() for word in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = subprocess.run([ray_cli, "job", "logs", "--address", "http://127.0.0.1:8265", job_id], env=env,
                              capture_output=True, text=True, timeout=120).stdout
        assert "succeeded" in status.lower(), status + logs[-4000:]
        assert [r["step"] for r in metrics(out)] == [1]
        assert (out / "final" / "model.safetensors").is_file()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=300)


def test_help_and_the_7b_preset():
    result = subprocess.run([sys.executable, str(RECIPE), "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for flag in ("--policy-resources-num-gpus", "--rollout-resources-placement-strategy", "--scheduler-order",
                 "--loss-kl-beta", "--resume", "--output-dir"):
        assert flag in result.stdout, flag
    spec = importlib.util.spec_from_file_location("grpo_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["grpo_recipe"] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)
    preset = load_config(recipe.GRPOConfig, REPO / "recipes/configs/grpo/qwen2.5-7b.yaml")
    # The report's Stage 3: 8 responses per query, 2048 samples per step (global batch) and per episode.
    assert preset.rollout.n == 8 and preset.queries_per_step * preset.rollout.n == 2048
    assert preset.reward.model_path and preset.reward.zero3 and not preset.default_reward_model
    assert preset.scheduler.order == "variance" and preset.policy.dtype == preset.rollout.dtype == "bfloat16"
    for role in (preset.policy, preset.rollout, preset.reward):
        assert role.resources.num_gpus == 1 and role.resources.num_actors == 8
