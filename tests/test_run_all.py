"""benchmarks/run_all.py: each extractor on a hand-written JSON of its benchmark's shape, the committed GRPO results,
missing files and keys, --no-run's outputs, and a failing benchmark among fake ones (no real benchmark runs)."""

import importlib.util
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def load_run_all():
    if "run_all" not in sys.modules:
        sys.path.insert(0, str(BENCHMARKS))  # it imports `harness` as the benchmark scripts do
        spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["run_all"] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["run_all"]


run_all = load_run_all()


def values(rows: list[dict]) -> list[tuple]:
    return [(r["metric"], r["ours"], r["peer"], r["ratio"], r["target_met"]) for r in rows]


def test_decoder_rows():
    report = {"rows": [
        {"case": "tiny float32 fwd+bwd", "ours_tok_s": 2772.0, "peer_tok_s": 1534.0, "speedup": 1.807},
        {"case": "log-probs V=151936 4096 tok", "ours_tok_s": 63.0, "peer_tok_s": 69.0, "speedup": 0.913},
    ]}
    assert values(run_all.decoder_rows(report)) == [
        ("tokens/s, tiny float32 fwd+bwd", 2772.0, 1534.0, 1.807, None),
        ("tokens/s, log-probs V=151936 4096 tok", 63.0, 69.0, 0.913, None),
    ]


def test_sft_rows():
    report = {
        "summary": {"ours": {"tokens_per_s": 3510.0, "mfu": 0.474}, "trl": {"tokens_per_s": 856.0, "mfu": 0.116},
                    "trl_padded": {"tokens_per_s": 3170.0, "mfu": 0.428}},
        "ratios_ours_over_peer": {"trl": {"tokens_per_s": 4.10, "mfu": 4.10},
                                  "trl_padded": {"tokens_per_s": 1.11, "mfu": 1.11}},
    }
    assert values(run_all.sft_rows(report)) == [
        ("tokens/s vs TRL packed", 3510.0, 856.0, 4.10, None),
        ("tokens/s vs TRL padded", 3510.0, 3170.0, 1.11, None),
        ("MFU vs TRL padded", 0.474, 0.428, 1.11, None),
    ]


def test_dpo_rows():
    report = {"summary": {"ours": {"pairs_per_s": 13.1, "tokens_per_s": 2928.0},
                          "trl": {"pairs_per_s": 7.0, "tokens_per_s": 1560.0}},
              "ratios_ours_over_trl": {"pairs_per_s": 1.88, "tokens_per_s": 1.877}}
    assert values(run_all.dpo_rows(report)) == [
        ("pairs/s vs TRL DPOTrainer", 13.1, 7.0, 1.88, None),
        ("real tokens/s vs TRL DPOTrainer", 2928.0, 1560.0, 1.877, None),
    ]


def test_grpo_rows_check_the_three_targets():
    report = {"summary": {
        "ours": {"step_s": 10.0, "sync_share": 0.06}, "trl": {"step_s": 25.0},
        "rollout_actor": {"tokens_per_s": 950.0}, "raw_vllm": {"tokens_per_s": 1000.0},
        "ratios": {"step_speedup_over_trl": 2.5, "rollout_over_raw_vllm": 0.95},
    }}
    rows = run_all.grpo_rows(report)
    assert values(rows) == [
        ("seconds per step vs TRL GRPOTrainer", 10.0, 25.0, 2.5, True),  # 2.5x >= 2x
        ("rollout tokens/s vs raw vllm.LLM.generate", 950.0, 1000.0, 0.95, True),  # 5% slower: within 10%
        ("weight sync, share of step", 0.06, None, None, False),  # 6% is not < 5%
    ]
    assert [r["target"] for r in rows] == [">= 2x", ">= 0.9x", "< 5%"]
    assert [run_all.at_least(0.9).met(r) for r in (0.89, 0.91, 1.28)] == [False, True, True]


