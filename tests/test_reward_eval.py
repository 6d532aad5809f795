"""reward-eval: models and verifiers side by side on several datasets, ties counted, RewardBench sections,
JSON and Markdown/PNG outputs, bad rows named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.data import load_rows, tokenize_pairs
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer
from reward.eval_cli import main, section_scores
from reward.evaluate import pair_accuracy
from reward.model import load_reward_model, save_reward_model

SMALL = TaskDataConfig(arithmetic_sft=20, code_sft=20, arithmetic_prompts=2, code_prompts=2, eval_per_level=6)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-eval")
    tiny = build_tiny(root / "tiny", tasks=SMALL)
    model = load_reward_model(tiny, seed=3)
    save_reward_model(model.config, model.state_dict(), root / "rm", pad_token_id=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, root / "rm" / name)
    return root / "rm", tiny / "data" / "pairs_eval.jsonl"


def test_models_and_verifier_side_by_side(rm_dir, tmp_path):
    rm, pairs_file = rm_dir
    bench = tmp_path / "bench.jsonl"  # RewardBench columns and subset names
    bench.write_text("".join(json.dumps({"prompt": "What is 2 + 3?", "chosen": c, "rejected": r, "subset": s}) + "\n"
                             for c, r, s in [("5", "6", "math-prm"), ("five", "six", "alpacaeval-easy"),
                                             ("5!", "6!", "alpacaeval-easy")]))
    out = tmp_path / "results.json"
    code = main(["--model", str(rm), "--model", str(rm), "--data", str(pairs_file), "--data", str(bench),
                 "--output", str(out), "--report-dir", str(tmp_path / "report")])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) == {str(rm)} and set(results[str(rm)]) == {str(pairs_file), str(bench)}
    ours = results[str(rm)][str(pairs_file)]
    # The same scores computed by hand from the model.
    model, tokenizer = load_reward_model(rm).eval(), load_tokenizer(rm)
    pairs, _ = tokenize_pairs(load_rows(pairs_file), tokenizer, 4096, "x")
    with torch.no_grad():
        chosen = torch.stack([model(torch.tensor([p.chosen_ids]))[0] for p in pairs])
        rejected = torch.stack([model(torch.tensor([p.rejected_ids]))[0] for p in pairs])
    expected = pair_accuracy(chosen, rejected, [p.subset for p in pairs])
    assert ours["correct"] == expected.correct and ours["pairs"] == len(pairs)
    assert abs(ours["mean_margin"] - expected.mean_margin) < 1e-4
    assert results[str(rm)][str(bench)]["rewardbench"]["Score"] is not None
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 0
    assert "does not predict" in (tmp_path / "report" / "report.md").read_text()


def test_task_verifier_gets_correctness_pairs_right_and_ties_style(rm_dir, tmp_path):
    _, pairs_file = rm_dir
    out = tmp_path / "v.json"
    assert main(["--verifier", "task", "--data", str(pairs_file), "--output", str(out)]) == 0
    result = json.loads(out.read_text())["verifier:task"][str(pairs_file)]
    subsets = result["by_subset"]
    assert subsets["arithmetic-correct"]["accuracy"] == 1.0 and subsets["code-correct"]["accuracy"] == 1.0
    assert subsets["style-concise"]["correct"] == 0  # both answers right: every style pair is a tie
    assert result["ties"] == subsets["style-concise"]["pairs"]


def test_rewardbench_sections_weight_subsets_by_count():
    chosen = torch.tensor([1.0, 1.0, 0.0, 1.0])
    rejected = torch.zeros(4)
    result = pair_accuracy(chosen, rejected, ["alpacaeval-easy", "alpacaeval-easy", "mt-bench-easy", "hep-go"])
    sections = section_scores(result)
    assert sections["Chat"] == pytest.approx(2 / 3) and sections["Reasoning"] == 1.0
    assert sections["Score"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert section_scores(pair_accuracy(chosen, rejected, ["a", "b", "c", "d"])) is None


def test_console_script_and_bad_rows(rm_dir, tmp_path):
    rm, _ = rm_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "rejected": 3}) + "\n")
    script = Path(sys.executable).with_name("reward-eval")  # installed beside the venv's python; PATH may lack it
    result = subprocess.run([str(script), "--model", str(rm), "--data", str(bad)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert f"{bad}: row 1: field 'rejected': expected a list of messages, got int" in result.stderr
