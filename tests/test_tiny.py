"""The embedded default: deterministic, and a normal HF directory that transformers, vLLM and align.model load."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from align.model import load_pretrained
from align.tasks import TaskDataConfig
from align.tiny import TINY_MODEL_CONFIG, build_tiny

REPO = Path(__file__).resolve().parent.parent


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_cli_twice_with_one_seed_gives_identical_files(tmp_path, tiny_dir):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "align.tiny", "--output", str(tmp_path / name)], check=True, cwd=REPO)
    first, second = file_digests(tmp_path / "a"), file_digests(tmp_path / "b")
    assert first == second == file_digests(tiny_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "data/sft.jsonl", "data/prompts.jsonl", "data/eval.jsonl"} <= set(first)


def test_another_seed_gives_other_weights(tmp_path, tiny_dir):
    other = build_tiny(tmp_path / "other", seed=1)
    assert file_digests(other)["model.safetensors"] != file_digests(tiny_dir)["model.safetensors"]


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_loads_in_transformers_and_here_with_equal_logits(tiny_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) <= TINY_MODEL_CONFIG.vocab_size < len(tokenizer) + 64  # padded to a multiple of 64
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    ours = load_pretrained(tiny_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5
    assert ours.config.eos_token_id == tokenizer.eos_token_id
    assert ours.config.replace(eos_token_id=None, bos_token_id=None) == TINY_MODEL_CONFIG


def test_task_data_is_chat_formatted_and_fits_the_model(tiny_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    rows = [json.loads(line) for line in (tiny_dir / "data" / "sft.jsonl").read_text().splitlines()[:200]]
    lengths = [len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"]) for r in rows]
    assert max(lengths) < TINY_MODEL_CONFIG.max_position_embeddings
    # The BPE trained on the tasks compresses them (numbers stay one token per digit, by Qwen2's pre-tokenizer).
    contents = [m["content"] for r in rows for m in r["messages"]]
    content_tokens = sum(len(tokenizer(text)["input_ids"]) for text in contents)
    assert content_tokens < 0.6 * sum(len(text) for text in contents)


def test_real_qwen25_tokenizer_option(tmp_path):
    model_dir = build_tiny(tmp_path / "real", tokenizer="qwen2.5", tasks=TaskDataConfig(
        arithmetic_sft=10, code_sft=10, arithmetic_prompts=5, code_prompts=5, eval_per_level=2))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 151665 and tokenizer("Hello world")["input_ids"] == [9707, 1879]
    model = load_pretrained(model_dir)
    assert model.config.vocab_size == 151936
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert model(ids).shape == (1, ids.shape[1], 151936)


@pytest.mark.slow
def test_vllm_serves_the_tiny_model_with_our_logprobs(tiny_dir, tmp_path):
    """The real vLLM loads the directory (tokenizer included) and its sampled-token log-probs equal ours."""
    out = tmp_path / "vllm.json"
    subprocess.run([sys.executable, str(REPO / "tests/scripts/vllm_logprobs.py"), str(tiny_dir), str(out),
                    "--tokenizer"], check=True, cwd=tmp_path, timeout=600)
    samples = json.loads(out.read_text())
    assert len(samples) == 4
    model = load_pretrained(tiny_dir)
    for sample in samples:
        ids = sample["prompt_ids"] + sample["completion_ids"]
        with torch.no_grad():
            scored = model(torch.tensor([ids[:-1]]), target_ids=torch.tensor([ids[1:]])).logprobs[0]
        ours = scored[len(sample["prompt_ids"]) - 1:]
        assert torch.allclose(ours, torch.tensor(sample["logprobs"]), atol=1e-4)
        assert isinstance(sample["text"], str) and sample["text"]
