"""SFT data: chat rows in the TRL / OpenRLHF `messages` format, tokenized with an assistant-only loss mask
(`chat.py`), and packed into padding-free micro-batches grouped into optimizer steps (`packing.py`)."""

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

__all__ = [
    "ROLES",
    "DataError",
    "PackedBatch",
    "StepPlan",
    "TokenizeStats",
    "TokenizedChat",
    "assistant_spans",
    "collate",
    "fit_to_length",
    "load_rows",
    "plan_epochs",
    "plan_micro_batches",
    "plan_steps",
    "render",
    "tokenize_chat",
    "tokenize_dataset",
    "validate_chat_row",
]
