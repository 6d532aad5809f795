"""Preference pairs: rows in the formats TRL and RewardBench users have, checked, and tokenized for reward models
(whole conversations, scored at their last token) or for DPO (conversations with a loss mask on the answer).

Accepted rows (other keys are kept but ignored):
- RewardBench / TRL "standard": `prompt`, `chosen`, `rejected` as strings (the prompt is one user turn, each answer
  one assistant turn);
- TRL "conversational": `prompt` a message list, `chosen` and `rejected` message lists of the answer turns;
- TRL "implicit prompt": no `prompt`; `chosen` and `rejected` whole conversations, the prompt being the messages
  they share before they differ.
Optional: `margin` (a number: how much better chosen must score) and `subset` (RewardBench's section name).

A reward model scores a whole conversation at its last token, so a pair over the length limit is dropped, never
truncated (truncation would score a cut-off answer), and the count is reported, as TRL's RewardTrainer does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import datasets
from transformers import PreTrainedTokenizerBase

from align.data.chat import DataError, TokenizedChat, check_messages, render, tokenize_chat

Tokenized = TypeVar("Tokenized", "TokenizedPair", "DpoPair")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the same prompt answered two ways, `chosen` preferred."""

    prompt: list[dict]
    """Messages before the answers (system / user / earlier turns)."""
    chosen: list[dict]
    """The preferred answer's messages."""
    rejected: list[dict]
    """The other answer's messages."""
    margin: float | None = None
    """How much better chosen must score (None: 0)."""
    subset: str | None = None
    """RewardBench section, for per-subset accuracy."""


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as two token sequences, each the full conversation the reward model scores at its last token."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float
    subset: str | None

    @property
    def longest_side(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def parse_pair(row: Mapping, source: str, index: int) -> PreferencePair:
    """Check one row in any accepted format and return it as a `PreferencePair`.

    Raises:
        DataError: `"{source}: row {index}: field '{field}': {problem}"`.
    """

    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{source}: row {index}: field '{field}': {problem}")

    if not isinstance(row, Mapping):
        raise DataError(f"{source}: row {index}: expected an object with chosen and rejected, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if row.get(field) is None:  # columnar formats fill keys a row lacks with None
            raise fail(field, "missing")
    prompt = row.get("prompt")
    if prompt is None:
        chosen, rejected = (_messages(row[field], field, fail) for field in ("chosen", "rejected"))
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise fail("prompt", "missing, and chosen and rejected share no opening messages to take it from")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt", fail)
        chosen, rejected = (_answer(row[field], field, fail) for field in ("chosen", "rejected"))
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            raise fail(field, f"must end with an assistant turn, ends with {answer[-1]['role']!r}")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float)):
        raise fail("margin", f"expected a number, got {type(margin).__name__} {margin!r:.40}")
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise fail("subset", f"expected a string, got {type(subset).__name__}")
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin), subset)


def _messages(value, field: str, fail) -> list[dict]:
    if not isinstance(value, list):
        raise fail(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise fail(field, "empty list")
    check_messages(value, field, fail)
    return [dict(message) for message in value]


def _answer(value, field: str, fail) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, field, fail)


@dataclass(frozen=True)
class PairStats:
    """What `tokenize_pairs` did; rows = kept + dropped_too_long."""

    rows: int
    """Rows read."""
    dropped_too_long: int
    """Pairs with a side over max_length."""
    tokens: int
    """Tokens in the kept pairs (both sides)."""

    @property
    def kept(self) -> int:
        return self.rows - self.dropped_too_long


def tokenize_pair(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> TokenizedPair:
    """Render both conversations with the chat template and tokenize them as they are at inference."""
    chosen, rejected = (tokenizer(render(pair.prompt + answer, tokenizer), add_special_tokens=False)["input_ids"]
                        for answer in (pair.chosen, pair.rejected))
    return TokenizedPair(list(chosen), list(rejected), pair.margin or 0.0, pair.subset)


def tokenize_pairs(
    rows: datasets.Dataset | Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int, source: str
) -> tuple[list[TokenizedPair], PairStats]:
    """Check and tokenize every row; drop pairs with a side longer than max_length.

    Raises:
        DataError: on the first invalid row, naming source, row and field.
    """
    pairs, dropped = _tokenize_rows(rows, source, max_length, lambda pair: tokenize_pair(pair, tokenizer))
    tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return pairs, PairStats(rows=len(rows), dropped_too_long=dropped, tokens=tokens)


def _tokenize_rows(rows: datasets.Dataset | Sequence[Mapping], source: str, max_length: int,
                   tokenize: Callable[[PreferencePair], Tokenized]) -> tuple[list[Tokenized], int]:
    """(tokenized pairs with no side over max_length, how many had one): every row parsed, then tokenized.

    Raises:
        DataError: on the first invalid row, naming source, row and field.
    """
    pairs, dropped = [], 0
    for index, row in enumerate(rows):
        pair = parse_pair(row, source, index)
        try:
            tokenized = tokenize(pair)
        except DataError as error:  # a message the chat checks raise without the row
            raise DataError(f"{source}: row {index}: {error}") from error
        if tokenized.longest_side > max_length:
            dropped += 1
        else:
            pairs.append(tokenized)
    return pairs, dropped


# --- for DPO: the policy's log-probs of each answer given the prompt --------------------------------------------------


@dataclass(frozen=True)
class DpoPair:
    """Both conversations of a pair; each loss_mask marks the answer's tokens (never the prompt's)."""

    chosen: TokenizedChat
    rejected: TokenizedChat

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def longest_side(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def tokenize_answer(prompt: list[dict], answer: list[dict], tokenizer: PreTrainedTokenizerBase) -> TokenizedChat:
    """prompt + answer rendered and tokenized as at inference; the loss mask covers the answer's assistant tokens.

    tokenize_chat marks every assistant turn, so assistant turns inside a multi-turn prompt are unmarked here: a
    token is the answer's when it starts at or after the end of the prompt rendered with the generation header.
    """
    full = tokenize_chat(prompt + answer, tokenizer)
    if not any(m["role"] == "assistant" for m in prompt):
        return full
    boundary = len(render(prompt, tokenizer, add_generation_prompt=True))
    offsets = tokenizer(render(prompt + answer, tokenizer), add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    mask = [m and start >= boundary for m, (start, _) in zip(full.loss_mask, offsets, strict=True)]
    return TokenizedChat(full.input_ids, mask)


def tokenize_dpo_pairs(
    rows: datasets.Dataset | Sequence[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int, source: str
) -> tuple[list[DpoPair], int]:
    """Check and tokenize every row; returns the pairs with both sides within max_length, and how many were not.

    Raises:
        DataError: on the first invalid row, naming source, row and field.
    """
    return _tokenize_rows(rows, source, max_length, lambda pair: DpoPair(
        *(tokenize_answer(pair.prompt, answer, tokenizer) for answer in (pair.chosen, pair.rejected))))
