"""recipes/sft.py end to end: resume after a kill, ZeRO-3 on 2 ranks, export, bad input, presets."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from align.config import load_config
from align.model import load_pretrained
from align.tasks import TaskDataConfig
from align.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "sft.py"
ZERO3 = REPO / "recipes" / "configs" / "accelerate" / "zero3.yaml"
SMALL_TASKS = TaskDataConfig(arithmetic_sft=240, code_sft=80, arithmetic_prompts=10, code_prompts=10,
                             eval_per_level=4)


def load_recipe():
    if "sft_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sft_recipe", RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sft_recipe"] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["sft_recipe"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("sft") / "tiny", seed=0, tasks=SMALL_TASKS)


def sft_command(tiny_dir: Path, output_dir: Path, *extra: str, zero3: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(ZERO3)] if zero3 else ["--num_processes", "1", "--cpu"]
    return [*launcher, str(RECIPE), "--model-path", str(tiny_dir), "--output-dir", str(output_dir),
            "--data-micro-batch-tokens", "1024", "--data-max-length", "512", "--log-every", "1",
            "--save-every", "2", "--max-steps", "6", "--eval-enabled", "false", *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_and_kill_after_checkpoint(command: list[str], output_dir: Path, step: int) -> None:
    """Start a run and SIGKILL its whole process group as soon as checkpoint `step` is published."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    while not (output_dir / f"checkpoint-{step:08d}" / "trainer_state.json").is_file():
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records]


