"""Training checkpoints: written atomically, the last K kept, the latest found again on resume.

A checkpoint is a directory `checkpoint-{step:08d}/` in the run's output directory holding whatever the trainer
saves (accelerate's `save_state`: model, optimizer, scheduler and RNG states, ZeRO shards under DeepSpeed) plus
`trainer_state.json` (step, data position, metrics) and the resolved config. Every rank writes into
`.checkpoint-{step}.tmp/`; the main process renames it into place only after all ranks are done, so a crash
mid-save leaves no half-written checkpoint that could be resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d{8})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary directories of interrupted saves excluded)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where all ranks write a checkpoint before it is published by `publish_checkpoint`."""
    return Path(output_dir) / f".checkpoint-{step:08d}.tmp"


def publish_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Main process only, after every rank finished writing into `staging_dir`: add the trainer state, rename
    the directory into place, then delete checkpoints beyond the newest `keep_last`."""
    staging = staging_dir(output_dir, step)
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    final = Path(output_dir) / f"checkpoint-{step:08d}"
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete staging directories left by a run that died while saving."""
    for stale in Path(output_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
