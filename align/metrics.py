"""Training metrics people can plot: JSON lines, TensorBoard events, and PNG curves at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Only the main process should create one. Appending (not truncating) keeps the curve of a resumed run whole;
    on resume, lines past the resumed step are dropped first so the file never holds a step twice.
    """

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.is_file():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), step)

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_file: str | Path, output_png: str | Path, keys: tuple[str, ...], title: str) -> None:
    """One panel per metric in `keys` against the step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    keys = tuple(k for k in keys if any(k in r for r in records))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output_png, dpi=110)
    plt.close(fig)
