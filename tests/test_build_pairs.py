"""Rejection-sampled DPO pairs: the pure pair builder on planted answers and verdicts (counts, provenance, distinct
combinations, TRL format), decontamination, bad prompt rows, and recipes/build_pairs.py end to end with real vLLM
on a tiny model trained in the test to answer some prompts always right, some always wrong, one either way."""

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.data import DataError, collate, parse_pair, tokenize_chat
from align.losses import sft_loss
from align.model import copy_tokenizer_files, load_pretrained, save_pretrained
from align.rejection import (
    Sample,
    build_pairs,
    check_prompt_row,
    content_tokens,
    eval_reference_rows,
    format_counts_table,
    read_prompt_rows,
    select_pairs,
)
from align.tasks import TaskDataConfig, generate_problems
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "build_pairs.py"
SMALL = TaskDataConfig(arithmetic_sft=20, code_sft=10, arithmetic_prompts=4, code_prompts=2, eval_per_level=2)


def load_recipe():
    if "build_pairs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_pairs", RECIPE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_pairs"] = module
        spec.loader.exec_module(module)
    return sys.modules["build_pairs"]


def prompt_row(rid: str, question: str, answer: str, difficulty: int = 1) -> dict:
    return {"id": rid, "family": "arithmetic", "difficulty": difficulty,
            "prompt": [{"role": "user", "content": question}], "answer": answer, "tests": [], "entry_point": ""}


def samples(*verdicts: tuple[str, bool]) -> list[Sample]:
    return [Sample(text, passed, "right" if passed else "wrong", "stop") for text, passed in verdicts]


ROWS = [prompt_row("mixed", "What is 3 + 4?", "7"), prompt_row("easy", "What is 1 + 1?", "2"),
        prompt_row("hard", "What is 2 + 3?", "5", difficulty=2)]
PLANTED = [
    # 8 samples: texts A, A, B pass (2 distinct), X, Y, X, Z, Z fail (3 distinct)
    samples(("A", True), ("A", True), ("B", True), ("X", False), ("Y", False), ("X", False), ("Z", False),
            ("Z", False)),
    samples(*[("two", True)] * 8),  # all pass: no pair
    samples(*[(f"wrong {i}", False) for i in range(8)]),  # all fail: no pair
]


def test_one_pair_per_prompt_with_provenance_and_counts():
    pairs, counts = build_pairs(ROWS, PLANTED, per_prompt=1, seed=0)
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair["id"], pair["family"], pair["difficulty"], pair["answer"]) == ("mixed", "arithmetic", 1, "7")
    chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
    assert chosen in {"A", "B"} and rejected in {"X", "Y", "Z"}
    prov = pair["provenance"]
    assert (prov["samples"], prov["passed"]) == (8, 3)
    # The sample index points at that text, and its verdict and reason travel with it.
    assert PLANTED[0][prov["chosen"]["sample"]].text == chosen and prov["chosen"]["passed"] is True
    assert PLANTED[0][prov["rejected"]["sample"]].text == rejected and prov["rejected"]["reason"] == "wrong"
    # TRL's conversational format, which the DPO recipe reads.
    parsed = parse_pair(pair, "pairs.jsonl", 0)
    assert parsed.prompt == ROWS[0]["prompt"] and parsed.chosen == [{"role": "assistant", "content": chosen}]

    by_level = counts.to_dict()["by_level"]
    assert by_level["arithmetic/1"] == {"prompts": 2, "all_pass": 1, "all_fail": 0, "pairs": 1, "samples": 16,
                                        "passed": 11}
    assert by_level["arithmetic/2"] == {"prompts": 1, "all_pass": 0, "all_fail": 1, "pairs": 0, "samples": 8,
                                        "passed": 0}
    table = format_counts_table(counts, {("arithmetic", 1): 1})
    assert "| arithmetic | 1 | 2 | 69% | 1 | 0 | 1 | 1 | 0 |" in table  # 11/16 passed; the one pair dropped
    assert "| all |  | 3 | 46% | 1 | 1 | 1 | 1 | 0 |" in table


