"""The Qwen2.5 decoder, written here, with Hugging Face-compatible weights."""

from align.model.attention import PackedLayout
from align.model.config import Qwen2Config
from align.model.io import load_pretrained, save_pretrained
from align.model.logprobs import token_logprobs
from align.model.qwen2 import Qwen2ForCausalLM, TokenLogProbs

__all__ = [
    "PackedLayout", "Qwen2Config", "Qwen2ForCausalLM", "TokenLogProbs", "load_pretrained", "save_pretrained",
    "token_logprobs",
]