def test_reward_scoring_rows():
    report = {"rows": [{"case": "tiny float32 scoring", "ours_pairs_s": 36.3, "peer_pairs_s": 26.0,
                        "speedup": 1.396}]}
    assert values(run_all.reward_scoring_rows(report)) == [
        ("pairs/s vs transformers, tiny float32 scoring", 36.3, 26.0, 1.396, None)]


def test_decontaminate_rows_compare_ours_with_each_reference():
    report = {"rows": [
        {"method": "ours (2 workers)", "seconds": 534.0, "measured": True, "ours_speedup": 1.0},
        {"method": "bit-parallel lcs_length, every pair", "seconds": 131364.0, "measured": False,
         "ours_speedup": 246.0},
    ]}
    assert values(run_all.decontaminate_rows(report)) == [
        ("wall time vs bit-parallel lcs_length, every pair (extrapolated)", 534.0, 131364.0, 246.0, None)]


def test_committed_grpo_results_extract_fully():
    report = json.loads((BENCHMARKS / "results" / "grpo.json").read_text())
    rows = run_all.grpo_rows(report)
    assert len(rows) == 3
    assert not [r for r in rows if "missing" in str(r["ours"])]
    assert all(isinstance(r["ours"], float) and r["target_met"] is not None for r in rows)


def test_missing_file_and_missing_key(tmp_path):
    assert [r["metric"] for r in run_all.benchmark_rows("dpo", tmp_path)] == ["not run"]

    (tmp_path / "grpo.json").write_text(json.dumps({"date": "2026-01-01", "summary": {
        "ours": {"step_s": 10.0, "sync_share": 0.01}, "trl": {"step_s": 12.0},
        "rollout_actor": {"tokens_per_s": 1.0}, "raw_vllm": {"tokens_per_s": 1.0}, "ratios": {}}}))
    rows = run_all.benchmark_rows("grpo", tmp_path)
    assert [r["ours"] for r in rows] == ["missing: summary.ratios.step_speedup_over_trl",
                                         "missing: summary.ratios.rollout_over_raw_vllm", 0.01]
    assert rows[0]["date"] == "2026-01-01" and rows[0]["machine"] == "missing: machine"
    # A list-shaped benchmark without its list gives one row saying so.
    assert [r["ours"] for r in run_all.decoder_rows({})] == ["missing: rows"]


def test_formatting():
    assert [run_all.significant(v) for v in (17.957, 0.00827, 3326.9, 1.1174, 246.3)] == [
        "18.0", "0.00827", "3,327", "1.12", "246"]
    row = {"benchmark": "grpo", "metric": "m", "ours": 17.957, "peer": 20.06, "ratio": 1.1174, "unit": "s",
           "target": ">= 2x", "target_met": False, "date": "d", "machine": "x"}
    cells = run_all.format_cells(row)
    assert (cells["ours"], cells["peer"], cells["ratio"], cells["target"]) == ("18.0 s", "20.1 s", "1.12x",
                                                                               ">= 2x: not met")
    assert run_all.format_value(0.00827, "%") == "0.8%"


