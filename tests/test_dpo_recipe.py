"""recipes/dpo.py end to end on a tiny model: it learns a fixed pair set, stored reference log-probs equal a live
reference, a killed OnTIES run resumes to the same curve and weights, ZeRO-3 on 2 ranks equals 1 process (OnDARE),
bad pair rows name file, row and field, and the 7B preset holds the report's settings."""

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
from align.data import DataError, collate, load_rows, tokenize_answer, tokenize_dpo_pairs
from align.dpo import segment_ids_from_lengths
from align.model import copy_tokenizer_files, load_pretrained, save_pretrained
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "dpo.py"
ZERO3 = REPO / "recipes" / "configs" / "accelerate" / "zero3.yaml"
SMALL = TaskDataConfig(arithmetic_sft=24, code_sft=8, arithmetic_prompts=2, code_prompts=2, eval_per_level=1)
PAIRS = 16


def load_recipe():
    if "dpo_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dpo_recipe", RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["dpo_recipe"] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["dpo_recipe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny model (playing the SFT model), a "base" that differs from it by small noise (tau = the noise), and
    a fixed set of pairs: correct worked solutions against ones with a slip, and working code against a mutant."""
    root = tmp_path_factory.mktemp("dpo")
    sft = build_tiny(root / "sft", seed=0, tasks=SMALL)
    model = load_pretrained(sft)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.02 * torch.randn(p.shape, generator=generator))
    save_pretrained(model, root / "base")
    copy_tokenizer_files(sft, root / "base")
    rows = (sft / "data" / "pairs.jsonl").read_text().splitlines()[:PAIRS]
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return {"sft": sft, "base": root / "base", "pairs": root / "pairs.jsonl"}


def dpo_command(models, output_dir: Path, *extra: str, zero3: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(ZERO3)] if zero3 else ["--num_processes", "1", "--cpu"]
    return [*launcher, str(RECIPE), "--model-path", str(models["sft"]), "--model-base-path", str(models["base"]),
            "--data-path", str(models["pairs"]), "--output-dir", str(output_dir), "--log-every", "1",
            "--save-every", "2", "--max-steps", "6", "--optim-lr", "1e-3", "--optim-warmup-steps", "0",
            "--optim-grad-accum", "1", "--optim-epochs", "3", *extra]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(a: list[dict], b: list[dict], tol: float, keys=("loss", "reward_margin", "grad_norm")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (key, a, b)


@pytest.mark.slow
def test_learns_a_fixed_pair_set_and_exports(models, tmp_path):
    """Three epochs over 16 pairs: the loss falls from log 2 and the implicit reward ranks more pairs right."""
    window = tmp_path / "run"
    run(dpo_command(models, window, "--max-steps", "0"))  # all 3 epochs, a record per step
    records = metrics(window)
    third = len(records) // 3
    first, last = records[:third], records[-third:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the first step
    assert mean(last, "loss") < mean(first, "loss") - 0.1, records
    assert mean(last, "reward_accuracy") > mean(first, "reward_accuracy"), records
    assert mean(last, "reward_margin") > 0
    # The export is a normal HF directory with the trained weights.
    hf = transformers.AutoModelForCausalLM.from_pretrained(window / "final")
    ours = load_pretrained(window / "final")
    ids = torch.tensor([load_tokenizer(window / "final")("What is 2 + 2?")["input_ids"]])
    assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)
    assert not torch.equal(ours.state_dict()["model.norm.weight"], load_pretrained(models["sft"]).model.norm.weight)
    assert (window / "loss.png").stat().st_size > 0 and (window / "ref_logps.pt").is_file()


@pytest.mark.slow
def test_stored_reference_logps_equal_live_reference(models, tmp_path):
    stored, live = tmp_path / "stored", tmp_path / "live"
    run(dpo_command(models, stored, "--max-steps", "4"))
    run(dpo_command(models, live, "--max-steps", "4", "--ref-mode", "live"))
    assert_same_curve(metrics(stored), metrics(live), tol=1e-5,
                      keys=("loss", "rewards_chosen", "rewards_rejected", "reward_margin"))
    # The stored values are the reference model's summed answer log-probs, scored here one pair at a time.
    recipe = load_recipe()
    tokenizer = load_tokenizer(models["sft"])
    pairs, _ = tokenize_dpo_pairs(load_rows(models["pairs"]), tokenizer, 512, "pairs")
    saved = torch.load(stored / "ref_logps.pt", weights_only=False)
    reference = load_pretrained(models["sft"]).eval()
    for i, pair in enumerate(pairs):
        batch = collate([pair.chosen, pair.rejected])
        expected = recipe.score_pairs(reference, batch, segment_ids_from_lengths(batch.lengths))[0]
        torch.testing.assert_close(saved["logps"][i], expected, atol=1e-4, rtol=1e-5)
    assert saved["fingerprint"]["count"] == PAIRS


def run_and_kill_after_checkpoint(command: list[str], output_dir: Path, step: int) -> None:
    """Start a run and SIGKILL its whole process group as soon as checkpoint `step` is published."""
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    while not (output_dir / f"checkpoint-{step:08d}" / "trainer_state.json").is_file():
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_onties_killed_and_resumed_matches_uninterrupted(models, tmp_path):
    """OnTIES (tau read from the base model, kept in the optimizer state and so in checkpoints): a run killed after
    its step-2 checkpoint and resumed gives the uninterrupted run's curve and weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    onties = ("--optim-merge-variant", "onties", "--optim-merge-reserve-rate", "0.3", "--optim-merge-alpha", "0.2")
    run(dpo_command(models, straight, *onties))
    run_and_kill_after_checkpoint(dpo_command(models, resumed, *onties), resumed, step=2)
    proc = run(dpo_command(models, resumed, *onties, "--resume"))
    assert "resumed from" in proc.stdout
    assert_same_curve(metrics(straight), metrics(resumed), tol=1e-6)
    a, b = load_pretrained(straight / "final").state_dict(), load_pretrained(resumed / "final").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert sorted(p.name for p in resumed.glob("*checkpoint-*")) == ["checkpoint-00000004", "checkpoint-00000006"]


@pytest.mark.slow
def test_zero3_two_ranks_match_one_process(models, tmp_path):
    """OnDARE under ZeRO-3 on 2 gloo ranks (one micro-batch each, tau attached to DeepSpeed's flat partitions, masks
    hashed from each entry's index in the full parameter) equals one process accumulating both micro-batches: the
    loss is normalised by each step's global pair count. (Not OnTIES here: its top-p mask of AdamW's first update
    picks among near-ties, |delta| ~ lr everywhere, so float noise of a different reduction order changes it.)"""
    ondare = ("--optim-merge-variant", "ondare", "--optim-merge-reserve-rate", "0.5", "--optim-merge-alpha", "0.2",
              "--max-steps", "4")
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    run([*dpo_command(models, single, *ondare), "--optim-grad-accum", "2"])
    run(dpo_command(models, zero3, *ondare, zero3=True))
    assert_same_curve(metrics(single), metrics(zero3), tol=1e-4)
    a, b = load_pretrained(single / "final").state_dict(), load_pretrained(zero3 / "final").state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name


BAD_ROWS = {
    "no-rejected": ({"prompt": "q", "chosen": "a"}, "row 1: field 'rejected': missing"),
    "bad-role": ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
                 "row 1: field 'prompt[0].role'"),
    "not-assistant": ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
                      "row 1: field 'chosen': must end with an assistant turn"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_pair_rows_name_file_row_and_field(models, tmp_path, case):
    row, expected = BAD_ROWS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    recipe = load_recipe()
    cfg = recipe.DPOConfig(output_dir=str(tmp_path / "out"), model=recipe.ModelArgs(path=str(models["sft"])),
                           data=recipe.DataArgs(path=str(data)))
    with pytest.raises(DataError, match=re.escape(f"{data}: {expected}")):
        recipe.main(cfg)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_exit_with_one_line_errors(models, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, str(RECIPE), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=ENV)

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": 3}) + "\n")
    result = cli("--model-path", str(models["sft"]), "--data-path", str(data), "--output-dir", str(tmp_path / "a"))
    assert result.returncode != 0 and f"{data}: row 0: field 'rejected'" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("--model-path", str(models["sft"]), "--data-path", str(models["pairs"]), "--output-dir",
                 str(tmp_path / "b"), "--optim-merge-variant", "ondare")
    assert result.returncode != 0 and "model.base_path is required" in result.stderr
    result = cli("--model-path", str(models["sft"]), "--output-dir", str(tmp_path / "c"))  # the comparison
    assert result.returncode != 0 and "model.base_path is required with --model-path" in result.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.yaml").write_text("output_dir: mine\n")
    result = cli("--model-path", str(models["sft"]), "--data-path", str(models["pairs"]), "--output-dir", str(taken))
    assert result.returncode != 0 and "holds another run" in result.stderr
    assert (taken / "config.yaml").read_text() == "output_dir: mine\n"


def test_answer_mask_skips_the_prompt(models):
    """Only the answer's tokens are scored, also when the prompt holds an earlier assistant turn."""
    tokenizer = load_tokenizer(models["sft"])
    prompt = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "And 2 + 2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    chat = tokenize_answer(prompt, answer, tokenizer)
    marked = tokenizer.decode([t for t, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m])
    assert marked == "4<|im_end|>"


def test_help_and_preset():
    result = subprocess.run([sys.executable, str(RECIPE), "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--loss-type", "--ref-mode", "--optim-merge-variant", "--model-base-path", "--build-sampling-k"):
        assert flag in result.stdout
    recipe = load_recipe()
    preset = load_config(recipe.DPOConfig, REPO / "recipes/configs/dpo/qwen2.5-7b.yaml")
    assert (preset.optim.lr, preset.optim.epochs, preset.model.dtype) == (7e-7, 1, "bfloat16")
    merge = preset.optim.merge
    assert (merge.variant, merge.reserve_rate, merge.alpha) == ("ondare", 0.01, 1e-7)
    assert (preset.loss.type, preset.loss.beta, preset.ref.mode) == ("sigmoid", 0.1, "stored")
