"""align.pipeline and align.report with fake stages: tiny scripts that write what a recipe would, fail, or hang.

No recipe runs here. The real stage table is checked by building its command lines and matching every flag
against the recipes' config dataclasses, read from their source with `ast` (importing the recipes would load
torch, vLLM and Ray).
"""

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.config import parse_config
from align.pipeline import (
    DONE,
    RECIPES,
    STAGES,
    PipelineConfig,
    PipelineError,
    RunPaths,
    Stage,
    grpo_start,
    run_pipeline,
    stage_command,
)
from align.report import build_report, format_accuracy, markdown_to_html, write_report

REPO = Path(__file__).resolve().parent.parent

# A stand-in recipe: refuses a directory holding another run without --resume (as align.run.refuse_other_runs),
# records its arguments and the order stages ran in, then does what FAKE_CONTROL says for its stage name.
FAKE_RECIPE = """
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--output-dir") + 1])
control = Path(os.environ["FAKE_CONTROL"])
behaviour = json.loads(control.read_text()).get(out.name, "ok") if control.is_file() else "ok"
if ((out / "config.yaml").is_file() or any(out.glob("checkpoint-*"))) and "--resume" not in args:
    sys.exit(f"error: {out} holds another run")
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text("")
with open(out.parent / "order.txt", "a") as f:
    f.write(out.name + "\\n")
(out / "argv.json").write_text(json.dumps(args))
(out / "pid").write_text(str(os.getpid()))
print(f"fake {out.name} on stdout", flush=True)
print(f"fake {out.name} on stderr", file=sys.stderr, flush=True)
if behaviour == "fail":
    sys.exit(3)
if behaviour in ("hang", "checkpoint-hang"):
    if behaviour == "checkpoint-hang":
        (out / "checkpoint-00000001").mkdir()
        (out / "checkpoint-00000001" / "trainer_state.json").write_text("{}")
    (out / "started").write_text("")
    time.sleep(60)
if behaviour != "no-output":
    (out / "final").mkdir(exist_ok=True)
    (out / "final" / "config.json").write_text("{}")
"""

# The pipeline in a process of its own, so that a test can SIGKILL it mid-stage.
DRIVER = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_pipeline import fake_stages
from align.pipeline import RunPaths, run_pipeline
tmp = Path(sys.argv[2])
run_pipeline(fake_stages(tmp / "fake_recipe.py"), RunPaths(tmp / "run", tmp / "base"), env=dict(os.environ))
"""


def fake_stages(script: Path) -> list[Stage]:
    """a from the base, b from a's final/, c from b's final/."""
    def after(previous: str):
        return lambda p: ["--model-path", str(p.stage_dir(previous) / "final")]

    return [Stage("a", script, lambda p: ["--model-path", str(p.base_dir)], ("final/config.json",)),
            Stage("b", script, after("a"), ("final/config.json",), needs=("a",)),
            Stage("c", script, after("b"), ("final/config.json",), needs=("b",))]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(stages, paths, control(stage -> behaviour)); FAKE_CONTROL reaches the children through the environment."""
    script = tmp_path / "fake_recipe.py"
    script.write_text(FAKE_RECIPE)
    (tmp_path / "base").mkdir()
    monkeypatch.setenv("FAKE_CONTROL", str(tmp_path / "control.json"))

    def control(**behaviours):
        (tmp_path / "control.json").write_text(json.dumps(behaviours))

    return fake_stages(script), RunPaths(tmp_path / "run", tmp_path / "base"), control


def order(paths: RunPaths) -> list[str]:
    return (paths.run_dir / "order.txt").read_text().split()


def argv(paths: RunPaths, stage: str) -> list[str]:
    return json.loads((paths.stage_dir(stage) / "argv.json").read_text())


def run(stages, paths):
    run_pipeline(stages, paths, env=dict(os.environ))


