"""The pipeline's report: RUN/report/report.md and report.html, with PNG plots, from the stage directories.

    python -m align.report RUN            # rebuild it (align.pipeline does after every stage)

Everything is read from what the recipes write, in these shapes (see their writers):

    RUN/sft/eval.json     {"before": E, "after SFT": E}, E = align.evaluate.EvalReport.to_dict():
                          {"overall": x, "accuracy": {family: {"1": x}}, "correct": {..}, "total": {family: {"1": n}}}
    RUN/rm/eval.json      {"before": P, "after training": P}, P = reward.evaluate.PairAccuracy.to_dict()
                          ("before" is missing when the run was resumed)
    RUN/dpo/report.json   {"accuracy": {"SFT" | "DPO-AdamW" | ...: E}, "reference_likelihood": {model: {key: x}},
                          "pairs": {...}, "training_last_record": {variant: record}, "seconds": {...}, "models": {..}}
    RUN/grpo/eval.json    {"before GRPO": E, "after GRPO": E}
    RUN/<stage>/metrics.jsonl (DPO: RUN/dpo/<variant>/metrics.jsonl), RUN/<stage>/.done (align.pipeline)

The Markdown is built by pure functions of the run directory; a missing stage shows as "not run yet", so a partial
report exists after every stage. The HTML comes from a small converter of the Markdown this module writes
(headings, paragraphs, lists, tables, images), self-contained apart from the PNGs beside it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from align.files import write_text_atomic
from align.metrics import read_metrics
from align.pipeline import DONE, DPO_VARIANTS, STAGE_NAMES
from align.stats import format_p_value, paired_change

STAGE_TITLES = {"sft": "SFT", "rm": "reward model", "dpo": "DPO (AdamW, OnDARE, OnTIES)", "grpo": "GRPO"}
THROUGHPUT = {"sft": "training tokens/s", "rm": "training tokens/s", "dpo": "training tokens/s (mean of variants)",
              "grpo": "generated tokens/s (rollout)"}
GRPO_CURVES = ("reward_mean", "accuracy", "zero_variance_fraction")


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --- held-out accuracy ------------------------------------------------------------------------------------------


def accuracy_columns(run_dir: Path) -> dict[str, dict]:
    """Column name -> EvalReport dict, in pipeline order: the base, SFT, each DPO variant, GRPO's start and GRPO
    (those present).
    DPO's own "SFT" column is left out: it is the same model as SFT's "after" (on DPO's eval rows)."""
    columns = {}
    sft = load_json(run_dir / "sft" / "eval.json") or {}
    columns.update({name: sft[key] for name, key in (("base", "before"), ("SFT", "after SFT")) if key in sft})
    dpo = load_json(run_dir / "dpo" / "report.json") or {}
    columns.update({name: r for name, r in dpo.get("accuracy", {}).items() if name != "SFT"})
    # GRPO's start model again, on GRPO's own eval rows (more per level than the other stages'), so that its
    # effect reads from two columns of the same problems.
    start, trained = grpo_eval(run_dir)
    if start is not None and trained is not None:
        columns["GRPO start"] = start
    if trained is not None:
        columns["GRPO"] = trained
    return columns


def grpo_eval(run_dir: Path) -> tuple[dict | None, dict | None]:
    """GRPO's (start, trained) EvalReport dicts from RUN/grpo/eval.json, None where missing. "before (SFT)": the
    start's key in runs before 2026-12-03."""
    grpo = load_json(run_dir / "grpo" / "eval.json") or {}
    return grpo.get("before GRPO", grpo.get("before (SFT)")), grpo.get("after GRPO")


def format_accuracy(columns: dict[str, dict]) -> str:
    """Markdown: one row per (family, difficulty) and overall, one column per model. n is the row's problem count
    in the first column that has it; a column evaluated on another count says so in its cell."""
    rows = _accuracy_rows(columns)
    lines = ["| family | difficulty | n | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for family, level in rows:
        counts = [r["total"].get(family, {}).get(level) for r in columns.values()]
        n = next(c for c in counts if c is not None)
        cells = ["–" if c is None else _percent(r["accuracy"][family][level]) + ("" if c == n else f" (n={c})")
                 for r, c in zip(columns.values(), counts, strict=True)]
        lines.append(f"| {family} | {level} | {n} | " + " | ".join(cells) + " |")
    totals = [sum(sum(levels.values()) for levels in r["total"].values()) for r in columns.values()]
    cells = [_percent(r["overall"]) + ("" if t == totals[0] else f" (n={t})")
             for r, t in zip(columns.values(), totals, strict=True)]
    lines.append(f"| all | | {totals[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _accuracy_rows(columns: dict[str, dict]) -> list[tuple[str, str]]:
    """(family, difficulty) of every column, families in order of appearance, difficulties in numeric order."""
    levels: dict[str, set[str]] = {}
    for report in columns.values():
        for family, counts in report["total"].items():
            levels.setdefault(family, set()).update(counts)
    return [(family, level) for family, found in levels.items() for level in sorted(found, key=int)]


def _percent(x: float, digits: int = 0) -> str:
    return f"{x:.{digits}%}"


def stage_comparisons(run_dir: Path) -> list[tuple[str, str, str, dict, dict]]:
    """(stage, start model, trained model, start's EvalReport dict, trained's): each stage's model against the one
    it started from, on the same problems (each recipe evaluates both in one call)."""
    pairs = []
    sft = load_json(run_dir / "sft" / "eval.json") or {}
    if "before" in sft and "after SFT" in sft:
        pairs.append(("SFT", "base", "SFT", sft["before"], sft["after SFT"]))
    dpo = (load_json(run_dir / "dpo" / "report.json") or {}).get("accuracy", {})
    pairs += [("DPO", "SFT", name, dpo["SFT"], r) for name, r in dpo.items() if name != "SFT" and "SFT" in dpo]
    start, trained = grpo_eval(run_dir)
    if start is not None and trained is not None:
        pairs.append(("GRPO", "GRPO start", "GRPO", start, trained))
    sampled = load_json(run_dir / "grpo" / "eval_sampled.json") or {}
    if "before GRPO" in sampled and "after GRPO" in sampled:
        before = sampled["before GRPO"]
        pairs.append((f"GRPO, {before['answers_per_problem']} samples at T {before['temperature']:g}, levels "
                      "trained on", "GRPO start", "GRPO", before, sampled["after GRPO"]))
    return pairs


def stage_effects_section(run_dir: Path, significance: float = 0.05) -> list[str]:
    """Each stage's change on the same held-out problems: problems gained and lost, and the exact McNemar p-value
    (align.stats), so a change within the noise of a few hundred problems reads as such."""
    comparisons = stage_comparisons(run_dir)
    if not comparisons:
        return ["Not run yet."]
    lines = [f"Each stage's model against the model it started from, on the same problems. Gained: solved only "
             f"after the stage; lost: only before. p: the chance of an imbalance at least this large if the stage "
             f"changed nothing (exact McNemar test); below {significance:g} the change is beyond chance. Greedy "
             f"answers, except the sampled row: several answers per problem, before and after are the fraction "
             f"right, gained and lost the problems answered right more and less often (sign test).", "",
             "| stage | models | problems | before | after | gained | lost | p | beyond chance |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for stage, start, trained, before, after in comparisons:
        if "passed" not in before or "passed" not in after:  # runs before per-problem verdicts were kept
            lines.append(f"| {stage} | {start} → {trained} | | {_percent(before['overall'])} | "
                         f"{_percent(after['overall'])} | | | | per-problem verdicts not recorded |")
            continue
        change = paired_change(before["passed"], after["passed"])
        verdict = "yes" if change.p_value < significance else "no"
        answers = change.problems * before.get("answers_per_problem", 1)
        lines.append(f"| {stage} | {start} → {trained} | {change.problems} | "
                     f"{_percent(change.solved_before / answers)} | {_percent(change.solved_after / answers)} | "
                     f"{change.gained} | {change.lost} | {format_p_value(change.p_value)} | {verdict} |")
    return lines


# --- the other sections -----------------------------------------------------------------------------------------


def reward_model_section(rm_eval: dict | None) -> list[str]:
    """Held-out pair accuracy per subset, before (the SFT model with a fresh score head) and after training."""
    if rm_eval is None:
        return ["Not run yet."]
    names = list(rm_eval)
    last = rm_eval[names[-1]]
    lines = ["| subset | pairs | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for subset, entry in last["by_subset"].items():
        cells = [_percent(r["by_subset"][subset]["accuracy"], 1) if subset in r["by_subset"] else "–"
                 for r in rm_eval.values()]
        lines.append(f"| {subset} | {entry['pairs']} | " + " | ".join(cells) + " |")
    lines.append(f"| all | {last['pairs']} | " + " | ".join(_percent(r["accuracy"], 1) for r in rm_eval.values())
                 + " |")
    lines += ["", f"Ties (counted wrong): {last['ties']}; mean score margin (chosen - rejected): "
                  f"{last['mean_margin']:.3f}."]
    return lines


def dpo_section(report: dict | None) -> list[str]:
    """AdamW against OnDARE and OnTIES: pairs, the alignment tax, the last training record, seconds. (Their
    held-out accuracy is in the accuracy table.)"""
    if report is None:
        return ["Not run yet."]
    pairs = report["pairs"]
    tax = report["reference_likelihood"]
    names = list(tax)
    lines = [f"{pairs['pairs']} rejection-sampled pairs from {pairs['prompts']} prompts "
             f"({pairs['pairs_before_decontamination'] - pairs['pairs']} dropped by decontamination).", "",
             "Alignment tax: mean log-likelihood per token of held-out reference solutions (higher: less tax).", "",
             "| family | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in tax[names[0]]:
        lines.append(f"| {key} | " + " | ".join(f"{tax[n][key]:.3f}" for n in names) + " |")
    lines += ["", "| variant | loss | reward accuracy | reward margin | chosen reward | rejected reward |",
              "|---|---:|---:|---:|---:|---:|"]
    for variant, r in report["training_last_record"].items():
        lines.append(f"| {variant} | {r['loss']:.3f} | {r['reward_accuracy']:.2f} | {r['reward_margin']:.3f} | "
                     f"{r['rewards_chosen']:.3f} | {r['rewards_rejected']:.3f} |")
    seconds = report["seconds"]
    parts = [f"build pairs {seconds['build_pairs']:.0f}", *(f"train {v} {s:.0f}" for v, s in seconds["train"].items()),
             f"evaluate {seconds['evaluate']:.0f}", f"total {seconds['total']:.0f}"]
    lines += ["", "Seconds: " + ", ".join(parts) + " (a resumed run counts only what it redid)."]
    return lines


def grpo_section(records: list[dict] | None, rows: int = 10) -> list[str]:
    """The reward and accuracy curves as a table of `rows` steps spread over the run (first and last included)."""
    if not records:
        return ["Not run yet."]
    picked = sorted({round(i * (len(records) - 1) / max(rows - 1, 1)) for i in range(rows)})
    keys = [k for k in (*GRPO_CURVES, "seconds_step") if k in records[0]]
    lines = ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for i in picked:
        lines.append(f"| {records[i]['step']} | " + " | ".join(f"{records[i][k]:.3f}" for k in keys) + " |")
    return lines


def timing_section(run_dir: Path) -> list[str]:
    """Wall time (from each stage's .done) and throughput (the mean of its metrics.jsonl records) per stage."""
    lines = ["| stage | status | seconds | finished at | optimizer steps | throughput |", "|---|---|---:|---|---:|---|"]
    total = 0.0
    base = load_json(run_dir / "base.json")
    if base and base.get("seconds"):
        total += base["seconds"]
        lines.append(f"| base model (once per machine) | built | {base['seconds']:.0f} | | | |")
    for name in STAGE_NAMES:
        done = load_json(run_dir / name / DONE)
        status = "not run" if not (run_dir / name).is_dir() else "unfinished" if done is None else \
            "done, resumed" if done["resumed"] else "done"
        records = [read_metrics(f) for f in _metrics_files(run_dir / name)]
        records = [r for r in records if r]
        steps = sum(r[-1]["step"] for r in records) if records else ""
        rates = [x["tokens_per_s"] for r in records for x in r if "tokens_per_s" in x]
        rate = f"{sum(rates) / len(rates):,.0f} {THROUGHPUT[name]}" if rates else ""
        seconds = f"{done['seconds']:.0f}" if done else ""
        total += done["seconds"] if done else 0.0
        lines.append(f"| {STAGE_TITLES[name]} | {status} | {seconds} | {done['finished_at'] if done else ''} | "
                     f"{steps} | {rate} |")
    lines.append(f"| total | | {total:.0f} ({total / 60:.1f} min) | | | |")
    return lines


def _metrics_files(stage_dir: Path) -> list[Path]:
    """The stage's metrics.jsonl, or its sub-runs' (DPO's adamw/, ondare/, onties/)."""
    if (stage_dir / "metrics.jsonl").is_file():
        return [stage_dir / "metrics.jsonl"]
    return sorted(stage_dir.glob("*/metrics.jsonl"))


def grpo_start_policy(run_dir: Path) -> str | None:
    """The --policy-model-path GRPO was started with, from its .done command."""
    done = load_json(run_dir / "grpo" / DONE)
    command = done["command"] if done else []
    flags = [i for i, arg in enumerate(command) if arg == "--policy-model-path"]
    return command[flags[-1] + 1] if flags else None


# --- the whole report -------------------------------------------------------------------------------------------


def build_report(run_dir: Path, plots: Sequence[tuple[str, str]] = ()) -> str:
    """The report's Markdown; `plots` are (caption, file name in RUN/report/) pairs shown at the end."""
    run_dir = Path(run_dir)
    finished = [n for n in STAGE_NAMES if (run_dir / n / DONE).is_file()]
    columns = accuracy_columns(run_dir)
    lines = ["# qwen-align pipeline report", "",
             f"Run directory `{run_dir}`, report generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Finished stages: {', '.join(STAGE_TITLES[n] for n in finished) or 'none yet'}.", "",
             "## Held-out accuracy per task family and difficulty (greedy)", ""]
    lines += [format_accuracy(columns)] if columns else ["Not measured yet."]
    if policy := grpo_start_policy(run_dir):
        lines += ["", f"GRPO started from `{policy}`."]
    lines += ["", "## What each stage changed (paired, on the same problems)", ""]
    lines += stage_effects_section(run_dir)
    lines += ["", "## Reward model: held-out pair accuracy", ""]
    lines += reward_model_section(load_json(run_dir / "rm" / "eval.json"))
    lines += ["", "## DPO: AdamW against the Online Merging Optimizer", ""]
    lines += dpo_section(load_json(run_dir / "dpo" / "report.json"))
    lines += ["", "## GRPO: reward and accuracy during training (sampled completions)", ""]
    metrics = run_dir / "grpo" / "metrics.jsonl"
    lines += grpo_section(read_metrics(metrics) if metrics.is_file() else None)
    lines += ["", "## Time and throughput per stage", ""]
    lines += timing_section(run_dir)
    if plots:
        lines += ["", "## Plots", ""]
        for caption, name in plots:
            lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path) -> Path:
    """Write RUN/report/report.md, report.html and the PNGs; returns the report directory."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    markdown = build_report(run_dir, make_plots(run_dir, out))
    write_text_atomic(out / "report.md", markdown)
    write_text_atomic(out / "report.html", markdown_to_html(markdown, "qwen-align pipeline report"))
    return out


def make_plots(run_dir: Path, out: Path) -> list[tuple[str, str]]:
    """PNGs into `out`: held-out accuracy by stage and each stage's own training curves (GRPO's among them)."""
    plots = []
    columns = accuracy_columns(run_dir)
    if columns:
        plot_accuracy(columns, out / "accuracy.png")
        plots.append(("Held-out accuracy after each stage", "accuracy.png"))
    # GRPO's own curves.png already holds reward, accuracy, zero-variance groups, KL, entropy and the log-prob gap.
    copies = [("sft/loss.png", "SFT training"), ("rm/loss.png", "Reward-model training"),
              *((f"dpo/{v}/loss.png", f"DPO training, {v}") for v in DPO_VARIANTS),
              ("grpo/curves.png", "GRPO per step: reward, accuracy, zero-variance groups, KL, entropy, vLLM gap")]
    for source, caption in copies:
        if (run_dir / source).is_file():
            name = source.replace("/", "_")
            shutil.copy2(run_dir / source, out / name)
            plots.append((caption, name))
    return plots


def plot_accuracy(columns: dict[str, dict], output_png: Path) -> None:
    """Grouped bars: one group per (family, difficulty), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _accuracy_rows(columns)
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 2), 3.8))
    for i, (name, report) in enumerate(columns.items()):
        values = [report["accuracy"].get(f, {}).get(level, float("nan")) for f, level in rows]
        ax.bar([j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)), [f"{f} {level}" for f, level in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1.2)  # headroom: the legend sits above the bars
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("held-out accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(columns), loc="upper center", frameon=False)
    fig.tight_layout()
    fig.savefig(output_png, dpi=110)
    plt.close(fig)


# --- Markdown to HTML (the subset this module writes) ------------------------------------------------------------


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}"
        "th{background:#f3f3f3}td.r,th.r{text-align:right}code{background:#f3f3f3;padding:0 .2em}"
        "img{max-width:100%}")


