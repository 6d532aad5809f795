"""`reward-eval`: preference accuracy of reward models and verifiers, on several datasets, side by side.

    reward-eval --model RM_DIR [--model RM2_DIR] [--verifier task] --data pairs.jsonl [--data other.parquet]
                [--output results.json] [--report-dir report/]

For every (scorer, dataset): accuracy (chosen scored above rejected; ties count as wrong and are reported),
per subset when the data has a `subset` column, mean margin r_chosen - r_rejected, and, for RewardBench data, its
section scores (each section's subsets weighted by their example counts, the overall score the mean of the
sections). Prints a table, writes `--output` JSON and, with `--report-dir`, a Markdown report with a bar chart.

One benchmark does not predict how well a reward model steers RL (the Qwen2.5 report makes this point): pass
several `--data` files to see a model across them in one run.

Verifiers score a response 1 (passes) or 0, so they need a row's reference: `--verifier task` reads the synthetic
tasks' `family`, `answer`/`tests` columns (see align.tasks.preferences) from each row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from align.data import DataError, load_rows, parse_pair, tokenize_pairs
from align.tokenizer import load_tokenizer
from reward.evaluate import PairAccuracy, pair_accuracy, score_sequences
from reward.model import load_reward_model
from reward.verifiers import check_task

# RewardBench's sections (allenai/reward-bench, rewardbench/constants.py: SUBSET_MAPPING).
REWARDBENCH_SECTIONS = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
VERIFIERS = ("task",)


def section_scores(result: PairAccuracy) -> dict[str, float] | None:
    """RewardBench section accuracies (subsets weighted by example count) and their mean as "Score"; None when
    no subset of the data is a RewardBench subset."""
    sections = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [result.by_subset[s] for s in subsets if s in result.by_subset]
        if present:
            sections[section] = sum(c for c, _ in present) / sum(n for _, n in present)
    if not sections:
        return None
    return {**sections, "Score": sum(sections.values()) / len(sections)}


def score_with_model(model_dir: str, rows, source: str, max_length: int, batch_tokens: int) -> PairAccuracy:
    tokenizer = load_tokenizer(model_dir)
    pairs, stats = tokenize_pairs(rows, tokenizer, max_length, source)
    if stats.dropped_too_long:
        print(f"{source}: {stats.dropped_too_long} of {stats.rows} pairs longer than {max_length} tokens skipped",
              file=sys.stderr)
    model = load_reward_model(model_dir)
    scores = score_sequences(model, [s for p in pairs for s in (p.chosen_ids, p.rejected_ids)], batch_tokens,
                             progress=True)
    return pair_accuracy(scores[0::2], scores[1::2], [p.subset for p in pairs])


def score_with_verifier(rows, source: str) -> PairAccuracy:
    """Each answer scores 1 if the task verifier passes it, else 0 (equal verdicts are ties)."""
    parsed = [parse_pair(row, source, i) for i, row in enumerate(rows)]
    for index, row in enumerate(rows):
        if row.get("family") is None:
            raise DataError(f"{source}: row {index}: field 'family': missing (the task verifier needs it)")
    jobs = [(row, pair.chosen[-1]["content"]) for row, pair in zip(rows, parsed, strict=True)]
    jobs += [(row, pair.rejected[-1]["content"]) for row, pair in zip(rows, parsed, strict=True)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # code checks wait on sandboxed child processes
        passed = [float(v.passed) for v in pool.map(lambda job: check_task(*job), jobs)]
    n = len(parsed)
    return pair_accuracy(torch.tensor(passed[:n]), torch.tensor(passed[n:]), [p.subset for p in parsed])


def format_table(results: dict[str, dict[str, PairAccuracy]]) -> str:
    """Markdown: one row per (dataset, subset), one column per scorer."""
    scorers = list(results)
    datasets = list(next(iter(results.values())))
    lines = ["| data | subset | pairs | " + " | ".join(scorers) + " | ", "|---|---|---:|" + "---:|" * len(scorers)]
    for data in datasets:
        first = results[scorers[0]][data]
        for subset, (_, n) in first.by_subset.items():
            cells = [f"{results[s][data].by_subset[subset][0] / n:.1%}" for s in scorers]
            lines.append(f"| {data} | {subset} | {n} | " + " | ".join(cells) + " |")
        lines.append(f"| {data} | **all** | {first.pairs} | "
                     + " | ".join(f"**{results[s][data].accuracy:.1%}**" for s in scorers) + " |")
        lines.append(f"| {data} | ties | | " + " | ".join(str(results[s][data].ties) for s in scorers) + " |")
        lines.append(f"| {data} | mean margin | | "
                     + " | ".join(f"{results[s][data].mean_margin:+.3f}" for s in scorers) + " |")
        for s in scorers:
            sections = section_scores(results[s][data])
            if sections:
                lines.append(f"| {data} | RewardBench sections ({s}) | | "
                             + ", ".join(f"{k} {v:.1%}" for k, v in sections.items()) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, dict[str, PairAccuracy]], report_dir: Path) -> None:
    """report.md (the table and the caveat) and accuracy.png (one bar group per dataset, a bar per scorer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    scorers, datasets = list(results), list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(max(4, 2 + 1.5 * len(datasets) * len(scorers)), 3.5))
    width = 0.8 / len(scorers)
    for k, scorer in enumerate(scorers):
        xs = [i + k * width for i in range(len(datasets))]
        ax.bar(xs, [results[scorer][d].accuracy for d in datasets], width, label=scorer)
    ax.set_xticks([i + width * (len(scorers) - 1) / 2 for i in range(len(datasets))], [Path(d).name for d in datasets])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pair accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "accuracy.png", dpi=110)
    plt.close(fig)
    (report_dir / "report.md").write_text(
        "# Reward evaluation\n\n" + format_table(results) + "\n\n![accuracy](accuracy.png)\n\n"
        "Accuracy on one preference benchmark does not predict how well a reward model steers RL; compare "
        "across several datasets and check the policy it trains.\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reward-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="DIR", help="reward model directory")
    parser.add_argument("--verifier", action="append", default=[], choices=VERIFIERS, help="rule-based scorer")
    parser.add_argument("--data", action="append", required=True, metavar="FILE",
                        help="preference pairs: JSONL, Parquet or a saved dataset directory (repeatable)")
    parser.add_argument("--max-length", type=int, default=4096, help="longest conversation scored, in tokens")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per packed forward pass")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--report-dir", type=Path, help="write report.md and accuracy.png here")
    args = parser.parse_args(argv)
    if not args.model and not args.verifier:
        parser.error("give at least one --model or --verifier")
    try:
        rows = {data: load_rows(data) for data in args.data}
        results: dict[str, dict[str, PairAccuracy]] = {}
        for model_dir in args.model:
            results[model_dir] = {d: score_with_model(model_dir, r, d, args.max_length, args.batch_tokens)
                                  for d, r in rows.items()}
        for verifier in args.verifier:
            results[f"verifier:{verifier}"] = {d: score_with_verifier(r, d) for d, r in rows.items()}
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.output:
        args.output.write_text(json.dumps(
            {s: {d: {**r.to_dict(), "rewardbench": section_scores(r)} for d, r in per.items()}
             for s, per in results.items()}, indent=2))
    if args.report_dir:
        write_report(results, args.report_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
