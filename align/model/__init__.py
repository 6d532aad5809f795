"""The Qwen2.5 decoder, written here, with Hugging Face-compatible weights."""

from align.model.attention import PackedLayout
from align.model.config import Qwen2Config
from align.model.io import copy_tokenizer_files, load_pretrained, save_pretrained, save_state_dict
from align.model.logprobs import token_logprobs
from align.model.qwen2 import Qwen2ForCausalLM, TokenLogProbs

__all__ = [
    "PackedLayout", "Qwen2Config", "Qwen2ForCausalLM", "TokenLogProbs", "copy_tokenizer_files", "load_pretrained",
    "save_pretrained", "save_state_dict", "token_logprobs",
]