def assert_same_curve(a, b, tol):
    assert [step for step, _ in a] == [step for step, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= tol, (a, b)


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted(tiny_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(sft_command(tiny_dir, straight))
    run_and_kill_after_checkpoint(sft_command(tiny_dir, resumed), resumed, step=2)
    run(sft_command(tiny_dir, resumed, "--resume"))
    assert_same_curve(losses(straight), losses(resumed), tol=1e-6)
    assert losses(straight)[-1][1] < losses(straight)[0][1]  # it learns
    ours, theirs = load_pretrained(straight / "final"), load_pretrained(resumed / "final")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # Only the newest keep_last=2 checkpoints remain, and no staging directory.
    assert sorted(p.name for p in resumed.glob("*checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000006"]
    assert (straight / "loss.png").stat().st_size > 0 and (straight / "tensorboard").is_dir()
    # The export is a normal HF directory.
    model = transformers.AutoModelForCausalLM.from_pretrained(straight / "final")
    tokenizer = transformers.AutoTokenizer.from_pretrained(straight / "final")
    ids = torch.tensor([tokenizer("What is 2 + 2?")["input_ids"]])
    assert torch.allclose(model(ids).logits, ours(ids), atol=1e-5)


@pytest.mark.slow
def test_zero3_two_ranks_match_one_process_and_resume(tiny_dir, tmp_path):
    """ZeRO-3 over 2 gloo ranks with 1 micro-batch each equals 1 process accumulating 2 micro-batches: the loss
    is normalised by each step's global token count, so the split does not matter. Then kill and resume."""
    single, zero3, resumed = tmp_path / "single", tmp_path / "zero3", tmp_path / "zero3-resumed"
    run(sft_command(tiny_dir, single, "--optim-grad-accum", "2"))
    run(sft_command(tiny_dir, zero3, zero3=True))
    assert_same_curve(losses(single), losses(zero3), tol=1e-4)
    run_and_kill_after_checkpoint(sft_command(tiny_dir, resumed, zero3=True), resumed, step=4)
    run(sft_command(tiny_dir, resumed, "--resume", zero3=True))
    assert_same_curve(losses(zero3), losses(resumed), tol=1e-6)
    gathered, reference = load_pretrained(zero3 / "final"), load_pretrained(single / "final")
    for (name, a), b in zip(gathered.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), name


@pytest.mark.slow
def test_export_loads_in_vllm(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run(sft_command(tiny_dir, out, "--max-steps", "2"))
    samples_file = tmp_path / "vllm.json"
    subprocess.run([sys.executable, str(REPO / "tests/scripts/vllm_logprobs.py"), str(out / "final"),
                    str(samples_file), "--tokenizer"], check=True, cwd=tmp_path, timeout=600)
    model = load_pretrained(out / "final")
    for sample in json.loads(samples_file.read_text()):
        ids = sample["prompt_ids"] + sample["completion_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids[:-1]]), target_ids=torch.tensor([ids[1:]])).logprobs[0]
        assert torch.allclose(ours[len(sample["prompt_ids"]) - 1:], torch.tensor(sample["logprobs"]), atol=1e-4)


BAD_ROWS = {
    "no-messages": ({"text": "hi"}, "row 1: field 'messages'"),
    "wrong-role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                   "row 1: field 'messages[0].role'"),
    "non-string-content": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
                           "row 1: field 'messages[0].content'"),
    "no-assistant": ({"messages": [{"role": "user", "content": "x"}]}, "row 1: field 'messages'"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_name_file_row_and_field(tiny_dir, tmp_path, case):
    row, expected = BAD_ROWS[case]
    good = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "two"}]}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    recipe = load_recipe()
    cfg = recipe.SFTConfig(output_dir=str(tmp_path / "out"), model=recipe.ModelArgs(path=str(tiny_dir)),
                           data=recipe.DataArgs(path=str(data)), eval=recipe.EvalArgs(enabled=False))
    with pytest.raises(ValueError, match=re.escape(f"{data}: {expected}")):
        recipe.main(cfg)


def test_bad_inputs_exit_with_clear_errors(tiny_dir, tmp_path):
    """Through the command line: non-zero exit, a one-line error, nothing of the other run overwritten."""
    def cli(*args):
        return subprocess.run([sys.executable, str(RECIPE), "--eval-enabled", "false", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli("--model-path", str(tiny_dir), "--data-path", str(empty), "--output-dir", str(tmp_path / "a"))
    assert result.returncode != 0 and "empty.jsonl" in result.stderr and "Traceback" not in result.stderr

    result = cli("--model-path", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "b"))
    assert result.returncode != 0 and "no-model: no such model directory" in result.stderr

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    result = cli("--model-path", str(broken), "--output-dir", str(tmp_path / "c"))
    assert result.returncode != 0 and "config.json" in result.stderr and "Traceback" not in result.stderr

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("output_dir: mine\n")
    result = cli("--model-path", str(tiny_dir), "--output-dir", str(taken))
    assert result.returncode != 0 and "holds another run" in result.stderr
    assert (taken / "config.yaml").read_text() == "output_dir: mine\n"


def test_help_and_presets():
    result = subprocess.run([sys.executable, str(RECIPE), "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    assert "--optim-lr" in result.stdout and "Peak learning rate" in result.stdout and "--resume" in result.stdout
    recipe = load_recipe()
    preset = load_config(recipe.SFTConfig, REPO / "recipes/configs/sft/qwen2.5-7b.yaml")
    assert (preset.optim.lr, preset.optim.min_lr, preset.optim.weight_decay) == (7e-6, 7e-7, 0.1)
    assert (preset.optim.max_grad_norm, preset.data.max_length, preset.optim.epochs) == (1.0, 32768, 2)
    assert preset.model.dtype == "bfloat16"


@pytest.mark.slow
def test_lora_trains_adapters_and_exports_merged_weights(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    run(sft_command(tiny_dir, out, "--lora-r", "4", "--max-steps", "3", "--optim-warmup-steps", "0"))
    base, merged = load_pretrained(tiny_dir).state_dict(), load_pretrained(out / "final").state_dict()
    assert set(base) == set(merged)  # a plain checkpoint: no adapter tensors, HF names
    for name in base:
        changed = not torch.equal(base[name], merged[name])
        # Adapters sit on the projections (weights only); embeddings, norms and Q/K/V biases stay frozen.
        assert changed == (name.endswith("proj.weight")), name


def test_two_stage_plan_trains_short_then_mixes_in_long():
    recipe = load_recipe()
    from align.data import TokenizedChat, plan_epochs

    lengths = [20] * 60 + [90] * 10  # 60 short examples, 10 long ones
    examples = [TokenizedChat([1] * n, [False] + [True] * (n - 1)) for n in lengths]
    cfg = recipe.SFTConfig(data=recipe.DataArgs(max_length=32, long_max_length=128, long_fraction=0.25,
                                                micro_batch_tokens=128), optim=recipe.OptimArgs(epochs=1.0))
    steps = recipe.plan_all_steps(examples, cfg, world_size=1)
    seen = [[i for slots in s.micro_batches for mb in slots for i in mb] for s in steps]
    stage_one_steps = len(plan_epochs(lengths, [n - 1 for n in lengths], range(60), 1.0, 128, 1, 1, seed=0))
    stage_one = [i for ids in seen[:stage_one_steps] for i in ids]
    stage_two = [i for ids in seen[stage_one_steps:] for i in ids]
    assert sorted(stage_one) == list(range(60))  # one epoch of the short examples, nothing long
    long_in_two = sum(lengths[i] > 32 for i in stage_two)
    assert long_in_two == 10 and len(stage_two) == 40  # 10 long are 25% of stage two: 30 short sampled
    one_stage = recipe.plan_all_steps(examples, recipe.SFTConfig(data=recipe.DataArgs(
        max_length=128, micro_batch_tokens=128), optim=recipe.OptimArgs(epochs=1.0)), world_size=1)
    assert sorted(i for s in one_stage for slots in s.micro_batches for mb in slots for i in mb) == list(range(70))


def test_cpu_ranks_use_their_share_of_cores():
    # accelerate exports OMP_NUM_THREADS=1; each of N local CPU ranks should still get cores // N threads, and a
    # larger thread count set explicitly is kept. Subprocesses: the thread count is process-global.
    cores = len(os.sched_getaffinity(0))
    probe = ("import sys, torch; from align.engine import use_cpu_cores; ranks, preset = map(int, sys.argv[1:]); "
             "preset and torch.set_num_threads(preset); use_cpu_cores(ranks); print(torch.get_num_threads())")

    def threads(ranks: int, preset: int = 0) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", probe, str(ranks), str(preset)], env=env, capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip())

    assert threads(1) == cores
    assert threads(2) == max(cores // 2, 1)
    assert threads(1, preset=cores + 3) == cores + 3
