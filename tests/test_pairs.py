"""Preference pairs: every accepted format parses to the same pair, bad rows name file, row and field, long pairs
are dropped and counted."""

import json

import pytest

from align.data import DataError, load_rows, parse_pair, tokenize_pairs
from align.data.chat import render
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer

SMALL = TaskDataConfig(arithmetic_sft=10, code_sft=10, arithmetic_prompts=2, code_prompts=2, eval_per_level=1)
USER = {"role": "user", "content": "What is 2 + 3?"}
GOOD = {"role": "assistant", "content": "5"}
BAD = {"role": "assistant", "content": "6"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny(tmp_path_factory.mktemp("pairs") / "m", tasks=SMALL))


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},  # RewardBench / TRL standard
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # TRL conversational
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # TRL implicit prompt
    {"prompt": [USER], "chosen": "5", "rejected": [BAD], "id": 7},  # mixed, with an extra key
])
def test_formats_parse_to_the_same_pair(row):
    pair = parse_pair(row, "pairs.jsonl", 0)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ([USER], [GOOD], [BAD], None)


def test_margin_subset_and_tokens(tokenizer):
    rows = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "margin": 2, "subset": "math"},
            {"prompt": "What is 2 + 3?", "chosen": "5 " * 300, "rejected": "6"}]
    pairs, stats = tokenize_pairs(rows, tokenizer, max_length=64, source="x")
    assert (stats.rows, stats.kept, stats.dropped_too_long) == (2, 1, 1)
    (pair,) = pairs
    assert (pair.margin, pair.subset) == (2.0, "math")
    assert tokenizer.decode(pair.chosen_ids) == render([USER, GOOD], tokenizer)
    assert tokenizer.decode(pair.rejected_ids) == render([USER, BAD], tokenizer)
    assert stats.tokens == len(pair.chosen_ids) + len(pair.rejected_ids)


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "q", "rejected": "6"}, "chosen", "missing"),
    ({"prompt": "q", "chosen": 5, "rejected": "6"}, "chosen", "expected a list of messages, got int"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "5"}], "rejected": "6"}, "chosen[0].role",
     "'robot' is not one of"),
    ({"prompt": "q", "chosen": "5", "rejected": [{"role": "assistant", "content": 6}]}, "rejected[0].content",
     "expected a string, got int"),
    ({"prompt": "q", "chosen": [USER], "rejected": "6"}, "chosen", "must end with an assistant turn"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]}, "prompt",
     "share no opening messages"),
    ({"prompt": "q", "chosen": "5", "rejected": "6", "margin": "big"}, "margin", "expected a number"),
    ({"prompt": "q", "chosen": "5", "rejected": "6", "subset": 3}, "subset", "expected a string"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, row, field, problem):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "chosen": "5", "rejected": "6"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # as written: no Arrow type unification
    with pytest.raises(DataError) as error:
        tokenize_pairs(rows, tokenizer, max_length=512, source=str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: row 1: field '{field}': ") and problem in message, message


def test_reads_jsonl_parquet_and_saved_dataset(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}] * 3
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "p.jsonl", tmp_path / "p.parquet", tmp_path / "saved"):
        pairs, stats = tokenize_pairs(load_rows(path), tokenizer, max_length=512, source=str(path))
        assert stats.kept == 3 and tokenizer.decode(pairs[0].chosen_ids) == render([USER, GOOD], tokenizer)
