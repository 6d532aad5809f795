"""SFT chat data: load rows in the TRL / OpenRLHF `messages` format, check them, tokenize with a loss mask.

A row is `{"messages": [{"role": ..., "content": ...}, ...], ...}`; other keys are kept but ignored. The model
learns every assistant turn: its content tokens and the turn-closing token (`<|im_end|>` in ChatML), which is
how it learns to stop. Everything else, the system/user/tool text and the `<|im_start|>assistant\\n` header the
chat template writes before each answer, is context only, as in TRL's `assistant_only_loss` and OpenRLHF's
multi-turn SFT.

Which characters belong to an assistant turn is read off the chat template itself, by rendering prefixes of
the conversation, so any template works as long as rendering more messages only appends text (see
`assistant_spans`). The full text is then tokenized once, exactly as it is at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
PROGRESS_MIN_ROWS = 5000
"""`tokenize_dataset` shows a progress bar above this many rows; below it the bar is noise in logs and tests."""

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, and the row and field when there is one."""


@dataclass(frozen=True)
class TokenizedChat:
    """One conversation as tokens, with which of them the model is trained to produce."""

    input_ids: list[int]
    """Token ids of the whole rendered conversation."""
    loss_mask: list[bool]
    """Same length as input_ids: True on tokens of assistant turns (content and closing token)."""

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Trained tokens that next-token prediction can reach: the first token has no context to predict it
        from, so it never counts (it is a template header in practice anyway)."""
        return sum(self.loss_mask[1:])


@dataclass(frozen=True)
class TokenizeStats:
    """What `tokenize_dataset` did with the rows; rows = kept + dropped_too_long + dropped_no_target."""

    rows: int
    """Rows read."""
    truncated: int
    """Kept rows that were cut to max_length."""
    dropped_too_long: int
    """Rows longer than max_length dropped because overflow="drop"."""
    dropped_no_target: int
    """Rows with no trained token left (after truncation, every assistant turn was cut off)."""
    tokens: int
    """Tokens in the kept examples."""
    target_tokens: int
    """Trained target tokens in the kept examples (sum of `TokenizedChat.num_targets`)."""

    @property
    def kept(self) -> int:
        return self.rows - self.dropped_too_long - self.dropped_no_target


# --- Loading ------------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> datasets.Dataset:
    """Rows from a local JSONL/JSON file, a Parquet file, or a directory written by `Dataset.save_to_disk`
    (for a saved `DatasetDict`, its "train" split). Raises `DataError` naming the path when it is missing,
    of an unsupported kind, unreadable, or holds no rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        rows = _load_saved(path)
    else:
        builder = _LOADERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl, .json or .parquet")
        if path.stat().st_size == 0:  # datasets' JSON reader fails on an empty file with a bare StopIteration
            raise DataError(f"{path}: empty file, no rows")
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets wraps parse errors in several types; all mean "cannot read"
            if "corresponds to no data" in str(error):  # datasets' words for a file with no records (`[]`)
                raise DataError(f"{path}: no rows") from error
            raise DataError(f"{path}: could not be read as {builder}: {_root_cause(error)}") from error
    if len(rows) == 0:
        raise DataError(f"{path}: no rows")
    return rows


def _load_saved(path: Path) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: a directory, but not one written by Dataset.save_to_disk") from error
    except Exception as error:  # e.g. datasets cannot reload a 0-row dataset saved with no shards
        raise DataError(f"{path}: could not be loaded with load_from_disk: {_root_cause(error)}") from error
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise DataError(f"{path}: a saved DatasetDict without a 'train' split (has {sorted(saved)})")
        saved = saved["train"]
    return saved


