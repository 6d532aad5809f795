"""LoRA adapters through peft, and merging them back into a plain Hugging Face checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from align.model import load_pretrained

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraArgs:
    r: int = 0
    """Adapter rank; 0 trains all weights instead (no LoRA)."""
    alpha: float = 32.0
    """LoRA scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get adapters (names inside each decoder layer)."""

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"r={self.r} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


def apply_lora(model: torch.nn.Module, args: LoraArgs) -> torch.nn.Module:
    """Freeze the model and add trainable adapters (B starts at zero: the wrapped model is unchanged)."""
    return get_peft_model(model, args.peft_config())


def merged_state_dict(base_dir: str | Path, args: LoraArgs, trained: dict[str, torch.Tensor],
                      dtype: str) -> dict[str, torch.Tensor]:
    """The base model with trained adapters merged in: a plain state dict with Hugging Face names.

    `trained` is the full state dict of the peft-wrapped model (adapter and frozen weights), e.g. gathered from
    ZeRO-3 shards; the base weights are reloaded from `base_dir` so this works whatever sharded the training.
    """
    wrapped = apply_lora(load_pretrained(base_dir, dtype=dtype), args)
    missing, unexpected = wrapped.load_state_dict(trained, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return wrapped.merge_and_unload().state_dict()
