"""The reward model: the Qwen2.5 decoder with a scalar head, saved as transformers' `Qwen2ForSequenceClassification`.

The score of a sequence is the head's output at its last real token. Checkpoints hold the decoder's weights under
`model.*` and the head under `score.weight` ([1, hidden], no bias), with `num_labels=1` and the pad token in
config.json, which is what `Qwen2ForSequenceClassification.from_pretrained` reads; it finds the last real token as
the last one that is not the pad token, so sequences scored there must not end in it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from align.model import PackedLayout, Qwen2Config, save_state_dict
from align.model.io import read_config, read_safetensors
from align.model.qwen2 import Qwen2Model, positions_from_layout
from align.model.rope import rope_inverse_frequencies

ARCHITECTURE = "Qwen2ForSequenceClassification"


class Qwen2RewardModel(nn.Module):
    """Decoder plus a [hidden -> 1] head; `forward` gives one score per sequence."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [num_sequences] at each sequence's last token.

        Args:
            input_ids: [B, T]; a packed batch (B = 1, several sequences) or one sequence per row.
            position_ids: [B, T]; where they restart a new packed sequence begins (see Qwen2ForCausalLM).
            layout: precomputed boundaries of a packed batch; with it, sequence ends come from the layout.
            last_index: [B] index of each row's last real token in a right-padded plain batch (default: T - 1).
        """
        batch, length = input_ids.shape
        if layout is not None and position_ids is None:
            position_ids = positions_from_layout(layout).view(batch, length)
        elif position_ids is not None and layout is None:
            layout = PackedLayout.from_position_ids(position_ids)
            if len(layout.buckets) == 1 and layout.buckets[0].num_seqs == batch:
                layout = None  # one sequence per row
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        hidden = self.model(input_ids, position_ids, layout).reshape(batch * length, -1)
        if layout is not None:
            ends = layout.cu_seqlens[1:].long() - 1  # flattened index of each packed sequence's last token
        else:
            last = last_index if last_index is not None else torch.full((batch,), length - 1, device=hidden.device)
            ends = torch.arange(batch, device=hidden.device) * length + last.long()
        return self.score(hidden[ends]).squeeze(-1)  # the head runs on the selected rows only

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def reward_config(config: Qwen2Config, pad_token_id: int) -> Qwen2Config:
    """The config.json fields that make transformers load the checkpoint as a one-label sequence classifier."""
    extra = {**config.extra, "architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"},
             "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}
    return config.replace(extra=extra)


def load_reward_model(path: str | Path, dtype: str | None = None, seed: int = 0) -> Qwen2RewardModel:
    """A reward model from a checkpoint directory: a saved reward model (its head included), or a causal LM (ours,
    transformers' or an official Qwen2.5 release) whose LM head is dropped and whose score head starts at
    normal(0, 1 / sqrt(hidden + 1)), small enough that initial scores sit near zero."""
    path = Path(path)
    config = read_config(path, dtype)
    state = read_safetensors(path, "cpu")
    state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Qwen2RewardModel(config)
    if "score.weight" not in state:
        generator = torch.Generator().manual_seed(seed)
        state["score.weight"] = torch.randn(1, config.hidden_size, generator=generator) / math.sqrt(
            config.hidden_size + 1)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a Qwen2 reward model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: v.to(config.dtype) for k, v in state.items()}, strict=True, assign=True)
    model.model.inv_freq = rope_inverse_frequencies(config)[0]  # non-persistent buffer, rebuilt off meta
    return model


def save_reward_model(config: Qwen2Config, state: dict[str, torch.Tensor], output_dir: str | Path,
                      pad_token_id: int) -> None:
    """Write a (gathered) reward-model state dict as a transformers `Qwen2ForSequenceClassification` directory,
    atomically (see `save_state_dict`)."""
    config = reward_config(config, pad_token_id)
    save_state_dict(config, state, output_dir)
