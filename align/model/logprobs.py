"""Log-probabilities (and entropy) of target tokens without holding the full [tokens, vocab] logits.

Qwen2.5's vocabulary has 151,936 rows: float32 logits for an 8k-token micro-batch would take 5 GB, plus as much
again for their gradient. Here the LM head runs over `chunk_size` tokens at a time inside activation
checkpointing, so at most one chunk's logits exist in the forward pass and one chunk's (recomputed) logits and
gradient in the backward pass. Autograd differentiates exactly the naive expression, chunk by chunk, so values
and gradients equal the naive computation's.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_stats(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.t()).float() / temperature  # [C, V]
    log_z = torch.logsumexp(logits, dim=-1)  # [C]
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - log_z  # [C]
    if not with_entropy:
        return logprobs, logprobs.new_zeros(())
    probs = torch.softmax(logits, dim=-1)
    entropy = log_z - (probs * logits).sum(-1)  # H = log Z - E_p[z]
    return logprobs, entropy


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(hidden @ weight.T / temperature)[target] for every token, and optionally the entropy.

    Args:
        hidden: final hidden states [..., H].
        weight: LM head weight [V, H].
        targets: token ids [...] to score; negative ids (such as -100 for ignored positions) are scored as id 0
            and must be masked by the caller.
        temperature: divides the logits (vLLM reports sampled log-probs at the sampling temperature).
        chunk_size: tokens per LM-head chunk.
        with_entropy: also return the entropy of each position's distribution.
    Returns:
        (logprobs [...] float32, entropy [...] float32 or None).
    """
    lead_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_targets = targets.reshape(-1).clamp(min=0)  # [N]
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, flat_targets.numel(), chunk_size):
        args = (flat_hidden[start : start + chunk_size], weight, flat_targets[start : start + chunk_size])
        if needs_grad:
            lp, ent = checkpoint(_chunk_stats, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(*args, temperature, with_entropy)
        logprob_chunks.append(lp)
        entropy_chunks.append(ent)
    logprobs = torch.cat(logprob_chunks).reshape(lead_shape)
    entropy = torch.cat(entropy_chunks).reshape(lead_shape) if with_entropy else None
    return logprobs, entropy
