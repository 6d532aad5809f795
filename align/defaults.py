"""The embedded default's models, built once per machine and cached: the pretrained tiny base, then its SFT model.

Every recipe run with no model path starts from the previous stage of the report's pipeline, as a real run would:
SFT from the base model, DPO and the reward model from the SFT model, GRPO from the SFT model. Building a stage
takes minutes on 2 CPU cores, so each is built the first time a recipe needs it, into

    $QWEN_ALIGN_CACHE (default ~/.cache/qwen-align)/tiny-base-<key>/     build_tiny + align.pretrain
    $QWEN_ALIGN_CACHE/tiny-sft-<key>/final/                              recipes/sft.py's embedded default run
    $QWEN_ALIGN_CACHE/tiny-rm-<key>/final/                               recipes/reward_model.py's default run

where <key> changes whenever what the stage or a stage before it is built from changes (STAGE_VERSIONS, the seed). A
build happens in a temporary sibling directory that is renamed into place when complete, under a file lock, so
an interrupted build leaves nothing half-made and two processes never build the same stage at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

STAGE_VERSIONS = {"base": 3, "sft": 3, "rm": 3}
"""Bump a stage's number when what builds it changes (base: the tiny model, its tasks, its pretraining; sft, rm:
their recipe's defaults). That stage and every later one are then rebuilt; earlier ones stay cached."""

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_ALIGN_CACHE", Path.home() / ".cache" / "qwen-align"))


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stage_name(stage: str, seed: int) -> str:
    """`tiny-sft-v2.3-seed0`: the versions of this stage and of every stage before it, so a rebuilt base is never
    paired with an SFT model trained from the old one."""
    stages = list(STAGE_VERSIONS)
    versions = ".".join(str(STAGE_VERSIONS[s]) for s in stages[: stages.index(stage) + 1])
    return f"tiny-{stage}-v{versions}-seed{seed}"


def base_model_path(seed: int = 0) -> Path:
    """Where the pretrained tiny base model is cached (built or not)."""
    return cache_dir() / stage_name("base", seed)


def base_model_dir(seed: int = 0) -> Path:
    """The pretrained tiny base model (with its tokenizer and task data in data/), built if missing."""
    target = base_model_path(seed)
    with _locked(target):
        if not (target / "config.json").is_file():
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # a build killed before it could clean up
                shutil.rmtree(stale, ignore_errors=True)
            print(f"building the embedded default's base model into {target} (once per machine)", flush=True)
            build_base(target, seed)
    return target


def build_base(output_dir: Path, seed: int = 0, tasks=None, args=None) -> Path:
    """build_tiny's random initialisation, then align.pretrain's plain-text pretraining; atomic. `tasks` and
    `args` (TaskDataConfig, PretrainArgs) default to the embedded default's."""
    from align.model import load_pretrained
    from align.pretrain import PretrainArgs, base_documents, pretrain, tokenize_documents
    from align.tasks import TaskDataConfig
    from align.tiny import build_tiny
    from align.tokenizer import load_tokenizer

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-") as tmp:
        staging = Path(tmp) / "model"
        tasks, args = tasks or TaskDataConfig(), args or PretrainArgs()
        build_tiny(staging, seed=seed, tasks=tasks)
        examples = tokenize_documents(base_documents(tasks, seed, args), load_tokenizer(staging))
        model = load_pretrained(staging)
        pretrain(model, examples, args, seed=seed)
        model.save_pretrained(staging)  # overwrites the random initialisation's weights only
        staging.rename(output_dir)
    return output_dir


def single_process_env() -> dict[str, str]:
    """This process's environment without what a launcher (accelerate, torchrun, DeepSpeed) set for its ranks, so
    a child started from one rank runs as a lone process instead of trying to join the rank's group."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE", "TORCHELASTIC_RUN_ID")
    prefixes = ("ACCELERATE_", "TORCHELASTIC_")
    return {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(prefixes)}


def sft_model_dir(seed: int = 0) -> Path:
    """The embedded default's SFT model (a HF directory), built if missing by running recipes/sft.py."""
    return _recipe_output("sft", "sft.py", seed, base_model_dir)


def reward_model_dir(seed: int = 0) -> Path:
    """The embedded default's reward model (trained from the SFT model), built if missing."""
    return _recipe_output("rm", "reward_model.py", seed, sft_model_dir)


def _recipe_output(stage: str, recipe: str, seed: int, needs) -> Path:
    """OUTPUT/final of the recipe's embedded default run, cached; `needs(seed)` builds the stage before it."""
    run_dir = cache_dir() / stage_name(stage, seed)
    final = run_dir / "final"
    if (final / "config.json").is_file():
        return final
    needs(seed)  # outside this stage's lock: the earlier stage takes its own
    with _locked(run_dir):
        if not (final / "config.json").is_file():
            print(f"building the embedded default's {stage} model into {run_dir} (once per machine)", flush=True)
            staging = run_dir.with_name(f".{run_dir.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            # A child process of its own: a recipe sets up accelerate, which must not leak into the caller.
            subprocess.run([sys.executable, str(RECIPES / recipe), "--output-dir", str(staging), "--seed", str(seed)],
                           check=True, env=single_process_env())
            shutil.rmtree(run_dir, ignore_errors=True)
            staging.rename(run_dir)
    return final
