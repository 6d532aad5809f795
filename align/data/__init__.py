"""Training data: chat rows in the TRL / OpenRLHF `messages` format, tokenized with an assistant-only loss mask
(`chat.py`); preference pairs in TRL / RewardBench formats, for reward models and DPO (`pairs.py`); packing into
padding-free micro-batches grouped into optimizer steps (`packing.py`)."""

from align.data.chat import (
    ROLES,
    DataError,
    TokenizedChat,
    TokenizeStats,
    assistant_spans,
    fit_to_length,
    load_rows,
    render,
    tokenize_chat,
    tokenize_dataset,
    validate_chat_row,
)
from align.data.packing import PackedBatch, StepPlan, collate, plan_epochs, plan_micro_batches, plan_steps
from align.data.pairs import (
    DpoPair,
    PairStats,
    PreferencePair,
    TokenizedPair,
    parse_pair,
    tokenize_answer,
    tokenize_dpo_pairs,
    tokenize_pairs,
)

__all__ = [
    "ROLES",
    "DataError",
    "DpoPair",
    "PackedBatch",
    "PairStats",
    "PreferencePair",
    "StepPlan",
    "TokenizeStats",
    "TokenizedChat",
    "TokenizedPair",
    "assistant_spans",
    "collate",
    "fit_to_length",
    "load_rows",
    "parse_pair",
    "plan_epochs",
    "plan_micro_batches",
    "plan_steps",
    "render",
    "tokenize_answer",
    "tokenize_chat",
    "tokenize_dataset",
    "tokenize_dpo_pairs",
    "tokenize_pairs",
    "validate_chat_row",
]
