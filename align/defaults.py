"""The embedded default's models, built once per machine and cached: the pretrained tiny base, then its SFT model.

Every recipe run with no model path starts from the previous stage of the report's pipeline, as a real run would:
SFT from the base model, DPO and the reward model from the SFT model, GRPO from the SFT model. Building a stage
takes minutes on 2 CPU cores, so each is built the first time a recipe needs it, into

    $QWEN_ALIGN_CACHE (default ~/.cache/qwen-align)/tiny-base-<key>/     build_tiny + shipped or new pretraining
    $QWEN_ALIGN_CACHE/tiny-sft-<key>/final/                              recipes/sft.py's embedded default run
    $QWEN_ALIGN_CACHE/tiny-rm-<key>/final/                               recipes/reward_model.py's default run

where <key> changes whenever what the stage or a stage before it is built from changes (STAGE_VERSIONS, the seed). A
build happens in a temporary sibling directory that is renamed into place when complete, under a file lock, so
an interrupted build leaves nothing half-made and two processes never build the same stage at once.

The base model's pretraining takes ~10 minutes here, as long as SFT and the reward model together, and a user
starts post-training from a pretrained base, as the report does from Qwen2.5's. So the repository ships the
weights align.pretrain produced for seed 0 (align/assets/<base name>/, with the hashes of the tokenizer, config
and task data they were trained on): build_base writes the tokenizer, config and data with build_tiny (seconds),
and takes the shipped weights only when those files hash exactly as recorded; otherwise it pretrains anew.
`python -m align.defaults rebuild-base` pretrains anew and compares with the shipped weights; `--ship` replaces them.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
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
SHIPPED_BASES = Path(__file__).resolve().parent / "assets"
"""Shipped pretrained base weights: SHIPPED_BASES/<stage_name("base", seed)>/{model.safetensors,provenance.json}."""


def shipped_base_dir(seed: int = 0) -> Path:
    """Where the shipped weights of this seed's base (the current STAGE_VERSIONS) are, or would be."""
    return SHIPPED_BASES / stage_name("base", seed)


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


def build_base(output_dir: Path, seed: int = 0, tasks=None, args=None, pretrain_anew: bool = False) -> Path:
    """build_tiny's tokenizer, config, task data and random initialisation, then the weights of align.pretrain's
    plain-text pretraining: the shipped ones where they fit (see the module docstring), else trained here
    (`pretrain_anew` forces it); atomic. `tasks` and `args` (TaskDataConfig, PretrainArgs) default to the embedded
    default's; with others given it always pretrains."""
    from align.model import load_pretrained
    from align.pretrain import PretrainArgs, base_documents, pretrain, tokenize_documents
    from align.tasks import TaskDataConfig
    from align.tiny import build_tiny
    from align.tokenizer import load_tokenizer

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-") as tmp:
        staging = Path(tmp) / "model"
        use_shipped = not (tasks or args or pretrain_anew)
        tasks, args = tasks or TaskDataConfig(), args or PretrainArgs()
        build_tiny(staging, seed=seed, tasks=tasks)
        mismatch = shipped_mismatch(staging, seed) if use_shipped else "not asked for"
        if mismatch is None:
            shipped = shipped_base_dir(seed) / "model.safetensors"
            print(f"taking the shipped pretrained weights {shipped}", flush=True)
            shutil.copyfile(shipped, staging / "model.safetensors")
        else:
            if use_shipped:
                print(f"not taking the shipped pretrained weights ({mismatch}): pretraining anew (~10 min)",
                      flush=True)
            examples = tokenize_documents(base_documents(tasks, seed, args), load_tokenizer(staging))
            model = load_pretrained(staging)
            pretrain(model, examples, args, seed=seed)
            model.save_pretrained(staging)  # overwrites the random initialisation's weights only
        staging.rename(output_dir)
    return output_dir


def shipped_mismatch(model_dir: Path, seed: int = 0) -> str | None:
    """Why the shipped pretrained weights of this seed's base (the current STAGE_VERSIONS) do not fit `model_dir`,
    a build_tiny output; None when they were trained on exactly its tokenizer, config and task data."""
    shipped = shipped_base_dir(seed)
    if not (shipped / "model.safetensors").is_file():
        return f"none shipped for {shipped.name}"
    provenance = json.loads((shipped / "provenance.json").read_text())
    if provenance["weights_sha256"] != _sha256(shipped / "model.safetensors"):
        return f"{shipped}/model.safetensors does not hash as its provenance.json records"
    recorded, current = provenance["inputs_sha256"], _input_hashes(model_dir)
    differ = sorted(name for name in recorded.keys() | current.keys() if recorded.get(name) != current.get(name))
    return f"they were trained on another {', '.join(differ)}" if differ else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _input_hashes(base_dir: Path) -> dict[str, str]:
    """sha256 of every file of a base model directory but its weights: what pretraining was given."""
    return {str(p.relative_to(base_dir)): _sha256(p) for p in sorted(base_dir.rglob("*"))
            if p.is_file() and p.name != "model.safetensors"}


def ship_base(base_dir: Path, seed: int = 0) -> Path:
    """Copy a pretrained base's weights into the repository with the hashes of what they were trained on."""
    target = shipped_base_dir(seed)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_dir / "model.safetensors", target / "model.safetensors")
    provenance = {"stage": target.name,
                  "made_by": "align.pretrain with PretrainArgs() defaults (python -m align.defaults rebuild-base)",
                  "weights_sha256": _sha256(base_dir / "model.safetensors"), "inputs_sha256": _input_hashes(base_dir)}
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return target


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the embedded default's base model by pretraining anew.")
    parser.add_argument("command", choices=["rebuild-base"])
    parser.add_argument("--seed", type=int, default=0, help="the base model's seed")
    parser.add_argument("--output-dir", type=Path, required=True, help="directory to create")
    parser.add_argument("--ship", action="store_true", help="replace the shipped weights with the new ones")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    build_base(args.output_dir, args.seed, pretrain_anew=True)
    new, shipped = args.output_dir / "model.safetensors", shipped_base_dir(args.seed) / "model.safetensors"
    mismatch = shipped_mismatch(args.output_dir, args.seed)
    if mismatch is None:
        old_tensors, new_tensors = load_file(shipped), load_file(new)
        gap = max((old_tensors[k] - new_tensors[k]).abs().max().item() for k in new_tensors)
        same = new.read_bytes() == shipped.read_bytes()
        print(f"against the shipped {shipped}: {'identical bytes' if same else f'max |difference| {gap:.3g}'}")
    else:
        print(f"not compared with the shipped weights: {mismatch}")
    if args.ship:
        print(f"shipped to {ship_base(args.output_dir, args.seed)}")


if __name__ == "__main__":
    main()
