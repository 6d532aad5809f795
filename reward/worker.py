"""The Ray reward worker: scores batches of (prompt, response) with a reward model and/or rule-based verifiers.

    group = RewardWorkerGroup(RewardWorkerArgs(model_path="rm/", verifiers=("task",), zero3=True,
                                               resources=ActorResources(num_actors=2)))
    scored = group.score([RewardRequest(prompt=[{"role": "user", "content": "2+3?"}], response="\\boxed{5}",
                                        task={"family": "arithmetic", "answer": "5"})])
    scored.reward, scored.model_score, scored.verifier_pass, scored.reason
    group.close()

Per sample, reward = verifier_weight * pass + model_weight * norm(model_score), where pass is 1 when every
configured verifier passes the response (else 0) and norm is the configured normalisation of the reward model's
score (`NORMALIZERS`); a term is absent when its scorer is not configured. With `combination="gated"` the model
term counts only for responses that pass (`COMBINATIONS`). The parts come back beside the reward.

The model scores the whole conversation, prompt plus the response as an assistant turn, rendered with the chat
template and tokenized exactly as `reward-eval` and reward-model training do (`align.data.parse_pair` and
`tokenize_pair`), packed padding-free by `reward.evaluate.score_sequences`. Nothing is truncated: a reward for
a cut-off conversation would be a reward for a different answer.

Actors. The batch is split into `resources.num_actors` contiguous slices, one per actor, and the results are
concatenated in order. Without `zero3` every actor holds the whole model (data parallel). With `zero3` the actors
are the ranks of one torch.distributed group (gloo on the CPU) and the model is wrapped by DeepSpeed ZeRO-3 with no
optimizer (inference only): each rank keeps 1/N of every parameter and the ranks all-gather each module's weights
around its forward call. That collective is why every rank must make the same number of forward calls: a rank with
fewer packed chunks than the busiest one runs a one-token dummy sequence for each missing call. Requests are checked
on the driver before dispatch, so that a bad row cannot raise on one rank while its peers wait in a collective.

Verifier checks run first, in each actor's small thread pool (they mostly wait on sandboxed child processes);
then the reward model scores the responses the combination gives its term (all with "sum", the passing ones with
"gated": a fraction of a hard GRPO batch, which made the reward phase of a GRPO step 2-3x faster). Each
distinct (prompt, response, task) of a slice is scored once and its result copied to the repeats: a GRPO group of
a confident policy holds the same completion several times over, and every check of a code answer is a sandboxed
process.

The group setup (`start_actors`, `form_process_group`, `DistributedActor`) lives in align.actors, shared with
the GRPO policy group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import remove_placement_group

from align.actors import (
    ActorResources,
    DistributedActor,
    form_process_group,
    split_evenly,
    start_actors,
    zero3_inference_config,
)
from align.data import PreferencePair, parse_pair
from align.data.pairs import tokenize_pair
from align.tokenizer import load_tokenizer
from reward.evaluate import score_sequences
from reward.model import load_reward_model
from reward.verifiers import Verdict, check_task, first_occurrences

VERIFIERS: dict[str, Callable[[Mapping, str], Verdict]] = {"task": check_task}
"""Verifier name -> check(task row, response). "task": the synthetic tasks' checker (reward.verifiers.check_task),
which reads the row's `family` and `answer` (arithmetic) or `tests` (code)."""


def _no_normalization(scores: torch.Tensor) -> torch.Tensor:
    return scores


def _batch_whitening(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over the scored batch (population std; 0 for a batch of one). Reward models' score scale
    is arbitrary (Bradley-Terry fixes only differences), so this puts it on a scale comparable to the verifier's
    0/1, at the price of a reward that depends on what else is in the batch."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std(correction=0) + 1e-6)


NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": _no_normalization,
                                                                    "batch": _batch_whitening}
"""How the model's score enters the reward: "none" raw, "batch" whitened over the batch of one `score` call."""


