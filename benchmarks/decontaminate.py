"""Decontamination at the issue's scale: 150k training sequences against 2k evaluation sequences under the Qwen2.5
rule (|LCS| >= 13 and >= 0.6 * min length), ours against naive all-pairs LCS.

Data (synthetic token ids, seeded):
- text-like tokens: rank r drawn with probability proportional to 1 / (r + 2.7) ** 1.15 over Qwen2.5's 151,643
  regular tokens. At these lengths 3-4% of pairs pass our first (bag) bound, as 4.5% did for real English prose
  cut into documents and tokenized with Qwen2.5's vocabulary; a uniform draw would make pruning trivially easy;
- training lengths lognormal (median 300, sigma 0.9) clipped to [16, 4096]: mostly short conversations, a long
  tail. Nearly all the work is in the tail: a 3k-token sequence contains most of a 200-token one's tokens, so
  nearly all its pairs pass the bag bound, and by chance some really have 60% of it as a subsequence;
- evaluation lengths lognormal (median 200, sigma 0.5) clipped to [64, 512], benchmark questions with answers;
- planted: training sequences that contain an evaluation sequence inside unrelated text, four kinds: verbatim,
  20% of its tokens replaced, its first 70%, and its first 50% (a near miss: meets the rule only if chance
  supplies the rest).

Checks: every planted pair's decision, every match's LCS and the decisions on a random sample of pairs are
recomputed with `lcs_length` alone (itself proven equal to the DP table in tests/test_decontaminate.py).

Naive reference: the LCS of every pair, no pruning, by the textbook DP in pure Python, by the same DP with numpy
rows (row j = running max of the previous row's matches), and by our bit-parallel `lcs_length`; each is timed
on a random sample of pairs and extrapolated to all pairs (marked "extrapolated").

    python benchmarks/decontaminate.py [--train 150000] [--evals 2000] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from harness import machine_description, write_report

from align.data.decontaminate import lcs_length, required_lcs, scan

VOCAB = 151_643
ZIPF_EXPONENT = 1.15
PLANT_KINDS = ("verbatim", "replaced 20%", "first 70%", "first 50%")
MUST_MATCH = {"verbatim", "replaced 20%", "first 70%"}  # the planted common subsequence alone meets the rule


class Text:
    """Zipf-Mandelbrot token draws."""

    def __init__(self, rng: np.random.Generator):
        p = 1 / (np.arange(1, VOCAB + 1) + 2.7) ** ZIPF_EXPONENT
        self.cdf = np.cumsum(p / p.sum())
        self.rng = rng

    def tokens(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.random(n)).astype(np.int64)

    def sequences(self, lengths: np.ndarray) -> list[np.ndarray]:
        return np.split(self.tokens(int(lengths.sum())), np.cumsum(lengths)[:-1])


def lognormal_lengths(rng, count, median, sigma, low, high) -> np.ndarray:
    return np.clip(np.exp(rng.normal(np.log(median), sigma, count)).astype(np.int64), low, high)


def build_data(num_train: int, num_evals: int, num_planted: int, seed: int):
    rng = np.random.default_rng(seed)
    text = Text(rng)
    train = text.sequences(lognormal_lengths(rng, num_train, 300, 0.9, 16, 4096))
    evals = text.sequences(lognormal_lengths(rng, num_evals, 200, 0.5, 64, 512))
    planted = []  # (train index, eval index, kind)
    targets = rng.choice(num_train, size=num_planted, replace=False)
    for n, t in enumerate(targets):
        kind, e = PLANT_KINDS[n % len(PLANT_KINDS)], int(rng.integers(num_evals))
        source = evals[e]
        if kind == "replaced 20%":
            replace = rng.random(len(source)) < 0.2
            source = np.where(replace, text.tokens(len(source)), source)
        elif kind.startswith("first"):
            source = source[:int(len(source) * int(kind[6:8]) / 100)]
        train[t] = np.concatenate([text.tokens(int(rng.integers(0, 600))), source,
                                   text.tokens(int(rng.integers(0, 600)))])
        planted.append((int(t), e, kind))
    return train, evals, planted


# --- Naive references -------------------------------------------------------------------------------------------


def dp_python(a, b) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def dp_numpy(a: np.ndarray, b: np.ndarray) -> int:
    """The DP one row per token of a: row[j] = max(row[j-1], previous[j], previous[j-1] + [a_i == b_j]), i.e. a
    running maximum (np.maximum.accumulate) of the previous row with its matches raised by one."""
    previous = np.zeros(len(b) + 1, dtype=np.int32)
    for x in a:
        candidate = previous.copy()
        match = b == x
        candidate[1:][match] = previous[:-1][match] + 1
        previous = np.maximum.accumulate(candidate)
    return int(previous[-1])


def time_per_pair(method, pairs, train, evals, budget_s: float) -> tuple[float, int]:
    """Mean seconds per pair over as many of `pairs` as fit in about budget_s."""
    began, done = time.perf_counter(), 0
    for t, e in pairs:
        method(train[t], evals[e])
        done += 1
        if time.perf_counter() - began > budget_s:
            break
    return (time.perf_counter() - began) / done, done


# --- Main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=150_000)
    parser.add_argument("--evals", type=int, default=2000)
    parser.add_argument("--planted", type=int, default=400, help="training sequences with a planted eval sequence")
    parser.add_argument("--workers", type=int, default=2, help="processes for the exact-LCS steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10k training and 500 evaluation sequences")
    parser.add_argument("--output", default="benchmarks/results/decontaminate.json")
    args = parser.parse_args()
    if args.quick:
        args.train, args.evals, args.planted = 10_000, 500, 40

    began = time.perf_counter()
    train, evals, planted = build_data(args.train, args.evals, args.planted, args.seed)
    train_lengths, eval_lengths = np.array([len(t) for t in train]), np.array([len(e) for e in evals])
    print(f"data: {len(train)} training sequences ({train_lengths.sum():,} tokens, median "
          f"{np.median(train_lengths):.0f}, max {train_lengths.max()}), {len(evals)} evaluation sequences (median "
          f"{np.median(eval_lengths):.0f}), "
          f"{len(planted)} planted; built in {time.perf_counter() - began:.0f} s", flush=True)

    load_before = os.getloadavg()
    began = time.perf_counter()
    result = scan(train, evals, workers=args.workers)
    ours_s = time.perf_counter() - began
    load_after = os.getloadavg()
    print(f"ours: {ours_s:.1f} s wall; {len(result.matches)} matching pairs, {len(result.contaminated)} training "
          f"sequences to drop", flush=True)

    # Checks, each against lcs_length alone.
    found = {(m.train_index, m.eval_index) for m in result.matches}
    plant_rows = []
    for kind in PLANT_KINDS:
        pairs = [(t, e) for t, e, k in planted if k == kind]
        truth = [lcs_length(train[t], evals[e]) >= required_lcs(len(train[t]), len(evals[e])) for t, e in pairs]
        flagged = [(t, e) in found for t, e in pairs]
        plant_rows.append({"kind": kind, "planted": len(pairs), "meet_rule": sum(truth), "flagged": sum(flagged),
                           "agree": sum(a == b for a, b in zip(truth, flagged, strict=True))})
        if kind in MUST_MATCH and not all(flagged):
            missed = [pair for pair, hit in zip(pairs, flagged, strict=True) if not hit]
            raise SystemExit(f"planted '{kind}' pairs missed: {missed}")
    if any(row["agree"] != row["planted"] for row in plant_rows):
        raise SystemExit(f"planted decisions differ from lcs_length: {plant_rows}")
    wrong = [m for m in result.matches if lcs_length(train[m.train_index], evals[m.eval_index]) != m.lcs]
    if wrong:
        raise SystemExit(f"{len(wrong)} matches with a wrong LCS, e.g. {wrong[0]}")
    rng = np.random.default_rng(args.seed + 1)
    sample = list(zip(rng.integers(len(train), size=20_000).tolist(), rng.integers(len(evals), size=20_000).tolist(),
                      strict=True))
    check_began, checked = time.perf_counter(), 0
    for t, e in sample[:2000]:
        truth = lcs_length(train[t], evals[e]) >= required_lcs(len(train[t]), len(evals[e]))
        if truth != ((t, e) in found):
            raise SystemExit(f"pair {(t, e)}: rule says {truth}, scan says {not truth}")
        checked += 1
    print(f"checks: planted decisions, {len(result.matches)} matches' LCS and {checked} random pairs agree with "
          f"lcs_length ({time.perf_counter() - check_began:.0f} s)", flush=True)

    # Naive references, timed on the same random pairs and extrapolated to all of them.
    references = [
        ("bit-parallel lcs_length, every pair", lcs_length, 20.0),
        ("DP with numpy rows, every pair", dp_numpy, 20.0),
        ("textbook DP in pure Python, every pair", lambda a, b: dp_python(a.tolist(), b.tolist()), 30.0),
    ]
    rows = [{"method": f"ours (bag bound + split bound + bit-parallel LCS, {args.workers} workers)",
             "lcs_pairs": result.refined, "seconds": ours_s, "measured": True}]
    for name, method, budget in references:
        per_pair, timed = time_per_pair(method, sample, train, evals, budget)
        rows.append({"method": name, "lcs_pairs": result.pairs, "seconds": per_pair * result.pairs,
                     "measured": False, "pairs_timed": timed, "seconds_per_pair": per_pair})
        print(f"{name}: {per_pair * 1e3:.2f} ms per pair over {timed} pairs", flush=True)
    for row in rows:
        row["ours_speedup"] = row["seconds"] / ours_s

    stages = {
        "pairs": result.pairs, "bag_bound_candidates": result.candidates, "split_bound_survivors": result.refined,
        "matching_pairs": len(result.matches), "training_sequences_dropped": len(result.contaminated),
        "bound_seconds": result.bound_seconds, "exact_seconds_all_workers": result.exact_seconds,
    }
    print("\n" + markdown_table(rows) + "\n\n" + stages_table(stages) + "\n\n" + plants_table(plant_rows))
    report = {
        "benchmark": "decontaminate", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{machine_description(os.cpu_count())}, numpy {np.__version__}",
        "load_average_before_after": [load_before[0], load_after[0]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rule": "|LCS| >= 13 and |LCS| >= 0.6 * min(|s_t|, |s_e|) (Qwen2.5 report, section 4.1)",
        "data": {"train": len(train), "train_tokens": int(train_lengths.sum()),
                 "train_length_median_max": [float(np.median(train_lengths)), int(train_lengths.max())],
                 "evals": len(evals), "eval_length_median": float(np.median(eval_lengths)),
                 "tokens": f"Zipf-Mandelbrot 1 / (rank + 2.7) ** {ZIPF_EXPONENT} over {VOCAB} ids",
                 "seed": args.seed},
        "rows": rows, "stages": stages, "planted": plant_rows, "random_pairs_checked": checked,
    }
    write_report(args.output, report)


def duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | pairs given a full LCS | wall time | | time / ours |", "|---|---:|---:|---|---:|"]
    for r in rows:
        how = "measured" if r["measured"] else f"extrapolated from {r['pairs_timed']} pairs"
        lines.append(f"| {r['method']} | {r['lcs_pairs']:,} | {duration(r['seconds'])} | {how} "
                     f"| {r['ours_speedup']:,.0f}x |")
    return "\n".join(lines)


def stages_table(s: dict) -> str:
    return "\n".join([
        "| pairs | pass bag bound | pass split bound (full LCS) | meet the rule | training sequences dropped | "
        "bag bound time | LCS time (all workers) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['pairs']:,} | {s['bag_bound_candidates']:,} ({s['bag_bound_candidates'] / s['pairs']:.2%}) "
        f"| {s['split_bound_survivors']:,} ({s['split_bound_survivors'] / s['pairs']:.3%}) | {s['matching_pairs']:,} "
        f"| {s['training_sequences_dropped']:,} | {s['bound_seconds']:.0f} s "
        f"| {s['exact_seconds_all_workers']:.0f} s |",
    ])


def plants_table(rows: list[dict]) -> str:
    lines = ["| planted kind | planted | meet the rule (lcs_length) | flagged by scan |", "|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['planted']} | {r['meet_rule']} | {r['flagged']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
