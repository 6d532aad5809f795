"""Decoder training throughput: ours (packed, padding-free) against transformers' Qwen2ForCausalLM (SDPA, a padded
batch of the same mixed-length sequences), and the chunked log-prob against full logits at Qwen2.5's vocabulary.

Each case runs in its own subprocess so its peak resident memory (ru_maxrss) is its own. Both systems get the
same weights, the same sequences and the same loss (mean next-token negative log-likelihood over real tokens);
tokens/s counts real tokens only, so padding is the padded system's cost.

    python benchmarks/decoder.py [--quick] [--output benchmarks/results/decoder.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from harness import add_worker_option, in_subprocess, machine_description, print_result, write_report

from align.model import PackedLayout, Qwen2Config, Qwen2ForCausalLM, token_logprobs
from align.tiny import TINY_MODEL_CONFIG

# A ~50M-parameter Qwen2.5-shaped decoder: GQA 8/2, head_dim 64, SwiGLU ~5.5x, tied embeddings.
QWEN_50M_CONFIG = Qwen2Config(
    vocab_size=16384, hidden_size=512, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096,
)
MODELS = {"tiny": TINY_MODEL_CONFIG, "qwen-50m": QWEN_50M_CONFIG}

# (model, dtype, tokens per step, timed steps). On a CPU without native bf16 (AVX2 only, as the project's
# current machines) torch's bf16 matmul runs a reference path 10-250x slower than float32 for both systems, so
# the bf16 case is the tiny model at 1k tokens only: a ~50M model would take many minutes per step.
TRAINING_CASES = [
    ("tiny", "float32", 8192, 3),
    ("qwen-50m", "float32", 4096, 2),
    ("tiny", "bfloat16", 1024, 1),
]


def mixed_lengths(total_tokens: int, low: int, high: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total_tokens:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    return lengths


def sequences_for(lengths: list[int], vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


def ours_step(model: Qwen2ForCausalLM, seqs: list[torch.Tensor]):
    """Packed: one row, targets are each sequence shifted left; the last token of each sequence has no target."""
    input_ids = torch.cat(seqs)[None]  # [1, T]
    targets = torch.cat([torch.cat([s[1:], s[:1]]) for s in seqs])[None]  # [1, T]
    mask = torch.cat([torch.arange(len(s)) < len(s) - 1 for s in seqs])[None]  # [1, T]
    layout = PackedLayout.from_lengths([len(s) for s in seqs])

    def step():
        scored = model(input_ids, layout=layout, target_ids=targets)
        loss = -(scored.logprobs * mask).sum() / mask.sum()
        loss.backward()
        return loss

    return step


def hf_step(model, seqs: list[torch.Tensor]):
    """Padded batch [B, max_len] with an attention mask and -100 labels on padding, as HF trainers feed it."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.stack([F.pad(s, (0, longest - len(s))) for s in seqs])  # [B, L]
    attention_mask = torch.stack([torch.arange(longest) < len(s) for s in seqs]).long()  # [B, L]
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def step():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return loss

    return step