def test_no_run_writes_all_json_and_md(tmp_path, capsys):
    shutil.copy(BENCHMARKS / "results" / "grpo.json", tmp_path / "grpo.json")
    assert run_all.main(["--no-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "all.md").read_text()
    assert table.strip() in out
    assert table.startswith("| benchmark | metric | ours | peer | ratio | target | date | machine |")
    # The row is built from the committed results (refreshed whenever the benchmark reruns), not from constants.
    summary = json.loads((BENCHMARKS / "results" / "grpo.json").read_text())["summary"]
    ours, trl = summary["ours"]["step_s"], summary["trl"]["step_s"]
    verdict = "met" if trl / ours >= 2 else "not met"
    assert (f"| grpo | seconds per step vs TRL GRPOTrainer | {run_all.significant(ours)} s | "
            f"{run_all.significant(trl)} s | {run_all.significant(trl / ours)}x | >= 2x: {verdict} |") in table
    report = json.loads((tmp_path / "all.json").read_text())
    assert {"date", "machine", "rows"} <= report.keys()
    by_benchmark = {}
    for row in report["rows"]:
        by_benchmark.setdefault(row["benchmark"], []).append(row)
    assert list(by_benchmark) == list(run_all.BENCHMARKS)
    assert len(by_benchmark["grpo"]) == 3
    assert all(rows == [{**rows[0], "metric": "not run"}] for name, rows in by_benchmark.items() if name != "grpo")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


FAKE_DPO = """
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--output")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
print("fake {name} running, quick=" + str(args.quick))
json.dump({{"date": "2026-01-01", "machine": "fake", "quick": args.quick, "summary": {{
    "ours": {{"pairs_per_s": 2.0, "tokens_per_s": 20.0}}, "trl": {{"pairs_per_s": 1.0, "tokens_per_s": 10.0}}}},
    "ratios_ours_over_trl": {{"pairs_per_s": 2.0, "tokens_per_s": 2.0}}}}, open(args.output, "w"))
"""


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path, capfd):
    scripts, results = tmp_path / "scripts", tmp_path / "results"
    scripts.mkdir()
    (scripts / "decoder.py").write_text("import sys\nprint('decoder crashing')\nsys.exit(3)\n")
    (scripts / "dpo.py").write_text(textwrap.dedent(FAKE_DPO.format(name="dpo")))
    status = run_all.main(["--only", "decoder,dpo", "--quick", "--results-dir", str(results)], scripts_dir=scripts)
    out = capfd.readouterr().out
    assert status == 1
    assert "FAILED: decoder (exit 3)" in out
    assert "decoder crashing" in out and "fake dpo running, quick=True" in out  # children's output streamed
    assert json.loads((results / "dpo.json").read_text())["quick"] is True  # ran after decoder failed
    assert "| dpo | pairs/s vs TRL DPOTrainer | 2.00 pairs/s | 1.00 pairs/s | 2.00x |" in out
    assert "| decoder | not run |" in out


def test_unknown_only_name_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--only", "sft,nope", "--results-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) nope" in err
    assert "decoder, sft, dpo, grpo, grpo_bf16, reward_scoring, decontaminate" in err


def test_a_variant_runs_its_script_with_its_arguments(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(run_all, "has_fast_bf16", lambda: True)
    scripts, results = tmp_path / "scripts", tmp_path / "results"
    scripts.mkdir()
    (scripts / "grpo.py").write_text("import sys\nprint('fake grpo argv', sys.argv[1:])\n")
    assert run_all.main(["--only", "grpo_bf16", "--quick", "--results-dir", str(results)], scripts_dir=scripts) == 0
    out = capfd.readouterr().out
    assert f"fake grpo argv ['--dtype', 'bfloat16', '--output', '{results / 'grpo_bf16.json'}', '--quick']" in out


def test_the_bf16_variant_is_skipped_without_native_bf16_and_keeps_its_dated_row(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(run_all, "has_fast_bf16", lambda: False)
    scripts, results = tmp_path / "scripts", tmp_path / "results"
    scripts.mkdir()
    (scripts / "grpo.py").write_text("print('grpo ran')\n")
    results.mkdir()
    shutil.copy(BENCHMARKS / "results" / "grpo.json", results / "grpo_bf16.json")
    assert run_all.main(["--only", "grpo_bf16", "--results-dir", str(results)], scripts_dir=scripts) == 0
    out = capfd.readouterr().out
    assert "grpo_bf16: skipped, this machine has no native bfloat16" in out and "grpo ran" not in out
    date = json.loads((results / "grpo_bf16.json").read_text())["date"]
    assert "| grpo_bf16 | seconds per step vs TRL GRPOTrainer" in out and f"| {date} |" in out


def test_machine_description_names_the_cpu_and_its_widest_matrix_instructions(tmp_path):
    from harness import cpu_description

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx2 avx512f "
                       "amx_bf16 amx_tile\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n")
    assert cpu_description(cpuinfo) == "Intel(R) Xeon(R) Platinum 8481C (AMX)"
    cpuinfo.write_text("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n")
    assert cpu_description(cpuinfo) == "AMD EPYC 7B13 (AVX2)"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse\n")
    assert cpu_description(cpuinfo) == "Some CPU"
