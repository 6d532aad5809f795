"""Run every benchmark, then gather their headline comparisons into one table.

    python benchmarks/run_all.py [--results-dir DIR] [--only NAME[,NAME...]] [--quick] [--no-run]

1. Unless --no-run: runs `benchmarks/NAME.py --output DIR/NAME.json` for each benchmark below, in order, each in a
   subprocess whose output streams to the console (grpo_bf16 is `grpo.py --dtype bfloat16`, run only where bfloat16
   is native: a GPU or a CPU with AMX). --quick passes each script's own smoke-run flag; all have one (`--quick`);
   a script without one would run in full. A benchmark that exits nonzero is reported with its exit code, the
   others still run, and run_all exits nonzero at the end. --only limits which ones run.
2. Always: reads DIR/NAME.json of every benchmark (not only those just run) and prints one Markdown table,
   `benchmark | metric | ours | peer | ratio | target | date | machine`, also written to DIR/all.md, with its rows
   (raw numbers) in DIR/all.json.

Ratios are always "how many times better ours is" (> 1: ours wins): throughput ours / peer, time peer / ours, each
read from the benchmark's own JSON rather than recomputed. A target checks the ratio when the row has one, else the
value of ours. A benchmark without a JSON file gives one "not run" row; a JSON without a key a row needs gives that
row as "missing: KEY.PATH", so a changed benchmark shows up in the table instead of crashing it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import machine_description

from align.files import write_text_atomic
from align.model.config import has_fast_bf16

BENCHMARKS_DIR = Path(__file__).resolve().parent
COLUMNS = ("benchmark", "metric", "ours", "peer", "ratio", "target", "date", "machine")


# --- targets --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    """As the table shows it."""
    met: Callable[[float], bool]


def at_least(ratio: float) -> Target:
    return Target(f">= {ratio:g}x", lambda value: value >= ratio)


def below(share: float) -> Target:
    return Target(f"< {share:.0%}", lambda value: value < share)


# --- reading a benchmark's JSON -------------------------------------------------------------------------------------


def lookup(report: dict, path: str):
    """The value at a dotted key path ("summary.ratios.x", "rows.0.speedup": integers index lists); KeyError(path)
    when any step of it is absent."""
    value = report
    for key in path.split("."):
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, TypeError, ValueError):
            raise KeyError(path) from None
    return value


def comparison(report: dict, metric: str, unit: str, ours: str, peer: str | None = None, ratio: str | None = None,
               target: Target | None = None) -> dict:
    """One row from the key paths of `report` holding ours, the peer's value and ours-over-peer; `unit` is that of
    ours and peer ("s", "tok/s", "pairs/s", "%" for a fraction)."""
    row = {"metric": metric, "ours": None, "peer": None, "ratio": None, "unit": unit,
           "target": target.text if target else None, "target_met": None}
    try:
        values = {name: lookup(report, path) for name, path in (("ours", ours), ("peer", peer), ("ratio", ratio))
                  if path}
    except KeyError as error:
        return {**row, "ours": f"missing: {error.args[0]}"}
    if target:
        row["target_met"] = target.met(values["ratio"] if ratio else values["ours"])
    return {**row, **values}


def per_case(report: dict, path: str, row_for: Callable[[int, dict], dict], first: int = 0) -> list[dict]:
    """row_for(i, case) for each case i >= first of the list at `path`, or one row saying the list is missing."""
    try:
        cases = lookup(report, path)
    except KeyError:
        return [comparison(report, path, "", path)]
    return [row_for(i, cases[i]) for i in range(first, len(cases))]


# --- one extractor per benchmark: its JSON -> its headline rows -----------------------------------------------------


def decoder_rows(report: dict) -> list[dict]:
    """Each case: our packed decoder against transformers (training) or full logits (log-probs)."""
    return per_case(report, "rows", lambda i, case: comparison(
        report, f"tokens/s, {case.get('case', i)}", "tok/s", f"rows.{i}.ours_tok_s", f"rows.{i}.peer_tok_s",
        f"rows.{i}.speedup"))


def sft_rows(report: dict) -> list[dict]:
    """Training tokens/s against both TRL configurations, and MFU against TRL's faster (padded) one on the CPU."""
    rows = [comparison(report, f"tokens/s vs {label}", "tok/s", "summary.ours.tokens_per_s",
                       f"summary.{peer}.tokens_per_s", f"ratios_ours_over_peer.{peer}.tokens_per_s")
            for peer, label in (("trl", "TRL packed"), ("trl_padded", "TRL padded"))]
    rows.append(comparison(report, "MFU vs TRL padded", "%", "summary.ours.mfu", "summary.trl_padded.mfu",
                           "ratios_ours_over_peer.trl_padded.mfu"))
    return rows