def test_stages_run_in_order_each_from_the_previous_output(fake, capfd):
    stages, paths, _ = fake
    run_pipeline(stages, paths, extra_args={"b": ["--lr", "3"]}, env=dict(os.environ))
    assert order(paths) == ["a", "b", "c"]
    assert argv(paths, "a") == ["--output-dir", str(paths.stage_dir("a")), "--seed", "0",
                                "--model-path", str(paths.base_dir)]
    assert argv(paths, "b")[-4:] == ["--model-path", str(paths.stage_dir("a") / "final"), "--lr", "3"]
    assert argv(paths, "c")[-2:] == ["--model-path", str(paths.stage_dir("b") / "final")]
    done = json.loads((paths.stage_dir("b") / DONE).read_text())
    assert done["command"][1:] == [str(stages[1].script), *argv(paths, "b")] and not done["resumed"]
    assert done["seconds"] >= 0 and done["finished_at"]
    # Both streams reach the terminal and the stage's log.
    out, err = capfd.readouterr()
    assert "fake b on stdout" in out and "fake b on stderr" in err
    log = (paths.run_dir / "logs" / "b.log").read_text()
    assert "fake b on stdout" in log and "fake b on stderr" in log


def test_rerun_skips_finished_stages(fake, capsys):
    stages, paths, _ = fake
    run(stages, paths)
    done_before = (paths.stage_dir("a") / DONE).read_text()
    run(stages, paths)
    assert order(paths) == ["a", "b", "c"]
    assert (paths.stage_dir("a") / DONE).read_text() == done_before
    assert capsys.readouterr().out.count("skipped") == 3


def test_failed_stage_stops_the_pipeline_and_is_redone(fake):
    stages, paths, control = fake
    control(b="fail")
    with pytest.raises(PipelineError, match="b exited with status 3"):
        run(stages, paths)
    assert not (paths.stage_dir("b") / DONE).exists() and order(paths) == ["a", "b"]
    control()
    run(stages, paths)
    assert order(paths) == ["a", "b", "b", "c"]
    # The failed attempt had no checkpoint: moved aside (the fake recipe would refuse its directory), not resumed.
    assert (paths.run_dir / "interrupted" / "b-1" / "argv.json").is_file()
    assert "--resume" not in argv(paths, "b")


def test_exit_0_without_the_outputs_is_not_finished(fake):
    stages, paths, control = fake
    control(a="no-output")
    with pytest.raises(PipelineError, match="lacks final/config.json"):
        run(stages, paths)
    assert not (paths.stage_dir("a") / DONE).exists()