def model_term_for_all(passed: torch.Tensor) -> torch.Tensor:
    """Every response gets the model term."""
    return torch.ones_like(passed, dtype=torch.bool)


def model_term_if_passed(passed: torch.Tensor) -> torch.Tensor:
    """The model term only for responses the verifiers pass: the reward model ranks correct answers among
    themselves, and a wrong answer gets nothing from it. Why: in a GRPO group whose responses all fail, a summed
    reward differs only by the model's score, so the whole update there optimises the reward model alone, which a
    policy learns to exploit (Gao et al. 2023, reward-model overoptimisation; here: answers cut short because the
    model prefers concise ones). Gated, such a group has zero variance and no advantage. The reward model then
    scores only the passing responses (a fraction of a hard batch), and "batch" normalisation runs over them."""
    return passed.bool()


COMBINATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": model_term_for_all,
    "gated": model_term_if_passed,
}
"""How the weighted model and verifier terms make the reward when both are configured: which responses get the
model term, passed [N] bool -> [N] bool. reward = verifier term + model term where it applies; only those
responses are scored by the reward model, and the model score is normalised over them."""


def model_term_applies(verifier_pass: torch.Tensor | None, size: int, combination: str) -> torch.Tensor:
    """[size] bool: the responses that get the model term, which are also the ones the reward model scores: all of
    them without verifiers, else COMBINATIONS[combination](verifier_pass)."""
    return torch.ones(size, dtype=torch.bool) if verifier_pass is None else COMBINATIONS[combination](verifier_pass)