def _root_cause(error: BaseException) -> str:
    """The innermost error's text: datasets' own message ("An error occurred while generating the dataset")
    hides the parser's, which says what is wrong."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


# --- Validation ---------------------------------------------------------------------------------------------


def validate_chat_row(row: Mapping, source: str, index: int) -> list[dict]:
    """Check one row and return its `messages`.

    Rules: `messages` is a non-empty list; each message is a dict whose `role` is one of ROLES and whose
    `content` is a string; there is at least one assistant turn; a system message may only come first.

    Args:
        row: the row as read (a dict; keys other than "messages" are ignored).
        source: the file it came from, for messages.
        index: its 0-based row number in that file, for messages.

    Raises:
        DataError: `"{source}: row {index}: field '{field}': {problem}"`, e.g.
            `data/sft.jsonl: row 17: field 'messages[2].role': 'robot' is not one of system, user, assistant, tool`.
    """

    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{source}: row {index}: field '{field}': {problem}")

    # Columnar formats fill keys a row lacks with None, so None counts as missing.
    messages = row.get("messages") if isinstance(row, Mapping) else None
    if messages is None:
        raise fail("messages", "missing")
    if not isinstance(messages, list):
        raise fail("messages", f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise fail("messages", "empty list")
    check_messages(messages, "messages", fail)
    if not any(message["role"] == "assistant" for message in messages):
        raise fail("messages", "no assistant turn, so nothing to train on")
    return list(messages)


def check_messages(messages: list, field: str, fail: Callable[[str, str], DataError]) -> None:
    """Each message is a dict whose `role` is one of ROLES and whose `content` is a string; a system message may
    only come first. `fail(field, problem)` builds the error, so callers name their own file, row and field."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise fail(f"{field}[{i}]", f"expected a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role is None:
            raise fail(f"{field}[{i}].role", "missing")
        if role not in ROLES:
            raise fail(f"{field}[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise fail(f"{field}[{i}].role", "a system message may only come first")
        if content is None:
            raise fail(f"{field}[{i}].content", "missing")
        if not isinstance(content, str):
            raise fail(f"{field}[{i}].content", f"expected a string, got {type(content).__name__} {content!r:.40}")


# --- Tokenization -------------------------------------------------------------------------------------------


def render(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (always text: in transformers 5, tokenize=True returns a
    BatchEncoding, and we tokenize ourselves to get offsets)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[range]]:
    """The rendered conversation and, for each assistant turn, the character range the model must produce.

    Turn i starts where `messages[:i]` rendered with the generation prompt ends (after the template's
    `<|im_start|>assistant\\n` header) and ends where `messages[:i+1]` ends, less trailing whitespace: ChatML
    closes a turn with `<|im_end|>\\n`, and the newline is not produced by the model (generation stops at
    `<|im_end|>`; the next header is given). Stripping whitespace, rather than searching for the tokenizer's
    eos token, also works for base checkpoints, whose eos is `<|endoftext|>` while the template closes turns
    with `<|im_end|>`.

    This relies on the template being prefix-stable: rendering a prefix of the conversation gives a prefix of
    the full text. Qwen2.5's ChatML template is; one that, say, rewrites earlier turns depending on later ones
    is not, and raises DataError rather than silently masking the wrong tokens.
    """
    if messages and messages[0]["role"] == "assistant":
        # The prefix before it would be an empty conversation, which templates refuse to render.
        raise DataError("messages[0] is an assistant turn; a conversation must open with a system or user message")
    text = render(messages, tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenizer, add_generation_prompt=True)
        through = render(messages[: i + 1], tokenizer)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"the chat template is not prefix-stable at messages[{i}]: rendering fewer messages does not give "
                f"a prefix of the full text, so assistant tokens cannot be located"
            )
        end = len(through.rstrip())
        if end <= len(before):
            raise DataError(f"messages[{i}]: the assistant turn renders to no text")
        spans.append(range(len(before), end))
    return text, spans


def tokenize_chat(messages: Sequence[Mapping], tokenizer: PreTrainedTokenizerBase) -> TokenizedChat:
    """Tokenize a validated conversation (see `validate_chat_row`) and mark the assistant tokens.

    A token is marked when any of its characters lies in an assistant span (see `assistant_spans`). With
    Qwen2's pre-tokenizer a token never crosses from header into content in practice, and marking overlaps
    rather than containment guarantees no assistant character goes untrained if one does.
    """
    text, spans = assistant_spans(messages, tokenizer)
    # add_special_tokens=False: the template already wrote every marker the model sees (Qwen adds none, but
    # a tokenizer that prepends BOS would otherwise get it twice).
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    loss_mask = [False] * len(offsets)
    span_index = 0
    for t, (start, end) in enumerate(offsets):  # offsets and spans both increase, so one pass suffices
        while span_index < len(spans) and spans[span_index].stop <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span = spans[span_index]
        loss_mask[t] = end > start and start < span.stop and end > span.start
    return TokenizedChat(list(encoding["input_ids"]), loss_mask)


def fit_to_length(
    example: TokenizedChat, max_length: int, overflow: Literal["truncate", "drop"]
) -> TokenizedChat | None:
    """`example` if it has at most max_length tokens; otherwise its first max_length tokens ("truncate") or
    None ("drop")."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: need at least 2 tokens for one next-token target")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow={overflow!r}: expected 'truncate' or 'drop'")
    if len(example) <= max_length:
        return example
    if overflow == "drop":
        return None
    return TokenizedChat(example.input_ids[:max_length], example.loss_mask[:max_length])


def tokenize_dataset(
    rows: datasets.Dataset | Sequence[Mapping],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    overflow: Literal["truncate", "drop"],
    source: str,
) -> tuple[list[TokenizedChat], TokenizeStats]:
    """Validate, tokenize and length-limit every row; drop those left with nothing to train on.

    Args:
        rows: chat rows, e.g. from `load_rows`.
        tokenizer: a tokenizer with a chat template (see `align.tokenizer.load_tokenizer`).
        max_length: most tokens per example (the packing budget must be at least this).
        overflow: what to do with longer examples, see `fit_to_length`.
        source: where the rows came from, named in error messages.

    Returns:
        The kept examples in row order, and counts of what happened (see `TokenizeStats`).

    Raises:
        DataError: on the first invalid row, naming source, row and field.
    """
    examples = []
    truncated = dropped_too_long = dropped_no_target = 0
    progress = tqdm(rows, desc=f"tokenizing {source}", unit="row", disable=len(rows) <= PROGRESS_MIN_ROWS)
    for index, row in enumerate(progress):
        messages = validate_chat_row(row, source, index)
        try:
            full = tokenize_chat(messages, tokenizer)
        except DataError as error:
            raise DataError(f"{source}: row {index}: {error}") from error
        fitted = fit_to_length(full, max_length, overflow)
        if fitted is None:
            dropped_too_long += 1
        elif fitted.num_targets == 0:
            dropped_no_target += 1
        else:
            truncated += len(fitted) < len(full)
            examples.append(fitted)
    stats = TokenizeStats(
        rows=len(rows),
        truncated=truncated,
        dropped_too_long=dropped_too_long,
        dropped_no_target=dropped_no_target,
        tokens=sum(len(example) for example in examples),
        target_tokens=sum(example.num_targets for example in examples),
    )
    return examples, stats
