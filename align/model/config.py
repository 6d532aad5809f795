"""The Qwen2.5 decoder's configuration, field for field the `config.json` of a Hugging Face Qwen2 checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

# config.json keys that transformers or vLLM write and that carry no architecture; read and dropped.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "use_cache", "torch_dtype", "dtype", "layer_types",
    "_name_or_path", "pad_token_id", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "num_labels", "chunk_size_feed_forward",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_fast_bf16(cpu_flags_path: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine multiplies bfloat16 matrices natively: a CUDA GPU that supports it, or a CPU with AMX
    (measured on an Intel Xeon with AMX: ~10x float32's matmul throughput). CPUs without it emulate bfloat16,
    10-250x slower than float32 on the project's AMD EPYC (README); AVX-512 BF16 alone is not measured, so False."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return " amx_bf16" in cpu_flags_path.read_text()
    except OSError:  # not Linux: no flags to read
        return False


def resolve_dtype(name: str) -> str:
    """A dtype name, with "auto" made "bfloat16" where `has_fast_bf16()`, else "float32"."""
    if name == "auto":
        return "bfloat16" if has_fast_bf16() else "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return name


@dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2/Qwen2.5 dense decoder (the fields of transformers' `Qwen2Config`)."""

    vocab_size: int = 151936
    """Rows of the embedding and LM head (Qwen2.5 pads 151,665 tokens to 151,936)."""
    hidden_size: int = 896
    """Width of the residual stream."""
    intermediate_size: int = 4864
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 24
    """Number of decoder layers."""
    num_attention_heads: int = 14
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention: each serves num_attention_heads / num_key_value_heads queries)."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads, as in every Qwen2.5 checkpoint."""
    hidden_act: str = "silu"
    """MLP gate activation; Qwen2.5 uses SiLU (SwiGLU)."""
    max_position_embeddings: int = 32768
    """Longest context the checkpoint was trained for."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    rope_theta: float = 1_000_000.0
    """RoPE base frequency (Qwen2.5 raised it from 10,000 to 1,000,000)."""
    rope_scaling: dict[str, Any] | None = None
    """None, or YaRN as Qwen2.5 ships it: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}."""
    tie_word_embeddings: bool = True
    """Whether the LM head shares the embedding matrix (true for 0.5B-3B)."""
    initializer_range: float = 0.02
    """Std of the normal init of fresh weights."""
    attention_dropout: float = 0.0
    """Kept for config.json compatibility; must be 0 (Qwen2.5 trains without attention dropout)."""
    use_sliding_window: bool = False
    """Kept for compatibility; sliding-window attention is not implemented (no Qwen2.5 checkpoint enables it)."""
    sliding_window: int | None = None
    """Kept for compatibility; unused."""
    max_window_layers: int = 28
    """Kept for compatibility; unused."""
    bos_token_id: int | None = None
    """Begin-of-sequence id, written to config.json for other tools."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence id(s), written to config.json for other tools."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in: float32, bfloat16 or float16."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown config.json keys, kept so a load/save round trip loses nothing."""

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by heads={self.num_attention_heads}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: Qwen2.5 uses 'silu'")
        if self.use_sliding_window:
            raise NotImplementedError("sliding-window attention is not implemented (no Qwen2.5 checkpoint uses it)")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r}, expected one of {sorted(DTYPES)}")
        if self.rope_scaling is not None and self.rope_type not in ("default", "yarn"):
            raise NotImplementedError(f"rope_scaling type {self.rope_type!r}: only YaRN (Qwen2.5's) is implemented")

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def replace(self, **changes: Any) -> Qwen2Config:
        return dataclasses.replace(self, **changes)

    # --- config.json ---------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> Qwen2Config:
        """Reads a Qwen2 config.json, in either the classic (rope_theta + rope_scaling) or the transformers-5
        (rope_parameters) spelling."""
        raw = dict(raw)
        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"model_type={model_type!r}: this decoder reads Qwen2/Qwen2.5 checkpoints ('qwen2')")
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", cls.rope_theta))
            if rope_parameters.get("rope_type", rope_parameters.get("type", "default")) != "default":
                raw.setdefault("rope_scaling", rope_parameters)
        raw.setdefault("torch_dtype", raw.get("dtype") or "float32")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in _IGNORED_KEYS}
        return cls(**known, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of this architecture, in the spelling Qwen2.5 checkpoints use (transformers and vLLM
        read it)."""
        out: dict[str, Any] = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        for f in dataclasses.fields(self):
            if f.name == "extra" or (f.name == "head_dim" and self.head_dim is None):
                continue
            out[f.name] = getattr(self, f.name)
        out["use_cache"] = True
        # transformers reads this to tell its own files from others (without it, it warns that a local tokenizer
        # may carry Mistral's broken regex); the format is the one that version reads.
        out["transformers_version"] = transformers.__version__
        out.update(self.extra)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_hf_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err