@dataclass(frozen=True)
class RewardWorkerArgs:
    """How rewards are computed and by how many actors."""

    model_path: str = ""
    """Reward model directory (a saved Qwen2ForSequenceClassification with its tokenizer files); "" for none."""
    verifiers: tuple[str, ...] = ()
    """Rule-based verifiers to run on every response (keys of VERIFIERS); a sample passes when all pass."""
    model_weight: float = 1.0
    """Weight of the (normalised) model score in the reward."""
    verifier_weight: float = 1.0
    """Weight of the verifiers' pass (1) / fail (0) in the reward."""
    model_score_norm: str = "none"
    """Normalisation of the model score before weighting (keys of NORMALIZERS)."""
    combination: str = "sum"
    """With both a model and verifiers: "sum" adds the terms, "gated" counts the model term only for responses
    that pass (keys of COMBINATIONS)."""
    resources: ActorResources = field(default_factory=ActorResources)
    """The actors the batch is split across (with zero3, the ranks of one ZeRO-3 group), their CPUs and GPUs."""
    zero3: bool = False
    """Partition the reward model's parameters across the actors with DeepSpeed ZeRO-3 (inference only)."""
    batch_tokens: int = 8192
    """Tokens per packed forward pass (a longer conversation goes alone)."""
    verifier_threads: int = 2
    """Threads per actor running verifier checks."""
    collective_timeout_s: float = 600.0
    """Timeout of the ZeRO-3 group's collectives, so a dead rank ends the others with an error, not a hang."""

    def __post_init__(self):
        if not self.model_path and not self.verifiers:
            raise ValueError("RewardWorkerArgs: give a model_path, verifiers, or both")
        unknown = [name for name in self.verifiers if name not in VERIFIERS]
        if unknown:
            raise ValueError(f"RewardWorkerArgs.verifiers: unknown {unknown}; known: {sorted(VERIFIERS)}")
        if self.model_score_norm not in NORMALIZERS:
            raise ValueError(f"RewardWorkerArgs.model_score_norm={self.model_score_norm!r}: expected one of "
                             f"{sorted(NORMALIZERS)}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"RewardWorkerArgs.combination={self.combination!r}: expected one of "
                             f"{sorted(COMBINATIONS)}")
        if not (math.isfinite(self.model_weight) and math.isfinite(self.verifier_weight)):
            raise ValueError("RewardWorkerArgs: model_weight and verifier_weight must be finite")
        if self.zero3 and not self.model_path:
            raise ValueError("RewardWorkerArgs.zero3 partitions a reward model: set model_path")
        for name in ("batch_tokens", "verifier_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"RewardWorkerArgs.{name}={getattr(self, name)}: must be >= 1")
        if self.collective_timeout_s <= 0:
            raise ValueError("RewardWorkerArgs.collective_timeout_s: must be > 0")


@dataclass(frozen=True)
class RewardRequest:
    """One response to score."""

    prompt: list[dict] | str
    """The chat messages before the response ({role, content} dicts), or one user turn as a string."""
    response: str
    """The policy's answer, scored as the assistant turn that follows the prompt."""
    task: Mapping | None = None
    """The task row fields the verifiers read (for "task": family, and answer or tests); None without verifiers."""


@dataclass(frozen=True)
class SampleScores:
    """What one actor found for its slice, before the rewards are combined."""

    model_score: torch.Tensor | None  # [n] float32 raw reward-model scores, NaN where not scored; None without a model
    verifier_pass: torch.Tensor | None  # [n] bool, every verifier passed; None without verifiers
    reason: tuple[str, ...]  # n verifier reasons ("" without verifiers)


@dataclass(frozen=True)
class ScoredBatch:
    """Rewards of a batch of requests, in request order, and the parts they came from."""

    reward: torch.Tensor  # [N] float32, verifier_weight * pass + model_weight * norm(model_score) (combine_rewards)
    model_score: torch.Tensor | None  # [N] float32 raw reward-model scores, NaN where the combination leaves the
    # model term out (not scored); None without a model
    verifier_pass: torch.Tensor | None  # [N] bool, every verifier passed; None without verifiers
    reason: tuple[str, ...]  # N verifier reasons, "name: reason" per verifier when several ("" without verifiers)


def combine_rewards(model_score: torch.Tensor | None, verifier_pass: torch.Tensor | None, model_weight: float,
                    verifier_weight: float, model_score_norm: str, combination: str = "sum") -> torch.Tensor:
    """reward [N] = verifier_weight * verifier_pass + model_weight * NORMALIZERS[model_score_norm](model_score) on
    the responses COMBINATIONS[combination] gives the model term (0 elsewhere), or the one term whose part is not
    None. Scores outside those responses are ignored (the actors leave them NaN: not scored).

    Example: scores [1, 3], passes [True, False], weights 0.5 / 2, "batch": whitened scores [-1, 1], so "sum" gives
    [2 * 1 + 0.5 * -1, 2 * 0 + 0.5 * 1] = [1.5, 0.5]; "gated" whitens the first score alone (a batch of one: 0)
    and gives [2 * 1 + 0.5 * 0, 2 * 0] = [2.0, 0.0], raw ("none") [2 * 1 + 0.5 * 1, 0] = [2.5, 0.0].
    """
    if model_score is None and verifier_pass is None:
        raise ValueError("combine_rewards: neither a model score nor a verifier result")
    if model_score is None:
        return verifier_weight * verifier_pass.float()  # [N]
    applies = model_term_applies(verifier_pass, model_score.numel(), combination)  # [N]
    reward = torch.zeros(model_score.shape, dtype=torch.float32) if verifier_pass is None else (
        verifier_weight * verifier_pass.float())  # [N]
    reward[applies] += model_weight * NORMALIZERS[model_score_norm](model_score[applies].float())
    return reward  # [N]


def conversation_ids(request: RewardRequest, tokenizer, index: int) -> list[int]:
    """Token ids of prompt + response as an assistant turn, exactly as reward-eval tokenizes a pair's side.

    The request goes through parse_pair (which checks the messages) as a pair with the response on both sides;
    tokenize_pair then renders and tokenizes both: twice the tokenizer work of one side, for no second copy of
    the tokenization rules."""
    pair: PreferencePair = parse_pair({"prompt": request.prompt, "chosen": request.response,
                                       "rejected": request.response}, "reward request", index)
    return tokenize_pair(pair, tokenizer).chosen_ids


def check_requests(requests: Sequence[RewardRequest], args: RewardWorkerArgs) -> None:
    """Raise ValueError (DataError) on a request an actor could not score; run on the driver before dispatch."""
    for index, request in enumerate(requests):
        if not isinstance(request.response, str):
            raise ValueError(f"reward request: row {index}: field 'response': expected a string, got "
                             f"{type(request.response).__name__}")
        parse_pair({"prompt": request.prompt, "chosen": request.response, "rejected": request.response},
                   "reward request", index)
        if args.verifiers and (request.task is None or request.task.get("family") is None):
            raise ValueError(f"reward request: row {index}: field 'task': a row with 'family' is required by "
                             f"verifiers {args.verifiers}")


def greedy_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of consecutive sequences grouped as score_sequences packs them (up to max_tokens per chunk, a longer
    sequence alone), so that scoring each chunk is exactly one forward call."""
    chunks: list[list[int]] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if chunks and chunks[-1] and tokens + length <= max_tokens:
            chunks[-1].append(index)
            tokens += length
        else:
            chunks.append([index])
            tokens = length
    return chunks


def request_key(request: RewardRequest) -> str:
    """Equal for requests that every scorer must score alike: same prompt, response and task row."""
    return json.dumps([request.prompt, request.response, request.task], sort_keys=True, default=str)


class RewardActor(DistributedActor):
    """One reward actor (a Ray actor through RewardWorkerGroup; a plain object works in-process too)."""

    def __init__(self, args: RewardWorkerArgs):
        torch.set_num_threads(args.resources.torch_threads)
        self.args = args
        self.pool = ThreadPoolExecutor(max_workers=args.verifier_threads) if args.verifiers else None
        self.tokenizer = load_tokenizer(args.model_path) if args.model_path else None
        self.model = None
        self.engine = None

    def load_model(self) -> None:
        """Load the reward model; with zero3 (after init_process_group, on every rank at once) partition it."""
        if not self.args.model_path:
            return
        model = load_reward_model(self.args.model_path).eval()
        if self.args.resources.num_gpus and torch.cuda.is_available():  # GPUs: not run on the project's machines
            model = model.cuda()
        if self.args.zero3:
            import deepspeed

            # Every rank reads the full checkpoint once; DeepSpeed then keeps this rank's partition of each
            # parameter and frees the rest.
            self.engine, *_ = deepspeed.initialize(model=model, config=zero3_inference_config())
            model = self.engine.module  # its submodules carry ZeRO-3's gather/release hooks
        self.model = model

    def partition_sizes(self) -> dict[str, tuple[int, int]]:
        """Parameter name -> (elements this rank holds, elements of the full parameter)."""
        if self.engine is None:
            return {name: (p.numel(), p.numel()) for name, p in self.model.named_parameters()}
        return {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in self.model.named_parameters()}

    def score(self, requests: list[RewardRequest]) -> SampleScores:
        """Model scores and verifier verdicts of `requests`, each distinct request scored once; with zero3, every
        rank must call it at once."""
        firsts, inverse = first_occurrences([request_key(r) for r in requests])
        distinct = self._score_distinct([requests[i] for i in firsts])
        index = torch.tensor(inverse, dtype=torch.long)
        return SampleScores(None if distinct.model_score is None else distinct.model_score[index],
                            None if distinct.verifier_pass is None else distinct.verifier_pass[index],
                            tuple(distinct.reason[i] for i in inverse))

    def _score_distinct(self, requests: list[RewardRequest]) -> SampleScores:
        """The verifiers first, then the reward model on the responses the combination gives its term (with "gated",
        only those that passed)."""
        passed, reasons = self._verify(requests) if self.args.verifiers else (None, ("",) * len(requests))
        if self.model is None:
            return SampleScores(None, passed, reasons)
        scored = model_term_applies(passed, len(requests), self.args.combination)  # [n] bool
        model_score = torch.full((len(requests),), float("nan"))
        model_score[scored] = self._model_scores([r for r, s in zip(requests, scored.tolist(), strict=True) if s])
        return SampleScores(model_score, passed, reasons)

    def _verify(self, requests: list[RewardRequest]) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(every verifier passed [n] bool, reasons), the checks run in the actor's thread pool."""
        verdicts = [[self.pool.submit(VERIFIERS[name], r.task, r.response) for name in self.args.verifiers]
                    for r in requests]
        results = [[future.result() for future in futures] for futures in verdicts]
        passed = torch.tensor([all(v.passed for v in vs) for vs in results], dtype=torch.bool).reshape(len(requests))
        several = len(self.args.verifiers) > 1
        reasons = tuple("; ".join(f"{name}: {v.reason}" if several else v.reason
                                  for name, v in zip(self.args.verifiers, vs, strict=True)) for vs in results)
        return passed, reasons

    def _model_scores(self, requests: list[RewardRequest]) -> torch.Tensor:
        sequences = [conversation_ids(r, self.tokenizer, i) for i, r in enumerate(requests)]
        if self.engine is None:
            return score_sequences(self.model, sequences, self.args.batch_tokens).cpu()
        chunks = greedy_chunks([len(s) for s in sequences], self.args.batch_tokens)
        calls = torch.tensor([len(chunks)])
        torch.distributed.all_reduce(calls, op=torch.distributed.ReduceOp.MAX)  # the busiest rank's forward calls
        scores = [score_sequences(self.model, [sequences[i] for i in chunk], self.args.batch_tokens)
                  for chunk in chunks]
        dummy = [[self.tokenizer.pad_token_id or 0]]
        for _ in range(int(calls) - len(chunks)):  # keep step with the other ranks' parameter gathers
            score_sequences(self.model, dummy, self.args.batch_tokens)
        return torch.cat(scores).cpu() if scores else torch.zeros(0)


class RewardWorkerGroup:
    """`args.resources.num_actors` RewardActors in a placement group (one ZeRO-3 group when args.zero3), called as one.
    Needs a running Ray (ray.init); `close()` ends the actors and frees their CPUs."""

    def __init__(self, args: RewardWorkerArgs):
        self.args = args
        env = args.resources.accelerator_env() if args.zero3 else {}
        self._placement_group, self.actors = start_actors(RewardActor, args.resources, env, args)
        if args.zero3:
            form_process_group(self.actors, args.collective_timeout_s)
        ray.get([actor.load_model.remote() for actor in self.actors])

    def score(self, requests: Sequence[RewardRequest]) -> ScoredBatch:
        """Rewards of `requests`, in order: each actor scores one contiguous slice."""
        check_requests(requests, self.args)
        slices = split_evenly(requests, len(self.actors))
        parts: list[SampleScores] = ray.get([a.score.remote(s) for a, s in zip(self.actors, slices, strict=True)])
        model_score = torch.cat([p.model_score for p in parts]) if self.args.model_path else None
        verifier_pass = torch.cat([p.verifier_pass for p in parts]) if self.args.verifiers else None
        reward = combine_rewards(model_score, verifier_pass, self.args.model_weight, self.args.verifier_weight,
                                 self.args.model_score_norm, self.args.combination)
        return ScoredBatch(reward, model_score, verifier_pass, tuple(r for p in parts for r in p.reason))

    def partition_sizes(self) -> list[dict[str, tuple[int, int]]]:
        """Per actor: parameter name -> (elements it holds, full elements); empty dicts without a model."""
        if not self.args.model_path:
            return [{} for _ in self.actors]
        return ray.get([actor.partition_sizes.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self._placement_group)
        self.actors = []

    def __enter__(self) -> RewardWorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
