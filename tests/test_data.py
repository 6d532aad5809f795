"""SFT data: loading, validation messages, the assistant-only loss mask, packing and loss normalisation."""

import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from align.data import (
    DataError,
    TokenizedChat,
    collate,
    fit_to_length,
    load_rows,
    plan_micro_batches,
    plan_steps,
    render,
    tokenize_chat,
    tokenize_dataset,
    validate_chat_row,
)
from align.model import load_pretrained
from align.tasks import TaskDataConfig
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer

SMALL = TaskDataConfig(arithmetic_sft=40, code_sft=20, arithmetic_prompts=4, code_prompts=4, eval_per_level=1)
SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5\nThe answer is \\boxed{5}."},
    {"role": "user", "content": "And 4 * 4?"},
    {"role": "assistant", "content": "16"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("data") / "m", tasks=SMALL)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def masked_runs(example: TokenizedChat, tokenizer) -> list[str]:
    """The text of each run of consecutive loss-masked tokens."""
    runs, current = [], []
    for token, masked in zip(example.input_ids, example.loss_mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- Loading ------------------------------------------------------------------------------------------------


def test_loads_jsonl_parquet_and_saved_directories(tiny_dir, tmp_path):
    rows = load_rows(tiny_dir / "data" / "sft.jsonl")
    assert len(rows) == SMALL.arithmetic_sft + SMALL.code_sft
    assert {m["role"] for m in rows[0]["messages"]} == {"user", "assistant"}

    rows.to_parquet(tmp_path / "sft.parquet")
    rows.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": rows, "test": rows.select(range(3))}).save_to_disk(tmp_path / "saved_dict")
    for path in (tmp_path / "sft.parquet", tmp_path / "saved", tmp_path / "saved_dict"):
        assert load_rows(path)["messages"] == rows["messages"], path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.jsonl", None, r"absent\.jsonl: no such file or directory"),
        ("rows.csv", "messages\n", r"rows\.csv: unsupported file type '\.csv'"),
        ("bad.jsonl", '{"messages": [}\n', r"bad\.jsonl: could not be read as json"),
        ("bad.parquet", "not parquet", r"bad\.parquet: could not be read as parquet"),
        ("empty.jsonl", "", r"empty\.jsonl: empty file, no rows"),
        ("empty.json", "[]", r"empty\.json: no rows"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(tmp_path / name)


def test_directories_that_are_not_saved_datasets(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        load_rows(tmp_path / "plain")
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    datasets.DatasetDict({"test": rows}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(DataError, match=r"without a 'train' split \(has \['test'\]\)"):
        load_rows(tmp_path / "no_train")
    rows.filter(lambda row: False).save_to_disk(tmp_path / "empty")
    with pytest.raises(DataError, match="empty: no rows"):
        load_rows(tmp_path / "empty")


# --- Validation ---------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hi"}, "field 'messages': missing"),
        ({"messages": None}, "field 'messages': missing"),
        ({"messages": "hi"}, "field 'messages': expected a list of messages, got str"),
        ({"messages": []}, "field 'messages': empty list"),
        ({"messages": [USER, "hello"]}, "field 'messages[1]': expected a dict with 'role' and 'content', got str"),
        ({"messages": [USER, {"content": "x"}]}, "field 'messages[1].role': missing"),
        ({"messages": [USER, ASSISTANT, {"role": "robot", "content": "beep"}]},
         "field 'messages[2].role': 'robot' is not one of system, user, assistant, tool"),
        ({"messages": [USER, {"role": "assistant", "content": 5}]},
         "field 'messages[1].content': expected a string, got int 5"),
        ({"messages": [USER, {"role": "assistant"}]}, "field 'messages[1].content': missing"),
        ({"messages": [USER, ASSISTANT, {"role": "system", "content": "late"}]},
         "field 'messages[2].role': a system message may only come first"),
        ({"messages": [{"role": "system", "content": "s"}, USER]},
         "field 'messages': no assistant turn, so nothing to train on"),
    ],
)
def test_bad_rows_name_file_row_and_field(row, message):
    with pytest.raises(DataError) as error:
        validate_chat_row(row, "data/sft.jsonl", 17)
    assert str(error.value) == f"data/sft.jsonl: row 17: {message}"


def test_valid_row_returns_its_messages():
    assert validate_chat_row({"id": 1, "messages": [USER, ASSISTANT]}, "x.jsonl", 0) == [USER, ASSISTANT]


def test_bad_row_in_a_file_is_reported_with_its_row_number(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [USER, ASSISTANT]},
        {"messages": [USER, ASSISTANT]},
        {"messages": [USER, {"role": "robot", "content": "beep"}]},
    ])
    with pytest.raises(DataError, match=r"sft\.jsonl: row 2: field 'messages\[1\]\.role': 'robot' is not one of"):
        tokenize_dataset(load_rows(path), tokenizer, 128, "truncate", str(path))


