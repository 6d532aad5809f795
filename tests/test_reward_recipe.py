"""recipes/reward_model.py end to end on the tiny model: trains, resumes, exports a checkpoint transformers loads as
`Qwen2ForSequenceClassification`, and reports held-out pair accuracy before and after."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from align.config import load_config
from align.defaults import base_model_dir, cache_dir, reward_model_dir, stage_name
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer
from reward.model import load_reward_model

REPO = Path(__file__).resolve().parents[1]
SMALL = TaskDataConfig(arithmetic_sft=150, code_sft=90, arithmetic_prompts=4, code_prompts=4, eval_per_level=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("rm") / "tiny", seed=0, tasks=SMALL)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "recipes/reward_model.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_trains_exports_and_reports(tiny_dir, tmp_path):
    out = tmp_path / "rm"
    common = ["--model-path", str(tiny_dir), "--output-dir", str(out), "--save-every", "10", "--optim-lr", "1e-3"]
    first = run(*common, "--max-steps", "10")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(*common, "--max-steps", "10")  # the directory holds a run: refuse, do not overwrite
    assert again.returncode != 0 and "--resume" in again.stderr
    resumed = run(*common, "--max-steps", "40", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]
    assert {"loss", "accuracy", "margin", "lr", "tokens_per_s"} <= set(metrics[-1])
    assert (out / "loss.png").is_file() and (out / "config.yaml").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"after training"}  # a resumed run has no "before"
    assert set(report["after training"]["by_subset"]) == {"arithmetic-correct", "code-correct", "style-concise"}

    hf, info = transformers.Qwen2ForSequenceClassification.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and hf.config.num_labels == 1
    tokenizer = load_tokenizer(out / "final")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"},
                                          {"role": "assistant", "content": "2+3=5, so 5"}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids).logits[0, 0]
        ours = load_reward_model(out / "final").eval()(ids)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_bad_pairs_name_file_row_and_field(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    result = run("--model-path", str(tiny_dir), "--data-path", str(data), "--output-dir", str(tmp_path / "o"))
    assert result.returncode != 0
    assert f"{data}: row 1: field 'rejected': missing" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started


DEFAULT_RM_BUILT = (cache_dir() / stage_name("rm", 0) / "final" / "config.json").is_file()


@pytest.mark.skipif(not (DEFAULT_RM_BUILT or os.environ.get("QWEN_ALIGN_BUILD_DEFAULTS")),
                    reason="acceptance test of the embedded default's reward model: runs where it is built (~10 min "
                           "of SFT and RM training once per machine) or with QWEN_ALIGN_BUILD_DEFAULTS=1")
def test_default_reward_model_reaches_0_9_and_reward_eval_shows_it(tmp_path):
    rm = reward_model_dir(0)  # `accelerate launch recipes/reward_model.py`'s default run, cached
    held_out = base_model_dir(0) / "data" / "pairs_eval.jsonl"
    out = tmp_path / "results.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "reward-eval"), "--model", str(rm), "--data",
                           str(held_out), "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())[str(rm)][str(held_out)]
    assert result["accuracy"] >= 0.9, result
    recorded = json.loads((rm.parent / "eval.json").read_text())["after training"]
    assert abs(result["accuracy"] - recorded["accuracy"]) < 1e-9  # reward-eval agrees with the recipe's report


def test_the_7b_preset_loads():
    spec = importlib.util.spec_from_file_location("reward_recipe", REPO / "recipes" / "reward_model.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["reward_recipe"] = recipe  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(recipe)
    preset = load_config(recipe.RewardConfig, REPO / "recipes/configs/reward_model/qwen2.5-7b.yaml")
    assert (preset.model.dtype, preset.optim.epochs, preset.data.max_length) == ("bfloat16", 1.0, 4096)
    assert preset.data.micro_batch_tokens >= 2 * preset.data.max_length
