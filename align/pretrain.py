"""A short plain-text pretraining that turns the tiny random initialisation into a base model.

Qwen2.5 ships base and instruct models, and the report's post-training starts from a pretrained base: the
knowledge comes from pretraining, SFT teaches the chat format and the answer style. The embedded default follows
that split. Its base model is the tiny decoder trained with next-token prediction on every token of raw text
(no chat template, no `\\boxed{}` answers) made from the synthetic tasks:

  * worked arithmetic, `56 - 78 + 14` followed by the digit-level working and `= -8`: the training splits'
    problems plus fresh level-1/2 problems (never one of the held-out eval problems);
  * the one-digit column facts the working is made of (`7+8+1=16`, `13-7-1=5`, `8*7+5=61`), every fact several
    times in random order: a ~3M-parameter model otherwise keeps slipping on the table (`4+9+1=15`);
  * the code family's function signatures and bodies, without the chat around them.

Why it matters downstream: DPO with the Online Merging Optimizer merges each update with tau = theta_SFT -
theta_base; with a random initialisation as "base", tau would be the whole model and meaningless.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_with_min_lr_schedule_with_warmup

from align.data import TokenizedChat, collate, plan_micro_batches
from align.losses import sft_loss
from align.model import Qwen2ForCausalLM
from align.run import adamw
from align.tasks import Problem, TaskDataConfig, build_splits, generate_problems


@dataclass(frozen=True)
class PretrainArgs:
    """Plain-text pretraining of the embedded default's base model."""

    steps: int = 1800
    """Optimizer steps (0: no pretraining; the base is the random initialisation). Measured on held-out level-1/2
    problems in the raw format: 600 x 2,048 tokens left the base at 1.5% / 0% (it had not learned to pick the
    digits), 1,800 x 1,024 (~11 min once per machine) reach 91% / 68%, and SFT from it needs 2 epochs, not 3."""
    micro_batch_tokens: int = 1024
    """Tokens per packed step; documents are short, so one row holds dozens of them. More, smaller steps learn
    more per token here than fewer large ones."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices."""
    fresh_arithmetic: int = 16000
    """Fresh level-1 and level-2 arithmetic problems (half each) beyond the training splits; eval excluded."""
    fact_repeats: int = 8
    """Times each one-digit column fact appears in the fact documents."""


def _column_facts() -> list[str]:
    """Every one-digit step the worked arithmetic uses, in its exact spelling (see align.tasks.arithmetic)."""
    facts = []
    for a in range(10):
        for b in range(10):
            facts += [f"{a}+{b}={a + b}", f"{a}+{b}+1={a + b + 1}", f"{a}*{b}={a * b}"]
            facts += [f"{a}*{b}+{c}={a * b + c}" for c in range(1, 9) if a * b + c < 90]
    for top in range(20):
        for b in range(10):
            if top - b >= 0:
                facts.append(f"{top}-{b}={top - b}")
            if top - b - 1 >= 0:
                facts.append(f"{top}-{b}-1={top - b - 1}")
    return facts


def _arithmetic_text(problem: Problem) -> str:
    """`What is 56 - 78 + 14?` + working + `\\boxed{-8}` becomes `56 - 78 + 14` + working + `= -8`."""
    expression = problem.prompt.removeprefix("What is ").removesuffix("?")
    steps = problem.solution.splitlines()[:-1]  # the last line is the chat answer's `The answer is \boxed{N}.`
    return "\n".join([expression, *steps, f"= {problem.answer}"])


def _code_text(problem: Problem) -> str:
    return f"# {problem.prompt}\n{problem.answer}"


def base_documents(tasks: TaskDataConfig, seed: int, args: PretrainArgs) -> list[str]:
    """The base model's raw-text corpus: training-split problems, fresh arithmetic and column facts.

    Held-out eval problems never appear: fresh problems with an eval problem's text are skipped.
    """
    splits = build_splits(tasks, seed)
    eval_keys = {p.key for p in splits["eval"]}
    problems = splits["sft"] + splits["prompts"]
    if "arithmetic" in tasks.families:
        for level in (1, 2):
            # A seed stream of its own: it repeats the splits' problems only by chance, the eval ones never.
            fresh = generate_problems("arithmetic", level, args.fresh_arithmetic // 2, seed=seed + 7919 * level)
            problems += [p for p in fresh if p.key not in eval_keys]
    documents = [_arithmetic_text(p) if p.family == "arithmetic" else _code_text(p) for p in problems]
    if "arithmetic" in tasks.families:
        rng = random.Random(f"facts:{seed}")
        facts = _column_facts() * args.fact_repeats
        rng.shuffle(facts)
        documents += [", ".join(facts[i : i + 16]) for i in range(0, len(facts), 16)]
    random.Random(f"documents:{seed}").shuffle(documents)
    return documents


def tokenize_documents(documents: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedChat]:
    """Each document as `<|endoftext|>` + text + `<|endoftext|>`, every token trained."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return [TokenizedChat([eot, *ids, eot], [True] * (len(ids) + 2)) for ids in encoded]


def pretrain(model: Qwen2ForCausalLM, examples: Sequence[TokenizedChat], args: PretrainArgs, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Next-token training on packed documents, one process; returns the loss of every step."""
    if args.steps <= 0:
        return []
    torch.manual_seed(seed)
    batches, epoch = [], 0
    while len(batches) < args.steps:  # as many passes over the documents as the steps need
        batches += plan_micro_batches([len(e) for e in examples], args.micro_batch_tokens, seed=seed * 1000 + epoch)
        epoch += 1
    optimizer = adamw(model, args.lr, args.weight_decay, (0.9, 0.95))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, args.steps,
                                                           min_lr=args.min_lr)
    model.train()
    losses, tokens, tic = [], 0, time.perf_counter()
    bar = tqdm(batches[: args.steps], desc="pretrain base", unit="step", disable=not progress)
    for micro_batch in bar:
        batch = collate([examples[i] for i in micro_batch])
        scored = model(batch.input_ids, layout=batch.layout(), target_ids=batch.target_ids)
        loss, _ = sft_loss(scored.logprobs, batch.loss_mask, batch.num_target_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += batch.input_ids.numel()
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", tok_s=f"{tokens / (time.perf_counter() - tic):.0f}")
    model.eval()
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("pretraining diverged (non-finite loss)")
    return losses


__all__ = ["PretrainArgs", "base_documents", "pretrain", "tokenize_documents"]