def test_several_pairs_are_distinct_combinations_of_distinct_texts():
    """2 distinct passing texts x 3 distinct failing texts = 6 combinations at most, however many are asked for;
    the first two share no answer (each answer reused as little as possible)."""
    pairs, counts = build_pairs(ROWS[:1], PLANTED[:1], per_prompt=10, seed=3)
    combos = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert len(combos) == 6 == len(set(combos)) and counts.total().pairs == 6
    assert combos[0][0] != combos[1][0] and combos[0][1] != combos[1][1]
    four = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in build_pairs(ROWS[:1], PLANTED[:1], 4,
                                                                                           seed=3)[0]]
    assert four == combos[:4]  # the same seed picks the same combinations in the same order


def test_select_pairs_reuses_answers_evenly():
    for seed in range(5):
        picked = select_pairs([0, 1, 2], [3, 4, 5, 6], limit=7, rng=random.Random(seed))
        assert len(set(picked)) == 7
        first = picked[:3]  # min(3, 4) combinations share no answer
        assert len({c for c, _ in first}) == 3 and len({r for _, r in first}) == 3
        uses = [sum(c == i for c, _ in picked) for i in range(3)]
        assert max(uses) - min(uses) <= 1


def test_bad_prompt_rows_name_file_row_and_field(tmp_path):
    cases = {
        "family": ({**ROWS[0], "family": "poetry"}, "field 'family': 'poetry' has no verifier"),
        "prompt": ({**ROWS[0], "prompt": "What is 3 + 4?"}, "field 'prompt': expected a non-empty list"),
        "role": ({**ROWS[0], "prompt": [{"role": "robot", "content": "x"}]}, "field 'prompt[0].role'"),
        "last turn": ({**ROWS[0], "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                      "field 'prompt': must end with a user turn"),
        "answer": ({k: v for k, v in ROWS[0].items() if k != "answer"}, "field 'answer': missing"),
        "tests": ({**ROWS[0], "family": "code", "tests": []}, "field 'tests': expected a non-empty list"),
        "difficulty": ({**ROWS[0], "difficulty": "1"}, "field 'difficulty': expected int"),
    }
    for row, expected in cases.values():
        with pytest.raises(DataError, match=re.escape(f"p.jsonl: row 4: {expected}")):
            check_prompt_row(row, "p.jsonl", 4)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[0], "id": 3}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: field 'id': expected str")):
        read_prompt_rows(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("bp") / "tiny", seed=0, tasks=SMALL)


def test_decontamination_rules(tiny_dir):
    """A pair whose prompt is a held-out problem is dropped by rule "exact"; rule "lcs" (the report's) also drops
    pairs of other problems of the same template, which is why it is not the default on the synthetic tasks."""
    recipe = load_recipe()
    tokenizer = load_tokenizer(tiny_dir)
    held_out = [json.loads(line) for line in (tiny_dir / "data" / "eval.jsonl").read_text().splitlines()]
    references = eval_reference_rows(held_out, seed=0)
    first = generate_problems("arithmetic", 1, 1, seed=0)[0]  # the first held-out arithmetic level-1 problem
    assert references[0]["messages"] == [{"role": "user", "content": first.prompt},
                                         {"role": "assistant", "content": first.solution}]
    assert content_tokens(references[0]["messages"][:1], tokenizer) == tokenizer(first.prompt)["input_ids"]

    leaked = {"id": "leak", "family": "arithmetic", "difficulty": 1, "prompt": held_out[0]["prompt"],
              "chosen": [{"role": "assistant", "content": first.solution}], "rejected": [{"role": "assistant",
                                                                                       "content": "no"}]}
    fresh_problem = generate_problems("arithmetic", 1, 200, seed=0)[-1]  # deep in the stream: a training problem
    fresh = {**leaked, "id": "fresh", "prompt": [{"role": "user", "content": fresh_problem.prompt}],
             "chosen": [{"role": "assistant", "content": fresh_problem.solution}]}
    unrelated = {**leaked, "id": "unrelated", "prompt": [{"role": "user", "content": "Say hi."}],
                 "chosen": [{"role": "assistant", "content": "hi"}]}
    pairs = [leaked, fresh, unrelated]
    Args = recipe.DecontaminationArgs
    kept, report = recipe.decontaminate_pairs(pairs, references, tokenizer, Args(rule="exact"))
    assert [p["id"] for p in kept] == ["fresh", "unrelated"] and report["dropped"] == [0]
    assert report["exact_matches"] == [{"pair": 0, "id": "leak", "eval_id": held_out[0]["id"]}]
    assert report["lcs_flagged_pairs"] == 2  # reported, not applied: the leak and the same-template problem
    match = report["lcs_matches"][1]
    assert match["pair"] == 1 and match["lcs"] >= match["required"] >= 13 and match["ratio"] >= 0.6
    kept, report = recipe.decontaminate_pairs(pairs, references, tokenizer, Args(rule="lcs"))
    assert [p["id"] for p in kept] == ["unrelated"] and report["dropped"] == [0, 1]
    kept, report = recipe.decontaminate_pairs(pairs, references, tokenizer, Args(rule="none"))
    assert kept == pairs and report["dropped"] == []


def train_answers(tiny_dir: Path, out: Path, chats: list[tuple[str, str]], steps: int = 120) -> Path:
    """Fine-tune the tiny model on (question, answer) chats until it repeats them, and save it."""
    torch.manual_seed(0)
    model = load_pretrained(tiny_dir)
    tokenizer = load_tokenizer(tiny_dir)
    examples = [tokenize_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer)
                for q, a in chats]
    batch = collate(examples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        scored = model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
        loss, _ = sft_loss(scored.logprobs, batch.loss_mask, batch.num_target_tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_pretrained(model, out)
    copy_tokenizer_files(tiny_dir, out)
    return out


@pytest.mark.slow
def test_build_pairs_end_to_end_with_vllm(tiny_dir, tmp_path):
    """A model trained to answer "1 + 1" right, "2 + 3" wrong and "Pick 7 or 8." with 7 or 8 half the time: vLLM
    samples 12 answers each (at temperature 0.5, which leaves the 50/50 choice alone and makes the others certain),
    the verifier checks them, and only the pick gives pairs."""
    chats = [("Pick 7 or 8.", "\\boxed{7}"), ("Pick 7 or 8.", "\\boxed{8}"), ("What is 1 + 1?", "\\boxed{2}"),
             ("What is 2 + 3?", "\\boxed{6}")]
    model_dir = train_answers(tiny_dir, tmp_path / "model", chats)
    prompts = tmp_path / "prompts.jsonl"
    rows = [prompt_row("mixed", "Pick 7 or 8.", "7"), *ROWS[1:]]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "pairs"
    command = [sys.executable, str(RECIPE), "--model-path", str(model_dir), "--prompts-path", str(prompts),
               "--decontamination-eval-path", str(tiny_dir / "data" / "eval.jsonl"), "--sampling-k", "12",
               "--sampling-temperature", "0.5", "--sampling-max-new-tokens", "16", "--pairs-per-prompt", "2",
               "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| arithmetic | 1 | 2 |" in result.stdout

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    levels = stats["counts"]["by_level"]
    assert levels["arithmetic/1"]["all_pass"] == 1 and levels["arithmetic/2"]["all_fail"] == 1
    # --pairs-per-prompt 2, but two distinct answers make one combination
    assert [p["id"] for p in pairs] == ["mixed"] and stats["pairs"] == 1
    for pair in pairs:
        assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("\\boxed{7}", "\\boxed{8}")
        assert pair["provenance"]["chosen"]["passed"] and not pair["provenance"]["rejected"]["passed"]
        assert pair["provenance"]["samples"] == 12 and 0 < pair["provenance"]["passed"] < 12
        parse_pair(pair, "pairs.jsonl", 0)
    decon = json.loads((out / "decontamination.json").read_text())
    assert decon["rule"] == "exact" and decon["dropped"] == [] and decon["eval_sequences"] == 16
    assert (out / "config.yaml").is_file() and not list(tmp_path.glob(".pairs.tmp-*"))

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "not empty" in again.stderr and "Traceback" not in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[0], "prompt": []}) + "\n")
    result = subprocess.run([*command[:5], str(bad), *command[6:-1], str(tmp_path / "other")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{bad}: row 1: field 'prompt'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "other").exists()
