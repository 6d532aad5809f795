"""The main job (for now): build the embedded default and show the decoder working on it.

    python -m align.demo [--output-dir outputs/demo] [--seed 0] [--no-vllm]

1. builds the tiny Qwen2.5-architecture model, its tokenizer and the synthetic tasks (`align.tiny`);
2. loads it with `align.model`, renders a task in Qwen2.5's chat format and scores its reference answer;
3. checks that packed (padding-free) sequences give the same logits as each sequence alone;
4. loads the same directory in transformers and compares logits;
5. samples answers with vLLM from the directory and checks vLLM's log-probs against ours.

The model is untrained here, so its answers are noise: later stages (SFT, DPO, GRPO) train it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.model import PackedLayout, load_pretrained
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer
from rollout.offline import SamplingSpec, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where the embedded default is built")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model and tasks")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM step")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model_dir = Path(args.output_dir) / f"tiny-seed{args.seed}"
    start = time.perf_counter()
    if (model_dir / "config.json").is_file():
        print(f"[1/5] using the embedded default already built in {model_dir}")
    else:
        build_tiny(model_dir, seed=args.seed)
        print(f"[1/5] built the embedded default in {model_dir} ({time.perf_counter() - start:.1f}s)")
    splits = {name: (model_dir / "data" / f"{name}.jsonl").read_text().splitlines() for name in
              ("sft", "prompts", "eval")}
    print("      task data: " + ", ".join(f"{name} {len(rows)} rows" for name, rows in splits.items()))

    model = load_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    config = model.config
    print(f"[2/5] align.model: {model.num_parameters() / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
          f"GQA {config.num_attention_heads}/{config.num_key_value_heads}, vocab {config.vocab_size}")
    row = json.loads(splits["sft"][0])
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        scored = model(ids[:, :-1], target_ids=ids[:, 1:])
    print(f"      a {row['family']} task (difficulty {row['difficulty']}) in Qwen2.5's chat format, "
          f"{ids.shape[1]} tokens:\n" + "\n".join("        " + line for line in text.splitlines()))
    print(f"      untrained mean log-prob per token {scored.logprobs.mean():.3f} "
          f"(uniform would be {-torch.log(torch.tensor(float(config.vocab_size))):.3f})")

    rows = [json.loads(line) for line in splits["sft"][:6]]
    seqs = [torch.tensor(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
            for r in rows]
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], layout=PackedLayout.from_lengths([len(s) for s in seqs]))[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
    print(f"[3/5] packed {len(seqs)} sequences ({sum(map(len, seqs))} tokens) in one row: "
          f"max |packed - alone| = {(packed - alone).abs().max():.2e}")

    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        gap = (hf_model(ids).logits - model(ids)).abs().max()
    print(f"[4/5] transformers {transformers.__version__} loads the directory: max |logits difference| = {gap:.2e}")

    if args.no_vllm:
        print("[5/5] vLLM step skipped (--no-vllm)")
        return
    prompts = [
        tokenizer.apply_chat_template(json.loads(line)["prompt"], tokenize=False, add_generation_prompt=True)
        for line in splits["eval"][:2]
    ]
    completions = generate(model_dir, prompts, SamplingSpec(n=2, temperature=1.0, max_tokens=24))
    worst = 0.0
    for prompt, per_prompt in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for completion in per_prompt:
            full = prompt_ids + completion.token_ids
            with torch.no_grad():
                ours = model(torch.tensor([full[:-1]]), target_ids=torch.tensor([full[1:]])).logprobs[0]
            gap = (ours[len(prompt_ids) - 1:] - torch.tensor(completion.logprobs)).abs().max()
            worst = max(worst, float(gap))
    print(f"[5/5] vLLM sampled {sum(map(len, completions))} answers; max |vLLM log-prob - ours| = {worst:.2e}")
    for completion in completions[0]:
        print(f"      untrained sample: {completion.text!r}")
    print(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