def run_training_case(system: str, model_name: str, dtype: str, tokens: int, steps: int) -> dict:
    import transformers

    config = MODELS[model_name].replace(torch_dtype=dtype)
    torch.manual_seed(0)
    ours = Qwen2ForCausalLM.from_config(config, seed=0)
    low, high = 16, 512 if model_name == "tiny" else 1024
    seqs = sequences_for(mixed_lengths(tokens, low, high, seed=0), config.vocab_size)
    if system == "ours":
        model, step = ours, ours_step(ours, seqs)
    else:
        hf_config = transformers.Qwen2Config(**config.to_hf_dict())
        hf_config._attn_implementation = "sdpa"
        model = transformers.Qwen2ForCausalLM(hf_config).to(config.dtype)
        model.load_state_dict(ours.state_dict())
        del ours
        step = hf_step(model, seqs)
    model.train()
    step()  # warm-up
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
        model.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    real_tokens = sum(len(s) for s in seqs)
    return {
        "tokens_per_s": real_tokens / seconds, "step_s": seconds, "real_tokens": real_tokens,
        "padded_tokens": len(seqs) * max(len(s) for s in seqs), "loss": float(loss),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_logprob_case(system: str, tokens: int, steps: int) -> dict:
    """Log-probs of target tokens and their gradient at vocab 151,936, hidden 896 (Qwen2.5-0.5B's head)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 896, generator=generator, requires_grad=True)
    weight = (torch.randn(151936, 896, generator=generator) * 0.02).requires_grad_()
    targets = torch.randint(0, 151936, (tokens,), generator=generator)

    def step():
        if system == "chunked":
            logprobs, _ = token_logprobs(hidden, weight, targets, chunk_size=1024)
        else:
            logprobs = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        logprobs.sum().backward()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"tokens_per_s": tokens / seconds, "step_s": seconds}


def worker(spec: dict) -> None:
    torch.set_num_threads(spec.pop("threads"))
    kind = spec.pop("kind")
    result = run_training_case(**spec) if kind == "train" else run_logprob_case(**spec)
    print_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="benchmarks/results/decoder.json")
    parser.add_argument("--only", choices=[*MODELS, "logprobs"], help="run only this model's training cases, or "
                        "only the log-prob case")
    parser.add_argument("--repeats", type=int, default=1, help="run each case this many times, alternating "
                        "systems, and keep each system's best (less sensitive to other load on the machine)")
    add_worker_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    rows = []
    for model_name, dtype, tokens, steps in TRAINING_CASES:
        if args.only and model_name != args.only:
            continue
        if args.quick:
            tokens, steps = tokens // 4, 1
        results = {}
        for _ in range(args.repeats):
            for system in ("ours", "transformers"):
                spec = dict(kind="train", system=system, model_name=model_name, dtype=dtype, tokens=tokens,
                            steps=steps, threads=args.threads)
                result = in_subprocess(__file__, spec, args.threads)
                if system not in results or result["tokens_per_s"] > results[system]["tokens_per_s"]:
                    results[system] = result
        ours, theirs = results["ours"], results["transformers"]
        rows.append({
            "case": f"{model_name} {dtype} fwd+bwd", "ours_tok_s": ours["tokens_per_s"],
            "peer_tok_s": theirs["tokens_per_s"], "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "ours_peak_mb": ours["peak_rss_mb"], "peer_peak_mb": theirs["peak_rss_mb"],
            "padding_fraction": 1 - ours["real_tokens"] / theirs["padded_tokens"],
            "params": ours["params"], "details": results,
        })
        print_row(rows[-1])
    if args.only and args.only != "logprobs":
        return print("\n" + markdown_table(rows))
    # 4096 tokens: full float32 logits and their gradient take ~10 GB here, the 1024-token chunks a few.
    tokens, steps = (512, 1) if args.quick else (4096, 1)
    results = {
        system: in_subprocess(__file__, dict(kind="logprob", system=system, tokens=tokens, steps=steps,
                                             threads=args.threads), args.threads)
        for system in ("chunked", "full")
    }
    rows.append({
        "case": f"log-probs V=151936 {tokens} tok", "ours_tok_s": results["chunked"]["tokens_per_s"],
        "peer_tok_s": results["full"]["tokens_per_s"],
        "speedup": results["chunked"]["tokens_per_s"] / results["full"]["tokens_per_s"],
        "ours_peak_mb": results["chunked"]["peak_rss_mb"], "peer_peak_mb": results["full"]["peak_rss_mb"],
        "details": results,
    })
    print_row(rows[-1])

    print("\n" + markdown_table(rows))
    report = {
        "benchmark": "decoder", "date": time.strftime("%Y-%m-%d"), "machine": machine_description(args.threads),
        "peer": "transformers Qwen2ForCausalLM (sdpa, padded batch); full-logits log_softmax for log-probs",
        "rows": rows,
    }
    write_report(args.output, report)


def print_row(row: dict) -> None:
    print(f"{row['case']}: ours {row['ours_tok_s']:.0f} tok/s, peer {row['peer_tok_s']:.0f} tok/s, "
          f"x{row['speedup']:.2f}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | ours tok/s | peer tok/s | ours / peer | ours peak MB | peer peak MB | padding |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        padding = f"{r['padding_fraction']:.0%}" if "padding_fraction" in r else "-"
        lines.append(
            f"| {r['case']} | {r['ours_tok_s']:.0f} | {r['peer_tok_s']:.0f} | {r['speedup']:.2f}x "
            f"| {r['ours_peak_mb']:.0f} | {r['peer_peak_mb']:.0f} | {padding} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
