"""Reward-model scoring throughput: `reward-eval`'s scoring path (reward.evaluate.score_sequences: our decoder,
sequences packed padding-free up to --batch-tokens per forward pass) against transformers'
`Qwen2ForSequenceClassification` (AutoModelForSequenceClassification.from_pretrained on the same saved reward-model
directory, default SDPA attention) in plain right-padded batches of --batch-size sequences with an attention mask,
under torch.no_grad.

Both systems score the same synthetic preference pairs (align.tasks' pairs_eval.jsonl, written by build_tiny),
tokenized once by reward-eval's tokenize_pairs (not timed): chosen and rejected of each pair, in file order, as
reward-eval scores them. pairs/s counts pairs (two sequences each); the timed region covers building the input
tensors and the forward passes. The run also checks that the two systems' scores agree (max abs difference).

Models: the tiny default (align.tiny) and a ~50M-parameter Qwen2.5-shaped decoder (benchmarks/decoder.py's
QWEN_50M_CONFIG), both with random weights and a random score head on the tiny tokenizer: throughput does not
depend on what the weights learned. Each run is its own subprocess (its peak resident memory is its own).

    python benchmarks/reward_scoring.py [--quick] [--repeats 3] [--output benchmarks/results/reward.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from decoder import QWEN_50M_CONFIG  # one definition of the benchmark model shape
from harness import add_worker_option, in_subprocess, machine_description, print_result, write_report

from align.data import load_rows, tokenize_pairs
from align.model import Qwen2ForCausalLM
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer
from reward.evaluate import score_sequences
from reward.model import load_reward_model, save_reward_model

# (model, pairs scored, timed passes over them)
CASES = [("tiny", 200, 1), ("qwen-50m", 48, 1)]


def build_reward_models(work_dir: Path) -> tuple[dict[str, Path], Path]:
    """Reward-model directories (weights, score head, tokenizer) for every model, and the pairs file."""
    tiny = build_tiny(work_dir / "tiny")
    tokenizer = load_tokenizer(tiny)
    pad_id = tokenizer.pad_token_id
    base = Qwen2ForCausalLM.from_config(QWEN_50M_CONFIG.replace(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=pad_id), seed=0)
    base.save_pretrained(work_dir / "qwen-50m-lm")
    dirs = {}
    for name, lm_dir in (("tiny", tiny), ("qwen-50m", work_dir / "qwen-50m-lm")):
        model = load_reward_model(lm_dir, seed=3)
        dirs[name] = work_dir / f"{name}-rm"
        save_reward_model(model.config, model.state_dict(), dirs[name], pad_token_id=pad_id)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / file, dirs[name] / file)
    return dirs, tiny / "data" / "pairs_eval.jsonl"


def padded_scores(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> torch.Tensor:
    """transformers' scores [N], batch_size sequences at a time, right-padded to each batch's longest."""
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        longest = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), longest), pad_id)  # [B, L]
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # [B, L]
        for row, sequence in enumerate(batch):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        scores.append(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float())
    return torch.cat(scores)


def run_case(system: str, rm_dir: str, pairs_file: str, pairs: int, passes: int, batch_tokens: int,
             batch_size: int) -> dict:
    tokenizer = load_tokenizer(rm_dir)
    tokenized, _ = tokenize_pairs(load_rows(pairs_file).select(range(pairs)), tokenizer, 4096, pairs_file)
    sequences = [s for p in tokenized for s in (p.chosen_ids, p.rejected_ids)]
    if system == "ours":
        model = load_reward_model(rm_dir).eval()

        def score(seqs):
            return score_sequences(model, seqs, batch_tokens)
    else:
        import transformers

        model = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()

        @torch.no_grad()
        def score(seqs):
            return padded_scores(model, seqs, batch_size, model.config.pad_token_id)

    score(sequences[:2 * batch_size])  # warm-up
    start = time.perf_counter()
    for _ in range(passes):
        scores = score(sequences)
    seconds = (time.perf_counter() - start) / passes
    batches = [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]
    padded = sum(len(b) * max(len(s) for s in b) for b in batches)  # what the padded batches hold
    return {"pairs_per_s": len(tokenized) / seconds, "pass_s": seconds, "pairs": len(tokenized),
            "real_tokens": sum(len(s) for s in sequences), "padded_tokens": padded,
            "params": sum(p.numel() for p in model.parameters()), "scores": scores.tolist()}


def worker(spec: dict) -> None:
    torch.set_num_threads(spec.pop("threads"))
    result = run_case(**spec)
    print_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs, one pass (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-tokens", type=int, default=8192, help="ours: tokens per packed forward pass "
                        "(reward-eval's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers: sequences per padded batch")
    parser.add_argument("--output", default="benchmarks/results/reward.json")
    parser.add_argument("--work-dir", help="where to build the models (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=1, help="run each case this many times, alternating "
                        "systems, and keep each system's best (less sensitive to other load on the machine)")
    add_worker_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        dirs, pairs_file = build_reward_models(Path(args.work_dir or tmp))
        rows = []
        for model_name, pairs, passes in CASES:
            if args.quick:
                pairs, passes = max(pairs // 8, 8), 1
            results = {}
            for _ in range(args.repeats):
                for system in ("ours", "transformers"):
                    spec = dict(system=system, rm_dir=str(dirs[model_name]), pairs_file=str(pairs_file),
                                pairs=pairs, passes=passes, batch_tokens=args.batch_tokens,
                                batch_size=args.batch_size, threads=args.threads)
                    result = in_subprocess(__file__, spec, args.threads)
                    if system not in results or result["pairs_per_s"] > results[system]["pairs_per_s"]:
                        results[system] = result
            ours, theirs = results["ours"], results["transformers"]
            max_diff = float((torch.tensor(ours.pop("scores")) - torch.tensor(theirs.pop("scores"))).abs().max())
            rows.append({
                "case": f"{model_name} float32 scoring", "pairs": ours["pairs"], "ours_pairs_s": ours["pairs_per_s"],
                "peer_pairs_s": theirs["pairs_per_s"], "speedup": ours["pairs_per_s"] / theirs["pairs_per_s"],
                "ours_peak_mb": ours["peak_rss_mb"], "peer_peak_mb": theirs["peak_rss_mb"],
                "padding_fraction": 1 - theirs["real_tokens"] / theirs["padded_tokens"],
                "max_abs_score_diff": max_diff, "params": ours["params"], "details": results,
            })
            print_row(rows[-1])

    print("\n" + markdown_table(rows))
    report = {
        "benchmark": "reward", "date": time.strftime("%Y-%m-%d"), "machine": machine_description(args.threads),
        "ours": f"reward.evaluate.score_sequences (packed, padding-free, {args.batch_tokens} tokens per pass)",
        "peer": f"transformers Qwen2ForSequenceClassification (sdpa, right-padded batches of {args.batch_size})",
        "rows": rows,
    }
    write_report(args.output, report)


def print_row(row: dict) -> None:
    print(f"{row['case']}: ours {row['ours_pairs_s']:.1f} pairs/s, peer {row['peer_pairs_s']:.1f} pairs/s, "
          f"x{row['speedup']:.2f}, max |score diff| {row['max_abs_score_diff']:.1e}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | params | pairs | ours pairs/s | transformers pairs/s | ours / transformers | ours peak MB "
        "| peer peak MB | peer padding | max abs score diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:.1f}M | {r['pairs']} | {r['ours_pairs_s']:.1f} "
            f"| {r['peer_pairs_s']:.1f} | {r['speedup']:.2f}x | {r['ours_peak_mb']:.0f} | {r['peer_peak_mb']:.0f} "
            f"| {r['padding_fraction']:.0%} | {r['max_abs_score_diff']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