def markdown_to_html(markdown: str, title: str) -> str:
    """A self-contained page (inline CSS; images by relative path) from headings, paragraphs, `- ` lists, pipe
    tables and image lines."""
    body, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if block and (not line.strip() or _kind(line) != _kind(block[0]) or _kind(line) in ("heading", "image")):
            body.append(_render_block(block))
            block = []
        if line.strip():
            block.append(line)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _kind(line: str) -> str:
    if line.startswith("#"):
        return "heading"
    if line.startswith("|"):
        return "table"
    if line.startswith("!["):
        return "image"
    return "list" if line.startswith("- ") else "paragraph"


def _render_block(lines: list[str]) -> str:
    kind = _kind(lines[0])
    if kind == "heading":
        level = len(lines[0]) - len(lines[0].lstrip("#"))
        return f"<h{level}>{_inline(lines[0][level:].strip())}</h{level}>"
    if kind == "image":
        alt, src = re.fullmatch(r"!\[(.*)\]\((.*)\)", lines[0].strip()).groups()
        return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    if kind == "table":
        return _render_table(lines)
    return f"<p>{_inline(' '.join(lines))}</p>"


def _render_table(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    right = ["r" if c.endswith(":") else "" for c in cells[1]]  # the separator row: `---:` right-aligns

    def row(tag: str, values: list[str]) -> str:
        return "<tr>" + "".join(f'<{tag} class="{a}">{_inline(v)}</{tag}>' if a else f"<{tag}>{_inline(v)}</{tag}>"
                                for v, a in zip(values, right, strict=False)) + "</tr>"

    return "<table>" + row("th", cells[0]) + "".join(row("td", r) for r in cells[2:]) + "</table>"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m align.report RUN_DIR")
    print(write_report(Path(sys.argv[1])) / "report.md")