# --- Loss mask ----------------------------------------------------------------------------------------------


def test_loss_mask_covers_each_assistant_turn_and_its_im_end(tokenizer):
    example = tokenize_chat(SYSTEM_CHAT, tokenizer)
    text = render(SYSTEM_CHAT, tokenizer)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # By hand: ChatML wraps every turn as <|im_start|>{role}\n{content}<|im_end|>\n; only the two answers and
    # the <|im_end|> closing each are trained, not the system/user text, the headers or the newlines between.
    assert masked_runs(example, tokenizer) == [
        "2 + 3 = 5\nThe answer is \\boxed{5}.<|im_end|>",
        "16<|im_end|>",
    ]
    unmasked = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if not m])
    assert unmasked == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>user\nAnd 4 * 4?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_loss_mask_with_tool_turns_and_default_system_prompt(tokenizer):
    messages = [
        {"role": "user", "content": "Add 2 and 3 with the tool."},
        {"role": "assistant", "content": "Calling add."},
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "It is 5."},
    ]
    example = tokenize_chat(messages, tokenizer)
    assert masked_runs(example, tokenizer) == ["Calling add.<|im_end|>", "It is 5.<|im_end|>"]
    assert "<tool_response>\n5\n</tool_response>" in tokenizer.decode(example.input_ids)


def test_every_task_row_masks_exactly_its_answer(tokenizer, tiny_dir):
    rows = load_rows(tiny_dir / "data" / "sft.jsonl")
    examples, stats = tokenize_dataset(rows, tokenizer, 4096, "truncate", "sft.jsonl")
    assert stats.kept == stats.rows == len(rows) and stats.truncated == 0
    for row, example in zip(rows, examples, strict=True):
        assert masked_runs(example, tokenizer) == [row["messages"][1]["content"] + "<|im_end|>"]
    assert stats.target_tokens == sum(sum(example.loss_mask) for example in examples)


def test_assistant_first_and_unstable_templates_are_refused(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)  # a fresh copy: this test replaces its template
    with pytest.raises(DataError, match="messages\\[0\\] is an assistant turn"):
        tokenize_chat([ASSISTANT, USER], tokenizer)
    # A template that writes the number of messages first: rendering a prefix changes earlier text.
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"not prefix-stable at messages\[1\]"):
        tokenize_chat([USER, ASSISTANT], tokenizer)


# --- Length limits ------------------------------------------------------------------------------------------


def test_fit_to_length():
    example = TokenizedChat([1, 2, 3, 4, 5], [False, False, True, True, True])
    assert fit_to_length(example, 5, "drop") is example
    assert fit_to_length(example, 4, "drop") is None
    assert fit_to_length(example, 4, "truncate") == TokenizedChat([1, 2, 3, 4], [False, False, True, True])
    with pytest.raises(ValueError, match="overflow='clip'"):
        fit_to_length(example, 4, "clip")


