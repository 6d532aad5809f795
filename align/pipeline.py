"""The main job: SFT, reward model, DPO with the Online Merging Optimizer, then GRPO, in one command, and its report.

    python -m align.pipeline                                     # the embedded default, into outputs/pipeline
    python -m align.pipeline --output-dir runs/a --seed 1 --grpo-args "--steps 10 --data-max-prompts 100"
    python -m align.pipeline --stages sft,rm                     # only these now; the rest on a later call
    python -m align.pipeline --sft-args=--no-eval-enabled        # one flag alone needs '=' (it starts with --)

Every stage is its own recipe (recipes/*.py, which also runs alone) started as a child process from the previous
stage's checkpoint: SFT from the embedded default's pretrained base (align.defaults, built once per machine), the
reward model from the SFT model, DPO from the SFT model (building rejection-sampled pairs with it and training
AdamW, OnDARE and OnTIES side by side), GRPO from the DPO model (`--grpo-policy`, OnDARE by default) with the
reward model and the task verifiers, queries ordered by reward variance. `--STAGE-args` is appended to that
stage's command line, after what the pipeline passes, so it can override anything.

Run directory (RUN = --output-dir):

    RUN/sft/, RUN/rm/, RUN/grpo/   each stage's recipe run directory (final/, eval.json, metrics.jsonl, ...)
    RUN/dpo/                       recipes/dpo.py's embedded default: pairs/, adamw/, ondare/, onties/, report.json
    RUN/<stage>/.done              written once the stage exited 0 with its outputs: seconds, finished_at, command
    RUN/logs/<stage>.log           the stage's stdout and stderr (also streamed to the terminal), attempts appended
    RUN/interrupted/<stage>-N/     an unfinished attempt that --resume cannot continue, moved aside (never deleted)
    RUN/report/                    report.md, report.html and PNG plots (align.report), rebuilt after every stage
    RUN/base.json                  which base model the run started from
    RUN/pipeline.yaml              the resolved config of the latest invocation

Resuming: run the same command again. Finished stages (a .done file) are skipped and never written to. An
unfinished stage whose directory holds a checkpoint is continued with the recipe's --resume; otherwise its
directory is moved aside and the stage starts over (recipes refuse a directory holding another run, see
align.run.refuse_other_runs). A stage child dies with the pipeline (Ctrl-C, SIGTERM, even SIGKILL), so a rerun
never races an orphan.

Time budget (the issue: set-up plus the whole pipeline in at most 30 minutes on the 2-core machine). The recipes'
own defaults take ~45 min in all; the per-stage defaults below trim SFT's evaluation to 25 problems per level, RM
to 0.6 epoch, DPO to 350 prompts and GRPO to 8 steps. Measured from a fresh machine with no caches (Intel Xeon,
2026-12-04 afternoon): set-up 1.5 min, base model 3.9 min (once per machine), SFT 2.8, RM 1.6, DPO 2.3, GRPO 3.7
min: the pipeline 14.2 min, 15.8 with set-up. The same 2-core VMs have been up to 2.5x slower: on an AMD EPYC
(2026-12-06) set-up 2.7, base 7.0, SFT 5.3, RM 2.9, DPO 4.0, GRPO 6.7 min, 28.7 min with set-up, and GRPO 4.9
min since its reward model scores only verified answers; earlier runs took 33-39 min there.

Real models: `--base-model-path` (e.g. Qwen2.5-7B), `--data-dir` (the stages' data files), `--launcher` (how the
DeepSpeed stages start: `accelerate launch --config_file ...` on GPUs) and each stage's preset in --STAGE-args;
recipes/configs/pipeline/qwen2.5-7b.yaml puts them together (not run here: no GPU).
"""

from __future__ import annotations

import codecs
import ctypes
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Literal

from align.config import parse_config, save_config
from align.defaults import RECIPES, base_model_path, single_process_env
from align.files import write_text_atomic

