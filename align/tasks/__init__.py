"""Synthetic, checkable tasks: arithmetic with worked solutions and small Python functions with tests.

`write_task_data` writes the SFT chat rows, the RL prompt rows and the held-out eval rows as JSONL;
`corpus_texts` yields the training texts for a tokenizer. See `data.py` for how the splits stay disjoint.
"""

from align.tasks.data import (
    FAMILIES,
    SPLITS,
    TaskDataConfig,
    build_splits,
    corpus_texts,
    generate_problems,
    prompt_row,
    select_levels,
    sft_row,
    write_task_data,
)
from align.tasks.problem import Problem, extract_boxed_answer, normalize_problem_text

__all__ = [
    "FAMILIES",
    "SPLITS",
    "Problem",
    "TaskDataConfig",
    "build_splits",
    "corpus_texts",
    "extract_boxed_answer",
    "generate_problems",
    "normalize_problem_text",
    "prompt_row",
    "select_levels",
    "sft_row",
    "write_task_data",
]
