"""The Qwen2.5 dense decoder: GQA, SwiGLU, RoPE, bias on Q/K/V only, RMSNorm pre-norm.

Parameter names equal transformers' `Qwen2ForCausalLM`, so `state_dict()` is a Hugging Face checkpoint and
`align.model.io` moves it to and from disk unchanged. The model knows nothing of sharding or training: DeepSpeed,
LoRA and Ray wrap it from outside.

Inputs are either a plain batch input_ids [B, T] (every row one sequence starting at position 0) or packed
sequences: several sequences laid end to end, their position_ids restarting at each one (or a `PackedLayout`
passed in), attending only within themselves. Packing is the fast path trainers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from align.model.attention import PackedLayout, causal_attention, packed_causal_attention
from align.model.config import Qwen2Config
from align.model.logprobs import token_logprobs
from align.model.rope import apply_rope, rope_cos_sin, rope_inverse_frequencies


@dataclass(frozen=True)
class TokenLogProbs:
    """Per-token scores of given target tokens."""

    logprobs: torch.Tensor  # [B, T] float32: log p(target_t | tokens <= t)
    entropy: torch.Tensor | None  # [B, T] float32 entropy of each position's distribution, when asked for


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as Qwen2 does (matters for bf16 parity).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout | None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)  # [B, T, Hq, D]
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)  # [B, T, Hkv, D]
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B, T, Hkv, D]
        if layout is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = packed_causal_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), layout, self.scale)
        return self.o_proj(out.reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm: input_ids -> hidden states."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq, self.rope_scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not in HF checkpoints
        self.gradient_checkpointing = False

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: PackedLayout | None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scaling, position_ids, x.dtype)  # [B, T, D]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layout, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout)
        return self.norm(x)


class LMHead(nn.Linear):
    """The output projection. Returns logits, or, given target ids, their chunked (log-probs, entropy).

    Scoring lives in this module's forward so that DeepSpeed ZeRO-3, which gathers a module's parameters around
    its forward call, gathers the head's weight for it; the result is a plain tuple because ZeRO-3 re-gathers the
    weight for the backward pass (where the chunks are recomputed) through hooks on the output's tensors, and
    it finds tensors only inside tuples, lists and dicts.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        target_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
        chunk_size: int = 1024,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if target_ids is None:
            return super().forward(hidden)
        return token_logprobs(hidden, self.weight, target_ids, temperature, chunk_size, with_entropy)


class Qwen2ForCausalLM(nn.Module):
    """The Qwen2.5 causal LM. `forward` gives logits [B, T, V], or log-probs of `target_ids` without full logits."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_config(cls, config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
        """A freshly initialised model (normal(0, initializer_range) weights, zero biases, unit norms)."""
        generator = torch.Generator().manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif "norm" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * config.initializer_range)
        return model.to(config.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
        target_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> torch.Tensor | TokenLogProbs:
        """Run the decoder.

        Args:
            input_ids: [B, T] token ids; a packed batch is usually B = 1.
            position_ids: [B, T]; where they restart (any position not the previous plus one), a new sequence
                begins and attention does not cross the boundary. None: each row is one sequence from 0.
            layout: precomputed sequence boundaries of the flattened batch (see `PackedLayout`), instead of
                deriving them from position_ids on every call.
            target_ids: [B, T] ids to score (usually input_ids shifted left). If given, returns `TokenLogProbs`
                computed in chunks instead of logits.
            temperature: logits are divided by it when scoring targets.
            with_entropy: also return per-position entropy when scoring targets.
        Returns:
            logits [B, T, V] in the model dtype, or `TokenLogProbs`.
        """
        batch, length = input_ids.shape
        if layout is not None and position_ids is None:
            position_ids = positions_from_layout(layout).view(batch, length)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        elif layout is None:
            layout = PackedLayout.from_position_ids(position_ids)
            if len(layout.buckets) == 1 and layout.buckets[0].num_seqs == batch:
                layout = None  # one sequence per row: the plain batch path, no regrouping
        hidden = self.model(input_ids, position_ids, layout)
        if target_ids is None:
            return self.lm_head(hidden)
        return TokenLogProbs(*self.lm_head(hidden, target_ids, temperature, with_entropy))

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of storing them."""
        self.model.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, output_dir: str | Path, max_shard_size: int = 5 * 2**30) -> None:
        """Write config.json and safetensors (sharded above max_shard_size bytes), loadable by transformers,
        vLLM and `align.model.load_pretrained`."""
        from align.model.io import save_pretrained

        save_pretrained(self, output_dir, max_shard_size)


def positions_from_layout(layout: PackedLayout) -> torch.Tensor:
    """Position ids [total_tokens] of a packed batch: 0, 1, ... restarting at every sequence."""
    cu = layout.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(int(cu[-1]), device=cu.device) - starts