def test_truncate_and_drop_counts(tokenizer):
    short = {"messages": [USER, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [USER, {"role": "assistant", "content": "a long answer " * 20}]}
    long_prompt = {"messages": [{"role": "user", "content": "a long question " * 20}, {"role": "assistant",
                                                                                       "content": "ok"}]}
    rows = [short, long_answer, long_prompt]
    max_length = len(tokenize_chat(short["messages"], tokenizer))  # short fits exactly; the others do not

    examples, stats = tokenize_dataset(rows, tokenizer, max_length, "truncate", "rows")
    # long_answer keeps the start of its answer; long_prompt is cut before its answer begins.
    assert (stats.rows, stats.truncated, stats.dropped_too_long, stats.dropped_no_target) == (3, 1, 0, 1)
    assert stats.kept == len(examples) == 2 and stats.tokens == 2 * max_length
    assert stats.target_tokens == sum(example.num_targets for example in examples) > 0
    assert examples[1].input_ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")  # cut mid-answer

    examples, stats = tokenize_dataset(rows, tokenizer, max_length, "drop", "rows")
    assert (stats.rows, stats.truncated, stats.dropped_too_long, stats.dropped_no_target) == (3, 0, 2, 0)
    assert examples == [tokenize_chat(short["messages"], tokenizer)] and stats.tokens == max_length


# --- Packing ------------------------------------------------------------------------------------------------


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short chats with a tail of long ones, like SFT data: 16..2048 tokens."""
    rng = random.Random(seed)
    return [min(2048, max(16, int(rng.lognormvariate(5.5, 1.0)))) for _ in range(n)]


def test_micro_batches_hold_every_index_once_within_budget_and_well_filled():
    lengths = mixed_lengths(3000)
    plan = plan_micro_batches(lengths, 2048, seed=0)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in mb) <= 2048 for mb in plan)
    fill = sum(lengths) / (len(plan) * 2048)
    assert fill >= 0.9, fill


def test_micro_batches_are_deterministic_per_seed():
    lengths = mixed_lengths(500)
    assert plan_micro_batches(lengths, 2048, seed=3) == plan_micro_batches(lengths, 2048, seed=3)
    assert plan_micro_batches(lengths, 2048, seed=3) != plan_micro_batches(lengths, 2048, seed=4)


def test_an_example_over_budget_is_an_error():
    with pytest.raises(ValueError, match="example 1 has 300 tokens"):
        plan_micro_batches([10, 300], 256, seed=0)


def test_collate_restarts_positions_and_shifts_targets_within_sequences():
    a = TokenizedChat([11, 12, 13, 14], [False, False, True, True])
    b = TokenizedChat([21, 22, 23], [False, True, True])
    batch = collate([a, b])
    assert batch.lengths == (4, 3)
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 21, 22, 23]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # Each sequence's last token gets target 0 and no loss: 14 must not learn to predict 21.
    assert batch.target_ids.tolist() == [[12, 13, 14, 0, 22, 23, 0]]
    assert batch.loss_mask.tolist() == [[False, True, True, False, True, True, False]]
    assert batch.num_target_tokens == a.num_targets + b.num_targets == 4
    assert batch.layout().cu_seqlens.tolist() == [0, 4, 7]
    assert batch.input_ids.dtype == batch.position_ids.dtype == batch.target_ids.dtype == torch.long
    assert batch.input_ids.shape == batch.loss_mask.shape == (1, 7)


def test_collated_batch_runs_through_the_decoder(tiny_dir, tokenizer):
    examples = [tokenize_chat(SYSTEM_CHAT, tokenizer), tokenize_chat([USER, ASSISTANT], tokenizer)]
    batch = collate(examples)
    model = load_pretrained(tiny_dir)
    with torch.no_grad():
        out = model(batch.input_ids, position_ids=batch.position_ids, layout=batch.layout(),
                    target_ids=batch.target_ids)
        alone = model(batch.input_ids[:, : batch.lengths[0]], position_ids=batch.position_ids[:, : batch.lengths[0]],
                      target_ids=batch.target_ids[:, : batch.lengths[0]])
    assert out.logprobs.shape == batch.input_ids.shape
    # Packing must not leak attention across sequences: the first one scores as it does alone.
    torch.testing.assert_close(out.logprobs[:, : batch.lengths[0]], alone.logprobs, atol=1e-5, rtol=1e-5)


# --- Steps and loss normalisation ---------------------------------------------------------------------------


def test_plan_steps_keeps_every_micro_batch_and_pads_the_last_step():
    micro_batches = [[2 * k, 2 * k + 1] for k in range(23)]
    target_tokens = [i % 5 + 1 for i in range(46)]
    steps = plan_steps(micro_batches, world_size=2, grad_accum=3, target_tokens=target_tokens)
    assert len(steps) == 4  # 6 micro-batches per step: 6 + 6 + 6 + 5
    for step in steps:
        assert step.world_size == 2 and len({len(step.for_rank(r)) for r in range(2)}) == 1
    # The last step has 3 slots per rank: rank 0 gets 3 micro-batches, rank 1 two and one empty one.
    assert [len([mb for mb in step.for_rank(1) if mb]) for step in steps] == [3, 3, 3, 2]
    assert steps[-1].for_rank(1)[-1] == ()
    planned = sorted(list(mb) for step in steps for rank in step.micro_batches for mb in rank if mb)
    assert planned == sorted(micro_batches)
    assert sum(step.global_target_tokens for step in steps) == sum(target_tokens)
    for step in steps:
        assert step.global_target_tokens == sum(target_tokens[i] for rank in step.micro_batches for mb in rank
                                                for i in mb)


def test_loss_is_the_same_however_a_step_is_split_across_ranks_and_accumulation():
    """sum over ranks and slots of (masked NLL sum / global_target_tokens) = the step's mean NLL over tokens."""
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(60):
        n = rng.randint(4, 60)
        start = rng.randint(1, n - 1)  # prompt tokens, then the answer
        examples.append(TokenizedChat([rng.randrange(100) for _ in range(n)], [t >= start for t in range(n)]))
    # A fixed log-prob per (example, position): what any model would give, however the examples are packed.
    logprobs = [-torch.rand(len(e), generator=generator, dtype=torch.float64) * 5 for e in examples]

    micro_batches = plan_micro_batches([len(e) for e in examples], 128, seed=0)
    assert len(micro_batches) >= 12 and len(micro_batches) % 6 != 0  # several steps, the last one padded
    target_tokens = [e.num_targets for e in examples]

    def step_losses(world_size: int, grad_accum: int) -> list[float]:
        losses = []
        for step in plan_steps(micro_batches, world_size, grad_accum, target_tokens):
            total = torch.zeros((), dtype=torch.float64)
            for rank in step.micro_batches:  # each rank on its own, with no communication
                for mb in rank:
                    if not mb:
                        continue
                    batch = collate([examples[i] for i in mb])
                    # Position t scores target t+1: shift each example's log-probs like the targets.
                    packed = torch.cat([torch.cat([logprobs[i][1:], logprobs[i].new_zeros(1)]) for i in mb])[None]
                    total += -(packed * batch.loss_mask).sum() / step.global_target_tokens
            losses.append(float(total))
        return losses

    # The whole batch at once: mean NLL over every trained token of each step's examples, unpacked.
    steps = plan_steps(micro_batches, 6, 1, target_tokens)
    expected = []
    for step in steps:
        indices = [i for rank in step.micro_batches for mb in rank for i in mb]
        nll = torch.cat([-logprobs[i][1:][torch.tensor(examples[i].loss_mask[1:])] for i in indices])
        expected.append(float(nll.mean()))
    for world_size, grad_accum in [(1, 6), (2, 3), (3, 2), (6, 1)]:
        assert step_losses(world_size, grad_accum) == pytest.approx(expected, rel=1e-12), (world_size, grad_accum)