def test_a_stage_whose_dependency_has_not_finished_does_not_start(fake):
    stages, paths, _ = fake
    with pytest.raises(PipelineError, match="c needs b"):
        run(stages[2:], paths)
    assert not paths.stage_dir("c").exists()


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_pipeline_during(stage: str, tmp_path: Path, paths: RunPaths) -> None:
    """Start the pipeline in its own process, SIGKILL it once `stage` is running, and check the stage died too."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(Path(__file__).parent), str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not (paths.stage_dir(stage) / "started").is_file():
        assert driver.poll() is None and time.time() < deadline, "the pipeline ended before it was killed"
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    child = int((paths.stage_dir(stage) / "pid").read_text())
    while alive(child):  # PR_SET_PDEATHSIG: the stage goes with the pipeline
        assert time.time() < deadline, "the stage outlived the killed pipeline"
        time.sleep(0.05)


def test_killed_pipeline_redoes_the_interrupted_stage_only(fake, tmp_path):
    stages, paths, control = fake
    control(b="hang")
    kill_pipeline_during("b", tmp_path, paths)
    assert (paths.stage_dir("a") / DONE).is_file() and not (paths.stage_dir("b") / DONE).exists()
    control()
    run(stages, paths)
    assert order(paths) == ["a", "b", "b", "c"]
    assert (paths.run_dir / "interrupted" / "b-1" / "started").is_file()
    assert all((paths.stage_dir(s) / DONE).is_file() for s in "abc")


def test_killed_stage_with_a_checkpoint_is_resumed(fake, tmp_path):
    stages, paths, control = fake
    control(b="checkpoint-hang")
    kill_pipeline_during("b", tmp_path, paths)
    control()
    run(stages, paths)
    assert order(paths) == ["a", "b", "b", "c"]
    assert "--resume" in argv(paths, "b") and not (paths.run_dir / "interrupted").exists()
    assert json.loads((paths.stage_dir("b") / DONE).read_text())["resumed"]


def test_report_is_written_after_every_stage_that_ran(fake):
    stages, paths, control = fake
    seen = []
    control(c="fail")
    with pytest.raises(PipelineError):
        run_pipeline(stages, paths, env=dict(os.environ), report=lambda run_dir: seen.append(order(paths)))
    assert seen == [["a"], ["a", "b"]]


# --- the real stage table ---------------------------------------------------------------------------------------


CONFIG_SOURCES = ["recipes/build_pairs.py", "align/lora.py", "align/optimizers.py", "align/policy_worker.py",
                  "align/actors.py", "reward/worker.py", "rollout/scheduler.py"]
ROOTS = {"sft": ("recipes/sft.py", "SFTConfig"), "rm": ("recipes/reward_model.py", "RewardConfig"),
         "dpo": ("recipes/dpo.py", "DPOConfig"), "grpo": ("recipes/grpo.py", "GRPOConfig")}


def annotated_fields(path: str) -> dict[str, list[tuple[str, str]]]:
    """class name -> [(field, annotation source)] of the classes in one file."""
    tree = ast.parse((REPO / path).read_text())
    return {node.name: [(s.target.id, ast.unparse(s.annotation)) for s in node.body if isinstance(s, ast.AnnAssign)]
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def recipe_flags(stage: str) -> set[str]:
    """Every flag align.config generates for the stage's recipe: nested fields resolved in the recipe's own file
    first, then in the modules its configs import (build_pairs.SamplingArgs -> SamplingArgs)."""
    path, root = ROOTS[stage]
    own, shared = annotated_fields(path), {}
    for source in CONFIG_SOURCES:
        shared.update(annotated_fields(source))
    flags = set()

    def walk(fields, prefix):
        for name, annotation in fields:
            nested = annotation.rsplit(".", 1)[-1]
            found = own.get(nested) if annotation.count(".") == 0 and nested in own else shared.get(nested)
            if found is not None:
                walk(found, f"{prefix}{name}-")
            else:
                flags.add("--" + f"{prefix}{name}".replace("_", "-"))

    walk(own[root], "")
    return flags


def test_recipe_flags_reader_knows_the_recipes():
    assert {"--model-path", "--data-eval-path", "--eval-per-level", "--lora-r"} <= recipe_flags("sft")
    assert {"--optim-merge-variant", "--build-sampling-k", "--build-max-prompts", "--variants"} <= recipe_flags("dpo")
    assert {"--policy-model-path", "--reward-model-path", "--rollout-resources-num-actors"} <= recipe_flags("grpo")
    assert "--policy-model-path" not in recipe_flags("sft")


def default_paths(tmp_path: Path, **kwargs) -> RunPaths:
    return RunPaths(tmp_path / "run", tmp_path / "base", seed=3, **kwargs)


def test_default_stage_commands(tmp_path):
    p = default_paths(tmp_path)
    run, data = p.run_dir, p.base_dir / "data"
    commands = {s.name: stage_command(s, p)[1:] for s in STAGES}

    def head(stage, script):
        return [str(RECIPES / script), "--output-dir", str(run / stage), "--seed", "3"]

    assert commands["sft"] == head("sft", "sft.py") + [
        "--model-path", str(p.base_dir), "--data-path", str(data / "sft.jsonl"),
        "--data-eval-path", str(data / "eval.jsonl")]
    assert commands["rm"] == head("rm", "reward_model.py") + [
        "--model-path", str(run / "sft" / "final"), "--data-path", str(data / "pairs.jsonl"),
        "--data-eval-path", str(data / "pairs_eval.jsonl")]
    assert commands["dpo"] == head("dpo", "dpo.py") + [
        "--model-path", str(run / "sft" / "final"), "--model-base-path", str(p.base_dir)]
    assert commands["grpo"] == head("grpo", "grpo.py") + [
        "--policy-model-path", str(run / "sft" / "final"), "--reward-model-path", str(run / "rm" / "final"),
        "--data-prompts-path", str(data / "prompts.jsonl"), "--data-eval-path", str(data / "eval.jsonl")]
    assert all(Path(c[0]).is_file() for c in commands.values())


def test_every_flag_the_pipeline_passes_exists_in_its_recipe(tmp_path):
    p = default_paths(tmp_path)
    cfg = PipelineConfig()
    for stage in STAGES:
        extra = getattr(cfg, f"{stage.name}_args").split()
        flags = {a for a in stage_command(stage, p, extra, resume=True) if a.startswith("--")}
        assert flags <= recipe_flags(stage.name), (stage.name, flags - recipe_flags(stage.name))


def test_grpo_starts_from_the_chosen_dpo_variant(tmp_path):
    p = default_paths(tmp_path)
    dpo = p.stage_dir("dpo")
    dpo.mkdir(parents=True)
    assert grpo_start(p) == p.stage_dir("sft") / "final"  # DPO not finished
    (dpo / DONE).write_text("{}")
    (dpo / "report.json").write_text(json.dumps({"accuracy": {
        "SFT": {"overall": 0.9}, "DPO-AdamW": {"overall": 0.5}, "DPO-OnDARE": {"overall": 0.4},
        "DPO-OnTIES": {"overall": 0.6}}}))
    assert grpo_start(p) == dpo / "ondare" / "final"
    assert grpo_start(default_paths(tmp_path, grpo_policy="best")) == dpo / "onties" / "final"
    assert grpo_start(default_paths(tmp_path, grpo_policy="sft")) == p.stage_dir("sft") / "final"


def test_pipeline_config_command_line():
    cfg = parse_config(PipelineConfig, ["--stages", "sft,rm", "--seed", "2", "--grpo-args", "--steps 5",
                                        "--sft-args=--no-eval-enabled"])
    assert cfg.stages == ("sft", "rm") and cfg.seed == 2
    assert cfg.grpo_args == "--steps 5" and cfg.sft_args == "--no-eval-enabled"
    with pytest.raises(ValueError, match="stages"):
        PipelineConfig(stages=("sft", "ppo"))


# --- the report -----------------------------------------------------------------------------------------------


def eval_report(correct: dict[str, dict[int, int]], n: int = 4) -> dict:
    """align.evaluate.EvalReport.to_dict() after a JSON round trip (difficulty keys become strings)."""
    def by_level(value):
        return {family: {str(d): value(c) for d, c in levels.items()} for family, levels in correct.items()}

    total = sum(len(levels) for levels in correct.values()) * n
    return {"overall": sum(c for levels in correct.values() for c in levels.values()) / total,
            "accuracy": by_level(lambda c: c / n), "correct": by_level(lambda c: c), "total": by_level(lambda c: n)}


def pair_accuracy(correct: int, pairs: int) -> dict:
    """reward.evaluate.PairAccuracy.to_dict() with one subset."""
    return {"accuracy": correct / pairs, "pairs": pairs, "correct": correct, "ties": 0, "mean_margin": 0.5,
            "by_subset": {"arithmetic-correct": {"accuracy": correct / pairs, "correct": correct, "pairs": pairs}}}


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def fake_run(run: Path) -> None:
    """Stage directories as the recipes leave them, with made-up numbers."""
    write(run / "sft" / "eval.json", {"before": eval_report({"arithmetic": {1: 0, 2: 0}, "code": {1: 0}}),
                                      "after SFT": eval_report({"arithmetic": {1: 3, 2: 2}, "code": {1: 1}})})
    write(run / "rm" / "eval.json", {"before": pair_accuracy(2, 4), "after training": pair_accuracy(4, 4)})
    write(run / "dpo" / "report.json", {
        "accuracy": {"SFT": eval_report({"arithmetic": {1: 3, 2: 2}, "code": {1: 1}}),
                     "DPO-AdamW": eval_report({"arithmetic": {1: 4, 2: 2}, "code": {1: 1}}),
                     "DPO-OnDARE": eval_report({"arithmetic": {1: 4, 2: 3}, "code": {1: 1}})},
        "reference_likelihood": {"SFT": {"all": -0.25, "arithmetic": -0.2}, "DPO-AdamW": {"all": -0.3,
                                                                                          "arithmetic": -0.22},
                                 "DPO-OnDARE": {"all": -0.27, "arithmetic": -0.21}},
        "pairs": {"prompts": 10, "pairs": 6, "pairs_before_decontamination": 7, "counts": {}},
        "training_last_record": {v: {"loss": 0.6, "reward_accuracy": 0.7, "reward_margin": 0.1, "rewards_chosen": 0.05,
                                     "rewards_rejected": -0.05} for v in ("adamw", "ondare")},
        "seconds": {"build_pairs": 100.0, "train": {"adamw": 60.0, "ondare": 61.0}, "evaluate": 30.0, "total": 251.0},
        "models": {}})
    write(run / "grpo" / "eval.json", {"before GRPO": eval_report({"arithmetic": {1: 4, 2: 3}, "code": {1: 1}}),
                                       "after GRPO": eval_report({"arithmetic": {1: 4, 2: 4}, "code": {1: 2}}, n=4)})
    write(run / "grpo" / "metrics.jsonl", "".join(json.dumps(
        {"step": s, "reward_mean": s / 10, "accuracy": s / 20, "zero_variance_fraction": 0.5, "seconds_step": 9.0,
         "tokens_per_s": 900.0}) + "\n" for s in range(1, 6)))
    write(run / "sft" / "metrics.jsonl", "".join(json.dumps({"step": s * 10, "loss": 1.0, "tokens_per_s": 2000.0 + s})
                                                 + "\n" for s in (1, 2)))
    for stage, seconds in (("sft", 450.0), ("rm", 400.0), ("dpo", 251.0)):
        write(run / stage / DONE, {"stage": stage, "seconds": seconds, "finished_at": "2026-12-03T10:00:00+00:00",
                                   "resumed": stage == "rm", "command": []})
    write(run / "grpo" / DONE, {"stage": "grpo", "seconds": 300.0, "finished_at": "2026-12-03T11:00:00+00:00",
                                "resumed": False, "command": ["python", "grpo.py", "--policy-model-path", "RUN/x"]})


def test_report_accuracy_table_has_a_column_per_stage(tmp_path):
    fake_run(tmp_path)
    report = build_report(tmp_path)
    assert "| family | difficulty | n | base | SFT | DPO-AdamW | DPO-OnDARE | GRPO start | GRPO |" in report
    assert "| arithmetic | 1 | 4 | 0% | 75% | 100% | 100% | 100% | 100% |" in report
    assert "| arithmetic | 2 | 4 | 0% | 50% | 50% | 75% | 75% | 100% |" in report
    assert "| code | 1 | 4 | 0% | 25% | 25% | 25% | 25% | 50% |" in report
    assert "| all | | 12 | 0% | 50% | 58% | 67% | 67% | 83% |" in report
    assert "| arithmetic-correct | 4 | 50.0% | 100.0% |" in report  # reward model, before / after
    assert "| all | -0.250 | -0.300 | -0.270 |" in report  # DPO's alignment tax
    assert "| 5 | 0.500 | 0.250 | 0.500 | 9.000 |" in report  # GRPO's last step
    assert "| SFT | done | 450 | 2026-12-03T10:00:00+00:00 | 20 | 2,002 training tokens/s |" in report
    assert "| reward model | done, resumed | 400 |" in report
    assert "| total | | 1401 (23.4 min) |" in report
    assert "GRPO started from `RUN/x`." in report


def test_report_shows_each_stage_change_with_a_paired_test(tmp_path):
    """SFT gains 6 of 12 problems and loses none: p = 2 / 2^6 = 0.031, beyond chance. GRPO gains 2 and loses 1:
    p = 1. DPO's reports carry no per-problem verdicts (runs before they were kept): said so."""
    fake_run(tmp_path)
    with_verdicts = lambda report, passed: {**report, "passed": passed}  # noqa: E731
    sft = json.loads((tmp_path / "sft" / "eval.json").read_text())
    write(tmp_path / "sft" / "eval.json", {"before": with_verdicts(sft["before"], [False] * 12),
                                           "after SFT": with_verdicts(sft["after SFT"], [True] * 6 + [False] * 6)})
    grpo = json.loads((tmp_path / "grpo" / "eval.json").read_text())
    write(tmp_path / "grpo" / "eval.json", {
        "before GRPO": with_verdicts(grpo["before GRPO"], [True, True, False, False] + [False] * 8),
        "after GRPO": with_verdicts(grpo["after GRPO"], [True, False, True, True] + [False] * 8)})
    # Sampled: 4 answers per problem, 6 problems; 5 answered right more often after, 1 less: p = 2 * 7/64.
    sampled = lambda passed: {**grpo["before GRPO"], "passed": passed, "answers_per_problem": 4,  # noqa: E731
                              "temperature": 1.0}
    write(tmp_path / "grpo" / "eval_sampled.json", {"before GRPO": sampled([0, 1, 2, 0, 3, 2]),
                                                    "after GRPO": sampled([1, 2, 4, 3, 2, 4])})
    report = build_report(tmp_path)
    assert "| SFT | base → SFT | 12 | 0% | 50% | 6 | 0 | 0.031 | yes |" in report
    assert "| GRPO | GRPO start → GRPO | 12 | 17% | 25% | 2 | 1 | 1.000 | no |" in report
    # 8 of 24 answers right before, 16 after.
    assert ("| GRPO, 4 samples at T 1, levels trained on | GRPO start → GRPO | 6 | 33% | 67% | 5 | 1 | 0.219 | no |"
            in report)
    assert "| DPO | SFT → DPO-AdamW | | 50% | 58% | | | | per-problem verdicts not recorded |" in report


