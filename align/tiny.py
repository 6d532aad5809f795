"""The embedded default: a tiny Qwen2.5-architecture model, its tokenizer and the synthetic tasks, built locally.

    python -m align.tiny --output DIR [--seed 0] [--tokenizer tiny|qwen2.5]

writes a normal Hugging Face model directory (config.json, model.safetensors, tokenizer files with Qwen2.5's
ChatML template) plus `data/` with the synthetic tasks' JSONL splits. Everything derives from the seed: the same
seed gives byte-identical files. transformers, vLLM and `align.model.load_pretrained` load the directory.

The default tokenizer is a small byte-level BPE trained on the tasks' text, carrying Qwen2.5's 22 control tokens
and chat template: with Qwen2.5's own 151,936-row vocabulary the embedding and LM head would dominate a tiny
model's compute on 2 CPU cores. `--tokenizer qwen2.5` builds the same model on the real Qwen2.5 tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from align.model import Qwen2Config, Qwen2ForCausalLM
from align.tasks import TaskDataConfig, corpus_texts, write_task_data
from align.tokenizer import load_tokenizer, save_qwen25_tokenizer, train_bpe_tokenizer

TINY_BPE_VOCAB_SIZE = 2048
"""Upper bound on the tiny BPE's regular vocabulary. Qwen2's pre-tokenizer splits numbers into single digits, so
on the synthetic tasks training stops well below it (785 tokens with the default data)."""

TINY_MODEL_CONFIG = Qwen2Config(
    vocab_size=832,  # the default tiny tokenizer's 807 tokens, padded to a multiple of 64 as Qwen2.5 pads its own
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    # GQA 8/4 with head_dim 32. Qwen2.5 shares each KV head among 4-7 query heads; at this size 4 KV heads copy
    # numbers from the prompt markedly better than 2 (code level 1: 92% vs 72% after the same 330 s) for ~5% speed.
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    # Qwen2.5's 1e6 base suits head_dim 128 and long contexts; with head_dim 32 it leaves only ~3 of 16 rotation
    # pairs that resolve nearby positions, and the tiny model then fails to copy multi-digit numbers.
    rope_theta=10_000.0,
    tie_word_embeddings=True,
    torch_dtype="float32",
)
"""About 3.4M parameters (0.2M of them the tied embedding): SFT on the synthetic tasks takes minutes on 2 cores."""


# What the chat template adds to every example: Qwen2.5's default system prompt and the role headers.
CHAT_SCAFFOLDING = ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "system\n", "user\n",
                    "assistant\n")


def tokenizer_corpus(tasks: TaskDataConfig, seed: int) -> Iterator[str]:
    """The tasks' text, each example followed by the chat scaffolding it is trained with, so the tiny BPE learns
    whole-word tokens for the scaffolding instead of spelling ~45 tokens of system prompt letter by letter."""
    for text in corpus_texts(tasks, seed):
        yield text
        yield from CHAT_SCAFFOLDING


def build_tiny(output_dir: str | Path, seed: int = 0, tokenizer: str = "tiny",
               tasks: TaskDataConfig | None = None) -> Path:
    """Write the tiny model, tokenizer and task data (default sizes unless `tasks` is given) to `output_dir`,
    which must not hold anything else."""
    tasks = tasks or TaskDataConfig()
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir}: not empty; choose a new directory or remove it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temporary directory and rename at the end: an interrupted build leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-") as tmp:
        tmp = Path(tmp)
        write_task_data(tmp / "data", tasks, seed=seed)
        if tokenizer == "tiny":
            train_bpe_tokenizer(tokenizer_corpus(tasks, seed), TINY_BPE_VOCAB_SIZE, tmp)
        elif tokenizer == "qwen2.5":
            save_qwen25_tokenizer(tmp)
        else:
            raise ValueError(f"tokenizer={tokenizer!r}: expected 'tiny' or 'qwen2.5'")
        loaded = load_tokenizer(tmp)
        # Qwen2.5 pads its 151,665 tokens to 151,936 embedding rows; the tiny BPE pads to a multiple of 64.
        vocab_size = 151936 if tokenizer == "qwen2.5" else -(-len(loaded) // 64) * 64
        config = TINY_MODEL_CONFIG.replace(vocab_size=vocab_size)
        eos = loaded.convert_tokens_to_ids("<|im_end|>")
        pad = loaded.convert_tokens_to_ids("<|endoftext|>")
        config = config.replace(eos_token_id=eos, bos_token_id=pad)
        Qwen2ForCausalLM.from_config(config, seed=seed).save_pretrained(tmp)
        # vLLM and transformers' generate() stop at the chat turn's end, as Qwen2.5-Instruct's file says.
        generation = {"bos_token_id": pad, "eos_token_id": [eos, pad], "pad_token_id": pad, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()
        shutil.move(tmp, output_dir)
        tmp.mkdir()  # TemporaryDirectory cleans up the (now moved) path on exit
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, tokenizer corpus and tasks")
    parser.add_argument("--tokenizer", choices=["tiny", "qwen2.5"], default="tiny",
                        help="tiny: a 2,048-token BPE trained on the tasks; qwen2.5: the real Qwen2.5 tokenizer")
    args = parser.parse_args(argv)
    path = build_tiny(args.output, seed=args.seed, tokenizer=args.tokenizer)
    model_params = TINY_MODEL_CONFIG
    print(f"wrote {path}: tiny Qwen2.5-architecture model ({model_params.num_hidden_layers} layers, "
          f"hidden {model_params.hidden_size}), {args.tokenizer} tokenizer, task data in {path / 'data'}")


if __name__ == "__main__":
    main()
