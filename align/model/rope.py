"""Rotary position embeddings (RoPE), plain and YaRN-scaled, as Qwen2.5 checkpoints configure them."""

from __future__ import annotations

import math

import torch

from align.model.config import Qwen2Config


def rope_inverse_frequencies(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies and the factor cos/sin are scaled by.

    Returns (inv_freq [head_dim / 2] float32, attention_scaling).
    """
    dim = config.attention_head_dim
    base = config.rope_theta
    if config.rope_type == "default":
        return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    return _yarn_inverse_frequencies(config.rope_scaling, dim, base, config.max_position_embeddings)


def _yarn_inverse_frequencies(scaling: dict, dim: int, base: float, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, arXiv 2309.00071), with the defaults transformers and vLLM use.

    High-frequency pairs (many rotations within the original context) keep their frequency ("extrapolation"),
    low-frequency pairs are divided by `factor` ("interpolation"), with a linear ramp between the correction
    dimensions of beta_fast and beta_slow rotations (Sec. 3.2, "NTK-by-parts"). cos/sin are multiplied by
    0.1 ln(factor) + 1 (Sec. 3.4, the attention temperature).
    """
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings") or max_positions
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The pair index whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_scaling: float, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [*position_ids.shape, head_dim], computed in float32 and cast to `dtype`."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [..., head_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [..., head_dim]: halves layout, as HF and vLLM (neox style)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., T, heads, head_dim] by cos/sin [..., T, head_dim] (rotate-half convention)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