DONE = ".done"
STAGE_NAMES = ("sft", "rm", "dpo", "grpo")
DPO_VARIANTS = ("adamw", "ondare", "onties")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole post-training pipeline (SFT, reward model, DPO with online merging, GRPO) and its report."""

    output_dir: str = "outputs/pipeline"
    """Run directory: one subdirectory per stage, logs/, report/."""
    seed: int = 0
    """Seed given to every recipe (and of the embedded default's base model)."""
    stages: tuple[str, ...] = STAGE_NAMES
    """Stages to run (always in pipeline order); finished ones are skipped."""
    grpo_policy: Literal["ondare", "adamw", "onties", "best", "sft"] = "ondare"
    """GRPO's starting policy: that DPO variant's final model, the DPO variant with the best held-out accuracy,
    or the SFT model (also used when DPO has not run)."""
    sft_args: str = "--eval-per-level 25"
    """Extra recipes/sft.py flags (default: evaluate 25 problems per level, as DPO and GRPO do)."""
    rm_args: str = "--optim-epochs 0.6"
    """Extra recipes/reward_model.py flags (default: 0.6 of an epoch, for the time budget)."""
    dpo_args: str = "--build-max-prompts 350"
    """Extra recipes/dpo.py flags (default: sample pairs from 350 prompts, for the time budget)."""
    grpo_args: str = "--steps 8 --data-eval-samples 8"
    """Extra recipes/grpo.py flags (default: 8 of the recipe's 15 steps of 64 hard-level queries, and 8 sampled
    answers per held-out problem instead of 16, for the time budget)."""
    base_model_path: str = ""
    """The base model SFT starts from and DPO's task vector is taken against (a Hugging Face directory, e.g.
    Qwen2.5-7B). Empty: the embedded default's, built once per machine."""
    data_dir: str = ""
    """The stages' data: sft.jsonl, eval.jsonl, pairs.jsonl, pairs_eval.jsonl, prompts.jsonl (align.tasks
    formats; a stage's --STAGE-args can point elsewhere). Empty: BASE/data, the embedded default's tasks."""
    launcher: str = ""
    """Command that starts the DeepSpeed stages (SFT, reward model, DPO) in place of `python`, e.g. `accelerate
    launch --config_file recipes/configs/accelerate/zero3_gpu.yaml` on an 8-GPU node. Empty: one process (the
    CPU default). GRPO always runs under python: its ranks are Ray actors placed by its config."""

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown or not self.stages:
            raise ValueError(f"stages={self.stages}: each must be one of {', '.join(STAGE_NAMES)}")


class PipelineError(RuntimeError):
    """A stage failed, lacks its outputs, or cannot start yet; the message says which and where its log is."""


# --- the stages -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a pipeline run's inputs and stages live; what a stage's command line is built from."""

    run_dir: Path
    """The run directory (absolute)."""
    base_dir: Path
    """The base model SFT starts from."""
    seed: int = 0
    """Seed given to every recipe."""
    grpo_policy: str = "ondare"
    """PipelineConfig.grpo_policy."""
    data_dir: Path | None = None
    """The stages' data files; None: base_dir/data (the embedded default keeps its tasks there)."""
    launcher: tuple[str, ...] = ()
    """PipelineConfig.launcher, split; empty: launched stages run under this Python too."""

    @property
    def data(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.base_dir / "data"

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def finished(self, name: str) -> bool:
        return (self.stage_dir(name) / DONE).is_file()


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a recipe script and what tells the pipeline it finished."""

    name: str
    """Also the stage's directory under the run directory and its --STAGE-args field."""
    script: Path
    """The recipe, run as `python SCRIPT --output-dir RUN/NAME --seed S INPUTS [--resume] EXTRA`."""
    inputs: Callable[[RunPaths], list[str]]
    """The flags giving the recipe its starting model(s) and data, from the base model and earlier stages."""
    outputs: tuple[str, ...]
    """Paths under the stage directory that must exist after exit status 0 for the stage to count as finished."""
    other_outputs: tuple[str, ...] = ()
    """Another set that also counts as finished (DPO given --data-path trains one model into final/ instead of
    the comparison's report.json and sub-runs)."""
    needs: tuple[str, ...] = ()
    """Stages that must have finished before this one starts."""
    resume_marker: str = "checkpoint-*/trainer_state.json"
    """Glob under the stage directory: a match is an interrupted attempt the recipe's --resume continues."""
    launched: bool = False
    """A DeepSpeed script, started through RunPaths.launcher when one is set (accelerate launch on GPUs)."""


def sft_inputs(p: RunPaths) -> list[str]:
    data = p.data
    return ["--model-path", str(p.base_dir), "--data-path", str(data / "sft.jsonl"),
            "--data-eval-path", str(data / "eval.jsonl")]


def rm_inputs(p: RunPaths) -> list[str]:
    # Given --model-path, the recipe looks for its pairs in MODEL/data, which an exported final/ lacks.
    data = p.data
    return ["--model-path", str(p.stage_dir("sft") / "final"), "--data-path", str(data / "pairs.jsonl"),
            "--data-eval-path", str(data / "pairs_eval.jsonl")]


def dpo_inputs(p: RunPaths) -> list[str]:
    # No --data-path: recipes/dpo.py's comparison, which builds its pairs with the SFT model, then trains AdamW,
    # OnDARE and OnTIES from it (tau = theta_SFT - theta_base) and writes report.json.
    return ["--model-path", str(p.stage_dir("sft") / "final"), "--model-base-path", str(p.base_dir)]


def grpo_inputs(p: RunPaths) -> list[str]:
    data = p.data
    return ["--policy-model-path", str(grpo_start(p)), "--reward-model-path", str(p.stage_dir("rm") / "final"),
            "--data-prompts-path", str(data / "prompts.jsonl"), "--data-eval-path", str(data / "eval.jsonl")]


def grpo_start(p: RunPaths) -> Path:
    """GRPO's starting policy: the chosen DPO variant's final model (DPO's own final/ when it trained one model),
    or the SFT model when DPO has not run."""
    if p.grpo_policy == "sft" or not p.finished("dpo"):
        return p.stage_dir("sft") / "final"
    if (p.stage_dir("dpo") / "final" / "config.json").is_file():
        return p.stage_dir("dpo") / "final"
    variant = best_dpo_variant(p.stage_dir("dpo")) if p.grpo_policy == "best" else p.grpo_policy
    return p.stage_dir("dpo") / variant / "final"


def best_dpo_variant(dpo_dir: Path) -> str:
    """The DPO variant with the highest overall held-out accuracy in report.json (the first one on a tie)."""
    accuracy = json.loads((dpo_dir / "report.json").read_text())["accuracy"]
    scores = {name.removeprefix("DPO-").lower(): r["overall"] for name, r in accuracy.items() if name != "SFT"}
    return max(scores, key=scores.get)


STAGES = (
    # eval.json is not required: real-model presets turn the synthetic-task evaluation off (the report then
    # leaves those columns out).
    Stage("sft", RECIPES / "sft.py", sft_inputs, ("final/config.json",), launched=True),
    Stage("rm", RECIPES / "reward_model.py", rm_inputs, ("final/config.json",), needs=("sft",), launched=True),
    # The embedded default's sub-runs hold the checkpoints, and its --resume continues each unfinished one and
    # reuses built pairs: a claimed run directory (config.yaml) is worth resuming.
    Stage("dpo", RECIPES / "dpo.py", dpo_inputs, ("report.json",), ("final/config.json",), needs=("sft",),
          resume_marker="config.yaml", launched=True),
    Stage("grpo", RECIPES / "grpo.py", grpo_inputs, ("final/config.json",), needs=("sft", "rm")),
)


def stage_command(stage: Stage, p: RunPaths, extra: Sequence[str] = (), resume: bool = False) -> list[str]:
    """The stage's child command line; `extra` goes last so that it overrides what the pipeline passes."""
    start = list(p.launcher) if stage.launched and p.launcher else [sys.executable]
    return [*start, str(stage.script), "--output-dir", str(p.stage_dir(stage.name)), "--seed", str(p.seed),
            *stage.inputs(p), *(["--resume"] if resume else []), *extra]


# --- running -------------------------------------------------------------------------------------------------


def run_pipeline(stages: Sequence[Stage], paths: RunPaths, extra_args: dict[str, list[str]] | None = None,
                 env: dict[str, str] | None = None, report: Callable[[Path], object] | None = None) -> None:
    """Run the unfinished `stages` in order in paths.run_dir, skipping finished ones.

    Args:
        extra_args: stage name -> flags appended to its command line.
        env: the children's environment (default: align.defaults.single_process_env()).
        report: called with the run directory after every stage that ran (errors only warn there: the stage is
            done) and once at the end (errors propagate).

    Raises:
        PipelineError: a stage failed, lacks its outputs, or needs a stage that has not finished.
    """
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    env = single_process_env() if env is None else env
    with run_lock(paths.run_dir):
        for stage in stages:
            if paths.finished(stage.name):
                done = json.loads((paths.stage_dir(stage.name) / DONE).read_text())
                print(f"== {stage.name}: finished earlier ({done['seconds']:.0f} s), skipped", flush=True)
                continue
            missing = [name for name in stage.needs if not paths.finished(name)]
            if missing:
                raise PipelineError(f"{stage.name} needs {', '.join(missing)} to have finished in {paths.run_dir}")
            run_stage(stage, paths, (extra_args or {}).get(stage.name, []), env)
            if report is not None:
                try_partial_report(report, paths.run_dir)
        if report is not None:
            report(paths.run_dir)


def run_stage(stage: Stage, paths: RunPaths, extra: Sequence[str], env: dict[str, str]) -> None:
    """Run one stage (resumed if its directory allows it, else from a fresh directory), then mark it done."""
    out = paths.stage_dir(stage.name)
    resume = out.is_dir() and any(out.glob(stage.resume_marker))
    if not resume:
        move_aside(out, paths.run_dir / "interrupted")
    command = stage_command(stage, paths, extra, resume)
    log = paths.run_dir / "logs" / f"{stage.name}.log"
    print(f"== {stage.name}: {'resuming' if resume else 'starting'} (log: {log})\n{shlex.join(command)}", flush=True)
    tic = time.perf_counter()
    status = run_teed(command, log, env)
    seconds = time.perf_counter() - tic
    if status != 0:
        raise PipelineError(f"{stage.name} exited with status {status} after {seconds:.0f} s; see {log}")
    missing = [name for name in stage.outputs if not (out / name).exists()]
    if missing and stage.other_outputs and all((out / name).exists() for name in stage.other_outputs):
        missing = []
    if missing:
        raise PipelineError(f"{stage.name} exited 0 but {out} lacks {', '.join(missing)}; see {log}")
    write_json(out / DONE, {"stage": stage.name, "seconds": seconds, "finished_at": now(), "resumed": resume,
                            "command": command})
    print(f"== {stage.name}: finished in {seconds:.0f} s", flush=True)


def move_aside(out: Path, graveyard: Path) -> None:
    """An unfinished attempt's directory goes to graveyard/NAME-N, kept for its logs and metrics."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    graveyard.mkdir(parents=True, exist_ok=True)
    n = 1
    while (graveyard / f"{out.name}-{n}").exists():
        n += 1
    out.rename(graveyard / f"{out.name}-{n}")
    print(f"== {out.name}: an unfinished attempt without a checkpoint moved to {graveyard / f'{out.name}-{n}'}")


def try_partial_report(report: Callable[[Path], object], run_dir: Path) -> None:
    """The report after a stage: a failure is shown, not raised, since the stage itself finished."""
    try:
        report(run_dir)
    except Exception as error:  # a broken partial report must not stop the pipeline
        print(f"warning: the partial report failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


@contextmanager
def run_lock(run_dir: Path):
    """One pipeline per run directory at a time (children do not inherit the lock: close_fds)."""
    with open(run_dir / ".pipeline.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another pipeline is running in {run_dir}") from None
        yield


def run_teed(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run `command`, its stdout and stderr streamed to ours and appended to `log_path`; returns its status.

    If the pipeline is interrupted meanwhile (Ctrl-C, SIGTERM turned into SystemExit by main), the child is
    stopped before the exception goes on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {now()} {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=partial(die_with_parent, os.getpid()))
        lock = threading.Lock()
        pumps = [threading.Thread(target=pump, args=(src, sink, log, lock), daemon=True)
                 for src, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for thread in pumps:
            thread.start()
        try:
            status = proc.wait()
        except BaseException:
            stop(proc)
            raise
        finally:
            # A daemon the child left behind (Ray's, say) may hold the pipes open: do not wait for it forever.
            for thread in pumps:
                thread.join(timeout=10)
    return status


def pump(source, sink, log, lock: threading.Lock) -> None:
    """Copy a child's stream to `sink` and the log as it arrives (chunks, not lines: tqdm redraws with \\r)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(source.fileno(), 1 << 16):
        with lock:
            log.write(chunk)
            log.flush()
        sink.write(decoder.decode(chunk))
        sink.flush()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Looked up once here: between fork and exec the child should do as little as possible.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In the child before exec: Linux sends it SIGTERM when the pipeline dies, even by SIGKILL, so that no stage
    keeps writing into a directory a rerun is about to move aside or resume."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the pipeline died before prctl took effect
            os._exit(1)


def write_json(path: Path, data: dict) -> None:
    """Atomically: a .done file is either whole or absent."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the base model and main -----------------------------------------------------------------------------------


_BUILD_BASE = "import sys; from align.defaults import base_model_dir; base_model_dir(int(sys.argv[1]))"


def ensure_base_model(seed: int, run_dir: Path) -> Path:
    """The embedded default's base model in the machine's cache; built first if missing (once per machine: seconds
    with the shipped pretrained weights, ~10 min pretraining anew, see align.defaults), in a child process logged
    to RUN/logs/base.log like a stage."""
    target = base_model_path(seed)
    if not (target / "config.json").is_file():
        print(f"== base: building the embedded default's base model into {target} (once per machine)", flush=True)
        tic = time.perf_counter()
        status = run_teed([sys.executable, "-c", _BUILD_BASE, str(seed)], run_dir / "logs" / "base.log",
                          single_process_env())
        if status != 0:
            raise PipelineError(f"building the base model exited with status {status}; see {run_dir}/logs/base.log")
        write_json(run_dir / "base.json", {"path": str(target), "seconds": time.perf_counter() - tic})
    elif not (run_dir / "base.json").is_file():
        write_json(run_dir / "base.json", {"path": str(target), "seconds": None})  # built before this run
    return target


def main(cfg: PipelineConfig) -> None:
    from align.report import write_report

    run_dir = Path(cfg.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "pipeline.yaml")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stops the running stage too
    if cfg.base_model_path:
        base = Path(cfg.base_model_path).resolve()
        if not (base / "config.json").is_file():
            raise PipelineError(f"base_model_path {base}: no config.json there (expected a Hugging Face model)")
        write_json(run_dir / "base.json", {"path": str(base), "seconds": None})
    else:
        base = ensure_base_model(cfg.seed, run_dir)
    paths = RunPaths(run_dir, base, cfg.seed, cfg.grpo_policy,
                     Path(cfg.data_dir).resolve() if cfg.data_dir else None, tuple(shlex.split(cfg.launcher)))
    stages = [stage for stage in STAGES if stage.name in cfg.stages]
    extra = {name: shlex.split(getattr(cfg, f"{name}_args")) for name in STAGE_NAMES}
    run_pipeline(stages, paths, extra, report=write_report)
    print(f"report: {run_dir / 'report' / 'report.md'} and report.html", flush=True)


if __name__ == "__main__":
    config = parse_config(PipelineConfig, description=__doc__)
    try:
        main(config)
    except PipelineError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to resume")
