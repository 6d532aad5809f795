"""vLLM rollout actors for GRPO: sample n completions per query with per-token log-probs, tagged with the policy
version that produced them, and take weight syncs from the trainer.

    group = RolloutWorkerGroup(RolloutWorkerArgs(model_path="sft/final", resources=ActorResources(num_actors=2)))
    batch = group.generate(prompt_ids, RolloutSampling(n=8, temperature=1.0, max_tokens=256, seed=step), version)
    batch.completion_token_ids[i * 8 + j], batch.logprobs[...], batch.text[...], batch.finish_reason[...]
    stats = group.sync_weights(policy.named_parameters(), version=step + 1, max_bucket_bytes=256 * 2**20)
    group.close()

Each actor holds one `vllm.LLM` running in the actor's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set in the
actor's environment before vLLM is imported), eager, with the weight-sync worker extension (rollout/weight_sync.py).
The group splits a call's prompts into contiguous slices, one per actor, and concatenates the results in order.

Choices:
- Log-probs are vLLM's "processed_logprobs": after temperature (and top-k/top-p), i.e. of the distribution the
  token was drawn from, comparable with `Qwen2ForCausalLM(..., temperature=T)` when top_p = 1 and top_k = 0.
  (vLLM's default, raw_logprobs, ignores the temperature.)
- Seeds: prompt i of a call (counted over the whole call, not the actor's slice) samples with seed
  hash(sampling.seed, i), so samples do not depend on how prompts were split across actors, and two copies of
  the same prompt in one call get different samples. Pass a new `sampling.seed` every step.
- Policy version: an actor serves the version of the last completed sync; a generate call names the version it
  expects and fails on any other (a rollout from stale or half-synced weights is a silent off-policy bug). During a
  sync the version is None.
- No sleep/wake: vLLM's CPU worker ignores sleep mode. On GPUs with engines colocated with the trainer one would
  add `enable_sleep_mode` and `llm.sleep()`/`wake_up()` around training; not wired here.
- On the CPU, `kv_cache_memory_bytes` sets the KV cache size outright; vLLM's `gpu_memory_utilization` is there a
  fraction of the NUMA node's memory that must also cover the process's own memory (STACK.md).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import ray
import torch
from ray.util.placement_group import remove_placement_group

from align.actors import ActorResources, slice_starts, split_evenly, start_actors
from align.model import PackedLayout
from align.model.config import DTYPES
from rollout.offline import vllm_process_env
from rollout.weight_sync import (
    WEIGHT_SYNC_EXTENSION,
    RayObjectStoreTransport,
    SyncStats,
    WeightBucket,
    no_gather,
    sync_weights,
)


@dataclass(frozen=True)
class RolloutWorkerArgs:
    """The rollout engines: model, resources, vLLM settings."""

    model_path: str
    """Model directory (config.json, safetensors, tokenizer files) the engines start from."""
    resources: ActorResources = field(default_factory=ActorResources)
    """The actors, each with its own vLLM engine (a call's prompts are split across them), their CPUs and GPUs;
    vLLM's CPU worker fixes the torch threads at start, so they are set here, not later."""
    dtype: str = "float32"
    """Engine weights dtype: float32 on the CPU, bfloat16 on GPUs."""
    max_model_len: int = 2048
    """Longest prompt + completion, in tokens."""
    kv_cache_memory_bytes: int | None = 256 * 2**20
    """KV cache size per engine; None sizes it from gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.15
    """With kv_cache_memory_bytes None: vLLM's memory fraction (on the CPU, of the NUMA node's memory)."""
    seed: int = 0
    """Engine seed (sampling uses RolloutSampling.seed)."""
    detokenize: bool = True
    """Load the tokenizer and return completion text (rewards read it); False returns token ids only."""
    initial_policy_version: int = 0
    """Version of the weights in model_path."""
    max_restarts: int = 3
    """Times Ray restarts a rollout actor that died; it comes back with model_path's weights (see RolloutLost)."""
    compile_sampler: bool = True
    """torch.compile vLLM's sampler helpers (vLLM's default): a rollout engine samples all run long, so it recoups
    the first compile; see rollout.offline.vllm_process_env for the measurements."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"RolloutWorkerArgs.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("RolloutWorkerArgs.kv_cache_memory_bytes: must be positive or None")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("RolloutWorkerArgs.gpu_memory_utilization: must be in (0, 1]")


@dataclass(frozen=True)
class RolloutSampling:
    """How completions are sampled (the vLLM SamplingParams fields GRPO uses)."""

    n: int = 8
    """Completions per prompt (the GRPO group size; Qwen2.5 samples 8)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are returned at this temperature."""
    top_p: float = 1.0
    """Nucleus threshold; below 1 the returned log-probs are of the truncated distribution."""
    top_k: int = 0
    """Top-k truncation; 0 disables it."""
    max_tokens: int = 256
    """Longest completion, in tokens."""
    seed: int = 0
    """Sampling seed of this call (prompt i uses hash(seed, i)); change it every step."""
    ignore_eos: bool = False
    """Keep sampling past end-of-turn tokens up to max_tokens (tests use it for fixed lengths)."""

    def __post_init__(self):
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("RolloutSampling: n and max_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("RolloutSampling: temperature >= 0, 0 < top_p <= 1 and top_k >= 0 required")


@dataclass(frozen=True)
class RolloutBatch:
    """Completions of a call, n per prompt; sample j of prompt i is at index i * group_size + j."""

    policy_version: int
    """Version of the weights that sampled every completion."""
    group_size: int
    """Completions per prompt (RolloutSampling.n)."""
    prompt_token_ids: list[list[int]]  # [Q] ragged: the prompts, as given
    completion_token_ids: list[list[int]]  # [Q * n] ragged: sampled tokens
    logprobs: list[list[float]]  # [Q * n] ragged: log-prob of each sampled token at the sampling temperature
    text: list[str]  # [Q * n] decoded completions ("" when detokenize is off)
    finish_reason: list[str]  # [Q * n] "stop" (end of turn or stop token) or "length" (max_tokens)

    @classmethod
    def concat(cls, parts: Sequence[RolloutBatch]) -> RolloutBatch:
        """The parts' prompts and completions in order; all parts must share version and group size."""
        if not parts:
            raise ValueError("RolloutBatch.concat: no parts")
        if len({(p.policy_version, p.group_size) for p in parts}) != 1:
            raise ValueError(f"RolloutBatch.concat: parts from different versions or group sizes: "
                             f"{[(p.policy_version, p.group_size) for p in parts]}")
        return cls(parts[0].policy_version, parts[0].group_size,
                   *([x for p in parts for x in getattr(p, field)] for field in
                     ("prompt_token_ids", "completion_token_ids", "logprobs", "text", "finish_reason")))

    def sequences(self) -> list[list[int]]:
        """Prompt + completion token ids of every sample [Q * n]."""
        return [self.prompt_token_ids[i // self.group_size] + c for i, c in enumerate(self.completion_token_ids)]

    def padded_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vLLM log-probs [Q * n, T] float32 zero-padded, mask [Q * n, T] bool), T the longest completion."""
        longest = max((len(c) for c in self.completion_token_ids), default=0)
        logprobs = torch.zeros(len(self.logprobs), longest)  # [N, T]
        mask = torch.zeros(len(self.logprobs), longest, dtype=torch.bool)  # [N, T]
        for i, lps in enumerate(self.logprobs):
            logprobs[i, : len(lps)] = torch.tensor(lps)
            mask[i, : len(lps)] = True
        return logprobs, mask


def sample_seed(seed: int, prompt_index: int) -> int:
    """Per-prompt sampling seed: a hash of (call seed, prompt's index in the call), in [0, 2**31)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def policy_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0,
                    batch_tokens: int = 8192) -> torch.Tensor:
    """Our decoder's log-probs of every sampled token of `batch`, in `padded_logprobs()`'s layout.

    Sequences (prompt + completion) are packed padding-free, up to `batch_tokens` per forward pass (a longer one
    alone). Gradients flow unless the caller disables them.

    Returns:
        [Q * n, T] float32, zero past each completion's end.
    """
    sequences = batch.sequences()
    longest = max((len(c) for c in batch.completion_token_ids), default=0)
    out = torch.zeros(len(sequences), longest)  # [N, T]
    device = next(model.parameters()).device
    chunks: list[list[int]] = []
    tokens = 0
    for i, seq in enumerate(sequences):
        if chunks and tokens + len(seq) <= batch_tokens:
            chunks[-1].append(i)
            tokens += len(seq)
        else:
            chunks.append([i])
            tokens = len(seq)
    for chunk in chunks:
        lengths = [len(sequences[i]) for i in chunk]
        ids = torch.tensor([t for i in chunk for t in sequences[i]], device=device)[None]  # [1, S]
        # Target of each position: the next token of its own sequence (0, masked out, at a sequence's end).
        targets = torch.tensor([t for i in chunk for t in sequences[i][1:] + [0]], device=device)[None]  # [1, S]
        layout = PackedLayout.from_lengths(lengths, device=device)
        logprobs = model(ids, layout=layout, target_ids=targets, temperature=temperature).logprobs[0]  # [S]
        start = 0
        for i, length in zip(chunk, lengths, strict=True):
            completion = len(batch.completion_token_ids[i])
            # Completion token k sits at position length - completion + k; its log-prob is predicted one earlier.
            first = start + length - completion - 1
            out[i, :completion] = logprobs[first : first + completion].float()
            start += length
    return out


class StaleWeightsError(ValueError):
    """A rollout engine does not serve the policy version a call expects: mid-sync, or restarted by Ray."""


class RolloutLost(RuntimeError):
    """A rollout call failed because an actor died or came back from a restart with its starting weights. The
    group has waited until every actor answers again; re-sync the policy's weights, then retry the call."""


class RolloutActor:
    """One vLLM engine (a Ray actor through RolloutWorkerGroup; a plain object works in a process of its own)."""

    def __init__(self, args: RolloutWorkerArgs):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (also in the runtime env)
        # vLLM's CPU worker turns set_num_threads into a no-op later
        torch.set_num_threads(args.resources.torch_threads)
        from vllm import LLM

        self.args = args
        # On the CPU, vLLM 0.32 crashes when a seeded request's prefill is split across engine steps (it rewinds
        # the request's generator, and CPU generators have no offset), so prompts are prefilled whole there.
        whole_prefills = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(args.max_model_len, 4096)}
        self.llm = LLM(
            model=args.model_path, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
            seed=args.seed, skip_tokenizer_init=not args.detokenize, logprobs_mode="processed_logprobs",
            worker_extension_cls=WEIGHT_SYNC_EXTENSION, **whole_prefills,
        )
        self.policy_version: int | None = args.initial_policy_version
        self.prompts_served = 0

    def info(self) -> dict[str, int | None]:
        """pid, torch threads, policy version and prompts served (for tests and logs)."""
        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "policy_version": self.policy_version,
                "prompts_served": self.prompts_served}

    def generate(self, prompt_token_ids: list[list[int]], sampling: RolloutSampling, policy_version: int,
                 first_index: int = 0) -> RolloutBatch:
        """`sampling.n` completions of each prompt; `first_index` is the first prompt's index in the whole call
        (for its seed). Raises StaleWeightsError unless this engine serves `policy_version`."""
        from vllm import SamplingParams

        self._check_version(policy_version)
        params = [
            SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                           max_tokens=sampling.max_tokens, seed=sample_seed(sampling.seed, first_index + i),
                           logprobs=0, ignore_eos=sampling.ignore_eos, detokenize=self.args.detokenize)
            for i in range(len(prompt_token_ids))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False)
        completions = [c for output in outputs for c in output.outputs]
        self.prompts_served += len(prompt_token_ids)
        return RolloutBatch(
            policy_version=policy_version,
            group_size=sampling.n,
            prompt_token_ids=[list(p) for p in prompt_token_ids],
            completion_token_ids=[list(c.token_ids) for c in completions],
            logprobs=[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)] for c in completions],
            text=[c.text or "" for c in completions],
            finish_reason=[str(c.finish_reason) for c in completions],
        )

    def score(self, sequences: list[list[int]], policy_version: int) -> list[list[float]]:
        """log p(token_t | tokens < t) for t >= 1 of each sequence (vLLM prompt log-probs, temperature 1)."""
        from vllm import SamplingParams

        self._check_version(policy_version)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                for o, s in zip(outputs, sequences, strict=True)]

    def load_weight_bucket(self, bucket: WeightBucket) -> int:
        """Load one bucket of HF-named tensors into the engine; the version is None until `set_policy_version`."""
        self.policy_version = None
        return sum(self.llm.collective_rpc("load_hf_weight_bucket", args=(bucket,)))

    def set_policy_version(self, version: int) -> None:
        self.policy_version = version

    def _check_version(self, expected: int) -> None:
        if self.policy_version != expected:
            state = "mid-sync" if self.policy_version is None else f"version {self.policy_version}"
            raise StaleWeightsError(f"rollout engine serves {state}, the call expects policy version {expected}")