def test_accuracy_table_marks_columns_measured_on_other_counts():
    columns = {"SFT": eval_report({"arithmetic": {1: 2}}, n=4), "GRPO": eval_report({"arithmetic": {1: 1, 2: 1}},
                                                                                    n=2)}
    table = format_accuracy(columns)
    assert "| arithmetic | 1 | 4 | 50% | 50% (n=2) |" in table
    assert "| arithmetic | 2 | 2 | – | 50% |" in table


def test_partial_report_and_files(tmp_path):
    write(tmp_path / "sft" / "eval.json", {"before": eval_report({"code": {1: 0}}),
                                           "after SFT": eval_report({"code": {1: 2}})})
    write(tmp_path / "sft" / DONE, {"stage": "sft", "seconds": 5.0, "finished_at": "t", "resumed": False,
                                    "command": []})
    (tmp_path / "grpo").mkdir()
    out = write_report(tmp_path)
    report = (out / "report.md").read_text()
    assert "| code | 1 | 4 | 0% | 50% |" in report and report.count("Not run yet.") == 3
    assert "| GRPO | unfinished |" in report and "| reward model | not run |" in report
    assert (out / "accuracy.png").stat().st_size > 0 and "![Held-out accuracy after each stage](accuracy.png)" in report
    page = (out / "report.html").read_text()
    assert '<img src="accuracy.png"' in page and "<th>family</th>" in page and '<td class="r">50%</td>' in page


