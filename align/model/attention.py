"""Causal attention kernels: a plain batch, and packed (padding-free) sequences.

Every path calls a fused kernel and none builds a [T, T] mask:
- a plain batch [B, T] goes to `scaled_dot_product_attention(is_causal=True)`;
- packed sequences on CUDA with flash-attn installed go to `flash_attn_varlen_func` (thin path: written against
  flash-attn's documented API, never run on the project's CPU-only machines);
- packed sequences elsewhere are grouped into power-of-two length buckets, right-padded to the bucket's longest
  sequence and run through one causal SDPA call per bucket. Right padding needs no mask: under the causal mask
  a real query only sees keys at or before itself, all real; padded queries are computed and dropped. So the
  only waste is attention over padding, bounded by the bucket width, while the projections and MLP run on the
  packed tokens alone.

K/V keep their `num_key_value_heads` heads throughout: SDPA's `enable_gqa` and flash-attn broadcast them to the
query heads inside the kernel, never materialising the repeated copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # GPU-only fast path; absent on CPU installs.
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None


@dataclass(frozen=True)
class LengthBucket:
    """Packed sequences of similar length, laid out as a right-padded [num_seqs, max_len] block."""

    gather_index: torch.Tensor  # [num_seqs * max_len] packed position of each slot; padding slots point at 0
    valid: torch.Tensor  # [num_seqs * max_len] True where the slot holds a real token
    num_seqs: int
    max_len: int


@dataclass(frozen=True)
class PackedLayout:
    """Where the sequences of a packed token stream start and end, precomputed once per forward pass."""

    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32 offsets, as flash-attn takes them
    max_seqlen: int
    buckets: tuple[LengthBucket, ...]
    restore_order: torch.Tensor  # [T] index into the concatenated bucket outputs that restores packed order

    @property
    def num_tokens(self) -> int:
        return int(self.restore_order.numel())

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu") -> PackedLayout:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"sequence lengths must be positive, got {lengths}")
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        by_bucket: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_bucket.setdefault((n - 1).bit_length(), []).append(i)  # bucket k holds lengths in (2^(k-1), 2^k]

        buckets, order = [], []
        for key in sorted(by_bucket):
            members = torch.tensor(by_bucket[key], dtype=torch.long)
            seq_lens, seq_starts = lengths_t[members], starts[members]
            max_len = int(seq_lens.max())
            offsets = torch.arange(max_len)
            valid = offsets[None, :] < seq_lens[:, None]  # [n, L]
            slots = torch.where(valid, seq_starts[:, None] + offsets[None, :], 0)  # [n, L]
            order.append(slots[valid])
            buckets.append(LengthBucket(slots.flatten().to(device), valid.flatten().to(device), len(members), max_len))
        order_t = torch.cat(order)
        restore = torch.empty_like(order_t)
        restore[order_t] = torch.arange(order_t.numel())
        cu_seqlens = F.pad(torch.cumsum(lengths_t, 0), (1, 0)).to(torch.int32)
        return cls(cu_seqlens.to(device), max(lengths), tuple(buckets), restore.to(device))

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedLayout:
        """Sequences are the runs of consecutive positions, in every row of position_ids [B, T]: a new one starts
        wherever the position is not the previous one plus 1, and at each row start."""
        flat = position_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1] + 1
        starts.view(position_ids.shape)[:, 0] = True
        boundaries = torch.nonzero(starts).flatten().tolist() + [flat.numel()]
        lengths = [b - a for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
        return cls.from_lengths(lengths, device=position_ids.device)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a batch. q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        # torch's CPU flash-attention backward is ~4x slower in bfloat16 than in float32 at these shapes
        # (measured: 944 vs 236 ms per training step of the tiny model), so low precision stops at the projections.
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2).to(dtype)


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """Causal attention within each packed sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu, n = layout.cu_seqlens, layout.max_seqlen
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)
    if len(layout.buckets) == 1 and layout.buckets[0].num_seqs == 1:  # one sequence: nothing to regroup
        return causal_attention(q[None], k[None], v[None], scale)[0]

    pieces = []
    for bucket in layout.buckets:
        shape = (bucket.num_seqs, bucket.max_len)
        qb, kb, vb = (x[bucket.gather_index].unflatten(0, shape) for x in (q, k, v))  # [n, L, H, D]
        out = causal_attention(qb, kb, vb, scale)  # [n, L, Hq, D]
        pieces.append(out.flatten(0, 1)[bucket.valid])
    return torch.cat(pieces)[layout.restore_order]