def get_all(refs: Sequence[ray.ObjectRef]) -> list:
    """ray.get of every reference, raising the first error only after all have finished (so that no actor's
    error is left unretrieved, and no call is still running when the caller moves on)."""
    results, error = [], None
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except Exception as err:  # a RayTaskError carrying the actor's exception
            error = error or err
    if error is not None:
        raise error
    return results


class RolloutWorkerGroup:
    """`args.resources.num_actors` RolloutActors in a placement group, called as one. Needs a running Ray
    (ray.init); `close()` ends the actors and frees their CPUs."""

    def __init__(self, args: RolloutWorkerArgs):
        self.args = args
        self._placement_group, self.actors = start_actors(RolloutActor, args.resources,
                                                          vllm_process_env(args.resources.num_gpus > 0,
                                                                           args.compile_sampler), args,
                                                          max_restarts=args.max_restarts)
        self._pids = [info["pid"] for info in self.info()]  # waits for every engine; a new pid means a restart

    def generate(self, prompt_token_ids: Sequence[list[int]], sampling: RolloutSampling,
                 policy_version: int) -> RolloutBatch:
        """`sampling.n` completions per prompt, in prompt order; each actor samples one contiguous slice."""
        slices = split_evenly(prompt_token_ids, len(self.actors))
        calls = [actor.generate.remote(prompts, sampling, policy_version, first)
                 for actor, first, prompts in zip(self.actors, slice_starts(slices), slices, strict=True) if prompts]
        try:
            return RolloutBatch.concat(get_all(calls))
        except (ray.exceptions.RayActorError, StaleWeightsError) as error:
            # Died during the call (RayActorError), or restarted before it (its starting weights are stale).
            pids = [info["pid"] for info in self.wait_until_ready()]
            restarted = pids != self._pids
            self._pids = pids
            if isinstance(error, StaleWeightsError) and not restarted:
                raise  # the caller asked for a version nobody synced
            raise RolloutLost(f"a rollout actor was lost and restarted: {error}") from error

    def score(self, sequences: Sequence[list[int]], policy_version: int) -> list[list[float]]:
        """Every sequence's token log-probs (RolloutActor.score), split across the actors."""
        calls = [actor.score.remote(part, policy_version)
                 for actor, part in zip(self.actors, split_evenly(sequences, len(self.actors)), strict=True) if part]
        return [row for part in get_all(calls) for row in part]

    def sync_weights(self, named_params: Iterable[tuple[str, torch.Tensor]], version: int, max_bucket_bytes: int,
                     gather: Callable[[torch.Tensor], AbstractContextManager] = no_gather) -> SyncStats:
        """Send the policy's weights to every actor in bounded buckets (rollout.weight_sync.sync_weights), cast
        to the engines' dtype, then set their version to `version`. Under ZeRO-3 the rank holding this group calls
        it with `gather`; the other ranks call `sync_weights(named_params, None, version, max_bucket_bytes,
        gather, send=False)` at the same time, to join the gathers."""
        return sync_weights(named_params, RayObjectStoreTransport(self.actors), version, max_bucket_bytes, gather,
                            dtype=DTYPES[self.args.dtype])

    def info(self) -> list[dict[str, int | None]]:
        return ray.get([actor.info.remote() for actor in self.actors])

    def wait_until_ready(self, timeout_s: float = 600.0) -> list[dict[str, int | None]]:
        """`info()` once every actor answers, e.g. after Ray restarted a dead one (one engine start, ~20 s here).
        Raises ActorDiedError once an actor is out of restarts, TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.info()
            except ray.exceptions.ActorUnavailableError:  # restarting: calls fail until it is back
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout actors not back after {timeout_s:.0f} s") from None
                time.sleep(1.0)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self._placement_group)
        self.actors = []

    def __enter__(self) -> RolloutWorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