def test_markdown_to_html():
    page = markdown_to_html("# T\n\nSome `code` & **bold**\ntext.\n\n- one\n- two\n\n| a | b |\n|---|---:|\n| x | 1 |\n"
                            "\n![cap](p.png)\n", "title")
    assert "<h1>T</h1>" in page and "<p>Some <code>code</code> &amp; <strong>bold</strong> text.</p>" in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    assert '<table><tr><th>a</th><th class="r">b</th></tr><tr><td>x</td><td class="r">1</td></tr></table>' in page
    assert '<p><img src="p.png" alt="cap"></p>' in page and "<style>" in page


def test_launcher_starts_the_deepspeed_stages_and_data_dir_moves_the_data(tmp_path):
    launcher = ("accelerate", "launch", "--config_file", "z.yaml")
    p = default_paths(tmp_path, data_dir=tmp_path / "data", launcher=launcher)
    commands = {s.name: stage_command(s, p) for s in STAGES}
    for name in ("sft", "rm", "dpo"):
        assert tuple(commands[name][:4]) == launcher, name
    assert commands["grpo"][0] == sys.executable  # its ranks are Ray actors
    assert str(tmp_path / "data" / "sft.jsonl") in commands["sft"]
    assert str(tmp_path / "data" / "prompts.jsonl") in commands["grpo"]