def dpo_rows(report: dict) -> list[dict]:
    return [comparison(report, f"{label} vs TRL DPOTrainer", unit, f"summary.ours.{key}", f"summary.trl.{key}",
                       f"ratios_ours_over_trl.{key}")
            for label, unit, key in (("pairs/s", "pairs/s", "pairs_per_s"), ("real tokens/s", "tok/s", "tokens_per_s"))]


def grpo_rows(report: dict) -> list[dict]:
    """The three targets of benchmarks/grpo.py and the README: step speedup over TRL, rollout throughput against
    raw vLLM, the weight sync's share of a step."""
    precision = "" if report.get("dtype", "float32") == "float32" else f", both {report['dtype']}"
    return [
        comparison(report, f"seconds per step vs TRL GRPOTrainer{precision}", "s", "summary.ours.step_s",
                   "summary.trl.step_s",
                   "summary.ratios.step_speedup_over_trl", at_least(2.0)),
        comparison(report, "rollout tokens/s vs raw vllm.LLM.generate", "tok/s", "summary.rollout_actor.tokens_per_s",
                   "summary.raw_vllm.tokens_per_s", "summary.ratios.rollout_over_raw_vllm",
                   at_least(0.9)),  # the issue: within 10% of raw vLLM; faster is no shortfall
        comparison(report, "weight sync, share of step", "%", "summary.ours.sync_share", target=below(0.05)),
    ]


def reward_scoring_rows(report: dict) -> list[dict]:
    return per_case(report, "rows", lambda i, case: comparison(
        report, f"pairs/s vs transformers, {case.get('case', i)}", "pairs/s", f"rows.{i}.ours_pairs_s",
        f"rows.{i}.peer_pairs_s", f"rows.{i}.speedup"))


def decontaminate_rows(report: dict) -> list[dict]:
    """Our scan's wall time against each naive all-pairs method (row 0 is ours; the others are mostly
    extrapolated from a sample of pairs)."""
    def row_for(i: int, case: dict) -> dict:
        how = "" if case.get("measured") else " (extrapolated)"
        return comparison(report, f"wall time vs {case.get('method', i)}{how}", "s", "rows.0.seconds",
                          f"rows.{i}.seconds", f"rows.{i}.ours_speedup")

    return per_case(report, "rows", row_for, first=1)


@dataclass(frozen=True)
class Benchmark:
    rows: Callable[[dict], list[dict]]
    """Its table rows, read from its JSON."""
    quick_flag: str | None = "--quick"
    """The script's smoke-run flag; None if it has none."""
    script: str = ""
    """benchmarks/SCRIPT.py; empty: the benchmark's own name."""
    args: tuple[str, ...] = ()
    """Further arguments of the script."""
    needs_fast_bf16: bool = False
    """Run only where bfloat16 matrix products are native (`has_fast_bf16`); elsewhere both sides would measure
    bfloat16 emulation, 10-250x slower than float32, for hours."""


BENCHMARKS: dict[str, Benchmark] = {  # name: results in DIR/NAME.json
    "decoder": Benchmark(decoder_rows),
    "sft": Benchmark(sft_rows),
    "dpo": Benchmark(dpo_rows),
    "grpo": Benchmark(grpo_rows),
    # Mixed precision on both sides: ~10x faster matrix products on CPUs with AMX (README, "GRPO benchmark").
    "grpo_bf16": Benchmark(grpo_rows, script="grpo", args=("--dtype", "bfloat16"), needs_fast_bf16=True),
    "reward_scoring": Benchmark(reward_scoring_rows),
    "decontaminate": Benchmark(decontaminate_rows),
}


# --- running --------------------------------------------------------------------------------------------------------


