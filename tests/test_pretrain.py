"""The embedded default's base model: its raw-text corpus, pretraining, and the cached build."""

import re

import torch

from align.defaults import build_base, shipped_base_dir, shipped_mismatch, single_process_env, stage_name
from align.model import load_pretrained
from align.pretrain import PretrainArgs, _column_facts, base_documents, pretrain, tokenize_documents
from align.tasks import TaskDataConfig, build_splits
from align.tiny import build_tiny
from align.tokenizer import load_tokenizer

SMALL_TASKS = TaskDataConfig(arithmetic_sft=120, code_sft=40, arithmetic_prompts=10, code_prompts=10,
                             eval_per_level=4)
SMALL_ARGS = PretrainArgs(steps=30, micro_batch_tokens=512, fresh_arithmetic=200, fact_repeats=1, warmup_steps=5)


def test_column_facts_are_true_and_cover_the_working():
    facts = _column_facts()
    for fact in facts:
        left, right = fact.split("=")
        assert eval(left) == int(right), fact  # noqa: S307 (digits and + - * only)
    assert {"7+8=15", "7+8+1=16", "13-7=6", "13-7-1=5", "8*7=56", "8*7+5=61"} <= set(facts)


def test_corpus_holds_no_eval_problem_and_no_chat_answer():
    splits = build_splits(SMALL_TASKS, seed=0)
    documents = base_documents(SMALL_TASKS, 0, SMALL_ARGS)
    first_lines = {d.splitlines()[0] for d in documents}
    for problem in splits["eval"]:
        if problem.family == "arithmetic":
            expression = problem.prompt.removeprefix("What is ").removesuffix("?")
            assert expression not in first_lines, problem.prompt
        else:
            assert f"# {problem.prompt}" not in first_lines, problem.prompt
    assert not any("\\boxed" in d or "<|im_start|>" in d for d in documents)
    arithmetic = [d for d in documents if re.fullmatch(r"[-\d +*()]+", d.splitlines()[0])]
    assert arithmetic and all(d.splitlines()[-1].startswith("= ") for d in arithmetic)


def test_pretraining_lowers_the_loss(tmp_path):
    model_dir = build_tiny(tmp_path / "tiny", tasks=SMALL_TASKS)
    examples = tokenize_documents(base_documents(SMALL_TASKS, 0, SMALL_ARGS), load_tokenizer(model_dir))
    assert all(e.loss_mask[1:] == [True] * (len(e) - 1) for e in examples[:5])
    model = load_pretrained(model_dir)
    losses = pretrain(model, examples, SMALL_ARGS, progress=False)
    assert len(losses) == SMALL_ARGS.steps
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_build_base_writes_a_loadable_trained_model(tmp_path):
    target = build_base(tmp_path / "base", seed=0, tasks=SMALL_TASKS, args=SMALL_ARGS)
    assert (target / "data" / "sft.jsonl").is_file() and (target / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging directory is gone
    random_init = load_pretrained(build_tiny(tmp_path / "init", tasks=SMALL_TASKS)).state_dict()
    trained = load_pretrained(target).state_dict()
    assert any(not torch.equal(random_init[k], trained[k]) for k in trained)


def test_the_shipped_base_weights_fit_the_code_and_are_taken(tmp_path):
    # Tokenizer, config and task data as build_tiny writes them today: if these drift from what the shipped
    # weights were trained on, every fresh machine pretrains for ~10 minutes instead of taking them.
    fresh = build_tiny(tmp_path / "tiny")
    mismatch = shipped_mismatch(fresh, seed=0)
    assert mismatch is None, (f"{mismatch}: bump STAGE_VERSIONS['base'] and run `python -m align.defaults "
                              "rebuild-base --output-dir DIR --ship`")
    target = build_base(tmp_path / "base", seed=0)
    shipped = shipped_base_dir(0) / "model.safetensors"
    assert (target / "model.safetensors").read_bytes() == shipped.read_bytes()
    random_init, base = load_pretrained(fresh).state_dict(), load_pretrained(target).state_dict()
    assert all(base[k].isfinite().all() for k in base) and not torch.equal(random_init["model.embed_tokens.weight"],
                                                                           base["model.embed_tokens.weight"])


def test_shipped_weights_are_refused_for_other_inputs(tmp_path):
    small = shipped_mismatch(build_tiny(tmp_path / "small", tasks=SMALL_TASKS), seed=0)
    assert small.startswith("they were trained on another ") and "data/sft.jsonl" in small
    assert "tokenizer.json" in shipped_mismatch(build_tiny(tmp_path / "seed1", seed=1), seed=0)
    assert shipped_mismatch(tmp_path / "small", seed=7) == f"none shipped for {stage_name('base', 7)}"


def test_children_of_a_rank_run_alone(monkeypatch):
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500",
                        "ACCELERATE_USE_DEEPSPEED": "true", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    env = single_process_env()
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"} & set(env)
    assert env["OMP_NUM_THREADS"] == "1"