def test_dpo_trained_as_one_run_finishes_the_stage_and_starts_grpo(fake, tmp_path):
    _, paths, _ = fake
    script = tmp_path / "fake_recipe.py"  # writes final/config.json, never report.json
    dpo = next(s for s in STAGES if s.name == "dpo")
    run_pipeline([Stage("dpo", script, lambda p: [], dpo.outputs, dpo.other_outputs)], paths, env=dict(os.environ))
    assert paths.finished("dpo")
    assert grpo_start(paths) == paths.stage_dir("dpo") / "final"


def test_the_7b_pipeline_preset_parses_and_its_stage_presets_exist():
    cfg = parse_config(PipelineConfig, ["--config", str(REPO / "recipes/configs/pipeline/qwen2.5-7b.yaml")])
    assert cfg.base_model_path and cfg.data_dir and cfg.launcher.startswith("accelerate launch")
    for name in STAGE_NAMES_WITH_PRESETS:
        args = getattr(cfg, f"{name}_args").split()
        preset = REPO / args[args.index("--config") + 1]
        assert preset.is_file(), preset
    launcher_config = cfg.launcher.split()[cfg.launcher.split().index("--config_file") + 1]
    assert (REPO / launcher_config).is_file()


STAGE_NAMES_WITH_PRESETS = ("sft", "rm", "dpo", "grpo")