def run_benchmarks(names: list[str], results_dir: Path, quick: bool, scripts_dir: Path = BENCHMARKS_DIR
                   ) -> dict[str, int]:
    """Run `scripts_dir/NAME.py --output results_dir/NAME.json` for each name, output streamed to the console;
    returns the exit code of each that failed."""
    failed = {}
    for name in names:
        benchmark = BENCHMARKS[name]
        if benchmark.needs_fast_bf16 and not has_fast_bf16():
            print(f"\n=== {name}: skipped, this machine has no native bfloat16 matrix products (the table keeps its "
                  "last results, dated)", flush=True)
            continue
        quick_flag = benchmark.quick_flag
        if quick and not quick_flag:
            print(f"note: {name} has no quick mode; running it in full", flush=True)
        command = [sys.executable, str(scripts_dir / f"{benchmark.script or name}.py"), *benchmark.args,
                   "--output", str(results_dir / f"{name}.json"), *([quick_flag] if quick and quick_flag else [])]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        returncode = subprocess.run(command).returncode  # inherits stdout/stderr: progress shows as it happens
        if returncode:
            failed[name] = returncode
            print(f"=== {name} FAILED (exit {returncode})", flush=True)
    return failed


# --- the table ------------------------------------------------------------------------------------------------------


def benchmark_rows(name: str, results_dir: Path) -> list[dict]:
    """The rows of one benchmark's results file, each with the benchmark's name, date and machine."""
    path = results_dir / f"{name}.json"
    blank = {"ours": None, "peer": None, "ratio": None, "unit": "", "target": None, "target_met": None}
    if not path.is_file():
        return [{"benchmark": name, "metric": "not run", **blank, "date": None, "machine": None}]
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # e.g. a run killed while writing it
        return [{"benchmark": name, "metric": f"unreadable {path.name}: {error}", **blank, "date": None,
                 "machine": None}]
    stamp = {}
    for key in ("date", "machine"):
        try:
            stamp[key] = lookup(report, key)
        except KeyError:
            stamp[key] = f"missing: {key}"
    return [{"benchmark": name, **row, **stamp} for row in BENCHMARKS[name].rows(report)]


def significant(value: float) -> str:
    """3 significant digits, whole numbers from 100 up (17.96 -> 18.0, 0.00827 -> 0.00827, 3326.9 -> 3,327)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:#.3g}".rstrip(".")


def format_value(value, unit: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str) or not unit:
        return str(value)
    if unit == "%":
        return f"{100 * value:.1f}%"
    return f"{significant(value)} {unit}"


def format_cells(row: dict) -> dict:
    """A row as the table's strings."""
    target = row["target"] or ""
    if row["target_met"] is not None:
        target += ": met" if row["target_met"] else ": not met"
    return {**{key: "" if row[key] is None else str(row[key]) for key in COLUMNS},
            "ours": format_value(row["ours"], row["unit"]), "peer": format_value(row["peer"], row["unit"]),
            "ratio": "" if row["ratio"] is None else f"{significant(row['ratio'])}x", "target": target}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---:|---:|---:|---|---|---|"]
    lines += ["| " + " | ".join(format_cells(row)[key] for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------------------


def benchmark_names(text: str) -> list[str]:
    """--only's value: comma-separated benchmark names, all known ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {', '.join(unknown) or repr(text)}; valid names: "
                                         f"{', '.join(BENCHMARKS)}")
    return names


def main(argv: list[str] | None = None, scripts_dir: Path = BENCHMARKS_DIR) -> int:
    """Returns the exit status: 1 if a benchmark failed. `scripts_dir` holds the NAME.py scripts (tests point it
    at fakes)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=BENCHMARKS_DIR / "results")
    parser.add_argument("--only", type=benchmark_names, default=list(BENCHMARKS),
                        help=f"comma-separated, of: {', '.join(BENCHMARKS)} (the table still shows all)")
    parser.add_argument("--quick", action="store_true", help="each script's own smoke-run mode")
    parser.add_argument("--no-run", action="store_true", help="only build the table from the existing results")
    args = parser.parse_args(argv)
    results_dir = args.results_dir.resolve()  # the children may run elsewhere
    results_dir.mkdir(parents=True, exist_ok=True)

    failed = {} if args.no_run else run_benchmarks(args.only, results_dir, args.quick, scripts_dir)
    rows = [row for name in BENCHMARKS for row in benchmark_rows(name, results_dir)]
    table = markdown_table(rows)
    print("\n" + table)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(len(os.sched_getaffinity(0))),
              "rows": rows}
    write_text_atomic(results_dir / "all.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(results_dir / "all.md", table + "\n")
    for name, returncode in failed.items():
        # Its JSON, if any, is from an earlier run: the table's date column says when.
        print(f"FAILED: {name} (exit {returncode})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
